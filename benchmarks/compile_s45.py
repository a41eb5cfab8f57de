"""Issue 19's 0.85x in fp32 (session 45): salience's compiled passes against the bare eager passes.

    taskset -c 0 python benchmarks/compile_s45.py --images 1 --warm-only   # fill inductor's disk caches
    flock /tmp/bench.lock taskset -c 1 python benchmarks/compile_s45.py --images 1 --rounds 3

Per method and number of images B (one process per hold of the lock, which stays short). resnet50 (random weights,
seeded), 224 px, 1 thread, fp32. Per round, in an order that rotates from round to round:

- ``bare N`` for N in (B, 8, 16): forward + ``torch.autograd.grad`` w.r.t. the input of every item
  (parameters frozen, default layout), N items per pass; the round's best of them is the reference;
- salience's modes (``MODES`` below): SmoothGrad 16 / IG 32 (``reduce=None``) under
  ``salience.performance(**options)``.

Each salience mode is called twice before the rounds: the first call pays the compile (its seconds
reported apart, ``first_call_s``), the second a frozen tail graph (``second_call_s``); the rounds time
warm calls. Each mode's chunks (``Sums.layouts``: how each chunk ran) are recorded from its last call.
``--warm-only``: the two calls only (run on another core first: inductor's on-disk caches then make the
timed process's compiles short). Output per cell: ``OUT-sg-B`` / ``OUT-ig-B`` ``.json`` and ``.md`` (default
OUT benchmarks/compile-s45).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import bare  # noqa: E402  (the bare eager passes, default layout)
from _common import cpu_isa  # noqa: E402  (the CPU line: the vector units its flags show)

import salience  # noqa: E402
from salience._core import engine as _engine  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = {
    "contiguous": dict(),  # the defaults
    "fold+channels_last": dict(memory_format="channels_last", fold_batchnorm=True),
    "compile": dict(compile=True),
    "compile+channels_last": dict(compile=True, memory_format="channels_last"),
    "fold+compile+channels_last": dict(compile=True, memory_format="channels_last", fold_batchnorm=True),
    "freeze": dict(compile="freeze"),
    "freeze+channels_last": dict(compile="freeze", memory_format="channels_last"),
    "freeze+fold": dict(compile="freeze", fold_batchnorm=True),
}

_layouts: list = []
_accumulate = _engine.accumulate


def _recording(*a, **k):  # the chunks of the last call: their sizes and how each ran (Sums.chunks, Sums.layouts)
    sums = _accumulate(*a, **k)
    _layouts[:] = [f"{n} {how}" for n, how in zip(sums.chunks, sums.layouts)]
    return sums


_engine.accumulate = _recording


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", choices=["smoothgrad", "integrated_gradients"],
                    default=["smoothgrad", "integrated_gradients"])
    ap.add_argument("--images", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--bare", type=int, nargs="+", default=[8, 16],
                    help="items per bare pass besides B (the round's best of them all is the reference)")
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--out", default=str(HERE / "compile-s45"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, frozen = models()
    command = " ".join(["python benchmarks/compile_s45.py", *(sys.argv[1:] if argv is None else argv)])
    for method in args.methods:
        for b in args.images:
            cell(model, frozen, method, b, args, command)
    return 0


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """resnet50 (random weights, seeded, eval) and a copy with the same weights frozen (the bare passes')."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    frozen = torchvision.models.resnet50(weights=None).eval()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    return model, frozen


def workload(model, method: str, b: int, size: int):
    """One cell's work: ``(n, items, targets, call)``: ``b`` seeded images of ``size`` px and their predicted
    classes repeated ``n`` times (16 SmoothGrad samples / 32 IG steps: the bare passes' items), and the salience
    call (SmoothGrad 16 / IG 32, ``reduce=None``)."""
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    n = 16 if method == "smoothgrad" else 32
    if method == "smoothgrad":
        def call():
            return salience.smoothgrad(model, x, target, samples=16, reduce=None, seed=0)
    else:
        def call():
            return salience.integrated_gradients(model, x, target, steps=32, reduce=None)
    return n, x.repeat(n, 1, 1, 1), target.repeat(n), call


def cell(model, frozen, method: str, b: int, args, command: str) -> None:
    """One method at ``b`` images: first calls, then the interleaved rounds; OUT-METHOD-B.json / .md."""
    n, items, tgt, call = workload(model, method, b, args.size)
    modes = {f"bare {k}": (lambda k=k: bare(frozen, items, tgt, k)) for k in dict.fromkeys((b, *args.bare))}

    def under(options):
        def run():
            with salience.performance(**options):
                return call()
        return run

    for m in args.modes:
        modes[m] = under(MODES[m])
    ref = None
    first, second, layouts, diff = {}, {}, {}, {}
    for k, f in modes.items():
        if k.startswith("bare"):
            continue
        t0 = time.perf_counter()
        out = f()
        first[k] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = f()
        second[k] = time.perf_counter() - t0
        layouts[k] = list(_layouts)
        if ref is None:
            ref = out
        # the largest absolute difference from the first mode's maps, over that map's largest absolute value
        diff[k] = float((out - ref).abs().max() / ref.abs().max())
        print(f"{method} {b}: {k}: first {first[k]:.1f} s, second {second[k]:.1f} s, diff {diff[k]:.2e}, "
              f"chunks {layouts[k]}", flush=True)
    report = {"method": method, "images": b, "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
              "first_call_s": first, "second_call_s": second, "chunks": layouts, "rel_max_abs_diff": diff,
              "reference_mode": next(iter(first), None), "command": command}
    if args.warm_only:
        return
    names = list(modes)
    times, loads = interleaved(modes, args.rounds, f"{method} {b}")
    best = [min(times[k][r] for k in names if k.startswith("bare")) for r in range(args.rounds)]
    report.update(times_s=times, best_bare_s=best, loadavg_before_after=loads)
    out = f"{args.out}-{'sg' if method == 'smoothgrad' else 'ig'}-{b}"
    Path(out + ".json").write_text(json.dumps(report, indent=2))
    lines = [f"# {method} {n} on resnet50, {b} image(s), {args.size} px, fp32, 1 thread (core 1), {args.rounds} "
             "interleaved rounds", "",
             f"CPU: {report['cpu']} ({cpu_isa()}), torch {torch.__version__}. `{command}`. Load (1/5/15 min) "
             "per round before / after: " + "; ".join(f"{' '.join(a)} / {' '.join(c)}" for a, c in loads), "",
             "| mode | min s | median s | max s | per round / that round's best bare | first call s | second call s "
             f"| max abs diff / max abs of the {report['reference_mode']} map | chunks (last call) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in names:
        v = times[k]
        ratio = ", ".join(f"{a / c:.3f}" for a, c in zip(v, best))
        lines.append(f"| {k} | {min(v):.3f} | {statistics.median(v):.3f} | {max(v):.3f} | {ratio} | "
                     f"{first.get(k, float('nan')):.1f} | {second.get(k, float('nan')):.1f} | "
                     f"{diff.get(k, float('nan')):.1e} | {', '.join(layouts.get(k, []))} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def interleaved(modes: dict, rounds: int, label: str) -> tuple[dict, list]:
    """``rounds`` rounds of one call of each of ``modes`` (name -> call), each round starting one mode later:
    ``(seconds per mode per round, the load average before and after each round)``, a line printed per round."""
    names = list(modes)
    times: dict = {k: [] for k in names}
    loads = []
    for r in range(rounds):
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        s = r % len(names)
        for k in names[s:] + names[:s]:
            t0 = time.perf_counter()
            modes[k]()
            times[k].append(time.perf_counter() - t0)
        loads.append((load0, Path("/proc/loadavg").read_text().split()[:3]))
        print(f"{label} round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f}" for k in names)
              + f" (load {load0})", flush=True)
    return times, loads


if __name__ == "__main__":
    raise SystemExit(main())
