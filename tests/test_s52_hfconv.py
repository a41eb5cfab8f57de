"""Occlusion's region-limited passes on Hugging Face ConvNeXt (session 52).

``torch.fx`` could not trace ``ConvNextForImageClassification``'s forward: fx makes its ``**kwargs`` a proxy, which the
forward unpacks into ``self.convnext(pixel_values, **kwargs)`` ("Proxy object cannot be iterated"), and the
embeddings compare ``pixel_values.shape[1]`` with the configured channels. Where the forward cannot be traced (or its
trace has several inputs), the plan now traces the call salience makes, ``model(x)``, with the images' channel count
known (:class:`salience.methods._occlusion_local._Called`). The maps must equal Captum's ``Occlusion`` (on the
logits) and the full passes' (``local=False``) to float32 rounding, ``|a - b| <= 1e-5 * (1 + max |logits|)`` as in
tests/test_s44_occlusion_local.py (crops sum their convolutions in another order). Tiny configs with random weights,
layer scales 1 (not 1e-6) so the blocks move the scores; nothing is downloaded.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import salience
from salience._core.autograd import unwrap_output
from salience._core.folding import fx_traced
from salience.methods import _occlusion_local as L
from test_s44_occlusion_local import Shapes  # F.conv2d's input shapes and multiply-adds

transformers = pytest.importorskip("transformers")
pytest.importorskip("captum")

LOG = "salience.occlusion"


def hf_convnext(v2: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if v2:
        cfg = transformers.ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5)
        return transformers.ConvNextV2ForImageClassification(cfg).eval()
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5,
                                      layer_scale_init_value=1.0)
    return transformers.ConvNextForImageClassification(cfg).eval()


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


def close(a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-5 * (1 + s), float((a - b).abs().max())


def checked(caplog, model, x, target, window, stride) -> str:
    """Asserts the map equals Captum's and the full passes'; the debug log of the (default, local) call."""
    from captum.attr import Occlusion
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, target, reduce=None, window=window, stride=stride)
    log = " ".join(r.getMessage() for r in caplog.records if r.name == LOG)
    with torch.no_grad():
        s = float(logits(model, x).abs().max())
        ref = Occlusion(lambda t: logits(model, t)).attribute(
            x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), target=target, baselines=0.0,
            perturbations_per_eval=64)
    close(a, ref, s)
    close(a, salience.occlusion(model, x, target, reduce=None, window=window, stride=stride, local=False), s)
    return log


@pytest.mark.parametrize("size,window,stride,b", [(96, 8, 8, 1), (74, 12, 7, 2), (64, 16, 12, 1)],
                         ids=["aligned", "stride7-border", "stride12-border"])
def test_hf_convnext_region_limited_equals_captum_and_full(caplog, size, window, stride, b):
    """Windows aligned with the stem's 4 px patches, and strides that do not divide ``size - window`` (the last
    window at the border, cut by it)."""
    m = hf_convnext()
    x = torch.randn(b, 3, size, size)
    log = checked(caplog, m, x, torch.tensor([1, 3][:b]), window, stride)
    assert "region-limited passes" in log, log  # main: "full passes: torch.fx cannot trace it (TraceError: ...)"


def test_hf_convnext_cut_past_the_first_block_and_crops_smaller():
    """The cut lies past stage 0's block (its residual sum: the crops run a depthwise 7x7 convolution, a LayerNorm over
    channels, two Linear layers, the layer scale), the patch convolution sees crops, and the call runs fewer
    convolution multiply-adds than full passes."""
    m = hf_convnext()
    x = torch.randn(1, 3, 96, 96)
    corners = torch.tensor([(i * 8, j * 8) for i in range(12) for j in range(12)])
    with torch.no_grad():
        p = L.plan(m, x, (8, 8), (8, 8), corners, False, m(x).logits, unwrap_output)  # the suffix's: a dict
    assert not p.why, p.why
    names = [n.name for n in L._trace(m, channels=3).graph.nodes]
    assert names.index(p.cut) > names.index("add"), p.cut
    assert p.crop[0] < 96 and p.crop[1] < 96 and p.saved > 0.05, (p.crop, p.saved)
    macs = []
    for local in (True, False):
        with Shapes() as shapes:
            salience.occlusion(m, x, 2, window=8, stride=8, local=local)
        macs.append(shapes.macs)
        if local:
            assert any(s[1] == 3 and s[2] < 96 and s[3] < 96 for s in shapes.seen), shapes.seen
    assert macs[0] < 0.9 * macs[1], macs


def test_hf_convnext_v2_cuts_before_its_global_response_norm(caplog):
    """ConvNeXt V2's blocks normalise over the image (GRN: a norm over rows and columns), so the cut stays before the
    first GRN: at the stem. The same maps."""
    m = hf_convnext(v2=True)
    x = torch.randn(1, 3, 64, 64)
    log = checked(caplog, m, x, 4, 8, 8)
    assert "region-limited passes" in log and "cut at permute_1" in log, log


def test_hf_convnext_left_as_it_was():
    """Parameters, buffers, modes and every module's attributes are those the call found (the trace runs on shadows,
    through a wrapper that is thrown away)."""
    m = hf_convnext()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = [dict(mod.__dict__) for mod in m.modules()]
    salience.occlusion(m, torch.randn(1, 3, 64, 64), 2, window=16, stride=16)
    assert all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for was, mod in zip(attrs, m.modules()):
        assert was.keys() == mod.__dict__.keys(), type(mod).__name__
        assert all(was[k] is mod.__dict__[k] for k in was if k != "training"), type(mod).__name__
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


class Scaled(nn.Module):
    """A CNN whose forward takes an optional second input: fx made ``scale`` a proxy (two inputs: before, "no local
    prefix"), and ``if scale is not None`` traced the branch salience's calls never take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return self.head(self.body(x).mean((2, 3)))


def test_optional_input_traced_as_called(caplog):
    m = Scaled().eval()
    log = checked_plain(caplog, m, torch.randn(1, 3, 32, 32), 1)
    assert "region-limited passes" in log, log


def checked_plain(caplog, model, x, target) -> str:
    """The map (window 8, stride 6) equal to the full passes'; the debug log."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, target, window=8, stride=6)
    with torch.no_grad():
        s = float(model(x).abs().max())
    close(a, salience.occlusion(model, x, target, window=8, stride=6, local=False), s)
    return " ".join(r.getMessage() for r in caplog.records if r.name == LOG)


class Branchy(nn.Module):
    """``**kwargs`` unpacked (fx cannot trace the forward) and a branch on the input: the call cannot be traced either
    (a value of the image, not its channel count)."""

    def __init__(self, on: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.on = on
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def inner(self, x, **kwargs):
        return self.conv(x)

    def forward(self, x, **kwargs):
        y = self.inner(x, **kwargs).relu()
        if (x.mean() > 0) if self.on == "value" else (x.shape[-1] != 32):  # a crop has another width
            y = -y
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("on", ["value", "width"])
def test_untraceable_call_still_full_passes(caplog, on):
    log = checked_plain(caplog, Branchy(on).eval(), torch.randn(1, 3, 32, 32), 2)
    assert "full passes" in log and "torch.fx cannot trace it" in log, log


class Counting(nn.Module):
    """``**kwargs`` unpacked (traced as the call) and a counter the forward writes on the root (module 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x, **kwargs):
        self.calls += 1
        return self.head(self.conv2(self.conv(x, **kwargs).relu()).relu().mean((2, 3)))


def test_a_counter_written_through_the_call_keeps_the_trace(caplog, monkeypatch):
    """The attributes the forward writes are told by the model's module indices (the wrapper's, shifted by one): a
    user's call between two of salience's, which moves the counter, does not trace the model again (session 48's
    rule); the counter is the user's alone."""
    traced = []
    monkeypatch.setattr(L, "fx_traced", lambda m, *a, **k: traced.append(type(m).__name__) or fx_traced(m, *a, **k))
    m = Counting().eval()
    x = torch.randn(1, 3, 32, 32)
    for _ in range(3):
        assert "region-limited passes" in checked_plain(caplog, m, x, 1)
        m(x)
    assert traced == ["Counting", "_Called"], traced
    assert m.calls == 6  # the test's own calls: 3 here, 3 for the scale in checked_plain; none of salience's
