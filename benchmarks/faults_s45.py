"""Where integrated gradients' page faults come from (session 45): per chunk of a salience call, minor faults and
glibc's heap (``mallinfo2``: the main heap's size, its free top, the mmapped blocks), beside the bare passes.

    taskset -c 0 python benchmarks/faults_s45.py [--images 4] [--steps 32] [--calls 3] [--order bare4,bare8,ig]
        [--keep]    # salience's default path as this branch has it; --no-keep: the session-44 behaviour

One line per chunk: its size, minor faults, CPU s, heap arena MB (after the chunk), free MB (all free chunks),
top MB (the releasable top), mmapped blocks and MB live after the chunk. A line per bare call and per call.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import salience  # noqa: E402
from salience._core import engine  # noqa: E402


class _MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MI


def snap() -> tuple:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    mi = _libc.mallinfo2()
    return ru.ru_minflt, ru.ru_utime + ru.ru_stime, mi


def line(tag: str, a: tuple, b: tuple) -> str:
    mi = b[2]
    return (f"{tag:>14} faults {b[0] - a[0]:>9,} cpu {b[1] - a[1]:6.2f}s arena {mi.arena / 2**20:7.1f} "
            f"free {mi.fordblks / 2**20:7.1f} top {mi.keepcost / 2**20:7.1f} mmapped {mi.hblks:3d} "
            f"{mi.hblkhd / 2**20:7.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--order", default="bare4,bare8,ig")
    ap.add_argument("--chunks", action="store_true", help="a line per chunk of salience's call")
    ap.add_argument("--chunk", type=int, default=None, help="salience's chunk= (the chunk size fixed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    b = args.images
    x = torch.rand(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    items, tgt = x.repeat(args.steps, 1, 1, 1), target.repeat(args.steps)

    def bare(per: int) -> None:
        for s in range(0, items.shape[0], per):
            xi = items[s:s + per].detach().clone().requires_grad_(True)
            out = model(xi)
            torch.autograd.grad(out.gather(1, tgt[s:s + per].view(-1, 1)).sum(), xi)

    last = [None]
    add = engine._Adder.add

    def traced(self, start, result):
        add(self, start, result)
        now = snap()
        if args.chunks:
            n = (result[0] if isinstance(result, tuple) else result).shape[0]
            print(line(f"chunk {start}+{n}", last[0], now), flush=True)
        last[0] = now

    engine._Adder.add = traced
    for c in range(args.calls + 1):  # call 0: the first (probes)
        for what in args.order.split(","):
            os.path.exists(f"/tmp/faults-s45-mark-{c}-{what}")  # a marker for strace -e trace=newfstatat
            a = snap()
            last[0] = a
            if what.startswith("bare"):
                bare(int(what[4:]))
            else:
                kw = {} if args.chunk is None else {"chunk": args.chunk}
                salience.integrated_gradients(model, x, target, steps=args.steps, reduce=None, **kw)
            print(line(f"[{c}] {what}", a, snap()), flush=True)


if __name__ == "__main__":
    main()
