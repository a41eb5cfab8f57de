"""Session 57: the model guard's enter + exit alone, and a warm vanilla call, main's tree against this checkout's.

    PYTHONPATH=src taskset -c 1 python benchmarks/guard_cost_s57.py --old-src main --rounds 12 \
        --out benchmarks/guard-cost-s57.md

Each tree runs in a worker process of its own (``sides_s55.py``: ``git archive`` of ``--old-src``), one thread; the
parent asks one side at a time and rotates the order by round (ABC, BCA, CAB, ...). A round times each piece on each side
as the best of 5 repeats of a short block of calls (many short reps: the best is what load adds least to), on the demo
CNN (``shapes``, 64 px) and resnet18 (random weights, 64 px), one image: the guard's enter + exit alone
(``with model_guard(model): pass``), a warm ``salience.vanilla`` call, and the bare forward + backward of the same
input (the reference of issue 19); a third side is the branch with its exit's value check patched out. The table
gives min / median / max over the rounds, per side, and the machine's
load (``/proc/loadavg``) before and after: the machine is shared, so the wall times move with the load; the minimum
is the figure load changes least. Not part of salience and not run by the tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides_s55 import SRC, Side, archive_src, commit_of, import_from, round_order, serve  # noqa: E402

PIECES = ("guard enter + exit", "vanilla call", "bare forward + backward")
MODELS = ("shapes", "resnet18")
BLOCK = {"guard enter + exit": 50, "vanilla call": 10, "bare forward + backward": 10}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "shapes":
        from salience.demo.zoo import load_demo
        return load_demo(name).eval()
    import torchvision
    return getattr(torchvision.models, name)(weights=None).eval()


def worker(src: str) -> None:
    """One side: salience from ``src``; each piece timed on request (the best of 5 repeats of a block, us a call)."""
    import_from(src)
    torch.set_num_threads(1)
    import salience
    from salience._core.guard import model_guard

    if os.environ.get("GUARD_COST_S57_NO_CHECK"):  # the branch without its exit's value check: what that check costs
        from salience._core.guard import values

        def no_check(self):
            self.moved = set()
        values.Snapshot.check = no_check

    fns = {}
    for name in MODELS:
        model = _build(name)
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            target = int(model(x).argmax(1))

        def enter(model=model):
            with model_guard(model):
                pass

        def call(model=model, x=x, target=target):
            salience.vanilla(model, x, target)

        def bare(model=model, x=x, target=target):
            xi = x.clone().requires_grad_(True)
            model(xi)[0, target].backward()

        for p in model.parameters():
            p.requires_grad_(False)
        for f in (enter, call, bare):
            for _ in range(5):
                f()
        fns[name] = {"guard enter + exit": enter, "vanilla call": call, "bare forward + backward": bare}

    def piece(model: str, label: str) -> dict:
        n = BLOCK[label]
        return {"us": min(timeit.repeat(fns[model][label], number=n, repeat=5)) / n * 1e6}
    serve(src, {"piece": piece})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", default="main", help="a folder holding salience, or a git revision (main)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        worker(args.worker)
        return 0
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    old = commit_of(args.old_src)
    new = commit_of("HEAD")
    sides = {"main": Side(__file__, archive_src(args.old_src), "main"), "branch": Side(__file__, str(SRC), "branch")}
    os.environ["GUARD_COST_S57_NO_CHECK"] = "1"  # read by that worker only (its environment copied at its start)
    sides["branch, no exit check"] = Side(__file__, str(SRC), "branch, no exit check")
    del os.environ["GUARD_COST_S57_NO_CHECK"]
    got: dict = {(m, p, s): [] for m in MODELS for p in PIECES for s in sides}
    try:
        for r in range(args.rounds):
            for m in MODELS:
                for p in PIECES:
                    for s in round_order(list(sides), r):
                        got[(m, p, s)].append(sides[s].ask(cmd="piece", model=m, label=p)["us"])
    finally:
        for side in sides.values():
            side.close()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    lines = [f"# The guard's enter + exit and a vanilla call: main ({old}) against the branch ({new} and its working "
             "tree)", "",
             f"command: `python benchmarks/guard_cost_s57.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"torch {torch.__version__}, one thread, cores {sorted(os.sched_getaffinity(0))}; "
             f"load (1, 5, 15 min) before {' '.join(load_before)}, after {' '.join(load_after)} (a shared machine, "
             "2 cores, other helpers' tests running: the wall times move with it; the minimum moves least)", "",
             f"{args.rounds} rounds, the sides' order rotating; each figure a round's best of 5 repeats of a block "
             "of calls; us a call: min / median / max over the rounds", "",
             "The third side is the branch with its exit's value check (``Snapshot.check``) patched out in its worker: "
             "what the per-object cuts alone give, and what the check (a write that moves no version counter put back) "
             "costs; not a mode of salience.", "",
             "| model | piece | main | branch | branch, no exit check | branch / main (min; median) | "
             "no check / main (min; median) |", "|---|---|---|---|---|---|---|"]

    def mmm(v: list) -> str:
        return f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}"

    def ratio(b: list, a: list) -> str:
        return f"{min(b) / min(a):.3f}; {statistics.median(b) / statistics.median(a):.3f}"
    for m in MODELS:
        for p in PIECES:
            a, b, c = got[(m, p, "main")], got[(m, p, "branch")], got[(m, p, "branch, no exit check")]
            lines.append(f"| {m} | {p} | {mmm(a)} | {mmm(b)} | {mmm(c)} | {ratio(b, a)} | {ratio(c, a)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
