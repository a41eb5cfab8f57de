"""Where one method call's time goes outside the model: cProfile of warm calls, by own time.

    python benchmarks/profile_call.py --device cuda --method smoothgrad --images 1   # on a GPU
    python benchmarks/profile_call.py --model resnet50 --size 16 --images 8          # CPU, tiny input

On a GPU a resnet50 pass costs its kernels' launches (about 17 ms for forward + backward on an H200,
whatever the batch up to 32 images), so salience's own Python per call and per chunk (the guard, the
input checks, the memory probe, the softmax tap) shows against the passes; on this CPU at 224 px it
hides under the convolutions, hence the tiny input there. Prints the warm calls' min / median / max
wall time, then the top functions by own time over ``--calls`` calls (the model's kernels appear as
``conv2d`` / ``run_backward``: on CUDA their launches, as the GPU runs behind).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import torchvision

import salience

CHEAP = {"smoothgrad": dict(samples=16), "integrated_gradients": dict(steps=32), "rise": dict(masks=512)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--method", default="smoothgrad", choices=sorted(salience.METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval().to(args.device)
    x = torch.rand(args.images, 3, args.size, args.size, device=args.device)
    fn = salience.METHODS[args.method]
    options = CHEAP.get(args.method, {})

    def call() -> None:
        fn(model, x, 0, **options)
        if x.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm: the probes, cuDNN's choices
        call()
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    print(f"{args.method} on {args.model} {args.images}x3x{args.size}x{args.size} ({args.device}): "
          f"{min(times) * 1e3:.1f} / {statistics.median(times) * 1e3:.1f} / {max(times) * 1e3:.1f} ms "
          f"min / median / max of {args.calls} warm calls")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print("\n".join(line[:160] for line in out.getvalue().splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
