"""Review of session 51's ConvNeXt work on occlusion's region-limited passes (tests/test_s51_occl.py's gaps).

The merge made these functional forms local too, and docs/methods-perturbation.md says test_s51_occl.py asserts
them, but no test ran them: ``F.linear`` on the channels of an NHWC tensor (and not on W of an NCHW one),
``torch.permute`` (the function, not the method), quotients and differences with per-channel constants
(``operator.truediv`` / ``operator.sub``), a concatenation along NHWC's last axis (the channels). Each model here
is a conv, the op, a conv and a global mean (test_s51_occl's ``Block``); the plan must reach through a local op to
the last convolution's ReLU (``relu_1``: on the code before the merge the plan stopped at the first permute or
constant, so these fail there) and stop before a look-alike, and each map must equal Captum's ``Occlusion`` and the
full passes' to ``1e-5 (1 + max |model(x)|)`` (test_s50_stdconv's ``close``: float32 rounding of sums taken on
other tensor sizes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from salience.methods import _occlusion_local as L
from test_s51_occl import SIZE, Block, equals_captum_and_full

pytest.importorskip("captum")


class Functional(nn.Module):
    """``how(self, x)`` with parameters ``w`` (a matrix) and ``g`` (per channel, ``(C, 1, 1)``), near 1."""

    def __init__(self, how, w_shape: tuple = (8, 8)) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.how = how
        self.w = nn.Parameter(torch.randn(w_shape) * 0.3)
        self.g = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.how(self, x)


def nhwc(x):
    return torch.permute(x, (0, 2, 3, 1))


def nchw(x):
    return torch.permute(x, (0, 3, 1, 2))


LOCAL = {
    "F.linear-nhwc": lambda s, x: nchw(F.gelu(F.linear(nhwc(x), s.w))),
    "torch.permute-F.layer_norm": lambda s, x: nchw(F.layer_norm(nhwc(x), (8,))),
    "quotient-and-difference": lambda s, x: (x / s.g - s.g) / (1.5 + torch.sigmoid(x)),
    "cat-nhwc-channels-then-F.linear": lambda s, x: nchw(F.linear(torch.cat([nhwc(x), nhwc(x) * 2], dim=-1),
                                                                  torch.cat([s.w, s.w], dim=1))),
}


@pytest.mark.parametrize("name", list(LOCAL))
def test_functional_per_position_op_is_local(caplog, name):
    m = Block(Functional(LOCAL[name])).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    log = equals_captum_and_full(caplog, m, x, 1, 4, 4)
    assert "region-limited passes" in log, log
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    assert [c.name for c in made[2]][-1] == "relu_1", [c.name for c in made[2]]


def test_F_linear_over_W_is_not_local(caplog):
    """``F.linear`` on the last axis of an NCHW tensor mixes a row's columns: the plan stops before it."""
    m = Block(Functional(lambda s, x: F.linear(x, s.w), (SIZE, SIZE))).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    equals_captum_and_full(caplog, m, x, 1, 4, 4)
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    names = [n.name for n in made[0].graph.nodes]
    cuts = [c.name for c in made[2]]
    assert names.index(cuts[-1]) < names.index("linear"), cuts
