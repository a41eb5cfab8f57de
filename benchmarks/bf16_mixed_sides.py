"""precision="bf16-mixed" on torchvision's ConvNeXt-T: the rule read by the map's sides against the rule read by the
area of its last two sides (the first version's), whose channels-last ``(N, h, w, C)`` MLP inputs counted as large
down to 7 x 7 x 768.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/bf16_mixed_sides.py --rounds 8 \
        --out benchmarks/bf16-mixed-sides-s41

vanilla of 2 random images at 224 px, random weights, one thread, channels-last for the bf16 variants; a warm-up
round, then alternating rounds; seconds min / median / max, the medians over fp32's, and the correlation of each map
with fp32's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from _common import cpu_name  # noqa: E402
import salience  # noqa: E402
import salience._core.perf as perf  # noqa: E402
from salience._core.islands import RATIO, HighResolutionFp32  # noqa: E402


class ByArea(HighResolutionFp32):
    """The first version's reading: ``h * w >= H * W / RATIO**2`` of the last two sides."""

    def __init__(self, device_type: str, size: Sequence[int], ratio: int = RATIO) -> None:
        super().__init__(device_type, size, ratio)
        self.limit = size[-1] * size[-2] / ratio ** 2

    def _large(self, args: Sequence[Any]) -> bool:
        for a in args:
            if isinstance(a, (list, tuple)):
                if self._large([t for t in a if isinstance(t, torch.Tensor)]):
                    return True
            elif isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-1] * a.shape[-2] >= self.limit:
                return True
        return False


VARIANTS = {"fp32": ("fp32", HighResolutionFp32), "bf16": ("bf16", HighResolutionFp32),
            "bf16-mixed by area": ("bf16-mixed", ByArea), "bf16-mixed by sides": ("bf16-mixed", HighResolutionFp32)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = torchvision.models.convnext_tiny().eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = salience.vanilla(model, x, 1)
    times: dict = {k: [] for k in VARIANTS}
    corr = {}
    for r in range(args.rounds + 1):
        for name, (precision, mode) in VARIANTS.items():
            perf.HighResolutionFp32 = mode
            fmt = "contiguous" if precision == "fp32" else "channels_last"
            with salience.performance(precision=precision, memory_format=fmt):
                t0 = time.perf_counter()
                y = salience.vanilla(model, x, 1)
                dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            corr[name] = float(torch.corrcoef(torch.stack([ref.flatten(), y.flatten()]))[0, 1])
    perf.HighResolutionFp32 = HighResolutionFp32
    res = dict(cpu=cpu_name(), torch=torch.__version__, rounds=args.rounds, times=times, corr=corr)
    base = statistics.median(times["fp32"])
    lines = ["# bf16-mixed on torchvision ConvNeXt-T: the map's sides against the area "
             "(`benchmarks/bf16_mixed_sides.py`)", "",
             "`flock /tmp/bench.lock taskset -c 1 python benchmarks/bf16_mixed_sides.py --rounds 8 --out "
             "benchmarks/bf16-mixed-sides-s41`", "",
             f"{res['cpu']}, torch {res['torch']}, one thread, {args.rounds} rounds; vanilla of 2 images at 224 px, "
             "random weights", "", "| variant | s min / median / max | median over fp32's | corr with fp32 |",
             "|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {min(t):.3f} / {statistics.median(t):.3f} / {max(t):.3f} | "
                     f"{statistics.median(t) / base:.2f} | {corr[name]:.4f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(res, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return res


if __name__ == "__main__":
    main()
