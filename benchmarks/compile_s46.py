"""Issue 19's 0.85x in fp32 (session 46): salience's compiled passes against the bare eager passes.

    python benchmarks/compile_s46.py --methods integrated_gradients --images 4 --modes freeze freeze+channels_last

One process per cell or two. The compiles run first, outside the benchmark lock, on core 0 (``--compile-core``):
each salience mode is called three times (first call: the compile; second: a frozen graph for a recurring last
chunk where there is one; third: a check that nothing compiles any more); those seconds are reported apart and
were taken on a core shared with other work. Then the process takes ``/tmp/bench.lock`` itself (``flock``, as
``flock /tmp/bench.lock`` would), moves every one of its threads to core 1 (``--time-core``) and runs the
interleaved rounds, which are all that is timed; the lock is given back before the tables are written.

resnet50 (random weights, seeded), 224 px, 1 thread, fp32. Per round, in an order that rotates from round to round:

- ``bare N`` for N in (B, *--bare): forward + ``torch.autograd.grad`` w.r.t. the input of every item
  (parameters frozen, default layout), N items per pass; the round's best of them is the reference;
- salience's modes (``MODES``): SmoothGrad 16 / IG 32 (``reduce=None``) under ``salience.performance(**options)``.

Recorded besides: each mode's chunks in its last call (``Sums.layouts``), dynamo's frame compiles during the
rounds (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``: 0 means no recompile from chunk to chunk or
call to call), and each mode's map against the eager defaults' map (one call of the defaults before the rounds, also
when the defaults are not a timed mode). Output: ``OUT-sg-B`` / ``OUT-ig-B`` ``.json`` and ``.md`` (default OUT
benchmarks/compile-s46).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_s45 import _layouts, cpu_name, interleaved, models, workload  # noqa: E402  (_layouts: each call's chunks)
from _common import cpu_isa  # noqa: E402
from engine_speed import bare  # noqa: E402  (the bare eager passes, default layout)

import salience  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = {
    "defaults": dict(),
    "freeze": dict(compile="freeze"),
    "freeze+channels_last": dict(compile="freeze", memory_format="channels_last"),
    "freeze+channels_last+fold": dict(compile="freeze", memory_format="channels_last", fold_batchnorm=True),
    "freeze+fold": dict(compile="freeze", fold_batchnorm=True),
}


def on_core(core: int) -> None:
    """Every thread of this process on ``core`` only (``os.sched_setaffinity(0, ...)`` moves the calling thread)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that ended meanwhile
            pass


