"""Session 60, issue 15: session 57's one measurement (benchmarks/perturbation_mem_s57.py: VmHWM above the RSS before
the call, the setup's freed heap trimmed first) with the call's CPU seconds added (``cpu_seconds``:
``time.process_time`` around the call alone; the machine's other load moves it less than the wall seconds).

    BENCH_CONFIG='{...}' python benchmarks/perturbation_mem_s60.py METHOD IMPL
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perturbation_mem_s57 as s57  # noqa: E402

_cpu: list[float] = []
_call = s57._call


def _by_hand(method: str, impl: str, torch, model, x, target) -> None:
    """``loop bf16+channels_last``: the plain loop given bf16 + channels-last by hand (the model and ``x`` converted
    inside the measured call, the loop under ``torch.autocast``), as benchmarks/heap_trim_s59.py; session 57's
    ``_call`` runs any other impl (it ran this one as the fp32 contiguous loop)."""
    if not impl.endswith(s57.bench.BY_HAND) or impl.startswith("salience"):
        return _call(method, impl, torch, model, x, target)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s57.bench._loop(method, torch, model, x, target)


def _timed(*args, **kwargs) -> None:
    t0 = time.process_time()
    _by_hand(*args, **kwargs)
    _cpu.append(time.process_time() - t0)


s57._call = _timed

if __name__ == "__main__":
    out = s57.one(sys.argv[1].strip(), sys.argv[2].strip())
    out["cpu_seconds"] = _cpu[-1]
    print(json.dumps(out))
