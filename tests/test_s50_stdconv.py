"""Occlusion's region-limited passes on functional convolutions (session 50, issue 15): timm's ``StdConv2d`` /
``ScaledStdConv2d`` (BiT / ResNetV2, NF-ResNets) and own-code models written with ``F.conv2d``, ``F.max_pool2d``,
``F.avg_pool2d``, ``F.pad`` and ``torch.relu``, whose weights are computed from parameters in the forward. The
region-limited path must be taken (the debug log of ``salience.occlusion`` says so; before session 50 these models ran
full passes: "no local prefix") and the map must equal Captum's ``Occlusion`` (same window, stride, baseline) and the
full passes' (``local=False``) to float32 rounding, ``|a - b| <= 1e-5 * (1 + max |model(x)|)`` as in
tests/test_s44_occlusion_local.py. What is not local (reflect padding, a weight computed from the input) falls back
to full passes with its reason (``padding="same"`` is local since session 51: tests/test_s51_occl.py)."""
from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import salience
from salience.methods import _occlusion_local as L

timm = pytest.importorskip("timm")
pytest.importorskip("captum")

LOG = "salience.occlusion"


def scale(model, x) -> float:
    with torch.no_grad():
        return float(model(x).abs().max())


def close(a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-5 * (1 + s), float((a - b).abs().max())


def captum_map(model, x, target, window, stride, baseline=0.0):
    from captum.attr import Occlusion
    c = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                      target=target, baselines=baseline)


def said(caplog, model, x, target, **kw) -> tuple[torch.Tensor, str]:
    """The map (``reduce=None``: Captum's shape) and what the debug log of ``salience.occlusion`` said."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, target, reduce=None, **kw)
    return a, " ".join(r.getMessage() for r in caplog.records if r.name == LOG)


def local_equals_captum_and_full(caplog, model, x, target, window, stride, **kw) -> str:
    """Asserts the region-limited path and the map's equality with Captum and full passes; the log."""
    a, log = said(caplog, model, x, target, window=window, stride=stride, **kw)
    assert "region-limited passes" in log, log
    s = scale(model, x)
    close(a, captum_map(model, x, target, window, stride, kw.get("baseline", 0.0)), s)
    full = salience.occlusion(model, x, target, reduce=None, window=window, stride=stride, local=False, **kw)
    close(a, full, s)
    return log


