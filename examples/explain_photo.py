"""Explain a torchvision classifier's decision on your own photo.

    python examples/explain_photo.py photo.jpg --arch resnet50                 # pretrained (downloads)
    python examples/explain_photo.py photo.jpg --arch resnet50 --weights w.pth # your state dict
    python examples/explain_photo.py photo.jpg --weights random                # offline, random weights

Prints the top classes and writes ``<out>/<photo>_<method>.npy`` (raw maps, ``(H, W)``) and,
when :mod:`salience.viz` is installed, a figure ``<out>/<photo>.png``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import salience
from salience.loading import load_image, preprocess, unnormalize


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("image")
    ap.add_argument("--arch", default="resnet18", help="a torchvision classifier name")
    ap.add_argument("--weights", default=None, help="state dict file, 'random', or none for pretrained")
    ap.add_argument("--method", action="append", help="default: every method salience has")
    ap.add_argument("--out", default="explain-photo")
    args = ap.parse_args(argv)

    model = salience.load_model(f"torchvision:{args.arch}", weights=args.weights)
    info = model.salience_info                       # ImageNet resize/crop/mean/std + class names
    x = preprocess(load_image(args.image), info).unsqueeze(0)   # (1, 3, 224, 224)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = probs.topk(3)
    for p, c in zip(top.values, top.indices):
        print(f"{info.class_name(int(c)):>24}  {float(p):.3f}")

    cls = int(top.indices[0])
    methods = args.method or list(salience.METHODS)
    maps = {}
    for name in methods:
        maps[name] = salience.METHODS[name](model, x, cls)[0]   # (H, W) or (C, H, W)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    for name, m in maps.items():
        np.save(out / f"{stem}_{name}.npy", m.numpy())
    try:
        from salience.render import viz
    except ImportError:
        viz = None
    if viz is not None:
        picture = unnormalize(x, info)                          # what the model saw, in [0, 1]
        viz.save_png(out / f"{stem}.png", viz.figure(picture, {k: v[None] for k, v in maps.items()}))
    print(f"explained class {info.class_name(cls)} ({cls}) with {', '.join(maps)}; files in {out}/")
    return {"model": model, "x": x, "class": cls, "maps": maps}


if __name__ == "__main__":
    main()
