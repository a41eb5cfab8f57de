"""Issue 19 on tiny models: the fixed cost a salience call adds to the bare passes, and its parts.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/overhead_s46.py --out benchmarks/overhead-s46

The demo ``shapes`` CNN (salience.demo.zoo) at ``--sizes`` px (8: almost no arithmetic, so a call is
nearly all fixed cost; 64: the size the issue 19 tables use). One thread, fp32. Per round (``--rounds``,
interleaved), ``--calls`` calls of each unit, seconds per call:

- ``bare 16``: 16 items in one bare eager pass (forward + ``torch.autograd.grad`` w.r.t. the input,
  parameters frozen; ``benchmarks/engine_speed.bare``), the pass salience's warm SmoothGrad 16 runs;
- ``smoothgrad``: ``salience.smoothgrad(model, x, target, samples=16, reduce=None)``, warm (cached probe);
- parts of a call, alone: ``structure`` (:func:`salience._core.perf.structure`), ``model_guard``
  (enter + leave), ``Run`` (``perf.Run(model, x, tag=...)`` + ``close_run``), ``check_input``,
  ``noise 16`` (16 draws of SmoothGrad's noise shape, ``torch.randn``), ``default_budget``.

Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from engine_speed import bare  # noqa: E402

import salience  # noqa: E402
from salience._core import engine, perf  # noqa: E402
from salience._core.autograd import check_input  # noqa: E402
from salience._core.guard import model_guard  # noqa: E402
from salience.demo.zoo import load_demo  # noqa: E402


def units(size: int) -> dict:
    torch.manual_seed(0)
    model = load_demo("shapes").eval()
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    items, tgt = x.repeat(16, 1, 1, 1), target.repeat(16)
    gen = torch.Generator().manual_seed(0)

    def guard():
        with model_guard(model):
            pass

    def run():
        r = perf.Run(model, x, tag="smoothgrad:vanilla")
        perf.close_run(r)

    def noise():
        for _ in range(16):
            torch.randn(x.shape, generator=gen)

    return {
        "bare 16": lambda: bare(frozen, items, tgt, 16),
        "smoothgrad": lambda: salience.smoothgrad(model, x, target, samples=16, reduce=None),
        "structure": lambda: perf.structure(model),
        "model_guard": guard,
        "Run": run,
        "check_input": lambda: check_input(x, model),
        "noise 16": noise,
        "default_budget": lambda: engine.default_budget(torch.device("cpu")),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "overhead-s46"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/overhead_s46.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "torch": torch.__version__, "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "sizes": {}}
    for size in args.sizes:
        u = units(size)
        for f in u.values():  # warm: the probe cached, the first calls' allocations made
            f(), f()
        times = {k: [] for k in u}
        names = list(u)
        for r in range(args.rounds):
            s0 = r % len(names)
            for k in names[s0:] + names[:s0]:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    u[k]()
                times[k].append((time.perf_counter() - t0) / args.calls)
        report["sizes"][size] = times
    report["loadavg_end"] = os.getloadavg()
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    lines = ["# Fixed cost of a salience call on the demo CNN (issue 19)", "",
             f"{report['cpu']}, 1 thread on cores {report['affinity']}, fp32, torch {torch.__version__}; load "
             f"{tuple(round(v, 2) for v in report['loadavg_start'])} -> {tuple(round(v, 2) for v in report['loadavg_end'])}; "
             f"{args.rounds} rounds of {args.calls} calls each. `{command}`", "",
             "| px | unit | min ms/call | median ms/call | max ms/call |", "|---|---|---|---|---|"]
    for size, times in report["sizes"].items():
        for k, v in times.items():
            lines.append(f"| {size} | {k} | {min(v) * 1e3:.3f} | {statistics.median(v) * 1e3:.3f} | {max(v) * 1e3:.3f} |")
        d = [a - b for a, b in zip(times["smoothgrad"], times["bare 16"])]
        lines.append(f"| {size} | smoothgrad - bare 16, per round | {min(d) * 1e3:.3f} | {statistics.median(d) * 1e3:.3f} "
                     f"| {max(d) * 1e3:.3f} |")
    md = "\n".join(lines) + "\n"
    Path(args.out + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
