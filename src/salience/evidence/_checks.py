"""What the metric families share: the checks of maps and masks, the method lookup and the
fixed-radius Gaussian kernel. Private to :mod:`salience.evidence`."""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch import Tensor

from salience._core.errors import SalienceError
from salience.methods import METHODS, QUICK

MethodLike = Union[str, Callable[..., Tensor]]


def check_maps(maps: Tensor, name: str = "maps") -> Tensor:
    """``maps`` as a finite floating ``(B, H, W)`` tensor (a ``(B, 1, H, W)`` one is squeezed)."""
    if not isinstance(maps, Tensor):
        raise SalienceError(f"expected {name} as a torch.Tensor of shape (B, H, W), got {type(maps).__name__}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        hint = "; reduce the channels first, e.g. salience.reduce.max_abs(maps)" if maps.dim() == 4 else ""
        raise SalienceError(f"expected {name} of shape (B, H, W), got shape {tuple(maps.shape)}{hint}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise SalienceError(f"{name} contain NaN or infinite values; a saliency map must be finite")
    return maps


def check_masks(masks: Tensor, maps: Tensor) -> Tensor:
    """``masks`` as boolean ``(B, H, W)`` on the maps' device, one per map and of its size."""
    if not isinstance(masks, Tensor):
        raise SalienceError(f"expected masks as a boolean torch.Tensor (B, H, W), got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != maps.shape:
        raise SalienceError(
            f"masks of shape {tuple(masks.shape)} do not match maps of shape {tuple(maps.shape)}; give one "
            "(H, W) mask per map, at the map's size (resize the maps with F.interpolate or the masks with "
            "nearest-neighbour interpolation)"
        )
    if masks.dtype != torch.bool:
        if masks.is_floating_point() and not bool(((masks == 0) | (masks == 1)).all()):
            raise SalienceError("masks must be boolean (or 0/1 values); threshold them first, e.g. masks > 0.5")
        masks = masks != 0
    return masks.to(maps.device)


def resolve_method(method: MethodLike) -> tuple[str, Callable[..., Tensor]]:
    """A method given by name (a key of :data:`salience.methods.METHODS`, with its
    :data:`~salience.methods.QUICK` options) or as a function, as ``(name, function)``."""
    if isinstance(method, str):
        if method not in METHODS:
            raise SalienceError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        fn = METHODS[method]
        quick = QUICK.get(method)  # the many-pass methods' cheaper options for reports (methods.QUICK)
        return method, (functools.partial(fn, **quick) if quick else fn)
    if callable(method):
        return getattr(method, "__name__", "method"), method
    raise SalienceError(f"expected a method as a name or a function, got {type(method).__name__}")

