"""Issue 19: salience's defaults and ``memory_format="auto"`` against the bare eager passes, on models where auto declines.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s44.py --model vit_b_16 --size 112 --images 1 --rounds 3
    flock /tmp/bench.lock taskset -c 1 python benchmarks/auto_declines_s44.py --model shapes --size 64 --images 1 4 --rounds 5

One thread, fp32, SmoothGrad ``--samples`` (16) and integrated gradients ``--steps`` (32). In every
round, in an order that rotates from round to round, one process times:

- ``bare N``: the bare eager passes (forward + ``torch.autograd.grad`` w.r.t. the input, parameters
  frozen, default layout; ``benchmarks/engine_speed.bare``) N items at a time, for N in the images
  per call B, 8, 16, 32 (at most the items) and the chunk size salience's defaults ran (read once
  before the rounds from a forward pre-hook on a copy of the model); "best bare" is the fastest of
  them in that round;
- ``defaults``: salience with no option; ``auto``: ``memory_format="auto"``. Each is a unit of two
  calls: ``perf.clear_cache()`` then a *cold* call (the first for this model and shape: the engine's
  memory probe and, for ``auto``, its layout decision or probe), then a *warm* call (the decision
  cached). The warm call is the one compared with the bare passes; cold minus warm is the first
  call's extra cost, and auto's minus the defaults' is the layout probe's own cost.

auto's decision is read from salience's record after the cold call: ``layout None`` and no timings
= declined without a probe (fewer than 3 ``Conv2d``, or under ``perf.SMALL_ITEM_BYTES`` per item by
the memory probe, whose bytes per item are printed), ``False`` = probed and kept contiguous,
``True`` = channels-last. Writes ``OUT.json`` and ``OUT.md``.

Models: torchvision's by name (random weights; ``vit_*`` built with ``image_size=--size``), or a
salience demo model (``shapes``, ``shapes-vit``: 64 px).
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
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from engine_speed import bare  # noqa: E402

import salience  # noqa: E402
from salience._core import perf  # noqa: E402


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in ("shapes", "shapes-regression", "shapes-cue", "shapes-vit"):
        from salience.demo.zoo import load_demo
        return load_demo(name).eval()
    kw = {"image_size": size} if name.startswith("vit_") else {}
    return getattr(torchvision.models, name)(weights=None, **kw).eval()


def chunk_sizes(model: torch.nn.Module, call) -> list[int]:
    """The batch sizes of the model's forward passes in a warm call of ``call(model)`` (the second call on a copy,
    read by a forward pre-hook; the first call's memory probe runs one item per image first)."""
    twin = copy.deepcopy(model)
    seen: list[int] = []
    h = twin.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        call(twin)
        seen.clear()
        call(twin)
    finally:
        h.remove()
    return seen


def record_of(model, tag: str, shape) -> list[dict]:
    out = []
    for k, rec in perf._records.items():
        if rec.model() is model and k[5] == "auto" and k[1].startswith(tag) and k[2] == tuple(shape):
            out.append({"layout": rec.layout, "timed_chunks": {f"{s} items, {'cl' if cl else 'contig'}": v
                                                               for (s, cl), v in rec.samples.items()},
                        "bytes_per_item": dict(rec.probes)})
    return out


def job(model, frozen, x, method: str, args) -> dict:
    b = x.shape[0]
    with torch.no_grad():
        target = model(x).argmax(1)
    n = args.samples if method == "smoothgrad" else args.steps
    items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)
    tag = "smoothgrad" if method == "smoothgrad" else "ig"

    def call(m, **kw):
        if method == "smoothgrad":
            return salience.smoothgrad(m, x, target, samples=args.samples, reduce=None, **kw)
        return salience.integrated_gradients(m, x, target, steps=args.steps, reduce=None, **kw)

    chunks = chunk_sizes(model, call)  # the defaults' chunks in a warm call
    sizes = sorted({s for s in (b, 8, 16, 32, max(chunks)) if s <= n * b})
    units = {f"bare {s}": (lambda s=s: bare(frozen, items, tgt, s)) for s in sizes}
    opts = {"defaults": {}, "auto": {"memory_format": "auto"}}
    for k, f in units.items():  # one untimed call of each before the rounds
        f()
    times = {k: [] for k in list(units) + [f"{m} {w}" for m in opts for w in ("cold", "warm")]}
    decisions, loads = [], []
    names = list(units) + list(opts)
    for r in range(args.rounds):
        load0 = os.getloadavg()
        s0 = r % len(names)
        for k in names[s0:] + names[:s0]:
            if k in units:
                t0 = time.perf_counter()
                units[k]()
                times[k].append(time.perf_counter() - t0)
                continue
            perf.clear_cache()
            with salience.performance(**opts[k]):
                for w in ("cold", "warm"):
                    t0 = time.perf_counter()
                    call(model)
                    times[f"{k} {w}"].append(time.perf_counter() - t0)
                    if k == "auto" and w == "cold":
                        decisions.append(record_of(model, tag, x.shape[1:]))
        loads.append((load0, os.getloadavg()))
        print(f"  {method} B={b} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
              + f" (load {load0[0]:.2f})", flush=True)
    return {"method": method, "images": b, "items": n * b, "defaults_chunks": chunks, "bare_sizes": sizes,
            "times_s": times, "auto_decisions": decisions, "loadavg_before_after": loads}


