"""The engine's performance options against the bare eager passes, in interleaved rounds.

    python benchmarks/engine_speed.py            # resnet50, 224 px, SmoothGrad 16 / IG 32 at 1, 4, 8 images, 5 rounds
    python benchmarks/engine_speed.py --compile  # adds compile=True (the first compile takes minutes)
    python benchmarks/engine_speed.py --model resnet50 --size 112 --images 1 4 --rounds 3   # what fits a loaded machine

For each method (SmoothGrad with ``--samples`` copies, integrated gradients with ``--steps``
points) and each number of images B per call, one process times, in every round, in an order
that rotates from round to round (with ``--repeats K``, K sweeps over every mode per round, the
order rotating from sweep to sweep, and the round keeps each mode's fastest timing: the run least
disturbed by other work on the machine; all K timings are in the .json, ``repeats_s``):

- ``bare B``: the bare eager passes the method needs (forward + ``torch.autograd.grad`` w.r.t. the
  input, parameters frozen, default layout) in passes of B images: the reference of the 0.85x goal;
- ``bare 8``: the same passes 8 at a time (on this CPU bigger passes are not faster per image); the
  better of the two is "the best bare pass" of the chunk-probe goal (within 1.05x);
- ``contiguous``: salience's defaults (``memory_format="contiguous"``, ``chunks="memory"``: the
  largest chunk the memory budget allows, no layout change);
- ``throughput``: ``chunks="throughput"`` (the chunk size chosen by measured time per item);
- ``auto``: ``memory_format="auto"`` (channels-last where its probe finds it faster), memory chunks;
- ``auto+throughput``: both opt-in options;
- ``compile`` (with ``--compile``): ``auto+throughput`` plus ``compile=True``;
- with ``--modes``, any of those and: ``fold`` (``fold_batchnorm=True``: BatchNorm folded into the
  convolutions, default layout), ``fold+channels_last``, ``fold+compile`` (folded, then compiled),
  ``channels_last``, ``freeze`` (``compile="freeze"``: forward + input gradient in one graph compiled
  with inductor's freezing, default layout).

    python benchmarks/engine_speed.py --images 4 --modes contiguous fold fold+channels_last channels_last

Each salience mode is called once before the rounds: that call pays the probes (and the compile)
and is reported apart as ``first call``; the rounds measure the warm calls. Min / median / max per
mode, ratios of medians, and the load average before and after each round are written to
``benchmarks/engine_speed.json`` and a table to ``benchmarks/engine_speed.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

import salience

HERE = Path(__file__).resolve().parent
# salience's modes: the performance options each runs under
MODES = {
    "contiguous": dict(memory_format="contiguous", chunks="memory"),  # the defaults
    "throughput": dict(memory_format="contiguous", chunks="throughput"),
    "auto": dict(memory_format="auto", chunks="memory"),
    "auto+throughput": dict(memory_format="auto", chunks="throughput"),
    "compile": dict(memory_format="auto", chunks="throughput", compile=True),
    "channels_last": dict(memory_format="channels_last", chunks="memory"),
    "fold": dict(memory_format="contiguous", chunks="memory", fold_batchnorm=True),
    "fold+channels_last": dict(memory_format="channels_last", chunks="memory", fold_batchnorm=True),
    "fold+compile": dict(memory_format="contiguous", chunks="memory", fold_batchnorm=True, compile=True),
    # compile="freeze": the gradient passes run one frozen graph of forward + input gradient
    "freeze": dict(memory_format="contiguous", chunks="memory", compile="freeze"),
}


def bare(model: torch.nn.Module, items: torch.Tensor, target: torch.Tensor, per_pass: int) -> None:
    """Forward + input gradient of every item ``(N, C, H, W)``, ``per_pass`` at a time, default layout."""
    for s in range(0, items.shape[0], per_pass):
        xi = items[s:s + per_pass].detach().clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out.gather(1, target[s:s + per_pass].view(-1, 1)).sum(), xi)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _job(model, frozen, x, method: str, args) -> dict:
    """The rounds of one method at one batch size."""
    b = x.shape[0]
    with torch.no_grad():
        target = model(x).argmax(1)
    # IG (trapezoid): ``steps`` points per image, both ends included, each a gradient pass. Runs made
    # before this line read ``steps - 1`` timed 31 bare passes per image against salience's 32.
    n = args.samples if method == "smoothgrad" else args.steps
    items = x.repeat(n, 1, 1, 1)
    tgt = target.repeat(n)
    call = (lambda **kw: salience.smoothgrad(model, x, target, samples=args.samples, reduce=None, **kw)) \
        if method == "smoothgrad" else \
        (lambda **kw: salience.integrated_gradients(model, x, target, steps=args.steps, reduce=None, **kw))
    modes: dict[str, Callable[[], object]] = {f"bare {b}": lambda: bare(frozen, items, tgt, b)}
    if b != 8:
        modes["bare 8"] = lambda: bare(frozen, items, tgt, 8)
    def under(options: dict) -> Callable[[], object]:
        def run() -> object:
            with salience.performance(**options):
                return call()
        return run

    for name in args.modes:
        modes[name] = under(MODES[name])
    first = {k: _timed(f) for k, f in modes.items() if not k.startswith("bare")}
    times: dict[str, list[float]] = {k: [] for k in modes}
    loads = []
    names = list(modes)
    every: dict[str, list[list[float]]] = {k: [] for k in modes}  # per round, each of the K timings
    for r in range(args.rounds):
        load0 = os.getloadavg()[0]
        taken: dict[str, list[float]] = {k: [] for k in names}
        for i in range(args.repeats):  # K sweeps over every mode, the order rotating in and across rounds
            s = (r * args.repeats + i) % len(names)
            for k in names[s:] + names[:s]:
                taken[k].append(_timed(modes[k]))
        for k in names:
            every[k].append(taken[k])
            times[k].append(min(taken[k]))  # the fastest of the K: the run least disturbed by other work
        loads.append((load0, os.getloadavg()[0]))
        print(f"  {method} B={b} round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names)
              + f" (load {load0:.1f})", flush=True)
    from salience._core import perf as _perf

    tag = "smoothgrad" if method == "smoothgrad" else "ig"
    decisions = [{"layout": rec.layout, "size": rec.size} for k, rec in _perf._records.items()
                 if rec.model() is model and k[5] == "auto" and k[1].startswith(tag) and k[2] == tuple(x.shape[1:])]
    return {"method": method, "images": b, "items": n * b, "first_call_s": first, "times_s": times,
            "repeats_s": every, "load_1min_before_after": loads, "auto_decisions": decisions}


def _stats(v: list[float]) -> tuple[float, float, float]:
    return min(v), statistics.median(v), max(v)


def _table(jobs: list[dict], args) -> str:
    lines = [
        "| method | images | mode | min s | median s | max s | median / bare B | median / best bare | "
        "per round / that round's bare B | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        t = j["times_s"]
        b = j["images"]
        ref = statistics.median(t[f"bare {b}"])
        best = min(statistics.median(v) for k, v in t.items() if k.startswith("bare"))
        for k, v in t.items():
            lo, med, hi = _stats(v)
            first = j["first_call_s"].get(k)
            per_round = ", ".join(f"{a / r:.3f}" for a, r in zip(v, t[f"bare {b}"]))
            lines.append(f"| {j['method']} | {b} | {k} | {lo:.2f} | {med:.2f} | {hi:.2f} | {med / ref:.3f} | "
                         f"{med / best:.3f} | {per_round} | {'' if first is None else f'{first:.1f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["smoothgrad", "integrated_gradients"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="sweeps over every mode per round (the order rotating); a round keeps each mode's fastest")
    ap.add_argument("--compile", action="store_true", help="add the compile mode to the default modes")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                    help="salience's modes to time (default: contiguous throughput auto auto+throughput)")
    ap.add_argument("--out", default=str(HERE / "engine_speed"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be 1 or more")
    if args.modes is None:
        args.modes = ["contiguous", "throughput", "auto", "auto+throughput"] + (["compile"] if args.compile else [])

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    frozen = getattr(torchvision.models, args.model)(weights=None).eval()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    report = {"config": vars(args), "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "jobs": []}
    t0 = time.time()
    for method in args.methods:
        for b in args.images:
            x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
            report["jobs"].append(_job(model, frozen, x, method, args))
            # written after every job too, so that a run cut short keeps the jobs it finished
            Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.time() - t0
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    cfg = (f"`python benchmarks/engine_speed.py {' '.join(argv) if argv else ''}`".replace(" `", "`")
           if argv is not None else "")
    md = [f"# Engine speed: {args.model}, {args.size} px, SmoothGrad {args.samples} / IG {args.steps}, "
          f"{args.rounds} interleaved rounds"
          + (f" (each keeping every mode's fastest of {args.repeats} sweeps)" if args.repeats > 1 else "")
          + f", {args.threads} threads", "",
          f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs. 1-minute load "
          f"average {report['loadavg_start'][0]:.1f} at the start, {report['loadavg_end'][0]:.1f} at the end "
          "(2 = our threads alone; per round in the .json). " + cfg, "",
          _table(report["jobs"], args), "",
          "Decisions of the auto probe (layout True = channels-last, size = items per pass): "
          + "; ".join(f"{j['method']} B={j['images']}: {j['auto_decisions']}" for j in report["jobs"]), ""]
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
