"""Session 48: minor page faults per call of the engine's defaults, in one process (fault counts do not depend on the
load: run unlocked on core 0), with the chunks the plan gives (Sums.chunks) and CPU seconds.

    PYTHONPATH=src taskset -c 0 python benchmarks/engine_faults_s48.py --images 4 --method ig --calls 3
"""
from __future__ import annotations

import argparse
import resource

import torch
import torchvision

import salience
from salience._core import engine as _engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--method", choices=["ig", "sg"], default="ig")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(weights=None).eval()
    x = torch.rand(a.images, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    seen: list = []
    real = _engine.accumulate
    _engine.accumulate = lambda *args, **kw: seen.append(real(*args, **kw)) or seen[-1]
    for i in range(a.calls):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        if a.method == "ig":
            salience.integrated_gradients(model, x, 0, steps=32)
        else:
            salience.smoothgrad(model, x, 0, samples=16, seed=0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        chunks = seen[-1].chunks
        print(f"{a.model} {a.size} px {a.method} {a.images} images, call {i + 1} ({'cold' if i == 0 else 'warm'}): "
              f"chunks {chunks[0]} x {len(chunks)} (last {chunks[-1]}), minor faults {r1.ru_minflt - r0.ru_minflt:,}, "
              f"CPU s {(r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime):.2f}", flush=True)


if __name__ == "__main__":
    main()
