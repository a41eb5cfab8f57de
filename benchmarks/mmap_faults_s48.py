"""Session 48: do resnet50's gradient passes page-fault because their largest blocks pass glibc's mmap threshold?

Two checks, each in a fresh process (``--case``), minor faults from ``resource.getrusage`` (fault counts do not
depend on the load: run unlocked on core 0):

- ``cblock N`` / ``block N``: a block of N bytes allocated (glibc's ``malloc`` through ctypes / ``torch.empty``),
  every page written, freed; 6 times. glibc serves a
  block of at least its mmap threshold with a fresh mmap (a fault per 4 KiB page at each touch); the threshold rises to
  the size of a freed mapped block, but only up to DEFAULT_MMAP_THRESHOLD_MAX = 32 MiB on 64-bit.
- ``pass N``: bare forward + input-gradient passes of N items of resnet50 at 224 px (random weights, one thread),
  6 passes; also the largest single storage a pass creates (a dispatch mode over every operator, in a 7th pass).

    taskset -c 0 python benchmarks/mmap_faults_s48.py --out benchmarks/mmap-faults-s48.txt
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def block(n: int, c: bool = False) -> list[int]:
    """Minor faults of 6 rounds of allocate, write every byte, free: with ``torch.empty`` or (``c``) glibc's own
    ``malloc`` / ``memset`` / ``free`` through ctypes."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    out = []
    for _ in range(6):
        f0 = faults()
        if c:
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
        else:
            t = torch.empty(n, dtype=torch.uint8)
            t.fill_(1)
            del t
        out.append(faults() - f0)
    return out


def largest_storage(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.untyped_storage().nbytes())
            return out

    with Largest():
        fn()
    return Largest.biggest


def passes(n: int, model_name: str, size: int) -> dict:
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(n, 3, size, size)

    def one() -> None:
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi)[:, 0].sum(), xi)

    per = []
    for _ in range(6):
        f0 = faults()
        one()
        per.append(faults() - f0)
    return {"faults_per_pass": per, "largest_block": largest_storage(one)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=2)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--items", type=int, nargs="+", default=[8, 10, 12, 16])
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.case:
        kind, n = a.case[0], int(a.case[1])
        res = {"faults_per_alloc": block(n, kind == "cblock")} if "block" in kind else passes(n, a.model, a.size)
        print(json.dumps(res))
        return
    lines = [f"torch {torch.__version__}; glibc {__import__('platform').libc_ver()[1]}; `{' '.join(sys.argv)}`", ""]
    mib = 32 << 20
    for kind in ("cblock", "block"):
        for n in (mib - (64 << 10), mib + (64 << 10)):
            r = json.loads(subprocess.run([sys.executable, __file__, "--case", kind, str(n)], capture_output=True,
                                          text=True, check=True).stdout)
            lines.append(f"{'malloc' if kind == 'cblock' else 'torch.empty'} block of {n:,} bytes (32 MiB "
                         f"{'-' if n < mib else '+'} 64 KiB), minor faults per allocate-touch-free: "
                         f"{r['faults_per_alloc']}")
    for k in a.items:
        r = json.loads(subprocess.run([sys.executable, __file__, "--case", "pass", str(k), "--model", a.model,
                                       "--size", str(a.size)], capture_output=True, text=True, check=True).stdout)
        lb = r["largest_block"]
        lines.append(f"{a.model} {a.size} px, bare passes of {k} items: largest block {lb:,} bytes "
                     f"({lb / k:,.0f} a item, {lb / mib:.3f} x 32 MiB); minor faults per pass {r['faults_per_pass']}")
    report(lines, a.out)


def report(lines: list[str], out: str | None) -> None:
    """Print ``lines`` and write them to ``out`` (when given)."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
