"""Session 56: a warm call's time, best of many, for this checkout's salience and another tree's, alternating.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/fixcost-ab-s56.py --old-src /tmp/old-fixcost/src \
        --rounds 3 --out benchmarks/fixcost-ab-s56.md

The fixed cost per call a session cuts is tens of microseconds (a walk of the model, 9 to 90 us), against calls of
3.8 ms (vanilla on the demo CNN) to 180 ms (SmoothGrad 16 on resnet18 at 64 px) on a machine other processes load:
auto_declines_s47.py's per-round times (about a second of calls each) move by more than that from round to round.
Here each round runs, in a fresh process per tree (the two trees in turn, the order swapped each round), ``repeat``
timed blocks of ``number`` calls and keeps the best block's time per call (``timeit``'s rule: the fastest block is
the one least disturbed), its process CPU time too. The bare forward + backward pass (of one image, the same
process) is timed the same way, so each tree's "over bare" is of its own round. One thread, core 1, under the lock.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

CASES = {"shapes:64:vanilla": (200, 7), "resnet18:64:vanilla": (10, 5), "resnet18:64:smoothgrad": (3, 5)}


def _worker(case: str) -> dict:
    """Best-of-blocks seconds per call (wall and process CPU) of salience's call and of the bare passes."""

    import torch
    import salience

    torch.set_num_threads(1)
    name, px, method = case.split(":")
    if name == "shapes":
        from salience.demo.zoo import load_demo
        model = load_demo("shapes")
    else:
        import torchvision
        model = getattr(torchvision.models, name)().eval()
    x = torch.rand(1, 3, int(px), int(px), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = model(x).argmax(1)
    if method == "vanilla":
        def call() -> object:
            return salience.vanilla(model, x, t)

        def bare() -> object:
            xx = x.clone().requires_grad_(True)
            return torch.autograd.grad(model(xx)[0, int(t)], xx)
    else:
        def call() -> object:
            return salience.smoothgrad(model, x, t, samples=16, reduce=None)

        def bare() -> object:  # the 16 copies in one pass, as the defaults' chunk
            xx = x.repeat(16, 1, 1, 1).requires_grad_(True)
            return torch.autograd.grad(model(xx)[:, int(t)].sum(), xx)
    number, repeat = CASES[case]
    out = {}
    for label, f in (("call", call), ("bare", bare)):
        for _ in range(3):
            f()
        walls, cpus = [], []
        for _ in range(repeat):
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(number):
                f()
            walls.append((time.perf_counter() - w0) / number)
            cpus.append((time.process_time() - c0) / number)
        out[label] = {"wall": min(walls), "cpu": min(cpus)}
    out["salience"] = salience.__file__
    return out


def _run(src: str, case: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, "--worker", case], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", default=None, help="the other tree's src (main's archive)")
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker)))
        return
    sides = {"new": str(SRC), "old": args.old_src}
    load0 = os.getloadavg()
    results: dict = {c: {s: [] for s in sides} for c in args.case}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for case in args.case:
            for s in order:
                results[case][s].append(_run(sides[s], case))
        print(f"round {r + 1} done (load {os.getloadavg()[0]:.2f})", flush=True)
    _write(args, results, load0, os.getloadavg())


def _write(args: argparse.Namespace, results: dict, load0: tuple, load1: tuple) -> None:
    """The table: per case and tree, each round's best call and bare times (ms), call - bare and call / bare."""
    lines = [f"# A warm call's best-of-blocks time, this checkout (new) and {args.old_src} (old), {args.rounds} rounds",
             "", f"AMD EPYC (no AVX512), 1 thread, core 1 under /tmp/bench.lock; load {load0} at the start, {load1} at "
             f"the end. `python benchmarks/fixcost-ab-s56.py --old-src {args.old_src} --rounds {args.rounds}`. Each "
             "round: a fresh process per tree, the best of its blocks (per call); new and old in turn, the order "
             "swapped each round.", "",
             "| case | tree | call ms per round (wall) | bare ms per round | call - bare ms per round | call / bare per "
             "round | call - bare, CPU ms per round |", "|---|---|---|---|---|---|---|"]
    for case, by in results.items():
        for s, rounds in by.items():
            call = [r["call"]["wall"] * 1e3 for r in rounds]
            bare = [r["bare"]["wall"] * 1e3 for r in rounds]
            cpu = [(r["call"]["cpu"] - r["bare"]["cpu"]) * 1e3 for r in rounds]
            fmt = lambda v, d=3: ", ".join(f"{x:.{d}f}" for x in v)  # noqa: E731
            lines.append(f"| {case} | {s} | {fmt(call)} | {fmt(bare)} | {fmt([a - b for a, b in zip(call, bare)])} | "
                         f"{fmt([a / b for a, b in zip(call, bare)])} | {fmt(cpu)} |")
        new = [r["call"]["wall"] for r in by["new"]]
        old = [r["call"]["wall"] for r in by["old"]]
        lines.append("")
        lines.append(f"- {case}: new - old call per round "
                     f"{', '.join(f'{(a - b) * 1e3:+.3f}' for a, b in zip(new, old))} ms; new / old "
                     f"{', '.join(f'{a / b:.3f}' for a, b in zip(new, old))}")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
