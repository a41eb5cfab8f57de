"""Session 49: what ``allocator="system"`` and a user's ``MALLOC_*`` settings leave of glibc's state. Memory only.

    taskset -c 0 python benchmarks/alloc_s49.py --processes 3 --out benchmarks/alloc-s49

Each case runs in **fresh processes** (``--child``), one at a time: resnet18 (random weights, seed 0) at 64 px, one
image; the case's allocator set (``salience.set_performance(allocator=...)``) and environment; one SmoothGrad 16 call
(``samples=16``, the defaults otherwise: the first CPU pass, where the default's lever acts), 2 more untimed, then
``--calls`` calls, each one's minor page faults (``getrusage``). Per process at the end: what salience did (the
lever tried / raised, ``mallopt`` called), whether glibc maps a 2 MiB and a 24 MiB block now (``mallinfo2().hblks``
while the block lives: the mmap threshold's side of each), and the resident memory (``VmRSS``) and its peak
(``VmHWM``). No times: page faults and memory only, so no lock is needed (``taskset -c 0``).

Cases: ``default`` (the library's default); ``system`` (the off switch); ``default`` with
``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment (the user's threshold: heeded since session 49).
Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
CASES = (("default", {}), ("system", {}), ("default", {"MALLOC_MMAP_THRESHOLD_": "1048576"}))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _mapped(libc, n: int) -> int:
    before = libc.mallinfo2().hblks
    block = libc.malloc(n)
    got = libc.mallinfo2().hblks - before
    libc.free(block)
    return got


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) // 1024  # MiB


def child(allocator: str, calls: int) -> dict:
    import torch
    import torchvision

    import salience
    from salience._core import malloc

    torch.set_num_threads(1)
    torch.manual_seed(0)
    salience.set_performance(allocator=allocator)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        salience.smoothgrad(model, x, 1, samples=16, seed=0)
    faults = []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        salience.smoothgrad(model, x, 1, samples=16, seed=0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.mallinfo2.restype, libc.mallinfo2.argtypes = _Mallinfo2, []
    return {"tried": malloc._raise_tried, "raised": malloc._raised, "mallopt": malloc.thresholds_fixed(),
            "tuned": malloc.user_tuned(), "faults": faults, "mapped_2mib": _mapped(libc, 2 << 20),
            "mapped_24mib": _mapped(libc, 24 << 20), "rss_mib": _status("VmRSS"), "hwm_mib": _status("VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/alloc-s49")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only write OUT.md again from OUT.json")
    a = ap.parse_args()
    if a.render:
        render(a)
        return
    if a.child:
        print(json.dumps(child(a.child, a.calls)))
        return
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    base["PYTHONPATH"] = str(SRC) + os.pathsep + base.get("PYTHONPATH", "")
    rows = []
    for p in range(a.processes):
        for allocator, extra in CASES:
            out = subprocess.run([sys.executable, __file__, "--child", allocator, "--calls", str(a.calls)],
                                 capture_output=True, text=True, env={**base, **extra}, timeout=600)
            if out.returncode:
                raise SystemExit(out.stderr)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"allocator": allocator, "env": extra, "process": p, **got})
            print(rows[-1], flush=True)
    load = open("/proc/loadavg").read().split()[:3]
    Path(a.out + ".json").write_text(json.dumps({"load": load, "cpu": _cpu(), "rows": rows}, indent=1))
    render(a)


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def render(a: argparse.Namespace) -> None:
    """``OUT.md`` from ``OUT.json``."""
    got = json.loads(Path(a.out + ".json").read_text())
    rows, load = got["rows"], got["load"]
    lines = [f"# {__doc__.splitlines()[0]}", "", f"`taskset -c 0 python benchmarks/alloc_s49.py --processes "
             f"{a.processes} --calls {a.calls} --out {a.out}`; {got.get('cpu') or _cpu()} (2 cores), "
             f"{os.confstr('CS_GNU_LIBC_VERSION')}; resnet18 at 64 px, SmoothGrad 16 of one image, one "
             f"thread; load at the end {' '.join(load)}. Per fresh process: the lever tried / raised, mallopt, the "
             "environment's setting found, minor faults of each warm call (median), whether glibc maps a 2 MiB / "
             "24 MiB block at the end (1: mapped; a block the heap has free space for is not mapped whatever the "
             "threshold), VmRSS / VmHWM MiB.", "",
             "| allocator | environment | process | lever tried / raised | mallopt | setting found | faults a call "
             "(median; all) | 2 MiB / 24 MiB mapped | RSS / peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        env = ", ".join(f"{k}={v}" for k, v in r["env"].items()) or "-"
        lines.append(f"| {r['allocator']} | {env} | {r['process']} | {r['tried']} / {r['raised']} | {r['mallopt']} | "
                     f"{r['tuned'] or '-'} | {statistics.median(r['faults']):,.0f}; {r['faults']} | "
                     f"{r['mapped_2mib']} / {r['mapped_24mib']} | {r['rss_mib']} / {r['hwm_mib']} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
