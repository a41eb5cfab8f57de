"""Issue 19, session 48: does a process's heap state decide the bare pass's and SmoothGrad's time? Fresh processes.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/heap_s48.py --rounds 5 --out benchmarks/heap-s48-verify

The hypothesis (session 47's two workers of the same code, 4-9 % apart with 3,893 minor faults a call against 160):
glibc's mmap threshold starts at 128 KiB and rises only when an mmapped block is freed (to that block's size, up to
32 MiB; the trim threshold to twice that), so the size of the largest block a process has freed decides whether the
heap a pass frees is trimmed and faulted in again by the next pass.

Every unit runs in a **fresh process** (``--child``), one at a time, in an order that rotates from round to round.
A child builds resnet18 (random weights, seed 0) at 64 px and a frozen copy, the image and its target, then sets its
heap state (``--state``):

- ``as-is``: nothing;
- ``primed``: one block just under 32 MiB allocated and freed through ctypes ``malloc``/``free`` (glibc serves it by
  ``mmap`` and, at its ``free``, raises its dynamic mmap threshold to its size and the trim threshold to twice that;
  no ``mallopt``): ``salience._core.malloc.raise_dynamic_threshold`` where this tree has it, the same two calls
  otherwise;
- ``reuse``: ``salience._core.malloc.keep_freed_memory()`` (``allocator="reuse"``: both thresholds fixed by
  ``mallopt``);

then runs its unit (``--unit``) twice untimed and ``--calls`` times timed, one call at a time:

- ``bare16``: the bare eager pass of the 16 noisy copies SmoothGrad makes (sigma 0.15 of the image's range, made once
  before the calls; forward + input gradient, parameters frozen, default layout: ``engine_speed.bare``);
- ``sg16``: ``salience.smoothgrad(model, x, target, samples=16, reduce=None)`` with the defaults (one pass of 16);
- ``ig32``: ``salience.integrated_gradients(model, x, target, steps=32, reduce=None)`` with the defaults.

Per call: wall seconds, minor page faults (``getrusage``); per process at the end: resident memory (``VmRSS``), its
peak (``VmHWM``) and
glibc's ``mallinfo2`` (heap bytes, free bytes, free top, mmapped blocks). Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
BLOCK = (32 << 20) - (64 << 10)  # just under glibc's DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.mallinfo2.restype, libc.mallinfo2.argtypes = _Mallinfo2, []
    return libc


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def prime(libc) -> bool:
    """One block just under 32 MiB allocated and freed (``True`` when glibc served it by mmap: only then does its free
    raise the threshold)."""
    p = libc.malloc(BLOCK)
    mmapped = bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2)  # IS_MMAPPED
    libc.free(p)
    return mmapped


def child(args) -> None:
    import resource

    import torch

    sys.path.insert(0, str(HERE))
    from auto_declines_s44 import build
    from engine_speed import bare

    import salience
    from salience._core import malloc

    torch.set_num_threads(1)
    libc = _libc()
    model = build("resnet18", args.size)
    frozen = build("resnet18", args.size)
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    n = args.samples
    sigma = 0.15 * (x.max() - x.min())
    items = x.repeat(n, 1, 1, 1) + sigma * torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(2))
    tgt = target.repeat(n)
    state = {}
    if args.state == "primed":
        lever = getattr(malloc, "raise_dynamic_threshold", None)
        state["via"] = "malloc.raise_dynamic_threshold" if lever else "ctypes malloc/free"
        state["took"] = bool(lever()) if lever else prime(libc)
    elif args.state == "reuse":
        state["took"] = bool(malloc.keep_freed_memory())
    if args.unit == "bare16":
        def f():
            bare(frozen, items, tgt, n)
    elif args.unit == "ig32":
        def f():
            salience.integrated_gradients(model, x, target, steps=2 * n, reduce=None)
    else:
        def f():
            salience.smoothgrad(model, x, target, samples=n, reduce=None)
    f()
    f()
    times, faults = [], []
    for _ in range(args.calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    info = libc.mallinfo2()
    print(json.dumps({"times": times, "faults": faults, "rss": rss_bytes(), "hwm": hwm_bytes(), "state": state,
                      "salience": salience.__file__,
                      "mallinfo2": {k: getattr(info, k) for k in ("arena", "fordblks", "keepcost", "hblks",
                                                                     "hblkhd")}}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", default="as-is", choices=["as-is", "primed", "reuse"])
    ap.add_argument("--unit", default="sg16", choices=["bare16", "sg16", "ig32"])
    ap.add_argument("--states", nargs="+", default=["as-is", "primed", "reuse"])
    ap.add_argument("--units", nargs="+", default=["bare16", "sg16"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--src", default=str(SRC), help="the salience tree the children import")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, str(HERE))
    from _common import cpu_name

    units = [(s, u) for u in args.units for s in args.states]
    runs: dict = {f"{u} {s}": [] for s, u in units}
    loads = []
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=args.src)
    for r in range(args.rounds):
        load0 = os.getloadavg()
        k = r % len(units)
        for s, u in units[k:] + units[:k]:
            cmd = [sys.executable, __file__, "--child", "--state", s, "--unit", u, "--size", str(args.size),
                   "--samples", str(args.samples), "--calls", str(args.calls)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=str(HERE.parent))
            got = json.loads(out.stdout.strip().splitlines()[-1])
            runs[f"{u} {s}"].append(got)
            print(f"round {r + 1} {u} {s}: median {statistics.median(got['times']) * 1e3:.1f} ms, faults "
                  f"{statistics.median(got['faults']):.0f}, rss {got['rss'] / 2**20:.0f} MiB, {got['state']}",
                  flush=True)
        loads.append((load0, os.getloadavg()))
    command = "python benchmarks/heap_s48.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)), "loads": loads,
              "wall_s": time.time() - t0, "runs": runs}
    lines = [f"# A process's heap state: resnet18 at {args.size} px, the bare pass of {args.samples} noisy copies and "
             f"SmoothGrad {args.samples} (IG {2 * args.samples}) of one image, fresh processes", "",
             f"{report['cpu']}, 1 thread on cores {report['affinity']}, fp32, a fresh process per unit and round "
             f"({args.rounds} rounds, rotating order), {args.calls} timed calls a process after 2 untimed. Load "
             f"(1 min) {min(l[0][0] for l in loads):.2f}-{max(l[1][0] for l in loads):.2f}. {report['wall_s']:.0f} s. "
             f"`{command}`", "",
             "| unit | heap state | median ms a call, per round (process) | median minor faults a call, per round | "
             "RSS MiB at the end (median) | peak RSS MiB (median) | free heap MiB (`fordblks`, median) | median over the round's as-is bare |",
             "|---|---|---|---|---|---|---|---|"]
    base = [statistics.median(g["times"]) for g in runs.get("bare16 as-is", [])]
    for key, got in runs.items():
        med = [statistics.median(g["times"]) for g in got]
        flt = ", ".join(f"{statistics.median(g['faults']):.0f}" for g in got)
        ratio = ", ".join(f"{a / b:.3f}" for a, b in zip(med, base)) if base else ""
        lines.append(f"| {key.split()[0]} | {key.split()[1]} | {', '.join(f'{m * 1e3:.1f}' for m in med)} | "
                     f"{flt} | "
                     f"{statistics.median(g['rss'] for g in got) / 2**20:.0f} | "
                     f"{statistics.median(g['hwm'] for g in got) / 2**20:.0f} | "
                     f"{statistics.median(g['mallinfo2']['fordblks'] for g in got) / 2**20:.1f} | {ratio} |")
    md = "\n".join(lines) + "\n"
    out = args.out or str(HERE / "heap-s48-verify")
    Path(out + ".json").write_text(json.dumps(report, indent=2))
    Path(out + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
