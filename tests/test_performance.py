"""The engine's performance options (salience._core.perf): every path gives the default eager maps
within a stated tolerance, the chunk and layout probes choose by measured time, compilation falls
back to eager with a warning, and the model comes back as it was."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine as _engine
from salience._core import compiled as _compiled_mod
from salience._core import perf as _perf

from conftest import RandomImages, counting_backend, unchanged

# channels-last changes the order of the convolutions' sums: in float32 the maps differ from the
# contiguous ones by rounding only. The issue measured 4e-3 relative on resnet50's input gradient
# (224 px); 1e-3 of the map's largest value bounds the max difference on these small models
# (measured: <= 2.2e-3 relative max on resnet18 at 64 px for SmoothGrad; so the test uses 5e-3).
CL_RTOL = 5e-3
# bf16 autocast keeps 8 bits of mantissa (relative step 2^-8 = 3.9e-3) per operation; over a
# network the map's error is a few percent of its largest value (measured 3.7% on a 3-conv net):
# the documented tolerance is 0.1 of the largest value, and a correlation above 0.99.
BF16_ATOL = 0.1
BF16_CORR = 0.99


@pytest.fixture(autouse=True)
def _fresh_cache():
    _perf.clear_cache()
    yield
    _perf.clear_cache()


class ThreeConv(nn.Module):
    """The smallest model ``auto`` treats as convolutional (three Conv2d), with BatchNorm."""

    def __init__(self, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _methods():
    return [
        ("smoothgrad", lambda m, x, **kw: salience.smoothgrad(m, x, samples=2, **kw)),
        ("ig", lambda m, x, **kw: salience.integrated_gradients(m, x, steps=3, **kw)),
    ]


def _models():
    import torchvision

    from tiny_vit import torchvision_vit

    torch.manual_seed(0)
    yield "resnet18", torchvision.models.resnet18(num_classes=10).eval(), torch.rand(1, 3, 32, 32)
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    vgg.classifier = nn.Linear(512 * 7 * 7, 10)  # the convolutional body as is; a small head (time)
    yield "vgg11", vgg, torch.rand(1, 3, 32, 32)
    yield "vit", torchvision_vit(), torch.rand(1, 3, 32, 32)
    for name in ("shapes", "shapes-vit"):
        yield name, salience.load_model("demo:" + name), torch.rand(1, 3, 64, 64)


# --------------------------------------------------------------------------- right


def test_every_layout_gives_the_contiguous_maps_and_the_model_back():
    """resnet18, vgg11 (small inputs), a small ViT and the demo models: channels-last and auto equal
    the contiguous eager maps within CL_RTOL, and the parameters keep their strides and storage."""
    for name, model, x in _models():
        for mname, fn in _methods():
            ref = fn(model, x, memory_format="contiguous")
            with unchanged(model):
                for mf in ("channels_last", "auto") if name == "resnet18" else ("channels_last",):
                    out = fn(model, x, memory_format=mf)
                    assert _rel(out, ref) <= CL_RTOL, (name, mname, mf, _rel(out, ref))


def test_channels_last_runs_channels_last_and_restores_strides():
    model = ThreeConv()
    x = torch.rand(2, 3, 8, 8)
    seen = []
    h = model.body[3].register_forward_pre_hook(
        lambda mod, inp: seen.append((mod.weight.is_contiguous(memory_format=torch.channels_last),
                                      inp[0].is_contiguous(memory_format=torch.channels_last))))
    try:
        strides = [p.stride() for p in model.parameters()]
        with unchanged(model):
            salience.smoothgrad(model, x, samples=3, memory_format="channels_last", chunk=2)
        assert [p.stride() for p in model.parameters()] == strides
    finally:
        h.remove()
    assert seen[0] == (False, False)  # the clean pass that resolves the class: the user's layout
    assert all(s == (True, True) for s in seen[1:]) and len(seen) > 1


@pytest.mark.parametrize("exc", [RuntimeError("midway"), KeyboardInterrupt()])
def test_error_midway_restores_layout(exc):
    model = ThreeConv()
    model.train()
    calls = []

    def method(m, x, target, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return salience.vanilla(m, x, target, **kw)

    with unchanged(model):
        with pytest.raises(type(exc)):
            salience.smoothgrad(model, torch.rand(2, 3, 8, 8), method=method, samples=6, chunk=2,
                                memory_format="channels_last")
    assert all(p.is_contiguous() for p in model.parameters())


def test_bf16_autocast_within_the_documented_tolerance():
    model = ThreeConv(16)
    x = torch.rand(2, 3, 16, 16)
    ref = salience.smoothgrad(model, x, samples=4)
    with unchanged(model):
        out = salience.smoothgrad(model, x, samples=4, precision="bf16")
    assert out.dtype == ref.dtype
    assert _rel(out, ref) <= BF16_ATOL
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] >= BF16_CORR


# The perturbation methods' maps are differences of scores (occlusion: S(x) - S(occluded x);
# Ablation-CAM's weights: (S - S_k) / S): under bf16 each score is rounded to about 2^-8 of itself,
# so their error is bounded in the scores' units, not the map's: occlusion within BF16_SCORE of the
# largest clean score, Ablation-CAM (linear map) within BF16_SCORE of sum_k |A_k| per position.
# Measured on ThreeConv (16 px) and resnet18 (32 px): 4e-3 to 8.4e-3.
BF16_SCORE = 2e-2
PERTURBATION = [
    ("occlusion", dict(window=3, stride=2)),
    ("rise", dict(masks=12, cell=2)),
    ("scorecam", dict(layer="body.3")),
    ("ablationcam", dict(layer="body.3")),
]


def test_perturbation_methods_run_their_passes_with_the_options():
    """Score-CAM, Ablation-CAM, RISE and occlusion: channels-last (keyword, or the settings) runs the
    passes channels-last, compile runs them compiled (one graph for every chunk of every method; not
    Ablation-CAM's hooked passes), and the maps equal the default maps."""
    model, x = ThreeConv(), torch.rand(2, 3, 8, 8)
    compiles, compiled_calls, layouts = [], [], []

    def backend(gm, inputs):
        compiles.append(1)

        def call(*args):
            compiled_calls.append(1)
            return gm.forward(*args)
        return call

    for name, kw in PERTURBATION:
        fn = salience.METHODS[name]
        ref = fn(model, x, [0, 2], chunk=4, **kw)
        h = model.body[3].register_forward_pre_hook(  # removed before compiling: dynamo would trace it
            lambda mod, inp: layouts.append(mod.weight.is_contiguous(memory_format=torch.channels_last)))
        try:
            with unchanged(model):
                layouts.clear()
                cl = fn(model, x, [0, 2], chunk=4, memory_format="channels_last", **kw)
                assert any(layouts), name
                layouts.clear()
                with salience.performance(memory_format="channels_last"):
                    fn(model, x, [0, 2], chunk=4, **kw)
                assert any(layouts), name
        finally:
            h.remove()
        with unchanged(model):
            before = len(compiled_calls)
            comp = fn(model, x, [0, 2], chunk=4, compile=backend, **kw)
        assert (len(compiled_calls) > before) == (name != "ablationcam"), name
        assert _rel(cl, ref) <= CL_RTOL, (name, _rel(cl, ref))
        assert _rel(comp, ref) <= 1e-6, (name, _rel(comp, ref))
    assert len(compiles) == 1  # every compiled chunk has the one shape (4, 3, 8, 8), Score-CAM's too


def test_perturbation_methods_run_folded_passes():
    """fold_batchnorm: the gradient-free passes of Score-CAM, RISE and occlusion run the folded copy
    (its forward counted), Ablation-CAM's hooked passes the model itself (bit for bit); maps equal."""
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    folded, _ = _perf.folded_model(model)
    calls = []
    folded.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    for name, kw in PERTURBATION:
        fn = salience.METHODS[name]
        ref = fn(model, x, [0, 2], chunk=4, **kw)
        calls.clear()
        with unchanged(model), salience.performance(fold_batchnorm=True):
            out = fn(model, x, [0, 2], chunk=4, **kw)
        if name == "ablationcam":
            assert not calls and torch.equal(out, ref)
        else:
            assert calls, name
            # occlusion's map is a difference of scores (the clean one from an unfolded pass): rounding
            # does not cancel there (measured 1.6e-5 of the largest value); 1e-4 for all
            assert _rel(out, ref) <= 1e-4, (name, _rel(out, ref))


def test_perturbation_methods_bf16_within_the_documented_tolerance():
    from salience._core.autograd import forward_scores, layer_output

    model, x, t = ThreeConv(16), torch.rand(2, 3, 16, 16), [0, 3]
    with unchanged(model):
        for name, kw in PERTURBATION:
            if name in ("rise", "scorecam"):
                ref = salience.METHODS[name](model, x, t, **kw)
                out = salience.METHODS[name](model, x, t, precision="bf16", **kw)
                assert out.dtype == ref.dtype and _rel(out, ref) <= BF16_ATOL, name
                assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] >= BF16_CORR, name
        top = forward_scores(model, x).abs().max()  # the largest clean score (eval mode, under the guard)
        ref, out = (salience.occlusion(model, x, t, window=3, stride=2, precision=p) for p in ("fp32", "bf16"))
        assert (out - ref).abs().max() <= BF16_SCORE * top
        ref, out = (salience.ablationcam(model, x, t, layer="body.3", relu=False, upsample=False, precision=p)
                    for p in ("fp32", "bf16"))
        per_position = layer_output(model, x, "body.3").abs().sum(1).unsqueeze(1)  # sum_k |A_k| (B, 1, h, w)
        assert ((out - ref).abs() <= BF16_SCORE * per_position + 1e-7).all()


# --------------------------------------------------------------------------- options


def test_settings_keywords_and_errors():
    assert _perf.current() == _perf.Performance()
    with salience.performance(memory_format="contiguous", precision="bf16") as p:
        assert p.memory_format == "contiguous" and _perf.resolve().precision == "bf16"
        assert _perf.resolve(memory_format="channels_last").memory_format == "channels_last"  # keyword wins
    assert _perf.current() == _perf.Performance()
    assert (_perf.current().memory_format, _perf.current().chunks) == ("contiguous", "memory")  # the defaults
    prev = salience.set_performance(chunks="throughput")
    try:
        assert _perf.current().chunks == "throughput"
    finally:
        salience.set_performance(**vars(prev))
    assert _perf.current() == _perf.Performance()
    for bad in (dict(memory_format="nhwc"), dict(precision="int8"), dict(chunks="big"), dict(compile=3), dict(speed=1),
                dict(fold_batchnorm="yes")):
        with pytest.raises(SalienceError):
            salience.set_performance(**bad)
    with pytest.raises(SalienceError, match="memory_format"):
        salience.smoothgrad(ThreeConv(), torch.rand(1, 3, 4, 4), memory_format="nhwc")
    # a backend name torch.compile does not know: refused with the closest names (a raw InvalidBackend
    # from torch.compile at the first run before), as a setting and as a keyword
    for call in (lambda: salience.set_performance(compile="inductr"),
                 lambda: salience.smoothgrad(ThreeConv(), torch.rand(1, 3, 4, 4), samples=2, compile="inductr")):
        with pytest.raises(SalienceError, match=r"compile='inductr' is not a torch.compile backend; did you mean "
                                                r"'inductor'"):
            call()
    assert _perf.current() == _perf.Performance()


