"""Where the bf16 error of an input gradient comes from, and fp32 "islands" inside a bf16 autocast pass.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/bf16_islands.py --rounds 5 --out benchmarks/bf16-islands-s41

``--engine`` adds salience's SmoothGrad 16 and integrated gradients 32 on one of the random images, timed on resnet50
and Lite0 (fp32 defaults, bf16 and bf16-mixed with channels-last; a warm-up round, then ``min(--rounds, 3)`` rounds
of every variant in turn), and salience's own maps of EfficientNet-Lite0 on the three photos (vanilla, SmoothGrad 16 with noise 0.15
and seed 0, integrated gradients 32, Grad-CAM; the example's settings) under ``precision="bf16"`` and ``"bf16-mixed"``
with ``memory_format="channels_last"`` against the fp32 defaults': relative L2, correlation, and ``|b| / |a|``.

Accuracy: the vanilla map (``max_c |d score / d x|``, as ``salience.vanilla``) of a variant against the fp32 map,
relative L2 ``|b - a| / |a|`` and correlation, on the pretrained EfficientNet-Lite0 of
examples/explain_real_photos.py (scikit-image's ``chelsea``, ``coffee``, ``rocket``; each photo's top class) and on
torchvision's resnet50 with random weights (seed 0, 4 random 224 px images, class 0). Time: forward + input gradient
of resnet50 (and Lite0) on 4 images at 224 px, one thread, channels-last model and input, one warm-up call of each
variant, then ``--rounds`` rounds of every variant in turn; min / median / max seconds.

The variants are real torch executions:

- ``bf16``: the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (salience's ``precision="bf16"``).
- ``island: NAMES``: the same, with the named modules run in fp32: their inputs cast to float32 and autocast
  off inside them (so their backward runs in fp32 too).
- ``bf16-mixed (1/r)``: salience's ``precision="bf16-mixed"`` rule (:mod:`salience._core.islands`): every operation
  on a 4-D map at ``1/r`` of the input's height and width or larger in fp32 (salience uses r = 4), the rest bf16.
- two diagnostics on Lite0, whose only nonlinearities are ReLU6 gates (``clamp(z, 0, 6)``; no squeeze-excite, no
  max-pool): ``bf16 pass, fp32 gates`` runs the bf16 pass with each ReLU6 replaced by the fixed gates an fp32 pass
  found (``z * [0 < z < 6] + 6 * [z >= 6]``); given the gates the network is affine in ``x``, so what differs from
  fp32 is the bf16 rounding of the arithmetic alone. ``fp32 pass, bf16 gates``: the fp32 pass with the gates a bf16
  pass found: the gates' flips alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import runpy
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from _common import cpu_name  # noqa: E402
from salience._core.islands import HighResolutionFp32  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "explain_real_photos.py"


@contextmanager
def fp32_islands(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run the named submodules in fp32 inside an autocast pass (instance ``forward`` put back afterwards)."""
    mods = [model.get_submodule(n) for n in names]
    for m in mods:
        def f(*a, _orig=m.forward):
            with torch.autocast("cpu", enabled=False):
                return _orig(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in a])
        m.forward = f
    try:
        yield
    finally:
        for m in mods:
            del m.forward


@contextmanager
def fixed_gates(model: nn.Module, gates: Optional[dict], record: Optional[dict]) -> Iterator[None]:
    """Record each ReLU6's gates into ``record``, or replace its output with ``gates``' fixed ones."""
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    with ExitStack() as stack:
        for i, act in enumerate(acts):
            def hook(mod, inp, out, i=i):
                z = inp[0]
                if record is not None:
                    record[i] = ((z > 0) & (z < 6), z >= 6)
                if gates is not None:
                    mid, top = gates[i]
                    return z * mid.to(z.dtype) + 6 * top.to(z.dtype)
            stack.callback(act.register_forward_hook(hook).remove)
        yield


def vanilla(model: nn.Module, x: torch.Tensor, target: torch.Tensor, bf16: bool, islands: Sequence[str] = (),
            gates: Optional[dict] = None, record: Optional[dict] = None, ratio: int = 0) -> torch.Tensor:
    """``max_c |d score_target / d x|`` of one pass (``(B, H, W)``), under bf16 autocast when asked (``ratio``: with
    ``precision="bf16-mixed"``'s mode at ``1 / ratio`` of the input's size)."""
    xi = x.clone().requires_grad_(True)
    with fp32_islands(model, islands), fixed_gates(model, gates, record), ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16))
        if ratio:
            stack.enter_context(HighResolutionFp32("cpu", x.shape[-2:], ratio))
        y = model(xi)
        g, = torch.autograd.grad(y.float().gather(1, target[:, None]).sum(), xi)
    return g.abs().amax(1)


def distance(a: torch.Tensor, b: torch.Tensor) -> list:
    """``[relative L2, correlation]`` of each image's map ``b`` against ``a``."""
    out = []
    for ai, bi in zip(a.double().flatten(1), b.double().flatten(1)):
        out.append([float((bi - ai).norm() / ai.norm()), float(torch.corrcoef(torch.stack([ai, bi]))[0, 1])])
    return out


