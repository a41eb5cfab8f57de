"""bf16-mixed on CNNs with products on their maps (session 42 review): vanilla maps against fp32's under bf16 and three
versions of the bf16-mixed rule, random weights, 4 images of 32 px, one draw, CPU.

    taskset -c 0 python benchmarks/bf16_mixed_products.py > benchmarks/bf16-mixed-products-s42.md

"s41": every function on a large 4-D map in fp32 (``islands.PRODUCTS`` and ``MATMULS`` empty); "merge": session 42's
``PRODUCTS`` (``torch.matmul`` in bf16 whatever its operands); "now": a matrix product in bf16 only of two batched
operands (``islands.MATMULS``). Each cell: relative L2 ``|m - f| / |f|`` / lowest per-image correlation.
"""
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import islands

class MatmulCNN(nn.Module):  # 1x1 convs written as channels-last matmul, ReLU gates
    def __init__(s, c=64):
        super().__init__(); s.stem = nn.Conv2d(3, c, 3, padding=1)
        s.w = nn.ParameterList([nn.Parameter(torch.randn(c, c) / c ** .5) for _ in range(4)]); s.fc = nn.Linear(c, 10)
    def forward(s, x):
        h = F.relu(s.stem(x)).permute(0, 2, 3, 1)  # (N, H, W, C)
        for w in s.w: h = F.relu(torch.matmul(h, w)) + h
        return s.fc(h.mean((1, 2)))

class NonLocal(nn.Module):  # conv stem, multi-head non-local block (4-D (B, heads, HW, d)), conv + ReLU, head
    def __init__(s, c=64, heads=2):
        super().__init__(); s.heads = heads
        s.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        s.qkv = nn.Conv2d(c, 3 * c, 1); s.out = nn.Conv2d(c, c, 1)
        s.post = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()); s.fc = nn.Linear(c, 10)
    def forward(s, x):
        h = s.stem(x); n, c, hh, ww = h.shape
        q, k, v = s.qkv(h).reshape(n, 3, s.heads, c // s.heads, hh * ww).transpose(-1, -2).unbind(1)  # (n, heads, HW, d)
        a = F.softmax(torch.matmul(q, k.transpose(-1, -2)) / (c // s.heads) ** .5, dim=-1)
        y = torch.matmul(a, v).transpose(-1, -2).reshape(n, c, hh, ww)
        h = h + s.out(y)
        return s.fc(s.post(h).mean((2, 3)))

class ChanSoftmax(nn.Module):  # softmax over channels of a 4-D map as a gate (attention-style), ReLU convs
    def __init__(s, c=32):
        super().__init__()
        s.a = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        s.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()); s.fc = nn.Linear(c, 10)
    def forward(s, x):
        h = s.a(x); g = F.softmax(h, dim=1) * h.shape[1]
        return s.fc(s.b(F.relu(h) * g).mean((2, 3)))


def _cell(ref: torch.Tensor, m: torch.Tensor) -> str:
    corr = min(float(torch.corrcoef(torch.stack([r.flatten(), p.flatten()]))[0, 1]) for r, p in zip(ref, m))
    return f"{float((m - ref).norm() / ref.norm()):.4f} / {corr:.4f}"


def main() -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rules = {"bf16": ("bf16", islands.PRODUCTS, islands.MATMULS), "s41": ("bf16-mixed", frozenset(), frozenset()),
             "merge": ("bf16-mixed", islands.PRODUCTS, frozenset()), "now": ("bf16-mixed", islands.PRODUCTS, islands.MATMULS)}
    saved = islands.PRODUCTS, islands.MATMULS
    print(f"# bf16-mixed on CNNs with products on their maps (torch {torch.__version__})\n")
    print("| model | " + " | ".join(rules) + " |\n|---|" + "---|" * len(rules))
    for model_cls in (MatmulCNN, NonLocal, ChanSoftmax):
        torch.manual_seed(0)
        model = model_cls().eval()
        ref = salience.vanilla(model, x, 1)
        cells = []
        for prec, islands.PRODUCTS, islands.MATMULS in rules.values():
            with salience.performance(precision=prec):
                cells.append(_cell(ref, salience.vanilla(model, x, 1)))
        islands.PRODUCTS, islands.MATMULS = saved
        print(f"| {model_cls.__name__} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
