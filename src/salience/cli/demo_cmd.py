"""``salience demo``: an HTML report of every method on the bundled demo models (no downloads)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from salience import __version__
from salience._core.errors import SalienceError
from salience._core.info import ModelInfo
from salience._core.tensors import check_int
from salience.cli.common import EXIT_OK, EXIT_PARTIAL, figure, output_folder, probabilities, safe_name, scores
from salience.demo import data, zoo
from salience.demo.clever_hans import clever_hans_report
from salience.evidence.evaluate import check_images
from salience.evidence.localization import energy_in_mask, pointing_game
from salience.methods import GUIDED_METHODS, METHODS, QUICK, default_methods
from salience.methods.class_model import class_model
from salience.render import viz
from salience.render.report import Report
from salience.targets import REGRESSION_MODES, regression

DEMO_SEED = 10_000
"""Seed of the demo report's images: the demo models' held-out set (never trained on)."""
DEMO_SIZE = 64
"""Side of the demo report's images (:func:`salience.demo.data.shapes`' default, the demo models' input size)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="an HTML report on the bundled demo models (no downloads)")
    p.add_argument("--out", "-o", default="salience-demo", metavar="DIR", help="output folder (default salience-demo)")
    p.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--class-model-steps", type=int, default=300, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report (``index.html`` and its pictures) to ``args.out``; exit 1 if a part failed."""
    start = time.perf_counter()
    check_int(args.n, "--n", minimum=1)  # 0 was an unexpected ValueError of torch.cat (exit 3), after the folder was made
    # the report holds every image and each method's map at once: the evaluation's cap, before any folder is made
    check_images(args.n, (DEMO_SIZE, DEMO_SIZE), "held-out shapes images", holder="the demo report",
                 flag="salience demo --n")
    out_dir = output_folder(args.out)
    model = zoo.load_demo("shapes")
    rep = Report(
        "salience demo",
        f"Saliency maps of the bundled demo models on {args.n} held-out shapes images (seed {DEMO_SEED}), "
        f"made by salience {__version__} with every method that applies to these CNNs "
        f"({', '.join(default_methods(model))}), and to the demo Vision Transformer (demo:shapes-vit, "
        "which adds the attention methods).",
    )
    notes: list[str] = []  # what failed, each also said in the report
    images, labels, masks = data.shapes(args.n, seed=DEMO_SEED, size=DEMO_SIZE)
    cnn_maps = _classification(rep, out_dir, model, images, labels, notes)
    _section(rep, notes, "Vision Transformer section",
             lambda: _transformer(rep, out_dir, images, labels, masks, cnn_maps, notes))
    _regression(rep, out_dir, images[: min(4, args.n)])
    rep.heading("What each class looks like to the model (class model visualization)")
    _section(rep, notes, "class model visualization",
             lambda: _class_models(rep, out_dir, model, args.class_model_steps))
    rep.heading("Clever Hans: does the model look at the shape or at a cue?")
    _section(rep, notes, "Clever Hans section", lambda: rep.raw(clever_hans_report(out_dir)))
    rep.paragraph(f"Made in {time.perf_counter() - start:.1f} s.", css="note")
    index = rep.write(out_dir / "index.html")
    print(f"demo report: {index.resolve()}")
    print("open it in a browser, e.g. python -m webbrowser " + str(index.resolve()))
    return EXIT_OK if not notes else EXIT_PARTIAL


def _section(rep: Report, notes: list[str], what: str, write: Callable[[], Any]) -> None:
    """Run ``write``; if it fails, say so in the report and in ``notes`` (one broken section must
    not sink the report)."""
    try:
        write()
    except Exception as e:  # noqa: BLE001
        notes.append(f"{what}: failed ({type(e).__name__}: {e})")
        rep.paragraph(notes[-1], css="bad")


