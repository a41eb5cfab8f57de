"""The gradient CAMs against Grad-CAM and against pytorch-grad-cam, timed in interleaved rounds.

    python benchmarks/cams.py                          # resnet50 (random weights), 8 images 224x224, 2 threads, 5 rounds
    python benchmarks/cams.py --rounds 7 --batch 4     # other workloads: --model, --size, --batch, --threads

Goal (issue 15, Fast): each gradient CAM (Grad-CAM++, HiResCAM, XGrad-CAM, LayerCAM) within 1.05x of
salience's Grad-CAM on the same layer; beside it, pytorch-grad-cam's class for the same method. One
process, one model, the same images and targets (the predicted classes, fixed first), the layer
``layer4`` given to every case (so no case pays for a default-layer search), except the row
``gradcam (default layer) / gradcam``: Grad-CAM without ``layer=`` (the default, ``layer4``; its search's
pass runs once, in the warm-up, then it is cached) against ``layer4`` named, expected near 1.

* **vs Grad-CAM**: each round times the method and ``salience.gradcam`` back to back, the order
  alternating from round to round (AB, BA, ...); the per-round ratio method / Grad-CAM is reported as
  min / median / max. A goal is met only when the maximum is within 1.05.
* **vs pytorch-grad-cam**: its ``__call__`` returns the map min-max scaled per image and resized with
  OpenCV; so salience's side is timed with the same work, ``salience.normalize(method(...))`` (its
  upsampling and min-max scaling). Each round times the two back to back, alternating.
* Eigen-CAM (no gradient) against pytorch-grad-cam's ``EigenCAM`` the same way (``center=True``, as it
  does), and against a bare ``model(x)`` under ``torch.no_grad()``.

Every round records the 1-minute load average (``os.getloadavg()``) before it; the table gives the
range. Wall time and the process's CPU time (``time.process_time``, which waiting for a core does not
count) are both recorded. Results: ``cams.json`` and ``cams.md`` (``--out PREFIX`` for others).
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
METHODS = {"gradcam_plus_plus": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM"}


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _pgc_call(cls_name: str, model: torch.nn.Module, x: torch.Tensor, targets) -> Callable[[], object]:
    """pytorch-grad-cam's class on ``layer4``, built and released in the call (its hooks must not stay on
    the model while the other cases run)."""
    import pytorch_grad_cam

    cls = getattr(pytorch_grad_cam, cls_name)

    def run():
        with cls(model=model, target_layers=[model.layer4]) as cam:
            return cam(input_tensor=x, targets=targets)

    return run


def _cases(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
           eigencam: bool = True) -> dict[str, tuple[Callable, Callable]]:
    """Pairs ``name -> (A, B)`` timed back to back each round; the table reports A / B."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(c)) for c in t]
    gradcam = lambda: salience.gradcam(model, x, t, layer="layer4")  # noqa: E731
    pairs: dict[str, tuple[Callable, Callable]] = {
        # Grad-CAM with no layer= against layer4 named: what the default layer costs once its search is cached
        # (each side warmed up first: the search's pass runs once, in the warm-up)
        "gradcam (default layer) / gradcam": (lambda: salience.gradcam(model, x, t), gradcam)}
    for name, cls_name in METHODS.items():
        fn = getattr(salience, name)
        pairs[f"{name} / gradcam"] = (lambda fn=fn: fn(model, x, t, layer="layer4"), gradcam)
        pairs[f"{name} / pytorch-grad-cam {cls_name}"] = (
            lambda fn=fn: salience.normalize(fn(model, x, t, layer="layer4")), _pgc_call(cls_name, model, x, targets))
    if not eigencam:
        return pairs
    pairs["eigencam / pytorch-grad-cam EigenCAM"] = (
        lambda: salience.normalize(salience.eigencam(model, x, layer="layer4", center=True).clamp(min=0)),
        _pgc_call("EigenCAM", model, x, None))

    def bare():
        with torch.no_grad():
            model(x)

    pairs["eigencam / bare forward (no grad)"] = (lambda: salience.eigencam(model, x, layer="layer4"), bare)
    return pairs