# variant name -> fp32 modules (an int: bf16-mixed's rule at that ratio); the first entry of each is plain bf16
LITE_BLOCKS = [f"_blocks.{i}" for i in range(16)]
LITE_STEM = ["_conv_stem", "_bn0", "stem_act"]
LITE = {"bf16": [], "island: stem": LITE_STEM}
LITE.update({f"island: stem + blocks 0-{k - 1}": LITE_STEM + LITE_BLOCKS[:k] for k in (1, 2, 3, 4, 8, 12)})
LITE.update({"island: blocks 0-2 (not the stem)": LITE_BLOCKS[:3],
             "island: head (conv_head, bn1, act, fc)": ["_conv_head", "_bn1", "head_act", "_fc"],
             "island: head + last 4 blocks": ["_conv_head", "_bn1", "head_act", "_fc"] + LITE_BLOCKS[-4:]})
RULES = {f"bf16-mixed (1/{r})": r for r in (2, 4, 8)}
LITE.update(RULES)
R50_STEM = ["conv1", "bn1", "relu", "maxpool"]
R50 = {"bf16": [], "island: stem": R50_STEM, "island: stem + layer1": R50_STEM + ["layer1"],
       "island: stem + layer1 + layer2": R50_STEM + ["layer1", "layer2"], "island: layer4 + fc": ["layer4", "fc"], **RULES}


def _variant(model: nn.Module, x: torch.Tensor, target: torch.Tensor, names, record: Optional[dict] = None):
    if isinstance(names, int):
        return vanilla(model, x, target, True, ratio=names)
    return vanilla(model, x, target, True, names, record=record)


def accuracy(model: nn.Module, x: torch.Tensor, target: torch.Tensor, variants: dict, gates: bool) -> dict:
    """``{variant: per-image [rel L2, corr]}`` against the fp32 map."""
    g32: dict = {}
    g16: dict = {}
    a = vanilla(model, x, target, False, record=g32 if gates else None)
    out = {name: distance(a, _variant(model, x, target, names, g16 if name == "bf16" and gates else None))
           for name, names in variants.items()}
    if gates:
        flips = sum(int((g32[i][0] != g16[i][0]).sum() + (g32[i][1] != g16[i][1]).sum()) for i in g32)
        out["diagnostic: bf16 pass, fp32 gates"] = distance(a, vanilla(model, x, target, True, gates=g32))
        out["diagnostic: fp32 pass, bf16 gates"] = distance(a, vanilla(model, x, target, False, gates=g16))
        out["gates flipped (fraction of all ReLU6 units)"] = flips / sum(g[0].numel() for g in g32.values())
    return out


