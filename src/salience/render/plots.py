"""Line plots drawn with pillow alone (no matplotlib): :func:`line_plot`, its tick values
(:func:`nice_ticks`) and :func:`side_by_side` to put plots in one picture. Pure numpy / PIL;
save the result with :func:`salience.render.viz.save_png`."""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from salience._core.errors import SalienceError

__all__ = ["PALETTE", "nice_ticks", "line_plot", "side_by_side"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``: a step of 1, 2, 2.5 or 5 times a power of ten
    giving about ``target`` intervals, e.g. ``(-0.2, 1.0) -> [-0.2, 0, 0.2, ..., 1.0]``. ``lo`` and
    ``hi`` are finite numbers (``[lo]`` when ``hi <= lo``; a span ``hi - lo`` past the largest float is
    refused), ``target`` an int from 1 to 1000. The ticks are distinct and increasing for any such range,
    tiny (subnormal) or huge: each is its exact decimal ``k * step`` correctly rounded, and the step is
    wider than the floats' spacing there, so a range a few floats wide has as many ticks as fit. A tick
    within ``1e-9 * step`` outside the range is kept: ``(0.1 + 0.2, 1.0)`` starts at ``0.3``."""
    lo, hi = _finite(lo, "lo"), _finite(hi, "hi")
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or not 1 <= target <= _MAX_TICKS:
        raise SalienceError(f"target must be an int from 1 to {_MAX_TICKS} (about how many intervals), got {target!r}")
    if not hi > lo:
        return [lo]
    if not math.isfinite(hi - lo):  # e.g. -1e308 .. 1e308: the span itself overflows
        raise SalienceError(f"the range [{lo:g}, {hi:g}] is too wide to divide into ticks; give a narrower one")
    sn, sd = _tick_step(hi - lo, target, math.ulp(max(abs(lo), abs(hi))))  # the step, exactly: sn / sd
    (ln, ld), (hn, hd) = lo.as_integer_ratio(), hi.as_integer_ratio()
    # k from ceil(lo / step - 1e-9) to floor(hi / step + 1e-9), exactly: an end a float off its round decimal
    # (0.1 + 0.2, 1.4e-06 computed) keeps its tick, as matplotlib's (and the plots so far) do; +-1: a decimal
    # that rounds into [lo, hi] (a subnormal's)
    first = -((ld * sn - ln * sd * _TOL) // (ld * sn * _TOL))
    last = (hn * sd * _TOL + hd * sn) // (hd * sn * _TOL)
    ticks: list[float] = []
    for k in range(first - 1, last + 2):
        try:
            v = (k * sn) / sd + 0.0  # the decimal correctly rounded (int / int); -0.0 -> 0.0
        except OverflowError:  # the one step past a range that ends near the largest float
            continue
        if (first <= k <= last or lo <= v <= hi) and (not ticks or v > ticks[-1]):
            ticks.append(v)
    return ticks


def _tick_step(span: float, target: int, spacing: float) -> tuple[int, int]:
    """The step as a fraction of ints ``(num, den)``: the least of 1, 2, 2.5, 5 times a power of ten that is
    at least ``span / target`` (found in logarithms: ``span / target`` underflows for a subnormal span) and
    wider than ``spacing``, the floats' spacing at the range's larger end (two decimals further apart than
    that round to two floats)."""
    raw = math.log10(span) - math.log10(target)
    e = math.floor(raw)
    i = next(i for i, m in enumerate((1, 2, 2.5, 5, 10)) if m >= 10.0 ** (raw - e) * (1 - 1e-9))
    pn, pd = spacing.as_integer_ratio()
    while True:
        (mn, md), p = _MANTISSAS[i % 4], e + i // 4
        sn, sd = mn * 10 ** max(p, 0), md * 10 ** max(-p, 0)
        if sn * pd > pn * sd:
            return sn, sd
        i += 1


_MANTISSAS = ((1, 1), (2, 1), (5, 2), (5, 1))  # 1, 2, 2.5, 5 as fractions
_MAX_TICKS = 1000
_TOL = 10 ** 9  # a tick within 1e-9 step outside [lo, hi] is kept (the float of a round end)


def _finite(v: Any, what: str) -> float:
    """``v`` as a finite float (numpy's and 0-d tensors' numbers included), else a SalienceError."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
    if not ok and hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        v, ok = v.item(), isinstance(v.item(), (int, float)) and not isinstance(v.item(), bool)
    if not ok or not math.isfinite(float(v)):
        raise SalienceError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise SalienceError(f"{what} must be a string, got {type(v).__name__} {v!r}")
    return v


def _check_plot(series: Any, ylim: Any, size: Any) -> tuple[dict[str, list[float]], float, float, int, int]:
    """The line plot's arguments checked: the series as lists of floats (NaN: a gap), ``ylim``, ``size``."""
    if not isinstance(series, Mapping):
        raise SalienceError(f"series must be a mapping {{name: values}}, got {type(series).__name__}")
    out: dict[str, list[float]] = {}
    for name, values in series.items():
        if isinstance(values, Iterator):  # a generator: its values, once
            values = list(values)
        try:
            vals = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
        except (TypeError, ValueError):
            raise SalienceError(f"series {name!r} must be a sequence of numbers, got {values!r:.80}") from None
        if vals.ndim != 1:
            raise SalienceError(f"series {name!r} must be one sequence of numbers (1-D), got shape {vals.shape}")
        out[str(name)] = [float(v) for v in vals]
    if not (isinstance(ylim, (tuple, list)) and len(ylim) == 2):
        raise SalienceError(f"ylim must be (low, high), got {ylim!r}")
    lo, hi = _finite(ylim[0], "ylim's low"), _finite(ylim[1], "ylim's high")
    if not hi > lo:
        raise SalienceError(f"ylim must be (low, high) with low < high, got {tuple(ylim)!r}")
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
            and _MIN_SIZE[0] <= size[0] <= _MAX_SIDE and _MIN_SIZE[1] <= size[1] <= _MAX_SIDE):
        raise SalienceError(f"size must be (width, height) in pixels, at least {_MIN_SIZE} and at most {_MAX_SIDE} "
                            f"a side, got {size!r}")
    return out, lo, hi, int(size[0]), int(size[1])


