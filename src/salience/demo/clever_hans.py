"""The Clever Hans check of ``salience demo``: does a model look at the shape or at a cue?

``demo:shapes-cue`` was trained on shapes whose class is also written as a small checkerboard
mark in a class-specific slot. :func:`clever_hans` measures where the saliency of that model
(and of the clean ``demo:shapes``) lies, and how its accuracy falls when the mark is moved or
removed; :func:`add_clever_hans` writes that section into a :class:`salience.render.report.Report`
and :func:`clever_hans_report` gives it as an HTML fragment. Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from salience._core.autograd import predicted_classes
from salience.demo import data, zoo
from salience.evidence import energy_in_mask, spectral_residual
from salience.methods import METHODS
from salience.render import viz
from salience.render.report import Report

__all__ = ["clever_hans", "add_clever_hans", "clever_hans_report"]

PathLike = Union[str, "os.PathLike[str]"]

_INTRO = (
    "demo:shapes-cue was trained on shapes whose class is also written as a small checkerboard mark in "
    "a class-specific slot along the top border (the 'tree with leaves' behind every 'bird'). Is it "
    "looking at the shape or at the mark? On images with the training cue, its saliency concentrates on "
    "the mark, while the clean model demo:shapes looks at the shape."
)


def _accuracy(models: dict[str, nn.Module], n: int, seed: int) -> dict[str, dict[str, float]]:
    """Accuracy of each model with the cue as in training, moved to a wrong class's slot, and absent."""
    acc: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        acc[name] = {}
        for cue in ("train", "moved", None):
            b = data.shapes_batch(n, seed, cue=cue)
            pred = predicted_classes(model, b.images, batch_size=100)
            acc[name][cue or "none"] = float((pred == b.labels).float().mean())
    return acc


def _shares(maps: Tensor, b: data.ShapesBatch) -> dict[str, float]:
    """The mean share of the maps' energy on the cue and on the shape, and the areas of both."""
    return {
        "cue": float(torch.nanmean(energy_in_mask(maps, b.cue_masks).float())),
        "shape": float(torch.nanmean(energy_in_mask(maps, b.masks).float())),
        "cue_area": float(b.cue_masks.float().mean()),
        "shape_area": float(b.masks.float().mean()),
    }


def clever_hans(n: int = 200, n_maps: int = 32, seed: int = 10_000,
                methods: Sequence[str] = ("vanilla", "guided_backprop", "gradcam")) -> dict[str, Any]:
    """The numbers of the Clever Hans demo: accuracy of ``demo:shapes-cue`` (and of the clean
    ``demo:shapes``) with the cue as in training, moved to a wrong class's slot, and absent; and,
    per method, the mean share of saliency on the cue mark and on the shape (images with the
    training cue), with the model-free spectral-residual map as the baseline (model ``"none"``).
    Names in ``methods`` that are not in :data:`salience.methods.METHODS` are left out.

    Returns ``{"accuracy": {model: {"train" | "moved" | "none": acc}}, "energy": {model:
    {method: {"cue", "shape", "cue_area", "shape_area"}}}, "maps": {"model: method": (n_maps, H,
    W)}, "images": (n_maps, 3, H, W), "labels": (n_maps,)}``."""
    models = {name: zoo.load_demo(name) for name in ("shapes-cue", "shapes")}
    acc = _accuracy(models, n, seed)
    b = data.shapes_batch(n_maps, seed, cue="train")
    energy: dict[str, dict[str, dict[str, float]]] = {}
    maps: dict[str, Tensor] = {}
    for name, model in models.items():
        energy[name] = {}
        for meth in (m for m in methods if m in METHODS):
            mp = METHODS[meth](model, b.images).detach()
            if mp.dim() == 4:
                mp = mp.abs().amax(1)
            energy[name][meth] = _shares(mp, b)
            maps[f"{name}: {meth}"] = mp
    # The model-free baseline: what the image alone makes salient (the cue is a small, sharp,
    # high-contrast pattern, so a model-free map may also like it; the models are compared to it).
    energy["none"] = {"spectral_residual": _shares(spectral_residual(b.images), b)}
    return {"accuracy": acc, "energy": energy, "maps": maps, "images": b.images, "labels": b.labels}


