"""Issues 16 / 19, session 49: the warm defaults against the bare eager passes where ``auto`` declines, this branch's
code (``new``) and main's archive (``old``) interleaved, each in a fresh worker process per round, glibc's dynamic
mmap threshold raised in both before the model is built (session 48's ``on`` state: the bare peers and salience's
calls of a process run in the same heap state).

    git -C /work/main archive HEAD | tar -x -C /tmp/ig49-main
    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s49.py --old-src /tmp/ig49-main/src \\
        --case resnet18:64:integrated_gradients resnet18:64:smoothgrad --rounds 5 --min-round 2 --noisy-bare \\
        --out benchmarks/auto-declines-s49

A copy of ``auto_declines_s48.py`` with the two workers being two trees, not two heap states, and one unit more for
integrated gradients: ``defaults, target=None`` (each image's predicted class, which session 49 reads in the path's
own first pass; before, x ran a pass of its own first). Units per worker: ``bare N`` (forward + input gradient of the
call's items, N at a time, parameters frozen), ``defaults`` (the call with the predicted classes given),
``defaults, target=None``. The parent sends one unit at a time, in an order that rotates from round to round; each
figure is seconds per call (``reps`` calls a unit, fixed from an untimed call so a unit takes about ``--min-round``
s). The table gives, per round, each unit over the best bare pass of its own process and of either process, and
new / old of the same unit. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from auto_declines_s47 import Worker as Worker47  # this folder is sys.path[0] (run as python benchmarks/NAME.py)

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TREES = ("new", "old")


def worker() -> None:
    """Raise the heap's threshold, then serve one JSON request a line on stdin, one JSON answer a line on stdout."""
    import resource

    sys.path.insert(0, str(HERE))
    from salience._core import malloc

    took = malloc.raise_dynamic_threshold()
    sys.stderr.write(f"heap threshold raised: {took}\n")
    import torch

    from auto_declines_s44 import build, chunk_sizes
    from engine_speed import bare

    import salience

    torch.set_num_threads(1)
    units: dict = {}

    def setup(req: dict) -> dict:
        model = build(req["model"], req["size"])
        frozen = build(req["model"], req["size"])
        for p in frozen.parameters():
            p.requires_grad_(False)
        b = req["images"]
        x = torch.rand(b, 3, req["size"], req["size"], generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            target = model(x).argmax(1)
        method = req["method"]
        n = {"smoothgrad": req["samples"], "integrated_gradients": req["steps"]}[method]

        def call(m, t=target):
            if method == "smoothgrad":
                return salience.smoothgrad(m, x, t, samples=n, reduce=None)
            return salience.integrated_gradients(m, x, t, steps=n, reduce=None)

        chunks = chunk_sizes(model, call)
        chunks_none = chunk_sizes(model, lambda m: call(m, None))
        items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)
        if req.get("noisy") and method == "smoothgrad":  # SmoothGrad's bare passes on noisy copies (session 47)
            sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
            noise = torch.randn(items.shape, generator=torch.Generator().manual_seed(1))
            items = items + sigma.repeat(n).view(-1, 1, 1, 1) * noise
        sizes = sorted({s for s in (b, 8, 16, 32, *chunks) if s <= n * b})
        units.clear()
        units.update({f"bare {s}": (lambda s=s: bare(frozen, items, tgt, s)) for s in sizes})
        units["defaults"] = lambda: call(model)
        if method == "integrated_gradients":
            units["defaults, target=None"] = lambda: call(model, None)
        once = {}
        for k, f in units.items():  # untimed: the first (cold) call, then one timed for the repeats
            f()
            t0 = time.perf_counter()
            f()
            once[k] = time.perf_counter() - t0
        return {"salience": salience.__file__, "chunks": chunks, "chunks_target_none": chunks_none,
                "bare_sizes": sizes, "once": once}

    def timed(req: dict) -> dict:
        f, reps = units[req["unit"]], req["reps"]
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(reps):
            f()
        return {"t": (time.perf_counter() - t0) / reps,
                "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / reps,
                "cpu": (time.process_time() - c0) / reps}

    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        out = setup(req) if req["cmd"] == "setup" else timed(req)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class Worker(Worker47):
    """Session 47's worker process (its ``ask`` and ``close``) on the tree ``src``, serving this file's worker."""

    def __init__(self, src: str) -> None:
        env = dict(os.environ, PYTHONPATH=src)
        self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE.parent))


