"""Session 48: does the mmap rule (a CPU gradient pass's largest block under glibc's 32 MiB) pay on a weighty model?

vgg11 at 224 px (random weights, 531 MB of them, read by every pass): its first convolution's output is
64 x 224 x 224 fp32 = 12.8 MB an item, so the rule gives 2 items a pass. Bare forward + input-gradient passes of
2, 4, 8 and 16 items over the same 16 items, interleaved rounds, one thread; wall s, CPU s and minor faults per 16
items, and each round's size over its best.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/vgg_chunk_s48.py --out benchmarks/vgg-chunk-s48.txt
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torchvision
from mmap_faults_s48 import report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(a.items, 3, a.size, a.size)

    def run(per: int) -> None:
        for s in range(0, a.items, per):
            xi = x[s:s + per].clone().requires_grad_(True)
            torch.autograd.grad(model(xi)[:, 0].sum(), xi)

    for per in a.sizes:  # warm: each size once
        run(per)
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[0]
    res: dict[int, list[tuple[float, float, int]]] = {k: [] for k in a.sizes}
    for r in range(a.rounds):
        order = a.sizes[r % len(a.sizes):] + a.sizes[:r % len(a.sizes)]
        for per in order:
            ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            run(per)
            t1, ru1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            res[per].append((t1 - t0, (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                             ru1.ru_minflt - ru0.ru_minflt))
    with open("/proc/loadavg") as f:
        load1 = f.read().split()[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lines = [f"{a.model} at {a.size} px, {a.items} items, {weights / 1e6:.0f} MB of weights; torch {torch.__version__}, "
             f"one thread; 1-minute load {load0} -> {load1}; `{' '.join(sys.argv)}`", ""]
    best = [min(res[k][r][0] for k in a.sizes) for r in range(a.rounds)]
    for per in a.sizes:
        w = [t[0] for t in res[per]]
        lines.append(f"passes of {per:2d}: wall s {', '.join(f'{v:.2f}' for v in w)}; over the round's best "
                     f"{', '.join(f'{v / b:.3f}' for v, b in zip(w, best))}; CPU s "
                     f"{', '.join(f'{t[1]:.2f}' for t in res[per])}; minor faults {', '.join(f'{t[2]:,}' for t in res[per])}")
    report(lines, a.out)


if __name__ == "__main__":
    main()
