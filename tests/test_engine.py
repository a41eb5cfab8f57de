"""The engine: memory probe, chunk choice, running sums, several targets from one forward."""
from __future__ import annotations

import pytest
import torch

import salience
from salience import SalienceError
from salience._core import engine as _engine
from salience.targets import Classes, Predicted

from conftest import instances_made


def test_memory_probe_counts_live_tensors_exactly():
    ext = torch.zeros(1000)
    with _engine.MemoryProbe() as probe:
        a = torch.empty(1000)          # 4000 B
        b = torch.empty(2000)          # +8000 -> 12000
        view = ext.view(10, 100)       # a view of an outside tensor: not counted
        del a
        c = torch.empty(500)           # a freed: 8000 + 2000
        d = ext + 1                    # +4000 -> 14000 (peak)
        e = d.view(-1)                 # view of a counted tensor: not again
    assert probe.peak == 14000
    assert probe.current == 14000
    del b, c, d, e, view


def test_memory_probe_sees_the_backward_pass():
    x = torch.randn(4, 100, requires_grad=True)
    w = torch.randn(100, 100)
    with _engine.MemoryProbe() as fwd_only:
        (x @ w).tanh().sum()
    with _engine.MemoryProbe() as both:
        y = (x @ w).tanh().sum()
        torch.autograd.grad(y, x)
    assert both.peak > fwd_only.peak


def test_chunk_follows_the_budget():
    per_item = 4 * 1000
    seen = []

    def compute(start, stop):
        seen.append(stop - start)
        return torch.ones(stop - start, 1000)

    budget = 50 * per_item
    sums = _engine.accumulate(compute, 50, 2, max_memory=budget)
    assert sums.chunks[0] == 2  # the probe: one item per image
    # the map (4 kB per item) and the float64 copies the sums make of it (8 kB + 8 kB)
    assert sums.per_item_bytes is not None and 5 * per_item <= sums.per_item_bytes <= 6 * per_item
    fits = int(0.8 * budget) // sums.per_item_bytes
    assert fits >= 2 and max(sums.chunks[1:]) == fits - fits % 2  # whole copies of the 2-image batch
    assert sum(sums.chunks) == 50 and all(c % 2 == 0 for c in sums.chunks)
    assert seen == sums.chunks
    torch.testing.assert_close(sums.total, torch.full((2, 1000), 25.0, dtype=torch.float64))
    fixed = _engine.accumulate(compute, 50, 2, chunk=7)
    assert fixed.chunks == [7] * 7 + [1] and fixed.per_item_bytes is None