def test_cli_flags_reach_the_engine_and_do_not_leak(monkeypatch):
    from salience.cli import build_parser
    from salience.cli.common import performance_from_args

    args = build_parser().parse_args(["explain", "--model", "demo:shapes", "--memory-format", "channels_last",
                                      "--compile", "--precision", "bf16", "--fold-batchnorm", "a.png"])
    with performance_from_args(args) as p:
        assert (p.memory_format, p.compile, p.precision, p.fold_batchnorm) == ("channels_last", True, "bf16", True)
    assert _perf.current() == _perf.Performance()
    args = build_parser().parse_args(["explain", "--model", "demo:shapes", "a.png"])
    with performance_from_args(args) as p:
        assert p == _perf.Performance()


# --------------------------------------------------------------------------- chunks by throughput


class _VirtualClock:
    """The probes' clock made exact: ``Run.clock`` reads it, a chunk advances it by its stated cost,
    so what the probes decide does not depend on the machine's load (nothing sleeps)."""

    now = 0.0

    def advance(self, seconds: float) -> None:
        type(self).now += seconds


_CLOCK = _VirtualClock()


@pytest.fixture
def virtual_clock(monkeypatch):
    monkeypatch.setattr(_perf.Run, "clock", lambda self: _CLOCK.now)
    return _CLOCK


def _timed_compute(cost):
    """A compute whose chunk of n items takes ``cost(n)`` seconds of the virtual clock."""
    def compute(start, stop):
        _CLOCK.advance(cost(stop - start))
        return torch.ones(stop - start, 1)
    return compute


def test_chunk_probe_takes_the_size_fastest_per_item(virtual_clock):
    assert _perf.SIZE_SAMPLES == 2  # the sequences below take two timings (chunks) per size
    model, x = ThreeConv(), torch.rand(2, 3, 4, 4)
    # A fixed cost per pass of 20 ms: bigger chunks are faster per item up to 16 items, slower after
    # (per item: 11, 6, 3.5, 2.25 ms, then 4 ms).
    cost = lambda n: 0.02 + 0.001 * n if n <= 16 else n * 0.004  # noqa: E731
    run = _perf.Run(model, x, _perf.Performance(memory_format="contiguous", chunks="throughput"), tag="t1")
    sums = _engine.accumulate(_timed_compute(cost), 64, 2, run=run, max_memory=10 ** 9)
    # 2 (the memory probe, untimed), then two timed chunks of each size while it is 3 % faster per
    # item: 2, 2, 4, 4, 8, 8, 16, 16 (62 items); 32 is next but 2 items are left: a chunk of 2 that
    # is no sample, and the size is not decided yet.
    assert sums.chunks == [2, 2, 2, 4, 4, 8, 8, 16, 16, 2] and run.record.size is None
    assert {k: len(v) for k, v in run.record.samples.items()} == {(2, False): 2, (4, False): 2, (8, False): 2,
                                                                  (16, False): 2}
    sums = _engine.accumulate(_timed_compute(cost), 100, 2, run=_perf.Run(model, x, run.options, tag="t1"),
                              max_memory=10 ** 9)
    # The next call goes on where the probe stopped: two chunks of 32 (4 ms per item, not 3 % under
    # 2.25), so 16 is decided and the other 34 items run as 16, 16 and the rest.
    assert run.record.size == 16 and sums.chunks == [2, 32, 32, 16, 16, 2]
    sums = _engine.accumulate(_timed_compute(cost), 50, 2, run=_perf.Run(model, x, run.options, tag="t1"),
                              max_memory=10 ** 9)
    assert sums.chunks == [2, 16, 16, 16]  # a later call starts from the choice
    # Per-item cost that triples past 4 items (a cache that overflows): 4 is best (per item 9, 6.5,
    # 13 ms for 2, 4, 8), and the choice is cached.
    run = _perf.Run(model, x, _perf.Performance(memory_format="contiguous", chunks="throughput"), tag="t2")
    cost = lambda n: 0.01 + 0.004 * n * (1 if n <= 4 else 3)  # noqa: E731
    sums = _engine.accumulate(_timed_compute(cost), 40, 2, run=run, max_memory=10 ** 9)
    # 2 (memory probe), 2, 2, 4, 4, 8, 8 (30 items): 8 is slower than 4, so 4 (not the start: no
    # halving) is decided and the other 10 items run as 4, 4, 2.
    assert run.record.size == 4 and sums.chunks == [2, 2, 2, 4, 4, 8, 8, 4, 4, 2]
    again = _engine.accumulate(_timed_compute(cost), 40, 2, run=_perf.Run(model, x, run.options, tag="t2"),
                               max_memory=10 ** 9)
    assert again.chunks == [2] + [4] * 9 + [2]
    # chunks="memory": the memory probe a pass of its own (thrown away), then on a CPU at most CPU_GRADIENT_CHUNK
    # (16) items a chunk, the 40 items split as evenly as multiples of 8 allow (session 45); these items (a few
    # floats each) weigh less than the model's weights, so up to 32 (session 46, engine.gradient_chunk_cap: 24 + 16),
    # and are small in bytes, so up to 64 (session 60, engine.CPU_GRADIENT_CHUNK_SMALL): all 40 in one
    mem = _engine.accumulate(_timed_compute(lambda n: 0.0), 40, 2, max_memory=10 ** 9,
                             run=_perf.Run(model, x, _perf.Performance(chunks="memory"), tag="t3"))
    assert mem.chunks == [40]
    # the small-pass rule off: the weighty cap (32) alone, and the 40 items split as evenly as multiples of 8 allow
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_engine, "CPU_SMALL_PASS_BYTES", 0)
        mem = _engine.accumulate(_timed_compute(lambda n: 0.0), 40, 2, max_memory=10 ** 9,
                                 run=_perf.Run(model, x, _perf.Performance(chunks="memory"), tag="t4"))
    assert mem.chunks == [24, 16]


# Per item (ms) by chunk size: 16 is the fastest; 32 is 7 % slower, more than SIZE_GAIN's 3 %.
_PER_ITEM_MS = {1: 21.0, 2: 11.0, 4: 6.0, 8: 3.5, 16: 2.25, 32: 2.4, 64: 4.0}


def _noisy_compute(slow_size: int, factor: float):
    """Chunks cost ``_PER_ITEM_MS`` per item, except the first chunk of ``slow_size`` items, which
    takes ``factor`` times as long: one slow timing (the machine busy elsewhere for that chunk)."""
    seen: set[int] = set()

    def compute(start, stop):
        n = stop - start
        ms = _PER_ITEM_MS.get(n, 20.0 / n + 1.0) * n  # sizes off the ladder (the tail): 20 ms + 1 ms/item
        if n == slow_size and n not in seen:
            ms *= factor
        seen.add(n)
        _CLOCK.advance(ms / 1000)
        return torch.ones(n, 1)
    return compute


@pytest.mark.parametrize("slow_size, factor, one_timing_picks", [
    # The first chunk of 8 takes 2x (7 ms per item, not 3 % under 4's 6 ms): one timing per size
    # stops the climb at 4; the second chunk of 8 times 3.5 ms and the climb goes on to 16.
    (8, 2.0, 4),
    # The first chunk of 16 takes 1.3x (2.925 ms per item, still under 8's 3.5 ms): one timing per
    # size then finds 32 (2.4 ms) 3 % faster than 16 and climbs past the best to 32 (64: 4 ms);
    # the minimum of two timings of 16 is 2.25, which 32 does not beat.
    (16, 1.3, 32),
])
def test_chunk_probe_ignores_one_slow_timing(virtual_clock, slow_size, factor, one_timing_picks):
    """One outlier timing (the spread of one timing on a shared VM, +-10 %, is more than the 3 %
    the probe looks for): the minimum of two timings per size still picks 16, the size fastest per
    item; with one timing per size (``SIZE_SAMPLES = 1``) the probe picks ``one_timing_picks``."""
    model, x = ThreeConv(), torch.rand(2, 3, 4, 4)
    opts = _perf.Performance(memory_format="contiguous", chunks="throughput")
    sums = _engine.accumulate(_noisy_compute(slow_size, factor), 200, 2, run=_perf.Run(model, x, opts, tag="n2"),
                              max_memory=10 ** 9)
    # 2 (memory probe), two timed chunks each of 2, 4, 8, 16, 32 (126 items): 32 is slower per item
    # than 16, so 16 is decided, and the other 74 items run as 16 x 4 and 10.
    assert sums.chunks == [2, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 16, 16, 16, 16, 10]
    assert _perf.Run(model, x, opts, tag="n2").record.size == 16
    # the same timings, one per size: the outlier decides
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_perf, "SIZE_SAMPLES", 1)
        run = _perf.Run(model, x, opts, tag="n1")
        _engine.accumulate(_noisy_compute(slow_size, factor), 200, 2, run=run, max_memory=10 ** 9)
    assert run.record.size == one_timing_picks


def test_size_probe_after_the_layout_probe_uses_its_timings(monkeypatch, virtual_clock):
    """memory_format="auto" with chunks="throughput": the layout probe times two chunks of the start
    size in each layout; after it, the size probe counts the two in the chosen layout as the start
    size's timings (no third chunk of 2) and times the bigger sizes in that layout only."""
    model, x = ThreeConv(), torch.rand(2, 3, 4, 4)
    monkeypatch.setattr(_perf, "SMALL_ITEM_BYTES", 0)  # the tiny net counts as big here

    def compute(start, stop):  # channels-last at _PER_ITEM_MS, contiguous twice as slow
        n = stop - start
        cl = model.body[0].weight.is_contiguous(memory_format=torch.channels_last) and \
            model.body[0].weight.stride(1) == 1
        _CLOCK.advance(_PER_ITEM_MS.get(n, 20.0 / n + 1.0) * n / 1000 * (1 if cl else 2))
        return torch.ones(n, 1)

    with unchanged(model):
        run = _perf.Run(model, x, _perf.Performance(memory_format="auto", chunks="throughput"), tag="ls")
        s = _engine.accumulate(compute, 200, 2, run=run, max_memory=10 ** 9)
    # 2 (memory probe, contiguous), the layout probe 2 contiguous / channels-last / contiguous /
    # channels-last (channels-last decided), then two channels-last chunks each of 4, 8, 16, 32;
    # (130 items) 16 decided: the other 70 items as 16 x 4 and 6.
    assert s.chunks == [2, 2, 2, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 16, 16, 16, 16, 6]
    assert s.layouts[:5] == ["contiguous", "contiguous", "channels_last", "contiguous", "channels_last"]
    assert set(s.layouts[5:]) == {"channels_last"}
    assert run.record.layout is True and run.record.size == 16
    assert {k: len(v) for k, v in run.record.samples.items()} == {
        (2, False): 2, (2, True): 2, (4, True): 2, (8, True): 2, (16, True): 2, (32, True): 2}


