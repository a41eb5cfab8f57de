"""The model guard's cost per call: ``with model_guard(model): pass`` (entry and exit, nothing held before: each
module's and parameter's state recorded and put back), and the same inside a ``run_guard`` (a dataset run's call: a
count, and the baseline compared and put back), on ``transformers.py``'s ``vit_tiny`` (152 modules, 152 parameters)
and resnet50 (one CPU thread). ``--base REF`` loads ``src/salience/_core/guard.py`` of that git revision as a second
module (its own tables) and times both in alternating rounds (AB, BA, ...): per round the median of ``--calls``
calls, then min / median / max over the rounds; and the Python objects a call's guard holds (``gc`` generation 0's
count inside the block). ``--hooked``: each block registers a forward hook on the model and removes it, as Grad-CAM
does (torch's hook counter moves, so the guard looks for hooks the block left on the model: session 37).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard_cost.py --base main --rounds 21 --out benchmarks/guard-gaps-s36
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, make_model  # noqa: E402

from salience._core import guard as here  # noqa: E402


def guard_at(ref: str):
    """``_core/guard.py`` of git revision ``ref``, loaded as a module of its own."""
    text = subprocess.run(["git", "show", f"{ref}:src/salience/_core/guard.py"], cwd=HERE.parent, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "guard_base.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("guard_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_vit():
    spec = importlib.util.spec_from_file_location("benchmarks_transformers", HERE / "transformers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_vit(1)


def _nothing(*args) -> None:
    return None


def per_call(g, model, calls: int, run: bool, hooked: bool = False) -> float:
    """The median time of ``calls`` guards (each inside one ``run_guard`` if ``run``; ``hooked``: a hook put on the
    model and removed in each block), in ms."""
    times = []
    with g.run_guard(model) if run else contextlib.nullcontext():
        for _ in range(calls):
            t = time.perf_counter()
            with g.model_guard(model):
                if hooked:
                    model.register_forward_hook(_nothing).remove()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def held_objects(g, model) -> int:
    """The GC-tracked objects allocated and still alive inside one guard's block (generation 0's count)."""
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        with g.model_guard(model):
            inside = gc.get_count()[0]
    finally:
        gc.enable()
    return inside - before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="main")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hooked", action="store_true", help="a hook registered and removed in each block")
    args = ap.parse_args(argv)
    base = guard_at(args.base)
    models = {"vit_tiny": tiny_vit(), "resnet50": make_model("resnet50", 1)}
    sides = {"base": base, "here": here}
    rows = []
    for name, model in models.items():
        for run in (False, True):
            got: dict = {"base": [], "here": []}
            for side in sides.values():
                per_call(side, model, 5, run, args.hooked)  # warm-up
            for r in range(args.rounds):
                order = ("base", "here") if r % 2 == 0 else ("here", "base")
                for side in order:
                    got[side].append(per_call(sides[side], model, args.calls, run, args.hooked))
            ratios = sorted(h / b for h, b in zip(got["here"], got["base"]))
            row = {"model": name, "mode": ("in a run_guard" if run else "alone") + (", hooked" if args.hooked else ""),
                   **{f"{s} ms": [min(v), statistics.median(v), max(v)] for s, v in got.items()},
                   "ratio here/base": [ratios[0], statistics.median(ratios), ratios[-1]]}
            if not run:
                row["objects held base / here"] = [held_objects(base, model), held_objects(here, model)]
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
        lines = [f"Guard cost per call, base `{args.base}` vs this tree, {args.rounds} alternating rounds of "
                 f"{args.calls} calls (per round the median), min / median / max; torch threads 1"
                 f"{'; a hook registered and removed in each block' if args.hooked else ''}.", "",
                 "| model | mode | base ms | here ms | here / base (per round) | objects held base / here |",
                 "|---|---|---|---|---|---|"]
        fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
        for row in rows:
            held = row.get("objects held base / here")
            lines.append(f"| {row['model']} | {row['mode']} | {fmt(row['base ms'])} | {fmt(row['here ms'])} | "
                         f"{fmt(row['ratio here/base'])} | {'' if held is None else f'{held[0]} / {held[1]}'} |")
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
