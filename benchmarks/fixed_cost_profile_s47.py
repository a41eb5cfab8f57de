"""Session 47: salience's own per-call work in one warm call (cProfile), by function, in ms per call.

    taskset -c 0 python benchmarks/fixed_cost_profile_s47.py --out benchmarks/fixed-cost-profile-s47.txt

Cases: SmoothGrad 16 and vanilla of one image on resnet18 at 64 px and on the demo CNN (``shapes``, 64 px). Each case
runs warm calls (after 3 untimed ones) under cProfile; the table lists salience's functions (its ``src/salience``
files) by their total time per call (``tottime``: the function's own Python, not what it calls) and the cumulative time
of the named pieces (the model guard's enter and leave, ``fingerprint.structure``, ...). cProfile's own cost
inflates every Python call (by about 1 us), so the figures rank the pieces; the benchmark (auto_declines_s47.py) times
the calls.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_declines_s44 import build  # noqa: E402

import salience  # noqa: E402

PIECES = ("guard.py:", "fingerprint.py:", "perf.py:", "engine.py:", "casts.py:", "folding.py:", "compiled.py:")
NAMED = ("_enter", "_leave", "_release", "_walk", "structure", "_capture", "take", "restore", "_eval", "_hold",
         "modules_of", "own_hooks", "_fold_key")


def case(model, x, method: str, calls: int) -> str:
    with torch.no_grad():
        target = model(x).argmax(1)
    f = (lambda: salience.smoothgrad(model, x, target, samples=16, reduce=None)) if method == "smoothgrad" else \
        (lambda: salience.vanilla(model, x, target))
    for _ in range(3):
        f()
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    wall = (time.perf_counter() - t0) / calls
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        f()
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    total_salience = 0.0
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        if "/salience/" in file:
            total_salience += tt
            rows.append((tt / calls * 1e3, ct / calls * 1e3, nc / calls, f"{file.split('/salience/')[1]}:{line} {name}"))
    rows.sort(reverse=True)
    out = [f"wall (no profiler) {wall * 1e3:.2f} ms/call; salience's own Python (sum of tottime, profiled) "
           f"{total_salience / calls * 1e3:.2f} ms/call",
           "tottime ms/call | cumtime ms/call | calls/call | function"]
    out += [f"{a:8.3f} | {b:8.3f} | {c:6.1f} | {d}" for a, b, c, d in rows[:30]]
    out.append("named pieces (cumulative, ms/call, calls/call):")
    for (file, line, name), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3]):
        if "/salience/_core/" in file and name in NAMED and any(p in file for p in PIECES):
            out.append(f"  {file.split('/salience/')[1]}:{line} {name}: {ct / calls * 1e3:.3f} ms, {nc / calls:.1f} calls")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text = [f"salience from {salience.__file__}; torch {torch.__version__}; load {os.getloadavg()}",
            f"command: python benchmarks/fixed_cost_profile_s47.py {' '.join(argv or sys.argv[1:])}"]
    for name in ("resnet18", "shapes"):
        model = build(name, 64)
        x = torch.rand(1, 3, 64, 64)
        for method in ("smoothgrad", "vanilla"):
            text.append(f"\n## {name} 64 px, {method}, 1 image")
            text.append(case(model, x, method, args.calls))
    text = "\n".join(text)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
