"""Session 56, issue 15's memory: what a many-pass call keeps from chunk to chunk does not grow with the chunks, and
the perturbation methods' refusal of NaN / infinite scores under ``precision="fp16"`` names float16's overflow.

The memory property: the tensors a call made and still holds when each of its forward passes starts (storages created
under a dispatch mode, alive by weak reference) are as many at the last pass as at the third, whatever the number of
chunks. Ablation-CAM kept one small score tensor per chunk (the engine's list of them, concatenated at the end): on
resnet50 such small blocks, carved from a pass's freed activations, split glibc's heap (the session 43 cause of
RISE's growth, :meth:`salience._core.derived.Derived.note_scores`); now they are written into one buffer.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import salience
from salience import SalienceError


class _Live(TorchDispatchMode):
    """The storages the operators under the mode create, by weak reference: :meth:`alive` counts those still held."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, StorageWeakRef] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self.refs[t.untyped_storage().data_ptr()] = StorageWeakRef(t.untyped_storage())
        return out

    def alive(self) -> int:
        return sum(not r.expired() for r in self.refs.values())


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))

CALLS = {
    "ablationcam": lambda m: salience.ablationcam(m, X, 1, layer="2", chunk=2),
    "rise": lambda m: salience.rise(m, X, 1, masks=24, cell=3, chunk=2),
    "scorecam": lambda m: salience.scorecam(m, X, 1, layer="2", chunk=2),
    "occlusion": lambda m: salience.occlusion(m, X, 1, window=4, stride=2, chunk=2),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_kept_tensors_do_not_grow_with_the_chunks(name):
    """Fails on the code before session 56 for Ablation-CAM (one storage more a chunk: 37 alive at its last pass
    against 28 at its middle one); the others guard (they were flat before too)."""
    m = _net()
    CALLS[name](m)  # a first call: the probe and the caches, as a warm call has them
    mode, seen = _Live(), []
    handle = m.register_forward_pre_hook(lambda mod, args: seen.append(mode.alive()))
    try:
        with mode:
            CALLS[name](m)
    finally:
        handle.remove()
    assert len(seen) >= 8, seen  # enough chunks to see a growth
    assert seen[-1] == seen[len(seen) // 2], seen


def test_ablationcam_scores_of_chunks_are_the_formula():
    """The scores now come from one buffer: the map is still Ablation-CAM's formula, ``relu(sum_k w_k A_k)`` with
    ``w_k = (S - S_k) / S``, by hand on the same model (each channel zeroed by a hook, one pass per channel), with
    chunks of 2, 3 and all items (float32 rounding of the passes' batch sizes: 1e-5)."""
    m = _net()
    with torch.no_grad():
        store: list[torch.Tensor] = []
        h = m[2].register_forward_hook(lambda mod, i, o: store.append(o))
        s = m(X)[:, 1]
        h.remove()
        acts = store[0]
        w = torch.zeros(2, 16)
        for k in range(16):
            def zero(mod, i, o, k=k):
                o = o.clone()
                o[:, k] = 0
                return o
            h = m[2].register_forward_hook(zero)
            w[:, k] = (s - m(X)[:, 1]) / s
            h.remove()
        ref = F.interpolate(torch.relu((w[:, :, None, None] * acts).sum(1, keepdim=True)), size=(12, 12),
                            mode="bilinear", align_corners=False)[:, 0]
    for chunk in (2, 3, None):
        got = salience.ablationcam(m, X, 1, layer="2", chunk=chunk)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (chunk, (got - ref).abs().max())


def _loud() -> nn.Module:
    """Scores past float16's 65504 (about 1e5 for these images), finite in float32 and bf16."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0), net[0].bias.zero_()
        net[4].weight.copy_(torch.tensor([[3e4] * 4, [-3e4] * 4])), net[4].bias.zero_()
    return net.eval()


XL = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

FP16 = {
    "occlusion": lambda m, **kw: salience.occlusion(m, XL, 0, window=4, stride=2, **kw),
    "ablationcam": lambda m, **kw: salience.ablationcam(m, XL, 0, layer="0", **kw),
    "rise": lambda m, **kw: salience.rise(m, XL, 0, masks=8, cell=2, **kw),
    "scorecam": lambda m, **kw: salience.scorecam(m, XL, 0, layer="0", **kw),
}


@pytest.mark.parametrize("name", list(FP16))
def test_fp16_overflow_of_scores_is_named(name):
    """Fails on the code before session 56 (the refusal named masked pixels only; integrated gradients' says fp16's
    overflow and what to use): under precision='fp16' the refusal says float16's overflow and bf16 / fp32; the same
    model in bf16 and fp32 gives a finite map, and a refusal of NaN scores in fp32 says nothing of fp16."""
    m = _loud()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without bf16 instructions warns that it is slow
        for precision in ("fp32", "bf16"):
            assert torch.isfinite(FP16[name](m, precision=precision)).all(), precision
    with pytest.raises(SalienceError, match=r"NaN or infinite.*overflow float16.*use precision='bf16' .* or 'fp32'"):
        FP16[name](m, precision="fp16")
    with salience.performance(precision="fp16"), pytest.raises(SalienceError, match="overflow float16"):
        FP16[name](m)
    nan = _loud()
    with torch.no_grad():
        nan[4].bias.fill_(float("nan"))
    with pytest.raises(SalienceError, match="NaN or infinite") as caught:
        FP16[name](nan)
    assert "fp16" not in str(caught.value)
