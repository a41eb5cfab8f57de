"""Session 57 (from session 55's measure), issue 15 memory: one measurement of benchmarks/perturbation.py's configuration in this fresh process,
with what the s49 measure (``peak_mib``: VmHWM above the RSS before the call) could not tell apart.

    BENCH_CONFIG='{...}' python benchmarks/perturbation_mem_s55.py METHOD IMPL

prints one JSON line: ``peak_mib`` (s49's measure: the process's VmHWM, set by the setup's pass of the 8 images or by
the call, above the RSS before the call), ``call_peak_mib`` (the same with the high-water mark reset just before the
call, ``/proc/self/clear_refs`` 5: the call's own peak), ``setup_hwm_mib`` (the setup's high-water mark above the RSS
before the call), glibc's heap after the call (``mallinfo2``: ``arena`` bytes of the heap, ``hblkhd`` mapped blocks,
``uordblks`` in use, ``fordblks`` free) and the seconds.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import perturbation as bench  # noqa: E402

MIB = 2 ** 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> dict:
    fn = ctypes.CDLL(None).mallinfo2
    fn.restype = _Info
    i = fn()
    return {k: round(getattr(i, k) / MIB, 2) for k in ("arena", "hblkhd", "uordblks", "fordblks")}


def _trim() -> None:
    fn = ctypes.CDLL(None).malloc_trim
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_size_t]
    fn(0)


def _call(method: str, impl: str, torch, model, x, target) -> None:
    import salience

    if impl.startswith("salience"):
        opts = {"scorecam": dict(layer=bench.LAYER), "ablationcam": dict(layer=bench.LAYER),
                "rise": dict(masks=bench.MASKS)}[method]
        with salience.performance(**bench.OPTIONS[impl]):
            getattr(salience, method)(model, x, target, **opts)
    else:
        bench._loop(method, torch, model, x, target)


def one(method: str, impl: str) -> dict:
    """One measurement (see the module's docstring)."""
    warnings.simplefilter("ignore")
    # session 57: the setup's pass on the call's one thread too (on torch's default threads the heap before the call
    # held 272.3 MiB of arena, 108.6 free, against 220.0 and 56.3: both reproducible); SETUP_THREADS=0: as session 55
    if os.environ.get("SETUP_THREADS", "1") == "1":
        import torch

        torch.set_num_threads(bench.CONFIG["threads"])
    torch, model, x, target = bench._setup()
    importlib.import_module("salience")  # imported before the RSS is read, as benchmarks/perturbation.py does

    torch.set_num_threads(bench.CONFIG["threads"])
    heap_before = _heap()
    trimmed = os.environ.get("TRIM", "1") == "1"
    if trimmed:  # the setup's freed heap given back: every measurement starts from its live memory alone
        _trim()
    before, setup_hwm = bench._rss(), _status("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    _call(method, impl, torch, model, x, target)
    seconds = time.perf_counter() - t0
    call_hwm = _status("VmHWM")
    return {"seconds": seconds, "peak_mib": (max(setup_hwm, call_hwm) - before) / MIB,
            "call_peak_mib": (call_hwm - before) / MIB, "setup_hwm_mib": (setup_hwm - before) / MIB,
            "trimmed": trimmed, "rss_before_mib": before / MIB, "heap_before": heap_before, "heap_after": _heap()}


if __name__ == "__main__":
    print(json.dumps(one(sys.argv[1].strip(), sys.argv[2].strip())))  # the .sh pads them to fixed widths
