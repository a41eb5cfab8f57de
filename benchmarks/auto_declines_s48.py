"""Issue 19, session 48: the warm defaults against the bare eager passes where ``auto`` declines, in fresh processes
WITH and WITHOUT glibc's dynamic mmap threshold raised before the first pass (``malloc.raise_dynamic_threshold``).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s48.py \\
        --case resnet18:64:smoothgrad resnet18:64:integrated_gradients shapes:64:vanilla --rounds 5 --noisy-bare \\
        --out benchmarks/auto-declines-s48-heap

Every round starts, for every case, two **fresh** worker processes of this checkout's ``src`` (session 47's worker,
``auto_declines_s47.worker``: the same model, image, target, units and repeats), one per heap state:

- ``off``: the lever disabled before anything runs (``malloc._raise_tried = True``): glibc as it is, the heap's state
  whatever the process's history makes it (session 47's workers);
- ``on``: ``malloc.raise_dynamic_threshold()`` called before the model is built (where this tree has no such function,
  the same: one block just under 32 MiB allocated and freed through ctypes), so the bare peers and salience's
  calls of that process run in the same heap state: like for like.

The parent sends one unit at a time, so only one process runs at once, the units of both workers in an order that
rotates from round to round; each figure is seconds per call (``reps`` calls a unit, fixed from an untimed call so a
unit takes about ``--min-round`` s), with the worker's minor page faults per call. The table gives, per round, the
defaults' warm call over the best bare pass **of its own process** (like for like) and of either process. Writes
``OUT.json`` and ``OUT.md``.
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
STATES = ("off", "on")


def worker(state: str) -> None:
    """Set the heap state before anything is allocated for the case, then serve as session 47's worker."""
    sys.path.insert(0, str(HERE))
    from salience._core import malloc

    took = None
    if state == "off":
        malloc._raise_tried = True  # salience's own call (allocator="default", the first pass) then does nothing
    elif hasattr(malloc, "raise_dynamic_threshold"):
        took = malloc.raise_dynamic_threshold()
    else:
        from heap_s48 import _libc, prime
        took = prime(_libc())
    sys.stderr.write(f"heap state {state}: raised {took}\n")
    from auto_declines_s47 import worker as serve
    serve()


class Worker(Worker47):
    """Session 47's worker process (its ``ask`` and ``close``), started in a heap ``state``."""

    def __init__(self, src: str, state: str) -> None:
        env = dict(os.environ, PYTHONPATH=src)
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", state], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE.parent))


def run_round(case: str, r: int, args) -> dict:
    model, size, method = case.split(":")
    req = {"cmd": "setup", "model": model, "size": int(size), "method": method, "images": args.images,
           "samples": args.samples, "steps": args.steps, "noisy": args.noisy_bare}
    workers = {s: Worker(str(SRC), s) for s in STATES}
    try:
        setups = {s: workers[s].ask(req) for s in STATES}
        units = [(s, k) for s in STATES for k in setups[s]["once"]]
        reps = {(s, k): max(1, math.ceil(args.min_round / max(setups["off"]["once"].get(k, setups[s]["once"][k]),
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
        out["chunks"] = {s: setups[s]["chunks"] for s in STATES}
        out["salience"] = setups["off"]["salience"]
    finally:
        for w in workers.values():
            w.close()
    print(f"  {case} round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({out['faults'][k]:.0f} faults)"
                                                 for k, v in out["times"].items()) + f" (load {load0[0]:.2f})",
          flush=True)
    return out


def table(jobs: dict) -> str:
    lines = ["| case | heap | unit | min ms | median ms | max ms | minor faults a call, per round | "
             "per round / its process's best bare | goal | per round / the best bare of either process | "
             "CPU per round / its process's best bare CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, rounds in jobs.items():
        keys = list(rounds[0]["times"])
        best_any = [min(v for k, v in rd["times"].items() if " bare " in k) for rd in rounds]
        for s in STATES:
            best_own = [min(v for k, v in rd["times"].items() if k.startswith(s + " bare ")) for rd in rounds]
            cpu_own = [min(v for k, v in rd["cpu"].items() if k.startswith(s + " bare ")) for rd in rounds]
            for key in (k for k in keys if k.startswith(s + " ")):
                t = [rd["times"][key] for rd in rounds]
                fl = ", ".join(f"{rd['faults'][key]:.0f}" for rd in rounds)
                own = [a / b for a, b in zip(t, best_own)]
                cpu_ratio = ", ".join(f"{rd['cpu'][key] / c:.3f}" for rd, c in zip(rounds, cpu_own))
                met = "" if " bare " in key else ("met" if max(own) <= 1.0 else "not met")
                lines.append(f"| {case} | {s} | {key.split(' ', 1)[1]} | {min(t) * 1e3:.1f} | "
                             f"{statistics.median(t) * 1e3:.1f} | {max(t) * 1e3:.1f} | {fl} | "
                             f"{', '.join(f'{x:.3f}' for x in own)} | {met} | "
                             f"{', '.join(f'{a / b:.3f}' for a, b in zip(t, best_any))} | "
                             f"{cpu_ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=STATES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", nargs="+", default=["resnet18:64:smoothgrad"], help="model:px:method")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-round", type=float, default=1.0)
    ap.add_argument("--noisy-bare", action="store_true",
                    help="SmoothGrad's bare passes on noisy copies (sigma 0.15 of each image's range), not clean ones")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None, help="write OUT.md again from OUT.json (no run)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    sys.path.insert(0, str(HERE))
    from _common import cpu_name

    if args.render:
        report = json.loads(Path(args.render + ".json").read_text())
        write(args.render, report, report["rounds"], report["noisy_bare"])
        return 0

    command = "python benchmarks/auto_declines_s48.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "rounds": args.rounds, "noisy_bare": args.noisy_bare,
              "jobs": {c: [] for c in args.case}}
    t0 = time.time()
    for r in range(args.rounds):
        for case in args.case:
            report["jobs"][case].append(run_round(case, r, args))
    report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
    write(args.out or str(HERE / "auto-declines-s48-heap"), report, args.rounds, args.noisy_bare)
    return 0


def write(out: str, report: dict, rounds: int, noisy: bool) -> None:
    from auto_declines_s44 import write_report

    loads = [rd["load"][0][0] for rnds in report["jobs"].values() for rd in rnds]
    foot = (f"1-minute load per round {min(loads):.2f}-{max(loads):.2f}. Chunks of the defaults: "
            + "; ".join(f"{c} {rnds[0]['chunks']['off']}" for c, rnds in report["jobs"].items())
            + f". salience from {next(iter(report['jobs'].values()))[0]['salience']}.")
    write_report(out, report,
                 f"Warm defaults against the bare passes, fresh processes with glibc's dynamic threshold raised (on) and "
                 f"as it is (off), {rounds} rounds" + (", SmoothGrad's bare passes on noisy copies" if noisy else ""),
                 "1 thread per worker, two fresh workers per case and round, fp32",
                 "Milliseconds per call. ", table(report["jobs"]), foot)


if __name__ == "__main__":
    raise SystemExit(main())