def _density(e: dict[str, float], part: str) -> float:
    """Share of the energy on ``part`` divided by its share of the area (1 = no preference)."""
    return e[part] / max(e[f"{part}_area"], 1e-12)


def _summary(energy: dict[str, dict[str, dict[str, float]]]) -> str:
    """The sentence on areas and densities after the introduction ("" without any method)."""
    cue_e, clean_e = energy.get("shapes-cue", {}), energy.get("shapes", {})
    any_e = next(iter(cue_e.values()), None)
    if not any_e:
        return ""
    lines = []
    for meth, e in cue_e.items():
        c = clean_e.get(meth)
        lines.append(f"{meth}: {_density(e, 'cue'):.1f}x on the cue vs {_density(e, 'shape'):.1f}x on the shape"
                     + (f" (clean model: {_density(c, 'cue'):.1f}x vs {_density(c, 'shape'):.1f}x)" if c else ""))
    sr_e = energy.get("none", {}).get("spectral_residual")
    if sr_e:
        lines.append(f"the image alone (spectral residual, no model): {_density(sr_e, 'cue'):.1f}x vs "
                     f"{_density(sr_e, 'shape'):.1f}x")
    return (f" The cue covers {any_e['cue_area']:.1%} of the image and the shape {any_e['shape_area']:.1%}, so "
            "we also give each share divided by its area (1 = no preference; higher = more saliency per "
            "pixel than the image average): " + "; ".join(lines) + ".")


def add_clever_hans(rep: Report, out_dir: PathLike, *, n: int = 200, n_maps: int = 16) -> Report:
    """Add the Clever Hans section (text, two tables, a figure) to ``rep``; writes
    ``clever_hans.png`` into ``out_dir``. ``n``: images per accuracy, ``n_maps``: images whose
    saliency is measured (see :func:`clever_hans`). Returns ``rep``."""
    r = clever_hans(n=n, n_maps=n_maps)
    k = 4
    pic = viz.figure(r["images"][:k], {name: m[:k] for name, m in r["maps"].items()
                                       if name.endswith(("vanilla", "gradcam"))}, overlay=True, scale_to=96)
    png = viz.save_png(Path(out_dir) / "clever_hans.png", pic)
    rep.paragraph(_INTRO + _summary(r["energy"]))
    rep.table(["model", "method", "energy on the cue", "energy on the shape", "cue: energy / area",
               "shape: energy / area"],
              [["none (the image alone)" if mn == "none" else f"demo:{mn}", meth, f"{e['cue']:.3f}",
                f"{e['shape']:.3f}", f"{_density(e, 'cue'):.1f}", f"{_density(e, 'shape'):.1f}"]
               for mn, per in r["energy"].items() for meth, e in per.items()])
    rep.paragraph("The test that saliency predicted: move the mark to a wrong class's slot, or remove it.")
    rep.table(["model", "accuracy, cue as in training", "cue moved", "no cue"],
              [[f"demo:{mn}", f"{a['train']:.3f}", f"{a['moved']:.3f}", f"{a['none']:.3f}"]
               for mn, a in r["accuracy"].items()])
    rep.figure(png, "Images with the training cue; maps of the cue model and of the clean model (vanilla "
               "gradients, Grad-CAM).")
    return rep


def clever_hans_report(out_dir: PathLike, *, n: int = 200, n_maps: int = 16) -> str:
    """The Clever Hans section as an HTML fragment, for a page that inserts it with
    :meth:`salience.render.report.Report.raw`; writes ``clever_hans.png`` into ``out_dir`` (the
    fragment links it by that relative name). Built with :func:`add_clever_hans`: every text is
    escaped by :class:`~salience.render.report.Report`."""
    return add_clever_hans(Report("Clever Hans"), out_dir, n=n, n_maps=n_maps).fragment(out_dir)
