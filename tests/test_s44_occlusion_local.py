"""Occlusion's region-limited passes (session 44, :mod:`salience.methods._occlusion_local`): the model's leading local
layers run on a crop around each window. The maps must equal full passes (``local=False``) and Captum's ``Occlusion``
to float32 rounding: ``|a - b| <= 1e-5 * (1 + max |model(x)|)``, a hundred-thousandth of the scores' scale (the
convolutions on a crop sum in another order, as another batch size does; a map is a difference of two scores); the
prefix must see crops (shapes recorded by a TorchFunctionMode), and models without a usable prefix take full passes."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import salience

torchvision = pytest.importorskip("torchvision")

LOG = "salience.occlusion"


def close(a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    assert a.shape == b.shape
    tol = 1e-5 * (1 + scale)
    assert float((a - b).abs().max()) <= tol, float((a - b).abs().max())


def occl(model, x, target, caplog, expect_local: bool, **kw):
    """The local map, checked against full passes; asserts which path the local call took (the debug log)."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, target, **kw)
    said = " ".join(r.getMessage() for r in caplog.records if r.name == LOG)
    assert ("region-limited passes" in said) == expect_local, said
    b = salience.occlusion(model, x, target, local=False, **kw)
    close(a, b, scale(model, x))
    return a


def scale(model, x) -> float:
    with torch.no_grad():
        return float(model(x).abs().max())


def captum_map(model, x, target, window, stride, baseline=0.0):
    from captum.attr import Occlusion
    c = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                      target=target, baselines=baseline)


