"""Session 50 review (rvprobe): the cost per call of the state put back per chunk (``Found``, ``each_pass_from``), end
to end, against the archive before the change (``eed8cdc``).

torchvision's resnet18 (random weights, eval mode), one image at 64 px: ``integrated_gradients(steps=32)`` and
``smoothgrad(samples=16)``, default options. Each round runs one process per source tree, old then this worktree
(the merge and the review's fix; interleaved),
each timing its calls after two warm-up calls of each method (the engine's probe and caches); a round's figure is the
median of its repeats. Run: ``flock /tmp/bench.lock taskset -c 1 python benchmarks/rvprobe_call_s50.py --out
benchmarks/rvprobe-call-s50.txt`` (the old tree is extracted with ``git archive eed8cdc src``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

from _common import cpu_name  # benchmarks/ is the script's folder

_WORKER = r"""
import json, statistics, sys, time
import torch, torchvision
torch.set_num_threads(1)
import salience
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=1000).eval()
x = torch.randn(1, 3, 64, 64)
calls = {"ig32": lambda: salience.integrated_gradients(model, x, 1, steps=32),
         "sg16": lambda: salience.smoothgrad(model, x, 1, samples=16, seed=0)}
for f in calls.values():
    f(); f()
times = {k: [] for k in calls}
for _ in range(int(sys.argv[1])):
    for k, f in calls.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
print(json.dumps({"file": salience.__file__, **{k: statistics.median(v) * 1e3 for k, v in times.items()}}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--base", default="eed8cdc")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = tempfile.mkdtemp(prefix="rvprobe-old-")
    archive = subprocess.run(["git", "-C", root, "archive", a.base, "src"], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(old)
    trees = {a.base: os.path.join(old, "src"), "worktree": os.path.join(root, "src")}
    rows: dict = {k: {"ig32": [], "sg16": []} for k in trees}
    loads = []
    for _ in range(a.rounds):
        loads.append(open("/proc/loadavg").read().split()[0])
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", _WORKER, str(a.repeats)], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            assert got["file"].startswith(src), got["file"]
            for k in ("ig32", "sg16"):
                rows[name][k].append(got[k])
    lines = ["# Session 50 review: one call's time, resnet18 (random weights) 1 image 64 px, 1 thread, default options",
             f"CPU: {cpu_name()}; torch {__import__('torch').__version__}; 1-minute load at each round's start: "
             + ", ".join(loads),
             f"{a.rounds} interleaved rounds ({a.base}, then this worktree: the merge 42b5739 and this review's fix), "
             f"each the median of {a.repeats} calls (ms); min / median / max over the rounds", ""]
    for k, what in (("ig32", "integrated_gradients(steps=32)"), ("sg16", "smoothgrad(samples=16)")):
        for name in trees:
            v = rows[name][k]
            lines.append(f"{what:34s} {name:8s}: {min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}")
        ratios = [n / o for o, n in zip(rows[a.base][k], rows["worktree"][k])]
        lines.append(f"{what:34s} worktree / {a.base} per round: " + ", ".join(f"{r:.3f}" for r in ratios))
    text = "\n".join(lines) + "\n"
    with open(a.out + ".tmp", "w") as f:
        f.write(text)
    os.replace(a.out + ".tmp", a.out)
    print(text)


if __name__ == "__main__":
    main()