def _classification(rep: Report, out_dir: Path, model: nn.Module, images: Tensor, labels: Tensor,
                    notes: list[str]) -> dict[str, Tensor]:
    """1. Every method on the classifier's predicted classes, side by side, and a table of the
    predictions; returns the maps."""
    info = model.salience_info
    out = scores(model, images)
    probs, pred = probabilities(out), out.argmax(1)
    maps: dict[str, Tensor] = {}
    failed = []
    for name in default_methods(model, images):
        try:
            maps[name] = METHODS[name](model, images, pred, **QUICK.get(name, {})).detach()
        except Exception as e:  # noqa: BLE001 - one broken method must not sink the report
            failed.append(f"{name}: failed ({type(e).__name__}: {e})")
    rep.heading("Which pixels decided the class? (demo:shapes)")
    rep.paragraph(
        "Each row is one image; the first column is the image, then one column per method, each map "
        "explaining the predicted class's score before softmax."
    )
    fig = out_dir / "classification.png"
    viz.save_png(fig, figure(images, maps, [
        f"{info.class_name(int(labels[i]))} -> {info.class_name(int(pred[i]))}" for i in range(images.shape[0])]))
    rep.figure(fig, "rows: images; columns: image, " + ", ".join(maps))
    rep.table(["row", "true class", "predicted", "probability", ""], _prediction_rows(info, labels, pred, probs))
    for note in failed:
        rep.paragraph(note, css="bad")
    notes += failed
    return maps


def _vit_maps(model: nn.Module, images: Tensor, pred: Tensor) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Every default method on the ViT: ``(maps, what does not apply and why, what failed)``. The
    guided rules are defined for ReLUs only and refuse the ViT's GELU: that is said, not a failure."""
    maps: dict[str, Tensor] = {}
    names = default_methods(model, images)
    # default_methods leaves out the methods whose rules refuse the ViT's GELU: said as not run
    skipped, failed = [n for n in METHODS if n in GUIDED_METHODS and n not in names], []
    for name in names:
        try:
            maps[name] = METHODS[name](model, images, pred, **QUICK.get(name, {})).detach()
        except SalienceError as e:
            if "ReLU-type activations only" not in str(e):
                failed.append(f"{name} (demo:shapes-vit): failed ({e})")
            else:
                skipped.append(name)
        except Exception as e:  # noqa: BLE001 - one broken method must not sink the report
            failed.append(f"{name} (demo:shapes-vit): failed ({type(e).__name__}: {e})")
    return maps, skipped, failed


