"""A bf16 dataset run's page faults and CPU with its decoding worker forked, with and without the worker giving back
the heap's free pages it shares (session 42, issue 17), against the bf16 bare passes and the run with ``workers=0``.

    flock /tmp/bench.lock taskset -c 1 env PYTHONPATH=src python benchmarks/dataset_fork_faults.py [--n 80] [--reps 3]

One process, ``allocator="reuse"`` (as ``salience explain``): resnet50 random weights at 224 px, one thread, batch
16, vanilla, ``precision="bf16", memory_format="channels_last"``; ``--n`` JPEGs from ``dataset.py``. After a warm-up,
``--reps`` rounds of four steps, alternating: the bf16 bare passes (``dataset.py``'s), ``explain_dataset`` with one
forked worker and ``salience.runs.dataset.release_shared_heap`` (which the worker calls as it starts) replaced by
a no-op (the run before session 42), the same with it, and the run with ``workers=0`` (decoded in this process, nothing forked). Per step: wall s, this
process's CPU s, system s and minor page faults (``getrusage``). Prints, writes nothing.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as bench  # noqa: E402  (benchmarks/dataset.py: the files, the bare passes, the run)
from dataset_faults import timed_steps  # noqa: E402  (each step's wall, CPU, faults)

import salience  # noqa: E402
import salience.runs.dataset as run_dataset  # noqa: E402

KW = dict(precision="bf16", memory_format="channels_last")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    salience.set_performance(allocator="reuse")
    model = salience.load_model("torchvision:resnet50", weights="random")
    info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model), size=224, resize=256)
    salience._core.info.attach_info(model, info)
    real = run_dataset.release_shared_heap
    tmp = Path(tempfile.mkdtemp(prefix="salience-fork-faults-"))
    try:
        (files,) = bench.make_jpegs(tmp / "jpegs", args.n, 224)
        x = bench.decoded(files, info)
        bare = bench.bf16_copy(model)

        def run(workers: int, release: bool = True) -> None:
            run_dataset.release_shared_heap = real if release else (lambda: False)
            bench.run_salience(model, tmp / "jpegs" / "block0", 16, workers, tmp / "run", **KW)

        bench.run_bare(bare, x, 16, bf16=True)
        run(1)
        steps = [("bf16 bare passes", lambda: bench.run_bare(bare, x, 16, bf16=True)),
                 ("run, forked, no release", lambda: run(1, False)), ("run, forked, release", lambda: run(1)),
                 ("run, workers=0", lambda: run(0))] * args.reps
        print(f"{args.n} images, batch 16, bf16 + channels-last, allocator reuse", flush=True)
        timed_steps(steps, 24, 2)
    finally:
        run_dataset.release_shared_heap = real
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
