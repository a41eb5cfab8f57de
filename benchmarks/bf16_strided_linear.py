"""F.linear on a strided (tokens, batch, dim) bf16 view, as nn.MultiheadAttention(batch_first=True) makes, CPU, one thread.

    taskset -c 0 python benchmarks/bf16_strided_linear.py > benchmarks/bf16-strided-linear-s42.md

torchvision's vit_b_16 in-projection's shape: ``(197, B, 768)`` by a ``2304 x 768`` weight; one warm-up call, then
one timed call strided and one on a contiguous copy (rough figures: one call each).
"""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
w, b = torch.randn(2304, 768), torch.randn(2304)
print(f"# F.linear on a strided bf16 view (torch {torch.__version__}, one thread)\n")
print("| images | dtype | strided s | contiguous s |\n|---|---|---|---|")
for n in (1, 2, 4):
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(n, 197, 768).to(dt).transpose(0, 1)
        ww, bb = w.to(dt), b.to(dt)
        F.linear(x, ww, bb)
        t0 = time.perf_counter()
        F.linear(x, ww, bb)
        t1 = time.perf_counter()
        F.linear(x.contiguous(), ww, bb)
        t2 = time.perf_counter()
        print(f"| {n} | {str(dt).split('.')[1]} | {t1 - t0:.3f} | {t2 - t1:.3f} |", flush=True)
