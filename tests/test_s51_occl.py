"""Occlusion's region-limited passes on ConvNeXt-style networks (session 51, issue 15).

A ConvNeXt block is local per position: a depthwise 7x7 convolution, ``permute`` to channels-last, a ``LayerNorm``
over the last axis (the channels), ``Linear`` layers over the channels, GELU, a layer scale ``gamma`` broadcast over
the channels, stochastic depth (the identity in eval mode), ``permute`` back, a residual sum; the downsampling
``LayerNorm2d`` (a norm over the channels of each position) and a 2x2 stride-2 convolution. Before session 51 the
plan stopped at the first ``permute`` (the stem was the only local prefix, a cut there saves little). Here the plan
must reach past the first block, and the map must equal the full passes' (``local=False``) and Captum's ``Occlusion``
(same window, stride, baseline: the reference) to float32 rounding, ``|a - b| <= 1e-5 * (1 + max |model(x)|)`` as in
tests/test_s44_occlusion_local.py: the crops' convolutions and norms compute the same sums as a full pass on other
tensor sizes, so in another order (about 1e-6 of a score in float32; the layer scales are set near 1 here, not
ConvNeXt's 1e-6, so the blocks move the scores and a wrong crop would show).

Ops that look local but are not (a ``LayerNorm`` over W of an NCHW tensor, a permute then a norm or a ``Linear``
over W, a scale that varies along the rows, a ``GroupNorm``) stop the plan before them, and the map still equals the
full passes'. ``padding="same"`` convolutions (module and ``F.conv2d``, an even kernel's uneven split too) are local.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.methods import _occlusion_local as L
from test_s50_stdconv import close, said, scale  # the same tolerance and the log read as session 50's tests

pytest.importorskip("captum")


def captum_map(model, x, target, window, stride, baseline=0.0):
    from captum.attr import Occlusion
    c = x.shape[1]  # perturbations_per_eval=16: the same map as 1, in fewer passes
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                      target=target, baselines=baseline, perturbations_per_eval=16)


def equals_captum_and_full(caplog, model, x, target, window, stride, **kw) -> str:
    """Asserts the map's equality with Captum's and the full passes'; the debug log of the call."""
    a, log = said(caplog, model, x, target, window=window, stride=stride, **kw)
    s = scale(model, x)
    close(a, captum_map(model, x, target, window, stride, kw.get("baseline", 0.0)), s)
    full = salience.occlusion(model, x, target, reduce=None, window=window, stride=stride, local=False, **kw)
    close(a, full, s)
    return log


def corners(size: int, window: int, stride: int) -> torch.Tensor:
    n = (size - window + stride - 1) // stride + 1
    return torch.tensor([(i * stride, j * stride) for i in range(n) for j in range(n)])


def the_plan(model, x, window, stride) -> L.Plan:
    with torch.no_grad():
        out = model(x)
    return L.plan(model, x, (window, window), (stride, stride), corners(x.shape[-1], window, stride), False, out,
                  lambda o: o)


def scales_near_one(model: nn.Module) -> nn.Module:
    """Layer scales (``gamma`` / ``layer_scale``, 1e-6 at init) and norms' affine parameters drawn near 1 / 0: the
    blocks then move the scores."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "layer_scale")) or ("norm" in name and name.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") and p.dim() == 1:
                p.uniform_(-0.2, 0.2)
    return model.eval()


def tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    cfg = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 1), CNBlockConfig(32, None, 1)]
    return scales_near_one(ConvNeXt(cfg, stochastic_depth_prob=0.2, num_classes=5))


def timm_convnext(**kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    return scales_near_one(timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5,
                                                          drop_path_rate=0.2, **kw))


def first_add(model) -> int:
    """The position in graph order of the first block's residual sum (the end of stage 0's block)."""
    gm = L._trace(model)
    names = [n.name for n in gm.graph.nodes]
    return names.index("add")


@pytest.mark.parametrize("make", [tv_convnext, timm_convnext], ids=["torchvision", "timm"])
def test_convnext_region_limited_equals_captum_and_full(caplog, make):
    m = make()
    x = torch.randn(1, 3, 96, 96)
    log = equals_captum_and_full(caplog, m, x, 2, 8, 8)
    assert "region-limited passes" in log, log
    p = the_plan(m, x, 8, 8)
    names = [n.name for n in L._trace(m).graph.nodes]
    # the cut lies past stage 0's block (its residual sum), so the crops run a depthwise 7x7 convolution, a permute,
    # a LayerNorm over channels, two Linear layers and a layer scale: on main the plan stopped at the stem's permute
    assert names.index(p.cut) > first_add(m), (p.cut, p.why)
    assert p.field is not None and p.field.a[0] >= 12, p.field  # the 7x7 convolution's 3 rows at stride 4 at least
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    cuts = [c.name for c in made[2]]
    assert "add_3" in cuts, cuts  # every stage is local: the last block's sum is a cut


def test_timm_convnext_conv_mlp_and_two_images(caplog):
    """timm's ``conv_mlp=True`` blocks (``LayerNorm2d``: permute, norm over channels, permute back; 1x1 convolution
    MLP), two images with their own targets, another baseline."""
    m = timm_convnext(conv_mlp=True)
    x = torch.randn(2, 3, 80, 80)
    log = equals_captum_and_full(caplog, m, x, torch.tensor([1, 4]), 8, 8, baseline=0.5)
    assert "region-limited passes" in log, log
    assert "cut at stem_0" not in log and "cut at stem_1" not in log, log


class Block(nn.Module):
    """A conv, then ``tail`` (what is tested), then a conv and a global mean: the plan's cut is the first conv where
    ``tail`` is not local."""

    def __init__(self, tail: nn.Module, c: int = 8) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.tail = tail
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = self.tail(y)
        y = torch.relu(self.conv(y))
        return self.head(y.mean((2, 3)))


class Permuted(nn.Module):
    """``x.permute(order)``, ``op``, and back."""

    def __init__(self, order: tuple, op: nn.Module) -> None:
        super().__init__()
        self.order, self.op = order, op

    def forward(self, x):
        back = [self.order.index(i) for i in range(4)]
        return self.op(x.permute(*self.order)).permute(*back)


class Scaled(nn.Module):
    """``x * s`` for a constant ``s`` of the given shape, and ``x + s`` by ``torch.add``."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.s = nn.Parameter(torch.rand(shape) + 0.5)

    def forward(self, x):
        return torch.add(x * self.s, self.s.reshape(self.s.shape) * 0.1)