def _localization_rows(vit_maps: dict[str, Tensor], cnn_maps: dict[str, Tensor], masks: Tensor) -> list[tuple]:
    """A row per method: pointing game and energy in mask on the ViT and on the CNN ('-' where it does not apply)."""
    def score(maps: dict[str, Tensor], name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> str:
        return f"{float(torch.nanmean(fn(maps[name], masks))):.3f}" if name in maps else "-"

    names = list(cnn_maps) + [n for n in vit_maps if n not in cnn_maps]
    return [(n, score(vit_maps, n, pointing_game), score(cnn_maps, n, pointing_game),
             score(vit_maps, n, energy_in_mask), score(cnn_maps, n, energy_in_mask)) for n in names]


def _transformer(rep: Report, out_dir: Path, images: Tensor, labels: Tensor, masks: Tensor,
                 cnn_maps: dict[str, Tensor], notes: list[str]) -> None:
    """1b. The demo ViT: every method that applies, and pointing game / energy in mask beside the CNN's."""
    vit = zoo.load_demo("shapes-vit")
    info = vit.salience_info
    pred = scores(vit, images).argmax(1)
    maps, skipped, failed = _vit_maps(vit, images, pred)
    acc = info.extra.get("held_out", {}).get("accuracy")
    rep.heading("The same images through a Vision Transformer (demo:shapes-vit)")
    rep.paragraph(
        "A small ViT (8x8 patches, a class token, 4 blocks) trained on the same shapes"
        + (f", held-out accuracy {100 * acc:.2f} %" if acc is not None else "") + ". Grad-CAM reads the tokens "
        f"before the last block's attention ({info.default_layer}); attention rollout and transformer "
        "attribution read every attention matrix."
        + (f" Not run: {', '.join(skipped)}: their backprop rules are defined for ReLUs and this model uses GELU."
           if skipped else ""))
    fig = out_dir / "classification_vit.png"
    viz.save_png(fig, figure(images, maps, [
        f"{info.class_name(int(labels[i]))} -> {info.class_name(int(pred[i]))}" for i in range(images.shape[0])]))
    rep.figure(fig, "demo:shapes-vit; rows: images (true -> predicted); columns: image, " + ", ".join(maps))
    rep.paragraph(f"Do the maps land on the shape? On these {images.shape[0]} images (the predicted class of each "
                  "model; pointing game: is the map's maximum on the shape; energy in mask: the share of the map's "
                  "positive mass on it, about 0.1 for a map that ignores the shape):")
    rep.table(["method", "pointing game, ViT", "pointing game, CNN", "energy in mask, ViT", "energy in mask, CNN"],
              _localization_rows(maps, cnn_maps, masks))
    for note in failed:
        rep.paragraph(note, css="bad")
    notes += failed


def _prediction_rows(info: ModelInfo, labels: Tensor, pred: Tensor, probs: Tensor) -> list[tuple]:
    """A table row per image: its number, true and predicted class, the probability, and ok / WRONG."""
    return [
        (i + 1, info.class_name(int(labels[i])), info.class_name(int(pred[i])), f"{float(probs[i, pred[i]]):.3f}",
         "ok" if int(labels[i]) == int(pred[i]) else "WRONG")
        for i in range(labels.shape[0])
    ]


def _regression(rep: Report, out_dir: Path, images: Tensor) -> None:
    """2. What increases, decreases or keeps each output of the regression model: a figure per output."""
    reg = zoo.load_demo("shapes-regression")
    out = scores(reg, images)
    vanilla = METHODS["vanilla"]
    rep.heading("Regression targets (demo:shapes-regression)")
    rep.paragraph(
        "Vanilla gradients of each regressed output: 'increase' shows what would raise it, 'decrease' what "
        "would lower it, 'maintain' the pixels it is least sensitive to (|1/gradient|)."
    )
    for j, name in enumerate(reg.salience_info.class_names or ("output",)):
        maps = {mode: vanilla(reg, images, regression(j, mode)).detach() for mode in REGRESSION_MODES}
        path = out_dir / f"regression_{safe_name(name)}.png"
        viz.save_png(path, figure(images, maps))
        vals = ", ".join(f"{float(v):.3f}" for v in out[:, j])
        rep.figure(path, f"{name}: columns image, increase, decrease, maintain; predicted {vals}")


def _class_models(rep: Report, out_dir: Path, model: nn.Module, steps: int) -> None:
    """3. The image that maximizes each class's score (class model visualization), side by side."""
    names = list(model.salience_info.class_names or ())
    grid = class_model(model, list(range(len(names))), shape=(3, 64, 64), steps=steps,
                       seed=0.5, generator=torch.Generator().manual_seed(0)).detach().cpu()
    path = out_dir / "class_models.png"
    viz.save_png(path, _strip(grid))
    rep.figure(path, "the image that maximizes each class's score (L2, total variation, jitter, blur), "
               "left to right: " + ", ".join(names))


def _strip(images: Tensor, tile: int = 160, pad: int = 4) -> np.ndarray:
    """Images ``(B, C, H, W)`` side by side, enlarged to ``tile`` pixels, as uint8 ``(H, W, 3)``."""
    cells = []
    for img in images:
        arr = viz.to_uint8_image(img)
        arr = np.asarray(Image.fromarray(arr).resize((tile, tile), Image.NEAREST))
        cells += [arr, np.full((tile, pad, 3), 255, np.uint8)]
    return np.concatenate(cells[:-1], axis=1)