def stats(v):
    return min(v), statistics.median(v), max(v)


def ratio_rows(t: dict, images: int) -> list[tuple]:
    """Per unit of ``t`` (unit -> seconds per round; the bare passes' units start with "bare"): ``(unit, (min, median,
    max), per round over that round's best bare, per round over that round's bare pass of the call's ``images``,
    "met" / "not met" (every round <= 1.00 of the best bare; "" for the bare passes and cold calls))``."""
    bares = [k for k in t if k.startswith("bare")]
    best = [min(r) for r in zip(*(t[k] for k in bares))]
    bb = t[f"bare {images}"]
    rows = []
    for k, v in t.items():
        rb = [a / c for a, c in zip(v, best)]
        rB = [a / c for a, c in zip(v, bb)]
        met = "" if k.startswith("bare") or k.endswith("cold") else ("met" if max(rb) <= 1.0 else "not met")
        rows.append((k, stats(v), rb, rB, met))
    return rows


def table(jobs) -> str:
    lines = ["| method | images | mode | min s | median s | max s | per round / that round's best bare | "
             "per round / that round's bare B | met (every round <= 1.00 of best bare) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        for k, (lo, med, hi), rb, rB, met in ratio_rows(j["times_s"], j["images"]):
            lines.append(f"| {j['method']} | {j['images']} | {k} | {lo:.3f} | {med:.3f} | {hi:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in rb)} | {', '.join(f'{x:.3f}' for x in rB)} | {met} |")
    return "\n".join(lines)


def probe_lines(jobs) -> str:
    out = []
    for j in jobs:
        t = j["times_s"]
        first = {m: [c - w for c, w in zip(t[f"{m} cold"], t[f"{m} warm"])] for m in ("defaults", "auto")}
        diff = [a - d for a, d in zip(first["auto"], first["defaults"])]
        dec = j["auto_decisions"][0] if j["auto_decisions"] else []
        layouts = sorted({str(d["layout"]) for r in j["auto_decisions"] for d in r})
        probed = any(d["timed_chunks"] for r in j["auto_decisions"] for d in r)
        out.append(f"- {j['method']} B={j['images']}: defaults' chunks {j['defaults_chunks']}; bare sizes "
                   f"{j['bare_sizes']}; auto's layout per round {layouts} "
                   f"({'probed' if probed else 'declined without a probe'}; first round's record {dec}); "
                   f"cold - warm per round: defaults {', '.join(f'{x:.3f}' for x in first['defaults'])} s, "
                   f"auto {', '.join(f'{x:.3f}' for x in first['auto'])} s; auto's extra over the defaults' "
                   f"{', '.join(f'{x:+.3f}' for x in diff)} s")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--images", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["smoothgrad", "integrated_gradients"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    return run_and_write(args, argv, "s44", job, table, probe_lines)


def run_and_write(args, argv, session: str, job, table, footer, unit_note: str = "") -> int:
    """Build the model, run ``job`` per method and image count, write ``<out>.json`` and ``<out>.md``.

    Shared by the session-44 and session-46 scripts (``session`` names the script and the default output); ``table``
    and ``footer`` render the jobs; ``unit_note`` says what a row's seconds are."""
    out = args.out or str(Path(__file__).resolve().parent / f"auto-declines-{session}-{args.model}-{args.size}")
    torch.set_num_threads(1)
    model = build(args.model, args.size)
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    command = f"python benchmarks/auto_declines_{session}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "affinity": sorted(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg(), "jobs": []}
    t0 = time.time()
    for method in args.methods:
        for b in args.images:
            x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
            report["jobs"].append(job(model, frozen, x, method, args))
    report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
    write_report(out, report, f"{args.model}, {args.size} px: defaults and auto against the bare passes, {args.rounds} "
                 f"rounds", f"1 thread on cores {report['affinity']}, fp32, torch {torch.__version__}", unit_note,
                 table(report["jobs"]), footer(report["jobs"]))
    return 0


def write_report(out: str, report: dict, title: str, setup: str, unit_note: str, table_md: str, footer_md: str) -> None:
    """``<out>.json`` (``report``) and ``<out>.md``: the title, the CPU and ``setup``, the loads at the start and the
    end, the run's seconds, ``unit_note`` and the command, then the table and its footer (printed too)."""
    Path(out + ".json").write_text(json.dumps(report, indent=2, default=str))
    md = "\n".join([
        f"# {title}", "",
        f"{report['cpu']}, {setup}. Load average "
        f"{tuple(round(v, 2) for v in report['loadavg_start'])} at the start, "
        f"{tuple(round(v, 2) for v in report['loadavg_end'])} at the end (per round in the .json). "
        f"{report['wall_s']:.0f} s. {unit_note}`{report['command']}`", "",
        table_md, "", footer_md, ""])
    Path(out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
