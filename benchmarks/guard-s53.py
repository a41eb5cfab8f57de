"""Session 53 (guard53): the guard's cost per call with a 100 MiB plain tensor attribute, now copied (kept across calls).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard-s53.py --old /tmp/old-guard53/src --new src \
        --rounds 7 --repeats 11 --out benchmarks/guard-s53.json

The harness is session 52's (``benchmarks/guard-s52.py``, imported: each round one process per tree, their order
turned every round, one thread; each process times its units interleaved in a rotating order, each call by
``time.perf_counter``, and reports the median of its repeats per unit; min / median / max per unit and tree over the
rounds, and each round's figures, in the JSON). Only the units differ (this file's :func:`child`), on torchvision's
resnet18 (random weights, seed 0), 32 px, one image (the large values: a plain attribute ``table`` of the ResNet):

- ``guard``: ``with model_guard(resnet18): pass``, the guard alone, resnet18 itself;
- ``guard_table100``: the same on resnet18 holding a 100 MiB float32 plain tensor attribute (not a buffer), not
  written (a lookup table: the common case);
- ``guard_table100_written``: the same, the block writing the table in place (``table.mul_(2)``: the forward's write;
  main leaves it written, with a warning, this branch puts it back from the kept copy);
- ``vanilla_table100``: ``salience.vanilla`` on that model (the table read, not written);
- ``occlusion_array100``: ``salience.occlusion`` (window 8, stride 8) on resnet18 holding a 100 MiB NumPy array,
  not written (compared whole with its kept copy four times a call on main, three on this branch).
"""
from __future__ import annotations

import collections
import importlib.util
import os
import statistics
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


def child(repeats: int) -> dict:
    import warnings

    import numpy as np
    import torch
    import torchvision
    from torch import nn

    import salience
    from salience._core.guard import model_guard

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # main's warning that the written table stays written, each call

    def holding(table: object) -> nn.Module:
        """resnet18 with a plain attribute ``table`` (torchvision's ResNet is no torch.nn layer: its attributes are
        recorded)."""
        m = torchvision.models.resnet18().eval()
        m.table = table
        return m

    models = {"plain": torchvision.models.resnet18().eval(),
              "table100": holding(torch.arange(25 * 2 ** 20, dtype=torch.float32)),
              "array100": holding(np.arange(25 * 2 ** 20, dtype=np.float32))}
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def guard_only(m: nn.Module, write: bool = False) -> None:
        with model_guard(m):
            if write:
                m.table.mul_(2.0)

    units = {"guard": lambda: guard_only(models["plain"]),
             "guard_table100": lambda: guard_only(models["table100"]),
             "guard_table100_written": lambda: guard_only(models["table100"], write=True),
             "vanilla_table100": lambda: salience.vanilla(models["table100"], x, 1),
             "occlusion_array100": lambda: salience.occlusion(models["array100"], x, 1, window=8, stride=8)}
    return _medians(units, repeats)


def _medians(units: dict, repeats: int) -> dict:
    """Each unit's median time (ms) over ``repeats`` calls, the units interleaved in an order turned each repeat, after
    three warm-up calls each (the first call's caches, the kept copies)."""
    names = list(units)
    rotated = [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]
    times: dict = collections.defaultdict(list)
    for name in names * 3 + [name for order in rotated for name in order]:
        start = time.perf_counter()
        units[name]()
        times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v[3:]) for name, v in times.items()}


def _harness():
    """Session 52's benchmark module, its child process this file running :func:`child`."""
    spec = importlib.util.spec_from_file_location("guard_s52", os.path.join(_HERE, "guard-s52.py"))
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    harness.child = child
    harness.__file__ = os.path.abspath(__file__)
    return harness


if __name__ == "__main__":
    _harness().main()
