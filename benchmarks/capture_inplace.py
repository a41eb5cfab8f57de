"""Grad-CAM's capture of a layer's output: what reading the layer's own output costs (a layer that an in-place
operation after it changes) and what it costs where nothing changes it (the default layer).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/capture_inplace.py --rounds 5 \\
        --out benchmarks/capture-inplace-s41

Random-weight resnet50, ``--batch`` images of ``--size``, one thread, each image's predicted class. Rows: Grad-CAM at the
default layer (``layer4``: nothing after it changes its output) with this tree's salience and with main's
(``--main``, run from its ``src``); Grad-CAM at ``layer4[-1].bn3`` (``out += identity`` and an in-place ReLU after
it): main's (which reads the changed tensor: the block's output), this tree's first call in a process (a pass that
shows the change, and a pass whose rest runs on a copy) beside main's first call, and the later calls (a copy at
once). Each round runs one
child process per tree, alternating, each timing ``--calls`` calls after one untimed call (the first-call row: a
process of its own, no untimed call); min / median / max seconds per call over the rounds.
Not part of salience and not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import hashlib, json, sys, time, torch, torchvision, salience
torch.set_num_threads(1)
torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
x = torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
layer = m.layer4 if "LAYER" == "layer4" else m.layer4[-1].bn3
out = []
if not FIRST:
    salience.gradcam(m, x, None, layer=layer)
for _ in range(1 if FIRST else CALLS):
    t = time.perf_counter()
    cam = salience.gradcam(m, x, None, layer=layer)
    out.append(time.perf_counter() - t)
print(json.dumps({"times": out, "sum": float(cam.double().sum()),
                  "sha1": hashlib.sha1(cam.numpy().tobytes()).hexdigest()[:12]}))
"""


def _child(src: str, layer: str, first: bool, args: argparse.Namespace) -> dict:
    code = (CHILD.replace("BATCH", str(args.batch)).replace("SIZE", str(args.size)).replace("LAYER", layer)
            .replace("FIRST", str(first)).replace("CALLS", str(args.calls)))
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--main", default="/work/main/src")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    here = str(ROOT / "src")
    cases = [("layer4", "salience", here, False), ("layer4", "salience main", args.main, False),
             ("layer4[-1].bn3", "salience, later calls", here, False),
             ("layer4[-1].bn3", "salience, first call", here, True),
             ("layer4[-1].bn3", "salience main", args.main, False),
             ("layer4[-1].bn3", "salience main, first call", args.main, True)]
    times: dict[tuple[str, str], list[float]] = {(c[0], c[1]): [] for c in cases}
    sums: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for layer, name, src, first in cases:
            r = _child(src, "layer4" if layer == "layer4" else "bn3", first, args)
            times[(layer, name)].extend(r["times"])
            sums[(layer, name)] = (r["sum"], r["sha1"])
    rows = [{"layer": k[0], "implementation": k[1], "min": min(v), "median": statistics.median(v), "max": max(v),
             "calls": len(v), "map_sum": sums[k][0], "map_sha1": sums[k][1]} for k, v in times.items()]
    import torch
    lines = ["# Grad-CAM's layer capture: an in-place operation after the layer", "",
             "```", "flock /tmp/bench.lock taskset -c 1 " + " ".join([sys.executable] + sys.argv), "```", "",
             f"random resnet50, {args.batch} x 3 x {args.size} x {args.size}, 1 thread, {args.rounds} alternating "
             f"rounds, torch {torch.__version__}.", "",
             "| layer | implementation | min s | median s | max s | calls | map's sum | map's sha1 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['implementation']} | {r['min']:.3f} | {r['median']:.3f} | {r['max']:.3f} | "
              f"{r['calls']} | {r['map_sum']:.6g} | {r['map_sha1']} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
