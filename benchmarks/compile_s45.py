"""Issue 19's 0.85x in fp32 (session 45): salience's compiled passes against the bare eager passes.

    taskset -c 0 python benchmarks/compile_s45.py --method smoothgrad --images 1 --warm-only   # fill inductor's disk caches
    flock /tmp/bench.lock taskset -c 1 python benchmarks/compile_s45.py --method smoothgrad --images 1 --rounds 3

One process per method and number of images B (each hold of the lock short). resnet50 (random weights,
seeded), 224 px, 1 thread, fp32. Per round, in an order that rotates from round to round:

- ``bare N`` for N in (B, 8, 16): forward + ``torch.autograd.grad`` w.r.t. the input of every item
  (parameters frozen, default layout), N items per pass; the round's best of them is the reference;
- salience's modes (``MODES`` below): SmoothGrad 16 / IG 32 (``reduce=None``) under
  ``salience.performance(**options)``.

Each salience mode is called twice before the rounds: the first call pays the compile (its seconds
reported apart, ``first_call_s``), the second a frozen tail graph (``second_call_s``); the rounds time
warm calls. Each mode's chunks (``Sums.layouts``: how each chunk ran) are recorded from its last call.
``--warm-only``: the two calls only (run on another core first: inductor's on-disk caches then make the
timed process's compiles short). Output: ``OUT.json`` and ``OUT.md`` (default benchmarks/compile-s45-METHOD-B).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import bare  # noqa: E402  (the bare eager passes, default layout)

import salience  # noqa: E402
from salience._core import perf as _perf  # noqa: E402

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
_close = _perf.Run.close


def _recording_close(self) -> None:  # the chunks of the last run, as Sums.layouts records them
    _layouts[:] = list(self.layouts)
    _close(self)


_perf.Run.close = _recording_close


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["smoothgrad", "integrated_gradients"], required=True)
    ap.add_argument("--images", type=int, required=True)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    frozen = torchvision.models.resnet50(weights=None).eval()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.parameters():
        p.requires_grad_(False)
    b = args.images
    x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    n = 16 if args.method == "smoothgrad" else 32
    items, tgt = x.repeat(n, 1, 1, 1), target.repeat(n)
    if args.method == "smoothgrad":
        def call():
            return salience.smoothgrad(model, x, target, samples=16, reduce=None, seed=0)
    else:
        def call():
            return salience.integrated_gradients(model, x, target, steps=32, reduce=None)
    modes = {f"bare {k}": (lambda k=k: bare(frozen, items, tgt, k)) for k in dict.fromkeys((b, 8, 16))}

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
        print(f"{k}: first {first[k]:.1f} s, second {second[k]:.1f} s, diff {diff[k]:.2e}, chunks {layouts[k]}",
              flush=True)
    report = {"method": args.method, "images": b, "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
              "first_call_s": first, "second_call_s": second, "chunks": layouts, "rel_max_abs_diff": diff,
              "command": " ".join(["python benchmarks/compile_s45.py", *(sys.argv[1:] if argv is None else argv)])}
    if args.warm_only:
        return 0
    names = list(modes)
    times = {k: [] for k in names}
    loads = []
    for r in range(args.rounds):
        load0 = Path("/proc/loadavg").read_text().split()[:3]
        s = r % len(names)
        for k in names[s:] + names[:s]:
            t0 = time.perf_counter()
            modes[k]()
            times[k].append(time.perf_counter() - t0)
        loads.append((load0, Path("/proc/loadavg").read_text().split()[:3]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f}" for k in names) + f" (load {load0})", flush=True)
    best = [min(times[k][r] for k in names if k.startswith("bare")) for r in range(args.rounds)]
    report.update(times_s=times, best_bare_s=best, loadavg_before_after=loads)
    out = args.out or str(HERE / f"compile-s45-{'sg' if args.method == 'smoothgrad' else 'ig'}-{b}")
    Path(out + ".json").write_text(json.dumps(report, indent=2))
    lines = [f"# {args.method} {'16' if n == 16 else '32'} on resnet50, {b} image(s), {args.size} px, fp32, 1 thread "
             f"(core 1), {args.rounds} interleaved rounds", "",
             f"CPU: {report['cpu']} (no AMX), torch {torch.__version__}. `{report['command']}`. Load (1/5/15 min) per "
             "round before / after: " + "; ".join(f"{' '.join(a)} / {' '.join(c)}" for a, c in loads), "",
             "| mode | min s | median s | max s | per round / that round's best bare | first call s | second call s "
             "| max abs diff / max abs of the defaults' map | chunks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in names:
        v = times[k]
        ratio = ", ".join(f"{a / c:.3f}" for a, c in zip(v, best))
        lines.append(f"| {k} | {min(v):.3f} | {statistics.median(v):.3f} | {max(v):.3f} | {ratio} | "
                     f"{first.get(k, float('nan')):.1f} | {second.get(k, float('nan')):.1f} | "
                     f"{diff.get(k, float('nan')):.1e} | {', '.join(layouts.get(k, []))} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
