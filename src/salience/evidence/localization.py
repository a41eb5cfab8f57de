"""Localization against ground-truth masks ``(B, H, W)`` (bool), one value per image.

* :func:`pointing_game`: is the map's maximum inside the object (Zhang et al., 2016; with an
  optional tolerance radius in pixels)? Ties among maxima count proportionally, so a constant
  map scores the mask's area fraction, i.e. chance.
* :func:`energy_in_mask`: the share of the map's (non-negative) mass that falls inside the mask.
* :func:`weak_localization`: the IoU between the box of the thresholded map (its largest
  connected component, as in Simonyan et al. 2014, section 6, without the GraphCut step) and
  the box of the mask; :func:`saliency_box`, :func:`mask_box`, :func:`box_iou` are its parts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from salience._core.errors import SalienceError
from salience._core.tensors import check_number, check_flag
from salience.evidence._checks import check_maps, check_masks, scaled_magnitudes

__all__ = ["pointing_game", "energy_in_mask", "mask_box", "saliency_box", "box_iou", "weak_localization"]


def _disc(radius: float, device: torch.device) -> Tensor:
    r = int(math.floor(radius))
    ax = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    return ((ax[:, None] ** 2 + ax[None, :] ** 2) <= radius * radius).float()


def _dilate(masks: Tensor, radius: float) -> Tensor:
    """Dilate boolean masks ``(B, H, W)`` by a disc of ``radius`` pixels (Euclidean)."""
    if radius <= 0:
        return masks
    k = _disc(radius, masks.device)
    r = k.shape[-1] // 2
    out = F.conv2d(masks[:, None].float(), k[None, None], padding=r)
    return out[:, 0] > 0.5



def pointing_game(maps: Tensor, masks: Tensor, *, tolerance: float = 0.0) -> Tensor:
    """Pointing game (Zhang et al., 2016): is each map's maximum on the object?

    ``maps`` ``(B, H, W)``, ``masks`` ``(B, H, W)`` bool. A hit is a maximum within
    ``tolerance`` pixels of the mask (Zhang et al. use 15 px at 224 px). When several pixels tie
    for the maximum, the result is the fraction of them that hit, so a constant map scores the
    (dilated) mask's area fraction. Returns floats ``(B,)`` in ``[0, 1]``; ``NaN`` where the
    mask is empty (no object: leave those images out of the mean, e.g. ``torch.nanmean``).
    """
    maps = check_maps(maps)
    masks = check_masks(masks, maps)
    hit_zone = _dilate(masks, check_number(tolerance, "tolerance", minimum=0, what="pixels around the mask"))
    flat = maps.flatten(1)
    is_max = flat == flat.amax(dim=1, keepdim=True)
    hits = (is_max & hit_zone.reshape(flat.shape)).sum(1).float() / is_max.sum(1).float()
    empty = ~masks.reshape(flat.shape).any(1)
    return torch.where(empty, torch.full_like(hits, float("nan")), hits)


def energy_in_mask(maps: Tensor, masks: Tensor, *, absolute: bool = False) -> Tensor:
    """The share of each map's mass inside its mask: ``sum(m * mask) / sum(m)``, ``(B,)``.

    Negative values are set to zero first (only evidence *for* the target counts), or, with
    ``absolute=True``, replaced by their magnitude. A map equal to the mask gives 1; a map
    independent of the mask gives, on average, the mask's area fraction. ``NaN`` where a map
    has no mass (all zero) or the mask is empty.
    """
    absolute = check_flag(absolute, "absolute")
    maps = check_maps(maps)
    masks = check_masks(masks, maps)
    # scaled by each map's largest value (a ratio, the same): the sum of a float32 map of 1e37 over 64
    # pixels overflowed to inf and scored 0, a float64 one of 1e307 NaN
    m = scaled_magnitudes(maps if absolute else maps.clamp(min=0))
    total = m.sum((1, 2))
    inside = (m * masks).sum((1, 2))
    out = inside / total.clamp_min(torch.finfo(m.dtype).tiny)
    bad = (total <= 0) | ~masks.any(2).any(1)
    return torch.where(bad, torch.full_like(out, float("nan")), out).to(maps.dtype)


def mask_box(masks: Tensor) -> Tensor:
    """The bounding box of each boolean mask ``(B, H, W)`` (or ``(B, 1, H, W)``, as the other
    metrics take them) as ``(x0, y0, x1, y1)`` pixel edges.

    Edges, not centres: a single pixel ``(r, c)`` has the box ``(c, r, c + 1, r + 1)``.
    Empty masks give NaN boxes. Returns float ``(B, 4)``.
    """
    if not isinstance(masks, Tensor):
        raise SalienceError(f"expected masks as a torch.Tensor (B, H, W), got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise SalienceError(f"expected masks of shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    masks = masks != 0 if masks.dtype != torch.bool else masks
    b, h, w = masks.shape
    rows = masks.any(2)
    cols = masks.any(1)
    ar_h = torch.arange(h, device=masks.device, dtype=torch.float32)
    ar_w = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1.0).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1.0).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1)
    empty = ~rows.any(1)
    return torch.where(empty[:, None], torch.full_like(boxes, float("nan")), boxes)


def _largest_component(fg: Tensor) -> Tensor:
    """The largest 8-connected component of each boolean image ``(B, H, W)``.

    Label propagation: every foreground pixel starts with its own index and repeatedly takes
    the largest index among its foreground neighbours until nothing changes.
    """
    b, h, w = fg.shape
    idx = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).reshape(1, h, w).expand(b, h, w)
    lab = torch.where(fg, idx, torch.zeros_like(idx))
    for _ in range(h * w):
        new = F.max_pool2d(lab[:, None], 3, stride=1, padding=1)[:, 0]
        new = torch.where(fg, new, torch.zeros_like(new))
        if torch.equal(new, lab):
            break
        lab = new
    flat = lab.flatten(1).long()
    counts = torch.zeros(b, h * w + 1, device=fg.device, dtype=torch.long)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    counts[:, 0] = 0
    best = counts.argmax(1)
    return (lab == best[:, None, None].float()) & fg


def saliency_box(maps: Tensor, *, threshold: float = 0.2, largest: bool = True) -> Tensor:
    """The box ``(x0, y0, x1, y1)`` ``(B, 4)`` around the map's salient region.

    The region is where the map is at least ``threshold`` times its maximum (after clipping
    negative values), reduced to its largest connected component when ``largest``. The default
    ``0.2`` is the CAM convention (Zhou et al. 2016). A map without positive values gives a
    NaN box.
    """
    largest = check_flag(largest, "largest")
    maps = check_maps(maps)
    threshold = check_number(threshold, "threshold", what="a fraction of each map's maximum, in (0, 1]")
    if not 0 < threshold <= 1:
        raise SalienceError(f"threshold is a fraction of each map's maximum, in (0, 1]; got {threshold}")
    m = maps.clamp(min=0)
    top = m.amax((1, 2), keepdim=True)
    fg = (m >= threshold * top) & (top > 0)
    if largest:
        fg = _largest_component(fg)
    return mask_box(fg)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of boxes ``(B, 4)`` ``(x0, y0, x1, y1)``, row by row: ``(B,)``."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise SalienceError(f"expected two (B, 4) tensors of boxes (x0, y0, x1, y1); got {type(a).__name__} and "
                            f"{type(b).__name__}")
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] != 4:
        raise SalienceError(
            f"expected two (B, 4) tensors of boxes (x0, y0, x1, y1); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.float(), b.float()
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


def weak_localization(maps: Tensor, masks: Tensor, *, threshold: float = 0.2, largest: bool = True) -> Tensor:
    """Weakly supervised localization (Simonyan et al. 2014, sec. 6): IoU ``(B,)`` between the
    box of the thresholded map (:func:`saliency_box`) and the mask's box. NaN for empty masks;
    0 for maps without positive values."""
    largest = check_flag(largest, "largest")
    maps = check_maps(maps)
    masks = check_masks(masks, maps)
    iou = box_iou(saliency_box(maps, threshold=threshold, largest=largest), mask_box(masks))
    no_map = maps.clamp(min=0).amax((1, 2)) <= 0
    iou = torch.where(no_map, torch.zeros_like(iou), iou)
    empty = ~masks.any(2).any(1)
    return torch.where(empty, torch.full_like(iou, float("nan")), iou)
