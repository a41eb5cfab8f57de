"""What a backprop rule (guided backprop, deconvnet) costs over vanilla, operator by operator.

    python benchmarks/profile_rules.py                          # resnet50, 8 images 224x224, 2 threads
    python benchmarks/profile_rules.py --model resnet18 --size 112 --batch 4 --threads 1

Runs ``salience.vanilla``, ``salience.guided_backprop`` and ``salience.deconvnet`` (``reduce=None``)
``--calls`` times each under ``torch.profiler`` (interleaved: vanilla, guided, deconvnet, vanilla,
...) and prints, per method, the self CPU time of every operator, then the operators whose total
differs most from vanilla's. Self CPU time (the sum of operators' own times) is far less exposed to
a shared machine's load than wall time: what the rule adds shows up as operators vanilla does not
run (``clamp_`` for guided backprop, ``_RectifyBackward`` and ``clamp`` for deconvnet) or runs
more or fewer times. Writes ``--out`` (markdown).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, machine_line, make_workload  # noqa: E402

import salience  # noqa: E402

METHODS = ("vanilla", "guided_backprop", "deconvnet")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "profile-rules.md"))
    args = ap.parse_args(argv)

    model, x, target = make_workload(args.model, args.batch, args.size, args.threads)
    fns = {m: (lambda m=m: getattr(salience, m)(model, x, target, reduce=None)) for m in METHODS}
    for fn in fns.values():  # warm-up
        fn()
    load0 = os.getloadavg()
    self_us: dict[str, collections.Counter] = {m: collections.Counter() for m in METHODS}
    calls: dict[str, collections.Counter] = {m: collections.Counter() for m in METHODS}
    for _ in range(args.calls):
        for m, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for ev in prof.key_averages():
                self_us[m][ev.key] += ev.self_cpu_time_total
                calls[m][ev.key] += ev.count
    load1 = os.getloadavg()
    n = args.calls
    total = {m: sum(c.values()) / n / 1e6 for m, c in self_us.items()}
    lines = [
        "# What a backprop rule costs over vanilla, by operator",
        "",
        f"`python benchmarks/profile_rules.py {' '.join(sys.argv[1:] if argv is None else argv)}`: `{args.model}` "
        f"(random weights), {args.batch} images {args.size}x{args.size}, {args.threads} threads, {n} profiled calls "
        f"of each method, interleaved. {machine_line(load0, load1)}",
        "",
        "| method | self CPU time per call, all operators | over vanilla |",
        "|---|---:|---:|",
    ]
    for m in METHODS:
        lines.append(f"| `{m}` | {total[m]:.3f} s | {total[m] / total['vanilla']:.3f}x |")
    lines += ["", "Operators whose self CPU time per call differs most from vanilla's (ms; calls per call):", "",
              "| operator | vanilla | guided_backprop | deconvnet |", "|---|---:|---:|---:|"]
    keys = set().union(*self_us.values())
    diff = {k: max(abs(self_us[m][k] - self_us["vanilla"][k]) for m in METHODS) for k in keys}
    for k in sorted(keys, key=lambda k: -diff[k])[:14]:
        cells = [f"{self_us[m][k] / n / 1e3:.1f} ({calls[m][k] // n})" for m in METHODS]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
