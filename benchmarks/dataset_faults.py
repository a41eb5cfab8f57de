"""Where a dataset run's page faults come from: the DataLoader worker forked from a process with a big heap.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/dataset_faults.py [--allocator reuse] [--n 64]

One process (resnet50 at 224 px, one thread, batch 16, vanilla maps, ``--n`` JPEGs from ``dataset.py``):
first the bare passes over the files (the heap grows to a pass's peak, as in ``dataset.py``, whose bare peer
runs in the same process), then ``explain_dataset`` with one DataLoader worker, with none (decoded in this
process: no fork), and with one again, then the bare passes again. Per step: wall s, this process's CPU s and
minor page faults (``getrusage``). A forked worker shares the parent's pages copy-on-write for its whole life
(the run), so every page of its heap the parent writes afterwards is copied at a fault: with
``allocator="reuse"`` the heap a pass frees is kept, and so shared with the worker, and its reuse faults. The
worker's decoding (``--workers 0``) runs in this process: its CPU counts in that step. Prints, writes nothing.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as bench  # noqa: E402  (benchmarks/dataset.py: the files, the bare passes, the run)

import salience  # noqa: E402


def timed_steps(steps, width: int = 26, digits: int = 1) -> None:
    """Run each ``(name, step)`` in turn and print its wall s, this process's CPU s (system s) and minor faults."""
    for name, step in steps:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        print(f"{name:{width}s} wall {wall:6.{digits}f} s  CPU {cpu:6.{digits}f} s (sys {r1.ru_stime - r0.ru_stime:5.{digits}f})"
              f"  {r1.ru_minflt - r0.ru_minflt:9,d} minor faults", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--allocator", choices=["default", "reuse"], default="default")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.allocator != "default":
        salience.set_performance(allocator=args.allocator)
        from salience._core.malloc import keep_freed_memory
        keep_freed_memory()
    model = salience.load_model("torchvision:resnet50", weights="random")
    info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model), size=224, resize=256)
    salience._core.info.attach_info(model, info)
    tmp = Path(tempfile.mkdtemp(prefix="salience-faults-"))
    try:
        (files,) = bench.make_jpegs(tmp / "jpegs", args.n, 224)
        x = bench.decoded(files, info)
        steps = [("bare passes", lambda: bench.run_bare(model, x, 16)),
                 ("run, 1 worker (forked)", lambda: bench.run_salience(model, tmp / "jpegs" / "block0", 16, 1,
                                                                       tmp / "run1")),
                 ("run, 0 workers (no fork)", lambda: bench.run_salience(model, tmp / "jpegs" / "block0", 16, 0,
                                                                         tmp / "run0")),
                 ("run, 1 worker again", lambda: bench.run_salience(model, tmp / "jpegs" / "block0", 16, 1,
                                                                    tmp / "run2")),
                 ("bare passes again", lambda: bench.run_bare(model, x, 16))]
        print(f"allocator {args.allocator}, {args.n} images, batch 16; pid {os.getpid()}", flush=True)
        timed_steps(steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