def test_weighted_sums_and_squares():
    vals = torch.arange(12, dtype=torch.float32).view(12, 1)  # item j has value j
    sums = _engine.accumulate(lambda s, e: vals[s:e], 12, 3, weights=[1.0, 2.0, 0.5, 0.0], squares=True, chunk=5)
    j = torch.arange(12, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=torch.float64)[j.long() // 3]
    exp = torch.zeros(3, dtype=torch.float64).index_add_(0, j.long() % 3, w * j)
    exp2 = torch.zeros(3, dtype=torch.float64).index_add_(0, j.long() % 3, w * j * j)
    torch.testing.assert_close(sums.total[:, 0], exp)
    torch.testing.assert_close(sums.squares[:, 0], exp2)


def test_peak_memory_flat_as_samples_grow(small_cnn, monkeypatch):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    budget = 100 << 10
    for run in (lambda n: salience.smoothgrad(small_cnn, x, samples=n, max_memory=budget),
                lambda n: salience.integrated_gradients(small_cnn, x, steps=n, max_memory=budget)):
        peaks = []
        for n in (16, 64):
            with _engine.MemoryProbe() as probe:
                run(n)
            peaks.append(probe.peak)
        assert peaks[1] <= peaks[0] * 1.05, peaks
        assert peaks[1] <= budget, peaks  # the whole call, sums included, stays within the budget
    # and the budget is what bounds it: a larger one gives larger chunks (when chunks are sized by
    # memory; by default the engine takes a bigger chunk only when it is faster per item)
    # (on a CPU a gradient pass takes at most CPU_GRADIENT_CHUNK items, whatever the budget: lifted here)
    monkeypatch.setattr(_engine, "CPU_GRADIENT_CHUNK", 1 << 30)
    with _engine.MemoryProbe() as big, salience.performance(chunks="memory"):
        salience.smoothgrad(small_cnn, x, samples=64, max_memory="1MiB")
    assert big.peak > 2 * budget


def test_input_gradients_one_forward_for_k_targets(small_cnn):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []
    h = small_cnn.register_forward_hook(lambda *a: calls.append(1))
    try:
        grads, scores, out = _engine.input_gradients(small_cnn, x, [Classes(0), Classes(torch.tensor([1, 2, 3])),
                                                                    salience.targets.regression(2, "decrease")])
    finally:
        h.remove()
    assert len(calls) == 1 and grads.shape == (3, 3, 3, 8, 8) and scores.shape == (3, 3)
    for k, t in enumerate([0, [1, 2, 3], salience.targets.regression(2, "decrease")]):
        torch.testing.assert_close(grads[k], salience.vanilla(small_cnn, x, t, reduce=None))
    torch.testing.assert_close(scores[2], -out[:, 2])


def test_split_and_resolve_targets(small_cnn):
    ts, multi = salience.targets.split(torch.tensor([[1, 2], [3, 0]]))
    assert multi and [t.index.tolist() for t in ts] == [[1, 3], [2, 0]]
    ts, multi = salience.targets.split([[1, 2], [3, 0]])
    assert multi and len(ts) == 2
    ts, multi = salience.targets.split([1, 2])  # one class per image
    assert not multi and ts[0].index.tolist() == [1, 2]
    ts, multi = salience.targets.split([None, 2])
    assert multi and isinstance(ts[0], Predicted)
    with pytest.raises(SalienceError, match="integer class indices"):
        salience.targets.split(torch.zeros(2, 2))
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        pred = small_cnn.eval()(x).argmax(1)
    (r,) = salience.targets.resolve([Predicted()], small_cnn, x)
    assert r.index.tolist() == pred.tolist()
    owner = torch.tensor([1, 1, 0])
    assert r.for_items(owner).index.tolist() == pred[owner].tolist()


@pytest.mark.parametrize("text, value", [("2GiB", 2 << 30), ("500MB", 500_000_000), ("1.5k", 1500), ("64", 64)])
def test_parse_memory(text, value):
    assert _engine.check_memory_options(None, text) == value


def test_default_budget_is_capped():
    b = _engine.default_budget(torch.device("cpu"))
    assert 0 < b <= 1 << 30


def test_gradient_free_chunks_on_cpu_stay_small():
    """Gradient-free passes on a CPU get CPU_INFERENCE_BUDGET (passes of a few hundred MB run slower
    per image: the numbers are in the constant's comment); gradient passes keep the larger budget."""
    per_item = 4 << 20  # 4 MiB maps: the float64 sums make it about 20 MiB per item

    def compute(start, stop):
        return torch.ones(stop - start, per_item // 4)

    quick = _engine.accumulate(compute, 40, 1, inference=True)
    fits = int(0.8 * _engine.CPU_INFERENCE_BUDGET) // quick.per_item_bytes
    assert fits >= 1 and max(quick.chunks[1:]) == fits
    slow = _engine.accumulate(compute, 40, 1)
    assert max(slow.chunks[1:]) == min(39, int(0.8 * _engine.default_budget(torch.device("cpu"))) // slow.per_item_bytes)
    given = _engine.accumulate(compute, 40, 1, inference=True, max_memory=1 << 30)
    assert max(given.chunks[1:]) > fits  # a budget the caller gives wins


def test_a_later_call_reuses_the_memory_probe_with_the_same_chunks_and_bits(small_cnn, monkeypatch):
    """The memory probe (a dispatch mode over every operator of a pass of one item per image) runs once per model,
    items and number of images: a pass of its own, thrown away (session 45), then the call's chunks; a later call
    runs the same chunks without the probe, so its bits are those of the call that probed. Another number of
    images, or a module of the model replaced, probes again."""
    made = instances_made(monkeypatch, _engine, "MemoryProbe")
    small_cnn.eval()
    x = torch.rand(2, 3, 8, 8)
    sizes = []
    handle = small_cnn.features[0].register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    try:
        first = salience.smoothgrad(small_cnn, x, 1, samples=6, max_memory=8 << 20)
        probes, chunks = len(made), list(sizes)
        again = salience.smoothgrad(small_cnn, x, 1, samples=6, max_memory=8 << 20)
        # the first call: the probe's pass (2 items, thrown away), then its chunks; the next: the same chunks, no probe
        assert len(made) == probes == 1 and chunks[0] == 2 and sizes[len(chunks):] == chunks[1:]
        assert torch.equal(first, again)
        salience.smoothgrad(small_cnn, x[:1], 1, samples=6, max_memory=8 << 20)
        assert len(made) == 2  # one image: its own probe
        small_cnn.drop = torch.nn.Dropout(0.1)  # the structure changed: measured again
        salience.smoothgrad(small_cnn, x, 1, samples=6, max_memory=8 << 20)
        assert len(made) == 3
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_the_memory_probe_of_one_target_is_not_reused_for_many(method, monkeypatch):
    """K targets walk K backward passes and keep K gradients per item: the bytes per item grow about K-fold. A call
    of 20 targets after one of 1 (the same model, images and options) measures its own, so its chunks fit the
    budget: it got the 1-target call's measure, 20x too small, and ran chunks of 14 where 6 fit in 64 MiB."""
    from salience._core import perf

    made: list = []
    real = _engine.accumulate

    def kept(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_engine, "accumulate", kept)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(4, 20)).eval()
    x = torch.rand(2, 3, 64, 64)
    many = torch.arange(20).repeat(2, 1)
    fn = getattr(salience, method)
    opts = {"samples": 8} if method == "smoothgrad" else {"steps": 8}
    perf.clear_cache()
    fn(m, x, 1, max_memory=64 << 20, **opts)
    fn(m, x, many, max_memory=64 << 20, **opts)
    perf.clear_cache()
    fn(m, x, many, max_memory=64 << 20, **opts)
    one, after, fresh = made
    assert fresh.per_item_bytes > 10 * one.per_item_bytes  # K-fold
    assert after.per_item_bytes == fresh.per_item_bytes
    assert max(after.chunks) * fresh.per_item_bytes <= 0.8 * (64 << 20)
