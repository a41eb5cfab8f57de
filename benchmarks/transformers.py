"""The attention methods' cost over the bare passes they need, on torchvision ``vit_b_16``, timed in alternating rounds.

    python benchmarks/transformers.py                      # vit_b_16 (random weights), 4 images 224x224, 2 threads, 7 rounds
    python benchmarks/transformers.py --batch 2 --rounds 5
    python benchmarks/transformers.py --profile            # also: where the time of one call of each goes (torch.profiler)
    python benchmarks/transformers.py --model vit_tiny --size 64 --batch 1   # where the per-call overhead shows on a CPU

Goal (issue "Real models", Speed): attention rollout costs one forward pass, transformer
attribution one forward and one backward, each within 1.10x of those bare passes. Two tables, one
process, the same model and images:

* ``attention_rollout`` vs the **bare forward**: ``model(x)`` under ``torch.no_grad()`` (what
  torchvision runs: the fused attention kernel).
* ``transformer_attribution`` vs the **bare forward + backward**: ``model(x)`` with the input
  requiring grad and parameters frozen, then ``torch.autograd.grad`` of the predicted class's score
  (before softmax) w.r.t. the input (``paired.bare``'s floor).

Each round runs the method and its bare pass back to back, the order alternating from round to
round (AB, BA, AB ...: the same position bias for both), after one warm-up of each. Reported: min /
median / max of each, the ratio of the medians and min / median / max of the per-round ratios; the
same for the process's CPU time (``time.process_time``, all threads), which a shared machine's
load inflates less than wall time (time spent waiting for a core is not counted).
Results go to ``transformers.json`` and ``transformers.md`` (``--out PREFIX`` for others).

``--device cuda``: the model and the images on the GPU; each timed call is synchronized before and
after (``torch.cuda.synchronize``), the peak memory of each call recorded
(``torch.cuda.max_memory_allocated``, reset before it; the highest over the rounds), and the GPU's
name and TF32 settings written with the results. There the CPU time is the host's (launching
kernels, waiting on them), not the work's.

    python benchmarks/transformers.py --device cuda --batch 8 --rounds 20 --out /tmp/transformers-cuda
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (HERE, bare, cuda_info, fmt_spread as _spread, frozen_copy, make_images, make_model,  # noqa: E402
                     pick_device, predicted, timed)

import salience  # noqa: E402


def tiny_vit(threads: int) -> torch.nn.Module:
    """``--model vit_tiny``: torchvision's ``VisionTransformer`` in ViT-Ti's layout (12 layers, width 192, 4 heads:
    an even count, so the bare forward takes the fast path) on 64 px images with 8 px patches (65 tokens), random
    weights: the same ~340 torch calls per forward as ``vit_b_16`` at a small fraction of its arithmetic, so the
    per-call cost of the attention capture shows on a CPU (pass ``--size 64``)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=8, num_layers=12, num_heads=4, hidden_dim=192,
                             mlp_dim=768).eval()


def bare_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def bare_forward_backward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """Forward with the input requiring grad, then the input gradient of the target's score."""
    bare(model, x, target, x.shape[0])


