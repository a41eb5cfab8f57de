"""Review of the CPU gradient-chunk rules for small items (engine.gradient_chunk_cap, tests/test_s60_chunk.py).

Plans the rules make on models the branch did not measure, pinned from the memory probe's numbers or by a forward
pre-hook's count of pass sizes: items of 394-786 KB get a small-pass cap of 40-56, whose even split of 16 n or 32 n
items can be passes of no multiple of 8 (resnet18 at 32 px: 5 x 43 + 41; the tiny CNN at 80 px: 6 x 37 + 34; they ran
0.94 and 1.03 of 8 x 32: benchmarks/chunk-split-s60.md); vit_b_16 at 144 px newly weighty
(benchmarks/chunk-vit144-s60.md);
``max_memory=`` still bounds a small pass; compiled calls run the plan. These are checks: they pass on the branch as
the author left it (the plans of the small-pass and weighty rules fail on main, which had neither).
"""
from __future__ import annotations

import pytest
import torch

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf

# (the memory probe's bytes per item, the weights' bytes, the probe's largest block per item), torch 2.14, random
# weights, as the engine measured them for integrated gradients (steps 32) of 8 images
RESNET18_32 = (450922, 46758048, 65536)
# vit_b_16 at 144 px (image_size=144), integrated gradients of 2 images: its weights weigh 10.6 items' bytes, so the
# weighty rule (8 items) reaches it; the 1 GiB budget allows 26 items
VIT_B_16_144 = (32563150, 345917344, 1007616)


@pytest.fixture
def glibc(monkeypatch):
    """The C library taken as glibc (its mmap bound applies), whatever this process's is."""
    monkeypatch.setattr(_engine, "_glibc_heap", lambda: True)


def _plan(probe: tuple[int, int, int], total: int, n_images: int, budget: int = 1 << 30) -> int:
    per_item, weights, block = probe
    cap = _engine.chunk_size(per_item, budget, n_images)
    return _engine.planned_chunk(total, cap, torch.device("cpu"), False,
                                 _engine.gradient_chunk_cap(per_item, weights, block))


def test_resnet18_at_32_px_plan(glibc):
    """resnet18 at 32 px (CIFAR size), integrated gradients of 8 images: 24 MiB hold 55 items, a cap of 48; 256 items
    split evenly, 5 x 43 + 41 (main: 8 x 32 by the weighty rule; 43 x 5 + 41 ran 0.94 of it)."""
    assert _engine.gradient_chunk_cap(*RESNET18_32) == 48
    assert _plan(RESNET18_32, 256, 8) == 43


def test_vit_b_16_at_144_px_plan(glibc):
    """vit_b_16 at 144 px, integrated gradients of 2 images (64 items): the weighty cap (32, weights 10.6 items'
    bytes) bounded by the 1 GiB budget's 26 items: 24 + 24 + 16 (main: 4 x 16; docs/performance-log.md has the
    measure); under a budget of 2 GiB 32 + 32."""
    assert _engine.gradient_chunk_cap(*VIT_B_16_144) == 32
    assert _plan(VIT_B_16_144, 64, 2) == 24
    assert _plan(VIT_B_16_144, 64, 2, budget=2 << 30) == 32


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()


def _passes(model: torch.nn.Module, *calls) -> tuple[list[list[int]], list]:
    """The batch sizes of ``model``'s forward passes in each of ``calls`` and their results, under one forward
    pre-hook (a hook added between two calls is a change the run's cache sees: the second call would probe again)."""
    seen: list[int] = []
    each: list[list[int]] = []
    outs: list = []
    hook = model.register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[0])))
    try:
        for call in calls:
            outs.append(call())
            each.append(list(seen))
            seen.clear()
    finally:
        hook.remove()
    return each, outs


def test_the_tiny_cnn_at_80_px_plan():
    """The tiny CNN at 80 px (539 KB an item by the probe: 46 items fit 24 MiB, a cap of 40), integrated gradients of
    8 images (256 items): a cold call runs the probe's pass of 8, then 6 x 37 + 34; a warm call the same passes and
    the same bits."""
    model = _tiny()
    x = torch.rand(8, 3, 80, 80, generator=torch.Generator().manual_seed(6))
    _perf.clear_cache()

    def call():
        return salience.integrated_gradients(model, x, 2, steps=32, reduce=None)

    (cold, warm), (a, b) = _passes(model, call, call)
    assert cold == [8] + [37] * 6 + [34] and warm == [37] * 6 + [34]
    assert torch.equal(a, b)


def test_max_memory_bounds_a_small_pass():
    """``max_memory=`` still bounds the pass: the tiny CNN at 16 px (22.6 KB an item, 64 a pass by the small rule),
    integrated gradients of 2 images under 1 MB: 80 % of it holds 37 items, so 32 + 32, not 64."""
    model = _tiny()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    _perf.clear_cache()
    (cold,), _ = _passes(model, lambda: salience.integrated_gradients(model, x, 2, steps=32, max_memory=10 ** 6))
    assert cold == [2, 32, 32]
    _perf.clear_cache()
    (free,), _ = _passes(model, lambda: salience.integrated_gradients(model, x, 2, steps=32))
    assert free == [2, 64]


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("eager_first", [False, True])
def test_compiled_calls_run_the_small_rules_plan(monkeypatch, eager_first):
    """``compile=``: integrated gradients' 32 steps of three 8x8 images (96 items of a few KB: the small-pass cap 64)
    run 48 + 48 in every call, eager or compiled, cold or warm (a compiled call that reuses an earlier call's probe
    follows the plan, not the budget's one chunk of 96), and one graph of 48 is compiled."""
    from conftest import counting_backend, unchanged
    from test_s45_compile import _net

    model, x = _net(), torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    seen, accumulate = [], _engine.accumulate

    def recording(*a, **k):
        sums = accumulate(*a, **k)
        seen.append(list(sums.chunks))
        return sums

    monkeypatch.setattr(_engine, "accumulate", recording)
    backend, graphs, _ = counting_backend()

    def call(**kw):
        return salience.integrated_gradients(model, x, 2, steps=32, reduce=None, **kw)

    ref = call() if eager_first else None
    outs = []
    for _ in range(3):
        with unchanged(model):
            outs.append(call(compile=backend))
    assert seen == [[48, 48]] * (3 + eager_first), seen
    assert graphs == [[48]], graphs
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-6 * float(outs[0].abs().max()))
    if ref is not None:
        torch.testing.assert_close(outs[0], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
