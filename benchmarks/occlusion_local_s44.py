"""Session 44: occlusion with region-limited passes (``local=True``, the default) against full passes (``local=False``)
and Captum's ``Occlusion`` at ``perturbations_per_eval`` 1, 4, 16, on resnet50 (random weights), window 32 stride 16
(169 windows at 224 px), fp32. One thread; each measurement a fresh process; interleaved rounds.

Run as: flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion_local_s44.py --images 1 --rounds 2
(``--configs`` picks some: local, full, localfold, fullfold (``fold_batchnorm=True``), cap1, cap4, cap16, and any of
them with ``_cl``: channels-last, Captum's by hand). Writes benchmarks/occlusion-local-s44.json and .md (``--out`` for another stem).
``--precision bf16`` (session 57): salience under ``performance(precision="bf16")``, Captum under the same CPU autocast
to bfloat16 by hand (``torch.autocast("cpu", dtype=torch.bfloat16)``, what salience's bf16 passes run under).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("local", "full", "cap1", "cap4", "cap16")


def one(config: str, images: int, precision: str = "fp32") -> float:
    import warnings

    import torch
    import torchvision

    import salience
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval()
    x = torch.rand(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = m(x).argmax(1)
    cl = config.endswith("_cl")
    name = config[:-3] if cl else config
    t0 = time.perf_counter()
    if name in ("local", "full", "localfold", "fullfold"):
        with salience.performance(fold_batchnorm=name.endswith("fold"), precision=precision):
            salience.occlusion(m, x, t, window=32, stride=16, local=name.startswith("local"),
                               memory_format="channels_last" if cl else "contiguous")
    else:
        from captum.attr import Occlusion
        if cl:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            Occlusion(m).attribute(x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), target=t, baselines=0.0,
                                   perturbations_per_eval=int(name[3:]))
    return time.perf_counter() - t0


def main() -> None:
    from _common import cpu_isa, cpu_name
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "occlusion-local-s44"))
    ap.add_argument("--one", default=None)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps({"seconds": one(a.one, a.images, a.precision)}), flush=True)
        return
    configs = a.configs.split(",")
    times: dict = {c: [] for c in configs}
    load = [open("/proc/loadavg").read().split()[:3]]
    for r in range(a.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            p = subprocess.run([sys.executable, __file__, "--one", c, "--images", str(a.images),
                                "--precision", a.precision], capture_output=True,
                               text=True, check=True)
            s = json.loads(p.stdout.strip().splitlines()[-1])["seconds"]
            times[c].append(s)
            print(f"round {r} {c} {s:.2f}", flush=True)
        load.append(open("/proc/loadavg").read().split()[:3])
    rows = {c: {"min": min(v), "median": statistics.median(v), "max": max(v), "all": v} for c, v in times.items()}
    with open(a.out + ".json", "w") as f:
        json.dump({"images": a.images, "rounds": a.rounds, "precision": a.precision, "load": load, "seconds": rows},
                  f, indent=1)
    lines = ["| config | min s | median s | max s | all rounds |", "|---|---|---|---|---|"]
    for c, v in rows.items():
        lines.append(f"| {c} | {v['min']:.2f} | {v['median']:.2f} | {v['max']:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in v['all'])} |")
    with open(a.out + ".md", "w") as f:
        f.write(f"resnet50 (random weights), {a.images} image(s) 224 px, window 32 stride 16 (169 windows), {a.precision}, "
                f"one thread, CPU {cpu_name()} ({cpu_isa()}); load averages {load}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
