"""bf16 autocast on a CPU with and without native bf16 instructions: resnet50's forward + input gradient.

    python benchmarks/cpu_bf16.py --images 4 --rounds 5 --out benchmarks/cpu-bf16-s40                # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/cpu_bf16.py --images 4 --rounds 5 --out ...  # AVX512-BF16, no AMX
    ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx512 python benchmarks/cpu_bf16.py --images 4 --rounds 5 --out ...
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_bf16.py --images 1 --rounds 3 --out ...

torchvision resnet50 (random weights, parameters frozen, seed 0), B random images of 224 px, one thread by default:
forward + ``torch.autograd.grad`` of one class score w.r.t. the input, the forward in fp32 or under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (what salience's ``precision="bf16"`` runs), in the default layout
or channels-last (model and input: a second copy of the model in channels-last); one warm-up call of each, then
``--rounds`` rounds, each round one timed call of every variant in turn (fp32, bf16, fp32 channels-last, bf16
channels-last), so a disturbance of the machine lands on all four alike; min / median / max over the rounds.

``--out PATH`` appends a row group (one per environment) to ``PATH.json`` and rewrites ``PATH.md`` from it, so the
four commands above build one table.

The environment emulates an older CPU on a newer one: ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's kernels
(``AVX512_CORE_BF16``: Cooper Lake / Zen 4, AVX512-BF16 without AMX; ``AVX512_CORE``:
the AVX-512 of Skylake-SP / Cascade Lake, bf16 emulated with integer instructions, oneDNN's ``jit_bf16:avx512_core``;
``AVX2``: oneDNN then reports no bf16 support and PyTorch runs bf16 convolutions in its own kernels), and
``ATEN_CPU_CAPABILITY`` PyTorch's own vectorized kernels. The line printed first says what PyTorch sees
(its CPU capability, oneDNN's bf16 support, salience's ``native_bf16``). Results: docs/performance.md, "precision".
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, fmt_spread  # noqa: E402
from salience._core.cpu import native_bf16  # noqa: E402

VARIANTS = (("fp32", False, False), ("bf16", False, True), ("fp32 channels-last", True, False),
            ("bf16 channels-last", True, True))


def measure(images: int, rounds: int) -> dict:
    """``{variant: [seconds per round]}``: the four variants alternated within each round."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    models = {False: model, True: copy.deepcopy(model).to(memory_format=torch.channels_last)}
    x = torch.randn(images, 3, 224, 224)

    def call(cl: bool, bf16: bool) -> None:
        xi = (x.contiguous(memory_format=torch.channels_last) if cl else x).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = models[cl](xi)
        torch.autograd.grad(y[:, 0].sum(), xi)

    for _, cl, bf16 in VARIANTS:
        call(cl, bf16)
    times: dict = {name: [] for name, _, _ in VARIANTS}
    for _ in range(rounds):
        for name, cl, bf16 in VARIANTS:
            t0 = time.perf_counter()
            call(cl, bf16)
            times[name].append(time.perf_counter() - t0)
    return times


def markdown(groups: list) -> str:
    """The results file: one row group per environment."""
    lines = ["# bf16 autocast against fp32 on a CPU: resnet50 forward + input gradient (`benchmarks/cpu_bf16.py`)", "",
             "Random weights (seed 0), random 224 px images, one thread, pinned to one core (`taskset -c 1`) under "
             "`flock /tmp/bench.lock`; one warm-up call of each variant, then rounds of the four variants in turn. "
             "Seconds per call, min / median / max over the rounds; the ratio is the variant's min over fp32's min "
             "(median over fp32's median in brackets); with the machine disturbed, the per-round ratios under each table "
             "(the four variants of a round run back to back) say more than the mins.", ""]
    for g in groups:
        lines += [f"## `{g['command']}`", "", g["sees"], "",
                  "| variant | seconds (min / median / max) | min / fp32 min (median / fp32 median) |", "|---|---|---|"]
        t = g["times"]
        for name, ts in t.items():
            lines.append(f"| {name} | {fmt_spread(ts)} | {min(ts) / min(t['fp32']):.2f}x "
                         f"({statistics.median(ts) / statistics.median(t['fp32']):.2f}x) |")
        lines += ["", "Per round, each variant's time over fp32's in the same round: " + "; ".join(
            f"{name} " + ", ".join(f"{v / f:.2f}" for v, f in zip(ts, t["fp32"])) for name, ts in t.items()
            if name != "fp32") + ".", "", g["machine"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="append this run to OUT.json and rewrite OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    times = measure(args.images, args.rounds)
    env = {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    sees = (f"{env}: PyTorch's CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, salience native_bf16 {native_bf16()}; "
            f"resnet50, {args.images} image(s), {args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}")
    print(sees)
    for name, ts in times.items():
        print(f"  {name:18s} {fmt_spread(ts)} s (min / median / max); min / fp32's min {min(ts) / min(times['fp32']):.2f}")
    if args.out:
        command = " ".join([f"{k}={v}" for k, v in env.items() if v]
                           + ["python benchmarks/cpu_bf16.py"] + (argv if argv is not None else sys.argv[1:]))
        machine = (f"Machine: {cpu_name()}, {os.cpu_count()} CPUs. Load average (1, 5, 15 min) "
                   f"{tuple(round(v, 2) for v in load0)} at the start, "
                   f"{tuple(round(v, 2) for v in os.getloadavg())} at the end.")
        path = Path(args.out + ".json")
        groups = json.loads(path.read_text()) if path.exists() else []
        groups.append({"command": command, "env": env, "sees": sees, "images": args.images, "rounds": args.rounds,
                       "threads": args.threads, "machine": machine, "times": times})
        path.write_text(json.dumps(groups, indent=1))
        Path(args.out + ".md").write_text(markdown(groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
