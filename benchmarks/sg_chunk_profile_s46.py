"""Where salience's SmoothGrad / IG call spends its time per chunk, against bare passes of the chunk's size (session 46).

    python benchmarks/sg_chunk_profile_s46.py --images 4 --rounds 3 --out benchmarks/sg-chunk-profile-s46

One thread. In every round, interleaved (order rotating): the bare passes of the call's items ``bare N`` (forward +
``torch.autograd.grad`` of the target's score w.r.t. the input, parameters frozen; N items a pass, for each N of
``--bare``) and salience's warm call (defaults). During the salience call, wall time is split by wrapping
salience's pieces: the model's forward (``autograd._forward``), the backward (``autograd._walk_back``), the noisy
copies (SmoothGrad's ``NoisyCopies.__call__``) / IG's path points, the sums (``engine._Adder.add``); the rest of the
call is salience's bookkeeping. Minor page faults of each piece from ``getrusage``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision

import salience
from salience._core import autograd as _ag
from salience._core import engine as _engine
import importlib

_sg = importlib.import_module("salience.methods.smoothgrad")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import frozen_copy  # noqa: E402
from engine_speed import bare  # noqa: E402

PIECES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    def wrapped(*a, **k):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PIECES[label][0] += time.perf_counter() - t0
            PIECES[label][1] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    setattr(owner, name, wrapped)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--method", choices=["smoothgrad", "integrated_gradients"], default="smoothgrad")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--bare", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/sg-chunk-profile-s46")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    frozen = frozen_copy(model)
    b = args.images
    x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    n = args.samples if args.method == "smoothgrad" else args.steps
    items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)
    if args.method == "smoothgrad":
        call = lambda: salience.smoothgrad(model, x, target, samples=args.samples, reduce=None)  # noqa: E731
    else:
        call = lambda: salience.integrated_gradients(model, x, target, steps=args.steps, reduce=None)  # noqa: E731
    _wrap(_ag, "_forward", "forward")
    _wrap(_ag, "_walk_back", "backward")
    _wrap(_sg.NoisyCopies, "__call__", "noisy copies")
    _wrap(importlib.import_module("salience.methods.integrated").PathPoints, "__call__", "path points")
    _wrap(_engine._Adder, "add", "sums")
    call()  # the first call (probe)
    modes = {f"bare {k}": (lambda k=k: bare(frozen, items, tgt, k)) for k in args.bare}
    modes["salience"] = call
    names = list(modes)
    times = {k: [] for k in names}
    faults = {k: [] for k in names}
    pieces = []
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for k in names[r % len(names):] + names[:r % len(names)]:
            PIECES.clear()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            modes[k]()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if k == "salience":
                pieces.append({p: tuple(v) for p, v in PIECES.items()})
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f}s ({faults[k][-1]} flt)" for k in names)
              + "; salience pieces: " + ", ".join(f"{p} {v[0]:.3f}s/{v[1]} flt" for p, v in pieces[-1].items()),
              flush=True)
    rep = {"args": vars(args), "times_s": times, "minflt": faults, "salience_pieces": pieces, "load": loads,
           "torch": torch.__version__}
    Path(args.out + ".json").write_text(json.dumps(rep, indent=2))
    lines = [f"# {args.method} at {b} images, {args.model} {args.size} fp32, one thread: salience's pieces vs bare passes", "",
             f"`python benchmarks/sg_chunk_profile_s46.py {' '.join(sys.argv[1:])}`; 1-min load per round {loads}", "",
             "| mode | per round s | minor faults per round |", "|---|---|---|"]
    for k in names:
        lines.append(f"| {k} | {', '.join(f'{t:.3f}' for t in times[k])} | {', '.join(map(str, faults[k]))} |")
    lines += ["", "| salience piece | per round s | minor faults |", "|---|---|---|"]
    for p in sorted({p for q in pieces for p in q}):
        lines.append(f"| {p} | {', '.join(f'{q.get(p, (0.0, 0))[0]:.3f}' for q in pieces)} | {', '.join(str(q.get(p, (0.0, 0))[1]) for q in pieces)} |")
    rest = [t - sum(v[0] for v in q.values()) for t, q in zip(times["salience"], pieces)]
    lines.append("| rest of the call (salience's bookkeeping) | " + ", ".join(f"{t:.3f}" for t in rest) + " | |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
