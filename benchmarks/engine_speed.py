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

Reduced precision (``precision=``: the forward passes under ``torch.autocast``, meant for CUDA):
``bf16``, ``fp16`` (default layout) and ``bf16+channels_last``; ``bf16-mixed`` and ``bf16-mixed+channels_last``
(``precision="bf16-mixed"``: no bare reference of their own). With bf16 or fp16 the table gains a
bare reference per precision, ``bare B bf16`` / ``bare B fp16``: the bare passes of B images with
the forward under the same ``torch.autocast`` (the score and the gradient outside it, as salience
runs them), so that salience's bf16 reads against both the fp32 and the bf16 bare passes.

``--device cuda``: the model and the images on the GPU; every timed call is synchronized before
and after, its peak memory recorded (``torch.cuda.max_memory_allocated``, reset before the call;
the highest over the rounds, MiB, a column of the table), the GPU's name, CUDA / cudnn versions and
TF32 settings written with the results; the times in ms; ``--warmup`` (default 2 there, 0 on a CPU)
calls of every mode before the rounds; and ``--check`` is on: each salience mode's maps (its first
call) against the ``contiguous`` mode's (fp32): the largest absolute difference over the fp32
map's largest absolute value, the relative L2, and the correlation (all values; the lowest per image), the
tolerance of a reduced precision. ``benchmarks/gpu.sh`` runs the GPU configuration.

    python benchmarks/engine_speed.py --device cuda --images 1 4 8 32 --modes contiguous channels_last bf16 fp16 bf16+channels_last

Each salience mode is called once before the rounds: that call pays the probes (and the compile)
and is reported apart as ``first call``; the rounds measure the warm calls. Min / median / max per
mode, ratios of medians, and the load average before and after each round are written to
``benchmarks/engine_speed.json`` and a table to ``benchmarks/engine_speed.md``, with, per mode, its time per
round over that round's best bare pass and the medians of CPU seconds and minor page faults per timed call.

``--bare 1 4 8 16 32`` sets the sizes of the bare peers (default 8; B always; a size larger than the call's items is
left out); the best bare pass is the fastest of them. ``--bare-items K`` (session 46) times each bare peer on the
call's first K items only (rounded up to whole passes of its size: a peer of 32 on K = 8 runs 32 items) and multiplies
its times (wall and CPU) by items / the items it ran (``bare_scale`` in the .json): a bare pass costs the same per item
whichever items it runs, and the peers of a 512-item call would otherwise take six calls' time a round.

    python benchmarks/engine_speed.py --threads 1 --images 4 --methods smoothgrad --modes contiguous --bare 1 4 8 16 32 --bare-items 32

``--allocator reuse`` runs the whole process (bare passes too) with ``salience.set_performance(allocator="reuse")``
and glibc's mmap and trim thresholds fixed before the first pass (docs/performance.md, session 38); compare it with a
run without it (alternating runs: the setting cannot be undone within a process).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, compare_maps, cuda_info, pick_device, timed  # noqa: E402

import salience  # noqa: E402
from salience._core.perf import _DTYPES  # noqa: E402  (the dtype of each precision, as salience's autocast takes it)

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
    # precision: the forward passes under torch.autocast (meant for CUDA), each with a bare reference
    # "bare B <precision>" (the same passes under the same autocast)
    "bf16": dict(memory_format="contiguous", chunks="memory", precision="bf16"),
    "fp16": dict(memory_format="contiguous", chunks="memory", precision="fp16"),
    "bf16+channels_last": dict(memory_format="channels_last", chunks="memory", precision="bf16"),
    # bf16-mixed: bf16 autocast, the operations on maps of >= 1/4 of the input's sides in fp32
    # (salience._core.islands); no bare reference of its own (plain autocast is not its passes)
    "bf16-mixed": dict(memory_format="contiguous", chunks="memory", precision="bf16-mixed"),
    "bf16-mixed+channels_last": dict(memory_format="channels_last", chunks="memory", precision="bf16-mixed"),
}


