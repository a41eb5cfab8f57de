"""Pure tensor -> tensor steps after the gradient: grad modifiers, channel reductions, scaling.

Nothing here sees a model. Grad modifiers keep the shape ``(B, C, H, W)``; channel
reductions turn ``(B, C, H, W)`` into a map ``(B, H, W)`` (or keep ``C`` for the
per-channel "colored" variant); :func:`normalize` is for the caller who wants ``[0, 1]``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from salience._core.errors import SalienceError
from salience._core.tensors import check_number, unit_scale

__all__ = [
    "GradModifier",
    "Reduction",
    "GRAD_MODIFIERS",
    "REDUCTIONS",
    "absolute",
    "negate",
    "small_values",
    "relu",
    "max_abs",
    "max_signed",
    "colored",
    "grayscale",
    "l2",
    "get_grad_modifier",
    "get_reduction",
    "normalize",
]

GradModifier = Callable[[Tensor], Tensor]
Reduction = Callable[[Tensor], Tensor]


def _check_tensor(grad: Any, what: str) -> None:
    """Refuse what is no gradient (a numpy array, a list: raw AttributeErrors; a bool tensor: torch's raw
    NotImplementedError for ``abs`` / ``-``)."""
    if not isinstance(grad, Tensor) or grad.dtype == torch.bool or grad.is_complex():
        got = f"a tensor of dtype {grad.dtype}" if isinstance(grad, Tensor) else type(grad).__name__
        raise SalienceError(f"{what} expects a real-valued torch.Tensor (a gradient or a map), got {got}"
                            + ("; convert it with torch.as_tensor" if not isinstance(grad, Tensor) else ""))


def absolute(grad: Tensor) -> Tensor:
    """``|g|``."""
    _check_tensor(grad, "absolute")
    return grad.abs()


def negate(grad: Tensor) -> Tensor:
    """``-g``: what *decreases* the score."""
    _check_tensor(grad, "negate")
    return -grad


def small_values(grad: Tensor) -> Tensor:
    """``|1/g|``, finite at zero: highlights the inputs the score is *least* sensitive to."""
    _check_tensor(grad, "small_values")
    eps = torch.finfo(grad.dtype).eps if grad.is_floating_point() else 1e-7
    return 1.0 / (grad.abs() + eps)


def relu(grad: Tensor) -> Tensor:
    """``max(g, 0)``: only what increases the score."""
    _check_tensor(grad, "relu")
    return grad.clamp(min=0)


GRAD_MODIFIERS: dict[str, Optional[GradModifier]] = {
    "absolute": absolute,
    "negate": negate,
    "small_values": small_values,
    "relu": relu,
    "none": None,
}


def get_grad_modifier(modifier: Union[None, str, GradModifier]) -> Optional[GradModifier]:
    """A grad modifier by keras-vis name (``"absolute"``, ``"negate"``, ``"small_values"``,
    ``"relu"``, ``"none"``) or a function ``(B, C, H, W) -> (B, C, H, W)``; ``None`` is none."""
    if modifier is None:
        return None
    if isinstance(modifier, str):
        try:
            return GRAD_MODIFIERS[modifier]
        except KeyError:
            raise SalienceError(
                f"unknown grad_modifier {modifier!r}; expected one of {', '.join(GRAD_MODIFIERS)} or a function"
            ) from None
    if callable(modifier):
        return modifier if modifier in GRAD_MODIFIERS.values() else _checked(modifier, "grad_modifier", True)
    raise SalienceError(f"grad_modifier must be a name or a function, got {type(modifier).__name__}")


def _checked(fn: Callable[[Tensor], Tensor], name: str, same_shape: bool) -> Callable[[Tensor], Tensor]:
    """A user's ``grad_modifier`` / ``reduce`` function whose result is checked: a tensor of the gradient's
    shape (a modifier), or ``(B, H, W)`` / ``(B, C', H, W)`` (a reduction). Without the check, ``None`` was a
    raw AttributeError, a scalar a raw IndexError (or SmoothGrad's map of shape ``()``)."""
    def call(grad: Tensor) -> Tensor:
        out = fn(grad)
        b, hw = grad.shape[0], tuple(grad.shape[-2:])
        fits = isinstance(out, Tensor) and (
            out.shape == grad.shape if same_shape else out.dim() in (3, 4) and out.shape[0] == b
            and tuple(out.shape[-2:]) == hw)
        if not fits:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            want = (f"{tuple(grad.shape)}, the gradient's shape" if same_shape
                    else f"(B, H, W) = {(b, *hw)} (or (B, C', H, W))")
            raise SalienceError(f"the {name} function must return a tensor of shape {want}; got {got}")
        return out
    return call


def _check4(g: Tensor) -> None:
    _check_tensor(g, "a channel reduction")
    if g.dim() != 4:
        raise SalienceError(f"channel reductions expect (B, C, H, W), got shape {tuple(g.shape)}")


def max_abs(grad: Tensor) -> Tensor:
    """``max_c |g|``: Simonyan et al.'s map, ``(B, C, H, W) -> (B, H, W)``."""
    _check4(grad)
    return grad.abs().amax(dim=1)


def max_signed(grad: Tensor) -> Tensor:
    """``max_c g`` without the absolute value (keras-vis's reduction after its modifier)."""
    _check4(grad)
    return grad.amax(dim=1)


def colored(grad: Tensor) -> Tensor:
    """``|g|`` per channel ("colored" saliency), ``(B, C, H, W)`` kept."""
    _check4(grad)
    return grad.abs()


def grayscale(grad: Tensor) -> Tensor:
    """``sum_c |g|``, ``(B, H, W)``."""
    _check4(grad)
    return grad.abs().sum(dim=1)


def l2(grad: Tensor) -> Tensor:
    """``sqrt(sum_c g^2)``, ``(B, H, W)``."""
    _check4(grad)
    return grad.pow(2).sum(dim=1).sqrt()


REDUCTIONS: dict[str, Reduction] = {
    "max_abs": max_abs,
    "max": max_signed,
    "colored": colored,
    "abs": colored,
    "grayscale": grayscale,
    "sum_abs": grayscale,
    "l2": l2,
}


def get_reduction(reduce: Union[None, str, Reduction]) -> Optional[Reduction]:
    """A channel reduction by name (``"max_abs"``, ``"max"``, ``"colored"``, ``"grayscale"``,
    ``"l2"``) or a function; ``None`` keeps the raw signed ``(B, C, H, W)``."""
    if reduce is None:
        return None
    if isinstance(reduce, str):
        try:
            return REDUCTIONS[reduce]
        except KeyError:
            raise SalienceError(
                f"unknown reduce {reduce!r}; expected None (raw gradient), one of {', '.join(REDUCTIONS)}, or a function"
            ) from None
    if callable(reduce):
        return reduce if reduce in REDUCTIONS.values() else _checked(reduce, "reduce", False)
    raise SalienceError(f"reduce must be None, a name or a function, got {type(reduce).__name__}")


_OWN = frozenset(f for f in (*GRAD_MODIFIERS.values(), *REDUCTIONS.values()) if f is not None)


def own(fn: Optional[Callable[[Tensor], Tensor]]) -> bool:
    """Whether ``fn`` (a :func:`get_grad_modifier` or :func:`get_reduction` result) is none or one of salience's own
    (:data:`GRAD_MODIFIERS`, :data:`REDUCTIONS`), whose result is a new tensor, never one the user holds."""
    return fn is None or fn in _OWN


def apply(grad: Tensor, grad_modifier: Union[None, str, GradModifier], reduce: Union[None, str, Reduction]) -> Tensor:
    """Grad modifier, then channel reduction: the tail every method shares."""
    mod = get_grad_modifier(grad_modifier)
    red = get_reduction(reduce)
    if mod is not None:
        grad = mod(grad)
    return red(grad) if red is not None else grad


def normalize(m: Tensor, *, mode: str = "minmax", percentile: float = 99.0, eps: float = 0.0) -> Tensor:
    """Scale each sample's map to ``[0, 1]``: ``"minmax"`` or ``"percentile"`` (clip the values above
    the given percentile first, so a few pixels don't wash the map out). Shape is kept; dim 0 is the batch.

    A mostly-constant map whose percentile equals its minimum (zero but for a few salient pixels) is
    scaled by its max instead, so those pixels still show; a constant map is 0. ``eps`` (a finite number
    ``>= 0``) floors each map's span (0: any nonzero span is stretched to ``[0, 1]``, whatever its scale).
    Floating maps keep their dtype (half and bfloat16 are computed in float32); other maps come back as
    float32. An empty map (no images, or no pixels) comes back empty; a map with NaN or infinite values is
    refused (one such pixel made the whole map NaN). The same numbers as ``viz.scale(m, mode, signed=False)``:
    both are :func:`salience._core.tensors.unit_scale`."""
    if mode not in ("minmax", "percentile"):
        raise SalienceError(f"normalize mode must be 'minmax' or 'percentile', got {mode!r}")
    if mode == "percentile":
        p = check_number(percentile, "percentile", what="in (0, 100]")
        if not 0 < p <= 100:
            raise SalienceError(f"percentile must be in (0, 100], got {percentile}")
    eps = check_number(eps, "eps", minimum=0, what="the smallest span a map is stretched by")
    _check_map(m)
    if m.numel() == 0:
        return (m if m.is_floating_point() else m.float()).clone()
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    out = unit_scale(work, percentile if mode == "percentile" else None, eps)
    return out.to(m.dtype) if m.is_floating_point() else out


def _check_map(m: Any) -> None:
    """:func:`normalize`'s map: a real tensor with a batch dimension and finite values."""
    if not (isinstance(m, Tensor) and m.dtype == torch.bool):  # a bool mask is a map of 0 and 1
        _check_tensor(m, "normalize")
    if m.dim() == 0:
        raise SalienceError("normalize scales each map of a batch: expected a tensor (B, ...), got a 0-d tensor; "
                            "give maps with their batch dimension, e.g. m.view(1, 1)")
    if m.is_meta:
        raise SalienceError("normalize: the map is on the meta device (a shape without values); give a map with values")
    if m.is_floating_point() and m.numel():
        bad = ~torch.isfinite(m)
        if bool(bad.any()):
            images = sorted(set(bad.reshape(m.shape[0], -1).any(1).nonzero().flatten().tolist()))
            raise SalienceError(f"normalize: the map holds {int(bad.sum())} NaN or infinite value(s) (image(s) "
                                f"{images[:5]}); replace them first, e.g. torch.nan_to_num(m, nan=0.0)")
