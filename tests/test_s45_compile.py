"""Session 45: compiled fp32 passes (issue 19's 0.85x): what the compiled path runs eagerly."""
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
    yield
    _perf.clear_cache()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _chunks_seen(monkeypatch) -> list:
    """Chunks of 4 items; per call the list of ``(chunk sizes, how each ran)`` (``Sums.chunks``, ``Sums.layouts``)."""
    monkeypatch.setattr(_engine, "chunk_size", lambda per_item, budget, n: 4)
    seen, accumulate = [], _engine.accumulate

    def recording(*a, **k):
        sums = accumulate(*a, **k)
        seen.append((list(sums.chunks), list(sums.layouts)))
        return sums

    monkeypatch.setattr(_engine, "accumulate", recording)
    return seen


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_compile_true_later_calls_run_every_chunk_compiled(monkeypatch, method):
    """compile=True (any backend, not only "freeze"): a later call on the same model, input shape and
    method takes the first call's memory probe and softmax answer, so its first chunk is one of the
    fixed size and runs compiled; the items fill whole chunks (SmoothGrad 8 / IG 8 at 1 image, chunks
    of 4): every chunk compiled, one graph for all the calls. Before, every call ran its probing chunk
    (one item) and the shorter last one (3 items) eagerly: 4 of 8 items compiled (resnet50, SmoothGrad
    16 at 1 image: 8 of 16). The maps are the eager maps within RTOL."""
    model = _net()
    x = torch.rand(1, 3, 8, 8)
    seen = _chunks_seen(monkeypatch)

    def call(**kw):
        if method == "smoothgrad":
            return salience.smoothgrad(model, x, 2, samples=8, reduce=None, **kw)
        return salience.integrated_gradients(model, x, 2, steps=8, reduce=None, **kw)

    ref = call()
    _perf.clear_cache()
    seen.clear()
    backend, graphs, calls = counting_backend()
    outs = []
    for _ in range(3):
        with unchanged(model), warnings.catch_warnings():
            warnings.simplefilter("error")
            outs.append(call(compile=backend))
    for out in outs:
        assert _rel(out, ref) <= RTOL
    compiled = "contiguous compiled"
    # since the chunk plan of session 45 the first call's memory probe is a pass of its own (eager, thrown
    # away, not a chunk): its chunks are the later calls' (before it: [1, 4, 3], the first and last eager)
    for later in seen:
        assert later == ([4, 4], [compiled, compiled]), later
    assert graphs == [[4]]  # one graph, of the fixed size, for every call
    assert len(calls) == 2 + 2 + 2


def test_compile_true_probe_is_kept_per_options_and_structure(monkeypatch):
    """The default options' later call still runs its probing chunk (the same chunks, the same bits, in
    every call); a compiled call takes an earlier call's probe of the same model, input shape and method
    (the eager calls' too: compiled runs share the eager runs' record), and after a change of the module
    tree (a new structure, whose softmax answer is not known) probes again."""
    model = _net()
    x = torch.rand(1, 3, 8, 8)
    seen = _chunks_seen(monkeypatch)
    backend, _, _ = counting_backend()
    for _ in range(2):
        salience.smoothgrad(model, x, 2, samples=8, reduce=None)
    salience.smoothgrad(model, x, 2, samples=8, reduce=None, compile=backend)
    salience.smoothgrad(model, x, 2, samples=8, reduce=None, compile=backend)
    model[2] = nn.Softplus()  # another structure: the earlier probe and softmax answer are not its
    salience.smoothgrad(model, x, 2, samples=8, reduce=None, compile=backend)
    # since session 45's chunk plan every call runs the same chunks (the probe a pass of its own, not a chunk);
    # the compiled calls run both compiled, also the one after the structure changed (its probe's pass, eager and
    # thrown away, answers the softmax question again)
    assert [c for c, _ in seen] == [[4, 4]] * 5, seen
    assert [layouts for _, layouts in seen] == [["contiguous"] * 2] * 2 + [["contiguous compiled"] * 2] * 3, seen


@pytest.mark.parametrize("fold", [False, True])
def test_compile_freeze_channels_last_compiles_its_frozen_graph_once(monkeypatch, fold):
    """compile="freeze" with memory_format="channels_last" (and the folded copy): the frozen gradient graph is
    compiled once for the model's weights and kept for the later calls, whose maps are the eager maps. The run
    converts the 4-D weights to channels-last for its chunks (the frozen graph takes them as constants so) and
    puts the user's back as it ends; the graph's constants were watched for their address too, so the next call
    found them "moved" and compiled the graph again at every call (resnet50: a compile of a minute or more per
    call). A stand-in for inductor's freezing (the graph's weights copied when compiled, as freezing takes
    them as constants) counts the compiles."""
    torch._dynamo.reset()
    compiles = snapshot_freezing(monkeypatch)
    model = _net()
    x = torch.rand(2, 3, 8, 8)
    seen = _chunks_seen(monkeypatch)
    ref = salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None)

    def frozen_call():
        with salience.performance(compile="freeze", memory_format="channels_last", fold_batchnorm=fold):
            return salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None)

    try:
        for _ in range(4):
            with unchanged(model), warnings.catch_warnings():
                warnings.simplefilter("error")
                out = frozen_call()
            assert _rel(out, ref) <= RTOL
        assert len(compiles) == 1, (len(compiles), seen)
        assert seen[-1][1] == ["channels_last" + (" folded" if fold else "") + " compiled frozen"] * 2, seen[-1]
        with torch.no_grad():  # a real change of the weights is still followed
            model[0].weight.mul_(2)
        out = frozen_call()
        assert _rel(out, salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None)) <= RTOL
        assert len(compiles) == 2
    finally:
        torch._dynamo.reset()
