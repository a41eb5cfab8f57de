"""Issue 19, session 47: a salience call's warm defaults against the bare eager passes, this branch's code and another
tree's (``--old-src``, main's archive) timed interleaved in one run.

    git -C /work/main archive HEAD src | tar -x -C /tmp/old-fixed
    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s47.py --old-src /tmp/old-fixed/src \\
        --case resnet18:64:smoothgrad resnet18:64:integrated_gradients shapes:64:vanilla --rounds 5 \\
        --out benchmarks/auto-declines-s47-fixed

Two worker processes, one importing salience from this checkout's ``src`` (``new``) and one from ``--old-src``
(``old``), each with one thread, the same model (``auto_declines_s44.build``, seed 0), image and target. The parent
sends one unit at a time, so only one process runs at once; in every round the units run in an order that rotates
from round to round:

- ``bare N`` (each worker): the bare eager passes (forward + ``torch.autograd.grad`` w.r.t. the input, parameters
  frozen, default layout; ``engine_speed.bare``) N items at a time, N in the call's images, 8, 16, 32 (at most the
  items) and the defaults' chunk sizes; "best bare" is the fastest bare unit of either worker in that round;
- ``new defaults`` / ``old defaults``: a warm call with no option (the worker made untimed calls first, and the
  per-model caches are kept: every timed call is a warm one).

A unit is repeated ``reps`` times in a round (fixed before the rounds from an untimed call so a round takes about
``--min-round`` s, the same for both workers' twin units), every figure in seconds per call; each unit also records
the worker's CPU seconds (``time.process_time``) and minor page faults per call. Writes ``OUT.json`` and ``OUT.md``
(CPU, load per round, the command); the goal column says "met" only where every round is <= 1.00.
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

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


# ------------------------------------------------------------------------------------------------- the worker


def worker() -> None:
    """Serve the parent: one JSON request a line on stdin, one JSON answer a line on stdout."""
    import resource

    import torch

    sys.path.insert(0, str(HERE))
    from auto_declines_s44 import build, chunk_sizes
    from engine_speed import bare

    import salience

    torch.set_num_threads(1)
    units: dict = {}

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

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
        n = {"smoothgrad": req["samples"], "integrated_gradients": req["steps"], "vanilla": 1}[method]

        def call(m):
            if method == "smoothgrad":
                return salience.smoothgrad(m, x, target, samples=n, reduce=None)
            if method == "integrated_gradients":
                return salience.integrated_gradients(m, x, target, steps=n, reduce=None)
            return salience.vanilla(m, x, target)

        chunks = chunk_sizes(model, call)
        items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)
        if req.get("noisy") and method == "smoothgrad":  # the bare passes on noisy copies as SmoothGrad's (made once,
            # before the rounds: the data's cost, not the noise's; max-pool's cost depends on the data, session 47)
            sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
            noise = torch.randn(items.shape, generator=torch.Generator().manual_seed(1))
            items = items + sigma.repeat(n).view(-1, 1, 1, 1) * noise
        sizes = sorted({s for s in (b, 8, 16, 32, *chunks) if s <= n * b})
        units.clear()
        units.update({f"bare {s}": (lambda s=s: bare(frozen, items, tgt, s)) for s in sizes})
        units["defaults"] = lambda: call(model)
        once = {}
        for k, f in units.items():  # untimed: the first (cold) call, then one timed for the repeats
            f()
            t0 = time.perf_counter()
            f()
            once[k] = time.perf_counter() - t0
        return {"salience": salience.__file__, "chunks": chunks, "bare_sizes": sizes, "once": once}

    def timed(req: dict) -> dict:
        f, reps = units[req["unit"]], req["reps"]
        f0, c0, t0 = faults(), time.process_time(), time.perf_counter()
        for _ in range(reps):
            f()
        return {"t": (time.perf_counter() - t0) / reps, "faults": (faults() - f0) / reps,
                "cpu": (time.process_time() - c0) / reps}

    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        out = setup(req) if req["cmd"] == "setup" else timed(req)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------- the parent


class Worker:
    def __init__(self, src: str) -> None:
        env = dict(os.environ, PYTHONPATH=src)
        self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE.parent))

    def ask(self, req: dict) -> dict:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died (request {req})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except Exception:
            pass
        self.p.wait(timeout=30)


def run_case(workers: dict, case: str, args) -> dict:
    model, size, method = case.split(":")
    req = {"cmd": "setup", "model": model, "size": int(size), "method": method, "images": args.images,
           "samples": args.samples, "steps": args.steps, "noisy": args.noisy_bare}
    setups = {w: workers[w].ask(req) for w in workers}
    units = [(w, k) for w in workers for k in setups[w]["once"]]
    reps = {}
    for w, k in units:  # the twin units of the two workers repeat as often (the new one's timing decides)
        t = setups["new"]["once"][k] if k in setups["new"]["once"] else setups[w]["once"][k]
        reps[(w, k)] = max(1, math.ceil(args.min_round / max(t, 1e-6)))
    keys = [f"{w} {k}" for w, k in units]
    times: dict = {k: [] for k in keys}
    faults: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    loads = []
    for r in range(args.rounds):
        load0 = os.getloadavg()
        s0 = r % len(units)
        for w, k in units[s0:] + units[:s0]:
            got = workers[w].ask({"cmd": "time", "unit": k, "reps": reps[(w, k)]})
            times[f"{w} {k}"].append(got["t"])
            faults[f"{w} {k}"].append(got["faults"])
            cpu[f"{w} {k}"].append(got["cpu"])
        loads.append((load0, os.getloadavg()))
        print(f"  {case} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in times.items())
              + f" (load {load0[0]:.2f})", flush=True)
    return {"case": case, "images": args.images, "setups": setups, "reps_per_round": {f"{w} {k}": v for (w, k), v
                                                                                     in reps.items()},
            "times_s_per_call": times, "minor_faults_per_call": faults, "cpu_s_per_call": cpu,
            "loadavg_before_after": loads}


def table(jobs) -> str:
    lines = ["| case | unit | calls a round | min s/call | median s/call | max s/call | minor faults/call (median) | "
             "per round / that round's best bare | goal (every round <= 1.00) | CPU per round / best bare CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        t, fl, cpu = j["times_s_per_call"], j["minor_faults_per_call"], j["cpu_s_per_call"]
        bares = [k for k in t if " bare " in k]
        best = [min(r) for r in zip(*(t[k] for k in bares))]
        best_cpu = [min(r) for r in zip(*(cpu[k] for k in bares))]
        for k, v in t.items():
            rb = [a / c for a, c in zip(v, best)]
            met = "" if " bare " in k else ("met" if max(rb) <= 1.0 else "not met")
            lines.append(f"| {j['case']} @{j['images']} | {k} | {j['reps_per_round'][k]} | {min(v):.4f} | "
                         f"{statistics.median(v):.4f} | {max(v):.4f} | {statistics.median(fl[k]):.0f} | "
                         f"{', '.join(f'{x:.3f}' for x in rb)} | {met} | "
                         f"{', '.join(f'{a / c:.3f}' for a, c in zip(cpu[k], best_cpu))} |")
    return "\n".join(lines)


def notes(jobs) -> str:
    out = []
    for j in jobs:
        t = j["times_s_per_call"]
        new, old = t["new defaults"], t["old defaults"]
        out.append(f"- {j['case']} @{j['images']}: new / old defaults per round "
                   f"{', '.join(f'{a / b:.3f}' for a, b in zip(new, old))}; new - old per round "
                   f"{', '.join(f'{(a - b) * 1e3:+.2f}' for a, b in zip(new, old))} ms; defaults' chunks "
                   f"{j['setups']['new']['chunks']} (old {j['setups']['old']['chunks']}); bare sizes "
                   f"{j['setups']['new']['bare_sizes']}; salience from {j['setups']['new']['salience']} / "
                   f"{j['setups']['old']['salience']}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--old-src", default=None, help="the other tree's src (main's archive)")
    ap.add_argument("--case", nargs="+", default=["resnet18:64:smoothgrad"], help="model:px:method")
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
    if not args.old_src:
        ap.error("--old-src is required (e.g. /tmp/old-fixed/src from `git -C /work/main archive HEAD src`)")
    sys.path.insert(0, str(HERE))
    from _common import cpu_name
    from auto_declines_s44 import write_report

    command = "python benchmarks/auto_declines_s47.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "old_src": args.old_src, "jobs": []}
    t0 = time.time()
    workers = {"new": Worker(str(SRC)), "old": Worker(args.old_src)}
    try:
        for case in args.case:
            report["jobs"].append(run_case(workers, case, args))
    finally:
        for w in workers.values():
            w.close()
    report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
    out = args.out or str(HERE / "auto-declines-s47")
    write_report(out, report, f"Warm defaults against the bare passes, this branch (new) and {args.old_src} (old) "
                 f"interleaved, {args.rounds} rounds" + (", SmoothGrad's bare passes on noisy copies" if args.noisy_bare else ""),
                 f"1 thread per worker on cores {report['affinity']}, fp32",
                 "Seconds per call. ", table(report["jobs"]), notes(report["jobs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
