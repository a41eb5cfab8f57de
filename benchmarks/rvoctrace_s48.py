"""Session 48 review: the cost of ``folding.settings`` (now with the user's dict / list / set attributes' items) and
of occlusion's ``_trace`` (``_held`` / ``_put_back_held`` gone), old ``src`` against new, each round a fresh worker
of each, interleaved. Run: ``flock /tmp/bench.lock taskset -c 1 python benchmarks/rvoctrace_s48.py --old-src DIR
--rounds 5 --out benchmarks/rvoctrace-s48``."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, time, statistics, torch, torchvision
torch.set_num_threads(1)
from salience._core import folding
from salience.methods import _occlusion_local as local
out = {}
for name in ("resnet18", "resnet50"):
    m = getattr(torchvision.models, name)().eval()
    folding.settings(m)
    t = []
    for _ in range(200):
        a = time.perf_counter(); folding.settings(m); t.append(time.perf_counter() - a)
    out[f"settings {name} (us)"] = statistics.median(t) * 1e6
m = torchvision.models.resnet18().eval()
t = []
for _ in range(5):
    a = time.perf_counter(); local._trace(m); t.append(time.perf_counter() - a)
out["occlusion _trace resnet18 (ms)"] = statistics.median(t) * 1e3
print(json.dumps(out))
'''


def run(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    new_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    rounds: dict = {"old": [], "new": []}
    for _ in range(a.rounds):
        for which, src in (("old", a.old_src), ("new", new_src)):
            rounds[which].append(run(src))
    load = open("/proc/loadavg").read().split()[:3]
    lines = [f"CPU: AMD EPYC (AVX512-BF16, no AMX), core 1, one thread; load {' '.join(load)}; {a.rounds} rounds, "
             "min / median / max of the rounds' medians", "", "| | old | new |", "|---|---|---|"]
    for k in rounds["old"][0]:
        cells = []
        for which in ("old", "new"):
            v = sorted(r[k] for r in rounds[which])
            cells.append(f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}")
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    json.dump({"load": load, "rounds": rounds}, open(a.out + ".json", "w"), indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
