"""Session 48 "lastread": the last read of the session's merges (putback, octrace, heap) for their interactions.

* The guard's 1 MiB copy limit (review of putback: ``guard._COPY_LIMIT``) reached Ablation-CAM's split clean pass
  through the shared record (``guard.record_state``): a plain tensor attribute over 1 MiB that the user's forward
  writes in place was told by the split but not put back (no copy), so the one pass it falls back to ran on the
  written values (the map off from the paper's). Session 47's ``_own_state`` copied every such tensor.
* The shadow every fx trace runs on (putback: ``folding._shadow``) cloned the model's tensors in the caller's mode:
  under the user's ``torch.inference_mode()`` the clones were inference tensors, which the shadow's record
  (``guard.record_state``) refuses (no version counter), so every model with a plain tensor attribute lost its folded
  copy and occlusion's region-limited passes, told "a plain tensor attribute of the model is an inference tensor",
  which it was not (a6129eb, tracing the model itself, folded it).
"""
import copy
import importlib
import warnings

import torch
import torch.nn as nn

import salience
import test_s47_lastread
from test_s47_split import _Net, _reference, _x

folding = importlib.import_module("salience._core.folding")
guard = importlib.import_module("salience._core.guard.values")
split_here = test_s47_lastread.split_here  # the fixture: the split allowed at any layer


class BigSeen(nn.Module):
    """A plain tensor attribute over the guard's copy limit, 0 until the first pass, set to 1 in place after it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = torch.zeros(guard.COPY_LIMIT // 4 + 1024)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + self.seen[0]
        self.seen.fill_(1.0)
        return out


def test_split_puts_back_a_large_tensor_attribute(split_here):
    """main fb59664: the split told the write but put nothing back (the limit's ``None`` copy): the map ran the clean
    pass on ``seen`` = 1 and was off from the paper's formula on a fresh model."""
    model, x = _Net(BigSeen()).eval(), _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the guard's own warning: it does not put ``seen`` back after the call
        got = salience.ablationcam(model, x, 1, layer="conv")
    fresh = _Net(BigSeen()).eval()
    # session 49: every pass sees the state the call found (perturbation.Found, each tensor attribute copied whatever
    # its size), so the reference's S_k too: ``pre`` as made before each forward
    made = copy.deepcopy(fresh.pre)
    fresh.register_forward_pre_hook(lambda m, a: setattr(m, "pre", copy.deepcopy(made)))
    ref = _reference(fresh, fresh.conv, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert not model.pre.seen.any()  # and back after the call (the model guard alone does not copy it)


class ShiftNet(nn.Module):
    """A convolution, its BatchNorm and a plain tensor attribute ``shift`` the forward adds (a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.shift = torch.tensor(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.bn(self.conv(x)) + self.shift).mean((2, 3)))


def test_fold_under_the_callers_inference_mode():
    """main fb59664: under ``torch.inference_mode()`` the copy was refused ("... is an inference tensor"). The copy
    is checked against the model itself (BatchNorm's statistics set away from their defaults, so the fold matters)."""
    torch.manual_seed(0)
    model = ShiftNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        copy, why = folding.folded_model(model)
        assert why == "" and copy is not None, why
        assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # folded
        torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-6)
