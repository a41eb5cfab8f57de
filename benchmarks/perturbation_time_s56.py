"""Session 56: the seconds of RISE and Ablation-CAM with the code before (OLD) and after (NEW) the change that keeps
the engine's per-item scores in one buffer (and the fp16 wording), alternating, a fresh process a measurement.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation_time_s56.py OLD_SRC NEW_SRC [ROUNDS] > out.json

resnet18 (random weights, seed 0), 8 images at 64 px, one thread; RISE with 64 masks, Ablation-CAM at layer1.0.conv1
(64 channels: 512 items). In each process: one call (the probe, the caches), then the median of three calls' seconds.
Each round runs every (method, tree) once, the trees' order swapped every round; the load before each round.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time, warnings
import torch, torchvision
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import salience
torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
call = {"rise": lambda: salience.rise(model, x, masks=64),
        "ablationcam": lambda: salience.ablationcam(model, x, layer="layer1.0.conv1")}[sys.argv[1]]
call()
times = []
for _ in range(3):
    t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(times)))
"""


def one(method: str, src: str) -> float:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-c", CHILD, method], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    old, new = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    rows = []
    for r in range(rounds):
        load = open("/proc/loadavg").read().split()[:3]
        trees = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        for method in ("rise", "ablationcam"):
            for name, src in trees:
                rows.append({"round": r, "method": method, "tree": name, "seconds": one(method, src),
                             "load": " ".join(load), "at": time.strftime("%H:%M:%S")})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {}
    for method in ("rise", "ablationcam"):
        for name in ("old", "new"):
            s = [row["seconds"] for row in rows if row["method"] == method and row["tree"] == name]
            summary[f"{method} {name}"] = [min(s), statistics.median(s), max(s)]
    print(json.dumps({"rows": rows, "min_median_max": summary}, indent=1))


if __name__ == "__main__":
    main()
