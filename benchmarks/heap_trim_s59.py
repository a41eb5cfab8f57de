"""Session 59, issue 15 memory: one bf16 call's resident peak (benchmarks/perturbation_mem_s57.py's measure) with
glibc's ``malloc_trim(0)`` run at phase boundaries of the call, to see which of the heap's free bytes make the peak.

    TRIM_AT='cache,clear' BENCH_CONFIG='{...}' python benchmarks/heap_trim_s59.py METHOD IMPL

``TRIM_AT`` (comma-separated, padded with spaces to a fixed width by the runner): ``cache`` trims as each
``CastCache`` is made (a bf16 phase starts: Ablation-CAM's after its float32 clean passes, then before its chunks; RISE
and Score-CAM before their chunks), ``clear`` as one is cleared (the probing chunk done and the layout made
channels-last; a phase's end); ``none`` (or empty): nothing, session 57's measure. Prints that measure's JSON line
with ``trims`` (how many ran), ``trim_at`` and ``minflt`` (the process's minor page faults from before the
measure's setup to the call's end, ``getrusage``: what a trim costs the next passes, counted, not timed). IMPL
``loop bf16+channels_last``: benchmarks/perturbation.py's plain loop given bf16 + channels-last by hand (the model and
``x`` converted inside the measured call, the loop under ``torch.autocast``), in this measure (no trim).
"""
from __future__ import annotations

import ctypes
import json
import resource
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import perturbation_mem_s57 as measure  # noqa: E402

TRIM_AT = {t.strip() for t in os.environ.get("TRIM_AT", "").split(",")} - {"", "none"}
trims = 0


def _trim() -> None:
    global trims
    fn = ctypes.CDLL(None).malloc_trim
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_size_t]
    fn(0)
    trims += 1


def _patch() -> None:
    from salience._core import casts

    init, clear = casts.CastCache.__init__, casts.CastCache.clear

    def init_trimmed(self, *a, **k):
        if "cache" in TRIM_AT:
            _trim()
        init(self, *a, **k)

    def clear_trimmed(self):
        clear(self)
        if "clear" in TRIM_AT:
            _trim()

    casts.CastCache.__init__, casts.CastCache.clear = init_trimmed, clear_trimmed


def _call(method: str, impl: str, torch, model, x, target) -> None:
    """The measure's call, the plain loop by hand under bf16 + channels-last too (as benchmarks/perturbation.py)."""
    if not impl.endswith(measure.bench.BY_HAND):
        return _plain_call(method, impl, torch, model, x, target)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measure.bench._loop(method, torch, model, x, target)


_plain_call, measure._call = measure._call, _call

if __name__ == "__main__":
    _patch()
    out = measure.one(sys.argv[1].strip(), sys.argv[2].strip())
    out.update(trims=trims, trim_at=sorted(TRIM_AT), minflt=resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    print(json.dumps(out))
