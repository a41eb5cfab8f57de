"""The pieces of a call's own work that session 59 changed, each timed alone: main's code against this tree's.

    PYTHONPATH=src python benchmarks/fixed_cost_pieces_s59.py --old-src /tmp/old-fixcost59/src --rounds 5 \\
        --out benchmarks/fixed-cost-pieces-s59.md

One worker process per code and round, the two alternating (old first in odd rounds); each piece in a warm loop, one
thread, ``time.thread_time``, best of 5 blocks per worker; a cell: min / median / max over the rounds, us a call. Also
the count of tensor operations (ATen calls, a ``TorchDispatchMode``) of a warm ``vanilla`` call besides its bare pass
on the tiny model (deterministic: no load changes it)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PIECES = ["check_input (tiny model)", "target scores' finiteness, deferred, scope end",
          "probabilities look, deferred, scope end", "both in one scope (as in a vanilla call)",
          "_multi.finish, one target, max_abs", "IG path points, 32 x (1, 3, 16, 16)", "IG path points, 32 x (1, 3, 64, 64)",
          "vanilla's tensor ops besides the bare pass (count)"]


def worker(src: str) -> None:
    sys.path.insert(0, src)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import salience
    from salience._core import autograd, derived
    from salience.methods import _multi
    from salience.methods.integrated import PathPoints
    from salience.targets import as_target

    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    x = torch.rand(1, 3, 16, 16)
    out = torch.randn(1, 5)
    s = out[:, 1]
    targets = [as_target(1)]
    maps = torch.randn(1, 1, 3, 16, 16)

    def finite():
        with derived.run_scope():
            autograd._finite_scores([s], targets)

    def probs():
        with derived.run_scope():
            autograd._warn_if_probabilities(out)

    def both():
        with derived.run_scope():
            autograd._warn_if_probabilities(out)
            autograd._finite_scores([s], targets)

    alphas = [i / 32 for i in range(1, 33)]
    small = PathPoints(x, torch.zeros_like(x), alphas)
    x64 = torch.rand(1, 3, 64, 64)
    big = PathPoints(x64, torch.zeros_like(x64), alphas)
    fns = [lambda: autograd.check_input(x, m), finite, probs, both,
           lambda: _multi.finish(maps, None, "max_abs", False, targets), lambda: small(0, 32), lambda: big(0, 32)]
    res = []
    for f in fns:
        for _ in range(300):
            f()
        best = float("inf")
        for _ in range(5):
            t = time.thread_time()
            for _ in range(1000):
                f()
            best = min(best, (time.thread_time() - t) / 1000 * 1e6)
        res.append(best)

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    cls = int(m(x).argmax(1))
    for _ in range(3):
        salience.vanilla(m, x, cls)
    with Ops() as own:
        salience.vanilla(m, x, cls)
    with Ops() as bare:
        xi = x.clone().requires_grad_(True)
        o = m(xi)
        torch.autograd.grad(o[:, cls].sum(), xi)[0].abs().amax(1)
    res.append(own.n - bare.n)
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--new-src", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "src"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    runs: dict = {"old": [], "new": []}
    loads = []
    for r in range(args.rounds):
        for code in (("old", "new") if r % 2 == 0 else ("new", "old")):
            src = args.old_src if code == "old" else args.new_src
            loads.append(open("/proc/loadavg").read().split()[0])
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--old-src", args.old_src, "--worker", src],
                                  env=dict(os.environ, PYTHONPATH=src), capture_output=True, text=True, check=True)
            runs[code].append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = ["# The pieces session 59 changed, timed alone (us a call), main's code against this tree's", "",
             "`PYTHONPATH=src python benchmarks/fixed_cost_pieces_s59.py --old-src /tmp/old-fixcost59/src --rounds "
             f"{args.rounds} --out benchmarks/fixed-cost-pieces-s59.md`: {args.rounds} rounds, the codes' workers "
             "alternating; one thread, `time.thread_time`, best of 5 blocks of 1,000 calls per worker; 1-minute load at "
             f"each worker's start: {', '.join(loads)} (2 cores shared with other sessions).", "",
             "| piece | main: min / median / max | this tree: min / median / max |", "|---|---|---|"]
    for i, name in enumerate(PIECES):
        cells = []
        for code in ("old", "new"):
            v = sorted(r[i] for r in runs[code])
            cells.append(f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}" if i < len(PIECES) - 1
                         else f"{v[0]}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