def run_round(case: str, r: int, args) -> dict:
    model, size, method = case.split(":")
    req = {"cmd": "setup", "model": model, "size": int(size), "method": method, "images": args.images,
           "samples": args.samples, "steps": args.steps, "noisy": args.noisy_bare}
    workers = {"new": Worker(str(SRC)), "old": Worker(args.old_src)}
    try:
        setups = {s: workers[s].ask(req) for s in TREES}
        units = [(s, k) for s in TREES for k in setups[s]["once"]]
        reps = {(s, k): max(1, math.ceil(args.min_round / max(setups["old"]["once"].get(k, setups[s]["once"][k]),
                                                              1e-6)))
                for s, k in units}
        load0 = os.getloadavg()
        s0 = r % len(units)
        out = {"times": {}, "faults": {}, "cpu": {}, "reps": {}}
        for s, k in units[s0:] + units[:s0]:
            got = workers[s].ask({"cmd": "time", "unit": k, "reps": reps[(s, k)]})
            key = f"{s} {k}"
            out["times"][key], out["faults"][key], out["cpu"][key] = got["t"], got["faults"], got["cpu"]
            out["reps"][key] = reps[(s, k)]
        out["load"] = (load0, os.getloadavg())
        out["chunks"] = {s: [setups[s]["chunks"], setups[s]["chunks_target_none"]] for s in TREES}
        out["salience"] = {s: setups[s]["salience"] for s in TREES}
    finally:
        for w in workers.values():
            w.close()
    print(f"  {case} round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["times"].items())
          + f" (load {load0[0]:.2f})", flush=True)
    return out


def table(jobs: dict) -> str:
    lines = ["| case | tree | unit | min ms | median ms | max ms | per round / its process's best bare | goal | "
             "per round / the best bare of either process | new / old, per round | CPU per round / its process's "
             "best bare CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, rounds in jobs.items():
        keys = list(rounds[0]["times"])
        best_any = [min(v for k, v in rd["times"].items() if " bare " in k) for rd in rounds]
        for s in TREES:
            best_own = [min(v for k, v in rd["times"].items() if k.startswith(s + " bare ")) for rd in rounds]
            cpu_own = [min(v for k, v in rd["cpu"].items() if k.startswith(s + " bare ")) for rd in rounds]
            for key in (k for k in keys if k.startswith(s + " ")):
                t = [rd["times"][key] for rd in rounds]
                own = [a / b for a, b in zip(t, best_own)]
                unit = key.split(" ", 1)[1]
                vs_old = "" if s == "old" else ", ".join(f"{rd['times'][key] / rd['times']['old ' + unit]:.3f}"
                                                         for rd in rounds)
                cpu = ", ".join(f"{rd['cpu'][key] / c:.3f}" for rd, c in zip(rounds, cpu_own))
                met = "" if " bare " in key else ("met" if max(own) <= 1.0 else "not met")
                lines.append(f"| {case} | {s} | {unit} | {min(t) * 1e3:.1f} | {statistics.median(t) * 1e3:.1f} | "
                             f"{max(t) * 1e3:.1f} | {', '.join(f'{x:.3f}' for x in own)} | {met} | "
                             f"{', '.join(f'{a / b:.3f}' for a, b in zip(t, best_any))} | {vs_old} | "
                             f"{cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--old-src", default="/tmp/ig49-main/src", help="main's archive's src (git archive of main)")
    ap.add_argument("--case", nargs="+", default=["resnet18:64:integrated_gradients"], help="model:px:method")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-round", type=float, default=1.0)
    ap.add_argument("--noisy-bare", action="store_true",
                    help="SmoothGrad's bare passes on noisy copies (sigma 0.15 of each image's range), not clean ones")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    sys.path.insert(0, str(HERE))
    from _common import cpu_name
    from auto_declines_s44 import write_report

    command = "python benchmarks/auto_declines_s49.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "rounds": args.rounds, "noisy_bare": args.noisy_bare,
              "old_src": args.old_src, "jobs": {c: [] for c in args.case}}
    t0 = time.time()
    for r in range(args.rounds):
        for case in args.case:
            report["jobs"][case].append(run_round(case, r, args))
    report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
    loads = [rd["load"][0][0] for rnds in report["jobs"].values() for rd in rnds]
    foot = (f"1-minute load per round {min(loads):.2f}-{max(loads):.2f}. Chunks (target given, target=None): "
            + "; ".join(f"{c} new {rnds[0]['chunks']['new']}, old {rnds[0]['chunks']['old']}"
                        for c, rnds in report["jobs"].items())
            + f". salience from {next(iter(report['jobs'].values()))[0]['salience']}.")
    write_report(args.out or str(HERE / "auto-declines-s49"), report,
                 f"Warm defaults against the bare passes, this branch (new) and main's archive (old) interleaved, "
                 f"fresh processes with glibc's dynamic threshold raised, {args.rounds} rounds"
                 + (", SmoothGrad's bare passes on noisy copies" if args.noisy_bare else ""),
                 "1 thread per worker, two fresh workers per case and round, fp32",
                 "Milliseconds per call. ", table(report["jobs"]), foot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
