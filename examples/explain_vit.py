"""The demo Vision Transformer explained: attention and gradient maps against the shapes' masks.

    python examples/explain_vit.py --n 3

No pretrained ImageNet ViT ships in a wheel (docs/methods-transformers.md, "No pretrained ViT on
real photos"), so this uses the bundled ``demo:shapes-vit`` (a small ViT trained on the synthetic
shapes, weights in the package) on held-out shapes images, whose exact masks say where the object
is. Each image is explained for the class the model predicted, by attention rollout, transformer
attribution, Grad-CAM at the model's default token layer (``blocks.3.ln_1``), vanilla gradients,
SmoothGrad and integrated gradients, each with its own defaults; a random map is the chance baseline.

Writes ``<out>/<method>.npy`` (``(n, 64, 64)``) and ``<out>/vit_shapes.png``: one row per image;
columns: the image, its ground-truth mask (titled with the true class, and the predicted one where
they differ), then each map, titled with its pointing game (``hit``: the map's maximum is on the
shape) and its energy in mask (the share of the map's positive mass on the shape; a random map's is
about the mask's area fraction).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import salience
from salience.evidence import energy_in_mask, image_seeds, pointing_game, random_maps

METHODS = {"attention_rollout": "rollout", "transformer_attribution": "attribution", "gradcam": "Grad-CAM",
           "vanilla": "vanilla", "smoothgrad": "SmoothGrad", "integrated_gradients": "IG"}
"""The methods drawn, in the figure's order, with their short column titles."""

RANDOM = "random"
"""The chance baseline's column: uniform random maps, one per image, seeded by the image's content."""


def explain(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor,
            methods: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{method: (n, H, W) map}`` for ``target``, each method with its defaults (Grad-CAM: the default layer)."""
    maps = {}
    for name in methods:
        t = time.perf_counter()
        maps[name] = salience.METHODS[name](model, images, target)
        print(f"{name:<24} {time.perf_counter() - t:6.2f} s")
    maps[RANDOM] = random_maps((images.shape[0], *images.shape[-2:]), seed=image_seeds(images, 0))
    return maps


def scores(maps: dict[str, torch.Tensor], masks: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{method: (pointing game (n,), energy in mask (n,))}`` of each map against the masks."""
    return {name: (pointing_game(m, masks), energy_in_mask(m, masks)) for name, m in maps.items()}


def tile_title(name: str, hit: float, energy: float) -> str:
    """``'rollout: hit, 0.21'``: the map's title, its pointing game and its energy in mask."""
    short = METHODS.get(name, name)
    point = {1.0: "hit", 0.0: "miss"}.get(hit, f"hit {hit:.2f}")  # a tied maximum scores the share that hits
    return f"{short}: {point}, " + ("no mass" if math.isnan(energy) else f"{energy:.2f}")


def draw(images: torch.Tensor, masks: torch.Tensor, maps: dict[str, torch.Tensor], score: dict,
         mask_titles: Sequence[str], scale_to: int = 128) -> np.ndarray:
    """The figure as uint8 ``(H, W, 3)``: one :func:`salience.viz.figure` row per image (so that each
    tile's title carries that map's own scores), stacked. Columns: image, mask, then ``maps``."""
    from salience.render import viz

    rows = []
    for i in range(images.shape[0]):
        row_maps = {"mask": masks[i:i + 1].float(), **{name: m[i:i + 1] for name, m in maps.items()}}
        titles = [mask_titles[i]] + [tile_title(name, float(score[name][0][i]), float(score[name][1][i]))
                                     for name in maps]
        rows.append(viz.figure(images[i:i + 1], row_maps, overlay=False, scale_to=scale_to, titles=titles))
    return np.concatenate(rows, axis=0)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("--n", type=int, default=3, help="held-out images (rows)")
    ap.add_argument("--method", action="append", choices=list(METHODS), help=f"default: {', '.join(METHODS)}")
    ap.add_argument("--out", default="explain-vit")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be at least 1, got {args.n}")

    model = salience.load_model("demo:shapes-vit")
    images, labels, masks = salience.data.shapes(args.n, seed=10_000)  # held out: the models trained on seed 0
    with torch.no_grad():
        predicted = model(images).argmax(1)                              # explain what the model chose
    from salience.methods.gradcam import describe_default_layer

    print(f"Grad-CAM's layer: {describe_default_layer(model, images)}")
    maps = explain(model, images, predicted, args.method or list(METHODS))
    score = scores(maps, masks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        np.save(out / f"{name}.npy", m.numpy())
        print(f"{name:<24} pointing game {torch.nanmean(score[name][0]):.2f}, "
              f"energy in mask {torch.nanmean(score[name][1]):.2f} (mean of {args.n})")
    classes = model.salience_info.class_names
    mask_titles = [classes[int(y)] + ("" if y == p else f", pred {classes[int(p)]}") for y, p in zip(labels, predicted)]
    from salience.render import viz

    figure = viz.save_png(out / "vit_shapes.png", draw(images, masks, maps, score, mask_titles))
    print(f"wrote {figure}")
    return {"model": model, "images": images, "labels": labels, "masks": masks, "predicted": predicted,
            "maps": maps, "scores": score, "figure": figure}


if __name__ == "__main__":
    main()
