"""The per-call cost of ``precision="bf16-mixed"``'s rule deciding a call (``islands``' predicates ``_product``,
``_tensor_method``, ``_method_twin``, what ``HighResolutionFp32.__torch_function__`` asks of every torch call) before
and after session 45's ``SPELLS_A_METHOD``, both modules loaded in one process (main's from OLD_SRC), interleaved
rounds; the calls a CNN makes on its maps (``F.conv2d``, ``F.batch_norm``, ``F.relu6``, ``torch.cat``, ``x + y``):

    flock /tmp/bench.lock taskset -c 1 python benchmarks/islands_dispatch_s45.py OLD_SRC NEW_SRC

prints per round and module the ns per decision (min of 5 timeit repeats of 200k decisions)."""
from __future__ import annotations

import importlib.util
import sys
import timeit

import torch
import torch.nn.functional as F


def load(src: str, name: str):
    spec = importlib.util.spec_from_file_location(name, f"{src}/salience/_core/islands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mods = {"old": load(sys.argv[1], "islands_old"), "new": load(sys.argv[2], "islands_new")}
CALLS = [F.conv2d, F.batch_norm, F.relu6, torch.cat, torch.Tensor.__add__]


def decide(m):
    for f in CALLS:
        m._product(f, (), {}) or m._tensor_method(f) or m._method_twin(f)


for r in range(3):
    for name, m in mods.items():
        best = min(timeit.repeat(lambda: decide(m), number=40_000, repeat=5))
        print(f"round {r + 1} {name} {best / 40_000 / len(CALLS) * 1e9:.0f} ns per decision")
