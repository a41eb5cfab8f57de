"""Where the time of one SmoothGrad run goes (torch.profiler), by phase.

    python benchmarks/profile_smoothgrad.py                 # resnet50, 8 images 224x224, 16 samples, 2 threads
    python benchmarks/profile_smoothgrad.py --model resnet18 --size 112

The model is wrapped in a module whose forward runs under ``record_function("model forward")``,
so every operator can be put in one phase by its top-level profiler event:

- *forward*: everything inside the model's forward (convolutions, batch norm, ReLU, ...);
- *backward*: the autograd engine's work (``autograd::engine::evaluate_function: ...``);
- *salience, outside the model*: every other top-level operator: the noise (``randn``, ``mul``,
  ``add``), the running sums (``index_add_``, float64 copies), target gathering, the memory probe;
- *not in any operator*: wall time minus all top-level operator time (Python, the probe's and the
  guard's bookkeeping, the profiler itself).

It prints a table and writes ``--out`` (markdown). One unprofiled run first gives the wall time
without the profiler's overhead, and a warm-up.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, make_images, make_model, predicted  # noqa: E402

import salience  # noqa: E402


class Labeled(nn.Module):
    """The model, with its forward marked for the profiler."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function("model forward"):
            return self.model(x)


def _phase(ev) -> str:
    name = ev.name
    if name == "model forward":
        return "forward"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    return "outside"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "profile.md"))
    args = ap.parse_args(argv)

    model = Labeled(make_model(args.model, args.threads))
    x = make_images(args.batch, args.size)
    target = predicted(model, x)

    def run():
        return salience.smoothgrad(model, x, target, samples=args.samples, noise=0.15, reduce=None)

    t0 = time.perf_counter()
    run()
    plain_s = time.perf_counter() - t0

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        prof_s = time.perf_counter() - t0

    events = [e for e in prof.events() if e.cpu_parent is None and e.device_type.name == "CPU"]
    phase_us: dict[str, float] = collections.Counter()
    ops: dict[tuple[str, str], float] = collections.Counter()
    for ev in events:
        ph = _phase(ev)
        phase_us[ph] += ev.cpu_time_total
        if ph == "outside":
            ops[(ph, ev.name)] += ev.cpu_time_total
    # inside forward / backward: split by the operator one level down
    for ev in prof.events():
        parent = ev.cpu_parent
        if parent is None or parent.cpu_parent is not None:
            continue
        ph = _phase(parent)
        if ph == "forward":
            ops[(ph, ev.name)] += ev.cpu_time_total
    for ev in events:
        if _phase(ev) == "backward":
            ops[("backward", ev.name.split(": ", 1)[-1])] += ev.cpu_time_total

    wall_us = prof_s * 1e6
    in_ops = sum(phase_us.values())
    lines = [
        "# Profile of one SmoothGrad run",
        "",
        f"`python benchmarks/profile_smoothgrad.py --model {args.model} --batch {args.batch} --size {args.size} "
        f"--samples {args.samples} --threads {args.threads}`: `salience.smoothgrad(samples={args.samples}, "
        f"noise=0.15, reduce=None)` on {args.model} (random weights), {args.batch} images "
        f"{args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}.",
        "",
        f"Wall time {plain_s:.2f} s without the profiler, {prof_s:.2f} s under it.",
        "",
        "| phase | s | share of profiled wall time |",
        "|---|---:|---:|",
    ]
    for ph, label in (("forward", "model forward"), ("backward", "backward (autograd engine)"),
                      ("outside", "salience outside the model (noise, sums, targets, probe)")):
        lines.append(f"| {label} | {phase_us[ph] / 1e6:.2f} | {phase_us[ph] / wall_us:.1%} |")
    lines.append(f"| not in any operator (Python, bookkeeping, profiler) | {(wall_us - in_ops) / 1e6:.2f} | "
                 f"{(wall_us - in_ops) / wall_us:.1%} |")
    lines += ["", "Largest operators per phase (inclusive CPU time):", "",
              "| phase | operator | s | share |", "|---|---|---:|---:|"]
    for ph in ("forward", "backward", "outside"):
        top = sorted(((v, k[1]) for k, v in ops.items() if k[0] == ph), reverse=True)[:6]
        for v, name in top:
            lines.append(f"| {ph} | `{name}` | {v / 1e6:.2f} | {v / wall_us:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
