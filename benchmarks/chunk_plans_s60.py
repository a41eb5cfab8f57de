"""The CPU gradient-chunk plans of torchvision models from the memory probe (no timing): main's rule, the rule as
first written for issues 19/16 ("authored": any multiple of 8 up to 64 that fits 24 MiB) and this tree's.

    PYTHONPATH=src python benchmarks/chunk_plans_s60.py --out benchmarks/chunk-plans-s60.md

Each model (random weights, ``weights=None``) at each size: one call of SmoothGrad (16 samples) and of integrated
gradients (32 steps) per number of images, stopped right after the engine's memory probe (its pass of one item per
image) at ``engine.gradient_chunk_cap``, whose arguments (the probe's bytes per item, the weights' bytes, the largest
block per item) the rules take. The plan: ``engine.planned_chunk`` under this process's default budget (printed),
the passes as ``count x size``. Plans depend on nothing timed, so load does not change them."""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import salience  # noqa: E402
from salience._core import engine as E, perf as P  # noqa: E402

SPECS = [("resnet18", 224, (1, 2, 4, 8, 32)), ("mobilenet_v3_large", 224, (1, 2, 8, 32)),
         ("mobilenet_v3_small", 224, (1, 2, 8, 32)), ("vgg11", 64, (1, 2, 4, 8, 32)), ("vgg11", 224, (1, 2, 8)),
         ("vit_b_16", 112, (1, 2, 4, 8, 32)), ("vit_b_16", 224, (1, 2, 8)), ("swin_t", 224, (1, 2, 8)),
         ("convnext_tiny", 224, (1, 2, 8)), ("resnet18", 32, (1, 2, 8)), ("resnet18", 112, (1, 2, 8)),
         ("resnet50", 64, (1, 2, 8)), ("vit_b_16", 144, (1, 2)), ("vit_b_16", 160, (1, 2)),
         ("convnext_tiny", 112, (1, 2)), ("mobilenet_v3_small", 64, (1, 2, 8))]


class _Stop(Exception):
    pass


def _main_cap(per_item, weights, block):
    cap = 32 if per_item is not None and weights >= 16 * per_item else 16
    under = E.mmap_chunk_cap(block)
    return cap if under is None else min(cap, under)


def _authored_cap(per_item, weights, block):
    cap = 32 if weights >= 8 * per_item else 16
    small = min(64, (24 << 20) // per_item)
    cap = max(cap, small - small % 8)
    under = E.mmap_chunk_cap(block)
    return cap if under is None else min(cap, under)


def _fmt(total: int, size: int) -> str:
    sizes = [min(size, total - s) for s in range(0, total, size)]
    return " + ".join(f"{sum(1 for _ in g)} x {k}" for k, g in itertools.groupby(sizes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    budget = E.default_budget(torch.device("cpu"))
    real = E.gradient_chunk_cap
    seen: list = []

    def spy(*a):
        seen.append(a)
        raise _Stop

    E.gradient_chunk_cap = spy
    rows = []
    for name, px, counts in SPECS:
        kw = {"image_size": px} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(weights=None, **kw).eval()
        for n in counts:
            for meth in ("sg", "ig"):
                x = torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(0))
                P.clear_cache()
                seen.clear()
                try:
                    if meth == "sg":
                        salience.smoothgrad(model, x, 1, samples=16, seed=1)
                    else:
                        salience.integrated_gradients(model, x, 1, steps=32)
                except _Stop:
                    pass
                per_item, weights, block = seen[-1]
                total = n * (16 if meth == "sg" else 32)
                cap = E.chunk_size(per_item, budget, n)
                plans = [_fmt(total, E.planned_chunk(total, cap, torch.device("cpu"), False, rule(per_item, weights,
                                                                                                  block)))
                         for rule in (_main_cap, _authored_cap, real)]
                rows.append(f"| {name} | {px} | {n} | {meth} | {total} | {per_item / 1e6:.2f} | "
                            f"{weights / per_item:.1f} | {block / 1e6:.2f} | {cap} | " + " | ".join(plans) + " |")
                print(rows[-1], flush=True)
    head = ["# CPU gradient-chunk plans from the memory probe (main, as authored, this tree)", "",
            "Command:", "", "    PYTHONPATH=src python benchmarks/chunk_plans_s60.py --out benchmarks/chunk-plans-s60.md",
            "", f"torch {torch.__version__}, torchvision {torchvision.__version__}; glibc's mmap bound "
            f"{'on' if E._glibc_heap() else 'off'}; default budget {budget >> 20} MiB (a quarter of MemAvailable, at "
            "most 1 GiB). Columns: bytes per item (MB), the weights in items' bytes, the largest block per item (MB), "
            "the budget's cap in items, then the plans.", "",
            "| model | px | images | method | items | MB / item | weights / item | block MB | budget cap | main | "
            "authored | this |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    text = "\n".join(head + rows) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
