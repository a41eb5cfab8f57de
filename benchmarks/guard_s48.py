"""Session 48 (putback): the model guard's cost per call before and after the one state record.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard_s48.py --old /tmp/old-putback/src --new src \
        --rounds 7 --out benchmarks/guard-s48.json

Each round runs one process per salience tree (the old tree, then the new one, the order turned every round), one
thread; each process times, interleaved in a rotating order, per call (``time.thread_time``, median of its repeats):

- ``guard``: ``with model_guard(model): pass`` on torchvision's resnet18 (random weights, seed 0), the guard alone;
- ``guard_tensors``: the same on resnet18 wrapped in a module holding 4 plain tensor attributes (64 floats each), which
  the new record copies (version counter and copy) and the old one held by identity only;
- ``vanilla16``: ``salience.vanilla(model, xs, targets, reduce=None)`` on 16 images at 64 px (the profile_s47_sg1 unit);
- ``bare16``: the bare pass of the same 16 (``engine_speed.bare``): ``vanilla16 - bare16`` is salience's cost around it;
- ``split_state``: Ablation-CAM's split check of the model's own state on torchvision's resnet50 (``_own_state`` and
  what changed: the old ``_state_moved``, the new ``guard.state_changes``; benchmarks/split_checks_s47.py's unit).
Prints a table (min / median / max over the rounds, per tree) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(repeats: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from auto_declines_s44 import build
    from engine_speed import bare

    import importlib

    import torchvision

    import salience
    from salience._core import guard
    from salience._core.guard import model_guard

    sc = importlib.import_module("salience.methods.scorecam")
    moved = getattr(sc, "_state_moved", None) or getattr(guard, "state_changes", None)
    r50 = torchvision.models.resnet50().eval()

    torch.set_num_threads(1)
    model, frozen = build("resnet18", 64), build("resnet18", 64)
    for p in frozen.parameters():
        p.requires_grad_(False)

    class Holder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.a, self.b, self.c, self.d = (torch.zeros(64) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    held = Holder(build("resnet18", 64)).eval()
    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tgt = model(x).argmax(1)

    def guard_only(m: nn.Module) -> None:
        with model_guard(m):
            pass

    units = {
        "guard": (lambda: guard_only(model), 50),
        "guard_tensors": (lambda: guard_only(held), 50),
        "vanilla16": (lambda: salience.vanilla(model, x, tgt, reduce=None), 1),
        "bare16": (lambda: bare(frozen, x, tgt, 16), 1),
        "split_state": (lambda: moved(sc._own_state(r50)), 20),
    }
    return timed(units, repeats, salience.__file__)


def timed(units: dict, repeats: int, tree: str) -> dict:
    """Each of ``units`` (name -> (function, calls per repeat)) warmed, then timed ``repeats`` times interleaved in a
    rotating order (``time.thread_time``): the median ms per call of each, and ``tree`` (the salience imported)."""
    for f, n in units.values():  # warm
        for _ in range(n):
            f()
    times: dict = {k: [] for k in units}
    names = list(units)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f, n = units[k]
            t0 = time.thread_time()
            for _ in range(n):
                f()
            times[k].append((time.thread_time() - t0) / n * 1e3)
    times = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    times["salience"] = str(Path(tree).resolve())
    return times


UNITS = ("guard", "guard_tensors", "vanilla16", "bare16", "split_state")


def main(file: str = __file__, run_child: Any = child, units: tuple = UNITS, doc: str = __doc__) -> int:
    """Rounds of one process per tree (``file --child``, which prints ``run_child(repeats)``), a table of ``units``
    (session 49's benchmarks/guard_s49.py runs its own units through it)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--old", help="the old tree's src folder")
    ap.add_argument("--new", help="the new tree's src folder")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(args.repeats)))
        return 0
    trees = {"old": args.old, "new": args.new}
    load = open("/proc/loadavg").read().split()[:3]
    runs: dict = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=str(Path(trees[name]).resolve()))
            out = subprocess.run([sys.executable, file, "--child", "--repeats", str(args.repeats)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    table: dict = {"cpu": "AMD EPYC (AVX512-BF16, no AMX), core 1, one thread", "loadavg_before": load,
                   "loadavg_after": open("/proc/loadavg").read().split()[:3], "rounds": args.rounds, "units_ms": {}}
    print(f"load before {load}; ms per call, min / median / max over {args.rounds} rounds (each a median of "
          f"{args.repeats})")
    for unit in units:
        row = {}
        for name in ("old", "new"):
            v = sorted(run[unit] for run in runs[name])
            row[name] = {"min": v[0], "median": v[len(v) // 2], "max": v[-1], "all": v}
        table["units_ms"][unit] = row
        print(f"{unit:16s} old {row['old']['min']:.3f} / {row['old']['median']:.3f} / {row['old']['max']:.3f}   "
              f"new {row['new']['min']:.3f} / {row['new']['median']:.3f} / {row['new']['max']:.3f}")
    table["trees"] = {name: runs[name][0]["salience"] for name in runs}
    print(f"load after {table['loadavg_after']}; trees {table['trees']}")
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