def test_layout_probe_chooses_channels_last_only_when_faster(monkeypatch, virtual_clock):
    model, x = ThreeConv(), torch.rand(2, 3, 4, 4)
    monkeypatch.setattr(_perf, "SMALL_ITEM_BYTES", 0)  # the tiny net counts as big here

    def compute_for(cl_cost, ct_cost):
        def compute(start, stop):
            cl = model.body[0].weight.is_contiguous(memory_format=torch.channels_last) and \
                model.body[0].weight.stride(1) == 1
            _CLOCK.advance((cl_cost if cl else ct_cost) * (stop - start))
            return torch.ones(stop - start, 1)
        return compute

    with unchanged(model):
        run = _perf.Run(model, x, _perf.Performance(memory_format="auto", chunks="memory"), tag="faster")
        s = _engine.accumulate(compute_for(0.002, 0.006), 20, 2, run=run, chunk=None, max_memory=10 ** 9)
    assert run.record.layout is True
    # the memory probe's pass (thrown away: no chunk of the call), then the layout probe's four, then the rest
    assert s.layouts[:4] == ["contiguous", "channels_last", "contiguous", "channels_last"]
    assert set(s.layouts[4:]) == {"channels_last"} and sum(s.chunks) == 20
    with unchanged(model):
        run = _perf.Run(model, x, _perf.Performance(memory_format="auto", chunks="memory"), tag="slower")
        s = _engine.accumulate(compute_for(0.006, 0.005), 20, 2, run=run, max_memory=10 ** 9)
    assert run.record.layout is False and set(s.layouts[4:]) == {"contiguous"}
    # transformers (fewer than three convolutions) are left alone: no probe
    vit = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.Flatten(), nn.Linear(16, 2))
    s = _engine.accumulate(_timed_compute(lambda n: 0), 10, 2, max_memory=10 ** 9,
                           run=_perf.Run(vit, x, _perf.Performance(memory_format="auto", chunks="memory"), tag="vit"))
    assert set(s.layouts) == {"contiguous"}


# --------------------------------------------------------------------------- compile


def test_compile_once_fixed_chunks_tail_eager():
    """A counting backend (it returns the traced graph as is: cheap): one compile for every call and
    chunk of the fixed size; the first chunk (memory probe) and the tail run eagerly; same maps."""
    model, x = ThreeConv(), torch.rand(3, 3, 8, 8)
    compiles = []

    def backend(gm, inputs):
        compiles.append([tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    ref = salience.smoothgrad(model, x, samples=7, chunk=6, compile=False)
    # one layout for all (auto may choose channels-last for one method and not the other: a graph each)
    with unchanged(model), salience.performance(memory_format="contiguous"):
        out = salience.smoothgrad(model, x, samples=7, chunk=6, compile=backend)
        out2 = salience.smoothgrad(model, x, samples=7, chunk=6, compile=backend)
        ig = salience.integrated_gradients(model, x, steps=9, chunk=6, compile=backend)
    assert len(compiles) == 1  # 21 copies = 3 x 6 + 3 twice, and 24 path points = 4 x 6: one graph
    assert _rel(out, ref) < 1e-6 and torch.equal(out, out2)
    assert _rel(ig, salience.integrated_gradients(model, x, steps=9)) < 1e-5
    run = _perf.Run(model, x, _perf.Performance(compile=backend), tag="c")
    sums = _engine.accumulate(lambda s, e: salience.vanilla(model, torch.rand(e - s, 3, 8, 8), 0, reduce=None),
                              20, 3, chunk=6, run=run)
    # the first chunk eagerly (it checks for a final softmax to strip), the tail eagerly
    assert sums.chunks == [6, 6, 6, 2]
    assert sums.layouts == ["contiguous", "contiguous compiled", "contiguous compiled", "contiguous"]


def test_compile_failure_and_unavailable_fall_back_to_eager(monkeypatch):
    model, x = ThreeConv(), torch.rand(2, 3, 8, 8)
    ref = salience.smoothgrad(model, x, samples=4, chunk=2)

    def broken(gm, inputs):
        raise RuntimeError("no kernels for this")

    with unchanged(model), pytest.warns(UserWarning, match="compile: torch.compile failed.*running eagerly"):
        out = salience.smoothgrad(model, x, samples=4, chunk=2, compile=broken)
    assert _rel(out, ref) < 1e-6
    monkeypatch.setattr(_perf, "compile_unavailable", lambda backend, device: "no C++ compiler here")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler here; running eagerly"):
        out = salience.smoothgrad(model, x, samples=4, chunk=2, compile=True)
    assert _rel(out, ref) < 1e-6


def test_compile_with_inductor_on_one_tiny_conv_net():
    """The real compiler, once, on the smallest model (the first compile takes seconds to a minute)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3))
    x = torch.rand(2, 3, 8, 8)
    ref = salience.integrated_gradients(model, x, steps=5, chunk=4)
    why = _perf.compile_unavailable("inductor", x.device)
    with unchanged(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = salience.integrated_gradients(model, x, steps=5, chunk=4, compile=True)
    msgs = [str(w.message) for w in caught if "compile" in str(w.message)]
    if why is not None:
        assert any(why in m for m in msgs)
    else:
        assert not msgs, msgs
    assert _rel(out, ref) < 1e-5


# --------------------------------------------------------------------------- compile="freeze"

# A frozen graph computes the same function with other roundings (BatchNorm folded into the convolution,
# sums reordered). With inductor on ThreeConv (8 px) the maps agreed to 6e-8 (Score-CAM) and 8e-8 (RISE)
# of their largest value; occlusion's map is a difference of scores, where rounding does not cancel:
# 1.6e-5. docs/performance.md states FREEZE_RTOL for all.
FREEZE_RTOL = 1e-4


@pytest.fixture
def snapshot_freezing(monkeypatch):
    """``compile="freeze"`` with a cheap stand-in for inductor's freezing (a real compile takes seconds to
    a minute): the graph's weights are copied when it is compiled, as freezing takes them as constants,
    so a graph kept after an in-place change of the model gives the old model's maps. The plain compiled
    passes (those with gradients) go to a counting backend. Yields (frozen graphs compiled, calls of
    them, plain graphs compiled)."""
    import copy

    torch._dynamo.reset()  # the forward's code object: earlier tests' graphs count to its recompile limit
    frozen, calls = [], []

    def snapshot(gm, inputs):
        frozen.append(1)
        kept = copy.deepcopy(gm)

        def run(*args):
            calls.append(1)
            return kept.forward(*args)
        return run

    backend, graphs, _ = counting_backend()
    plain = _perf._compiled_model  # patched in perf, where Run calls it (the compiled module's own name is not)
    monkeypatch.setattr(_compiled_mod, "_freeze_compile", snapshot)
    monkeypatch.setattr(_perf, "_compiled_model", lambda m, b, f: plain(m, backend if b == "inductor" else b, f))
    yield frozen, calls, graphs
    torch._dynamo.reset()


def test_compile_freeze_runs_the_passes_without_gradients_frozen(snapshot_freezing):
    """compile="freeze": Score-CAM's, RISE's and occlusion's passes (under inference_mode) run the frozen
    graph, one for every chunk of every method (Ablation-CAM's hooked passes the model itself); the
    gradient passes of SmoothGrad run the plain compiled graph, never the frozen one; the maps are the
    eager maps and the model comes back as it was."""
    from salience._core.autograd import forward_scores

    frozen, calls, graphs = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    for name, kw in PERTURBATION:
        fn = salience.METHODS[name]
        ref = fn(model, x, [0, 2], chunk=4, **kw)
        before = len(calls)
        with unchanged(model):
            out = fn(model, x, [0, 2], chunk=4, compile="freeze", **kw)
        assert (len(calls) > before) == (name != "ablationcam"), name
        assert _rel(out, ref) <= 1e-6, (name, _rel(out, ref))
    assert len(frozen) == 1 and graphs == []  # every frozen chunk is (4, 3, 8, 8); no gradient pass yet
    before = len(calls)
    with unchanged(model):
        sg = salience.smoothgrad(model, x, samples=7, chunk=6, compile="freeze")
    # its gradient passes run a frozen gradient graph (test_compile_freeze_runs_the_gradient_passes_...)
    assert len(calls) > before and graphs == [] and len(frozen) == 2
    assert _rel(sg, salience.smoothgrad(model, x, samples=7, chunk=6)) < 1e-6
    # a run's chunks say which ran frozen: the first (the softmax check) and the tail eagerly
    run = _perf.Run(model, x, _perf.Performance(compile="freeze"), tag="f")
    sums = _engine.accumulate(lambda s, e: forward_scores(model, torch.rand(e - s, 3, 8, 8), compiled=True).sum(0),
                              10, 1, chunk=4, run=run, inference=True)
    assert sums.layouts == ["contiguous", "contiguous compiled frozen", "contiguous"]


def test_the_reused_probe_is_read_while_another_thread_records_one():
    """compile="freeze" reuses the memory probe last measured for the model (Run.reused_probe), while another
    thread's call on the same model may record one (Run.probed, for another number of images). A thread switch
    may come between any two bytecode instructions: here another run records a probe at every one of the read's
    (a trace of its opcodes), and the read gives a recorded value, never an error. A reverse iterator over the
    probes' dict, read across such a switch, raised "dictionary changed size during iteration"."""
    import sys

    model, x = ThreeConv(), torch.rand(1, 3, 8, 8)
    reader = _perf.Run(model, x, _perf.Performance(compile="freeze"), tag="race")
    writer = _perf.Run(model, x, _perf.Performance(compile="freeze"), tag="race")
    assert reader.record is writer.record
    writer.probed(1000, 1)
    reader.softmax_checked = True  # the final softmax known: the run may reuse the probe
    written = [1000]

    def switch(frame, event, arg):  # "another thread" records a probe between two instructions of the read
        if event == "opcode":
            written.append(1000 + len(written))
            writer.probed(written[-1], len(written))
        return switch

    def calls(frame, event, arg):
        if frame.f_code is not _perf.Run.reused_probe.__code__:
            return None
        frame.f_trace_opcodes = True
        return switch

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        got = reader.reused_probe(1)
    finally:
        sys.settrace(before)
    assert len(written) > 3 and got in written


def _change_weights(model: nn.Module, change: str) -> None:
    """Change a :class:`ThreeConv`'s weights in place the way ``change`` names (its modules, and so
    its structure, stay the same): an optimizer step, ``load_state_dict``, ``copy_``, a buffer, a new
    tensor through ``.data``, or the same storage transposed through ``.data``."""
    conv = model.body[0]
    if change == "optimizer step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.eval()(torch.rand(2, 3, 8, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    elif change == "load_state_dict":
        model.load_state_dict({k: v * 1.5 + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    elif change == "copy_":
        with torch.no_grad():
            conv.weight.copy_(torch.randn_like(conv.weight))
    elif change == "buffer":
        model.body[1].running_mean.add_(1.0)
    elif change == "transposed .data":  # the same storage (address, version counter), other strides
        model.body[3].weight.data = model.body[3].weight.data.transpose(0, 1)
    elif change == "new tensor":
        conv.weight.data = conv.weight.data * -2
    else:
        raise ValueError(change)


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "copy_", "buffer", "new tensor",
                                    "transposed .data"])
def test_compile_freeze_follows_weights_changed_in_place(snapshot_freezing, change):
    """A frozen graph holds the weights as they were when it was compiled. After a first
    compile="freeze" call the model's weights change in place (its modules, and so its structure, stay
    the same); the next call's map is the eager map of the changed model: the frozen graph is kept for
    each parameter's and buffer's address and version counter, and compiled again when one changed.
    Kept for the structure alone (as the plain compiled model is), the old graph ran and the map was
    the old model's (occlusion 4.2x off with inductor)."""
    frozen, _, _ = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    kw = dict(window=3, stride=2)
    salience.occlusion(model, x, [0, 2], chunk=4, compile="freeze", **kw)
    _change_weights(model, change)
    ref = salience.occlusion(model, x, [0, 2], chunk=4, **kw)
    with unchanged(model):
        out = salience.occlusion(model, x, [0, 2], chunk=4, compile="freeze", **kw)
    assert _rel(out, ref) <= 1e-6, _rel(out, ref)  # the old graph: 4x to 450x off
    assert len(frozen) == 2
    salience.occlusion(model, x, [0, 2], chunk=4, compile="freeze", **kw)
    assert len(frozen) == 2  # unchanged since: the graph is kept


class Scaled(nn.Module):
    """ThreeConv times a plain tensor attribute (neither parameter nor buffer: a normalisation constant
    kept as ``self.scale = torch.tensor(...)``, common in user code); dynamo takes it, like the weights,
    as a constant of a frozen graph."""

    def __init__(self):
        super().__init__()
        self.net = _with_statistics(ThreeConv())
        self.scale = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)

    def forward(self, x):
        return self.net(x * self.scale)


@pytest.mark.parametrize("change", ["in place", "new tensor"])
def test_compile_freeze_follows_a_plain_tensor_attribute(snapshot_freezing, change):
    """A tensor the forward reads from a module attribute (not registered as a buffer) is frozen into
    the graph as the weights are; changed in place (or replaced by another), the next
    compile="freeze" call's map is the eager map of the changed model. perf.weights_key looked at
    parameters and buffers only: the old graph ran, with the old scale (the map 0.33 of the changed
    model's largest value off)."""
    frozen, _, _ = snapshot_freezing
    model, x = Scaled(), torch.rand(2, 3, 8, 8)
    kw = dict(window=3, stride=2, chunk=4)
    salience.occlusion(model, x, [0, 2], compile="freeze", **kw)
    if change == "in place":
        model.scale.mul_(torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1))
    else:
        model.scale = model.scale * torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    ref = salience.occlusion(model, x, [0, 2], **kw)
    with unchanged(model):
        out = salience.occlusion(model, x, [0, 2], compile="freeze", **kw)
    assert _rel(out, ref) <= 1e-6, _rel(out, ref)


