"""Issue 19, session 50: integrated gradients' warm defaults, with the class given and with ``target=None``, against
the bare eager passes, this branch's code (``new``) and main's archive (``old``) interleaved, each in a fresh worker
process per round, glibc's dynamic mmap threshold raised in both before the model is built.

    git -C /work/main archive HEAD | tar -x -C /tmp/ig50-main
    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s50.py --old-src /tmp/ig50-main/src \\
        --case resnet18:64:integrated_gradients --rounds 5 --min-round 2 --noisy-bare --out benchmarks/auto-declines-s50

``auto_declines_s49.py``'s workers, rounds and table (its ``--images`` for several images), this file's report: session 50 reads
the class of ``target=None`` off x's rows of the path's first chunk where its top two scores are far apart (before, x
ran a plain fp32 forward pass of its own first). Units per worker: ``bare N`` (forward + input gradient of the call's
items, N at a time, parameters frozen), ``defaults`` (the call with the predicted classes given), ``defaults,
target=None``. Each figure is seconds per call. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old-src", default="/tmp/ig50-main/src", help="main's archive's src (git archive of main)")
    ap.add_argument("--case", nargs="+", default=["resnet18:64:integrated_gradients"], help="model:px:method")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-round", type=float, default=1.0)
    ap.add_argument("--noisy-bare", action="store_true",
                    help="SmoothGrad's bare passes on noisy copies (sigma 0.15 of each image's range), not clean ones")
    ap.add_argument("--out", default=str(HERE / "auto-declines-s50"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import cpu_name
    from auto_declines_s44 import write_report
    from auto_declines_s49 import run_round, table

    command = "python benchmarks/auto_declines_s50.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "rounds": args.rounds, "images": args.images,
              "noisy_bare": args.noisy_bare, "old_src": args.old_src, "jobs": {c: [] for c in args.case}}
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
    write_report(args.out, report,
                 f"Integrated gradients' warm defaults (class given, target=None) against the bare passes, "
                 f"{args.images} image{'s' if args.images > 1 else ''}, {args.steps} steps, this branch (new) and "
                 f"main's archive (old) interleaved, fresh processes with glibc's dynamic threshold raised, "
                 f"{args.rounds} rounds", "1 thread per worker, two fresh workers per case and round, fp32",
                 "Milliseconds per call. ", table(report["jobs"]), foot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
