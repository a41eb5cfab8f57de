"""The one home of small tensor and argument helpers that several layers need.

Gaussian blur, the maps' bilinear upsampling, per-sample scaling to ``[0, 1]``, the device and dtype of a model, and the checks
of integer and number arguments (one message shape for every option of every method), of a baseline tensor, and a
fresh seed.
"""
from __future__ import annotations

import math
import numbers
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.errors import SalienceError

__all__ = ["autocast_off", "gaussian_blur", "gaussian_kernel1d", "upsample_bilinear", "minmax", "unit_scale", "first_tensor", "model_device", "model_dtype", "check_int", "MAX_INPUT_PIXELS", "check_input_pixels", "count_text", "check_number", "check_fits", "check_flag", "check_optional_flag", "check_finite_tensor", "baseline_tensor", "fresh_seed"]


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextmanager
def autocast_off() -> Iterator[None]:
    """Turn off an autocast the caller entered (a ``with torch.autocast(...)`` around a method call),
    in this thread, for the block: salience computes in the precision of its own ``precision=``
    option (fp32 unless asked; :mod:`salience._core.perf` enters its autocast inside). Under the
    caller's, maps came back in bfloat16 from some methods and float32 from others, a blurred
    baseline in bfloat16 was refused as an input of the wrong dtype, and Score-CAM failed with a raw
    dtype error. Nothing is entered where no autocast is on."""
    with ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            try:
                on = torch.is_autocast_enabled(device)
            except RuntimeError:  # a device type this build does not know
                continue
            if on:
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Each channel of ``x`` ``(B, C, H, W)`` smoothed by a Gaussian of ``sigma`` pixels.

    Separable, reflect padding, kernel cut at 3 sigma and, per axis, at that axis's size (reflect
    padding needs a radius below the side): a short side does not shorten the other axis's kernel,
    and a one-pixel side is left as it is while the other axis is blurred (a 1 x W image is blurred
    along its width). ``sigma <= 0`` (or one ``x``'s dtype rounds to 0), or a 1 x 1 image: a copy of ``x``.
    """
    # the radius is cut at the sides anyway: a huge finite sigma (3 * 1e308 is inf) was a raw OverflowError, and a
    # sigma that x's dtype rounds to 0 (1e-300 in float32) a NaN kernel (0 / 0 at its centre) where it is no blur
    tiny = torch.finfo(x.dtype).tiny if x.dtype.is_floating_point else 0.0
    full = int(math.ceil(3 * min(sigma, max(x.shape[-2:])))) if sigma > 0 and sigma >= tiny else 0
    rw, rh = min(full, x.shape[-1] - 1), min(full, x.shape[-2] - 1)
    if rw < 1 and rh < 1:
        return x.clone()
    c = x.shape[1]
    y = x
    with autocast_off():  # in x's dtype
        if rw >= 1:
            k = gaussian_kernel1d(sigma, rw, x.device, x.dtype)
            y = F.pad(y, (rw, rw, 0, 0), mode="reflect")
            y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        if rh >= 1:
            k = gaussian_kernel1d(sigma, rh, x.device, x.dtype)
            y = F.pad(y, (0, 0, rh, rh), mode="reflect")
            y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return y


def gaussian_kernel1d(sigma: float, radius: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A normalized 1-D Gaussian of ``sigma`` with exactly ``2 * radius + 1`` taps: the kernel of
    :func:`gaussian_blur`, and of the filters whose size is part of their definition (the SSIM
    window, the 5-tap blur of the spectral residual)."""
    ax = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (ax / sigma) ** 2)
    return k / k.sum()


