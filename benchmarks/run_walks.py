"""What each per-call model walk and input check of a one-pass call costs on its own (issue 17, session 41).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/run_walks.py

resnet50, a batch of 16 at 224, one thread, CPU ms a call.

Each piece is called ``N`` times (default 200) after one warm call, timed with ``time.process_time`` (no profiler:
cProfile charges every call it sees, 2-3x a walk's own time). Not a benchmark of record (no file written).
"""
import os
import time

import torch

import salience
from salience._core import autograd, fingerprint, guard, perf

torch.set_num_threads(1)
N = int(os.environ.get("N", 200))
model = salience.load_model("torchvision:resnet50", weights="random").eval()
x = torch.randn(16, 3, 224, 224)


def timed(name: str, fn, n: int = N) -> None:
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    print(f"{name:38s} {(time.process_time() - start) / n * 1e3:.3f} ms")


def guarded() -> None:
    with guard.model_guard(model):
        pass


timed("guard._walk (modules, parameters)", lambda: guard.entry._walk(model))
timed("structure()", lambda: fingerprint.structure(model))
timed("_compute_dtype", lambda: autograd._compute_dtype(model))
timed("_is_convolutional", lambda: perf._is_convolutional(model))
timed("final_softmax (a structure() inside)", lambda: autograd.final_softmax(model))
timed("_all_finite (16 x 3 x 224 x 224)", lambda: autograd._all_finite(x), N // 4)
timed("check_input (dtype walk + finiteness)", lambda: autograd.check_input(x, model), N // 4)
timed("model_guard alone", guarded)
with guard.run_guard(model):
    timed("model_guard inside a run_guard", guarded)
