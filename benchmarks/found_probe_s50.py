"""Session 50: what the model's own state put back costs around the engine's memory probe and per chunk.

On torchvision's resnet50 (random weights, eval mode, inside salience's model guard as in a call): the record
(``Found(model)``, once a call), ``before_pass()`` where nothing changed (once per chunk of SmoothGrad / integrated
gradients, and after the probe), the exit; beside one gradient pass of one image at 224 px (the probe's pass at one
image), for scale (``--model resnet18 --size 64``: issue 19's small case). Interleaved rounds, min / median / max. Run: ``flock /tmp/bench.lock taskset -c 1 python
benchmarks/found_probe_s50.py --out benchmarks/found-probe-s50.txt``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torchvision

from salience._core.guard import Found, model_guard


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default="")
    ap.add_argument("--model", default="resnet50", help="a torchvision model name (resnet50, resnet18)")
    ap.add_argument("--size", type=int, default=224, help="the image's side in pixels")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)()
    x = torch.randn(1, 3, a.size, a.size)
    rows: dict[str, list[float]] = {"record (Found(model))": [], "before_pass, nothing changed": [],
                                    "exit": [], "record + before_pass + exit (the probe's, first call)": [],
                                    "one gradient pass, 1 image (ms)": []}
    loads = []
    with model_guard(model):
        for _ in range(a.rounds):
            loads.append(open("/proc/loadavg").read().split()[0])
            t = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                f = Found(model)
                t1 = time.perf_counter()
                f.before_pass()
                t2 = time.perf_counter()
                f.__exit__(None, None, None)
                t3 = time.perf_counter()
                t.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
            for i, k in enumerate(list(rows)[:4]):
                rows[k].append(statistics.median(r[i] for r in t) * 1e6)
            p = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            model(p)[:, 0].sum().backward()
            rows["one gradient pass, 1 image (ms)"].append((time.perf_counter() - t0) * 1e3)
    lines = [f"# {__doc__.splitlines()[0]}", f"{a.model} at {a.size} px", f"CPU: {_cpu()}; torch {torch.__version__}; 1 thread; "
             f"pid {os.getpid()}; 1-minute load at each round's start: {', '.join(loads)}",
             f"{a.rounds} interleaved rounds, each the median of {a.repeats} repeats (us unless said); "
             "min / median / max over the rounds", ""]
    for k, v in rows.items():
        lines.append(f"{k}: {min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        with open(a.out + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
