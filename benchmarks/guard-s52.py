"""Session 52 (guard52): a vanilla-gradient call's cost with and without the attributes the guard now records.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard-s52.py --old /tmp/old-guard52/src --new src \
        --rounds 5 --repeats 15 --out benchmarks/guard-s52.json

Each round runs one process per salience tree (``--old``, ``--new``), their order turned every round; one thread; each
process times its units interleaved in a rotating order, each call by ``time.perf_counter`` (the copies' page faults
count), and reports the median of its repeats per unit. Units, all ``salience.vanilla(model, x, 1)`` on torchvision's
resnet18 (random weights, seed 0) at 32 px, one image, unless said:

- ``plain``: resnet18 itself (the guard's cost on a model with none of these attributes must not rise);
- ``guard``: ``with model_guard(resnet18): pass``, the guard alone (``guard_array100``, ``guard_inference100``: on
  those models below);
- ``array2``: resnet18 in a module holding a 2 MiB float32 NumPy array (not written);
- ``array100``: the same with a 100 MiB one;
- ``inference100``: a 100 MiB inference tensor instead;
- ``tuples``: a module holding a tuple of a 64-float tensor and a list, and a namedtuple of two such tensors.

Prints min / median / max per unit and tree over the rounds and writes them (and each round's figures) as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time


def child(repeats: int) -> dict:
    import numpy as np
    import torch
    import torchvision
    from torch import nn

    import salience
    from salience._core.guard import model_guard

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self, **attrs) -> None:
            super().__init__()
            self.inner = torchvision.models.resnet18().eval()
            for k, v in attrs.items():
                setattr(self, k, v)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    with torch.inference_mode():
        inference = torch.arange(25 * 2 ** 20, dtype=torch.float32)
    pair = collections.namedtuple("Pair", "a b")
    models = {
        "plain": torchvision.models.resnet18().eval(),
        # written values (np.zeros's untouched pages all map the one zero page: read from cache, a comparison too fast)
        "array2": Holder(table=np.arange(2 ** 19, dtype=np.float32)).eval(),
        "array100": Holder(table=np.arange(25 * 2 ** 20, dtype=np.float32)).eval(),
        "inference100": Holder(table=inference).eval(),
        "tuples": Holder(pair=(torch.zeros(64), [1, 2]), named=pair(torch.zeros(64), torch.ones(64))).eval(),
    }
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def guard_only(m: nn.Module) -> None:
        with model_guard(m):
            pass

    units = {name: (lambda m=m: salience.vanilla(m, x, 1)) for name, m in models.items()}
    units.update({"guard": lambda: guard_only(models["plain"]),
                  "guard_array100": lambda: guard_only(models["array100"]),
                  "guard_inference100": lambda: guard_only(models["inference100"])})
    names = list(units)
    for name in names:  # warm up: the first call's caches, the kept copies
        for _ in range(3):
            units[name]()
    times: dict = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            units[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    rounds: list = []
    load = os.getloadavg()
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        row = {}
        for tree in order:
            env = dict(os.environ, PYTHONPATH=trees[tree], OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--child", "--old", "-", "--new", "-",
                                  "--repeats", str(args.repeats)], env=env, check=True, capture_output=True, text=True)
            row[tree] = json.loads(out.stdout.strip().splitlines()[-1])
        rounds.append(row)
        print(f"round {r + 1}: " + "; ".join(f"{t} " + ", ".join(f"{k} {v:.3f}" for k, v in row[t].items())
                                             for t in trees), flush=True)
    table = {}
    for unit in rounds[0]["old"]:
        table[unit] = {t: [round(min(x[t][unit] for x in rounds), 3), round(statistics.median(x[t][unit] for x in rounds), 3),
                           round(max(x[t][unit] for x in rounds), 3)] for t in trees}
        print(f"{unit:14s} old {table[unit]['old']} new {table[unit]['new']} (ms: min, median, max)")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump({"load_before": load, "rounds": rounds, "table": table, "trees": trees}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
