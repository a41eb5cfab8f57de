"""Session 43: one bf16 pass (forward + input gradient) of resnet50 with autocast's per-pass weight casts against the
same pass served the call's cached casts (salience._core.casts.WeightCasts), in alternating rounds, one process.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/casts_s43_pass.py --images 4 --size 224 --rounds 5

Each round times ``--passes`` passes of each kind (the order alternating); per pass seconds, min / median / max over
the rounds; the parameters frozen, model and input channels-last, as salience runs its passes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torchvision

from salience._core.casts import CastCache, WeightCasts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(a.images, 3, a.size, a.size).contiguous(memory_format=torch.channels_last)
    cache = CastCache()

    def passes(cached: bool) -> float:
        t = time.perf_counter()
        for _ in range(a.passes):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16), (WeightCasts(cache) if cached else nullcontext()):
                out = model(xi)
            torch.autograd.grad(out[:, 1].float().sum(), xi)
        return (time.perf_counter() - t) / a.passes

    passes(False), passes(True)  # warm-up (the cache's copies made)
    times: dict = {"per-pass casts (main)": [], "cached casts (session 43)": []}
    for r in range(a.rounds):
        for cached in ((False, True) if r % 2 == 0 else (True, False)):
            times["cached casts (session 43)" if cached else "per-pass casts (main)"].append(passes(cached))
    print(f"resnet50, {a.images} images at {a.size} px, bf16 + channels-last, one thread; {a.passes} passes a round")
    print("| pass | min | median | max |\n|---|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {min(ts) * 1e3:.1f} ms | {statistics.median(ts) * 1e3:.1f} ms | {max(ts) * 1e3:.1f} ms |")
    base, new = times["per-pass casts (main)"], times["cached casts (session 43)"]
    print("cached / per-pass, per round: " + ", ".join(f"{n / b:.3f}" for n, b in zip(new, base)))
    print(f"copies made by the cache: {cache.made}")


if __name__ == "__main__":
    main()
