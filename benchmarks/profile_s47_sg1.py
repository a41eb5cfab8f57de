"""Session 47 (sg1): where a SmoothGrad-16 call of one image spends the time the bare pass of 16 items does not.

    PYTHONPATH=src taskset -c 1 python benchmarks/profile_s47_sg1.py --rounds 15 --profile 10

One process, one thread, resnet18 (random weights, seed 0) at 64 px, one image (the auto_declines_s47 case). Units,
timed interleaved in a rotating order (``time.thread_time`` and wall, minor page faults, per call):

- ``bare16``: ``engine_speed.bare`` (forward + ``torch.autograd.grad`` w.r.t. the input, parameters frozen), 16 items;
- ``bare16_noisy``: the same bare pass on SmoothGrad's 16 noisy copies (``xs``, ready) instead of 16 copies of the
  clean image (``max_pool2d_with_indices`` takes longer on the noisy copies: the data, not salience);
- ``vanilla16``: ``salience.vanilla(model, xs, targets, reduce=None)`` on 16 ready noisy copies (the inner method's
  pass as SmoothGrad runs it, with its own guard and checks, without SmoothGrad's);
- ``sg16``: ``salience.smoothgrad(model, x, target, samples=16, reduce=None)`` (the benchmark's call);
- ``sg16_noise0``: the same with ``noise=0`` (no draws, no copies made);
- ``copies``: ``NoisyCopies(x, 0.15, [0])(0, 16)`` alone (the chunk's noisy copies).

Then (``--profile N``) torch.profiler over N interleaved calls of ``bare16`` and ``sg16``: per aten op, calls and self
CPU per call of each, sorted by the difference. Prints which salience it imported.
"""
from __future__ import annotations

import argparse
import collections
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto_declines_s44 import build  # noqa: E402
from engine_speed import bare  # noqa: E402

import salience  # noqa: E402
from salience.methods.smoothgrad import NoisyCopies  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"salience from {salience.__file__}; load {open('/proc/loadavg').read().split()[:3]}")
    model, frozen = build("resnet18", 64), build("resnet18", 64)
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    items, tgt = x.repeat(16, 1, 1, 1), target.repeat(16)
    xs = NoisyCopies(x, 0.15, [0])(0, 16)[0].clone()
    units = {
        "bare16": lambda: bare(frozen, items, tgt, 16),
        "bare16_noisy": lambda: bare(frozen, xs, tgt, 16),
        "vanilla16": lambda: salience.vanilla(model, xs, tgt, reduce=None),
        "sg16": lambda: salience.smoothgrad(model, x, target, samples=16, reduce=None),
        "sg16_noise0": lambda: salience.smoothgrad(model, x, target, samples=16, noise=0.0, reduce=None),
        "copies": lambda: NoisyCopies(x, 0.15, [0])(0, 16),
    }
    for f in units.values():
        f(), f(), f()
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
    res: dict = {k: [] for k in units}
    keys = list(units)
    for r in range(args.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            n = 20 if k == "copies" else 1
            f0, c0, t0 = faults(), time.thread_time(), time.perf_counter()
            for _ in range(n):
                units[k]()
            res[k].append(((time.perf_counter() - t0) / n, (time.thread_time() - c0) / n, (faults() - f0) / n))
    print(f"{'unit':12s} {'thread min':>10s} {'thread med':>10s} {'wall min':>9s} {'wall med':>9s} {'faults med':>10s}"
          "  (ms a call)")
    for k, v in res.items():
        th, wa = [b for _, b, _ in v], [a for a, _, _ in v]
        print(f"{k:12s} {min(th) * 1e3:10.2f} {statistics.median(th) * 1e3:10.2f} {min(wa) * 1e3:9.2f} "
              f"{statistics.median(wa) * 1e3:9.2f} {statistics.median(c for _, _, c in v):10.0f}")
    if args.profile:
        _profile({k: units[k] for k in ("bare16", "sg16")}, args.profile)
    print(f"load {open('/proc/loadavg').read().split()[:3]}")
    return 0


def _profile(units: dict, n: int) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            for k in (list(units) if i % 2 else list(units)[::-1]):
                with record_function("UNIT_" + k):
                    units[k]()

    def top(e):
        while e.cpu_parent is not None:
            e = e.cpu_parent
        return e.name

    agg = {k: collections.defaultdict(lambda: [0, 0.0]) for k in units}
    tot = dict.fromkeys(units, 0.0)
    for e in prof.events():
        t = top(e)
        if not t.startswith("UNIT_"):
            continue
        k = t[5:]
        if e.name == t:
            tot[k] += e.cpu_time_total
            continue
        a = agg[k][e.name]
        a[0] += 1
        a[1] += e.self_cpu_time_total
    a, b = list(units)
    print(f"\ntorch.profiler, {n} calls each: per call under the profiler {a} {tot[a] / n / 1e3:.2f} ms, {b} "
          f"{tot[b] / n / 1e3:.2f} ms; sum of the ops' self CPU {a} {sum(v[1] for v in agg[a].values()) / n / 1e3:.2f}"
          f" ms, {b} {sum(v[1] for v in agg[b].values()) / n / 1e3:.2f} ms (the rest: Python between the ops)")
    rows = []
    for name in set(agg[a]) | set(agg[b]):
        va, vb = agg[a].get(name, [0, 0.0]), agg[b].get(name, [0, 0.0])
        rows.append((vb[1] - va[1], name, va[0] / n, vb[0] / n, va[1] / n, vb[1] / n))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"{'aten op':48s} {'calls ' + a:>12s} {'calls ' + b:>10s} {'us ' + a:>10s} {'us ' + b:>9s} {'diff us':>9s}")
    for d, name, ca, cb, ta, tb in rows:
        if abs(d) / n >= 10 or ca != cb:
            print(f"{name[:48]:48s} {ca:12.1f} {cb:10.1f} {ta:10.1f} {tb:9.1f} {tb - ta:9.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