class Keeping(nn.Module):
    """ThreeConv that keeps its last features as a plain attribute (as models keep attention maps)."""

    def __init__(self):
        super().__init__()
        self.net = _with_statistics(ThreeConv())

    def forward(self, x):
        h = self.net.body(x)
        self.last = h
        return self.net.head(h.mean((2, 3)))


def test_compile_freeze_keeps_its_graph_for_a_model_that_stores_tensors(snapshot_freezing):
    """A tensor the forward stores on a module (a new one each pass) is no constant of the frozen graph:
    calls in a row compile one frozen graph, not one per call (keying the graph on every tensor
    attribute of the modules would have compiled again at every call)."""
    frozen, _, _ = snapshot_freezing
    model, x = Keeping(), torch.rand(2, 3, 8, 8)
    kw = dict(window=3, stride=2, chunk=4)
    ref = salience.occlusion(model, x, [0, 2], **kw)
    for _ in range(3):
        out = salience.occlusion(model, x, [0, 2], compile="freeze", **kw)
        assert _rel(out, ref) <= 1e-6
    assert len(frozen) == 1


def test_compile_leaves_no_marks_on_the_weights_and_keeps_its_graphs(snapshot_freezing):
    """torch.compile marks the tensors it traces (dynamo's ``_dynamo_static_input_type``, "guarded" for a
    frozen graph, "unguarded" for a plain one; inductor's freezing ``_is_frozen_param``): the guard
    takes those off the user's parameters and buffers again and leaves the user's own attributes. The
    graphs do not need them: the next call compiles nothing, and a frozen graph is still compiled anew
    after an in-place change of the weights (its map the changed model's eager map)."""
    frozen, calls, graphs = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    model.body[0].weight.note = "the user's"
    model.body[1].running_mean._dynamo_static_input_type = "unguarded"  # as if the user had compiled it
    kw = dict(window=3, stride=2)
    tensors = [*model.parameters(), *model.buffers()]
    attrs = [dict(t.__dict__) for t in tensors]
    for _ in range(2):
        with unchanged(model):
            salience.occlusion(model, x, [0, 2], chunk=4, compile="freeze", **kw)
        assert [t.__dict__ for t in tensors] == attrs
    assert len(frozen) == 1 and len(calls) >= 2  # the frozen graph ran on the second call, compiled once
    for _ in range(2):
        with unchanged(model):
            sg = salience.smoothgrad(model, x, samples=7, chunk=6, compile=True)
        assert [t.__dict__ for t in tensors] == attrs
    assert len(graphs) == 1
    assert _rel(sg, salience.smoothgrad(model, x, samples=7, chunk=6)) < 1e-6
    with torch.no_grad():
        model.body[0].weight.mul_(-2)
    ref = salience.occlusion(model, x, [0, 2], chunk=4, **kw)
    with unchanged(model):
        out = salience.occlusion(model, x, [0, 2], chunk=4, compile="freeze", **kw)
    assert len(frozen) == 2 and _rel(out, ref) <= 1e-6


def test_compile_freeze_failures_and_errors_leave_the_model(snapshot_freezing, monkeypatch):
    """A frozen compile that fails warns and the passes run without freezing (the eager maps); no
    compiler: the warning of compile=True and eager passes; an interrupt inside a frozen compile leaves
    the model as it was (modes, flags, layout); a misspelt value is refused with the one that exists."""
    model, x = ThreeConv(), torch.rand(2, 3, 8, 8)
    kw = dict(masks=12, cell=2, chunk=4)
    ref = salience.rise(model, x, [0, 2], **kw)

    def broken(gm, inputs):
        raise RuntimeError("no frozen kernels for this")

    monkeypatch.setattr(_compiled_mod, "_freeze_compile", broken)
    with unchanged(model), pytest.warns(UserWarning, match="compile='freeze': torch.compile with freezing failed "
                                                           ".*no frozen kernels.*without freezing"):
        out = salience.rise(model, x, [0, 2], compile="freeze", **kw)
    assert _rel(out, ref) <= 1e-6

    def interrupted(gm, inputs):
        raise KeyboardInterrupt

    _perf.clear_cache()
    monkeypatch.setattr(_compiled_mod, "_freeze_compile", interrupted)
    model.train()
    with unchanged(model), pytest.raises(KeyboardInterrupt):
        salience.scorecam(model, x, [0, 2], layer="body.3", chunk=4, compile="freeze", memory_format="channels_last")
    monkeypatch.setattr(_perf, "compile_unavailable", lambda backend, device: "no C++ compiler here")
    with unchanged(model), pytest.warns(UserWarning, match="no C\\+\\+ compiler here; running eagerly"):
        out = salience.rise(model, x, [0, 2], compile="freeze", **kw)
    assert _rel(out, ref) <= 1e-6
    for call in (lambda: salience.set_performance(compile="freez"),
                 lambda: salience.rise(model, x, [0, 2], compile="freez", **kw)):
        with pytest.raises(SalienceError, match="compile='freez' is not a torch.compile backend; did you mean 'freeze'"):
            call()
    assert _perf.current() == _perf.Performance()


def test_cli_compile_freeze_and_the_bare_switch():
    """``--compile freeze`` (or ``--compile=freeze``) is compile="freeze"; ``--compile`` alone is still
    True, also before an image path (``nargs="?"`` alone would take the path as its value); another
    value is a usage error."""
    from salience.cli import build_parser, main
    from salience.cli.common import performance_from_args

    parse = build_parser().parse_args
    for words, want in ((["--compile", "freeze", "a.png"], "freeze"), (["a.png", "--compile=freeze"], "freeze"),
                        (["--compile", "a.png"], True), (["a.png", "--compile"], True),
                        (["--compile", "--precision", "fp32", "a.png"], True), (["a.png"], None)):
        args = parse(["explain", "--model", "demo:shapes", *words])
        assert (args.compile, args.images) == (want, ["a.png"]), words
        with performance_from_args(args) as p:
            assert p.compile == (want if want is not None else False)
    assert main(["explain", "--model", "demo:shapes", "--compile=fast", "a.png"]) == 2


