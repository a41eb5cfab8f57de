"""The model guard's cost per call: ``with model_guard(model): pass`` (entry and exit, nothing held before: each
module's and parameter's state recorded and put back), and the same inside a ``run_guard`` (a dataset run's call: a
count, and the baseline compared and put back), on ``transformers.py``'s ``vit_tiny`` (152 modules, 152 parameters)
and resnet50 (one CPU thread). ``--base REF`` unpacks the whole ``src`` of that git revision (``git archive``, or a
folder holding ``salience``) and each side runs in a worker process of its own (``sides_s55.py``: a revision before
``_core/guard.py`` became the package ``_core/guard/`` works as one after it); the sides are timed in alternating
rounds (AB, BA, ...): per round the median of ``--calls`` calls, then min / median / max over the rounds; and the
Python objects a call's guard holds (``gc`` generation 0's count inside the block). ``--hooked``: each block
registers a forward hook on the model and removes it, as Grad-CAM does (torch's hook counter moves, so the guard
looks for hooks the block left on the model: session 37).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard_cost.py --base main --rounds 21 --out benchmarks/guard-gaps-s36
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides_s55 import SRC, Side, archive_src, commit_of, import_from, round_order, serve  # noqa: E402

MODELS = ("vit_tiny", "resnet50")


def tiny_vit():
    from _common import HERE

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


def worker(src: str) -> None:
    """One side: salience from ``src``; the models built once, then the parent's requests served."""
    import_from(src)
    import torch

    from _common import make_model
    from salience._core import guard  # a module before session 54, a package after: both have the two guards

    torch.set_num_threads(1)
    models = {"vit_tiny": tiny_vit(), "resnet50": make_model("resnet50", 1)}
    serve(src, {"time": lambda model, calls, run, hooked: {"ms": per_call(guard, models[model], calls, run, hooked)},
                "held": lambda model: {"objects": held_objects(guard, models[model])},
                "where": lambda: {"guard": guard.__file__}})


def measure(sides: dict, name: str, run: bool, args) -> dict:
    """One row: both sides' per-round medians (alternating), their ratio per round, the objects held."""
    got: dict = {s: [] for s in sides}
    for side in sides.values():
        side.ask(cmd="time", model=name, calls=5, run=run, hooked=args.hooked)  # warm-up
    for r in range(args.rounds):
        for s in round_order(list(sides), r):
            got[s].append(sides[s].ask(cmd="time", model=name, calls=args.calls, run=run, hooked=args.hooked)["ms"])
    ratios = sorted(h / b for h, b in zip(got["here"], got["base"]))
    row = {"model": name, "mode": ("in a run_guard" if run else "alone") + (", hooked" if args.hooked else ""),
           **{f"{s} ms": [min(v), statistics.median(v), max(v)] for s, v in got.items()},
           "ratio here/base": [ratios[0], statistics.median(ratios), ratios[-1]],
           "per round ms": got}
    if not run:
        row["objects held base / here"] = [sides[s].ask(cmd="held", model=name)["objects"] for s in ("base", "here")]
    return row


def write(out: str, rows: list, head: str) -> None:
    Path(out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [head, "", "| model | mode | base ms | here ms | here / base (per round) | objects held base / here |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: " / ".join(f"{x:.3f}" for x in v)  # noqa: E731
    for row in rows:
        held = row.get("objects held base / here")
        lines.append(f"| {row['model']} | {row['mode']} | {fmt(row['base ms'])} | {fmt(row['here ms'])} | "
                     f"{fmt(row['ratio here/base'])} | {'' if held is None else f'{held[0]} / {held[1]}'} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default="main", help="a git revision, or a folder holding salience (an archive's src)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--hooked", action="store_true", help="a hook registered and removed in each block")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from _common import cpu_name

    load = os.getloadavg()
    sides = {"base": Side(__file__, archive_src(args.base), "base"), "here": Side(__file__, str(SRC), "here")}
    try:
        where = {s: side.ask(cmd="where")["guard"] for s, side in sides.items()}
        rows = []
        for name in MODELS:
            for run in (False, True):
                rows.append(measure(sides, name, run, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "per round ms"}), flush=True)
    finally:
        for side in sides.values():
            side.close()
    if args.out:
        head = (f"Guard cost per call, base `{args.base}` ({commit_of(args.base)}) vs this tree, {args.rounds} "
                f"alternating rounds of {args.calls} calls (per round the median), min / median / max; torch threads 1"
                f"{'; a hook registered and removed in each block' if args.hooked else ''}. Each side a worker "
                f"process: base's guard {where['base']}, here's {where['here']}. CPU {cpu_name()}, cores "
                f"{sorted(os.sched_getaffinity(0))}, load before the rounds {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}."
                f"\n\n    python benchmarks/guard_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        write(args.out, rows, head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
