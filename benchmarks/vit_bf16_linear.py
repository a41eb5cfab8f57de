"""torchvision's vit_b_16 under a CPU bf16 autocast, before and after session 42's contiguous attention inputs.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/vit_bf16_linear.py --rounds 3 --out benchmarks/vit-bf16-linear-s42

Vanilla gradient of 2 random 224 px images, random weights (the head, zeroed at init, drawn N(0, 0.02)), the default
layout, one thread. ``bf16 (before)``: ``precision="bf16"`` without :mod:`salience._core.strided`'s mode
(``perf.holds_attention`` answering False), as salience ran it until now: ``F.linear`` on ``nn.MultiheadAttention``'s
strided ``(tokens, batch, dim)`` view. Each precision's first call before the rounds (the maps compared with fp32's and
with ``bf16 (before)``'s), then alternating rounds, the order rotating; min / median / max seconds per call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare_maps  # noqa: E402

import salience  # noqa: E402
from salience._core import perf  # noqa: E402

PRECISIONS = ["fp32", "bf16 (before)", "bf16", "bf16-mixed"]


@contextlib.contextmanager
def _precision(p: str):
    saved = perf.holds_attention
    if p.endswith("(before)"):
        perf.holds_attention = lambda model: False
    try:
        with salience.performance(precision=p.split()[0], memory_format="contiguous"):
            yield
    finally:
        perf.holds_attention = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/vit-bf16-linear")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.rand(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def call(p: str) -> torch.Tensor:
        with _precision(p):
            return salience.vanilla(model, x, 1, reduce=None)

    maps = {p: call(p) for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(args.rounds):
        for p in PRECISIONS[r % len(PRECISIONS):] + PRECISIONS[:r % len(PRECISIONS)]:
            t0 = time.perf_counter()
            call(p)
            times[p].append(time.perf_counter() - t0)
            print(p, f"{times[p][-1]:.3f}", flush=True)
    check = {p: {"vs fp32": compare_maps(maps["fp32"], maps[p]), "vs bf16 (before)": compare_maps(maps["bf16 (before)"], maps[p])}
             for p in PRECISIONS[1:]}
    ref = statistics.median(times["fp32"])
    md = [f"# torchvision vit_b_16, vanilla of {args.images} images at 224 px, CPU, 1 thread, {args.rounds} alternating "
          "rounds, random weights", "", f"torch {torch.__version__}. `flock /tmp/bench.lock taskset -c 1 python "
          f"benchmarks/vit_bf16_linear.py {' '.join(sys.argv[1:])}`", "",
          "| precision | min s | median s | max s | median / fp32's | rel. L2 vs fp32 | lowest per-image corr. vs fp32 "
          "| rel. L2 vs bf16 (before) |", "|---|---|---|---|---|---|---|---|"]
    for p in PRECISIONS:
        c = check.get(p)
        cols = (f"{c['vs fp32']['rel_l2']:.4f} | {c['vs fp32']['corr_min_image']:.6f} | "
                f"{c['vs bf16 (before)']['rel_l2']:.4f}") if c else "- | - | -"
        t = times[p]
        md.append(f"| {p} | {min(t):.3f} | {statistics.median(t):.3f} | {max(t):.3f} | "
                  f"{statistics.median(t) / ref:.2f} | {cols} |")
    print("\n".join(md), flush=True)
    Path(args.out + ".json").write_text(json.dumps({"config": vars(args), "torch": torch.__version__,
                                                    "times_s": times, "check": check}, indent=1))
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