def timing(model: nn.Module, x: torch.Tensor, variants: dict, rounds: int) -> dict:
    """``{variant: [seconds per round]}`` of forward + input gradient, channels-last, variants alternated."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    target = torch.zeros(len(x), dtype=torch.long)
    calls = {"fp32": lambda: vanilla(model, x, target, False)}
    calls.update({name: (lambda n=names: _variant(model, x, target, n)) for name, names in variants.items()})
    for call in calls.values():
        call()
    times: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def engine(net: nn.Module, photos: torch.Tensor, top: torch.Tensor) -> dict:
    """``{method: {precision: per-image [rel L2, corr, |b| / |a|]}}``: salience's maps against the fp32 defaults'."""
    import warnings

    import salience

    options = {"smoothgrad": dict(samples=16, noise=0.15, seed=0), "integrated_gradients": dict(steps=32)}
    out: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IG's completeness check
        for method in ("vanilla", "smoothgrad", "integrated_gradients", "gradcam"):
            fn, kw = salience.METHODS[method], options.get(method, {})
            a = fn(net, photos, top, **kw)
            out[method] = {}
            for precision in ("bf16", "bf16-mixed"):
                with salience.performance(precision=precision, memory_format="channels_last"):
                    b = fn(net, photos, top, **kw)
                norms = (b.double().flatten(1).norm(dim=1) / a.double().flatten(1).norm(dim=1)).tolist()
                out[method][precision] = [d + [n] for d, n in zip(distance(a, b), norms)]
    return out


def engine_timing(models: dict, x: torch.Tensor, rounds: int) -> dict:
    """``{model: {method: {variant: [seconds per round]}}}``: salience's SmoothGrad 16 and integrated gradients 32 on
    ``x`` in fp32 (the defaults), and under bf16 / bf16-mixed with channels-last, the variants alternated per round."""
    import warnings

    import salience

    variants = {"fp32": {}, "bf16": dict(precision="bf16", memory_format="channels_last"),
                "bf16-mixed": dict(precision="bf16-mixed", memory_format="channels_last")}
    methods = {"smoothgrad 16": lambda m: salience.smoothgrad(m, x, 0, samples=16, seed=0),
               "integrated_gradients 32": lambda m: salience.integrated_gradients(m, x, 0, steps=32)}
    out: dict = {name: {meth: {v: [] for v in variants} for meth in methods} for name in models}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IG's completeness check
        for r in range(rounds + 1):  # round 0: the warm-up
            for name, model in models.items():
                for meth, call in methods.items():
                    for v, options in variants.items():
                        t0 = time.perf_counter()
                        with salience.performance(**options):
                            call(model)
                        if r:
                            out[name][meth][v].append(time.perf_counter() - t0)
    return out


def _pairs(rows: list) -> str:
    return ", ".join(" / ".join(f"{v:.3f}" for v in row) for row in rows)


def markdown(res: dict, command: str) -> str:
    """The results file: accuracy tables, then the timings."""
    lines = ["# Where bf16's input-gradient error comes from; fp32 islands (`benchmarks/bf16_islands.py`)", "",
             f"`{command}`", "", f"{res['cpu']}, torch {res['torch']}, one thread, {res['rounds']} rounds.", "",
             "## EfficientNet-Lite0 (pretrained), vanilla: rel L2 / correlation per photo (chelsea, coffee, rocket)", "",
             "| variant | rel L2 / corr |", "|---|---|"]
    for name, v in res["lite0_accuracy"].items():
        lines.append(f"| {name} | {_pairs(v) if isinstance(v, list) else f'{v:.4f}'} |")
    lines += ["", "## resnet50 (random weights), vanilla: rel L2 / correlation per image (4 random images)", "",
              "| variant | rel L2 / corr |", "|---|---|"]
    lines += [f"| {name} | {_pairs(v)} |" for name, v in res["resnet50_accuracy"].items()]
    if "lite0_engine" in res:
        lines += ["", "## salience's maps of Lite0, channels-last, against the fp32 defaults': rel L2 / corr / "
                  "norm ratio per photo", "", "| method | bf16 | bf16-mixed |", "|---|---|---|"]
        lines += [f"| {m} | {_pairs(v['bf16'])} | {_pairs(v['bf16-mixed'])} |" for m, v in res["lite0_engine"].items()]
    for name, methods in res.get("engine_time", {}).items():
        lines += ["", f"## salience on {name}, 1 image of 224 px, one thread: seconds per call, min / median / max", "",
                  "| method | fp32 | bf16 + channels-last | bf16-mixed + channels-last | medians over fp32's |",
                  "|---|---|---|---|---|"]
        for meth, t in methods.items():
            cells = [f"{min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}" for v in t.values()]
            ratio = ", ".join(f"{statistics.median(t[v]) / statistics.median(t['fp32']):.2f}" for v in ("bf16", "bf16-mixed"))
            lines.append(f"| {meth} | {' | '.join(cells)} | {ratio} |")
    for key, title in (("resnet50_time", "resnet50"), ("lite0_time", "EfficientNet-Lite0")):
        t = res[key]
        base = statistics.median(t["fp32"])
        lines += ["", f"## {title}: forward + input gradient, 4 images of 224 px, channels-last, one thread (s)", "",
                  "| variant | min / median / max | median over fp32's |", "|---|---|---|"]
        lines += [f"| {name} | {min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f} | "
                  f"{statistics.median(v) / base:.2f} |" for name, v in t.items()]
    return "\n".join(lines) + "\n"


def models() -> tuple:
    lite = runpy.run_path(str(EXAMPLE))
    net = lite["load_lite0"]()
    photos = lite["load_photos"](("chelsea", "coffee", "rocket"))
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50().eval()
    for m in (net, r50):
        for p in m.parameters():
            p.requires_grad_(False)
    with torch.no_grad():
        top = net(photos).argmax(1)
    return net, photos, top, r50, torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine", action="store_true", help="salience's maps of Lite0 under bf16 / bf16-mixed too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, photos, top, r50, imgs = models()
    res = {"cpu": cpu_name(), "torch": torch.__version__, "rounds": args.rounds,
           "lite0_accuracy": accuracy(net, photos, top, LITE, gates=True),
           "resnet50_accuracy": accuracy(r50, imgs, torch.zeros(4, dtype=torch.long), R50, gates=False),
           "resnet50_time": timing(r50, imgs, R50, args.rounds),
           "lite0_time": timing(net, imgs, {k: LITE[k] for k in ("bf16", "island: stem", "island: stem + blocks 0-1",
                                                                "island: stem + blocks 0-2", "bf16-mixed (1/4)")},
                                      args.rounds)}
    if args.engine:
        res["lite0_engine"] = engine(net, photos, top)
        res["engine_time"] = engine_timing({"resnet50": r50, "efficientnet-lite0": net}, imgs[:1], min(args.rounds, 3))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        command = "flock /tmp/bench.lock taskset -c 1 python benchmarks/bf16_islands.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        args.out.with_suffix(".md").write_text(markdown(res, command))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