def test_compile_freeze_with_inductor_on_one_tiny_model():
    """The real compiler with freezing, once more after an in-place change of the weights: occlusion's
    frozen passes give the eager map, then the eager map of the changed model. With the weights' key
    taken out (``perf.weights_key`` returning the same for both states) the second map was the old
    model's, 3.6x off: inductor's frozen graph holds the weights as constants. A linear model: about 11 s
    for the two compiles after the plain compile of the test before (a convolution's frozen compile
    took 30 s)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x, kw = torch.rand(2, 3, 8, 8), dict(window=3, stride=2, chunk=4)
    if _perf.compile_unavailable("inductor", x.device) is not None:
        pytest.skip("inductor cannot compile here")
    torch._dynamo.reset()
    for step in range(2):
        ref = salience.occlusion(model, x, [0, 2], **kw)
        with unchanged(model), warnings.catch_warnings():
            warnings.simplefilter("error")
            out = salience.occlusion(model, x, [0, 2], compile="freeze", **kw)
        assert _rel(out, ref) <= FREEZE_RTOL, (step, _rel(out, ref))
        with torch.no_grad():
            model[1].weight.mul_(-1.5)
    torch._dynamo.reset()


def _gradient_maps(model, x, **kw):
    """SmoothGrad's and integrated gradients' raw maps on ``model`` (chunks of 6 items: the first runs
    eagerly, the softmax check; the middle ones compiled; the last, shorter one eagerly)."""
    return (salience.smoothgrad(model, x, [0, 2], samples=7, chunk=6, reduce=None, **kw),
            salience.integrated_gradients(model, x, [1, 3], steps=9, chunk=6, reduce=None, **kw))


def test_compile_freeze_runs_the_gradient_passes_through_a_frozen_gradient_graph(snapshot_freezing):
    """compile="freeze": SmoothGrad's and integrated gradients' plain gradient passes run one frozen
    graph of forward + input gradient (torch.func.grad compiled under no_grad, so that inductor may
    freeze it), not the plain compiled model with autograd: the stand-in compiler (it copies the
    graph's weights, as freezing takes them as constants) compiles one gradient graph, the plain
    compiled model none; the maps are the eager maps (eager gradients of the class scores, a
    reference not computed by the graph), the model comes back as it was, and a run's chunks say
    which ran frozen."""
    frozen, calls, graphs = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    refs = _gradient_maps(model, x)
    with unchanged(model):
        outs = _gradient_maps(model, x, compile="freeze")
    assert len(frozen) == 1 and len(calls) >= 2 and graphs == []
    for out, ref in zip(outs, refs):
        assert _rel(out, ref) < 1e-6, _rel(out, ref)
    # the hand-written input gradient of one chunk: d/dx sum_i out_i[c_i], autograd on the eager model
    items, cls = torch.rand(6, 3, 8, 8), torch.tensor([0, 2, 4, 1, 3, 0])
    run = _perf.Run(model, items, _perf.Performance(compile="freeze"), tag="g")
    from salience._core.autograd import gradients
    from salience.targets import Classes

    import copy

    ev = copy.deepcopy(model).eval()  # salience runs the model in eval mode
    xi = items.clone().requires_grad_(True)
    want = torch.autograd.grad(ev(xi).gather(1, cls.view(-1, 1)).sum(), xi)[0]
    run.softmax_checked = True  # as after the run's first, eager pass
    try:
        with run.chunk(False, True):
            g = gradients(model, items, Classes(cls))
    finally:
        run.close()
    assert run.layouts == ["contiguous compiled frozen"] and _rel(g.grad, want) < 1e-6
    assert _rel(g.scores, ev(items).gather(1, cls.view(-1, 1)).squeeze(1).detach()) < 1e-6
    assert len(frozen) == 1  # the same graph: same model, weights, shape


@pytest.mark.parametrize("change", ["optimizer step", "copy_", "buffer", "new tensor", "transposed .data"])
def test_compile_freeze_gradient_graph_follows_weights_changed_in_place(snapshot_freezing, change):
    """The frozen gradient graph holds the weights as they were when it was compiled. After a first
    compile="freeze" SmoothGrad / IG call the weights change in place; the next call's maps are the
    eager maps of the changed model: the gradient graph is kept for perf.weights_key and compiled
    again when it changed."""
    frozen, _, _ = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    _gradient_maps(model, x, compile="freeze")
    assert len(frozen) == 1
    _gradient_maps(model, x, compile="freeze")
    assert len(frozen) == 2  # SmoothGrad's last chunk of 2 recurs in these weights: its graph too
    _change_weights(model, change)
    refs = _gradient_maps(model, x)
    for step in range(2):
        with unchanged(model):
            outs = _gradient_maps(model, x, compile="freeze")
        for out, ref in zip(outs, refs):
            assert _rel(out, ref) < 1e-6, (step, _rel(out, ref))
        # the new weights' graphs: the chunk size 6 at once; SmoothGrad's tail of 2 eagerly in the first
        # call of these weights, frozen (a graph of the new weights) from the second on (perf.FROZEN_TAILS)
        assert len(frozen) == (3 if step == 0 else 4), (step, len(frozen))


def test_compile_freeze_gradient_graph_that_fails_falls_back(snapshot_freezing, monkeypatch):
    """A frozen gradient graph that fails to compile warns once and the gradient passes run the plain
    compiled model with autograd: the eager maps, the model as it was; a target the graph does not
    compute (a function of the output) runs the plain compiled model without a word."""
    frozen, calls, graphs = snapshot_freezing
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    refs = _gradient_maps(model, x)

    def broken(gm, inputs):
        raise RuntimeError("no frozen kernels for this")

    monkeypatch.setattr(_compiled_mod, "_freeze_compile", broken)
    with unchanged(model), pytest.warns(UserWarning, match="compile='freeze': the frozen input-gradient graph "
                                                           "failed .*no frozen kernels.*without freezing"):
        outs = _gradient_maps(model, x, compile="freeze")
    for out, ref in zip(outs, refs):
        assert _rel(out, ref) < 1e-6, _rel(out, ref)
    assert len(graphs) == 1
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        _gradient_maps(model, x, compile="freeze")  # not tried again: no second warning
        fn = lambda out: out[:, 1] - out[:, 2]  # noqa: E731
        out = salience.smoothgrad(model, x, fn, samples=7, chunk=6, reduce=None, compile="freeze")
    assert _rel(out, salience.smoothgrad(model, x, fn, samples=7, chunk=6, reduce=None)) < 1e-6


class _Counting(nn.Module):
    """A small convolutional model that counts its passes in a buffer, in eval mode too (its weights'
    state changes at every pass)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.passes += 1
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_compile_freeze_gradient_graph_failure_is_kept_for_the_structure(snapshot_freezing):
    """A model that updates a buffer in its forward: dynamo cannot trace the update inside the frozen
    gradient graph. The failure warns once in three SmoothGrad calls, and the later calls run the
    plain compiled model without trying the graph again (no frozen graph compiled, none called); the
    maps are the eager maps. Before, the buffer's new version made a new weights key at every call:
    the graph was traced, failed and warned again every time."""
    frozen, calls, graphs = snapshot_freezing
    model, x = _Counting(), torch.rand(2, 3, 8, 8)
    ref = salience.smoothgrad(model, x, [0, 2], samples=7, chunk=6, reduce=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            out = salience.smoothgrad(model, x, [0, 2], samples=7, chunk=6, reduce=None, compile="freeze")
            assert _rel(out, ref) < 1e-6, _rel(out, ref)
    failed = [w for w in seen if "frozen input-gradient graph failed" in str(w.message)]
    assert len(failed) == 1, [str(w.message) for w in seen]
    assert frozen == [] and calls == [] and len(graphs) >= 1  # the plain compiled model ran instead


def test_compile_freeze_tail_graphs_are_capped_per_model(snapshot_freezing, monkeypatch):
    """The frozen gradient graph is one code object for every method, size and input shape of a model,
    under dynamo's recompile limit; past it the graph fails and no pass of the model runs frozen. The
    last, shorter chunks' graphs (perf.FROZEN_TAILS per method and input shape) count towards it too:
    perf.FROZEN_TAILS_PER_MODEL caps them for the model. Scaled down (a cap of 1 tail, a recompile
    limit of 3): SmoothGrad on two input shapes, twice each: two graphs of the chunk size and one of
    the first shape's tail, no failure, the second shape's tail eager; the maps are the eager maps.
    Before: one tail graph per input shape, the fourth graph hit the limit (a warning, the gradient
    passes unfrozen for the model; at the real limit of 8 and cap of 2: five image sizes)."""
    frozen, calls, graphs = snapshot_freezing
    monkeypatch.setattr(_perf, "FROZEN_TAILS_PER_MODEL", 1)
    model = _with_statistics(ThreeConv())
    with torch._dynamo.config.patch(recompile_limit=3), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for side in (8, 9):
            x = torch.rand(2, 3, side, side)
            ref = salience.smoothgrad(model, x, [0, 2], samples=4, chunk=3, reduce=None)
            for _ in range(2):
                out = salience.smoothgrad(model, x, [0, 2], samples=4, chunk=3, reduce=None, compile="freeze")
                assert _rel(out, ref) < 1e-6, _rel(out, ref)
    failed = [str(w.message) for w in seen if "failed" in str(w.message)]
    assert failed == [], failed
    assert len(frozen) == 3, len(frozen)  # 2 chunk-size graphs + 1 tail (FROZEN_TAILS_PER_MODEL)


def test_compile_freeze_two_models_alternated_keep_their_graphs(snapshot_freezing):
    """Two models explained in turn with compile="freeze": each keeps its frozen gradient graph (one
    compile per model, none in the later rounds), the maps are the eager maps. A model under freezing
    holds three entries of the compiled models' cache (the plain compiled model, the frozen forward,
    the frozen gradient graph); the cache kept 4, so the second model's entries evicted the first's
    graphs and every call compiled its frozen graph again."""
    frozen, _, _ = snapshot_freezing
    models, x = (_with_statistics(ThreeConv()), _with_statistics(ThreeConv(6))), torch.rand(1, 3, 8, 8)
    refs = [salience.smoothgrad(m, x, [2], samples=6, chunk=6, reduce=None) for m in models]
    for _ in range(2):
        for m, ref in zip(models, refs):
            out = salience.smoothgrad(m, x, [2], samples=6, chunk=6, reduce=None, compile="freeze")
            assert _rel(out, ref) < 1e-6, _rel(out, ref)
    assert len(frozen) == 2, len(frozen)  # one gradient graph per model, kept


class _Outputs(nn.Module):
    """ThreeConv's scores returned in a dict (with a second tensor) or a Hugging Face ModelOutput."""

    def __init__(self, kind: str):
        super().__init__()
        self.net, self.kind = ThreeConv(), kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "dict":
            return {"logits": y, "double": y * 2}
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=y)


@pytest.mark.parametrize("kind", ["dict", "ModelOutput", "output='double'"])
def test_compile_freeze_gradient_graph_takes_the_scores_from_a_dict_or_model_output(snapshot_freezing, kind):
    """A model that returns a dict or a Hugging Face ModelOutput (or whose output= picks a part): the
    frozen gradient graph scores the tensor salience's rule of outputs takes (logits; the picked key),
    without a warning; the maps are the eager maps (the scores of the picked part: ``double`` is twice
    the logits, so its maps are twice the logits' maps), the model comes back as it was. Before, the
    graph scored the returned object itself: dynamo failed on it ("Unsupported method call" / "Observed
    exception"), a warning, and the passes ran the plain compiled model."""
    if kind == "ModelOutput":
        pytest.importorskip("transformers")
    from salience.loading import select_output

    frozen, calls, graphs = snapshot_freezing
    model = _Outputs("ModelOutput" if kind == "ModelOutput" else "dict")
    _with_statistics(model.net)
    x = torch.rand(2, 3, 8, 8)
    if kind.startswith("output="):
        select_output(model, "double")
    refs = _gradient_maps(model, x)
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = _gradient_maps(model, x, compile="freeze")
    assert len(frozen) == 1 and len(calls) >= 2 and graphs == []
    for out, ref in zip(outs, refs):
        assert _rel(out, ref) < 1e-6, _rel(out, ref)
    logits = _gradient_maps(model.net, x)
    for ref, lg in zip(refs, logits):  # the reference itself: the logits' maps, twice them for double
        assert _rel(ref, lg * (2 if kind.startswith("output=") else 1)) < 1e-6


def test_frozen_gradient_graph_takes_only_plain_class_targets():
    """The frozen gradient graph computes ``output.gather(1, classes)``: a target gives its classes
    (``classes_for``) only when that is exactly its score and its gradient is not modified."""
    from salience.targets import Classes, Predicted, regression

    assert Classes(2).classes_for(3).tolist() == [2, 2, 2]
    assert Classes([1, 0]).classes_for(2).tolist() == [1, 0] and Classes([1, 0]).classes_for(3) is None

    class Halved(Classes):
        def __call__(self, output):
            return super().__call__(output) / 2

    assert Halved(1).classes_for(2) is None and Predicted().classes_for(2) is None
    assert regression().classes_for(2) is None


def test_compile_freeze_gradient_graph_with_inductor(monkeypatch):
    """The real compiler: SmoothGrad's and IG's maps through inductor's frozen gradient graph are the
    eager maps within FREEZE_RTOL (measured 8e-8 and 1e-7), then, after an in-place change of the
    weights, the changed model's eager maps. With perf.weights_key returning one value for both states
    the second maps were the old graph's: 0.17 (SmoothGrad) and 0.067 (IG) of their largest value off."""
    torch.manual_seed(0)
    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)))
    x = torch.rand(2, 3, 8, 8)
    if _perf.compile_unavailable("inductor", x.device) is not None:
        pytest.skip("inductor cannot compile here")
    torch._dynamo.reset()
    compiles, real = [], _compiled_mod._freeze_compile
    monkeypatch.setattr(_compiled_mod, "_freeze_compile", lambda gm, inputs: compiles.append(1) or real(gm, inputs))
    monkeypatch.setattr(_perf, "FROZEN_TAILS", 0)  # the last, shorter chunks eager: one compile per state
    try:
        old = None
        for step in range(2):
            refs = _gradient_maps(model, x)
            with unchanged(model), warnings.catch_warnings():
                warnings.simplefilter("error")
                outs = _gradient_maps(model, x, compile="freeze")
            assert len(compiles) == step + 1  # one frozen gradient graph for both methods' chunks
            for out, ref in zip(outs, refs):
                assert _rel(out, ref) <= FREEZE_RTOL, (step, _rel(out, ref))
            if old is not None:  # the change is visible: the old maps are far from the new
                assert all(_rel(o, r) > 0.1 for o, r in zip(old, refs))
            old = refs
            with torch.no_grad():
                model[0].weight.mul_(-1.5)
    finally:
        torch._dynamo.reset()


