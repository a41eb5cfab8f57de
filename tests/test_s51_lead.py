"""Session 51, the lead's merges: ``salience._core.perf.clear_cache()`` (which forgets every per-model cache: tests,
or a user who changed what a model's forward reads) also drops the copies of large tensor attributes that ``Found``
keeps across calls (session 51's guard work: a 100 MiB table copied once, not once a call), so the memory they hold
goes with the other caches."""
from __future__ import annotations

import torch

import salience
from salience._core import perf
from salience._core.guard import values as guard

from test_s51_guard import Table


def test_clear_cache_drops_the_kept_copies():
    torch.manual_seed(0)
    m = Table().eval()
    salience.smoothgrad(m, torch.randn(1, 3, 8, 8), 1, samples=2)
    assert id(m.table) in guard.KEPT
    perf.clear_cache()
    assert id(m.table) not in guard.KEPT and guard._kept_bytes == 0
    m.seen.clear()
    salience.smoothgrad(m, torch.randn(1, 3, 8, 8), 1, samples=2)  # copied again, the passes as before
    assert id(m.table) in guard.KEPT and set(m.seen) == {1.0}
