"""Gradient-free forward passes eager, compiled (inductor) and compiled with inductor's freezing.

    taskset -c 1 python benchmarks/inference_compile.py --threads 1 --rounds 5 --out benchmarks/inference-compile-1thread

The question: would Score-CAM, RISE and occlusion (every pass a forward of a masked image under
``torch.inference_mode``) gain from ``torch.compile(..., options={"freezing": True})``, which
inlines the parameters as constants (folding BatchNorm, prepacking the convolutions' weights) for
inference graphs? torchvision resnet50 (random weights) at 224 x 224 by default, passes of 1 and 8
images. ``frozen`` is what salience's ``compile="freeze"`` runs: inductor's ``freezing`` set while
dynamo traces too (``salience._core.compiled._freezing_on``), so the parameters are constants of the
graph; ``compiled+freezing`` sets it through ``options=`` only, for inductor's compile, and its
graph keeps the parameters as inputs (docs/performance.md, "compile=freeze"). Every variant is compiled first (the compile time is reported apart); then each round
runs every (pass size, variant) once in turn, as many passes as make 8 images, after one warm-up
pass. The table gives min / median / max seconds per image over the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from salience._core.compiled import _freezing_backend, _freezing_on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, fmt_spread, machine_info, machine_line, make_images, make_model, spread  # noqa: E402

VARIANTS = ("eager", "compiled", "compiled+freezing", "frozen")
FROZEN = ("frozen",)  # called under _freezing_on()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8], help="images per pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "inference-compile"))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="which to run (eager always: the reference)")
    args = ap.parse_args()
    if "eager" not in args.variants:
        args.variants = ["eager", *args.variants]
    # variants x pass sizes graphs of one compiled code object: past dynamo's default limit (8) it runs eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    model = make_model(args.model, args.threads)
    load_start = os.getloadavg()
    info = machine_info()
    fns, compile_s, times = {}, {}, {}
    for n in args.sizes:
        x = make_images(n, args.size)
        made = {"eager": lambda: model,
                "compiled": lambda: torch.compile(model, backend="inductor", dynamic=False),
                "compiled+freezing": lambda: torch.compile(model, backend="inductor", dynamic=False,
                                                           options={"freezing": True}),
                "frozen": lambda: torch.compile(model, backend=_freezing_backend(), dynamic=False)}
        variants = {name: made[name]() for name in VARIANTS if name in args.variants}
        for name, f in variants.items():
            with torch.inference_mode(), (_freezing_on() if name in FROZEN else contextlib.nullcontext()):
                t0 = time.perf_counter()
                f(x)
                compile_s[f"{name} {n}"] = time.perf_counter() - t0
        fns[n] = (x, variants)
    for r in range(args.rounds):
        for n, (x, variants) in fns.items():
            for name, f in variants.items():
                with torch.inference_mode(), (_freezing_on() if name in FROZEN else contextlib.nullcontext()):
                    f(x)  # warm-up
                    reps = max(1, 8 // n)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f(x)
                    times.setdefault(f"{name} {n}", []).append((time.perf_counter() - t0) / (reps * n))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    load_end = os.getloadavg()
    lines = [f"# {__doc__.splitlines()[0]}", "",
             f"`{' '.join(['python'] + sys.argv)}`", "",
             f"{args.model} at {args.size} x {args.size}, {args.threads} thread(s), {args.rounds} rounds; "
             "seconds per image, min / median / max; first call (compile) apart.", "",
             "| images per pass | variant | s per image | / eager (medians) | first call s |",
             "|---|---|---|---|---|"]
    for n in args.sizes:
        base = spread(times[f"eager {n}"])[1]
        for name in (v for v in VARIANTS if v in args.variants):
            key = f"{name} {n}"
            lines.append(f"| {n} | {name} | {fmt_spread(times[key], 4)} | {spread(times[key])[1] / base:.3f} "
                         f"| {compile_s[key]:.1f} |")
    lines += ["", machine_line(load_start, load_end), ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps({"config": vars(args), "machine": info, "times": times,
                                                    "first_call_s": compile_s}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
