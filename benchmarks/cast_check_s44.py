"""Is a content check of the cast cache cheap (session 44, casts.py)? A change through ``p.data`` (``p.data.mul_(2)``)
bumps no version counter of ``p``; seeing it would need reading every weight every pass. This times, on resnet50's
parameters (torchvision, random weights), one pass's casts to bf16 (what the cache saves) against the cheapest
content read, a sum of each weight (not even a sound checksum), interleaved, min / median / max over rounds."""
import statistics
import sys
import time

import torch
import torchvision

torch.set_num_threads(1)
params = [p.detach() for p in torchvision.models.resnet50().parameters() if p.dim() > 1]
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
ways = {"cast to bf16 (one pass, uncached)": lambda: [p.to(torch.bfloat16) for p in params],
        "sum of each weight (a content read)": lambda: [p.sum() for p in params]}
times = {k: [] for k in ways}
for _ in range(rounds):
    for name, fn in ways.items():
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
print(f"resnet50, {len(params)} weights, {sum(p.numel() for p in params) / 1e6:.1f} M floats, one thread, {rounds} rounds")
for name, ts in times.items():
    print(f"{name}: {min(ts) * 1e3:.1f} / {statistics.median(ts) * 1e3:.1f} / {max(ts) * 1e3:.1f} ms")
ratio = [s / c for s, c in zip(*times.values().__reversed__())]
print(f"sum / cast per round: {min(ratio):.2f} / {statistics.median(ratio):.2f} / {max(ratio):.2f}")