def _check_xticks(xticks: Any, series: Mapping[str, list[float]]) -> Optional[list[str]]:
    """``xticks`` as a list of labels, one per point of every series (``None`` or empty: none)."""
    if xticks is None:
        return None
    if isinstance(xticks, (str, bytes)):
        raise SalienceError(f"xticks must be a list of labels (one per point), not one string: {xticks!r:.60}")
    if not isinstance(xticks, Iterable):
        raise SalienceError(f"xticks must be a list of labels (one per point), got {type(xticks).__name__}")
    labels = [str(t.item() if getattr(t, "ndim", None) == 0 and hasattr(t, "item") else t) for t in xticks]
    for name, values in series.items() if labels else ():
        if len(values) != len(labels):
            raise SalienceError(f"xticks: {len(labels)} labels for series {name!r} of {len(values)} points; give "
                                "one label per point (an empty string for a point left unlabelled)")
    return labels or None


_MIN_SIZE = (240, 120)  # the margins (218 x 88 pixels) and a plot area
_MAX_SIDE = 10_000  # 100000 x 100000 asked for 30 GB


def line_plot(series: Mapping[str, Sequence[float]], *, title: str = "", xlabel: str = "",
              ylabel: str = "", xticks: Optional[Sequence[str]] = None, ylim: tuple[float, float] = (0.0, 1.0),
              size: tuple[int, int] = (520, 340)) -> np.ndarray:
    """A plain line plot as uint8 ``(H, W, 3)``, drawn with pillow (no matplotlib needed).

    Each series is plotted against evenly spaced x positions in ``[0, 1]``, or against
    ``xticks`` (one label per point) when given.
    """
    from PIL import Image, ImageDraw, ImageFont

    series, lo, hi, w, h = _check_plot(series, ylim, size)
    xticks = _check_xticks(xticks, series)
    title, xlabel, ylabel = _text(title, "title"), _text(xlabel, "xlabel"), _text(ylabel, "ylabel")
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    names = list(series)
    left, right, top = 48, 170, 26
    bottom = 62 if xticks else 42
    pw, ph = w - left - right, h - top - bottom
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
    """Pictures ``(H, W, 3)`` uint8 of the same height joined left to right."""
    if not plots:
        raise SalienceError("side_by_side needs at least one picture")
    for i, p in enumerate(plots):
        if not (isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.ndim == 3 and p.shape[-1] == 3):
            what = f"{type(p).__name__} of shape {getattr(p, 'shape', None)}, dtype {getattr(p, 'dtype', None)}"
            raise SalienceError(f"side_by_side joins uint8 RGB pictures (H, W, 3) such as line_plot's; picture "
                                f"{i} is a {what}")
    heights = [p.shape[0] for p in plots]
    if len(set(heights)) > 1:
        raise SalienceError(f"side_by_side joins pictures of one height, got heights {heights}; make them the "
                            "same height (e.g. line_plot(..., size=(w, h)) with one h)")
    return np.concatenate(plots, axis=1)
