"""Integrated gradients' path points of one chunk: the branch wt-fixcost59 as its author left it against the reviewed
tree (chunks whose edges fall inside points made for their items only).

    git archive 8680e1f5 src | tar -x -C /tmp/rv59_base
    PYTHONPATH=src python benchmarks/path_points_rv59.py --old-src /tmp/rv59_base/src --rounds 5 \\
        --out benchmarks/path-points-rv59.md

One worker process per code and round, the two alternating (old first in odd rounds); each case in a warm loop, one
thread, ``time.thread_time``, best of 5 blocks; a cell: min / median / max over the rounds, us a call. Beside it the
bytes the chunk's input keeps alive (its storage: deterministic, no load changes it)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [("1 image, 32 points, items 0..31 (IG's tiny-model chunk)", 1, 64, 0, 32),
         ("4 images, 32 points, items 1..127 (the engine's second chunk)", 4, 64, 1, 128),
         ("4 images, 32 points, items 3..4 (a chunk of 2 across two points)", 4, 64, 3, 5),
         ("16 images, 32 points, items 15..48 (a chunk of 33 across three points)", 16, 32, 15, 48)]


def worker(src: str) -> None:
    sys.path.insert(0, src)
    import torch

    from salience.methods.integrated import PathPoints

    torch.set_num_threads(1)
    out = {}
    for name, b, size, start, stop in CASES:
        x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0))
        pp = PathPoints(x, torch.zeros_like(x), [i / 32 for i in range(1, 33)])
        xs = pp(start, stop)[0]
        kept = xs.untyped_storage().nbytes()
        best = float("inf")
        for _ in range(5):
            n = 200 if size <= 32 else 50
            t = time.thread_time()
            for _ in range(n):
                pp(start, stop)
            best = min(best, (time.thread_time() - t) / n * 1e6)
        out[name] = (best, kept)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--new-src", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "src"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    got: dict[str, list] = {"old": [], "new": []}
    loads = []
    for r in range(args.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for which in order:
            src = args.old_src if which == "old" else args.new_src
            loads.append(open("/proc/loadavg").read().split()[0])
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--old-src", args.old_src, "--worker", src],
                                  capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": src})
            got[which].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def cell(which: str, name: str) -> str:
        v = [g[name][0] for g in got[which]]
        return f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}"

    lines = [f"Path points of one chunk, us a call (min / median / max of {args.rounds} rounds) and the bytes the "
             f"chunk's input keeps alive; 1-minute load {min(loads)}-{max(loads)} (shared machine).", "",
             "| case | branch as left (us) | reviewed (us) | kept, branch as left | kept, reviewed |", "|---|---|---|---|---|"]
    for name, *_ in CASES:
        lines.append(f"| {name} | {cell('old', name)} | {cell('new', name)} | {got['old'][0][name][1]:,} | "
                     f"{got['new'][0][name][1]:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
