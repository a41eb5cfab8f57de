"""The 16-bit clean-score pass (Ablation-CAM, occlusion under precision="bf16"): one pass of 8 images against two of 4.

One command, one table: resnet50 at 224 px, 8 images, one thread, channels-last, eval mode, ``torch.no_grad``,
under a CPU bf16 autocast (the clean-score pass as `perturbation.clean_scores` runs it), and the float32 clean
passes beside it for reference (which stay two of 4 under bf16: `perturbation.clean_batch`'s memory rule). Rounds
alternate the order of the two ways; min / median / max seconds, the load before and after.

    PYTHONPATH=src python benchmarks/clean_score_pass_s58.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = open("/proc/loadavg").read().split()[:3]
    model = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    rows = []
    for label, cast in (("bf16", True), ("float32", False)):
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cast else torch.no_grad

        def one(parts: int) -> float:
            t0 = time.perf_counter()
            with torch.no_grad(), ctx():
                for p in x.chunk(parts):
                    model(p)
            return time.perf_counter() - t0

        one(1), one(2)  # warm-up: oneDNN's primitives for both sizes
        t: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for parts in ((1, 2) if r % 2 == 0 else (2, 1)):
                t[parts].append(one(parts))
        for parts in (2, 1):
            v = t[parts]
            rows.append((label, "4 + 4" if parts == 2 else "8", min(v), statistics.median(v), max(v)))
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"torch {torch.__version__}, 1 thread, loadavg before {' '.join(load0)}, after {' '.join(load1)}")
    print("| pass | images a pass | min s | median s | max s |")
    print("|---|---|---|---|---|")
    for label, way, lo, med, hi in rows:
        print(f"| {label} | {way} | {lo:.3f} | {med:.3f} | {hi:.3f} |")


if __name__ == "__main__":
    main()
