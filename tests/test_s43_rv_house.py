"""Review of session 43's house work (bf16-mixed spellings, AttentionCapture's in-place refusal, TargetsCounted):

* ``torch.linalg.matmul`` is ``torch.matmul`` under another name: under ``precision="bf16-mixed"`` a product of two
  batched operands ran in fp32 in that spelling and in bf16 as ``q @ k``; by a 2-D weight it stays under the rule;
* a capture with gradients refused ``maps`` once the *caller* had changed a map it was given (rollout by hand adding
  the identity in place), blaming the model; the model's own change is still refused;
* a :class:`~salience._core.engine.TargetsCounted` pickled back without the notes a ``SalienceError`` keeps."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from salience._core import engine
from salience._core.errors import SalienceError
from salience._core.islands import HighResolutionFp32
from salience.attention import AttentionCapture

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

BF = torch.bfloat16


def test_linalg_matmul_runs_as_the_matmul_it_is():
    g = torch.Generator().manual_seed(0)
    # a 16 px input: (1, 2, 8, 8) has both last sides past 16 / 4 (a "large map"), as a ViT's attention tensors
    q, k, w = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g), torch.randn(8, 8, generator=g)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        batched, by_method = torch.linalg.matmul(q, k.transpose(-2, -1)), q @ k.transpose(-2, -1)
        by_weight, weight_method = torch.linalg.matmul(q, w), q @ w
    assert batched.dtype == by_method.dtype == BF and torch.equal(batched, by_method)  # linalg's was float32
    assert by_weight.dtype == weight_method.dtype == torch.float32 and torch.equal(by_weight, weight_method)


class _Attend(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return (h @ h.transpose(-2, -1)).softmax(-1) @ h


def test_the_callers_own_change_of_a_map_it_was_given_is_no_models_change():
    x = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    with AttentionCapture() as cap:  # with gradients (the layer's weights): the matrices themselves are kept
        _Attend()(x)
    eye = torch.eye(5)
    fused = []
    for i in range(len(cap.maps)):  # rollout by hand: each map read as it comes, the identity added in place
        a = cap.maps[i].detach()
        a += eye
        fused.append(a)
    assert len(fused) == 1 and torch.equal(cap.maps[0].detach(), fused[0])  # was refused: "the model changed" it


def test_a_changed_matrix_is_still_refused_when_the_model_changes_it():
    x = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()

    class Later(nn.Module):
        def forward(self, x):
            a = (x @ x.transpose(-2, -1)).softmax(-1)
            out = a @ x
            a.mul_(0)
            return out

    with AttentionCapture() as cap:
        Later()(x)
    for _ in range(2):  # refused each time it is read, not only the first
        with pytest.raises(SalienceError, match="changed attention matrix 0"):
            cap.maps


def test_targets_counted_pickles_back_with_its_notes():
    refusal = engine.TargetsCounted("samples=8000 of smoothgrad", 3, " is 1,200,000 passes of each image")
    refusal.add_note("explaining image 4")
    plain = SalienceError(str(refusal))
    plain.add_note("explaining image 4")
    for e in (plain, refusal):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and str(again) == str(e)
        assert again.__notes__ == ["explaining image 4"]  # TargetsCounted's were lost
    assert pickle.loads(pickle.dumps(refusal)).targets == 3
