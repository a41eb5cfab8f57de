"""Session 48: a CPU gradient pass keeps its largest block under glibc's mmap threshold (docs/performance.md,
"Session 48: the chunk and glibc's mmap threshold").

glibc serves a block of at least its mmap threshold with a fresh ``mmap``; the threshold rises with the blocks freed
only up to 32 MiB on 64-bit. resnet50 at 224 px allocates 64 x 112 x 112 fp32 = 3,211,264 bytes an item in single
blocks (its first convolution's output, layer1's): a pass of 16 items asks for 51 MB at once, mapped afresh (a fault
per 4 KiB page) in every pass; one of 8 for 25.7 MB, from the heap, reused. The memory probe records the largest
block per item (``MemoryProbe.largest``) and the plan keeps ``chunk x block`` under 32 MiB where the C library is
glibc: ``(32 MiB - 64 KiB) // block``, rounded down to a multiple of 8 where that is at least 8, never under 1.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf
import test_s45_chunks

sums_seen = test_s45_chunks.sums_seen  # a fixture: the Sums of every accumulate a method runs, in call order

THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (malloc.c)
SLACK = 64 << 10  # the engine's bound is malloc.HEAP_BLOCK_MAX (raise_dynamic_threshold's block; session 48's review)


def _cap(block: int) -> int:
    """The closed form of the bound: the most items whose ``block`` bytes each stay under the threshold."""
    n = (THRESHOLD - SLACK) // block
    return n - n % 8 if n >= 8 else max(1, n)


def _net(channels: int, kernel: int, stride: int) -> nn.Module:
    """A convolution whose output, ``channels x (H / stride) x (W / stride)`` fp32 an item, is the largest block of a
    pass (its ReLU's output and both their gradients are the same size; everything after it is smaller)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, channels, kernel, stride=stride, padding=kernel // 2, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()


# resnet50's stem at 224 px: 64 x 112 x 112 fp32 = 3,211,264 bytes an item, 10 under 32 MiB -> 8
RESNET_LIKE = dict(channels=64, kernel=7, stride=2, size=224, block=64 * 112 * 112 * 4)
# 20 x 256 x 256 fp32 = 5 MiB an item: 6 under 32 MiB (under 8: no rounding)
FIVE_MIB = dict(channels=20, kernel=3, stride=1, size=256, block=20 * 256 * 256 * 4)


def _x(case: dict, b: int) -> torch.Tensor:
    return torch.rand(b, 3, case["size"], case["size"], generator=torch.Generator().manual_seed(b))


GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the bound is glibc's (elsewhere: as before)")


@needs_glibc
def test_closed_form_of_the_cap():
    """The bound itself: resnet50's 3.2 MB a item -> 10 -> 8; 5 MiB -> 6; a block over 32 MiB -> 1; small blocks
    leave CPU_GRADIENT_CHUNK (16) and the weighty cap (32) alone; an unknown block bounds nothing."""
    assert (THRESHOLD - SLACK) // RESNET_LIKE["block"] == 10
    assert _engine.mmap_chunk_cap(RESNET_LIKE["block"]) == _cap(RESNET_LIKE["block"]) == 8
    assert _engine.mmap_chunk_cap(FIVE_MIB["block"]) == _cap(FIVE_MIB["block"]) == 6
    assert _engine.mmap_chunk_cap(THRESHOLD + 1) == 1
    assert _engine.mmap_chunk_cap(THRESHOLD // 3) == 2  # 3 x (32 MiB / 3) > 32 MiB - 64 KiB
    assert _engine.mmap_chunk_cap(1 << 20) == 24  # 31 -> 24
    assert _engine.mmap_chunk_cap(None) is None
    per_item = 10 * RESNET_LIKE["block"]
    assert _engine.gradient_chunk_cap(per_item, 0, RESNET_LIKE["block"]) == 8
    assert _engine.gradient_chunk_cap(per_item, 0, 1 << 16) == _engine.CPU_GRADIENT_CHUNK == 16
    # the weighty cap (weights >= 16 items' bytes) too: vgg11 at 112 px, weighty, ran passes of 32 items 1.06-1.09x
    # slower than passes of 8 in every round (benchmarks/vgg-chunk-s48-112.txt)
    assert _engine.gradient_chunk_cap(per_item, 16 * per_item, RESNET_LIKE["block"]) == 8
    assert _engine.gradient_chunk_cap(per_item, 16 * per_item, 1 << 16) == _engine.CPU_GRADIENT_CHUNK_WEIGHTY
    assert _engine.gradient_chunk_cap(per_item, 16 * per_item, None) == _engine.CPU_GRADIENT_CHUNK_WEIGHTY


def test_the_probe_records_the_largest_block_of_the_items():
    """``MemoryProbe(items).largest``: the convolution's output of n items, exactly; a storage whose first dimension
    is not the items' (a weight's copy made in the pass) is not counted; without ``items`` none."""
    case = RESNET_LIKE
    model = _net(case["channels"], case["kernel"], case["stride"])
    big = torch.zeros(4096, 1024)  # 16 MiB, more than 3 items' block, but not the items'
    for n in (1, 3):
        x = _x(case, n).requires_grad_(True)
        with _engine.MemoryProbe(n) as probe:
            _ = big.clone()
            torch.autograd.grad(model(x)[:, 0].sum(), x)
        assert probe.largest == n * case["block"], probe.largest
    with _engine.MemoryProbe() as probe:
        model(_x(case, 1))
    assert probe.largest is None


@needs_glibc
@pytest.mark.parametrize("case, chunks", [(RESNET_LIKE, [8, 8]), (FIVE_MIB, [6, 6, 4])], ids=["resnet50-like", "5MiB"])
def test_plan_keeps_each_pass_under_the_mmap_threshold(sums_seen, case, chunks):
    """SmoothGrad 16 of one image: chunks of the closed form's size split evenly (old code: one pass of 16, whose
    blocks of 51 MB / 84 MB glibc maps afresh every pass); the probe's block per item as computed by hand."""
    model = _net(case["channels"], case["kernel"], case["stride"])
    _perf.clear_cache()
    salience.smoothgrad(model, _x(case, 1), 3, samples=16, seed=1, max_memory="4GiB")
    (sums,) = sums_seen
    assert max(sums.chunks) == _cap(case["block"]) and sums.chunks == chunks, sums.chunks
    assert max(sums.chunks) * case["block"] < THRESHOLD


@needs_glibc
def test_integrated_gradients_of_two_images(sums_seen):
    """IG 32 of 2 images, 64 items: passes of 8 (old: 16)."""
    case = RESNET_LIKE
    model = _net(case["channels"], case["kernel"], case["stride"])
    _perf.clear_cache()
    salience.integrated_gradients(model, _x(case, 2), 3, steps=32, rule="middle", max_memory="4GiB")
    assert sums_seen[-1].chunks == [8] * 8, sums_seen[-1].chunks


def test_elsewhere_the_plan_is_as_before(sums_seen, monkeypatch):
    """Where the C library is not glibc (detection patched) the bound is off: one pass of 16, as before (this test
    passes on the old code too, which has no detection)."""
    monkeypatch.setattr(_engine, "_glibc_heap", lambda: False, raising=False)
    case = RESNET_LIKE
    model = _net(case["channels"], case["kernel"], case["stride"])
    _perf.clear_cache()
    salience.smoothgrad(model, _x(case, 1), 3, samples=16, seed=1, max_memory="4GiB")
    assert sums_seen[-1].chunks == [16]
    if hasattr(_engine, "mmap_chunk_cap"):
        assert _engine.mmap_chunk_cap(RESNET_LIKE["block"]) is None


def test_maps_equal_a_per_sample_loop():
    """Integrated gradients (the middle Riemann rule, black baseline) under the new chunks equals the formula run
    one item at a time: ``x * mean_k grad f((k + 1/2) / n * x)``, each point a pass of its own."""
    case, n = RESNET_LIKE, 16
    model = _net(case["channels"], case["kernel"], case["stride"])
    x = _x(case, 2)
    _perf.clear_cache()
    got = salience.integrated_gradients(model, x, 3, steps=n, rule="middle", reduce=None, max_memory="4GiB")
    ref = torch.zeros_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for k in range(n):
            p = ((k + 0.5) / n * x[b:b + 1]).requires_grad_(True)
            (g,) = torch.autograd.grad(model(p)[0, 3], p)
            ref[b] += g[0].double() / n
    ref *= x.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_same_bits_cold_warm_and_in_a_fresh_process(tmp_path):
    """A seeded SmoothGrad call gives the same bits cold (the probe runs), warm, and in another process (the block is
    a size, not a timing: the same chunks everywhere)."""
    case = RESNET_LIKE
    model = _net(case["channels"], case["kernel"], case["stride"])
    x = _x(case, 1)
    _perf.clear_cache()
    cold = salience.smoothgrad(model, x, 3, samples=16, seed=7)
    warm = salience.smoothgrad(model, x, 3, samples=16, seed=7)
    assert torch.equal(cold, warm)
    out = tmp_path / "map.pt"
    code = textwrap.dedent(f"""
        import torch, salience, sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_s48_mmap import _net, _x, RESNET_LIKE as case
        model = _net(case["channels"], case["kernel"], case["stride"])
        torch.save(salience.smoothgrad(model, _x(case, 1), 3, samples=16, seed=7), {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert torch.equal(torch.load(out), cold)


def test_peak_memory_independent_of_samples():
    """The whole call's live tensors at the peak: the same at 16 and 48 samples (chunks of 8 either way)."""
    case = RESNET_LIKE
    model = _net(case["channels"], case["kernel"], case["stride"])
    x = _x(case, 1)
    peaks = []
    for n in (16, 48):
        _perf.clear_cache()
        salience.smoothgrad(model, x, 3, samples=n, seed=1)  # the probe's pass outside the measure
        with _engine.MemoryProbe() as probe:
            salience.smoothgrad(model, x, 3, samples=n, seed=1)
        peaks.append(probe.peak)
    assert peaks[1] <= peaks[0] * 1.02, peaks
