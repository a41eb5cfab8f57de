"""Review of session 47's fixed-cost change (``fingerprint.structure`` / ``_fold_key`` from one stack, ``weight_bytes``
over ``guard.parameters_of``, the BatchNorm check reading ``_buffers``).

The defect found: the fingerprint named each module's children but not which module sits in which slot, so where the
modules do not form a plain tree (a module reached twice, a ``None`` child) two models wired differently gave the same
tuple: ``model.a[1] = model.c`` (``a`` = ``Sequential(b1, b1)``, ``c`` = ``b2``) walks ``root, a, b1..., b2...`` before
and after, the same ids, classes, names and tensors, and ``fold_batchnorm``'s folded copy of the old wiring was served
for the new one. The checks: the fingerprints differ after such a rewiring, and a call after it equals a fresh copy's
(the model's own passes, no folding: the reference of what the model computes now).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

import salience
from salience._core.fingerprint import _fold_key, structure


def _block() -> nn.Sequential:
    b = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    with torch.no_grad():
        b[1].running_mean.uniform_(-1, 1)
        b[1].running_var.uniform_(0.5, 2)
    return b


def _shared_net() -> nn.Sequential:
    """``a`` runs one block twice (a module reached twice), then ``c`` another block, then a head."""
    torch.manual_seed(0)
    b1, b2 = _block(), _block()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    return nn.Sequential(OrderedDict(a=nn.Sequential(b1, b1), c=b2, head=head)).eval()


class _Optional(nn.Module):
    """Two optional stages: ``first`` scales by 2 before ``last`` adds 1 (a ``None`` child is skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: nn.Module | None = _Scale(2.0)
        self.register_module("last", None)  # a slot of _modules holding None

    def forward(self, x):
        if self.first is not None:
            x = self.first(x)
        x = x + 1
        if self.last is not None:
            x = self.last(x)
        return x


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return x * self.s


def test_rewiring_a_module_reached_twice_changes_the_fingerprints():
    net = _shared_net()
    x = torch.rand(1, 3, 8, 8)
    before, fold_before, out_before = structure(net), _fold_key(net), net(x)
    net.a[1] = net.c  # a runs b1 then b2 now; c (b2) after it: another model
    assert not torch.allclose(net(x), out_before)
    assert structure(net) != before
    assert _fold_key(net) != fold_before


def test_moving_a_child_to_a_none_slot_changes_the_fingerprints():
    m = _Optional()
    x = torch.ones(2)
    before, fold_before, out_before = structure(m), _fold_key(m), m(x)  # (1 * 2) + 1 = 3
    m.first, m.last = None, m.first  # now (1 + 1) * 2 = 4
    assert torch.equal(out_before, torch.full((2,), 3.0)) and torch.equal(m(x), torch.full((2,), 4.0))
    assert structure(m) != before
    assert _fold_key(m) != fold_before


def test_a_plain_tree_keeps_its_fingerprint_and_a_shared_one_is_stable():
    """The extra record is not noise: the same model twice gives the same tuple (shared or not)."""
    for net in (_shared_net(), nn.Sequential(_block(), _block())):
        assert structure(net) == structure(net) and _fold_key(net) == _fold_key(net)


def test_folded_copy_not_reused_after_rewiring():
    """The user-visible defect: with ``fold_batchnorm`` the second call ran the folded copy of the old wiring (0.05
    off a fresh copy's map). After the rewiring the call equals the map of the model as it is now, run unfolded."""
    net = _shared_net()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with salience.performance(fold_batchnorm=True):
        salience.occlusion(net, x, target=0)
    net.a[1] = net.c
    with salience.performance(fold_batchnorm=True):
        second = salience.occlusion(net, x, target=0)
    expected = salience.occlusion(copy.deepcopy(net), x, target=0)  # no folding: the model's own passes
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-4)