def small_resnetv2() -> nn.Module:
    """A timm ResNetV2 as BiT's (StdConv2d, GroupNormAct, the fixed stem: conv 7x7 / 2, ConstantPad2d, max pool),
    one block a stage and narrow: its stem is half its FLOPs, so a cut after the stem saves more than 5 %."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2
    torch.manual_seed(0)
    return ResNetV2(layers=(1, 1, 1, 1), channels=(64, 128, 256, 512), num_classes=6, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8)).eval()


class Functional(nn.Module):
    """Own code with functional layers only: a weight normalised in the forward, zero padding given positionally and
    by keyword, F.pad with a constant (a crop's own padding lies in its margin), max / average pooling, a residual
    sum, torch.relu; then a global maximum (not local)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.w1 = nn.Parameter(torch.randn(8, 3, 5, 5))
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w3 = nn.Parameter(torch.randn(12, 8, 3, 3) * 0.2)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        w1 = self.w1 / self.w1.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # from parameters alone
        y = F.relu(F.conv2d(x, w1, self.b1, stride=1, padding=2))
        y = F.max_pool2d(y, kernel_size=3, stride=2, padding=1)
        y = y + torch.relu(torch.conv2d(F.pad(y, (1, 1, 1, 1), value=0.5), self.w2, None, 1, 0, 1, 1))
        y = F.avg_pool2d(y, 2)
        y = torch.relu(F.conv2d(y, self.w3, padding=(1, 1), dilation=1))
        return self.head(y.amax((2, 3)))


class SharedWeight(nn.Module):
    """A weight computed once at the top and read before and after a global operation: the suffix makes it again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.w = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.3)
        self.stem = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)

    def forward(self, x):
        w = F.normalize(self.w - self.w.mean((1, 2, 3), keepdim=True), dim=1)
        y = torch.relu(F.conv2d(x, self.stem, padding=1))
        y = torch.relu(F.conv2d(y, w, padding=1))
        y = y - y.mean((2, 3), keepdim=True)  # global: the cut is before it
        y = torch.relu(F.conv2d(y, w, padding=1))
        return y.mean((2, 3))


def test_timm_resnetv2_stdconv_takes_region_limited_passes(caplog):
    m = small_resnetv2()
    x = torch.randn(1, 3, 64, 64)
    log = local_equals_captum_and_full(caplog, m, x, 2, 8, 4)
    assert "cut at stem_" in log, log  # GroupNorm (global per image) starts every block: the stem is the prefix


def test_timm_scaled_stdconv_sequence(caplog):
    """ScaledStdConv2d (NF-ResNets): its weight standardised with a gain, several layers deep."""
    from timm.layers import ScaledStdConv2d
    torch.manual_seed(7)
    m = nn.Sequential(ScaledStdConv2d(3, 8, 3), nn.ReLU(), ScaledStdConv2d(8, 8, 3, stride=2), nn.ReLU(),
                      ScaledStdConv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1 and p.shape[0] == 8:
                p.uniform_(0.5, 1.5)  # gains and biases away from their defaults
    x = torch.randn(2, 3, 40, 40)
    local_equals_captum_and_full(caplog, m, x, torch.tensor([0, 2]), 6, 4)


def test_functional_model_takes_region_limited_passes(caplog):
    m = Functional().eval()
    x = torch.randn(2, 3, 64, 64)
    log = local_equals_captum_and_full(caplog, m, x, 1, 8, 4)
    assert "cut at add" in log, log  # after two convolutions, the max pool and the pad: the most FLOPs saved
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    names = [c.name for c in made[2]]  # every functional op is local, up to the global maximum
    assert names[-4:] == ["add", "avg_pool2d", "conv2d_2", "relu_2"], names
    local_equals_captum_and_full(caplog, m, x, 3, 8, 4, baseline=0.5)


def test_weight_shared_across_the_cut(caplog):
    m = SharedWeight().eval()
    x = torch.randn(1, 3, 32, 32)
    local_equals_captum_and_full(caplog, m, x, 4, 6, 3)


class Norms(TorchFunctionMode):
    """How many times ``Tensor.norm`` runs (the Functional model's weight is computed with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.norm:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_prefix_weight_computed_once_a_call_not_once_a_chunk():
    """The prefix's weight is computed once a call: the count does not grow with the number of chunks (full passes
    compute it once a pass)."""
    m = Functional().eval()
    x = torch.randn(1, 3, 48, 48)
    salience.occlusion(m, x, 1, window=6, stride=3)  # the trace (cached), which runs the forward on proxies
    counts = []
    for chunk in (4, 200, 4):
        with Norms() as seen:
            salience.occlusion(m, x, 1, window=6, stride=3, chunk=chunk)
        counts.append(seen.n)
    assert counts[0] == counts[1] == counts[2] <= 3, counts  # the clean pass, the analysis' check, the prefix's
    with Norms() as full:
        salience.occlusion(m, x, 1, window=6, stride=3, chunk=4, local=False)
    assert full.n > counts[0] + 20, (full.n, counts)  # 225 windows in 57 passes


class ReflectPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return torch.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.w)).mean((2, 3))


class WeightFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        # from the input's size: the same for every copy of a batch, another on a crop (so not local)
        return torch.relu(F.conv2d(x, self.w * (20.0 / x.size(-1)), padding=1)).mean((2, 3))


class RandomWeight(nn.Module):
    """A weight drawn each pass (times 0: the maps are well defined): no constant, so not local."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return torch.relu(F.conv2d(x, self.w + 0 * torch.randn_like(self.w), padding=1)).mean((2, 3))


@pytest.mark.parametrize("model,reason", [
    (ReflectPad, "'reflect'"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten()), "padding_mode='reflect'"),
    (WeightFromInput, "no local prefix (its first layer is not a convolution, pooling or elementwise: size"),
    (RandomWeight, "conv2d (its weight not a constant (from the input, or drawn at random)"),
])
def test_not_local_falls_back_with_reason(caplog, model, reason):
    m = model().eval()
    x = torch.randn(1, 3, 20, 20)
    a, log = said(caplog, m, x, 1, window=4, stride=4)
    assert "full passes" in log and reason in log, log
    close(a, captum_map(m, x, 1, 4, 4), scale(m, x))


def test_bit_stem_is_local_and_groupnorm_is_not():
    """resnetv2_50x1_bit (random weights): its stem (StdConv2d 7x7 / 2, ConstantPad2d, max pool) is now local,
    each block's GroupNorm is not; the stem is 3 % of the FLOPs, under the 5 % a cut must save, so BiT itself still
    runs full passes, with that reason (before session 50: "no local prefix")."""
    m = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    gm, fields, cuts, cost = made
    assert [c.name for c in cuts] == ["conv2d", "stem_pad", "stem_pool"]
    nodes = list(gm.graph.nodes)
    stem = sum(cost[n] for n in nodes[:nodes.index(cuts[-1]) + 1]) / sum(cost.values())
    assert 0.02 < stem < 0.04, stem  # 118 M of 4.1 G multiply-adds
    corners = torch.tensor([[0, 0], [98, 98], [196, 196]])
    with torch.no_grad():
        out = m(x)
    p = L.plan(m, x, (28, 28), (14, 14), corners, True, out, lambda o: o)
    assert p.prefix is None and p.why.startswith("no cut saves 5 %"), p.why