def test_compile_freeze_later_calls_run_every_chunk_frozen(monkeypatch):
    """compile="freeze" with inductor: a call's first chunk (the memory probe, the softmax check) runs
    eagerly, and so the last, shorter one; a later call on the same model, input shape and method takes
    the first call's probe and softmax answer, so every chunk has the fixed size and runs the one frozen
    gradient graph (no graph compiled for another size); a last, shorter chunk whose size recurs runs
    frozen from its second call on (IG's tail of 2). The maps are the eager maps within FREEZE_RTOL.
    Before: the later call ran [eager 2, frozen 4, frozen 4, eager 2] as the first, and the tail
    always eagerly."""
    torch.manual_seed(0)
    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)))
    x = torch.rand(2, 3, 8, 8)
    if _perf.compile_unavailable("inductor", x.device) is not None:
        pytest.skip("inductor cannot compile here")
    torch._dynamo.reset()
    compiles, real = [], _compiled_mod._freeze_compile
    monkeypatch.setattr(_compiled_mod, "_freeze_compile", lambda gm, inputs: compiles.append(1) or real(gm, inputs))
    monkeypatch.setattr(_engine, "chunk_size", lambda per_item, budget, n: 4)  # 2 images: 2 copies a chunk
    layouts, accumulate = [], _engine.accumulate

    def seen(*a, **k):
        sums = accumulate(*a, **k)
        layouts.append((sums.chunks, sums.layouts))
        return sums

    monkeypatch.setattr(_engine, "accumulate", seen)
    try:
        refs = [salience.smoothgrad(model, x, [0, 2], samples=6, reduce=None),
                salience.integrated_gradients(model, x, [1, 3], steps=9, reduce=None)]
        layouts.clear()
        _perf.clear_cache()  # the eager calls' probes count too (the same record): forgotten
        for call in range(3):
            with unchanged(model), warnings.catch_warnings():
                warnings.simplefilter("error")
                outs = [salience.smoothgrad(model, x, [0, 2], samples=6, reduce=None, compile="freeze"),
                        salience.integrated_gradients(model, x, [1, 3], steps=9, reduce=None, compile="freeze")]
            for out, ref in zip(outs, refs):
                assert _rel(out, ref) <= FREEZE_RTOL, (call, _rel(out, ref))
        frozen = "contiguous compiled frozen"
        # SmoothGrad's 12 items: the first call's memory probe is a pass of its own (thrown away, session 45), then
        # 3 x 4 frozen, as in the later calls
        assert layouts[0] == ([4, 4, 4], [frozen] * 3)
        for sg in (layouts[2], layouts[4]):  # the later calls: 3 x 4, all frozen
            assert sg == ([4, 4, 4], [frozen] * 3), sg
        # IG's 18 items: 4 chunks of 4 frozen, the rest (2) eagerly the first time the tail size comes,
        # frozen (a graph of size 2) from its second time on (perf.FROZEN_TAILS); before, always eagerly
        # (session 45: the first call's probe a pass of its own, so the first call runs these chunks too)
        assert layouts[1] == ([4, 4, 4, 4, 2], [frozen] * 4 + ["contiguous"]), layouts[1]
        assert layouts[3] == layouts[5] == ([4, 4, 4, 4, 2], [frozen] * 5), (layouts[3], layouts[5])
        # one frozen gradient graph at the chunk size 4 for all the calls, one at IG's recurring tail;
        # SmoothGrad's tail of 2 (first call only) compiled nothing
        assert len(compiles) == 2
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- BatchNorm folded

# A folded convolution computes the same function with other roundings: on these small inputs the
# maps agree to about 5e-7 of their largest value (measured: resnet18 at 32 px 5.0e-7, the demo CNN
# 2.2e-7). A ReLU or max-pool input near a tie can flip side under rounding and move a pixel more
# (measured 1.9e-2 of the largest value on resnet18 at 96 px, 2.2e-3 in relative L2), as with
# channels-last: the real networks are held to CL_RTOL, the kink-free closed forms to 1e-5.
FOLD_RTOL = CL_RTOL


def _with_statistics(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are identities)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def test_folded_copy_is_the_closed_form_and_the_model_stays():
    """The copy's convolution is ``w * g / sqrt(v + eps)`` and ``(b - m) * g / sqrt(v + eps) + beta``
    (written here from the formula), it has no BatchNorm left, the copy runs the same function
    (the logits within float rounding), and the user's model is untouched."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(2, 3, 8, 8)
    with unchanged(model):
        folded, why = _perf.folded_model(model)
    assert folded is not None and why == ""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    conv, bn = model.body[0], model.body[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    torch.testing.assert_close(convs[0].weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(convs[0].bias, (conv.bias - bn.running_mean) * scale + bn.bias)
    assert not any(p.requires_grad for p in folded.parameters())
    with torch.no_grad():  # salience runs the model in eval mode (its guard), so the copy folds those statistics
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert _perf.folded_model(model)[0] is folded  # cached while the model does not change


def test_the_folded_copy_carries_no_hook_of_another_threads_pass():
    """The copy is made from a deep copy of the model: a hook another thread's pass holds on the model at that
    moment (salience's, scoped to that thread; own_hooks() saw none a moment before) came along and fired in
    this thread's passes of the copy. The copy's modules have no hooks."""
    from salience._core import folding
    from salience._core.autograd import this_thread

    model = _with_statistics(ThreeConv())
    fired = []
    box = []
    other = threading.Thread(target=lambda: box.append(
        model.body[0].register_forward_hook(this_thread(lambda m, i, o: fired.append(1)))))
    other.start()
    other.join()
    try:
        made = folding._fold(model)
    finally:
        box[0].remove()
    assert not isinstance(made, str), made
    assert not any(m._forward_hooks for m in made.modules())
    with torch.no_grad():
        made(torch.rand(1, 3, 8, 8))
    assert fired == []


def test_fold_batchnorm_gives_the_maps_and_runs_folded():
    model = _with_statistics(ThreeConv())
    x = torch.rand(3, 3, 8, 8)
    for mname, fn in _methods():
        ref = fn(model, x)
        with unchanged(model), salience.performance(fold_batchnorm=True):
            out = fn(model, x)
        assert _rel(out, ref) < 1e-5, (mname, _rel(out, ref))
    run = _perf.Run(model, x, _perf.Performance(fold_batchnorm=True), tag="f")
    sums = _engine.accumulate(lambda s, e: salience.vanilla(model, torch.rand(e - s, 3, 8, 8), 0, reduce=None),
                              6, 3, chunk=3, run=run)
    # the first chunk runs the model itself (it checks for a final softmax to strip), then folded
    assert sums.layouts == ["contiguous", "contiguous folded"]
    for name, net, xx in _models():
        if name not in ("resnet18", "shapes"):
            continue
        for mname, fn in _methods():
            ref = fn(net, xx)
            with salience.performance(fold_batchnorm=True), unchanged(net):
                out = fn(net, xx)
            assert _rel(out, ref) <= FOLD_RTOL, (name, mname, _rel(out, ref))


def test_fold_batchnorm_follows_changed_weights():
    """The copy is made again when the model's parameters or buffers change (in place or replaced),
    so a randomisation test never explains stale weights."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(2, 3, 8, 8)
    first, _ = _perf.folded_model(model)
    with torch.no_grad():
        model.body[3].weight.mul_(-2.0)
    with salience.performance(fold_batchnorm=True):
        out = salience.smoothgrad(model, x, samples=2)
    assert _rel(out, salience.smoothgrad(model, x, samples=2)) < 1e-5
    second, _ = _perf.folded_model(model)
    assert second is not first
    model.body[1].running_var.data = model.body[1].running_var.data * 4.0
    with salience.performance(fold_batchnorm=True):
        out = salience.smoothgrad(model, x, samples=2)
    assert _rel(out, salience.smoothgrad(model, x, samples=2)) < 1e-5
    assert _perf.folded_model(model)[0] is not second


def test_a_hook_added_after_folding_or_compiling_is_run():
    """A hook the user adds after a run made the folded copy, or compiled the model, changes the
    model's function: the next run with the same options gives the eager maps with the hook, with a
    warning, and after the hook is removed the copy and the graph serve again. The folded copy was
    cached by the weights only, and dynamo does not guard on module hooks (even a fresh
    ``torch.compile`` of the model reuses its graph), so both silently ran without the hook."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(2, 3, 8, 8)
    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    for opts in (dict(fold_batchnorm=True), dict(compile=backend, memory_format="contiguous")):
        with salience.performance(**opts):
            salience.smoothgrad(model, x, samples=4, chunk=2)  # the copy / the graph, made without the hook
        handle = model.body[2].register_forward_hook(lambda m, i, o: o * 3)
        ref = salience.smoothgrad(model, x, samples=4, chunk=2)
        with pytest.warns(UserWarning, match="hooks of its own"), salience.performance(**opts):
            out = salience.smoothgrad(model, x, samples=4, chunk=2)
        assert torch.equal(out, ref), opts
        handle.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with salience.performance(**opts):
                out = salience.smoothgrad(model, x, samples=4, chunk=2)
        assert _rel(out, salience.smoothgrad(model, x, samples=4, chunk=2)) < 1e-5, opts
    assert compiles


class _Branchy(ThreeConv):
    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.head(h.mean((2, 3)))


def test_fold_batchnorm_declines_with_a_reason_and_runs_the_model():
    x = torch.rand(2, 3, 8, 8)
    hooked = _with_statistics(ThreeConv())
    hooked.body[2].register_forward_hook(lambda m, i, o: o * 0.5)
    plain_cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3))
    scripted = torch.jit.script(_with_statistics(ThreeConv()))
    cases = [(hooked, "hooks of its own"), (plain_cnn, "no BatchNorm layer"),
             (_with_statistics(_Branchy()), "torch.fx cannot trace"), (scripted, "TorchScript")]
    for model, why in cases:
        ref = salience.smoothgrad(model, x, samples=2)
        with warnings.catch_warnings(record=True) as caught, salience.performance(fold_batchnorm=True):
            warnings.simplefilter("always")
            out = salience.smoothgrad(model, x, samples=2)
        assert any(str(w.message).startswith("fold_batchnorm: ") and why in str(w.message) for w in caught), \
            (why, [str(w.message) for w in caught])
        assert torch.equal(out, ref), why  # the model itself ran


def test_fold_batchnorm_only_for_plain_passes():
    """Grad-CAM (a layer hooked) and guided backprop (a backprop rule) run the model itself, bit for
    bit; a folded copy that fails at run time falls back to the model with a warning."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(2, 3, 8, 8)
    ref_cam = salience.gradcam(model, x, layer="body.3")
    ref_guided = salience.guided_backprop(model, x)
    with salience.performance(fold_batchnorm=True), unchanged(model):
        assert torch.equal(salience.gradcam(model, x, layer="body.3"), ref_cam)
        assert torch.equal(salience.guided_backprop(model, x), ref_guided)
    folded, _ = _perf.folded_model(model)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in the copy")

    folded.forward = broken
    ref = salience.smoothgrad(model, x, samples=4, chunk=2)
    with pytest.warns(UserWarning, match="fold_batchnorm: the folded copy failed.*running the model as it is"), \
            salience.performance(fold_batchnorm=True), unchanged(model):
        out = salience.smoothgrad(model, x, samples=4, chunk=2)
    assert torch.equal(out, ref)
    assert _perf.folded_model(model)[0] is None  # remembered: not tried again for this model


def test_fold_batchnorm_compiles_the_folded_copy():
    """With compile, the graph compiled is the folded one: no batch_norm operator in it."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(3, 3, 8, 8)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    ref = salience.smoothgrad(model, x, samples=6, chunk=6)
    with unchanged(model), salience.performance(memory_format="contiguous", fold_batchnorm=True):
        out = salience.smoothgrad(model, x, samples=6, chunk=6, compile=backend)
    assert _rel(out, ref) < 1e-5
    assert len(graphs) == 1
    ops = " ".join(str(n.target) for n in graphs[0].graph.nodes)
    assert "conv" in ops and "batch_norm" not in ops, ops


# --------------------------------------------------------------------------- one-pass methods


class _BatchNormOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the batch-norm operators that run (forward or backward) while the mode is active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += "batch_norm" in str(func)
        return func(*args, **(kwargs or {}))


def test_one_pass_methods_run_under_the_options_in_force():
    """salience.vanilla and input x gradient under salience.performance(fold_batchnorm=True): the
    first call runs the model (it finds whether a final softmax is to be stripped; remembered for
    the model), the later ones the folded copy: no batch-norm operator runs. The maps are within
    the documented tolerance; with the defaults nothing changes (the same bits); a ruled pass
    (guided backprop) and a pass inside a many-pass run keep their own ways; channels-last runs
    with the model's strides put back. Before, the options did not reach these methods."""
    model = _with_statistics(ThreeConv())
    x = torch.rand(3, 3, 8, 8)
    ref = salience.vanilla(model, x)
    ref_ixg = salience.input_x_gradient(model, x)
    assert torch.equal(salience.vanilla(model, x), ref)  # the defaults: the model itself, bit for bit
    with unchanged(model), salience.performance(fold_batchnorm=True):
        first = salience.vanilla(model, x)
        with _BatchNormOps() as ops:
            again, ixg, short = salience.vanilla(model, x), salience.input_x_gradient(model, x), \
                salience.vanilla(model, x[:1])
        with _BatchNormOps() as ruled:
            salience.guided_backprop(model, x)
    assert ops.n == 0 and ruled.n > 0
    for out, want in ((first, ref), (again, ref), (ixg, ref_ixg), (short, ref[:1])):
        assert _rel(out, want) < FOLD_RTOL
    assert not torch.equal(again, ref)  # another way to (nearly) the same map
    with unchanged(model), salience.performance(memory_format="channels_last"):
        cl = salience.vanilla(model, x)
    assert _rel(cl, ref) < CL_RTOL


def test_one_pass_compiles_once_for_a_dataset_run(tmp_path, monkeypatch):
    """compile= in a dataset run: the vanilla input gradient of every full batch runs one compiled
    graph (compiled once, for the run's batch size), the first batch runs the model (the softmax
    check), the last, shorter one eagerly (no recompile); the prediction is read from the method's
    pass (compiled or not: no prediction pass of its own); the maps and predictions are the default run's."""
    from conftest import SmallCNN

    from salience.runs import job


    # Dynamo's caches first: the code object SmallCNN.forward, shared by every instance, is recompiled by
    # the tests before this one (strides of channels-last, autocast, shapes: TORCH_LOGS=recompiles), and
    # after its 8th recompile dynamo logs "hit config.recompile_limit (8)" once and runs it eagerly for
    # the rest of the process: the counting backend was never called in the full suite.
    torch._dynamo.reset()
    model, ds = SmallCNN().eval(), RandomImages(7)
    compiles, ran, own_passes = [], [], []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    kw = dict(batch_size=2, shard_size=8, workers=0, map_dtype="float32")
    ref = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "ref", **kw)
    orig = _perf.Run.ran
    monkeypatch.setattr(_perf.Run, "ran", lambda self, fn: (ran.append(self.compiling), orig(self, fn))[1])
    outputs = job._outputs
    monkeypatch.setattr(job, "_outputs", lambda m, x: (own_passes.append(x.shape[0]), outputs(m, x))[1])
    with unchanged(model):
        fast = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "fast", compile=backend, **kw)
    assert len(compiles) == 1 and ran == [True, True]  # batches 2 and 3 of 2, 2, 2, 1
    assert own_passes == []  # every prediction read from the method's pass, the compiled ones too
    for i in range(7):
        np.testing.assert_allclose(fast.map(i, "vanilla"), ref.map(i, "vanilla"), rtol=1e-5, atol=1e-7)
    assert fast.table.column("predicted").to_pylist() == ref.table.column("predicted").to_pylist()


