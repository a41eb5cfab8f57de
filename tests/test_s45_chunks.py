"""Session 45: the engine's chunk plan (docs/performance.md, "Session 45: the engine's chunk plan").

With ``chunks="memory"`` (the default) under a run, the memory probe is a pass of its own whose result is thrown
away, in the first call for a model, method, item shape, options and number of images only; every call, cold or
warm, then runs the same chunks from item 0. On a CPU a gradient pass takes at most ``CPU_GRADIENT_CHUNK`` items
and the items are split evenly. Before, every call ran a first chunk of one item per image (the probe's, repeated
by warm calls so they gave the cold call's bits), then the rest in one chunk: SmoothGrad 16 of one image ran 1 + 15.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience.methods.integrated import collect_gaps


@pytest.fixture
def sums_seen(monkeypatch):
    """The :class:`~salience._core.engine.Sums` of every ``accumulate`` a method runs, in call order."""
    seen: list[_engine.Sums] = []
    real = _engine.accumulate

    def kept(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_engine, "accumulate", kept)
    return seen


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _x(b: int) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


CALLS = {
    "smoothgrad": lambda m, x: salience.smoothgrad(m, x, 3, samples=16, seed=5, reduce=None),
    "integrated_gradients": lambda m, x: salience.integrated_gradients(m, x, 3, steps=32, reduce=None),
    "rise": lambda m, x: salience.rise(m, x, 3, masks=48, seed=2),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("b", [1, 2])
def test_cold_and_warm_calls_give_the_same_bits_and_chunks(resnet, sums_seen, method, b):
    """A seeded call gives the same bits cold (the memory probe runs) and warm (no probe), from the same chunks;
    none of them is the probe's chunk of one item per image (on old code the first was: 1 + 15 for SmoothGrad)."""
    x = _x(b)
    _perf.clear_cache()
    cold = CALLS[method](resnet, x)
    warm = CALLS[method](resnet, x)
    assert torch.equal(cold, warm)
    chunks_seen = [s.chunks for s in sums_seen]
    assert len(chunks_seen) == 2 and chunks_seen[0] == chunks_seen[1], chunks_seen
    chunks = chunks_seen[0]
    assert chunks[0] == max(chunks) and chunks[0] > b, chunks  # a full chunk first, not one item per image
    if method != "rise":  # gradient passes: at most CPU_GRADIENT_CHUNK items a chunk (32 on resnet18, whose weights
        # outweigh 16 items at 32 px: session 46's engine.gradient_chunk_cap)
        assert max(chunks) <= _engine.CPU_GRADIENT_CHUNK_WEIGHTY


def test_smoothgrad_of_one_image_runs_one_chunk_of_16(resnet, sums_seen):
    """SmoothGrad 16 of one image: one pass of 16 items (old code: 1 + 15, oneDNN's 15 slower than its 16);
    integrated gradients' 32 path points: one chunk of 32 (session 49: the predicted class from a forward pass of x,
    not a gradient pass of the end point at 1 that left 31; session 46: resnet18's weights outweigh 16 items at 32 px,
    so a pass takes up to 32, engine.gradient_chunk_cap; 16 + 15 in session 45)."""
    _perf.clear_cache()
    salience.smoothgrad(resnet, _x(1), samples=16, seed=1)
    salience.integrated_gradients(resnet, _x(1), steps=32)
    assert [s.chunks for s in sums_seen] == [[16], [32]]


def test_the_probe_is_a_pass_of_its_own_in_the_first_call_only(resnet):
    """The forward passes' batch sizes: the first call runs the probe's pass (one item per image), then its chunks;
    the next call the same chunks, no probe pass. Old code: [1, 15] in both."""
    sizes: list[int] = []
    handle = resnet.conv1.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        _perf.clear_cache()
        salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1)
        cold = list(sizes)
        sizes.clear()
        salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1)
    finally:
        handle.remove()
    assert cold == [1, 16] and sizes == [16]


@pytest.mark.parametrize("small, chunks", [(True, [60]), (False, [32, 28])])
def test_the_thrown_away_pass_is_not_summed(monkeypatch, small, chunks):
    """The engine alone, a run on a small CNN: ``compute`` sees the probe's pass flagged :func:`discarded` (once, in
    the first call), and the sums are those of every item exactly once: item ``j`` contributes ``j`` to image
    ``j % 3``, so image ``b`` sums ``b + (b + 3) + ...`` (a closed form). With the small-pass rule off
    (``engine.CPU_SMALL_PASS_BYTES`` 0) the items run in two chunks, so the closed form checks each later chunk's
    items land on their images too."""
    if not small:
        monkeypatch.setattr(_engine, "CPU_SMALL_PASS_BYTES", 0)
    model = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)]).eval()
    x = torch.rand(3, 3, 8, 8)
    calls: list[tuple[int, int, bool]] = []

    def compute(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop, _engine.discarded()))
        return torch.arange(start, stop, dtype=torch.float32)[:, None]

    _perf.clear_cache()
    for call in range(2):
        calls.clear()
        sums = _engine.accumulate(compute, 60, 3, run=_perf.Run(model, x, _perf.Performance(), tag="s45"))
        expected = torch.tensor([[sum(range(b, 60, 3))] for b in range(3)], dtype=torch.float64)
        assert torch.equal(sums.total, expected)
        probes = [c for c in calls if c[2]]
        assert probes == ([(0, 3, True)] if call == 0 else [])
        # the compute's items (a float each) are small: up to 64 a pass (engine.CPU_GRADIENT_CHUNK_SMALL), all 60 in
        # one; without that rule they weigh far less than the model's weights: 32 a pass (the weighty rule), 32 + 28
        assert [stop - start for start, stop, d in calls if not d] == sums.chunks == chunks
        assert not _engine.discarded()


