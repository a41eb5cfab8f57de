"""Session 47 "lastread": the late review of Ablation-CAM's split clean pass (scorecam._clean_apart, _own_state,
_state_moved, _put_back) at 784dd23.

The split's check of the model's own state missed two writes, so the stopped pass (or the one pass it falls back to)
ran on the state the first pass left, not the state the call found (the map off):
* a plain tensor attribute written in place (``self.seen.fill_(1)``, ``self.steps += 1`` on a tensor: the same
  object, so the attribute's identity alone does not tell);
* a buffer of a ``torch.nn`` layer written by the user's own forward (test-time BatchNorm adaptation writing
  ``self.bn.running_mean``): told, but its values were not copied, so not put back before the one pass (copying
  every buffer broke the split's peak goal in tests/test_s47_permem.py): now put back from the model guard's own copy
  (``guard.held_values``; the lead, after the last read).
The maps are the paper's formula by hand (tests/test_s47_permem.py's reference) on a fresh copy of the model.
"""
import copy
import importlib

import pytest
import torch
import torch.nn as nn

import salience
from test_s47_split import _Net, _reference, _x

scorecam = importlib.import_module("salience.methods.scorecam")


@pytest.fixture
def split_here(monkeypatch):
    """The split allowed at any layer (these small models' layers are not early enough for ``_split_pays``)."""
    monkeypatch.setattr(scorecam, "_split_pays", lambda *a, **k: True)


class SeenAttr(nn.Module):
    """A plain tensor attribute ``seen`` (not a buffer), 0 until the first pass, set to 1 in place after it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = torch.zeros(())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + self.seen
        self.seen.fill_(1.0)
        return out


class AdaptBN(nn.Module):
    """Test-time adaptation: a torch.nn BatchNorm whose running mean the user's forward sets after its pass."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.bn(h)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
        return out


@pytest.mark.parametrize("state", [SeenAttr, AdaptBN])
def test_state_written_in_forward_is_put_back_before_the_layers_pass(split_here, state):
    """784dd23: SeenAttr's write was not told (the stopped pass saw ``seen`` = 1); AdaptBN's was told but its
    values not put back (the one pass saw the mean 0.5; until 9715a11). Both maps were off from the paper's."""
    model, x = _Net(state()).eval(), _x()
    got = salience.ablationcam(model, x, 1, layer="conv")
    fresh = _Net(state()).eval()
    # session 49: every pass sees the state the call found (perturbation.Found), so the reference's S_k too: ``pre``
    # as made before each forward (before, the reference's S_k passes saw the state its first pass left)
    made = copy.deepcopy(fresh.pre)
    fresh.register_forward_pre_hook(lambda m, a: setattr(m, "pre", copy.deepcopy(made)))
    ref = _reference(fresh, fresh.conv, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    if isinstance(model.pre, AdaptBN):  # the buffer back as the call found it (the model guard)
        assert torch.equal(model.pre.bn.running_mean, torch.zeros(4))
    else:  # SeenAttr's ``seen`` back too (a plain tensor attribute written in place: the guard's copy since session 48,
        # and perturbation.Found's before each pass and at the end since session 49)
        assert torch.equal(model.pre.seen, torch.zeros(()))