class _Times(nn.Module):
    """A layer without parameters: scales its input."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, h):
        return h * self.k


def _hand_vanilla(f, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``max_c |d f(x)[b, target_b] / dx|``: vanilla's map written out with torch.autograd."""
    xx = x.clone().requires_grad_(True)
    out = f(xx)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
    return g.abs().amax(1)


def _changes():
    """``(what, change(model) -> the changed model's pre-softmax function)``: a final softmax appended
    in place, a conv weight scaled in place, a ReLU replaced by a Tanh, a parameter-free layer appended."""
    def softmax(m):
        head = m.head
        m.head = nn.Sequential(head, nn.Softmax(1))
        return lambda x: head(m.body(x).mean((2, 3)))

    def weight(m):
        with torch.no_grad():
            m.body[3].weight.mul_(2)
        return m

    def swap(m):
        m.body[4] = nn.Tanh()
        return m

    def scaled(m):
        m.head = nn.Sequential(m.head, _Times(3.0))
        return m

    return [("softmax", softmax), ("weight", weight), ("swap", swap), ("scaled", scaled)]


@pytest.mark.parametrize("what,change", _changes(), ids=[w for w, _ in _changes()])
def test_one_pass_follows_a_model_changed_after_its_first_call(what, change):
    """A model changed after a first one-pass call under the fast options (a final softmax appended
    in place, a weight changed in place, a submodule replaced, a layer appended): the next call gives
    the plain eager map of the changed model (checked by hand with torch.autograd on its pre-softmax
    function). Before, what the first call learned was kept per model until ``clear_cache()``:
    whether the model ends in a softmax (a compiled graph then ran the appended softmax: the
    gradient of a probability) and the folded copy (made again only when a weight changed: a
    replaced ReLU or an appended layer was not seen)."""
    x = torch.rand(3, 3, 8, 8)

    def backend(gm, inputs):
        return gm.forward

    for opts in (dict(fold_batchnorm=True), dict(compile=backend), dict(compile=backend, fold_batchnorm=True)):
        torch.manual_seed(0)
        model = _with_statistics(ThreeConv()).eval()  # eval: the hand check's BatchNorm as salience runs it
        with salience.performance(**opts):
            salience.vanilla(model, x)  # finds no softmax, makes the copy
            salience.vanilla(model, x.clone())  # runs it; a second input of its size: compiles the graph
        f = change(model)
        target = f(x).argmax(1)
        ref = salience.vanilla(model, x, target)  # the defaults: the changed model itself
        hand = _hand_vanilla(f, x, target)
        assert _rel(ref, hand) < 1e-5, what
        with salience.performance(**opts), unchanged(model):
            out = salience.vanilla(model, x, target)
            again = salience.vanilla(model, x, target)
        assert _rel(out, ref) < FOLD_RTOL and _rel(again, ref) < FOLD_RTOL, (what, opts, _rel(out, ref))
        _perf.clear_cache()


def test_the_structure_fingerprint_sees_modules_forwards_and_hooks_but_not_observers():
    """``perf.structure`` changes with a replaced module, an appended one, a ``forward`` set on an
    instance and a hook of the user's, and is back when the hook is removed; an observer hook (a
    dataset run adds one per batch) and a changed weight leave it as it was."""
    model = ThreeConv()
    base = _perf.structure(model)
    handle = model.body[2].register_forward_hook(_perf.observer(lambda m, i, o: None))
    assert _perf.structure(model) == base
    handle.remove()
    with torch.no_grad():
        model.body[0].weight.mul_(2)
    assert _perf.structure(model) == base
    handle = model.body[2].register_forward_pre_hook(lambda m, i: None)
    assert _perf.structure(model) != base
    handle.remove()
    assert _perf.structure(model) == base
    model.body[4].forward = lambda h: h * 2
    assert _perf.structure(model) != base
    del model.body[4].forward
    assert _perf.structure(model) == base
    model.body[4] = nn.ReLU()
    assert _perf.structure(model) != base
    model.head = nn.Sequential(model.head, nn.Softmax(1))
    assert _perf.structure(model) != base


@pytest.mark.parametrize("mode", [{"top": 2}, {"target": 1}, {"labels": [0, 1, 2, 3, None, 1, 2]}],
                         ids=["top", "target", "label"])
def test_a_dataset_runs_prediction_pass_shares_the_gradient_passes_graph(tmp_path, mode):
    """compile= in a dataset run whose targets come from a prediction pass of their own (``top``,
    ``target``, ``label``): that pass runs the compiled model as the gradient passes do (gradients on,
    the input requiring them, the output detached), so the run compiles one graph, not a no-grad one
    for the predictions and another for vanilla's input gradients. Counted by a backend that counts
    the graphs it is given (dynamo hands a backend each graph it compiles, once). The maps and
    predictions are the default run's."""
    from conftest import SmallCNN


    torch._dynamo.reset()  # SmallCNN.forward's code object: earlier tests' graphs count to its recompile limit
    model, ds = SmallCNN().eval(), RandomImages(7)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    kw = dict(batch_size=2, shard_size=8, workers=0, map_dtype="float32", **mode)
    ref = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "ref", **kw)
    with unchanged(model):
        fast = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "fast", compile=backend, **kw)
    assert len(graphs) == 1, [str(g.graph)[:200] for g in graphs]
    for i in range(7):
        np.testing.assert_allclose(fast.map(i, "vanilla"), ref.map(i, "vanilla"), rtol=1e-5, atol=1e-7)
    for col in ("predicted", "targets"):
        assert fast.table.column(col).to_pylist() == ref.table.column(col).to_pylist()
    np.testing.assert_allclose(fast.table.column("probability").to_pylist(),
                               ref.table.column("probability").to_pylist(), rtol=1e-5)