@pytest.mark.parametrize("total, cap, size", [
    (16, 12, 8),    # 8 + 8, not 12 + 4
    (16, 1000, 16),  # one chunk: the CPU's cap
    (64, 1000, 16),
    (31, 1000, 16),  # 16 + 15
    (60, 16, 16),   # 16, 16, 16, 12: multiples of 8 where they need no more chunks
    (20, 16, 10),   # 10 + 10: rounded to 16 it would leave a chunk of 4
    (5, 1000, 5),
    (40, 7, 7),     # a budget under 8 items: 6 chunks of 7 (the last 5)
])
def test_planned_chunk_on_a_cpu(total, cap, size):
    assert _engine.planned_chunk(total, cap, torch.device("cpu"), False) == size


def test_planned_chunk_keeps_the_budgets_size_on_a_gpu_and_for_gradient_free_passes():
    """CUDA: the memory budget's size (bigger passes are faster there); gradient-free passes on a CPU: their own
    budget's (``CPU_INFERENCE_BUDGET``), not the gradient passes' item cap."""
    assert _engine.planned_chunk(64, 40, torch.device("cuda"), False) == 40
    assert _engine.planned_chunk(64, 40, torch.device("cpu"), True) == 40
    assert _engine.planned_chunk(64, 40, torch.device("cpu"), False) == 16


def test_the_memory_budget_still_bounds_the_chunk(resnet, sums_seen, monkeypatch):
    """A budget of 12 items per chunk: SmoothGrad's 16 items as 8 + 8 (old code: 1, then 12 and 3)."""
    monkeypatch.setattr(_engine, "chunk_size", lambda per_item, budget, n: 12)
    _perf.clear_cache()
    salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1)
    assert [s.chunks for s in sums_seen] == [[8, 8]]


def test_smoothgrad_equals_a_plain_loop_of_its_documented_noise(resnet):
    """SmoothGrad with per-image seeds against a hand-written loop: image ``b``'s copies ``x_b + sigma_b * N(0, 1)``
    from a generator seeded with its seed (the documented stream), one gradient each, averaged."""
    x, seeds, noise, samples = _x(2), [11, 12], 0.1, 16
    _perf.clear_cache()
    got = salience.smoothgrad(resnet, x, 3, samples=samples, noise=noise, seed=seeds, reduce=None)
    for b in range(2):
        gen = torch.Generator().manual_seed(seeds[b])
        sigma = noise * (x[b].max() - x[b].min())
        total = torch.zeros_like(x[b])
        for _ in range(samples):
            xn = (x[b] + sigma * torch.randn(x[b].shape, generator=gen)).unsqueeze(0).requires_grad_(True)
            total += torch.autograd.grad(resnet(xn)[0, 3], xn)[0][0]
        # float32 passes of other batch sizes: their sums in another order (1e-6 of the map's largest value seen)
        torch.testing.assert_close(got[b], total / samples, rtol=1e-4, atol=1e-5 * total.abs().max().item() / samples)


def test_integrated_gradients_equal_a_plain_loop_of_the_trapezoid_rule(resnet):
    """IG (trapezoid, zero baseline) against the formula by hand: ``x * sum_i w_i grad(a_i x)``, ``a_i = i / (n-1)``,
    weights ``1 / (n-1)`` halved at both ends, one pass a point."""
    x, n = _x(2), 32
    _perf.clear_cache()
    got = salience.integrated_gradients(resnet, x, 3, steps=n, baseline=torch.zeros_like(x), reduce=None)
    for b in range(2):
        total = torch.zeros_like(x[b], dtype=torch.float64)
        for i in range(n):
            w = (0.5 if i in (0, n - 1) else 1.0) / (n - 1)
            xa = (x[b] * (i / (n - 1))).unsqueeze(0).requires_grad_(True)
            total += w * torch.autograd.grad(resnet(xa)[0, 3], xa)[0][0].double()
        ref = (x[b].double() * total).float()
        torch.testing.assert_close(got[b], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


class _Sine(torch.nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sin(20 * z)


def test_smoothgrad_counts_each_copys_completeness_gap_once():
    """SmoothGrad over integrated gradients: the probe's pass (the first copy of each image) runs again for real;
    its completeness reports are not counted twice: every one of the 4 copies has a gap (2 steps on a sine of
    frequency 20: relative gap 43), and the report says 4 copies (5 when the thrown-away pass counted, measured)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3), _Sine()).eval()
    x = torch.rand(1, 3, 8, 8) * 4
    _perf.clear_cache()
    with collect_gaps() as found:
        salience.smoothgrad(model, x, 0, samples=4, seed=0, method=salience.integrated_gradients, steps=2)
    assert len(found) == 1 and found[0].copies == 4, found


def test_every_chunk_of_a_warm_call_runs_the_folded_copy(resnet, sums_seen):
    """``fold_batchnorm=True``: the folded copy runs a pass once an eager pass found no final softmax. The cold call's
    eager pass is the probe's (thrown away), so its one chunk of 16 runs folded; a warm call has no eager chunk first
    since session 45, and runs folded from its first chunk because the record keeps the softmax answer (before,
    for compile="freeze" only: the warm call's one chunk ran the model itself, the fold unused)."""
    _perf.clear_cache()
    ref = salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1, reduce=None)
    with salience.performance(fold_batchnorm=True):
        cold = salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1, reduce=None)
        warm = salience.smoothgrad(resnet, _x(1), 3, samples=16, seed=1, reduce=None)
    layouts = [s.layouts for s in sums_seen]
    assert layouts[1:] == [["contiguous folded"], ["contiguous folded"]], layouts
    assert torch.equal(cold, warm)
    # the fold computes the same function: the maps within float32 rounding of the model's own
    torch.testing.assert_close(warm, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
