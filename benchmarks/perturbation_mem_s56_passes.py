"""Session 56: the call's memory after each forward pass of the model (diagnostic of where a peak is set).

    BENCH_CONFIG='{...}' PYTHONHASHSEED=0 setarch -R taskset -c 0 python benchmarks/perturbation_mem_s56_passes.py \
        METHOD IMPL

as benchmarks/perturbation_mem_s55.py (the setup, the heap trimmed, the high-water mark reset), with a forward hook on
the model that records after every pass its RSS, VmHWM (MiB, the process's) and glibc's heap (``mallinfo2``: arena,
mapped blocks, in use, free). Prints the call's peak above the RSS before it, then one JSON line per pass.
``PRE=<n>``: salience's noted-scores buffers (``salience._core.derived._Noted``) made for ``n`` items at once (no
growth by doubling in the call), a patch of this process only.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perturbation_mem_s55 as m55  # noqa: E402

bench = m55.bench
MIB = 2 ** 20


def _stat() -> dict:
    return dict(rss=round(bench._rss() / MIB, 1), hwm=round(m55._status("VmHWM") / MIB, 1), **m55._heap())


def _presize(n: int) -> None:
    import torch
    from salience._core import derived

    def init(self, k: int) -> None:
        self.bad = torch.zeros(n, k, dtype=torch.bool)
        self.img = torch.zeros(n, dtype=torch.int64)
        self.cls = torch.zeros(n, k, dtype=torch.int64)
        self.n, self.batch = 0, None

    derived._Noted.__init__ = init


def main(method: str, impl: str) -> None:
    warnings.simplefilter("ignore")
    torch, model, x, target = bench._setup()
    importlib.import_module("salience")  # imported before the RSS is read, as the s55 measure

    if os.environ.get("PRE"):
        _presize(int(os.environ["PRE"]))
    torch.set_num_threads(1)
    m55._trim()
    before = bench._rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    samples = []
    model.register_forward_hook(lambda mod, i, o: samples.append(dict(_stat(), n=int(i[0].shape[0]))))
    t0 = time.perf_counter()
    m55._call(method, impl, torch, model, x, target)
    print(json.dumps(dict(method=method, impl=impl, masks=bench.MASKS, before=round(before / MIB, 1),
                          peak=round((m55._status("VmHWM") - before) / MIB, 1), s=time.perf_counter() - t0)))
    for s in samples:
        print(json.dumps(s))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
