"""The model guard's peak memory over a model with large buffers: one enter + exit, in a fresh process per round.

A model of two float32 buffers of MIB MiB each (and one small one, written through ``.data`` in the block); the
figure is the process's peak resident set (VmHWM) over its resident set before the guard, in MiB: the guard's own
copies (the entry's copy of the buffers, and whatever the exit allocates to compare them). Memory, not time: the
load of the shared machine does not move it.

    python benchmarks/rvguard_mem_s57.py [MIB] [ROUNDS] NAME=SRC_DIR ...

Each round runs every side once, in turn (the order rotated each round); prints a markdown table of min / median /
max per side and the machine's load (``/proc/loadavg``) before and after."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

CHILD = r"""
import gc, torch
from torch import nn
from salience._core.guard import model_guard
n = {mib}
m = nn.Module()
m.register_buffer("a", torch.ones(n << 18))
m.register_buffer("b", torch.ones(n << 18))
m.register_buffer("c", torch.ones(4))
gc.collect()
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) // 1024
before = status("VmRSS")
with model_guard(m):
    m.c.data.add_(1)
print(status("VmHWM") - before)
"""


def main() -> None:
    args = sys.argv[1:]
    mib = int(args.pop(0)) if args and args[0].isdigit() else 256
    rounds = int(args.pop(0)) if args and args[0].isdigit() else 3
    sides = [a.split("=", 1) for a in args]
    load_before = open("/proc/loadavg").read().split()[:3]
    seen: dict = {name: [] for name, _ in sides}
    for r in range(rounds):
        for name, src in sides[r % len(sides):] + sides[:r % len(sides)]:
            env = dict(os.environ, PYTHONPATH=src)
            out = subprocess.run([sys.executable, "-c", CHILD.format(mib=mib)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            seen[name].append(int(out.split()[-1]))
    load_after = open("/proc/loadavg").read().split()[:3]
    print(f"buffers: 2 x {mib} MiB float32 (+ 16 bytes); {rounds} rounds, sides rotated; load before "
          f"{' '.join(load_before)}, after {' '.join(load_after)}\n")
    print("| side | peak over the model, MiB: min | median | max |")
    print("|---|---|---|---|")
    for name, vals in seen.items():
        print(f"| {name} | {min(vals)} | {statistics.median(vals):g} | {max(vals)} |")


if __name__ == "__main__":
    main()
