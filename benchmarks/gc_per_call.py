"""Garbage collections per call: N warm calls of a method on ``transformers.py``'s ``vit_tiny`` (torchvision's
``VisionTransformer`` in ViT-Ti's layout: 152 modules, 152 parameters, 64 px, one image), torchvision imported,
after one full collection; prints the collections of each generation and the time spent in them.

    taskset -c 1 python benchmarks/gc_per_call.py attention_rollout 2000
    taskset -c 1 python benchmarks/gc_per_call.py transformer_attribution 1000

A young collection starts once 700 more objects were allocated than freed; every tenth one moves the objects it
finds alive into the old generation, and when those moved since the last full collection pass a quarter of the
old generation, a full collection runs (0.13 to 0.4 s with torch and torchvision imported, ~340k objects). A call
that holds over 700 Python objects at once starts a young collection every call (docs/performance.md, session 35).
"""
from __future__ import annotations

import argparse
import collections
import gc
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, make_images, predicted  # noqa: E402

import salience  # noqa: E402


def tiny_vit():
    """``transformers.py``'s model, that file loaded under another name (``transformers`` is Hugging Face's)."""
    spec = importlib.util.spec_from_file_location("benchmarks_transformers", HERE / "transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_vit(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", choices=["attention_rollout", "transformer_attribution", "vanilla", "gradcam"])
    ap.add_argument("calls", type=int, nargs="?", default=1000)
    args = ap.parse_args(argv)
    model = tiny_vit()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = make_images(1, 64)
    target = predicted(model, x)
    fn = getattr(salience, args.method)
    for _ in range(3):
        fn(model, x, target)
    gc.collect()
    count: collections.Counter = collections.Counter()
    spent: collections.Counter = collections.Counter()
    start = [0.0]

    def timer(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            count[info["generation"]] += 1
            spent[info["generation"]] += time.perf_counter() - start[0]

    gc.callbacks.append(timer)
    t = time.perf_counter()
    for _ in range(args.calls):
        fn(model, x, target)
    wall = time.perf_counter() - t
    gc.callbacks.remove(timer)
    total = sum(spent.values())
    print(f"{args.method} x{args.calls}: {wall / args.calls * 1e3:.2f} ms a call; collections of generation 0 / 1 / 2: "
          f"{count[0]} / {count[1]} / {count[2]}; {total * 1e3:.0f} ms in them ({total / args.calls * 1e3:.3f} ms a "
          f"call), {spent[2] * 1e3:.0f} ms in full ones; {len(gc.get_objects())} objects tracked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
