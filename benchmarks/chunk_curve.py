"""Seconds per image of the bare passes by images per pass: where bigger chunks stop paying on a CPU.

    taskset -c 1 python benchmarks/chunk_curve.py --threads 1 --out benchmarks/chunk-curve-1thread
    python benchmarks/chunk_curve.py --threads 2 --out benchmarks/chunk-curve-2threads

torchvision resnet50 (random weights, parameters frozen) at 224 x 224 by default: the forward pass
under ``torch.inference_mode`` (what Score-CAM, Ablation-CAM, RISE and occlusion run) at 1, 2, 4,
8, 16, 32 and 64 images per pass, and the forward pass + the input's gradient (what SmoothGrad and
integrated gradients run) at 1 to 16. Each round runs every pass size once, in order; the table
gives min / median / max seconds per image over the rounds. The engine's
``CPU_INFERENCE_BUDGET`` (128 MiB per gradient-free chunk, about 11 images here) comes from this
curve: the time per image grows by half from 8 to 64 images per pass.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "chunk-curve"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(64, 3, args.size, args.size)
    times: dict[str, list[float]] = {}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for bs in (1, 2, 4, 8, 16, 32, 64):
            n = 64 if bs > 2 else 16
            with torch.inference_mode():
                t = time.perf_counter()
                for i in range(0, n, bs):
                    model(x[i:i + bs])
            times.setdefault(f"forward {bs}", []).append((time.perf_counter() - t) / n)
            if bs <= 16:
                n = 32 if bs > 2 else 8
                t = time.perf_counter()
                for i in range(0, n, bs):
                    xi = x[i:i + bs].clone().requires_grad_(True)
                    torch.autograd.grad(model(xi)[:, 0].sum(), xi)
                times.setdefault(f"forward+gradient {bs}", []).append((time.perf_counter() - t) / n)
    load.append(os.getloadavg())
    lines = [f"# Seconds per image by images per pass ({args.model}, {args.size} px, {args.threads} thread(s), "
             f"{args.rounds} rounds)", "",
             f"`python benchmarks/chunk_curve.py --model {args.model} --size {args.size} --threads {args.threads} "
             f"--rounds {args.rounds}`; CPU affinity {sorted(os.sched_getaffinity(0))}; load average (1, 5, 15 min) "
             f"before {tuple(round(v, 2) for v in load[0])}, after {tuple(round(v, 2) for v in load[1])}.", "",
             "| pass | images per pass | s / image min | median | max |", "|---|---|---|---|---|"]
    for key, v in times.items():
        kind, bs = key.rsplit(" ", 1)
        lines.append(f"| {kind} | {bs} | {min(v):.3f} | {statistics.median(v):.3f} | {max(v):.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"config": vars(args), "loadavg": load, "seconds_per_image": times},
                                                   indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
