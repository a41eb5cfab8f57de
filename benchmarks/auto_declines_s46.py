"""Issue 19: salience's defaults and ``memory_format="auto"`` against the bare eager passes, where auto declines;
session 46's version of ``auto_declines_s44.py``: short calls timed N to a round, minor page faults, fixed chunks.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s46.py --model shapes --size 64 --rounds 5
    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s46.py --model resnet18 --size 64 --chunks 16 32

One thread, fp32, SmoothGrad ``--samples`` (16) and integrated gradients ``--steps`` (32). In every round, in an
order that rotates from round to round, one process times these units:

- ``bare N``: the bare eager passes (forward + ``torch.autograd.grad`` w.r.t. the input, parameters frozen,
  default layout; ``benchmarks/engine_speed.bare``) N items at a time, for N in the images per call B, 8, 16, 32
  (at most the items) and the chunk sizes salience's defaults ran (read before the rounds from a forward pre-hook on
  a copy of the model); "best bare" is the fastest of them in that round;
- ``defaults``: salience with no option; ``auto``: ``memory_format="auto"``: each ``perf.clear_cache()``, a *cold*
  call (the engine's memory probe; auto's decision), then a *warm* call (the decision cached). The warm call is the
  one compared with the bare passes;
- ``chunk N`` (``--chunks``): salience's defaults with ``chunk=N`` (no probe, N items a pass): what a chunk rule
  that chose N would run.

Unlike the s44 script, a unit that takes less than ``--min-round`` seconds (1.0) is repeated ``reps`` times in a
round (``reps`` fixed before the rounds from an untimed call of each unit, the same in every round), and every
figure is seconds per call (the round's total over ``reps``): a one-call round of a 0.05 s call was mostly timer
and scheduler noise. ``defaults``/``auto`` repeat clear-cache + cold + warm as a whole, cold and warm timed apart.
Each unit also records the process's CPU seconds per call (``time.process_time``: on a loaded machine the wall
time counts the other processes' turns on the core, the CPU time does not) and the minor page faults per call (``getrusage``'s ``ru_minflt``): memory a pass takes from
the kernel anew (the allocator gave it back after an earlier pass).

``--allocator reuse`` fixes glibc's mmap and trim thresholds first (:func:`salience._core.malloc.keep_freed_memory`,
what ``allocator="reuse"`` does; for the whole process, so the bare passes run with them too): what the page faults
cost the units. Writes ``OUT.json`` and ``OUT.md`` (CPU, load per round, the command).
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_declines_s44 import chunk_sizes, ratio_rows, run_and_write  # noqa: E402
from engine_speed import bare  # noqa: E402

import salience  # noqa: E402
from salience._core import perf  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def job(model, frozen, x, method: str, args) -> dict:
    b = x.shape[0]
    with torch.no_grad():
        target = model(x).argmax(1)
    n = args.samples if method == "smoothgrad" else args.steps
    items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)

    def call(m, **kw):
        if method == "smoothgrad":
            return salience.smoothgrad(m, x, target, samples=args.samples, reduce=None, **kw)
        return salience.integrated_gradients(m, x, target, steps=args.steps, reduce=None, **kw)

    chunks = chunk_sizes(model, call)  # the defaults' chunks in a warm call
    sizes = sorted({s for s in (b, 8, 16, 32, *chunks) if s <= n * b})
    single = {f"bare {s}": (lambda s=s: bare(frozen, items, tgt, s)) for s in sizes}
    for c in args.chunks:
        if c <= n * b:
            single[f"chunk {c}"] = lambda c=c: call(model, chunk=c)
    opts = {"defaults": {}, "auto": {"memory_format": "auto"}}

    def pair(k):  # clear, cold, warm: ((cold s, cold faults, cold CPU s), (warm ...))
        perf.clear_cache()
        out = []
        with salience.performance(**opts[k]):
            for _ in ("cold", "warm"):
                f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
                call(model)
                out.append((time.perf_counter() - t0, _faults() - f0, time.process_time() - c0))
        return out

    reps = {}
    for k, f in single.items():  # one untimed call of each before the rounds; it sets the unit's repeats
        t0 = time.perf_counter()
        f()
        reps[k] = max(1, math.ceil(args.min_round / max(time.perf_counter() - t0, 1e-6)))
    for k in opts:
        t0 = time.perf_counter()
        pair(k)
        reps[k] = max(1, math.ceil(args.min_round / max(time.perf_counter() - t0, 1e-6)))
    keys = list(single) + [f"{m} {w}" for m in opts for w in ("cold", "warm")]
    times = {k: [] for k in keys}
    faults = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    loads = []
    names = list(single) + list(opts)
    for r in range(args.rounds):
        load0 = os.getloadavg()
        s0 = r % len(names)
        for k in names[s0:] + names[:s0]:
            if k in single:
                f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
                for _ in range(reps[k]):
                    single[k]()
                times[k].append((time.perf_counter() - t0) / reps[k])
                faults[k].append((_faults() - f0) / reps[k])
                cpu[k].append((time.process_time() - c0) / reps[k])
                continue
            got = [pair(k) for _ in range(reps[k])]
            for i, w in enumerate(("cold", "warm")):
                times[f"{k} {w}"].append(sum(g[i][0] for g in got) / reps[k])
                faults[f"{k} {w}"].append(sum(g[i][1] for g in got) / reps[k])
                cpu[f"{k} {w}"].append(sum(g[i][2] for g in got) / reps[k])
        loads.append((load0, os.getloadavg()))
        print(f"  {method} B={b} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in times.items())
              + f" (load {load0[0]:.2f})", flush=True)
    return {"method": method, "images": b, "items": n * b, "defaults_chunks": chunks, "bare_sizes": sizes,
            "reps_per_round": reps, "times_s_per_call": times, "minor_faults_per_call": faults, "cpu_s_per_call": cpu,
            "loadavg_before_after": loads}


def table(jobs) -> str:
    lines = ["| method | images | unit | calls a round | min s/call | median s/call | max s/call | minor faults/call "
             "(median) | per round / that round's best bare | per round / that round's bare B | met (every round "
             "<= 1.00 of best bare) | CPU per round / that round's best bare CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        t, fl, cpu = j["times_s_per_call"], j["minor_faults_per_call"], j.get("cpu_s_per_call")
        bares = [k for k in t if k.startswith("bare")]
        best_cpu = [min(r) for r in zip(*(cpu[k] for k in bares))] if cpu else []
        for k, (lo, med, hi), rb, rB, met in ratio_rows(t, j["images"]):
            reps = j["reps_per_round"][k.rsplit(" ", 1)[0] if k.endswith(("cold", "warm")) else k]
            lines.append(f"| {j['method']} | {j['images']} | {k} | {reps} | {lo:.4f} | {med:.4f} | {hi:.4f} | "
                         f"{statistics.median(fl[k]):.0f} | {', '.join(f'{x:.3f}' for x in rb)} | "
                         f"{', '.join(f'{x:.3f}' for x in rB)} | {met} | "
                         f"{', '.join(f'{a / c:.3f}' for a, c in zip(cpu[k], best_cpu)) if cpu else ''} |")
    return "\n".join(lines)


def notes(jobs) -> str:
    out = []
    for j in jobs:
        t = j["times_s_per_call"]
        first = {m: [c - w for c, w in zip(t[f"{m} cold"], t[f"{m} warm"])] for m in ("defaults", "auto")}
        out.append(f"- {j['method']} B={j['images']}: defaults' chunks {j['defaults_chunks']}; bare sizes "
                   f"{j['bare_sizes']}; cold - warm per round: defaults "
                   f"{', '.join(f'{x:.4f}' for x in first['defaults'])} s, auto "
                   f"{', '.join(f'{x:.4f}' for x in first['auto'])} s")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["smoothgrad", "integrated_gradients"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="also time the defaults with chunk=N")
    ap.add_argument("--min-round", type=float, default=1.0, help="repeat a unit in a round up to this many seconds")
    ap.add_argument("--allocator", default="default", choices=["default", "reuse"],
                    help="reuse: glibc's thresholds fixed before anything runs (process-wide: the bare passes too)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.allocator == "reuse":
        from salience._core.malloc import keep_freed_memory
        keep_freed_memory()
    return run_and_write(args, argv, "s46", job, table, notes,
                         "Seconds per call (a round's calls over their number). ")


if __name__ == "__main__":
    raise SystemExit(main())
