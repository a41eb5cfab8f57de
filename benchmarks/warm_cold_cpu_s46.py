"""Whether a warm call costs more than a cold one (vit_b_16 at 112 px, SmoothGrad 16, 1 image): wall, thread CPU and
minor faults of clear_cache + cold + warm, defaults and auto in both orders. On a loaded machine (run on core 0,
no lock): the CPU time is the call's own work, the wall time adds the other processes' turns.

    PYTHONPATH=src taskset -c 0 python benchmarks/warm_cold_cpu_s46.py > benchmarks/warm-cold-cpu-s46.txt
"""
import resource
import time

import torch
import torchvision


import salience
from salience._core import perf
torch.set_num_threads(1); torch.manual_seed(0)
m = torchvision.models.vit_b_16(weights=None, image_size=112).eval()
x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
with torch.no_grad(): t = m(x).argmax(1)
call = lambda: salience.smoothgrad(m, x, t, samples=16, reduce=None)
call()
def unit(name, opts):
    perf.clear_cache()
    out = []
    with salience.performance(**opts):
        for w in ("cold", "warm"):
            c0, t0, f0 = time.thread_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            call()
            out.append(f"{name} {w}: wall {time.perf_counter()-t0:.3f} cpu {time.thread_time()-c0:.3f} faults {resource.getrusage(resource.RUSAGE_SELF).ru_minflt-f0}")
    print("; ".join(out), flush=True)
for r in range(2):
    for name, opts in ([("defaults", {}), ("auto", {"memory_format": "auto"})] if r % 2 == 0 else [("auto", {"memory_format": "auto"}), ("defaults", {})]):
        unit(name, opts)
