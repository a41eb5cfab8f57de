"""Session 48's review of the mmap chunk cap (tests/test_s48_mmap.py, docs/performance.md "Session 48: the chunk
and glibc's mmap threshold").

1. The memory probe's largest block (``MemoryProbe.largest``) counted only storages whose first dimension is the
   items: a sequence-first model (``(N, B, D)``: ``nn.MultiheadAttention``'s default, OpenAI CLIP's transformer) makes
   its largest blocks with the tokens first, unseen, so its passes kept blocks over 32 MiB (mapped afresh every pass).
   Now a storage an operator makes from one that holds the items holds them too.
2. The engine's bound (32 MiB - 4096) and the threshold ``malloc.raise_dynamic_threshold`` leaves (its block's chunk,
   32 MiB - 60 KiB) differed: one bound now, ``malloc.HEAP_BLOCK_MAX``.
"""
from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import malloc as _malloc
from salience._core import perf as _perf
import test_s45_chunks

sums_seen = test_s45_chunks.sums_seen  # a fixture: the Sums of every accumulate a method runs, in call order

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the bound is glibc's (elsewhere: as before)")

TOKENS, HIDDEN = 256, 4096  # (tokens, items, HIDDEN) fp32: 4 MiB an item, the pass's largest block


class SequenceFirst(nn.Module):
    """(B, C, h, w) -> tokens first ``(h*w, B, C)`` (as ``nn.MultiheadAttention`` without ``batch_first``) -> a
    Linear to ``HIDDEN`` and a ReLU, still tokens first -> the mean over the tokens -> 10 classes. Its largest blocks,
    the hidden layer's ``(TOKENS, B, HIDDEN)`` fp32 and their gradients, never lead with the items."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.head = nn.Linear(8, HIDDEN), nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2).permute(2, 0, 1)  # (N, B, C)
        return self.head(torch.relu(self.up(t)).mean(0))


def _x(b: int) -> torch.Tensor:
    return torch.rand(b, 8, 16, 16, generator=torch.Generator().manual_seed(b))  # 256 tokens


def test_probe_sees_a_sequence_first_block():
    """``largest`` of a pass of n items is the hidden layer's ``TOKENS x n x HIDDEN`` fp32 (old: the input's copy
    only, 8 KiB an item); a weight's copy made in the pass is still not counted."""
    model = SequenceFirst().eval()
    big = torch.zeros(8192, 1024)  # 32 MiB, not the items'
    for n in (1, 3):
        x = _x(n).requires_grad_(True)
        with _engine.MemoryProbe(n) as probe:
            _ = big.clone()
            _ = model.up.weight.to(torch.float64)  # a weight's copy (as autocast's casts)
            torch.autograd.grad(model(x)[:, 0].sum(), x)
        assert probe.largest == TOKENS * n * HIDDEN * 4, probe.largest


@needs_glibc
def test_a_sequence_first_model_keeps_its_passes_under_the_threshold(sums_seen):
    """SmoothGrad 16 of one image: 4 MiB an item -> (32 MiB - 64 KiB) // 4 MiB = 7 items a pass, 16 split 6 + 6 + 4
    (old: one pass of 16, 64 MiB blocks, mapped afresh each pass); each pass's block under malloc.HEAP_BLOCK_MAX."""
    model = SequenceFirst().eval()
    _perf.clear_cache()
    salience.smoothgrad(model, _x(1), 3, samples=16, seed=1, max_memory="4GiB")
    chunks = sums_seen[-1].chunks
    assert chunks == [6, 6, 4], chunks
    assert max(chunks) * TOKENS * HIDDEN * 4 <= _malloc.RAISING_BLOCK
    sums_seen.clear()
    salience.smoothgrad(model, _x(1), 3, samples=16, seed=1, max_memory="4GiB")  # warm: the probe's block reused
    assert sums_seen[-1].chunks == [6, 6, 4], sums_seen[-1].chunks
    sums_seen.clear()
    salience.smoothgrad(model, _x(1), 3, samples=16, seed=1, chunk=16)  # an explicit chunk still wins
    assert sums_seen[-1].chunks == [16], sums_seen[-1].chunks


@needs_glibc
@pytest.mark.parametrize("block", [(16 << 20) - (16 << 10), (16 << 20) - (1 << 10), (8 << 20) - (8 << 10),
                                   3_211_264, 5 << 20, 1 << 20, (32 << 20) // 3])
def test_the_bound_is_the_lever_threshold(block):
    """A pass's block (cap x block) is at most ``malloc.HEAP_BLOCK_MAX`` = ``RAISING_BLOCK`` (32 MiB - 64 KiB): the
    threshold raise_dynamic_threshold leaves is that block's chunk (a page over it), and a request under it comes
    from the heap. The merge's bound, 32 MiB - 4096, let 2 x (16 MiB - 16 KiB) = 32 MiB - 32 KiB through: in a child
    process under the lever such a block was mapped in its first pass and faulted in on the heap in its second
    (8,195 and 8,184 minor faults, then 0; a block of RAISING_BLOCK: 8,186 in the first pass only)."""
    assert getattr(_malloc, "HEAP_BLOCK_MAX", _malloc.RAISING_BLOCK) == _malloc.RAISING_BLOCK == (32 << 20) - (64 << 10)
    cap = _engine.mmap_chunk_cap(block)
    assert cap is not None and cap * block <= _malloc.RAISING_BLOCK, cap
    n = _malloc.RAISING_BLOCK // block  # the largest under it, rounded as documented (9-15 -> 8; 1-7 kept)
    assert cap == (n - n % 8 if n >= 8 else max(1, n))
