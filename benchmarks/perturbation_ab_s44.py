"""Session 44 (issue 15, memory): a short interleaved timing A/B of two source trees (old, new) on RISE and Score-CAM,
resnet50, 8 images at 224 px, one thread, each measurement a fresh process (benchmarks/perturbation.py --one).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation_ab_s44.py OLD_ROOT NEW_ROOT ROUNDS \
        --masks 8 --impl 'salience bf16+channels_last+fold' --methods rise,scorecam

Prints one line per measurement and the min / median / max seconds and peak MiB of each tree."""
import argparse
import json
import os
import statistics
import subprocess
import sys

p = argparse.ArgumentParser()
p.add_argument("old")
p.add_argument("new")
p.add_argument("rounds", type=int)
p.add_argument("--masks", type=int, default=8)
p.add_argument("--impl", default="salience bf16+channels_last+fold")
p.add_argument("--methods", default="rise")
a = p.parse_args()
config = {"model": "resnet50", "size": 224, "images": 8, "layer": "layer1.0.conv1", "masks": a.masks, "threads": 1,
          "bf16": 1}
got: dict = {}
for r in range(a.rounds):
    for m in a.methods.split(","):
        for name, root in (("old", a.old), ("new", a.new)) if r % 2 == 0 else (("new", a.new), ("old", a.old)):
            env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), BENCH_CONFIG=json.dumps(config))
            out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "perturbation.py"), "--one", m, a.impl],
                                 capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            got.setdefault((m, name), []).append(res)
            print(r, m, name, res, open("/proc/loadavg").read().split()[:3], flush=True)
for (m, name), rs in sorted(got.items()):
    s = sorted(x["seconds"] for x in rs)
    pk = sorted(x["peak_mib"] for x in rs)
    print(f"{m} {name}: seconds {s[0]:.1f} / {statistics.median(s):.1f} / {s[-1]:.1f}; "
          f"peak MiB {pk[0]:.0f} / {statistics.median(pk):.0f} / {pk[-1]:.0f}")