def test_a_dataset_run_that_chooses_its_batch_size_compiles_for_it(tmp_path):
    """compile= in a dataset run without ``batch_size``: the batch size is chosen by a one-image
    memory probe (``job.choose_batch``), which ran under the run's options and so made 1 the model's
    compiled size (``perf.one_pass`` compiles for the batch size of the first call): no real batch was
    of that size, every batch ran eagerly and nothing was compiled (20 images, shards of 8, top 2:
    0 graphs). Now the probe runs with the default options: one graph, for the chosen size (8), run
    by the second full batch's prediction pass and input gradients (a size runs compiled from its
    second call on; the last, shorter batch runs eagerly), and the maps and probabilities are the
    eager run's."""
    from conftest import SmallCNN


    torch._dynamo.reset()  # SmallCNN.forward's code object: earlier tests' graphs count to its recompile limit
    model, ds = SmallCNN().eval(), RandomImages(20)
    backend, graphs, calls = counting_backend()
    kw = dict(shard_size=8, workers=0, map_dtype="float32", top=2)
    ref = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "ref", **kw)
    with unchanged(model):
        fast = salience.explain_dataset(model, ds, ["vanilla"], tmp_path / "fast", compile=backend, **kw)
    import json

    batch = json.loads((tmp_path / "fast" / "run.json").read_text())["batch"]
    assert batch == json.loads((tmp_path / "ref" / "run.json").read_text())["batch"] == 8
    assert graphs == [[batch]]
    assert len(calls) == 2, len(calls)  # the second full batch's prediction pass and input gradients
    for i in range(20):
        np.testing.assert_allclose(fast.map(i, "vanilla"), ref.map(i, "vanilla"), rtol=1e-5, atol=1e-7)
    assert fast.table.column("targets").to_pylist() == ref.table.column("targets").to_pylist()
    np.testing.assert_allclose(fast.table.column("probability").to_pylist(),
                               ref.table.column("probability").to_pylist(), rtol=1e-5)


def test_the_batch_size_probe_is_the_same_under_every_performance_option():
    """``job.choose_batch`` measures one image's peak memory through the first method. Under the
    run's options the probe counted one-time costs as the image's: the folded copy's weights (made in
    the probe), the parameters converted to channels-last, the autocast's bf16 copies of the weights;
    a model whose weights outweigh one image's activations got a batch size several times smaller
    (here 2083 / 2135 / 4256 images instead of 8617 with fold_batchnorm / channels-last / bf16), and
    each option left the compiled size 1 in the model's records. It now measures with the default options (a pass in fp32, the
    model as it is: the conservative measure), so the size is the same under every option, and it
    leaves no record for the run (a compiled size, a softmax found)."""
    from salience.runs import job
    from salience.runs.sources import Item

    model = ThreeConv(width=64).eval()
    item = Item(0, torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), 8, 8, None, None, None)
    plan = job.Plan({"vanilla": salience.vanilla}, None, ["a"], mode="top", k=2)
    base = job.choose_batch(model, item, plan, 10 ** 9)
    backend, graphs, _ = counting_backend()
    for options in (dict(fold_batchnorm=True), dict(memory_format="channels_last"), dict(precision="bf16"),
                    dict(compile=backend), dict(compile=backend, fold_batchnorm=True, memory_format="channels_last")):
        _perf.clear_cache()
        with warnings.catch_warnings(), unchanged(model):
            warnings.simplefilter("ignore")  # bf16 autocast on a CPU
            with salience.performance(**options):
                assert job.choose_batch(model, item, plan, 10 ** 9) == base, options
        assert not _perf._records, options
    assert graphs == []


def test_the_batch_size_probe_ignores_a_methods_own_performance_keywords():
    """The probe of ``job.choose_batch`` ran under the default options of the run, but a method's own
    keywords (``method_options={"smoothgrad": {"compile": ...}}`` of a dataset run, a
    ``functools.partial``) come over the settings in force, so they still reached it: ``compile``
    left the probe's compiled model in the process's cache, channels-last gave 1692 images instead of
    4206 (the parameters' conversion counted as the image's), bf16 3335 (the weights' copies). Now the probe
    runs under ``perf.plain()``: the same batch size under each keyword, nothing compiled. The
    keywords that set the work or its memory (``samples``, ``chunk``) still reach it, as they reach
    the batches."""
    import functools

    from salience.runs import job
    from salience.runs.sources import Item

    model = ThreeConv(width=64).eval()
    item = Item(0, torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), 8, 8, None, None, None)

    def chosen(fn):
        return job.choose_batch(model, item, job.Plan({"smoothgrad": fn}, None, ["a"], mode="top", k=2), 10 ** 9)

    smooth = functools.partial(salience.smoothgrad, samples=6, chunk=2)
    base = chosen(smooth)
    backend, graphs, calls = counting_backend()
    for options in (dict(compile=backend), dict(memory_format="channels_last"), dict(precision="bf16")):
        _perf.clear_cache()
        with warnings.catch_warnings(), unchanged(model):
            warnings.simplefilter("ignore")  # bf16 autocast on a CPU
            assert chosen(functools.partial(smooth, **options)) == base, options
        assert not _perf._compiled, options
    assert graphs == [] and calls == []
    assert chosen(functools.partial(smooth, chunk=1)) > base  # a smaller chunk: less memory per image
    with _perf.plain(), pytest.raises(SalienceError, match="precision"):
        salience.smoothgrad(model, item.x[None], samples=2, precision="int8")  # checked all the same


def test_one_pass_compiles_the_size_that_recurs_not_the_first_calls():
    """compile= on the one-pass methods: the batch size of the first call was the one compiled size
    for the process, so one image tried first (a probe, a notebook's first look) left every later
    batch of 8 eager, without a word (0 graphs). Now a size is compiled when it is seen the second
    time: after ``vanilla`` on 1 image, calls on batches of 8 build one graph, for 8, at the second
    such call, and run it at every call from then on; each map is the eager one's."""
    from conftest import SmallCNN

    torch._dynamo.reset()  # SmallCNN.forward's code object: earlier tests' graphs count to its recompile limit
    model = SmallCNN().eval()
    backend, graphs, calls = counting_backend()
    gen = torch.Generator().manual_seed(0)
    one, xs = torch.randn(1, 3, 8, 8, generator=gen), [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(4)]
    refs = [salience.vanilla(model, x) for x in xs]
    with unchanged(model), salience.performance(compile=backend):
        salience.vanilla(model, one)
        outs = [salience.vanilla(model, x) for x in xs]
    assert graphs == [[8]]
    assert len(calls) == 3  # the second, third and fourth calls of 8 (the first is eager: seen once)
    for out, ref in zip(outs, refs):
        assert _rel(out, ref) < 1e-5
    torch._dynamo.reset()


def test_a_dataset_run_after_a_one_image_call_compiles_its_batch_size(tmp_path):
    """``vanilla`` on one image under ``compile=``, then a dataset run of vanilla and input x gradient
    with ``compile=`` and batches of 8 on the same model: the one image made 1 the model's compiled
    size, and every batch of the run ran eagerly (0 graphs). Now the run's batch size is compiled at
    its second batch and run by both methods of every full batch from then on (28 images: 8, 8, 8,
    4; the first batch and the last, shorter one eager: one graph, four calls). The two methods'
    calls on one batch count as one input of its size, so the last batch is not compiled (a graph of
    its own, for one batch). The maps and predictions are the eager run's."""
    from conftest import SmallCNN


    torch._dynamo.reset()
    model, ds = SmallCNN().eval(), RandomImages(28)
    backend, graphs, calls = counting_backend()
    kw = dict(batch_size=8, shard_size=8, workers=0, map_dtype="float32")
    methods = ["vanilla", "input_x_gradient"]
    ref = salience.explain_dataset(model, ds, methods, tmp_path / "ref", **kw)
    with unchanged(model):
        with salience.performance(compile=backend):
            salience.vanilla(model, ds.x[:1])
        fast = salience.explain_dataset(model, ds, methods, tmp_path / "fast", compile=backend, **kw)
    assert graphs == [[8]]
    assert len(calls) == 4  # both methods of the second and third batches
    for i in range(28):
        for name in methods:
            np.testing.assert_allclose(fast.map(i, name), ref.map(i, name), rtol=1e-5, atol=1e-7)
    assert fast.table.column("predicted").to_pylist() == ref.table.column("predicted").to_pylist()
    torch._dynamo.reset()


def test_one_pass_compiles_at_most_two_sizes_and_says_which_when_it_refuses_one():
    """Sizes 1, 2 and 3 in turn, three times each, under ``compile=``: each recurs, but at most
    :data:`perf.ONE_PASS_SIZES` (2) are compiled per model and input shape (every size is a graph of
    the model class's ``forward``, and dynamo compiles one code object at most 8 times); 1 and 2, at
    their second calls, and 3 runs eagerly with one warning naming the sizes compiled. No more
    graphs than that, and every map is the eager one's."""
    torch._dynamo.reset()
    model = ThreeConv()
    backend, graphs, calls = counting_backend()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(n, 3, 8, 8, generator=gen) for _ in range(3) for n in (1, 2, 3)]
    refs = [salience.vanilla(model, x) for x in xs]
    with unchanged(model), salience.performance(compile=backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [salience.vanilla(model, x) for x in xs]
    assert graphs == [[1], [2]]
    assert _perf.ONE_PASS_SIZES == 2
    assert len(calls) == 4  # 1 and 2 at their second and third calls
    said = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(said) == 1 and "batch size 3" in said[0] and "1, 2" in said[0], said
    for out, ref in zip(outs, refs):
        assert _rel(out, ref) < 1e-5
    torch._dynamo.reset()


# --------------------------------------------------------------------------- CUDA (run where a GPU is lent)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_layouts():
    """Channels-last and ``auto`` on the GPU: the contiguous maps within CL_RTOL in full float32 (with
    TF32, cuDNN's default, the two layouts' kernels round differently: 2.2e-2 measured on the H200);
    the precisions are tested in tests/test_cuda.py."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda")
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = salience.smoothgrad(model, x, samples=8, memory_format="contiguous")
        with unchanged(model):
            for mf in ("channels_last", "auto"):
                assert _rel(salience.smoothgrad(model, x, samples=8, memory_format=mf), ref) <= CL_RTOL
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@cuda
def test_cuda_compile_matches_eager():
    model = ThreeConv().cuda()
    x = torch.rand(2, 3, 16, 16, device="cuda")
    ref = salience.integrated_gradients(model, x, steps=8, chunk=4)
    with unchanged(model):
        out = salience.integrated_gradients(model, x, steps=8, chunk=4, compile=True)
    assert _rel(out, ref) < 1e-4


def test_a_compiled_run_past_dynamos_recompile_limit_says_so_and_runs_eagerly():
    """Dynamo compiles a code object at most ``recompile_limit`` times (8), shared by every instance of
    a model class; past it, by default, it logs one line and runs the function eagerly for the rest
    of the process: ``compile=True`` then compiled nothing without a word (a test of this file met
    it in the full suite). Now the run warns, falls back to eager (the same maps) and stops asking."""
    torch._dynamo.reset()
    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        pytest.skip("this torch has no fail_on_recompile_limit_hit")
    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    model = ThreeConv()
    with torch._dynamo.config.patch(recompile_limit=1), salience.performance(memory_format="contiguous"):
        a = torch.rand(2, 3, 8, 8)
        salience.smoothgrad(model, a, samples=6, chunk=2, compile=backend)  # one graph: (2, 3, 8, 8)
        b = torch.rand(2, 3, 12, 12)  # another shape: a recompile, past the limit of 1
        with unchanged(model), pytest.warns(UserWarning, match="compile: torch.compile failed.*recompile.*eagerly"):
            out = salience.smoothgrad(model, b, samples=6, chunk=2, compile=backend)
    assert len(compiles) == 1
    assert _rel(out, salience.smoothgrad(model, b, samples=6, chunk=2)) < 1e-6
    torch._dynamo.reset()
