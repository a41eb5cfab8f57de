"""Issue 15's many-pass methods under bf16 on a CPU against a plain loop on equal terms (session 58): the engine's
memory probe counted the call's bf16 copies of the weights (:class:`salience._core.casts.CastCache`, made in the first
pass, the probe's, and held for the whole call) as bytes of the pass's items. On resnet50 at 224 px that made 7.47 MB
an item of 5.82 MB, so 7 items a pass instead of 8: RISE's 64 masks on 8 images ran 74 passes of 7 and one of a
single item where the loop runs 64 of 8 (Score-CAM and Ablation-CAM on 64 channels alike).

Before this change (at 02bd6ba2) ``test_probe_leaves_the_calls_weight_copies_out``,
``test_making_is_set_only_while_a_copy_is_made`` (no ``casts.making``),
``test_rise_bf16_passes_are_whole_copies_of_the_batch`` and ``test_score_cam_bf16_passes_are_whole_copies`` failed;
the map tests passed there too (the maps are the same within bf16's rounding, bit-equal in float32).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import perf as _perf
from salience._core import casts as _casts
from salience._core.casts import CastCache, WeightCasts
from salience._core.engine import MemoryProbe
from salience.methods.perturbation import rise_masks

SEEN: list[int] = []  # the batch size of every pass of the model (a list outside it: the call puts its state back)


class _Count(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(int(x.shape[0]))
        return x


def _weighty() -> nn.Module:
    """A model whose weights (a 16384 x 256 linear layer: 8 MiB in bf16) outweigh its activations (about 0.1 MB an item
    at 32 px): the call's copies of them, counted per item, made the chunk small."""
    torch.manual_seed(0)
    return nn.Sequential(_Count(), nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 256),
                         nn.ReLU(), nn.Linear(256, 10)).eval()


@pytest.fixture(autouse=True)
def _fresh():
    _perf.clear_cache()
    SEEN.clear()
    yield
    _perf.clear_cache()


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
    return w


def test_probe_leaves_the_calls_weight_copies_out():
    """A pass's peak under the probe is the same whether the call's copies of the weights are made in it (the first
    pass) or were made before (every later pass): they are the call's, not the items'. Before, the first was larger by
    the copies' bytes (8 MiB here)."""
    model = _weighty().requires_grad_(False)  # as the call's guard leaves them: autocast's own cache takes the others
    x = torch.rand(8, 3, 32, 32)
    cache = CastCache(torch.bfloat16)
    peaks = []
    with torch.inference_mode():
        for _ in range(2):
            probe = MemoryProbe(8)
            with torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts(cache), probe:
                model(x)
            peaks.append(probe.peak)
    assert cache.made == 6  # the weights and biases of the convolution and the two linear layers, once
    assert peaks[0] == peaks[1]
    assert peaks[0] < 2 << 20  # the activations of 8 items, not the 8 MiB of copies
    assert not _casts.making()


def test_making_is_set_only_while_a_copy_is_made():
    cache = CastCache(torch.bfloat16)
    p = nn.Parameter(torch.rand(4, 4), requires_grad=False)
    seen = []

    class Look(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((str(func), _casts.making()))
            return func(*args, **(kwargs or {}))

    with Look():
        copy = cache.get(p)
        copy.add(1)
    assert copy.dtype is torch.bfloat16
    assert ("aten._to_copy.default", True) in seen
    assert ("aten.add.Tensor", False) in seen
    assert not _casts.making()


def _rise_passes(**options) -> list[int]:
    model, x = _weighty(), torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    w = _quiet()
    try:
        salience.rise(model, x, 3, masks=4, max_memory=2 << 20, **options)
    finally:
        w.__exit__(None, None, None)
    return list(SEEN)


def test_rise_bf16_passes_are_whole_copies_of_the_batch():
    """RISE's 4 masks on 8 images under bf16 + channels-last with a 2 MiB budget: the clean passes' probe (1 image,
    :func:`~salience.methods.perturbation.clean_batch`), the clean passes (4 + 4 images: a 16-bit run's clean passes
    take half the images), the thrown-away memory probe (8), then 32 items in two passes of 16 (a
    multiple of the 8 images). Before: the probe counted the 8 MiB of weight copies, 1.1 MB an item,
    and the 32 items ran in 32 passes of one."""
    assert _rise_passes(precision="bf16", memory_format="channels_last") == [1, 4, 4, 8, 16, 16]
    SEEN.clear()
    assert _rise_passes() == [1, 8, 8, 8, 8, 8, 8]  # float32: one clean pass, no copies, 4 x 8 (the same before)


def test_score_cam_bf16_passes_are_whole_copies():
    model, x = _weighty(), torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    w = _quiet()
    try:
        salience.scorecam(model, x, 3, layer="1", max_memory=2 << 20, precision="bf16", memory_format="channels_last")
    finally:
        w.__exit__(None, None, None)
    sizes = list(SEEN)
    # 16 channels x 8 images = 128 items (fewer where a channel is blank everywhere): never a pass of fewer than 8
    # but the last; before, passes of 1
    passes = sizes[sizes.index(8, 2) + 1:] if 8 in sizes[2:] else sizes
    assert min(passes[:-1]) >= 8, sizes


def _rise_by_hand(model: nn.Module, x: torch.Tensor, target: int, masks: int) -> torch.Tensor:
    """RISE written out: one pass of the B images per mask, under the same bf16 autocast and channels-last layout,
    the probabilities summed mask by mask in float32."""
    model = model.to(memory_format=torch.channels_last)
    total = torch.zeros(x.shape[0], *x.shape[-2:])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(masks):
            m = rise_masks(i, i + 1, tuple(x.shape[-2:]))[0]
            xs = (x * m).contiguous(memory_format=torch.channels_last)
            s = model(xs).float().softmax(1)[:, target]
            total.addcmul_(s[:, None, None], m)
    return total / (masks * 0.5)


def test_rise_bf16_map_is_the_loops_within_bf16_rounding():
    """The map under bf16 + channels-last against the loop written out: the same passes of 8 images, each mask's
    scores the same up to the rounding of a kernel's choice (documented tolerance of bf16: 1e-2 of the map's range)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    w = _quiet()
    try:
        got = salience.rise(model, x, 3, masks=16, precision="bf16", memory_format="channels_last")
    finally:
        w.__exit__(None, None, None)
    ref = _rise_by_hand(model, x, 3, 16)
    assert got.shape == ref.shape == (8, 32, 32)
    span = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) <= 1e-2 * span


def test_rise_float32_map_is_bit_equal_to_the_loop():
    """In float32 nothing changed: RISE's map is the loop's (no copies to leave out; the same passes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = salience.rise(model, x, 2, masks=8, chunk=4)
    total = torch.zeros(4, 16, 16)
    with torch.inference_mode():
        for i in range(8):
            m = rise_masks(i, i + 1, (16, 16))[0]
            total.addcmul_(model(x * m).softmax(1)[:, 2][:, None, None], m)
    assert torch.equal(got, total / 4.0)