def upsample_bilinear(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Maps ``(B, h, w)`` -> ``(B, H, W)`` for ``size`` ``(H, W)`` by bilinear interpolation, ``align_corners=False``
    (the CAMs' and attention rollout's upsampling to the input); ``m`` itself where it has that size already."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def minmax(m: Tensor, eps: float = 1e-12) -> Tensor:
    """Each sample of ``m`` ``(B, ...)`` scaled to ``[0, 1]`` by its own min and max (the span
    floored at ``eps``); a constant map is 0. :func:`unit_scale` without a percentile."""
    return unit_scale(m, eps=eps)


def unit_scale(m: Tensor, percentile: Optional[float] = None, eps: float = 0.0) -> Tensor:
    """Each sample of ``m`` ``(B, ...)`` scaled to ``[0, 1]`` for display, in ``m``'s (floating) dtype.

    Min-max; with ``percentile`` (in ``(0, 100]``) the values above that percentile of the sample
    are clipped first, so a few extreme pixels do not wash the rest out. A sample whose percentile
    equals its minimum (mostly constant, e.g. zero but for a few salient pixels) falls back to its
    max, so those pixels still show. A constant sample is 0. The span ``top - min`` is floored at
    ``eps``; 0 stretches any nonzero span to ``[0, 1]`` whatever its scale. The percentile is
    ``numpy.percentile``'s (linear between order statistics; in float64 the same to the last bit),
    without ``torch.quantile``'s limit on the input size.
    The one implementation behind ``salience.reduce.normalize`` and ``salience.render.viz.scale``.
    """
    flat = m.reshape(m.shape[0], -1)
    lo = flat.amin(1, keepdim=True)
    top = flat.amax(1, keepdim=True)
    hi = top
    if percentile is not None:
        # numpy.percentile's default ("linear"), with its rounding: rank (n - 1) q, lerp between neighbours.
        n = flat.shape[1]
        rank = (n - 1) * (percentile / 100.0)
        below = int(math.floor(rank))
        above, t = min(below + 1, n - 1), rank - below
        if n - below <= n // 4:  # the top values only (partial selection, not a whole sort): the same values
            s = flat.topk(n - below, dim=1).values  # descending, NaN first as sort puts it last
            a, b = s[:, -1:], s[:, -2:-1] if above > below else s[:, -1:]
        else:
            s = flat.sort(dim=1).values
            a, b = s[:, below:below + 1], s[:, above:above + 1]
        hi = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
        hi = torch.where(hi > lo, hi, top)  # mostly constant: fall back to the max
    span = hi - lo
    return ((torch.minimum(flat, hi) - lo) / torch.where(span > 0, span.clamp_min(eps), 1.0)).reshape(m.shape)


def first_tensor(model: nn.Module) -> Optional[Tensor]:
    """The model's first parameter, else its first buffer, else ``None``."""
    p = next(model.parameters(), None)
    return p if p is not None else next(model.buffers(), None)


def copy_model(model: nn.Module, share: Any = ()) -> nn.Module:
    """``copy.deepcopy(model)``, also for a ``torch.export`` program's module (``.pt2``): its graphs'
    nodes keep fake tensors in ``node.meta``, which cannot be deep-copied ("Cannot call numel() on
    tensor with symbolic sizes"). Those metadata dicts are shared with the copy (read-only notes of
    the export), everything else is copied. An instance ``forward`` that a salience pass of another thread holds
    on a module at that moment (attention rollout's ``nn.MultiheadAttention``, marked ``salience_thread``) is left
    out of the copy: it records into that pass's capture, and a copy kept for the process (``fold_batchnorm``'s)
    ran the pass's thread's later passes through it. ``share``: tensors (parameters, buffers) the copy holds as they
    are, not copied (the low-precision folded copy replaces each of them afterwards: :mod:`salience._core.folding`)."""
    import copy

    memo: dict[int, Any] = {id(t): t for t in share}
    passes = []  # held for the copy: an id in the memo is not reused
    for m in model.modules():
        graph = getattr(m, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                memo[id(node.meta)] = node.meta
        f = m.__dict__.get("forward")
        if _pass_forward(f):
            passes.append(f)
            memo[id(f)] = _LEFT_OUT  # not copied (nor the capture it holds)
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        f = m.__dict__.get("forward")
        if f is _LEFT_OUT or _pass_forward(f):  # the second: set meanwhile
            del m.__dict__["forward"]
    return clone


_LEFT_OUT = object()


def _pass_forward(f: Any) -> bool:
    """``f`` (a module's instance ``forward``) is a salience pass's (``salience_thread``, a thread id), not a user's
    (a ``Mock``'s attributes are all there, none an int)."""
    return f is not None and type(getattr(f, "salience_thread", None)) is int


def model_device(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter's (or buffer's) device; CPU for a model with neither."""
    p = first_tensor(model)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter's); float32 by default."""
    p = first_tensor(model)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


MAX_INPUT_PIXELS = 50_000_000
"""The most pixels (H x W) of a model's input size, and of the square of a ``resize``'s shorter side: the 50 megapixels
an image file may have by default (``salience.loading.DEFAULT_MAX_PIXELS``) (600 MB as float32 RGB). ``size=1e300`` or ``10**9`` was taken until the resize, which
failed with torch's "Overflow when unpacking long long" or an allocation of terabytes."""


def check_input_pixels(sides: Sequence[int], name: str, *, resize: bool = False) -> None:
    """A :class:`SalienceError` where an input size ``sides`` ``(H, W)`` (``resize``: one shorter side, at least its
    square resized) has more than :data:`MAX_INPUT_PIXELS` pixels; ``name``: the option or flag as the user gave it."""
    h, w = (sides[0], sides[0]) if check_flag(resize, "resize") else (sides[0], sides[-1])
    if h * w <= MAX_INPUT_PIXELS:
        return
    said = f"{name} {count_text(h)} makes images of at least {count_text(h)}x{count_text(h)} =" if resize else \
        f"{name} {count_text(h)}x{count_text(w)} is"
    raise SalienceError(f"{said} {count_text(h * w)} pixels, more than the {MAX_INPUT_PIXELS:,} a model's input may have "
                        f"here (an image file's default limit; {count_text(h * w * 12)} bytes as float32 RGB); give the "
                        "model's input size, e.g. 224")


def count_text(n: int) -> str:
    """``n`` with thousands separators, or as ``1e+300`` past a trillion (``over 1e+308`` past floats: the messages
    go on "..., more than the 50,000,000", which "more than 1e+308" doubled)."""
    return f"{n:,}" if n < 10 ** 12 else f"{float(n):.3g}" if n < 10 ** 308 else "over 1e+308"


def check_int(value: Any, name: str, *, minimum: Optional[int] = 0, what: str = "") -> int:
    """``value`` as an int ``>= minimum`` (any int with ``minimum=None``), or a
    :class:`SalienceError` naming the option. Bools are refused (``True`` is not a count); numpy
    integers are accepted.
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        bound = f" >= {minimum}" if minimum is not None else ""
        hint = f" ({what})" if what else ""
        raise SalienceError(f"{name} must be an int{bound}{hint}, got {value!r}")
    return int(value)


def is_numpy_bool(value: Any) -> bool:
    """Whether ``value`` is numpy's bool (numpy not imported for it; ``numpy.bool_`` is named "bool" since numpy 2)."""
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool (``True`` / ``False``, numpy's included), or a :class:`SalienceError`
    naming the option: a string such as ``"no"`` or ``"false"`` is truthy, so taking it silently
    would do the opposite of what was meant."""
    if isinstance(value, bool) or is_numpy_bool(value):
        return bool(value)
    raise SalienceError(f"{name} must be True or False, got {value!r}")


def check_optional_flag(value: Any, name: str) -> Optional[bool]:
    """:func:`check_flag` for an option where ``None`` means "decide from the data"."""
    return None if value is None else check_flag(value, name)


def check_number(value: Any, name: str, *, minimum: Optional[float] = None, what: str = "",
                 finite: bool = True) -> float:
    """``value`` as a real number (``>= minimum`` when given), or a :class:`SalienceError` naming the option."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        try:
            v = float(value)
        except OverflowError:  # an int past float's range, 10**400: was the raw OverflowError
            v = math.inf
        ok = not math.isnan(v) and (not finite or math.isfinite(v)) and (minimum is None or v >= minimum)
    if not ok:
        bound = f" >= {minimum:g}" if minimum is not None else ""
        kind = "a finite number" if finite else "a number"
        hint = f" ({what})" if what else ""
        raise SalienceError(f"{name} must be {kind}{bound}{hint}, got {value!r}")
    return v


def check_fits(value: float, dtype: torch.dtype, name: str) -> float:
    """``value``, or a :class:`SalienceError` where a tensor of ``dtype`` cannot hold it: a baseline of ``1e308``
    for float32 images was torch's raw ``RuntimeError: value cannot be converted to type float without overflow``
    where it was filled in (session 55)."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    if abs(value) > top:
        raise SalienceError(f"{name}={value!r} does not fit the images' dtype {dtype} (at most {top:.4g} in size); "
                            "give a value within it")
    return value


def check_finite_tensor(t: Tensor, name: str) -> Tensor:
    """``t``, or a :class:`SalienceError` counting its NaN or infinite values (a baseline given as a
    tensor: a NaN pixel there made a NaN map silently). One host-device synchronization."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise SalienceError(f"{name} contains {int(bad.sum())} NaN or infinite value(s); give finite values "
                            "(e.g. torch.nan_to_num)")
    return t


def baseline_tensor(baseline: Tensor, x: Tensor, name: str = "baseline") -> Tensor:
    """``baseline`` (a tensor given for ``x``) detached, in ``x``'s device and dtype, expanded to ``x``'s shape (a
    view), or a :class:`SalienceError`: a shape that does not broadcast to ``x`` (the message names the shapes
    that fit), or NaN / infinite values (:func:`check_finite_tensor`, after the cast; a finite float64 1e300, inf in
    float32, is said to be too large for ``x``'s dtype). The one check of integrated gradients' and occlusion's ``baseline=``."""
    bl = baseline.detach().to(device=x.device, dtype=x.dtype)
    try:  # a per-channel mean (C, 1, 1), one number as a 0-d tensor, a (1, C, H, W) for every image
        fits = torch.broadcast_shapes(bl.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        rest = ", ".join(map(str, x.shape[1:]))
        raise SalienceError(
            f"{name} of shape {tuple(bl.shape)} does not broadcast to x of shape {tuple(x.shape)}; give a tensor "
            f"that does: {tuple(x.shape)}, (1, {rest}), ({rest}) or a per-channel ({x.shape[1]}, 1, 1)")
    try:
        return check_finite_tensor(bl, name).expand_as(x)
    except SalienceError:
        given = baseline.detach()
        if given.dtype == bl.dtype or not bool(torch.isfinite(given).all()):
            raise
        raise SalienceError(  # finite as given: "contains NaN or infinite values" would be untrue
            f"{name} has values too large for x's dtype {x.dtype} (its largest magnitude "
            f"{float(given.abs().max()):.3g}; {x.dtype}'s is {torch.finfo(x.dtype).max:.3g}): they become infinite "
            "in it; scale the baseline (and x) down, or explain x in a wider dtype") from None


def fresh_seed() -> int:
    """A non-deterministic seed (SmoothGrad's and RISE's ``seed=None``), from a private generator: ``torch.seed()``
    re-seeded the caller's global RNG, so ``seed=None`` took away the reproducibility of everything the caller drew
    after."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(torch.Generator().seed())))
