"""Every saliency method salience has, side by side, on the same images and class.

    python examples/compare_methods.py --n 4

Runs each method of ``salience.METHODS`` that applies to the model on held-out demo images for the predicted class and
writes ``<out>/<method>.npy`` (``(n, H, W)``) and ``<out>/compare.png``
(rows: images; columns: the image, then one method each).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import salience


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("--model", default="demo:shapes")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", default="compare-methods")
    args = ap.parse_args(argv)

    model = salience.load_model(args.model)
    images, labels, _ = salience.data.shapes(args.n, seed=10_000)
    with torch.no_grad():
        predicted = model(images).argmax(1)                              # explain what the model chose
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    maps = {}
    for name in salience.methods.default_methods(model):                  # those that apply to a CNN
        method = salience.METHODS[name]
        t = time.perf_counter()
        # every method takes the class (Eigen-CAM's one map stands for it); reports' cheaper options (RISE's masks)
        m = method(model, images, predicted, **salience.methods.QUICK.get(name, {}))
        maps[name] = m if m.dim() == 3 else m.abs().amax(1)            # (n, H, W) for the picture
        np.save(out / f"{name}.npy", m.numpy())
        print(f"{name:<22} {time.perf_counter() - t:6.2f} s")
    from salience.render import viz

    names = model.salience_info.class_names
    viz.save_png(out / "compare.png", viz.figure(images, maps, overlay=False, scale_to=128,
                                                 row_labels=[names[int(c)] for c in predicted]))
    return {"model": model, "images": images, "predicted": predicted, "maps": maps}


if __name__ == "__main__":
    main()
