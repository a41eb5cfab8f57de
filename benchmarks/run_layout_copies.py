"""The CPU time of one call's channels-last conversion and restore of resnet50's weights (``Run.set_layout(True)`` then
``close()``, with the ``Run``'s own setup), every call copying (a call outside a dataset run) against a run's kept copies
(``salience._core.guard.run_guard``, which keeps them: ``layouts.open_copies``, session 41). ``taskset -c 1 python benchmarks/run_layout_copies.py``."""
import time

import torch

import salience
from salience._core import guard, perf
torch.set_num_threads(1)
model = salience.load_model("torchvision:resnet50", weights="random")
x = torch.zeros(16, 3, 224, 224)
def one():
    run = perf.Run(model, x, perf.Performance(memory_format="channels_last", precision="bf16"), tag="t")
    run.set_layout(True); run.close()
def cpu(n=20):
    one(); t = time.process_time()
    for _ in range(n): one()
    return (time.process_time() - t) / n * 1e3
for r in range(3):
    a = cpu()
    with guard.run_guard(model):
        b = cpu()
    print(f"round {r}: every call copies {a:.2f} ms, kept copies {b:.2f} ms per call (CPU)")