class Shapes(TorchFunctionMode):
    """The input shapes of every F.conv2d call, and their multiply-adds (output size x weight's fan-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            self.seen.append(tuple(args[0].shape))
            self.macs += out.numel() * args[1][0].numel()
        return out


def vgg_like() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 5)).eval()


class Odd(nn.Module):
    """Padding other than k // 2, dilation, stride-2 convolutions, average pooling, a residual sum, a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Conv2d(3, 6, 5, padding=0)
        self.b = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.c = nn.Conv2d(6, 8, 3, stride=2, padding=0)
        self.d = nn.Conv2d(6, 8, 1, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.e = nn.Conv2d(16, 8, 4, stride=2, padding=3)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + F.relu(self.b(y))
        c = self.c(y)
        d = self.d(y)[:, :, :c.shape[2], :c.shape[3]]  # a slice: not local, so the cut is before it
        y = self.bn(torch.cat([c, d], dim=1))
        y = self.e(self.pool(y)).relu()
        return self.head(y.mean((2, 3)))


class OddLocal(Odd):
    """:class:`Odd` without the slice: its two stride-2 branches meet in the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + F.relu(self.b(y))
        y = self.bn(torch.cat([self.c(y), self.d(y)], dim=1))
        y = self.e(self.pool(y)).relu()
        return self.head(y.mean((2, 3)))


class GlobalEarly(nn.Module):
    """A global operation (the image's mean subtracted) after the first convolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y - y.mean((2, 3), keepdim=True)
        return self.head(torch.relu(self.b(y)).amax((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vgg_like()

    def forward(self, x):
        if x.sum() > 0:
            return self.net(x)
        return -self.net(x)


def test_resnet18_equals_full_passes_and_captum(caplog):
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([3, 7])
    a = occl(m, x, t, caplog, True, window=12, stride=5, reduce=None)  # 5 does not divide 64 - 12: border windows cut
    close(a, captum_map(m, x, t, 12, 5), scale(m, x))


def test_resnet50_equals_captum(caplog):
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 96, 96)
    a = occl(m, x, 11, caplog, True, window=16, stride=12, reduce=None)
    close(a, captum_map(m, x, 11, 16, 12), scale(m, x))


def test_vgg_like_several_targets_reduce_and_baselines(caplog):
    m = vgg_like()
    x = torch.randn(2, 3, 40, 40)
    both = occl(m, x, torch.tensor([[1, 4], [1, 4]]), caplog, True, window=6, stride=4)  # (B, K, H, W), reduce="max"
    assert both.shape == (2, 2, 40, 40)
    for k, c in enumerate((1, 4)):
        close(both[:, k], captum_map(m, x, c, 6, 4).amax(1), scale(m, x))
    occl(m, x, 2, caplog, True, window=7, stride=3, baseline="blur")
    base = torch.rand(1, 3, 40, 40)
    a = occl(m, x, 2, caplog, True, window=7, stride=3, baseline=base, reduce=None)
    close(a, captum_map(m, x, 2, 7, 3, baseline=base), scale(m, x))


@pytest.mark.parametrize("model", [Odd, OddLocal])
def test_padding_dilation_stride2_and_borders(caplog, model):
    m = model().eval()
    x = torch.randn(2, 3, 45, 38)  # odd sizes: crops clamped at the borders start on the grid
    a = occl(m, x, 1, caplog, True, window=(5, 7), stride=(4, 6), reduce=None)
    close(a, captum_map_hw(m, x, 1, (5, 7), (4, 6)), scale(m, x))


def captum_map_hw(model, x, target, window, stride):
    from captum.attr import Occlusion
    c = x.shape[1]
    return Occlusion(model).attribute(x, sliding_window_shapes=(c, *window), strides=(c, *stride), target=target,
                                      baselines=0.0)


def test_global_op_early_cuts_before_it_or_falls_back(caplog):
    m = GlobalEarly().eval()
    x = torch.randn(1, 3, 32, 32)
    occl(m, x, 0, caplog, True, window=4, stride=4)  # the cut is the first ReLU: before the mean
    from salience.methods import _occlusion_local as L
    gm = L._trace(m)
    names = [n.name for n in L._cuts(gm, L._fields(gm))]
    assert names == ["a", "relu"], names  # nothing after the mean is local


def test_untraceable_and_scripted_models_fall_back(caplog):
    x = torch.randn(1, 3, 24, 24)
    occl(Branchy().eval(), x, 1, caplog, False, window=6, stride=6)
    scripted = torch.jit.script(vgg_like())
    occl(scripted, x, 1, caplog, False, window=6, stride=6)
    occl(vgg_like(), x, 1, caplog, False, window=6, stride=6, precision="bf16-mixed")  # picks fp32 layers by size
    hooked = vgg_like()
    hooked[0].register_forward_hook(lambda *a: None)
    occl(hooked, x, 1, caplog, False, window=6, stride=6)


def test_prefix_runs_on_crops_with_fewer_flops(caplog):
    """The first convolution sees crops smaller than the image in the occluded passes, and the whole call runs
    fewer convolution FLOPs than full passes (a new property: full passes ran every window on the whole image)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 128, 128)
    with Shapes() as shapes:
        salience.occlusion(m, x, 3, window=16, stride=16, local=True)
    first = [s for s in shapes.seen if s[1] == 3]  # inputs of conv1 (3 channels)
    assert any(s[2] < 128 and s[3] < 128 for s in first), first
    # the whole clean image only: its output, its shapes, the prefix's clean activation (64 windows: 64 before)
    assert sum(s[0] for s in first if s[2] == 128) <= 3
    counts = []
    for local in (True, False):
        with Shapes() as count:
            salience.occlusion(m, x, 3, window=16, stride=16, local=local)
        counts.append(count.macs)
    assert counts[0] < 0.95 * counts[1], counts  # 0.90 here: window 16 on 128 px


def test_model_left_as_it_was():
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    salience.occlusion(m, torch.randn(1, 3, 48, 48), 2, window=12, stride=12)
    assert m.training and all(m.training for m in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_local_flag_checked():
    with pytest.raises(salience.SalienceError):
        salience.occlusion(vgg_like(), torch.randn(1, 3, 16, 16), 1, window=4, local="yes")


def test_channels_last_and_bf16(caplog):
    """The run's layout and autocast apply to the crops' passes too: channels-last in float32 gives the same map;
    under bf16 the local and full maps differ by bf16 rounding only (2 % of the scores' scale). Stride 12: 36
    windows (64 at stride 8 before), no pixel left out: layout and precision are each pass's, whatever the count."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    occl(m, x, 5, caplog, True, window=12, stride=12, memory_format="channels_last")
    a = salience.occlusion(m, x, 5, window=12, stride=12, precision="bf16")
    b = salience.occlusion(m, x, 5, window=12, stride=12, precision="bf16", local=False)
    assert float((a - b).abs().max()) <= 2e-2 * (1 + scale(m, x))
    assert float((a - b).abs().max()) < 0.25 * float(b.abs().max())


def test_fold_batchnorm_runs_the_folded_copy_on_crops(caplog):
    """With fold_batchnorm the crops run the folded copy (no BatchNorm in the prefix) and the map is full passes'."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with salience.performance(fold_batchnorm=True):
        occl(m, x, 5, caplog, True, window=12, stride=8)
        from salience.methods import _occlusion_local as L
        from salience._core.perf import folded_model  # the process's folded copy: its prefix holds no BatchNorm
        copy = folded_model(m)[0]
        assert copy is not None and not any(isinstance(k, nn.BatchNorm2d) for k in copy.modules())
        p = L.plan(copy, x, (12, 12), (8, 8), torch.tensor([[0, 0], [24, 24], [52, 52]]), True,
                   copy(x), lambda o: o)
        assert p.prefix is not None and not any(isinstance(k, nn.BatchNorm2d) for k in p.prefix.modules())


class InPlace(nn.Module):
    """In-place layers at both ends of the cut: the clean activation every pass starts from must stay as it was."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(x, inplace=True)
        y = self.a(x)
        y = F.relu(y, inplace=True)
        y = self.b(y)
        return self.head(y.amax((2, 3)))


def test_in_place_layers_leave_the_input_and_map_as_full_passes(caplog):
    m = InPlace().eval()
    x = torch.randn(1, 3, 24, 24)
    xa, xb = x.clone(), x.clone()
    a = salience.occlusion(m, xa, 1, window=4, stride=4, local=True)
    b = salience.occlusion(m, xb, 1, window=4, stride=4, local=False)
    assert torch.equal(xa, xb)  # the model's own clean pass writes x in both; the split's passes write no more
    close(a, b, scale(m, x.clone()))


def test_windows_past_the_border(caplog):
    """A stride past the window + 1: the last window starts past the image (it occludes nothing, drop 0)."""
    m = vgg_like()
    x = torch.randn(1, 3, 40, 40)
    a = occl(m, x, 3, caplog, True, window=3, stride=7, reduce=None)  # starts 0, 7, ..., 35, 42 (Captum refuses it)
    assert float(a[..., 38:, :].abs().max()) == 0 and float(a[..., :, 38:].abs().max()) == 0  # covered by none