def run_rounds(pairs: dict[str, tuple[Callable, Callable]], n: int,
               after_round: Callable[[dict, list[float], int], None] = lambda res, loads, r: None,
               repeats: int = 1) -> tuple[dict, list[float]]:
    """``n`` rounds; in each, every pair's two sides back to back (AB in even rounds, BA in odd ones),
    the pairs in a rotated order. One warm-up of every distinct side first. With ``repeats`` K > 1 a
    pair's two sides run K times in a round, the order alternating within the round too (AB BA AB ...),
    and the round keeps each side's fastest time (``timeit``'s rule: the minimum is the run least
    disturbed by other work; the ratio of two minima taken seconds apart is what the round reports).
    ``after_round(results, loads, rounds_done)`` is called after each round (the script writes its
    files there, so a run cut short keeps the rounds it finished)."""
    seen: set[int] = set()
    for side in (f for ab in pairs.values() for f in ab):
        if id(side) not in seen:
            seen.add(id(side))
            side()
    names = list(pairs)
    raw = {k: {"a_s": [], "b_s": [], "a_cpu_s": [], "b_cpu_s": []} for k in names}
    loads = []
    for r in range(n):
        loads.append(os.getloadavg()[0])
        for k in names[r % len(names):] + names[:r % len(names)]:
            a, b = pairs[k]
            best = {"a": (float("inf"), 0.0), "b": (float("inf"), 0.0)}
            for i in range(repeats):
                order = ("a", "b") if (r + i) % 2 == 0 else ("b", "a")
                for side in order:
                    wall, cpu = _timed(a if side == "a" else b)
                    if wall < best[side][0]:
                        best[side] = (wall, cpu)
            for side in ("a", "b"):
                raw[k][f"{side}_s"].append(best[side][0])
                raw[k][f"{side}_cpu_s"].append(best[side][1])
        print(f"round {r + 1}/{n} done, load {loads[-1]:.1f}", flush=True)
        after_round(_ratios(raw), loads + [os.getloadavg()[0]], r + 1)
    loads.append(os.getloadavg()[0])
    return _ratios(raw), loads


def _ratios(raw: dict) -> dict:
    out = {}
    for k, v in raw.items():
        ratios = [a / b for a, b in zip(v["a_s"], v["b_s"])]
        cpu = [a / b for a, b in zip(v["a_cpu_s"], v["b_cpu_s"])]
        out[k] = {**v, "ratios": ratios, "cpu_ratios": cpu}
    return out


def _mmm(ts: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(ts), statistics.median(ts), max(ts)))


def markdown(res: dict, loads: list[float], meta: dict) -> str:
    lines = [
        "# Gradient CAMs vs Grad-CAM and pytorch-grad-cam",
        "",
        f"`{meta['command']}`: {meta['model']} (random weights), {meta['batch']} images {meta['size']}x{meta['size']}, "
        f"layer4, {meta['threads']} threads, {meta['rounds_done']} of {meta['rounds']} interleaved rounds; "
        f"{meta['machine']}; torch "
        f"{meta['torch']}, grad-cam {meta['grad_cam']}. 1-minute load average over the rounds: "
        f"{min(loads):.1f} to {max(loads):.1f} (2 = the benchmark's own 2 threads on 2 cores).",
        "",
        "Each row: A and B timed back to back every round, the order alternating"
        + (f"; {meta['repeats']} times each per round (AB BA ...), the round keeping each side's fastest"
           if meta.get("repeats", 1) > 1 else "")
        + ". Times min / median / max (s); ratio A / B per round, min / median / max, wall and CPU time.",
        "",
        "| A / B | A (s) | B (s) | A / B, wall | A / B, CPU time |",
        "|---|---|---|---|---|",
    ]
    for k, v in res.items():
        lines.append(f"| {k} | {_mmm(v['a_s'])} | {_mmm(v['b_s'])} | {_mmm(v['ratios'], '{:.3f}')} | "
                     f"{_mmm(v['cpu_ratios'], '{:.3f}')} |")
    lines += ["", "Goal: each gradient CAM within 1.05x of Grad-CAM (met only when the maximum ratio is):", ""]
    for name in METHODS:
        v = res[f"{name} / gradcam"]
        hi, med = max(v["ratios"]), statistics.median(v["ratios"])
        lo = min(v["ratios"])
        verdict = "met" if hi <= 1.05 else ("not met" if lo > 1.05 else f"open: rounds from {lo:.2f} to {hi:.2f}")
        if meta["rounds_done"] < 5:
            verdict = f"open: {meta['rounds_done']} round(s), too few to say"
        lines.append(f"- `{name}`: median {med:.3f}, max {hi:.3f}: **{verdict}**")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="times each side runs per round; the round keeps the fastest (default 1)")
    p.add_argument("--no-eigencam", action="store_true", help="leave out the two Eigen-CAM rows")
    p.add_argument("--out", default=str(HERE / "cams"), help="output prefix (.json and .md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        t = model(x).argmax(1)
    import importlib.metadata as md

    meta = {"command": "python benchmarks/cams.py " + " ".join(
                f"--{k} {getattr(args, k)}" for k in ("model", "size", "batch", "rounds", "threads", "repeats"))
            + (" --no-eigencam" if args.no_eigencam else ""),
            "model": args.model, "size": args.size, "batch": args.batch, "rounds": args.rounds,
            "threads": args.threads, "repeats": args.repeats, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs", "torch": torch.__version__, "grad_cam": md.version("grad-cam")}

    def write(res: dict, loads: list[float], done: int) -> None:
        m = {**meta, "loads": loads, "rounds_done": done}
        Path(args.out + ".json").write_text(json.dumps({"meta": m, "results": res}, indent=1))
        Path(args.out + ".md").write_text(markdown(res, loads, m))

    res, loads = run_rounds(_cases(model, x, t, eigencam=not args.no_eigencam), args.rounds, write,
                            repeats=args.repeats)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
