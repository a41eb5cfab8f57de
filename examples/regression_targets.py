"""Explain a regression model: what would increase, decrease or keep each output.

    python examples/regression_targets.py --output x_position

``demo:shapes-regression`` predicts a shape's size and horizontal position. For one output,
``targets.regression(i, mode)`` gives three maps: ``increase`` (where the gradient is positive),
``decrease`` (where it is negative) and ``maintain`` (``|1/gradient|``: where the output is least
sensitive). The raw gradients (``reduce=None``) are saved signed.
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
    ap.add_argument("--output", default="size", help="output name or index")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--out", default="regression-targets")
    args = ap.parse_args(argv)

    model = salience.load_model("demo:shapes-regression")
    info = model.salience_info
    names = list(info.class_names)
    index = names.index(args.output) if args.output in names else int(args.output)
    images, _, _ = salience.data.shapes(args.n, seed=10_000)
    maps = {
        mode: salience.vanilla(model, images, targets.regression(index, mode), reduce=None)
        for mode in ("increase", "decrease", "maintain")
    }                                                                     # each (n, 3, 64, 64), signed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode, m in maps.items():
        np.save(out / f"{names[index]}_{mode}.npy", m.numpy())
    try:
        from salience.render import viz
    except ImportError:
        viz = None
    if viz is not None:
        # The default reduction keeps each direction's part: max_c max(g, 0) for increase / decrease.
        shown = {mode: salience.vanilla(model, images, targets.regression(index, mode)) for mode in maps}
        viz.save_png(out / f"{names[index]}.png", viz.figure(images, shown))
    pred = model(images)[:, index].detach()
    print(f"{names[index]} predicted: {', '.join(f'{v:.3f}' for v in pred.tolist())}; maps in {out}/")
    return {"model": model, "images": images, "index": index, "maps": maps}


if __name__ == "__main__":
    main()
