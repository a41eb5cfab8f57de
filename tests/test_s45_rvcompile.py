"""Session 45 review of the compile change (dd9a0cc): a compiled call that reuses an earlier call's probe and
final-softmax answer, and the frozen graph whose constant watch skips the model's own tensors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf

from conftest import counting_backend, snapshot_freezing, unchanged

RTOL = 1e-4  # FREEZE_RTOL in tests/test_performance.py: a compiled map against the eager map, of its largest value


@pytest.fixture(autouse=True)
def _fresh_cache():
    _perf.clear_cache()
    torch._dynamo.reset()
    yield
    _perf.clear_cache()
    torch._dynamo.reset()


class _Flagged(nn.Module):
    """A classifier whose forward adds a final softmax when ``probs`` is set: a plain attribute, so the
    structure (modules, hooks) is the same with and without it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        self.probs = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.softmax(y, 1) if self.probs else y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def _chunks_of_4(monkeypatch):
    """Chunks of 4 items, so that a later compiled call runs whole chunks of the fixed size."""
    monkeypatch.setattr(_engine, "chunk_size", lambda per_item, budget, n: 4)


def _call(method: str, model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    if method == "smoothgrad":
        return salience.smoothgrad(model, x, 2, samples=8, reduce=None, **kw)
    return salience.integrated_gradients(model, x, 2, steps=8, reduce=None, **kw)


@pytest.mark.parametrize("kind", ["counting", "freeze"])
@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_compile_sees_a_softmax_turned_on_between_calls(monkeypatch, _chunks_of_4, method, kind):
    """A softmax the forward adds by a flag set between two compiled calls (the structure unchanged) is stripped,
    as the eager call strips it: the map is the logits' (the eager map of the model with the flag on, which is the
    map without it). On dd9a0cc the later compile=True call took the earlier call's answer "no softmax" and ran
    every chunk compiled, the first too: the map of the probabilities (75% off); compile="freeze" (its frozen
    gradient graph, from the first chunk on) likewise."""
    if kind == "freeze":
        snapshot_freezing(monkeypatch)
        compile = "freeze"
    else:
        compile = counting_backend()[0]
    model = _Flagged().eval()
    x = torch.rand(1, 3, 8, 8)
    model.probs = True
    ref = _call(method, model, x)
    _perf.clear_cache()
    model.probs = False
    for _ in range(2):
        _call(method, model, x, compile=compile)
    model.probs = True
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _call(method, model, x, compile=compile)
    assert _rel(out, ref) <= RTOL
    model.probs = False  # and back: the map of the logits again, compiled
    assert _rel(_call(method, model, x, compile=compile), ref) <= RTOL


def _change_data(model):
    w = model[0].weight
    w.data = w.data * 2 + 0.1


def _change_state_dict(model):
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _change_copy(model):
    with torch.no_grad():
        model[5].weight.copy_(torch.randn_like(model[5].weight))


def _change_buffer(model):
    with torch.no_grad():
        model[1].running_mean.add_(0.5)
        model[1].running_var.mul_(2)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("change", [_change_data, _change_state_dict, _change_copy, _change_buffer])
def test_compile_freeze_channels_last_follows_a_weight_change(monkeypatch, fold, change):
    """compile="freeze" + channels-last (the watch no longer holds the model's own tensors): after a change of the
    weights between calls (``p.data = ...``, ``load_state_dict``, ``p.copy_``, a buffer changed in place) the frozen
    graph is compiled anew and the map is the changed model's eager map."""
    compiles = snapshot_freezing(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = torch.rand(2, 3, 8, 8)
    monkeypatch.setattr(_engine, "chunk_size", lambda per_item, budget, n: 4)

    def frozen_call():
        with salience.performance(compile="freeze", memory_format="channels_last", fold_batchnorm=fold):
            return salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None)

    for _ in range(2):
        frozen_call()
    n = len(compiles)
    change(model)
    ref = salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None)
    for _ in range(2):
        with unchanged(model):
            assert _rel(frozen_call(), ref) <= RTOL
    assert len(compiles) == n + 1


def _deep() -> nn.Module:
    """A first layer of 4 channels, then two of 64: a pass stopped at the first holds a fraction of a whole one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 5)).eval()


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
@pytest.mark.parametrize("compiled", [False, True])
def test_probe_of_a_layer_target_is_not_reused_for_the_output(monkeypatch, method, compiled):
    """The bytes per item a call measured for a target on an early layer (whose pass stops there) are not taken by
    a later call on the model's output: that call's chunks are sized by an item of a whole pass, as its own probe
    sizes them. On dd9a0cc a compiled call on the output, after an eager call on layer "0" of another number of
    images, took that call's probe (any number of images: reused_probe), 1/14 of an item's bytes here, and ran
    chunks of 14 times what max_memory allows; an eager call of the same number of images took it too (known_probe).
    """
    per_item: list = []
    chunk_size = _engine.chunk_size

    def spy(p, budget, n):
        per_item.append(p)
        return chunk_size(p, budget, n)

    monkeypatch.setattr(_engine, "chunk_size", spy)
    model = _deep()
    x = torch.rand(1, 3, 32, 32)
    kw = dict(compile=counting_backend()[0]) if compiled else {}

    def call(images, target, **k):
        xs = x.expand(images, -1, -1, -1).contiguous()
        if method == "smoothgrad":
            return salience.smoothgrad(model, xs, target, samples=4, reduce=None, **k)
        return salience.integrated_gradients(model, xs, target, steps=4, reduce=None, **k)

    call(1, 2, **kw)  # the output: probed (and the softmax answer found)
    whole = per_item[-1]
    if not compiled:  # the same number of images: known_probe's reuse, the layer's call first
        _perf.clear_cache()
    call(1 if not compiled else 2, salience.targets.activation("0", 0))  # eager, on layer "0": probed
    stopped = per_item[-1]
    assert stopped * 4 < whole  # the layer's pass is a fraction of the whole one (so the property can fail)
    call(1, 2, **kw)
    assert per_item[-1] == whole, (whole, stopped, per_item)