def bare(model: torch.nn.Module, items: torch.Tensor, target: torch.Tensor, per_pass: int,
         dtype: Optional[torch.dtype] = None) -> None:
    """Forward + input gradient of every item ``(N, C, H, W)``, ``per_pass`` at a time, default layout.

    ``dtype`` (``torch.bfloat16``, ``torch.float16``): the forward under ``torch.autocast`` of the
    items' device with that dtype, the score and the gradient outside it: what salience's
    ``precision=`` runs (``Run.autocast`` around the forward only; the backward follows the
    forward's dtypes)."""
    cast = (lambda: torch.autocast(items.device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    for s in range(0, items.shape[0], per_pass):
        xi = items[s:s + per_pass].detach().clone().requires_grad_(True)
        with cast():
            out = model(xi)
        torch.autograd.grad(out.gather(1, target[s:s + per_pass].view(-1, 1)).sum(), xi)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, Optional[float], object]:
    """``(wall s, peak MiB or None on a CPU, what fn returned)``; on CUDA synchronized (``_common.timed``)."""
    wall, _, peak, value = timed(fn, device)
    return wall, peak, value


def _job(model, frozen, x, method: str, args) -> dict:
    """The rounds of one method at one batch size (``x``: ``(B, C, H, W)`` on the benchmark's device)."""
    b = x.shape[0]
    device = x.device
    scale: dict[str, float] = {}  # per bare peer, its times are multiplied by it (--bare-items)
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
    # the bare peers: B and 8 items a pass (or --bare's sizes, B always among them; none larger than the items);
    # with --bare-items K each runs over the first K items only (whole passes), its times scaled (timed_items)
    sizes = sorted({b, *(args.bare or [8])})
    sizes = [s for s in sizes if s <= items.shape[0] or s == b]
    part = items.shape[0] if not args.bare_items else min(args.bare_items, items.shape[0])

    def timed_items(s: int) -> int:
        """The items a peer of ``s`` a pass runs: K rounded up to whole passes of ``s`` (at most all the items), so
        that it times passes of the size its name says (review of session 46: a "bare 32" on K = 8 items ran one
        pass of 8)."""
        return min(items.shape[0], -(-part // s) * s)

    modes: dict[str, Callable[[], object]] = {}
    for s in sizes:
        n_s = timed_items(s)
        scale[f"bare {s}"] = items.shape[0] / n_s
        modes[f"bare {s}"] = (lambda s, n_s: lambda: bare(frozen, items[:n_s], tgt[:n_s], s))(s, n_s)
    # the bare passes of each reduced precision among the modes, B at a time, under the same autocast, on the same
    # items as "bare B" and scaled the same (review of session 46: it ran all the items and was scaled as well)
    for prec in sorted({MODES[m].get("precision", "fp32") for m in args.modes} - {"fp32", "bf16-mixed"}):
        n_b = timed_items(b)
        scale[f"bare {b} {prec}"] = items.shape[0] / n_b
        modes[f"bare {b} {prec}"] = (lambda dt, n_b: lambda: bare(frozen, items[:n_b], tgt[:n_b], b, dt))(
            _DTYPES[prec], n_b)
    def under(options: dict) -> Callable[[], object]:
        def run() -> object:
            with salience.performance(**options):
                return call()
        return run

    for name in args.modes:
        modes[name] = under(MODES[name])
    first: dict[str, float] = {}
    first_peak: dict[str, Optional[float]] = {}
    maps: dict[str, object] = {}  # each salience mode's map of its first call, for --check
    for k, f in modes.items():
        if not k.startswith("bare"):
            first[k], first_peak[k], value = _timed(f, device)
            if args.check:
                maps[k] = value
    print(f"  {method} B={b} first calls: " + ", ".join(f"{k} {v:.2f}s" for k, v in first.items()), flush=True)
    check = {}
    if args.check and maps:
        ref = maps.get("contiguous")
        if ref is None:
            ref = under(MODES["contiguous"])()
        check = {k: compare_maps(ref, v) for k, v in maps.items() if k != "contiguous"}
    maps.clear()
    for _ in range(args.warmup):  # warm-up calls of every mode (CUDA: kernels chosen, allocator's pools filled)
        for f in modes.values():
            _timed(f, device)
    times: dict[str, list[float]] = {k: [] for k in modes}
    peaks: dict[str, list[Optional[float]]] = {k: [] for k in modes}  # per round, the highest of its K calls
    loads = []
    names = list(modes)
    every: dict[str, list[list[float]]] = {k: [] for k in modes}  # per round, each of the K timings
    usage: dict[str, list[tuple[float, int]]] = {k: [] for k in modes}  # each timed call: CPU s, minor faults
    for r in range(args.rounds):
        load0 = os.getloadavg()[0]
        taken: dict[str, list[float]] = {k: [] for k in names}
        peak_r: dict[str, list[float]] = {k: [] for k in names}
        for i in range(args.repeats):  # K sweeps over every mode, the order rotating in and across rounds
            s = (r * args.repeats + i) % len(names)
            for k in names[s:] + names[:s]:
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                wall, peak, _ = _timed(modes[k], device)
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                f = scale.get(k, 1.0)  # a bare peer on part of the items: its time for all the items
                wall *= f
                usage[k].append((f * (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime),
                                 round(f * (ru1.ru_minflt - ru0.ru_minflt))))
                taken[k].append(wall)
                if peak is not None:
                    peak_r[k].append(peak)
        for k in names:
            every[k].append(taken[k])
            times[k].append(min(taken[k]))  # the fastest of the K: the run least disturbed by other work
            peaks[k].append(max(peak_r[k]) if peak_r[k] else None)
        loads.append((load0, os.getloadavg()[0]))
        print(f"  {method} B={b} round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.4f}s" for k in names)
              + f" (load {load0:.1f})", flush=True)
    from salience._core import perf as _perf

    tag = "smoothgrad" if method == "smoothgrad" else "ig"
    decisions = [{"layout": rec.layout, "size": rec.size} for k, rec in _perf._records.items()
                 if rec.model() is model and k[5] == "auto" and k[1].startswith(tag) and k[2] == tuple(x.shape[1:])]
    peak_mib = {k: max(v) for k, v in peaks.items() if v and v[0] is not None}
    return {"method": method, "images": b, "items": n * b, "bare_items": part, "bare_scale": scale, "first_call_s": first, "times_s": times,
            "repeats_s": every, "cpu_s_minflt": usage, "load_1min_before_after": loads, "auto_decisions": decisions,
            "peak_mib": peak_mib, "first_call_peak_mib": first_peak if peak_mib else {}, "check": check}


def _stats(v: list[float]) -> tuple[float, float, float]:
    return min(v), statistics.median(v), max(v)


def _table(jobs: list[dict], args) -> str:
    """One row per method, images and mode. On CUDA the times in ms, a column of the peak memory and,
    for a reduced precision, one of its ratio to that precision's bare passes ("bare B bf16")."""
    cuda = args.device == "cuda"
    unit, scale, digits = ("ms", 1e3, 1) if cuda else ("s", 1.0, 2)
    lines = [
        f"| method | images | mode | min {unit} | median {unit} | max {unit} | median / bare B | median / best bare | "
        "per round / that round's bare B | first call s |" + (" median / bare B same precision | peak MiB |"
                                                             if cuda else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""),
    ]
    for j in jobs:
        t = j["times_s"]
        b = j["images"]
        ref = statistics.median(t[f"bare {b}"])
        best = min(statistics.median(v) for k, v in t.items() if k.startswith("bare") and len(k.split()) == 2)
        for k, v in t.items():
            lo, med, hi = (scale * u for u in _stats(v))
            first = j["first_call_s"].get(k)
            per_round = ", ".join(f"{a / r:.3f}" for a, r in zip(v, t[f"bare {b}"]))
            row = (f"| {j['method']} | {b} | {k} | {lo:.{digits}f} | {med:.{digits}f} | {hi:.{digits}f} | "
                   f"{med / scale / ref:.3f} | {med / scale / best:.3f} | {per_round} | "
                   f"{'' if first is None else f'{first:.1f}'} |")
            if cuda:
                prec = MODES[k].get("precision", "fp32") if k in MODES else "fp32"
                same = t.get(f"bare {b} {prec}") if prec != "fp32" else None
                peak = j.get("peak_mib", {}).get(k)
                row += (f" {'' if same is None else f'{med / scale / statistics.median(same):.3f}'} | "
                        f"{'' if peak is None else f'{peak:.0f}'} |")
            lines.append(row)
    return "\n".join(lines)


def _usage_lines(jobs: list[dict]) -> str:
    """Per job: each mode's time per round over that round's best bare pass (the issue's 1.05x), and the
    medians over the timed calls of CPU seconds and minor page faults (``getrusage``; the allocator's share)."""
    def ratios(v: list[float], best: list[float]) -> str:
        r = [a / b for a, b in zip(v, best)]
        return f"{', '.join(f'{x:.3f}' for x in r)} (min {min(r):.3f}, median {statistics.median(r):.3f}, max {max(r):.3f})"

    lines = []
    for j in jobs:
        t = j["times_s"]
        bares = [k for k in t if k.startswith("bare") and len(k.split()) == 2]
        best = [min(r) for r in zip(*(t[k] for k in bares))]
        use = j.get("cpu_s_minflt", {})
        k_rep = max(1, len(next(iter(use.values()), [])) // max(1, len(best)))  # timed calls per round
        cpu = {k: [min(c for c, _ in u[i * k_rep:(i + 1) * k_rep]) for i in range(len(best))] for k, u in use.items()}
        best_cpu = [min(r) for r in zip(*(cpu[k] for k in bares))] if cpu else []
        for k, v in t.items():
            u = use.get(k) or [(0.0, 0)]
            lines.append(f"- {j['method']} B={j['images']} {k}: per round / that round's best bare {ratios(v, best)}"
                         + (f"; CPU s per round / that round's best bare CPU {ratios(cpu[k], best_cpu)}" if k in cpu else "")
                         + f"; per call CPU {statistics.median(c for c, _ in u):.2f} s, "
                         f"{statistics.median(f for _, f in u):,.0f} minor faults (medians)")
    return "\n".join(lines)


def _check_table(jobs: list[dict]) -> str:
    """``--check``: each mode's maps against the defaults' (fp32, contiguous), first calls, same inputs."""
    lines = ["| method | images | mode | max abs diff / max abs of fp32 map | relative L2 | correlation | "
             "lowest per-image correlation |",
             "|---|---|---|---|---|---|---|"]
    for j in jobs:
        for k, c in j.get("check", {}).items():
            lines.append(f"| {j['method']} | {j['images']} | {k} | {c['rel_max_abs_diff']:.2e} | "
                         f"{c.get('rel_l2', float('nan')):.4f} | {c['corr']:.6f} | "
                         f"{c['corr_min_image']:.6f} |")
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
    ap.add_argument("--bare", type=int, nargs="+", default=None,
                    help="items per bare pass of the peers (default: 8; the call's B images always), e.g. 1 4 8 16 32")
    ap.add_argument("--bare-items", type=int, default=0,
                    help="time each bare peer on the call's first K items only (rounded up to whole passes of its "
                         "size), scaled by items / the items it ran (0: all the items)")
    ap.add_argument("--compile", action="store_true", help="add the compile mode to the default modes")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                    help="salience's modes to time (default: contiguous throughput auto auto+throughput)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the model, the images and every pass run; cuda: timings synchronized, peak memory")
    ap.add_argument("--warmup", type=int, default=None,
                    help="calls of every mode (bare passes too) after the first calls, before the rounds "
                         "(default: 2 on cuda, 0 on cpu)")
    ap.add_argument("--check", action="store_true",
                    help="compare each mode's maps with the defaults' (fp32, contiguous); always on with cuda")
    ap.add_argument("--allocator", choices=["default", "reuse"], default="default",
                    help="reuse: salience.set_performance(allocator='reuse'), glibc's thresholds set before "
                         "any pass, so the bare passes run under the same allocator as salience's")
    ap.add_argument("--out", default=str(HERE / "engine_speed"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be 1 or more")
    if args.bare is not None and min(args.bare) < 1 or args.bare_items < 0:
        ap.error("--bare sizes must be 1 or more, --bare-items 0 or more")
    if args.modes is None:
        args.modes = ["contiguous", "throughput", "auto", "auto+throughput"] + (["compile"] if args.compile else [])
    device = pick_device(args.device)
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 0
    args.check = args.check or device.type == "cuda"

    torch.set_num_threads(args.threads)
    if args.allocator != "default":
        salience.set_performance(allocator=args.allocator)
        from salience._core.malloc import keep_freed_memory
        keep_freed_memory()  # before the first pass, bare or not: one allocator state for every mode
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    frozen = getattr(torchvision.models, args.model)(weights=None).eval()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.to(device)
    frozen.to(device)
    report = {"config": vars(args), "torch": torch.__version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "device": args.device, **cuda_info(device),
              "loadavg_start": os.getloadavg(), "jobs": []}
    command = " ".join(["python benchmarks/engine_speed.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    for method in args.methods:
        for b in args.images:
            x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b)).to(device)
            report["jobs"].append(_job(model, frozen, x, method, args))
            # written after every job too, so that a run cut short keeps the jobs it finished
            _write(report, args, command, time.time() - t0)
    md = _write(report, args, command, time.time() - t0)
    print(md)
    return 0


def _write(report: dict, args, command: str, wall: float) -> str:
    """Write ``OUT.json`` and ``OUT.md`` with the jobs done so far; returns the markdown."""
    report["loadavg_end"] = os.getloadavg()
    report["wall_s"] = wall
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    where = (f"{report['gpu']} (CUDA {report['cuda']}, cudnn {report['cudnn']}; TF32 matmul "
             f"{report['tf32_matmul']}, TF32 cudnn {report['tf32_cudnn']}; {report['resident_mib']:.0f} MiB resident "
             "before the calls: the two models' weights; timings synchronized, peak = torch.cuda.max_memory_allocated "
             "of a call, the highest over the rounds), "
             if args.device == "cuda" else "")
    md = [f"# Engine speed: {args.model}, {args.size} px, SmoothGrad {args.samples} / IG {args.steps}, "
          f"{args.rounds} interleaved rounds"
          + (f" (each keeping every mode's fastest of {args.repeats} sweeps)" if args.repeats > 1 else "")
          + (f" after {args.warmup} warm-up calls of each" if args.warmup else "")
          + f", {args.device}, {args.threads} threads", "",
          f"{where}torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs. 1-minute load "
          f"average {report['loadavg_start'][0]:.1f} at the start, {report['loadavg_end'][0]:.1f} at the end "
          f"(per round in the .json). {wall:.0f} s in all. `{command}`", "",
          *([f"Bare peers timed on the first {', '.join(str(j['bare_items']) for j in report['jobs'])} items of "
             "each job (--bare-items), times scaled to the job's items.", ""]
            if any(j.get("bare_items", j["items"]) < j["items"] for j in report["jobs"]) else []),
          _table(report["jobs"], args), "",
          _usage_lines(report["jobs"]), "",
          "Decisions of the auto probe (layout True = channels-last, size = items per pass): "
          + "; ".join(f"{j['method']} B={j['images']}: {j['auto_decisions']}" for j in report["jobs"]), ""]
    if any(j.get("check") for j in report["jobs"]):
        md += ["## The maps against the defaults' (fp32, contiguous layout)", "",
               "Each mode's first call against the `contiguous` mode's, the same images and targets "
               "(SmoothGrad's noise seeded alike): the tolerance of a reduced precision."
               + (" On CUDA the fp32 reference's convolutions run in TF32 where `torch.backends.cudnn.allow_tf32` "
                  "(PyTorch's default; the settings above)." if args.device == "cuda" else ""), "",
               _check_table(report["jobs"]), ""]
    Path(args.out + ".md").write_text("\n".join(md))
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
