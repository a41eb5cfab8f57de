"""Session 57: what one model guard's enter + exit does, counted (not timed): main's tree against this checkout's.

    PYTHONPATH=src python benchmarks/guard_counts_s57.py --old-src main --out benchmarks/guard-counts-s57.md

Counts the load of a shared machine does not move (the wall times of ``guard_cost_s57.py`` do): per enter + exit of
``with model_guard(model): pass`` (warm, no guard holding the model before), on the demo CNN (``shapes``) and resnet18
(random weights), one worker process per tree (``sides_s55.py``): the Python calls made in salience's guard package,
the Python bytecode instructions executed in salience's files (a trace by opcode: a proxy of the Python work, not of
the C work), and the tensor operations that copy or compare values (``clone``, ``cat``, ``equal``, ``copy_``, seen by
a ``TorchDispatchMode``). Not part of salience and not run by the tests.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sides_s55 import SRC, Side, archive_src, commit_of, import_from, serve  # noqa: E402

MODELS = ("shapes", "resnet18")


def worker(src: str) -> None:
    """One side: the counts of one warm enter + exit on request."""
    import_from(src)
    torch.set_num_threads(1)
    import importlib

    import salience
    from salience._core.guard import model_guard
    from torch.utils._python_dispatch import TorchDispatchMode

    importlib.import_module("torch._dynamo")  # imported in a process that compiled: the same path on both sides
    guard_dir = str(Path(salience.__file__).resolve().parent / "_core" / "guard")
    salience_dir = str(Path(salience.__file__).resolve().parent)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("clone", "cat", "equal", "copy_", "_to_copy"):
                self.count[name] += 1
            return func(*args, **(kwargs or {}))

    def build(name: str) -> torch.nn.Module:
        torch.manual_seed(0)
        if name == "shapes":
            return salience.zoo.load_demo(name).eval()
        import torchvision
        return getattr(torchvision.models, name)(weights=None).eval()

    built = {name: build(name) for name in MODELS}

    def count(model: str) -> dict:
        m = built[model]
        for _ in range(3):
            with model_guard(m):
                pass
        calls, opcodes = [0], [0]

        def local(frame, event, arg):
            if event == "opcode":
                opcodes[0] += 1
            return local

        def tracer(frame, event, arg):
            name = frame.f_code.co_filename
            if not name.startswith(salience_dir):
                return None
            if name.startswith(guard_dir):
                calls[0] += 1
            frame.f_trace_opcodes = True
            return local

        sys.settrace(tracer)
        try:
            with model_guard(m):
                pass
        finally:
            sys.settrace(None)
        with Ops() as ops:
            with model_guard(m):
                pass
        return {"calls": calls[0], "opcodes": opcodes[0], "ops": dict(sorted(ops.count.items())),
                "modules": len(list(m.modules())), "params": len(list(m.parameters())),
                "buffers": len(list(m.buffers()))}
    serve(src, {"count": count})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", default="main", help="a folder holding salience, or a git revision (main)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    sides = {"main": Side(__file__, archive_src(args.old_src), "main"), "branch": Side(__file__, str(SRC), "branch")}
    try:
        got = {(m, s): sides[s].ask(cmd="count", model=m) for m in MODELS for s in sides}
    finally:
        for side in sides.values():
            side.close()
    lines = [f"# One model guard's enter + exit, counted: main ({commit_of(args.old_src)}) against the branch "
             f"({commit_of('HEAD')} and its working tree)", "",
             f"command: `python benchmarks/guard_counts_s57.py {' '.join(argv if argv is not None else sys.argv[1:])}`;"
             f" torch {torch.__version__}; deterministic (the same on a loaded machine)", "",
             "| model (modules, parameters, buffers) | side | Python calls in the guard package | Python bytecode "
             "instructions in salience | tensor ops that copy or compare values |", "|---|---|---|---|---|"]
    for m in MODELS:
        for s in sides:
            g = got[(m, s)]
            ops = ", ".join(f"{k} {v}" for k, v in g["ops"].items()) or "none"
            lines.append(f"| {m} ({g['modules']}, {g['params']}, {g['buffers']}) | {s} | {g['calls']} | "
                         f"{g['opcodes']} | {ops} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