def graphs() -> int:
    """Dynamo's count of the graphs it compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", choices=["smoothgrad", "integrated_gradients"],
                    default=["integrated_gradients"])
    ap.add_argument("--images", type=int, nargs="+", default=[4])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["freeze", "freeze+channels_last"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--bare", type=int, nargs="*", default=[8],
                    help="items per bare pass besides B (the round's best of them all is the reference)")
    ap.add_argument("--calls", type=int, default=3, help="calls of each salience mode before the rounds (1: the "
                    "compile only; the rounds' graph count still shows a recompile)")
    ap.add_argument("--no-defaults-map", action="store_true", help="no call of the defaults for the maps' reference "
                    "(a call of resnet50's eager passes: 1 min at 8 images); the first salience mode's map is it")
    ap.add_argument("--compile-core", type=int, default=0)
    ap.add_argument("--time-core", type=int, default=1)
    ap.add_argument("--lock", default="/tmp/bench.lock")
    ap.add_argument("--out", default=str(HERE / "compile-s46"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, frozen = models()
    command = " ".join(["python benchmarks/compile_s46.py", *(sys.argv[1:] if argv is None else argv)])
    for method in args.methods:
        for b in args.images:
            cell(model, frozen, method, b, args, command)
    return 0


def cell(model, frozen, method: str, b: int, args, command: str) -> None:
    """One method at ``b`` images: the compiles (core 0), then the rounds under the lock (core 1)."""
    on_core(args.compile_core)
    n, items, tgt, call = workload(model, method, b, args.size)

    def under(options):
        def run():
            with salience.performance(**options):
                return call()
        return run

    modes = {f"bare {k}": (lambda k=k: bare(frozen, items, tgt, k)) for k in dict.fromkeys((b, *args.bare))}
    for m in args.modes:
        modes[m] = under(MODES[m])
    # the eager defaults' map, the reference of every mode's (else the first mode's map)
    ref = None if args.no_defaults_map else under(MODES["defaults"])()
    ref_name = "the first mode's" if args.no_defaults_map else "the defaults'"
    calls, layouts, diff, compiles = {}, {}, {}, {}
    for k, f in modes.items():
        if k.startswith("bare"):
            continue
        calls[k], compiles[k] = [], []
        for _ in range(args.calls):
            g0, t0 = graphs(), time.perf_counter()
            out = f()
            calls[k].append(time.perf_counter() - t0)
            compiles[k].append(graphs() - g0)
        layouts[k] = list(_layouts)
        ref = out if ref is None else ref
        diff[k] = float((out - ref).abs().max() / ref.abs().max())
        print(f"{method} {b}: {k}: calls {', '.join(f'{s:.1f}' for s in calls[k])} s, graphs {compiles[k]}, "
              f"diff {diff[k]:.2e}, chunks {layouts[k]}", flush=True)
    names = list(modes)
    with open(args.lock, "a") as lock:
        t_wait = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited = time.perf_counter() - t_wait
        on_core(args.time_core)
        g_rounds = graphs()
        t_hold = time.perf_counter()
        times, loads = interleaved(modes, args.rounds, f"{method} {b}")
        held = time.perf_counter() - t_hold
        in_rounds = graphs() - g_rounds
        fcntl.flock(lock, fcntl.LOCK_UN)
    on_core(args.compile_core)
    best = [min(times[k][r] for k in names if k.startswith("bare")) for r in range(args.rounds)]
    report = {"method": method, "images": b, "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
              "calls_before_rounds_s": calls, "graphs_compiled_per_call": compiles, "chunks": layouts,
              "rel_max_abs_diff": diff, "diff_reference": ref_name, "graphs_compiled_in_rounds": in_rounds, "times_s": times,
              "best_bare_s": best, "loadavg_before_after": loads, "lock_wait_s": waited, "lock_held_s": held,
              "command": command}
    out = f"{args.out}-{'sg' if method == 'smoothgrad' else 'ig'}-{b}"
    Path(out + ".json").write_text(json.dumps(report, indent=2))
    met = {k: all(t / c <= 0.85 for t, c in zip(times[k], best)) for k in names if not k.startswith("bare")}
    lines = [f"# {method} {n} on resnet50, {b} image(s), {args.size} px, fp32, 1 thread (core {args.time_core}), "
             f"{args.rounds} interleaved rounds", "",
             f"CPU: {report['cpu']} ({cpu_isa()}), torch {torch.__version__}. `{command}`. The rounds held "
             f"/tmp/bench.lock {held / 60:.1f} min. Load (1/5/15 min) per round before / after: "
             + "; ".join(f"{' '.join(a)} / {' '.join(c)}" for a, c in loads)
             + f". Graphs dynamo compiled during the rounds: {in_rounds}.", "",
             "| mode | min s | median s | max s | per round / that round's best bare | 0.85x in every round | "
             "calls before the rounds s (core 0, shared) | graphs compiled per call | "
             f"max abs diff / max abs of {ref_name} map | chunks (last call) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in names:
        v = times[k]
        ratio = ", ".join(f"{a / c:.3f}" for a, c in zip(v, best))
        before = ", ".join(f"{s:.1f}" for s in calls.get(k, []))
        lines.append(f"| {k} | {min(v):.3f} | {statistics.median(v):.3f} | {max(v):.3f} | {ratio} | "
                     f"{'yes' if met.get(k) else ('no' if k in met else '')} | {before} | "
                     f"{', '.join(map(str, compiles.get(k, [])))} | "
                     f"{f'{diff[k]:.1e}' if k in diff else ''} | {', '.join(layouts.get(k, []))} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
