"""Session 45's last read: defects where two of the session's merges meet.

The chunk plan (wt-chunks-s45: CPU gradient passes of at most ``engine.CPU_GRADIENT_CHUNK`` items, split evenly,
the same chunks in every call) and compile's probe reuse (wt-compile-s45: ``Run.reused_probe`` for any backend):
a compiled call that took an earlier call's probe sized its chunks by the budget alone, so its chunks were not the
plan's (integrated gradients' 32 steps of one image: 16 + 16 in the eager and the first compiled call, one chunk
of 32 in the compiled calls after it: another graph compiled, other bits).
"""
from __future__ import annotations

import pytest
import torch

import salience
from salience._core import engine as _engine

from conftest import counting_backend, unchanged
from test_s45_compile import _net

pytestmark = pytest.mark.usefixtures("fresh_perf_state")  # the engine's caches as in a fresh process


def _chunks_seen(monkeypatch) -> list:
 seen, accumulate = [], _engine.accumulate

 def recording(*a, **k):
     sums = accumulate(*a, **k)
     seen.append(list(sums.chunks))
     return sums

 monkeypatch.setattr(_engine, "accumulate", recording)
 return seen


@pytest.mark.parametrize("eager_first", [False, True])
def test_compiled_calls_that_reuse_a_probe_run_the_chunk_plan(monkeypatch, eager_first):
 """IG with 32 steps of one 8x8 image on a CPU: the plan is two chunks of 16
 (``engine.planned_chunk(32, cap >= 32) == 16``) in every call, eager or compiled, cold or warm. Old code: the
 compiled calls that took an earlier call's probe ran one chunk of 32 (the budget's cap) and compiled a graph of
 that size too."""
 model, x = _net(), torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
 # the small-pass rule (engine.CPU_SMALL_PASS_BYTES) would plan this tiny model's 32 items as one pass, the budget's
 # size too: off here, so that a plan that differs from the budget's is what the compiled calls must follow
 monkeypatch.setattr(_engine, "CPU_SMALL_PASS_BYTES", 0)
 assert _engine.planned_chunk(32, 1 << 20, torch.device("cpu"), False) == 16
 seen = _chunks_seen(monkeypatch)
 backend, graphs, _ = counting_backend()

 def call(**kw):
     return salience.integrated_gradients(model, x, 2, steps=32, reduce=None, **kw)

 ref = call() if eager_first else None
 outs = []
 for _ in range(3):
     with unchanged(model):
         outs.append(call(compile=backend))
 assert seen == [[16, 16]] * len(seen) and len(seen) == 3 + eager_first, seen
 assert graphs == [[16]], graphs  # one graph, of the plan's size
 for out in outs[1:]:
     torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-6 * float(outs[0].abs().max()))
 if ref is not None:
     torch.testing.assert_close(outs[0], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
