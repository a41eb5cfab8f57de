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
