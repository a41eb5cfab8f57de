"""precision fp32 / bf16 / bf16-mixed on vision transformers, CPU: time of vanilla and attention rollout, maps against fp32.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/vit_bf16_mixed.py --rounds 5 --images 2 --out benchmarks/vit-bf16-mixed-s42

Random weights (torchvision's ViT head, zeroed at init, drawn as timm's: N(0, 0.02), or the vanilla maps are zeros),
224 px random images, the default layout, one thread. ``bf16-mixed (s41)``: bf16-mixed with session 41's rule, which
read the attention tensors ``(batch, heads, tokens, dim)`` as maps and ran attention, ``torch.matmul`` and softmax
on them in fp32 (``salience._core.islands.PRODUCTS`` emptied for the call). Each method's first call of every
precision before the rounds (the maps compared: relative L2 over all images, the lowest per-image correlation), then
alternating rounds, the order rotating; min / median / max seconds per call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare_maps  # noqa: E402

import salience  # noqa: E402
from salience._core import islands  # noqa: E402

MODELS = {"timm vit_small_patch16_224": lambda: timm.create_model("vit_small_patch16_224", pretrained=False),
          "timm vit_small_patch8_224": lambda: timm.create_model("vit_small_patch8_224", pretrained=False),
          "torchvision vit_b_16": lambda: _torchvision_vit()}
PRECISIONS = ["fp32", "bf16", "bf16-mixed", "bf16-mixed (s41)"]


def _torchvision_vit() -> torch.nn.Module:
    m = torchvision.models.vit_b_16(weights=None)
    torch.nn.init.normal_(m.heads.head.weight, std=0.02)  # zeroed at init: every input gradient would be 0
    return m


@contextlib.contextmanager
def _precision(p: str):
    saved = islands.PRODUCTS
    if p == "bf16-mixed (s41)":
        islands.PRODUCTS = frozenset()
    try:
        with salience.performance(precision=p.split()[0], memory_format="contiguous"):
            yield
    finally:
        islands.PRODUCTS = saved


def _job(model, x, target, method: str, rounds: int) -> dict:
    def call(p: str) -> torch.Tensor:
        with _precision(p):
            if method == "vanilla":
                return salience.vanilla(model, x, target, reduce=None)
            return salience.attention_rollout(model, x, target)

    maps = {p: call(p) for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        for p in PRECISIONS[r % len(PRECISIONS):] + PRECISIONS[:r % len(PRECISIONS)]:
            t0 = time.perf_counter()
            call(p)
            times[p].append(time.perf_counter() - t0)
    return {"times_s": times, "check": {p: compare_maps(maps["fp32"], maps[p]) for p in PRECISIONS[1:]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--out", default="benchmarks/vit-bf16-mixed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"config": vars(args), "torch": torch.__version__, "jobs": []}
    md = [f"# bf16-mixed on vision transformers: {args.images} images of 224 px, {args.threads} thread(s), "
          f"{args.rounds} alternating rounds, random weights", "",
          f"torch {torch.__version__}. `{' '.join(['python benchmarks/vit_bf16_mixed.py', *sys.argv[1:]])}`", "",
          "| model | method | precision | min s | median s | max s | median / fp32's | relative L2 | "
          "lowest per-image correlation |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        x = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            target = model(x).argmax(1)
        for method in ("vanilla", "attention_rollout"):
            job = _job(model, x, target, method, args.rounds)
            report["jobs"].append({"model": name, "method": method, **job})
            t = job["times_s"]
            ref = statistics.median(t["fp32"])
            for p in PRECISIONS:
                c = job["check"].get(p)
                cols = f"{c['rel_l2']:.4f} | {c['corr_min_image']:.6f}" if c else "- | -"
                md.append(f"| {name} | {method} | {p} | {min(t[p]):.3f} | {statistics.median(t[p]):.3f} | "
                          f"{max(t[p]):.3f} | {statistics.median(t[p]) / ref:.2f} | {cols} |")
            print("\n".join(md[-len(PRECISIONS):]), flush=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
