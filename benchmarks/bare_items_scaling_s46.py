"""Review of session 46: is a bare peer timed on the first K items and scaled (engine_speed --bare-items) comparable
with the same peer on all the items? resnet50 at 224 px, fp32, one thread; per measurement the wall and CPU seconds and
minor faults scaled to 128 items. Faults and CPU time only (ran unlocked on core 0):

    PYTHONPATH=src taskset -c 0 python benchmarks/bare_items_scaling_s46.py
"""
import importlib.util
import resource
import sys
import time

import torch
import torchvision

sys.path.insert(0, "benchmarks")
spec = importlib.util.spec_from_file_location("es", "benchmarks/engine_speed.py"); es = importlib.util.module_from_spec(spec); spec.loader.exec_module(es)
torch.set_num_threads(1); torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
for p in m.parameters(): p.requires_grad_(False)
items = torch.rand(128, 3, 224, 224); tgt = torch.zeros(128, dtype=torch.long)
def meas(n, s):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    es.bare(m, items[:n], tgt[:n], s)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (time.perf_counter() - t) * 128 / n, (r1.ru_minflt - r0.ru_minflt) * 128 / n, (r1.ru_utime+r1.ru_stime-r0.ru_utime-r0.ru_stime) * 128 / n
es.bare(m, items[:16], tgt[:16], 16)
for rep in range(2):
    for n, s in [(32, 16), (128, 16), (32, 32), (128, 32)]:
        w, f, c = meas(n, s); print(f"rep {rep} bare {s} on {n} items, scaled to 128: wall {w:.1f} s cpu {c:.1f} s faults {f:,.0f}", flush=True)
