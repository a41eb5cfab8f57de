"""Occlusion's trace per call, cached or not (session 46): resnet50 (random weights), one 224 px image, one thread.

Each round: ``_occlusion_local._analysed`` on a cleared cache (what every call paid before: the two fx traces, the
fields, cuts and the FLOPs' shape propagation on one image) and on a warm one (a later call now); then a whole
occlusion call (window 56, stride 56: 16 windows) warm, for scale. Interleaved rounds; min / median / max.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion_trace_s46.py [ROUNDS]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torchvision

import salience
from salience.methods import _occlusion_local as local


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    x = torch.rand(1, 3, 224, 224)
    local._analysed(m, x, None)  # warm-up
    salience.occlusion(m, x, 1, window=56, stride=56)
    cold, warm, call = [], [], []
    for _ in range(rounds):
        local._TRACES.clear()
        t = time.perf_counter()
        local._analysed(m, x, None)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        local._analysed(m, x, None)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        salience.occlusion(m, x, 1, window=56, stride=56)
        call.append(time.perf_counter() - t)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, 1 thread, {rounds} rounds, load {' '.join(load)}")
    for name, v in (("trace + analysis, uncached (each call before)", cold), ("the same, cached (a later call now)", warm),
                    ("whole occlusion call, 16 windows, warm", call)):
        print(f"{name}: {min(v) * 1e3:.1f} / {statistics.median(v) * 1e3:.1f} / {max(v) * 1e3:.1f} ms")
    print("per round, uncached / call: " + ", ".join(f"{c / w:.3f}" for c, w in zip(cold, call)))


if __name__ == "__main__":
    main()
