"""Session 47: salience's own per-call work in one warm call (cProfile), by function, in ms per call.

    PYTHONPATH=src taskset -c 1 python benchmarks/fixed_cost_profile_s47.py --old-src /tmp/old-fixed/src \
        --out benchmarks/fixed-cost-profile-s47.txt

Cases: SmoothGrad 16 and vanilla of one image on resnet18 at 64 px and on the demo CNN (``shapes``, 64 px). Each case
runs warm calls (after 3 untimed ones) under cProfile; the table lists salience's functions (its ``src/salience``
files) by their total time per call (``tottime``: the function's own Python, not what it calls) and the cumulative time
of the named pieces (the model guard's enter and leave, ``fingerprint.structure``, ...). cProfile's own cost
inflates every Python call (by about 1 us), so the figures rank the pieces; the benchmark (auto_declines_s47.py) times
the calls.

With ``--old-src`` (main's archive, or a git revision whose whole ``src`` is archived) the per-call pieces are first
timed alone (``timeit``, best of 7 repeats of 300), each tree in a worker process of its own (``sides_s55.py``: a tree
before ``_core/guard.py`` became a package works as one after it), the two asked in turn: the fingerprint, the
guard's enter and leave (alone and nested in another), its BatchNorm check, the weights' bytes, ``check_input``.
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
from sides_s55 import SRC, Side, archive_src, import_from, round_order, serve  # noqa: E402

PIECES = ("guard.py", "guard/", "fingerprint.py", "perf.py", "engine.py", "casts.py", "folding.py", "compiled.py")
NAMED = ("_enter", "_leave", "_release", "_walk", "structure", "_capture", "take", "restore", "_eval", "_hold",
         "modules_of", "own_hooks", "_fold_key", "eval_mode")  # _eval: guard.py / guard/entry.py before session 55


def case(model, x, method: str, calls: int) -> str:
    import salience

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


def build(name: str, size: int) -> torch.nn.Module:
    """``auto_declines_s44.build``, imported only once :func:`sides_s55.import_from` chose the salience (that module
    imports it)."""
    from auto_declines_s44 import build as made

    return made(name, size)


PIECES_PER_CALL = (("fingerprint.structure", "3x"), ("fingerprint._fold_key", "0 (fold_batchnorm only)"),
                   ("engine.weight_bytes", "1x"), ("guard enter + leave", "1x (SmoothGrad's)"),
                   ("guard nested in another", "1x (the inner vanilla's)"),
                   ("guard._refuse_mixed_batches", "1x (inside enter)"),
                   ("guard.modules_of (quick walk)", "4x (2 guards, 2 check_input)"), ("autograd.check_input", "2x"),
                   ("checkpoints.plain_checkpoints enter + exit", "1x (each backward)"),
                   ("calm.calmly (nothing to do)", "4x (each guard's enter and exit)"))


def piece_functions(name: str) -> dict:
    """Each per-call piece of the salience this process imported, as a function of no argument, on ``name``
    (64 px). The guard's BatchNorm check is looked up where it lives: ``guard.py`` before session 54, the room
    ``guard/entry.py`` after, ``guard/refusals.py`` from session 55."""
    from salience._core import autograd, calm, checkpoints, engine, fingerprint, guard

    model = build(name, 64)
    x = torch.rand(1, 3, 64, 64)
    mods = guard.modules_of(model)
    refusals = getattr(guard, "refusals", None)  # session 55's room; guard/entry.py or guard.py before
    mixed = (lambda: refusals.refuse_mixed_batches(model, mods, {})) if refusals is not None else \
        (lambda: getattr(guard, "entry", guard)._refuse_mixed_batches(model, mods))

    def enter():
        with guard.model_guard(model):
            pass

    def nested():
        with guard.model_guard(model):
            with guard.model_guard(model):
                pass
    return {"fingerprint.structure": lambda: fingerprint.structure(model),
            "fingerprint._fold_key": lambda: fingerprint._fold_key(model),
            "engine.weight_bytes": lambda: engine.weight_bytes(model), "guard enter + leave": enter,
            "guard nested in another": nested,
            "guard._refuse_mixed_batches": mixed,
            "guard.modules_of (quick walk)": lambda: guard.modules_of(model),
            "autograd.check_input": lambda: autograd.check_input(x, model),
            "checkpoints.plain_checkpoints enter + exit": lambda: _entered(checkpoints.plain_checkpoints()),
            "calm.calmly (nothing to do)": lambda: calm.calmly(_nothing)}


def _entered(block) -> None:
    with block:
        pass


def _nothing() -> None:
    return None


def worker(src: str) -> None:
    """One side of ``--old-src``: salience from ``src``, each piece timed on request (best of 7 repeats of 300)."""
    import timeit

    import_from(src)
    torch.set_num_threads(1)
    built = {name: piece_functions(name) for name in ("resnet18", "shapes")}

    def time_piece(model: str, label: str) -> dict:
        return {"us": min(timeit.repeat(built[model][label], number=300, repeat=7)) / 300 * 1e6}
    serve(src, {"piece": time_piece})


def pieces(old_src: str) -> str:
    """Each per-call piece of this checkout and of ``old_src`` (a folder holding salience, or a git revision: its
    whole ``src`` archived) timed alone, in us a call: each tree in a worker process of its own
    (``sides_s55.py``), the two asked in turn, the order alternating from piece to piece."""
    sides = {"old": Side(__file__, archive_src(old_src), "old"), "new": Side(__file__, str(SRC), "new")}
    out = ["piece | model | old us/call | new us/call | per SmoothGrad call (old code)"]
    try:
        r = 0
        for name in ("resnet18", "shapes"):
            for label, per in PIECES_PER_CALL:
                got = {}
                for s in round_order(list(sides), r):
                    got[s] = sides[s].ask(cmd="piece", model=name, label=label)["us"]
                r += 1
                out.append(f"{label} | {name} | {got['old']:.1f} | {got['new']:.1f} | {per}")
    finally:
        for side in sides.values():
            side.close()
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--old-src", default=None, help="a folder holding salience (an archive's src), or a git revision")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:
        worker(args.worker)
        return 0
    import_from(str(SRC))  # this checkout's salience, whatever PYTHONPATH says
    import salience
    from _common import cpu_name

    text = [f"salience from {salience.__file__}; torch {torch.__version__}; CPU {cpu_name()}, cores "
            f"{sorted(os.sched_getaffinity(0))}; load {os.getloadavg()}",
            f"command: python benchmarks/fixed_cost_profile_s47.py {' '.join(argv or sys.argv[1:])}"]
    if args.old_src:
        text += ["", "## per-call pieces timed alone, old and new each in a worker process", pieces(args.old_src)]
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
