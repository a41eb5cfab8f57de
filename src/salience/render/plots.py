"""Line plots drawn with pillow alone (no matplotlib): :func:`line_plot`, its tick values
(:func:`nice_ticks`) and :func:`side_by_side` to put plots in one picture. Pure numpy / PIL;
save the result with :func:`salience.render.viz.save_png`."""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["PALETTE", "nice_ticks", "line_plot", "side_by_side"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``: a step of 1, 2, 2.5 or 5 times a power of ten
    giving about ``target`` intervals, e.g. ``(-0.2, 1.0) -> [-0.2, 0, 0.2, ..., 1.0]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, 10) + 0.0)
        k += 1
    return ticks


def line_plot(series: Mapping[str, Sequence[float]], *, title: str = "", xlabel: str = "",
              ylabel: str = "", xticks: Optional[Sequence[str]] = None, ylim: tuple[float, float] = (0.0, 1.0),
              size: tuple[int, int] = (520, 340)) -> np.ndarray:
    """A plain line plot as uint8 ``(H, W, 3)``, drawn with pillow (no matplotlib needed).

    Each series is plotted against evenly spaced x positions in ``[0, 1]``, or against
    ``xticks`` (one label per point) when given.
    """
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    names = list(series)
    left, right, top = 48, 170, 26
    bottom = 62 if xticks else 42
    pw, ph = w - left - right, h - top - bottom
    lo, hi = ylim
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for v in nice_ticks(lo, hi):
        y = top + ph - ph * (v - lo) / (hi - lo)
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.line([left + 1, y, left + pw - 1, y], fill=(235, 235, 235))
        d.text((4, y - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    if xticks:
        for i, t in enumerate(xticks):
            x = left + pw * i / max(1, len(xticks) - 1)
            d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
            d.text((x - 3 * len(str(t)), top + ph + 6 + 12 * (i % 2)), str(t), fill=(0, 0, 0), font=font)
    else:
        for k in range(5):
            x = left + pw * k / 4
            d.line([x, top + ph, x, top + ph + 4], fill=(0, 0, 0))
            d.text((x - 8, top + ph + 6), f"{k / 4:.2f}", fill=(0, 0, 0), font=font)
    d.text((left, 6), title, fill=(0, 0, 0), font=font)
    d.text((left + pw // 2 - 3 * len(xlabel), h - 16), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, top - 14), ylabel, fill=(80, 80, 80), font=font)
    for j, name in enumerate(names):
        ys = [float(v) for v in series[name]]
        colour = PALETTE[j % len(PALETTE)]
        pts = []
        for i, v in enumerate(ys):
            if math.isnan(v):
                continue
            x = left + pw * i / max(1, len(ys) - 1)
            y = top + ph - ph * (min(max(v, lo), hi) - lo) / (hi - lo)
            pts.append((x, y))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(ys) <= 12 else ():
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 14 * j
        d.line([left + pw + 10, ly + 6, left + pw + 28, ly + 6], fill=colour, width=3)
        d.text((left + pw + 32, ly), name[:22], fill=(0, 0, 0), font=font)
    return np.asarray(img).copy()


def side_by_side(*plots: np.ndarray) -> np.ndarray:
    """Pictures ``(H, W, 3)`` of the same height joined left to right."""
    return np.concatenate(plots, axis=1)
