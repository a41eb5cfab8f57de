"""Session 47: salience's own per-call work in one warm call (cProfile), by function, in ms per call.

    PYTHONPATH=src taskset -c 1 python benchmarks/fixed_cost_profile_s47.py --old-src /tmp/old-fixed/src \
        --out benchmarks/fixed-cost-profile-s47.txt

Cases: SmoothGrad 16 and vanilla of one image on resnet18 at 64 px and on the demo CNN (``shapes``, 64 px). Each case
runs warm calls (after 3 untimed ones) under cProfile; the table lists salience's functions (its ``src/salience``
files) by their total time per call (``tottime``: the function's own Python, not what it calls) and the cumulative time
of the named pieces (the model guard's enter and leave, ``fingerprint.structure``, ...). cProfile's own cost
inflates every Python call (by about 1 us), so the figures rank the pieces; the benchmark (auto_declines_s47.py) times
the calls.

With ``--old-src`` (main's archive) the per-call pieces are first timed alone (``timeit``, best of 7 repeats), this
checkout's and the old tree's functions loaded side by side in one process: the fingerprint, the guard's enter and
leave (alone and nested in another), its BatchNorm check, the weights' bytes, ``check_input``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_declines_s44 import build  # noqa: E402

import salience  # noqa: E402

PIECES = ("guard.py", "guard/", "fingerprint.py", "perf.py", "engine.py", "casts.py", "folding.py", "compiled.py")
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


def _load(path: str, name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pieces(old_src: str) -> str:
    """Each per-call piece of this checkout and of ``old_src`` timed alone, in us a call."""
    import timeit

    from salience._core import autograd, engine, fingerprint, guard
    old_fp = _load(f"{old_src}/salience/_core/fingerprint.py", "old_fingerprint")
    old_guard = _load(f"{old_src}/salience/_core/guard.py", "old_guard")

    def old_weight_bytes(model):  # main's engine.weight_bytes: model.parameters(), three layout comparisons each
        total = 0
        for t in model.parameters():
            if t.layout == torch.sparse_coo:
                total += sum(q.numel() * q.element_size() for q in (t._values(), t._indices()))
            elif t.layout in (torch.sparse_csr, torch.sparse_bsr) or t.layout in (torch.sparse_csc, torch.sparse_bsc):
                raise AssertionError("no such parameter here")
            else:
                total += t.numel() * t.element_size()
        return total

    out = ["piece | model | old us/call | new us/call | per SmoothGrad call (old code)"]
    for name in ("resnet18", "shapes"):
        model = build(name, 64)
        x = torch.rand(1, 3, 64, 64)
        mods = guard.modules_of(model)
        assert old_fp.structure(model) == fingerprint.structure(model)
        assert old_weight_bytes(model) == engine.weight_bytes(model)

        def enter(g):
            def f():
                with g.model_guard(model):
                    pass
            return f

        def nested(g):
            def f():
                with g.model_guard(model):
                    with g.model_guard(model):
                        pass
            return f
        rows = [("fingerprint.structure", old_fp.structure, fingerprint.structure, "3x"),
                ("fingerprint._fold_key", old_fp._fold_key, fingerprint._fold_key, "0 (fold_batchnorm only)"),
                ("engine.weight_bytes", old_weight_bytes, engine.weight_bytes, "1x"),
                ("guard enter + leave", None, None, "1x (SmoothGrad's)"),
                ("guard nested in another", None, None, "1x (the inner vanilla's)"),
                ("guard._refuse_mixed_batches", lambda m: old_guard._refuse_mixed_batches(m, mods),
                 lambda m: guard.entry._refuse_mixed_batches(m, mods), "1x (inside enter)"),
                ("guard.modules_of (quick walk)", old_guard.modules_of, guard.modules_of, "4x (2 guards, 2 check_input)"),
                ("autograd.check_input", None, lambda m: autograd.check_input(x, m), "2x")]
        for label, fo, fn, per in rows:
            if label == "guard enter + leave":
                fo, fn = enter(old_guard), enter(guard)
            elif label == "guard nested in another":
                fo, fn = nested(old_guard), nested(guard)
            else:
                fo = (lambda f=fo: f(model)) if fo is not None else None
                fn = (lambda f=fn: f(model))
            tn = min(timeit.repeat(fn, number=300, repeat=7)) / 300 * 1e6
            to = min(timeit.repeat(fo, number=300, repeat=7)) / 300 * 1e6 if fo is not None else float("nan")
            out.append(f"{label} | {name} | {to:.1f} | {tn:.1f} | {per}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--old-src", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text = [f"salience from {salience.__file__}; torch {torch.__version__}; load {os.getloadavg()}",
            f"command: python benchmarks/fixed_cost_profile_s47.py {' '.join(argv or sys.argv[1:])}"]
    if args.old_src:
        text += ["", "## per-call pieces timed alone (check_input: new only, its code is main's)", pieces(args.old_src)]
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
