"""Which pixels excite one convolution filter? (conv filter saliency with ``targets.activation``)

    python examples/filter_saliency.py --layer features.3 --channel 5

The target is the mean activation of one channel of an inner layer; the forward pass stops
there. Writes one ``(H, W)`` map per demo image to ``<out>/filter_<layer>_<channel>.npy``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import salience
from salience import targets


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 allow_abbrev=False)  # flags written in full, never abbreviated
    ap.add_argument("--model", default="demo:shapes")
    ap.add_argument("--layer", default=None, help="dotted module name (default: the model's last conv block)")
    ap.add_argument("--channel", type=int, default=0)
    ap.add_argument("--n", type=int, default=4, help="number of demo images")
    ap.add_argument("--out", default="filter-saliency")
    args = ap.parse_args(argv)

    model = salience.load_model(args.model)
    layer = args.layer or model.salience_info.default_layer
    images, _, _ = salience.data.shapes(args.n, seed=10_000)            # (n, 3, 64, 64)
    target = targets.activation(layer, args.channel)
    maps = salience.vanilla(model, images, target)                       # (n, 64, 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"filter_{layer}_{args.channel}.npy"
    np.save(path, maps.numpy())
    try:
        from salience.render import viz
    except ImportError:
        viz = None
    if viz is not None:
        viz.save_png(path.with_suffix(".png"), viz.figure(images, {f"{layer}:{args.channel}": maps}))
    print(f"saliency of filter {args.channel} of {layer} for {args.n} images: {path}")
    return {"model": model, "images": images, "layer": layer, "maps": maps}


if __name__ == "__main__":
    main()
