"""Session 49 (record): the model guard's cost per call before and after it copies containers' contents (and
inference-tensor attributes) of modules not from torch.nn; and its per-module records (``guard.ModuleState``) against
the shared record (``guard.record_state``) on the same modules, for the question whether they can be one class.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard_s49.py --old /tmp/old-record49/src --new src \
        --rounds 7 --out benchmarks/guard-s49.json

Each round runs one process per salience tree (the old tree, then the new one, the order turned every round), one
thread; each process times, interleaved in a rotating order, per call (``time.thread_time``, median of its repeats):

- ``guard``: ``with model_guard(model): pass`` on torchvision's resnet18 (random weights, seed 0), the guard alone;
- ``guard_containers``: the same on resnet18 wrapped in a module holding a list of 64 items, a dict of 16 and a set of
  8, and an empty list on each of its 8 BasicBlocks (11 containers, which the new guard copies and compares);
- ``vanilla16``: ``salience.vanilla(model, xs, targets, reduce=None)`` on 16 images at 64 px (the profile_s47_sg1 unit);
- ``bare16``: the bare pass of the same 16 (``engine_speed.bare``): ``vanilla16 - bare16`` is salience's cost around it;
- ``take_states``: ``guard.ModuleState(m, None)`` for each of resnet18's 62 modules (the guard's records, made and
  thrown away; the guard makes them through ``_Entry.entry`` and ``take``, the same work);
- ``record_state``: ``guard.record_state(modules)`` on the same modules (the shared record, every module's attributes
  and buffers with copies: what one class serving both would make without the guard's plain-layer path).
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

HERE = Path(__file__).resolve().parent


def child(repeats: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    from auto_declines_s44 import build
    from engine_speed import bare

    import salience
    from salience._core import guard
    from salience._core.guard import model_guard

    torch.set_num_threads(1)
    model, frozen = build("resnet18", 64), build("resnet18", 64)
    for p in frozen.parameters():
        p.requires_grad_(False)

    class Holder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.hist = list(range(64))
            self.cfg = {f"k{i}": i for i in range(16)}
            self.tags = set(range(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    held = Holder(build("resnet18", 64)).eval()
    for m in held.modules():
        if type(m).__name__ == "BasicBlock":
            m.trace = []
    modules = list(model.modules())
    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tgt = model(x).argmax(1)

    def guard_only(m: nn.Module) -> None:
        with model_guard(m):
            pass

    units = {
        "guard": (lambda: guard_only(model), 50),
        "guard_containers": (lambda: guard_only(held), 50),
        "vanilla16": (lambda: salience.vanilla(model, x, tgt, reduce=None), 1),
        "bare16": (lambda: bare(frozen, x, tgt, 16), 1),
        "take_states": (lambda: [guard.ModuleState(m, None) for m in modules], 50),
        "record_state": (lambda: guard.record_state(modules), 50),
    }
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
    times["salience"] = str(Path(salience.__file__).resolve())
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="the old tree's src folder")
    ap.add_argument("--new", help="the new tree's src folder")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return 0
    trees = {"old": args.old, "new": args.new}
    load = open("/proc/loadavg").read().split()[:3]
    runs: dict = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=str(Path(trees[name]).resolve()))
            out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    table: dict = {"cpu": "AMD EPYC (AVX512-BF16, no AMX), core 1, one thread", "loadavg_before": load,
                   "loadavg_after": open("/proc/loadavg").read().split()[:3], "rounds": args.rounds, "units_ms": {}}
    print(f"load before {load}; ms per call, min / median / max over {args.rounds} rounds (each a median of "
          f"{args.repeats})")
    for unit in ("guard", "guard_containers", "vanilla16", "bare16", "take_states", "record_state"):
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
