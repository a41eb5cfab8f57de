"""How far Score-CAM, Ablation-CAM, RISE and occlusion under ``precision="bf16"`` + channels-last are from fp32.

The maps of ``benchmarks/perturbation.py --bf16 1`` against the default (fp32, contiguous) maps, at its settings:

    PYTHONPATH=src python benchmarks/perturbation_bf16_error.py --model resnet50 --size 224 --images 1 \\
        --layer layer4.0.conv1 --masks 512 --window 32 --stride 16 --out benchmarks/perturbation-bf16-error

torchvision's model with random weights (seed 0), uniform random images (seed 1), each image's fp32 predicted
class as the target of both runs. Per method and image: the relative L2 distance ``|a - b| / |b|`` over the map,
the correlation, and the largest difference over the map's largest value. Occlusion's map and Ablation-CAM's
weights are differences of scores, so their error is also given in the scores' units (docs/performance.md,
precision): occlusion's largest difference over the target's clean score ``|S|``; Ablation-CAM's linear map
(``relu=False, upsample=False``) as ``max |a - b| / sum_k |A_k|`` over the layer's positions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import make_images, make_model, predicted  # noqa: E402

FAST = {"bf16+channels_last": dict(precision="bf16", memory_format="channels_last"),
        "bf16+channels_last+fold": dict(precision="bf16", memory_format="channels_last", fold_batchnorm=True)}


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """``a`` against the reference ``b`` (one image's map)."""
    a, b = a.double().flatten(), b.double().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item() if b.std() > 0 and a.std() > 0 else float("nan")
    return {"rel_l2": ((a - b).norm() / b.norm()).item(), "corr": corr,
            "max_over_max": ((a - b).abs().max() / b.abs().max()).item()}


def _scores_units(method: str, model, x, target, args, maps: dict) -> dict[str, list[float]]:
    """Per option set and image: occlusion ``max |a - b| / |S|``; Ablation-CAM ``max |a - b| / sum_k |A_k|`` of
    the linear map."""
    import salience
    from salience._core.autograd import forward_scores, layer_output

    if method == "occlusion":
        clean = forward_scores(model, x).gather(1, target.view(-1, 1)).abs().view(-1)
        return {name: [((o - r).abs().max() / c).item() for o, r, c in zip(maps[name], maps["fp32"], clean)]
                for name in maps if name != "fp32"}
    lin = {name: salience.ablationcam(model, x, target, layer=args.layer, relu=False, upsample=False, **opts)
           for name, opts in (("fp32", {}), ("bf16", FAST["bf16+channels_last"]))}  # both keywords
    per_position = layer_output(model, x, args.layer).abs().sum(1)  # sum_k |A_k|, (B, h, w)
    return {"bf16+channels_last": [((lin["bf16"][i] - lin["fp32"][i]).abs() / per_position[i]).max().item()
                                   for i in range(x.shape[0])]}


def measure(args) -> dict:
    """Every method's maps in fp32 and under each fast option set; the distances per image."""
    import salience

    warnings.simplefilter("ignore")  # bf16 autocast on a CPU, fold_batchnorm unapplied for Ablation-CAM
    model = make_model(args.model, args.threads)
    x = make_images(args.images, args.size)
    target = predicted(model, x)
    kw = {"scorecam": dict(layer=args.layer), "ablationcam": dict(layer=args.layer), "rise": dict(masks=args.masks),
          "occlusion": dict(window=args.window, stride=args.stride)}
    out: dict = {}
    for method in args.methods.split(","):
        maps, seconds = {}, {}
        for name, opts in (("fp32", {}), *FAST.items()):
            if method == "ablationcam" and "fold" in name:
                continue  # its passes never run folded: the same map as bf16+channels_last
            t0 = time.perf_counter()
            with salience.performance(**opts):  # fold_batchnorm is a setting, not a keyword
                maps[name] = getattr(salience, method)(model, x, target, **kw[method])
            seconds[name] = time.perf_counter() - t0
        out[method] = {"seconds": seconds, "images": [
            {name: _compare(maps[name][i], maps["fp32"][i]) for name in maps if name != "fp32"}
            for i in range(x.shape[0])]}
        if method in ("occlusion", "ablationcam"):
            out[method]["scores_units"] = _scores_units(method, model, x, target, args, maps)
        print(method, json.dumps(out[method]), flush=True)
    return out


def markdown(data: dict) -> str:
    cfg = data["config"]
    lines = [f"# bf16 + channels-last against fp32: {cfg['model']} (random weights), {cfg['size']} px, "
             f"{cfg['images']} image(s)", "", f"`{cfg['command']}`", "",
             "| method | options | image | relative L2 | correlation | max diff / max of map | scores' units |",
             "|---|---|---|---|---|---|---|"]
    for method, r in data["results"].items():
        for i, per in enumerate(r["images"]):
            for name, d in per.items():
                units = r.get("scores_units", {}).get(name)
                cell = f"{units[i]:.2e}" if units else ""
                lines.append(f"| {method} | {name} | {i} | {d['rel_l2']:.2e} | {d['corr']:.4f} | "
                             f"{d['max_over_max']:.2e} | {cell} |")
    lines += ["", "Scores' units: occlusion `max |a - b| / |S|` (S the target's clean score), Ablation-CAM's linear "
              "map (`relu=False, upsample=False`) `max |a - b| / sum_k |A_k|` over the layer's positions."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--layer", default="layer4.0.conv1")
    p.add_argument("--masks", type=int, default=512)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="scorecam,ablationcam,rise,occlusion")
    p.add_argument("--out", default=str(HERE / "perturbation-bf16-error"))
    args = p.parse_args()
    data = {"config": dict(vars(args), command="python benchmarks/perturbation_bf16_error.py " + " ".join(sys.argv[1:])),
            "results": measure(args)}
    Path(args.out + ".json").write_text(json.dumps(data, indent=1))
    Path(args.out + ".md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
