"""Session 50 review (rvprobe): the cost of Found's new scan (a copy of its own of a torch.nn buffer written since the
guard's copy: held_values for each torch.nn buffer when Found records), and Found(model) with it, inside the model guard.
Run: ``flock /tmp/bench.lock taskset -c 1 python benchmarks/rvprobe_scan_s50.py | tee benchmarks/rvprobe-scan-s50.txt``
(5 rounds of 200, min / median / max, us; one thread)."""
import statistics
import time

import torch
import torchvision

from salience._core.guard import Found, held_values, model_guard

torch.set_num_threads(1)
print(f"CPU: AMD EPYC (no AMX); load {open('/proc/loadavg').read().split()[0]}; torch {torch.__version__}")
for name in ("resnet18", "resnet50"):
    m = getattr(torchvision.models, name)().eval()
    with model_guard(m):
        f = Found(m)
        scan, rec = [], []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                [held_values(e[0], e[1], e[2], e[3]) is None for e in f.torch_nn]
            scan.append((time.perf_counter() - t) / 200 * 1e6)
            t = time.perf_counter()
            for _ in range(200):
                Found(m)
            rec.append((time.perf_counter() - t) / 200 * 1e6)
        print(f"{name}: {len(f.torch_nn)} torch.nn buffers; the fix's scan {min(scan):.1f} / {statistics.median(scan):.1f} / {max(scan):.1f} us; Found(model) with it {min(rec):.1f} / {statistics.median(rec):.1f} / {max(rec):.1f} us")