class FunctionalLN(nn.Module):
    """``F.layer_norm`` over the last axis of NCHW (W: not local) or after a permute to NHWC (C: local)."""

    def __init__(self, nhwc: bool, n: int) -> None:
        super().__init__()
        self.nhwc = nhwc
        self.w = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        if self.nhwc:
            return F.layer_norm(x.permute(0, 2, 3, 1), (self.w.shape[0],), self.w).permute(0, 3, 1, 2)
        return F.layer_norm(x, (self.w.shape[0],), self.w)


SIZE = 32
NOT_LOCAL = {  # each looks like a per-position op but reads along the image's rows or columns
    "layernorm-over-W": nn.LayerNorm(SIZE),
    "F.layer_norm-over-W": FunctionalLN(False, SIZE),
    "permute-then-norm-over-W": Permuted((0, 2, 1, 3), nn.LayerNorm(SIZE)),
    "permute-then-linear-over-W": Permuted((0, 1, 2, 3), nn.Linear(SIZE, SIZE)),
    "nhwc-norm-over-W-and-C": Permuted((0, 2, 3, 1), nn.LayerNorm((SIZE, 8))),
    "scale-along-rows": Scaled((1, 8, SIZE, 1)),
    "groupnorm": nn.GroupNorm(2, 8),
    "batchnorm-over-rows-after-permute": Permuted((0, 2, 1, 3), nn.BatchNorm2d(SIZE).eval()),
    "prelu-over-rows-after-permute": Permuted((0, 2, 1, 3), nn.PReLU(SIZE)),
}
LOCAL = {
    "nhwc-layernorm-linear": Permuted((0, 2, 3, 1), nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())),
    "F.layer_norm-nhwc": FunctionalLN(True, 8),
    "scale-per-channel": Scaled((8, 1, 1)),
}


def varied(m: nn.Module) -> nn.Module:
    """``m`` with its parameters and batch-norm statistics drawn away from their defaults (per row where they are)."""
    torch.manual_seed(11)
    with torch.no_grad():
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", list(NOT_LOCAL))
def test_not_local_stops_the_plan(caplog, name):
    m = varied(Block(NOT_LOCAL[name])).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    log = equals_captum_and_full(caplog, m, x, 1, 4, 4)
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    names = [n.name for n in made[0].graph.nodes]
    cuts = [c.name for c in made[2]]
    # the cuts stop before the op (an identity permute before it may be one): never the convolution after it
    assert "conv" not in cuts and names.index(cuts[-1]) < names.index("conv") - 1, cuts
    assert "cut at conv" not in log and "cut at relu_1" not in log, log  # the passes ran no cut past the op


@pytest.mark.parametrize("name", list(LOCAL))
def test_per_position_op_is_local(caplog, name):
    m = Block(LOCAL[name]).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    equals_captum_and_full(caplog, m, x, 1, 4, 4)
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    cuts = [c.name for c in made[2]]
    assert cuts[-1] == "relu_1", cuts  # the plan reaches through the op to the last convolution


class Same(nn.Module):
    """``padding="same"``: a module with an odd kernel, one with an even kernel and dilation (PyTorch pads one row
    more after than before), and ``F.conv2d(..., padding="same")``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.a = nn.Conv2d(3, 8, 5, padding="same")
        self.b = nn.Conv2d(8, 8, 4, padding="same", dilation=3)
        self.w = nn.Parameter(torch.randn(8, 8, 2, 3) * 0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        y = torch.relu(F.conv2d(y, self.w, padding="same"))
        return self.head(y.amax((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_padding_same_is_local(caplog):
    m = Same().eval()
    x = torch.randn(1, 3, 40, 40)
    log = equals_captum_and_full(caplog, m, x, 0, 6, 4)
    assert "region-limited passes" in log and "cut at relu" in log, log
    made = L._analysed(m, x, None)
    assert not isinstance(made, str), made
    gm, fields, cuts = made[:3]
    assert [c.name for c in cuts] == ["a", "relu", "b", "relu_1", "conv2d", "relu_2"], cuts
    f = fields[cuts[-1]]  # rows before: 2, 4, 0; after: 2, 9 - 4, 1; columns before: 2, 4, 1; after: 2, 5, 1
    assert (f.a, f.e) == ((2 + 4 + 0, 2 + 4 + 1), (2 + 5 + 1, 2 + 5 + 1)), f
    log = equals_captum_and_full(caplog, m, torch.randn(1, 3, 64, 64), 2, 4, 4)  # a cut farther on
    assert "cut at relu_2" in log, log
