"""Where a dataset run's main process spends its time, on a model small enough that the host work shows.

    taskset -c 1 python benchmarks/dataset_profile.py                     # resnet18 at 64 px, 320 JPEGs, batch 16
    MODEL=resnet50 SIZE=224 N=64 REPS=1 taskset -c 1 python benchmarks/dataset_profile.py
    PROF=0 REPS=3 taskset -c 1 python benchmarks/dataset_profile.py       # the timings only (before / after a change)
    MODEL=resnet50 SIZE=224 N=80 BF16=1 TIMER=cpu WRITER=0 taskset -c 1 python benchmarks/dataset_profile.py

``BF16=1``: the runs (and the bare passes) in bf16 autocast + channels-last, as ``dataset.py --bf16``.
``TIMER=cpu``: the profile counts this process's CPU seconds (``time.process_time``), not wall seconds (cProfile's
default: a core shared with other work charges its waits to whatever call was running). ``WRITER=0``: the run's
host work in the main thread (``runs.dataset.WRITER_QUEUE = 0``: same bytes), so that the profile sees it too.

The files and the peers are ``benchmarks/dataset.py``'s: the model on the cores ``CPUS`` (default 1) with
one thread, the DataLoader worker (one) on core 0. Prints the images/s of the bare passes and of
``salience.explain_dataset`` (``REPS`` rounds each, alternating) and their time ratio per round, and the CPU
seconds of each and of ``calls``: the method alone, ``salience.vanilla`` batch by batch under the same options (what
of the run's CPU over the bare passes is the method call's, what the run layer's), then
(``PROF=1``) a cProfile of one more run, cumulative, the runs layer and the DataLoader's functions:
cProfile sees the main thread only (the writer thread's work shows as ``_Writer.put`` / ``close``).
``STATS``: the regular expression of the profile's rows (default the runs layer and the DataLoader's; ``STATS=_core/``
the method calls' own), ``ROWS`` how many (40). Not a benchmark of record (no file written).
"""
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import salience
import salience.runs.dataset
import salience.runs.sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as bench  # noqa: E402 - benchmarks/dataset.py, beside this file

SIZE, N, MODEL = int(os.environ.get("SIZE", 64)), int(os.environ.get("N", 320)), os.environ.get("MODEL", "resnet18")
os.sched_setaffinity(0, {int(c) for c in os.environ.get("CPUS", "1").split(",")})
bench.DECODE_CPUS.update({0})
salience.runs.sources.worker_init = bench.pin_worker
torch.set_num_threads(1)
BF16 = os.environ.get("BF16", "0") == "1"
KW = dict(precision="bf16", memory_format="channels_last") if BF16 else {}
if "WRITER" in os.environ:
    salience.runs.dataset.WRITER_QUEUE = int(os.environ["WRITER"])
model = salience.load_model(f"torchvision:{MODEL}", weights="random")
info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model), size=SIZE,
                                                  resize=int(SIZE * 256 / 224))
salience._core.info.attach_info(model, info)
tmp = Path(tempfile.mkdtemp(prefix="salience-profile-"))
try:
    block = bench.make_jpegs(tmp / "jpegs", N, SIZE, 1)[0]
    x = bench.decoded(block, info)
    bare = bench.bf16_copy(model) if BF16 else model
    bench.run_bare(bare, x[:16], 16, bf16=BF16)
    bench.run_salience(model, tmp / "jpegs" / "block0", 16, 1, tmp / "warm", **KW)
    def calls() -> None:  # the method alone: salience.vanilla batch by batch under the run's options, no run
        with salience.performance(**KW):
            for s in range(0, N, 16):
                salience.vanilla(model, x[s:s + 16])

    peers = {"bare": lambda: bench.run_bare(bare, x, 16, bf16=BF16), "calls": calls,
             "salience": lambda: bench.run_salience(model, tmp / "jpegs" / "block0", 16, 1, tmp / "run", **KW)}
    times: dict[str, list[float]] = {k: [] for k in peers}
    cpu: dict[str, list[float]] = {k: [] for k in peers}
    for _ in range(int(os.environ.get("REPS", 2))):
        for k, peer in peers.items():
            t, c = time.perf_counter(), time.process_time()
            peer()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    print({k: [round(N / v, 1) for v in vs] for k, vs in times.items()}, "images/s; salience / bare per round:",
          [round(s / b, 3) for s, b in zip(times["salience"], times["bare"])])
    print("CPU s per round:", {k: [round(v, 2) for v in vs] for k, vs in cpu.items()}, "; over bare: calls",
          [round(s / b, 3) for s, b in zip(cpu["calls"], cpu["bare"])], "salience",
          [round(s / b, 3) for s, b in zip(cpu["salience"], cpu["bare"])])
    if os.environ.get("PROF", "1") == "1":
        profile = cProfile.Profile(time.process_time) if os.environ.get("TIMER") == "cpu" else cProfile.Profile()
        profile.enable()
        bench.run_salience(model, tmp / "jpegs" / "block0", 16, 1, tmp / "run", **KW)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(
            os.environ.get("STATS", r"runs/|dataloader|autograd/__init__|files.py|queue.py"), int(os.environ.get("ROWS", 40)))
finally:
    shutil.rmtree(tmp, ignore_errors=True)
