"""Session 50 review of "stdconv50" (occlusion's region-limited passes on functional convolutions and on weights
computed from parameters alone, held as constants). A "constant" written in place in the forward is no constant:

a) ``w = self.w * 1; w.add_(self.delta)``: the prefix held ``w`` as a tensor and ran the ``add_`` on it once per chunk
   of crops, so after ``k`` chunks the prefix's weight was ``w + k * delta`` (the model's: ``w + delta`` each pass);
b) the same with ``y1 = conv(x, w)`` before the ``add_`` and ``y2 = conv(x, w)`` after it: ``y1`` read
   ``w + (k - 1) * delta`` in chunk ``k`` (the model's: ``w``);
c) a view of it written: ``w[0].mul_(1.5)``, the prefix's channel 0 scaled by ``1.5 ** k``.
(``w += d`` is no case: torch.fx traces it as ``w + d``, a new node.)

The split's check on the clean images cannot see either where the channel the write changes is dead (ReLU) on the clean
images and alive on the occluded ones: here channel 0 of the convolution (bias -3, weights >= 1) is dead on the clean
image (pixels < 0.05) and alive where a window is occluded with the baseline 1. Reference: Captum's ``Occlusion``
and the full passes (``local=False``), ``|a - b| <= 1e-5 * (1 + max |model(x)|)`` as in tests/test_s50_stdconv.py.
Both failed on the merged code (7dbdbc4..e5d3d22): the maps were off by more than their maximum.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience

pytest.importorskip("captum")


def captum_map(model, x, target, window, stride, baseline):
    from captum.attr import Occlusion
    c = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                      target=target, baselines=baseline)


class Written(nn.Module):
    """A weight computed from parameters, then written in place (``how``: ``"add_"``, ``"between"``, ``"view"``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.w1.data[0] = 1.0  # channel 0: 27 weights of 1 ...
        self.b1 = nn.Parameter(torch.zeros(4))
        self.b1.data[0] = -3.0  # ... and a bias of -3: dead on pixels < 0.05, alive on an occluded window of 1
        delta = torch.zeros(4, 3, 3, 3)
        delta[0] = 0.5
        self.register_buffer("delta", delta)
        self.w2 = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)

    def forward(self, x):
        w = self.w1 * 1.0
        if self.how == "add_":
            w.add_(self.delta)
            y = torch.relu(F.conv2d(x, w, self.b1, padding=1))
        elif self.how == "between":
            y = torch.relu(F.conv2d(x, w, self.b1, padding=1))  # w as it is here ...
            w.add_(self.delta)  # ... and w + delta from here
            y = y + torch.relu(F.conv2d(x, w, self.b1, padding=1))
        else:
            w[0].mul_(1.5)
            y = torch.relu(F.conv2d(x, w, self.b1, padding=1))
        y = torch.relu(F.conv2d(y, self.w2, padding=1))
        return y.amax((2, 3))


@pytest.mark.parametrize("how", ["add_", "between", "view"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_weight_written_in_place_is_no_constant(how, chunk):
    m = Written(how).eval()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 24, 24) * 0.05
    base = torch.ones_like(x)
    with torch.no_grad():
        s = float(m(x).abs().max())
    a = salience.occlusion(m, x, 0, window=4, stride=4, reduce=None, baseline=base, chunk=chunk)
    ref = captum_map(m, x, 0, 4, 4, base)
    assert float(ref.abs().max()) > 0.5  # the occluded windows wake channel 0: the map is not trivial
    assert float((a - ref).abs().max()) <= 1e-5 * (1 + s), float((a - ref).abs().max())
    full = salience.occlusion(m, x, 0, window=4, stride=4, reduce=None, baseline=base, chunk=chunk, local=False)
    assert float((a - full).abs().max()) <= 1e-5 * (1 + s), float((a - full).abs().max())


class LowRankWeight(nn.Module):
    """A convolution's weight computed by a matrix product of parameters (a low-rank factorisation): under a bf16
    autocast the product is bf16, as in the model's own bf16 passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Parameter(torch.randn(16, 27) * 0.3)
        self.b = nn.Parameter(torch.randn(27, 27) * 0.3)
        self.w3 = nn.Parameter(torch.randn(8, 16, 3, 3) * 0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        w = (self.a @ self.b).view(16, 3, 3, 3)
        y = torch.relu(F.conv2d(x, w, padding=1))
        y = torch.relu(F.conv2d(y, self.w3, padding=1))
        return self.head(y.amax((2, 3)))


def test_bf16_constant_from_a_matmul_takes_region_limited_passes(caplog):
    """precision="bf16": the prefix's weight, a matrix product, made once under the passes' autocast is bf16; the
    split's check on the clean images runs in float32 and failed on it ("expected scalar type Float but found
    BFloat16": full passes, the region-limited passes' saving lost). The map: the full passes' at the same
    precision (the same bf16 weight each pass) to float rounding, and float32 Captum's to bf16 rounding."""
    import logging
    m = LowRankWeight().eval()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="salience.occlusion"):
        a = salience.occlusion(m, x, 1, window=8, stride=4, reduce=None, precision="bf16")
    log = " ".join(r.getMessage() for r in caplog.records if r.name == "salience.occlusion")
    assert "region-limited passes" in log, log
    full = salience.occlusion(m, x, 1, window=8, stride=4, reduce=None, precision="bf16", local=False)
    with torch.no_grad():
        s = float(m(x).abs().max())
    assert float((a - full).abs().max()) <= 1e-5 * (1 + s), float((a - full).abs().max())
    ref = captum_map(m, x, 1, 8, 4, 0.0)
    assert float((a - ref).abs().max()) <= 0.05 * float(ref.abs().max()), (float((a - ref).abs().max()), ref.abs().max())


class KeywordWeight(nn.Module):
    """``F.conv2d(x, weight=w)``: the weight by keyword (``_bound`` reads it so: the convolution is local)."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.keyword = keyword
        self.w = nn.Parameter(torch.randn(8, 3, 5, 5))

    def forward(self, x):
        w = self.w / self.w.norm()
        y = F.conv2d(x, weight=w, padding=2) if self.keyword else F.conv2d(x, w, padding=2)
        return torch.relu(y).amax((2, 3))


def test_flops_of_a_convolution_whose_weight_is_a_keyword():
    """Its multiply-adds, ``H * W * C_out * C_in * kh * kw`` (32 * 32 * 8 * 3 * 25 = 614,400), counted as the
    positional one's (on e5d3d22: only its output's size, 8,192, so a prefix of such convolutions looked 75 times
    cheaper than it is and a cut worth taking could fall under the 5 % it must save)."""
    from salience.methods import _occlusion_local as L
    x = torch.randn(1, 3, 32, 32)
    for keyword in (False, True):
        made = L._analysed(KeywordWeight(keyword).eval(), x, None)
        assert not isinstance(made, str), made
        gm, _, cuts, cost = made
        conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
        assert conv in cuts
        assert cost[conv] == 32 * 32 * 8 * 3 * 25, (keyword, cost[conv])
