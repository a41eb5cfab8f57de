"""bf16 autocast on a CPU with and without native bf16 instructions: resnet50's forward + input gradient.

    python benchmarks/cpu_bf16.py --images 4 --rounds 3                       # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx512 python benchmarks/cpu_bf16.py --images 4 --rounds 3
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_bf16.py --images 1 --rounds 2

torchvision resnet50 (random weights, parameters frozen, seed 0), B random images of 224 px, one thread by default:
forward + ``torch.autograd.grad`` of one class score w.r.t. the input, the forward in fp32 or under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (what salience's ``precision="bf16"`` runs), in the default layout
or channels-last (model and input); one warm-up call, then ``--rounds`` timed calls of each, min / median / max.

The environment emulates an older CPU on a newer one: ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's kernels (``AVX512_CORE``:
the AVX-512 of Skylake-SP / Cascade Lake, bf16 emulated with integer instructions, oneDNN's ``jit_bf16:avx512_core``;
``AVX2``: oneDNN then reports no bf16 support and PyTorch runs bf16 convolutions in its own kernels), and
``ATEN_CPU_CAPABILITY`` PyTorch's own vectorized kernels. The line printed first says what PyTorch sees
(its CPU capability, oneDNN's bf16 support, salience's ``native_bf16``). Results: docs/performance.md, "precision".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from salience._core.cpu import native_bf16  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.images, 3, 224, 224)

    def call(cl: bool, bf16: bool) -> None:
        xi = (x.contiguous(memory_format=torch.channels_last) if cl else x).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(xi)
        torch.autograd.grad(y[:, 0].sum(), xi)

    times = {}
    for cl in (False, True):
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for bf16 in (False, True):
            call(cl, bf16)
            ts = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                call(cl, bf16)
                ts.append(time.perf_counter() - t0)
            times[("channels_last " if cl else "") + ("bf16" if bf16 else "fp32")] = ts
    env = {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    print(f"{env}: PyTorch's CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, salience native_bf16 {native_bf16()}; "
          f"resnet50, {args.images} images, {args.threads} thread(s), torch {torch.__version__}")
    base = min(times["fp32"])
    for k, ts in times.items():
        print(f"  {k:18s} min {min(ts):.3f} s, median {statistics.median(ts):.3f}, max {max(ts):.3f}; "
              f"min / fp32's min {min(ts) / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