def rounds(fn: Callable[[], object], ref: Callable[[], object], n: int, repeats: int = 1,
           device: torch.device = torch.device("cpu"), warmup: int = 1) -> dict:
    """``n`` alternating rounds (AB, BA, ...) of ``fn`` (the method) and ``ref`` (its bare passes). With
    ``repeats`` K > 1 a round runs the pair K times, alternating within the round too (AB BA AB ...), and
    keeps each side's fastest time (``timeit``'s rule: the minimum is the run least disturbed by other
    work). ``warmup`` untimed calls of each first. On CUDA every call synchronized, and each side's peak
    memory (MiB, the highest over its calls: ``method_peak_mib``, ``bare_peak_mib``). A full garbage collection
    after the warm-up: what the imports and the model's construction moved to the old generation (300k objects with
    torchvision) set off one of 0.13 to 0.4 s in the first rounds otherwise, in whichever call came next (the max
    column, 9 to 11x: docs/performance.md, session 35)."""
    for _ in range(warmup):
        fn()
        ref()
    gc.collect()
    t_fn, t_ref, c_fn, c_ref = [], [], [], []
    peak = {"fn": 0.0, "ref": 0.0}
    for i in range(n):
        t, c = {"fn": float("inf"), "ref": float("inf")}, {}
        for j in range(repeats):
            for which in (("fn", "ref") if (i + j) % 2 == 0 else ("ref", "fn")):
                wall, cpu, mib, _ = timed(fn if which == "fn" else ref, device)
                if mib is not None:
                    peak[which] = max(peak[which], mib)
                if wall < t[which]:
                    t[which], c[which] = wall, cpu
        t_fn.append(t["fn"])
        t_ref.append(t["ref"])
        c_fn.append(c["fn"])
        c_ref.append(c["ref"])
    ratios = [a / b for a, b in zip(t_fn, t_ref)]
    cpu_ratios = [a / b for a, b in zip(c_fn, c_ref)]
    out = {"method_s": t_fn, "bare_s": t_ref, "ratios": ratios, "method_cpu_s": c_fn, "bare_cpu_s": c_ref,
           "cpu_ratios": cpu_ratios, "cpu_ratio_median": statistics.median(cpu_ratios),
           "ratio_of_medians": statistics.median(t_fn) / statistics.median(t_ref),
           "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios)}
    if device.type == "cuda":
        out["method_peak_mib"], out["bare_peak_mib"] = peak["fn"], peak["ref"]
    return out



def markdown(report: dict) -> str:
    c = report["config"]
    cuda = c.get("device", "cpu") == "cuda"
    ms = (lambda v: _spread([1e3 * u for u in v], 2)) if cuda else _spread
    lines = [f"# Attention methods vs bare passes: torchvision `{c['model']}` (random weights), {c['batch']} images "
             f"{c['size']}x{c['size']}, {c.get('device', 'cpu')}, {c['threads']} threads, {c['rounds']} alternating rounds"
             + (f", each the fastest of {c['repeats']} runs of each side" if c.get("repeats", 1) > 1 else ""), "",
             f"`{report['command']}`; torch {report['torch']}; load average {report['loadavg_start']} -> "
             f"{report['loadavg_end']}", ""]
    if cuda:
        lines += [f"{report['gpu']} (CUDA {report['cuda']}, cudnn {report['cudnn']}); TF32 matmul {report['tf32_matmul']}, "
                  f"TF32 cudnn {report['tf32_cudnn']}; {c['warmup']} warm-up calls of each side; every call "
                  "synchronized; peak = torch.cuda.max_memory_allocated of a call (reset before it; the model's "
                  f"weights and the images, {report['resident_mib']:.0f} MiB resident, counted), the highest over "
                  "the rounds.", ""]
    for name, r in report["cases"].items():
        lines += [f"## `{name}` vs {r['bare']}", "",
                  f"| | min / median / max ({'ms' if cuda else 's'}) |" + (" peak MiB |" if cuda else ""),
                  "|---|---|" + ("---|" if cuda else ""),
                  f"| `salience.{name}` | {ms(r['method_s'])} |" + (f" {r['method_peak_mib']:.0f} |" if cuda else ""),
                  f"| {r['bare']} | {ms(r['bare_s'])} |" + (f" {r['bare_peak_mib']:.0f} |" if cuda else ""),
                  f"| per-round ratio | {r['ratio_min']:.3f} / {r['ratio_median']:.3f} / {r['ratio_max']:.3f} |",
                  f"| ratio of the medians | {r['ratio_of_medians']:.3f} |",
                  f"| CPU time (process, all threads): method / bare / per-round ratio | "
                  f"{_spread(r['method_cpu_s'])} / {_spread(r['bare_cpu_s'])} / {_spread(r['cpu_ratios'])} |", "",
                  f"Goal 1.10x: **{verdict(r)}**.", ""]
    if report.get("profile"):
        lines += ["## Profile (one call each, torch.profiler, self CPU time)", "", "```", report["profile"], "```", ""]
    return "\n".join(lines)


def verdict(r: dict) -> str:
    if r["ratio_max"] <= 1.10:
        return "met (every round within 1.10x)"
    if r["ratio_median"] <= 1.10:
        return "met by the median, not by every round"
    if r["ratio_min"] <= 1.10:
        return "not met by the median (only some rounds within 1.10x)"
    return "not met (no round within 1.10x)"


def profile(calls: dict[str, Callable[[], object]], rows: int = 12) -> str:
    """The top operators by self CPU time of one call of each."""
    from torch.profiler import ProfilerActivity, profile as prof

    out = []
    for name, fn in calls.items():
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        out.append(f"--- {name}\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=48))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="attention_rollout,transformer_attribution")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side per round; the round keeps the fastest")
    ap.add_argument("--profile", action="store_true", help="also profile one call of each method and bare pass")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the model and the images are; cuda: synchronized timings and peak memory")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls of each side before the rounds (default: 3 on cuda, 1 on cpu)")
    ap.add_argument("--out", default=str(HERE / "transformers"), help="output prefix (.json and .md)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1

    model = tiny_vit(args.threads) if args.model == "vit_tiny" else make_model(args.model, args.threads)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes the head: every score would be 0
    model.to(device)
    x = make_images(args.batch, args.size).to(device)
    target = predicted(model, x)
    frozen = frozen_copy(model)
    cases = {
        "attention_rollout": (lambda: salience.attention_rollout(model, x), lambda: bare_forward(frozen, x),
                              "bare forward (no grad)"),
        "transformer_attribution": (lambda: salience.transformer_attribution(model, x, target),
                                    lambda: bare_forward_backward(frozen, x, target),
                                    "bare forward + backward (input gradient)"),
    }
    command = " ".join(["python benchmarks/transformers.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"config": vars(args), "command": command, "torch": torch.__version__, **cuda_info(device),
              "loadavg_start": os.getloadavg(), "cases": {}}
    for name in args.cases.split(","):
        fn, ref, what = cases[name]
        r = rounds(fn, ref, args.rounds, args.repeats, device, args.warmup)
        r["bare"] = what
        report["cases"][name] = r
        print(f"{name:24s} method {_spread(r['method_s'])} s, bare {_spread(r['bare_s'])} s; ratio min/median/max "
              f"{r['ratio_min']:.3f}/{r['ratio_median']:.3f}/{r['ratio_max']:.3f}: {verdict(r)}; CPU-time ratios "
              f"{_spread(r['cpu_ratios'])}", flush=True)
    if args.profile:
        calls = {}
        for name in args.cases.split(","):
            calls[name] = cases[name][0]
            calls[cases[name][2]] = cases[name][1]
        report["profile"] = profile(calls)
        print(report["profile"])
    report["loadavg_end"] = os.getloadavg()
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(markdown(report))
    print(f"load average {report['loadavg_start']} -> {report['loadavg_end']}; wrote {args.out}.json, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
