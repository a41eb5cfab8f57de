"""A bf16 dataset run's decoding worker forked, from a forkserver, and from a forkserver without the first batch decoded
in the run's process, against the bf16 bare passes: alternating in one warm process (issue 17, session 43).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/dataset_forkserver_s43.py --n 80 --rounds 4 > OUT

resnet50 (random weights) at 224, batch 16, vanilla, ``precision="bf16", memory_format="channels_last"``, one thread,
``allocator="reuse"`` (glibc's thresholds fixed before any pass), the run's process on core 1 (``taskset``), its one
decoding worker pinned to core 0 as ``benchmarks/dataset.py --decode-cpus 0`` does. Sides, each a whole
``explain_dataset`` of the same ``--n`` JPEG files (``benchmarks/dataset.py``'s), the order rotated each round:

- ``bare``: ``benchmarks/dataset.py``'s bf16 bare passes over the files decoded beforehand (the floor);
- ``fork``: the worker forked (``SHARED_HEAP`` set out of reach: what a run did before session 43);
- ``forkserver``: the code as it is (the process keeps about 1 GB of freed heap: the worker from the forkserver, the
  first batch decoded in the run's process);
- ``no head``: the forkserver, every batch from the worker (``_decoded`` without its first batch in the process).

Per side and round: wall s, this process's CPU s, system s and minor faults (``getrusage``), then the run's waits:
``setup`` (the call's start to its DataLoader's), ``iter`` (the iterator's start: the workers'), ``b`` (each batch
awaited from the loader; with the first batch decoded in the process, batches 2 on).
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as B  # noqa: E402  benchmarks/dataset.py
import salience  # noqa: E402
import salience.runs.dataset as rd  # noqa: E402
import salience.runs.sources  # noqa: E402

WAITS: list[tuple[str, float]] = []
T0 = [0.0]
DECODED = rd._decoded
LOADER = rd._loader


def timed_loader(run, plan_batches):
    """``rd._loader`` whose iteration records its waits in ``WAITS``."""
    made = time.perf_counter()
    loader = LOADER(run, plan_batches)

    def batches(it):
        while True:
            t = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                return
            WAITS.append(("b", time.perf_counter() - t))
            yield x

    class Timed:
        def __iter__(self):  # not a generator: the workers start when the iterator is asked for, as the loader's
            t = time.perf_counter()
            it = iter(loader)
            WAITS.extend([("setup", made - T0[0]), ("iter", time.perf_counter() - t)])
            return batches(it)

    return Timed()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    salience.set_performance(allocator="reuse")
    from salience._core.malloc import keep_freed_memory, kept_free_bytes

    keep_freed_memory()
    B.DECODE_CPUS.update({0})
    salience.runs.sources.worker_init = functools.partial(B.pin_worker, cores=frozenset({0}))
    rd._loader = timed_loader
    torch.set_num_threads(1)
    model = salience.load_model("torchvision:resnet50", weights="random")
    info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model), size=224, resize=256)
    salience._core.info.attach_info(model, info)
    tmp = Path(tempfile.mkdtemp(prefix="salience-fs-"))
    files = B.make_jpegs(tmp / "jpegs", args.n, 224, 1)[0]
    x, cl, limit = B.decoded(files, info), B.bf16_copy(model), rd.SHARED_HEAP

    def run(side: str) -> None:
        rd.SHARED_HEAP = 1 << 62 if side == "fork" else limit
        rd._decoded = (lambda r, pb: iter(rd._loader(r, pb))) if side == "no head" else DECODED
        B.run_salience(model, tmp / "jpegs" / "block0", 16, 1, tmp / "run", precision="bf16",
                       memory_format="channels_last")

    cases = {"bare": lambda: B.run_bare(cl, x, 16, bf16=True), "fork": lambda: run("fork"),
             "forkserver": lambda: run("forkserver"), "no head": lambda: run("no head")}
    B.run_bare(cl, x[:16], 16, bf16=True)
    run("forkserver")  # starts the forkserver (this one forks)
    run("forkserver")
    print("kept free MB", kept_free_bytes() >> 20, flush=True)
    order = list(cases)
    for r in range(args.rounds):
        for c in order[r % len(order):] + order[:r % len(order)]:
            u0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            WAITS.clear()
            T0[0] = t
            cases[c]()
            w, u1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            cpu = u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime
            print(f"round {r + 1} {c:11s} wall {w:.2f} CPU {cpu:.2f} sys {u1.ru_stime - u0.ru_stime:.2f} faults "
                  f"{u1.ru_minflt - u0.ru_minflt} load {os.getloadavg()[0]:.1f}", flush=True)
            if WAITS:
                print("   ", " ".join(f"{k}:{v:.2f}" for k, v in WAITS),
                      f"sum_b {sum(v for k, v in WAITS if k == 'b'):.2f}", flush=True)


if __name__ == "__main__":
    main()
