"""Evidence about saliency maps: sanity checks, faithfulness and localization metrics.

Every function here returns *per-image* values (a tensor ``(B,)``, or a small result object
for the randomization tests), so a caller can average, plot or test them as it likes.

Localization against ground-truth masks ``(B, H, W)`` (bool):

* :func:`pointing_game`: is the map's maximum inside the object (Zhang et al., 2016; with an
  optional tolerance radius in pixels)? Ties among maxima count proportionally, so a constant
  map scores the mask's area fraction, i.e. chance.
* :func:`energy_in_mask`: the share of the map's (non-negative) mass that falls inside the mask.
* :func:`weak_localization`: the IoU between the box of the thresholded map (its largest
  connected component, as in Simonyan et al. 2014, section 6, without the GraphCut step) and
  the box of the mask; :func:`saliency_box`, :func:`mask_box`, :func:`box_iou` are its parts.

Faithfulness (Petsiuk et al., RISE, 2018): :func:`deletion` / :func:`insertion` remove / add
pixels in the order of the map and return the area under the target's probability curve
(:func:`deletion_curves` / :func:`insertion_curves` give the curves). All steps of all images are
evaluated in batches of ``batch_size`` images, never one model call per step and image.

Sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", 2018): :func:`randomization`
re-initializes the model's layers top-down (``"cascading"``) or one at a time
(``"independent"``) on a *copy* of the model, and :func:`data_randomization` compares the maps of
models trained on true and on shuffled labels. Both report Spearman rank correlation of absolute
and signed maps, SSIM, and the Pearson correlation of HOG features (:func:`similarity`).

Baselines that do not look at the model: :func:`spectral_residual` (Hou and Zhang, 2007) and
:func:`random_maps`. A method that does not beat them at localization says little about the
model.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import looks_like_probabilities, unwrap_output, check_input
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.layers import resolve_layer
from salience.targets import Classes, MultiLabel, Predicted, Target, TargetLike, as_target

__all__ = [
    "pointing_game",
    "energy_in_mask",
    "mask_box",
    "saliency_box",
    "box_iou",
    "weak_localization",
    "deletion",
    "insertion",
    "deletion_curves",
    "insertion_curves",
    "auc",
    "spearman",
    "ssim",
    "hog_similarity",
    "similarity",
    "SIMILARITIES",
    "RandomizationResult",
    "randomization",
    "randomization_layers",
    "data_randomization",
    "spectral_residual",
    "random_maps",
]

MethodLike = Union[str, Callable[..., Tensor]]


# ----------------------------------------------------------------------------- validation


def _check_maps(maps: Tensor, name: str = "maps") -> Tensor:
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


def _check_masks(masks: Tensor, maps: Tensor) -> Tensor:
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


# ----------------------------------------------------------------------------- localization


def pointing_game(maps: Tensor, masks: Tensor, *, tolerance: float = 0.0) -> Tensor:
    """Pointing game (Zhang et al., 2016): is each map's maximum on the object?

    ``maps`` ``(B, H, W)``, ``masks`` ``(B, H, W)`` bool. A hit is a maximum within
    ``tolerance`` pixels of the mask (Zhang et al. use 15 px at 224 px). When several pixels tie
    for the maximum, the result is the fraction of them that hit, so a constant map scores the
    (dilated) mask's area fraction. Returns floats ``(B,)`` in ``[0, 1]``; ``NaN`` where the
    mask is empty (no object: leave those images out of the mean, e.g. ``torch.nanmean``).
    """
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    hit_zone = _dilate(masks, float(tolerance))
    flat = maps.reshape(maps.shape[0], -1)
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
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    m = maps.abs() if absolute else maps.clamp(min=0)
    total = m.sum((1, 2))
    inside = (m * masks).sum((1, 2))
    out = inside / total.clamp_min(torch.finfo(m.dtype).tiny)
    bad = (total <= 0) | ~masks.any(2).any(1)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def mask_box(masks: Tensor) -> Tensor:
    """The bounding box of each boolean mask ``(B, H, W)`` as ``(x0, y0, x1, y1)`` pixel edges.

    Edges, not centres: a single pixel ``(r, c)`` has the box ``(c, r, c + 1, r + 1)``.
    Empty masks give NaN boxes. Returns float ``(B, 4)``.
    """
    if masks.dim() != 3:
        raise SalienceError(f"expected masks of shape (B, H, W), got {tuple(masks.shape)}")
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
    flat = lab.reshape(b, -1).long()
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
    maps = _check_maps(maps)
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
    maps = _check_maps(maps)
    masks = _check_masks(masks, maps)
    iou = box_iou(saliency_box(maps, threshold=threshold, largest=largest), mask_box(masks))
    no_map = maps.clamp(min=0).amax((1, 2)) <= 0
    iou = torch.where(no_map, torch.zeros_like(iou), iou)
    empty = ~masks.any(2).any(1)
    return torch.where(empty, torch.full_like(iou, float("nan")), iou)


# ----------------------------------------------------------------------------- deletion / insertion


def _gaussian_kernel1d(sigma: float, radius: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    ax = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (ax / sigma) ** 2)
    return k / k.sum()


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with reflect padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    k = _gaussian_kernel1d(sigma, radius, x.device, x.dtype)
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


SubstrateLike = Union[str, float, Tensor]


def _substrate(x: Tensor, substrate: SubstrateLike, blur_sigma: float) -> Tensor:
    """The image that replaces removed pixels: ``"zero"``, ``"blur"``, ``"mean"``, a number, or a tensor."""
    if isinstance(substrate, Tensor):
        try:
            return torch.broadcast_to(substrate.to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise SalienceError(
                f"a substrate tensor must broadcast to x's shape {tuple(x.shape)}, got {tuple(substrate.shape)}"
            ) from None
    if isinstance(substrate, (int, float)) and not isinstance(substrate, bool):
        return torch.full_like(x, float(substrate))
    if substrate == "zero":
        return torch.zeros_like(x)
    if substrate == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if substrate == "blur":
        return _blur(x, blur_sigma)
    raise SalienceError(
        f"unknown substrate {substrate!r}; expected 'zero', 'blur', 'mean', a number or a tensor like x"
    )


def _order(maps: Tensor, seed: int) -> Tensor:
    """Rank of each pixel ``(B, H*W)`` when sorted by decreasing saliency (0 = most salient).

    Ties are broken in a seeded random order, so a flat map does not delete the image row by row.
    """
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    n = flat.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(maps.device)
    shuffled = flat[:, perm]
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    order = perm[order]  # pixel indices, most salient first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=maps.device).expand(b, n))
    return rank


def _resolve_class_target(model: nn.Module, x: Tensor, target: TargetLike, batch_size: int) -> Target:
    """``None`` becomes the class predicted on the *unperturbed* image, fixed for all steps."""
    tgt = as_target(target)
    if isinstance(tgt, Predicted):
        with torch.no_grad():
            out = torch.cat([unwrap_output(model(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)])
        tgt = Classes(out.reshape(out.shape[0], -1).argmax(1))
    return tgt


def _curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike,
    *,
    insert: bool,
    steps: int,
    substrate: SubstrateLike,
    blur_sigma: float,
    batch_size: int,
    probability: bool,
    seed: int,
) -> Tensor:
    check_input(x, model)
    maps = _check_maps(maps)
    if maps.shape[0] != x.shape[0]:
        raise SalienceError(f"got {maps.shape[0]} maps for {x.shape[0]} images; give one map per image")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SalienceError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SalienceError(f"batch_size must be an int >= 1, got {batch_size!r}")
    b, c, h, w = x.shape
    maps = maps.to(x.device)
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    rank = _order(maps, seed).reshape(b, h, w)
    base = _substrate(x, substrate, blur_sigma)
    start, end = (base, x) if insert else (x, base)
    counts = torch.tensor([round(k * h * w / steps) for k in range(steps + 1)], device=x.device)
    total = b * (steps + 1)
    scores = torch.empty(total, device=x.device, dtype=torch.float32)
    with model_guard(model), torch.no_grad():
        tgt = _resolve_class_target(model, x, target, batch_size)
        is_class = isinstance(tgt, (Classes, MultiLabel))
        for s in range(0, total, batch_size):
            ids = torch.arange(s, min(s + batch_size, total), device=x.device)
            img, step = ids // (steps + 1), ids % (steps + 1)
            # Pixels with rank < count are switched from the start image to the end image.
            switched = (rank[img] < counts[step][:, None, None])[:, None]
            batch = torch.where(switched, end[img], start[img])
            out = unwrap_output(model(batch))
            if probability and is_class and out.dim() == 2 and not looks_like_probabilities(out):
                out = out.softmax(dim=1)
            scores[s:s + len(ids)] = _gather_scores(tgt, out, img)
    return scores.reshape(b, steps + 1)


def _gather_scores(tgt: Target, out: Tensor, img: Tensor) -> Tensor:
    """The target's score of each row of ``out``, where row ``i`` belongs to image ``img[i]``."""
    if isinstance(tgt, Classes) and not isinstance(tgt.index, int):
        return Classes(tgt.index.to(out.device)[img])(out)
    scores = tgt(out)
    if scores.shape != (out.shape[0],):
        raise SalienceError(
            f"the target must give one score per image for deletion/insertion, got shape {tuple(scores.shape)}"
        )
    return scores


_CURVE_DOC = """

    ``x`` ``(B, C, H, W)``; ``maps`` ``(B, H, W)`` (resized bilinearly to ``x`` if needed).
    ``target``: default the class predicted on the unperturbed image, kept for every step; or
    anything :func:`salience.targets.as_target` accepts (a class, classes per image, a
    regression output). ``probability``: for class targets, score the softmax probability
    (RISE) rather than the raw output (other targets are always raw). ``steps``: the curve has ``steps + 1`` points, at ``k / steps`` of the pixels.
    ``substrate``: what a removed pixel becomes: ``"zero"``, ``"blur"`` (Gaussian,
    ``blur_sigma`` px), ``"mean"`` (the image's channel means), a number, or a tensor like
    ``x``. Ties in the map are broken in a random order fixed by ``seed``. The model runs
    under :func:`salience.model_guard` (eval mode, restored after) in batches of ``batch_size``.
"""


def deletion_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "zero",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: bool = True,
    seed: int = 0,
) -> Tensor:
    """The target's probability as the most salient pixels are removed first: ``(B, steps + 1)``."""
    return _curves(model, x, maps, target, insert=False, steps=steps, substrate=substrate,
                   blur_sigma=blur_sigma, batch_size=batch_size, probability=probability, seed=seed)


def insertion_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: bool = True,
    seed: int = 0,
) -> Tensor:
    """The target's probability as the most salient pixels are put back first onto the
    substrate (default: a blurred copy, as in RISE): ``(B, steps + 1)``."""
    return _curves(model, x, maps, target, insert=True, steps=steps, substrate=substrate,
                   blur_sigma=blur_sigma, batch_size=batch_size, probability=probability, seed=seed)


deletion_curves.__doc__ = (deletion_curves.__doc__ or "") + _CURVE_DOC
insertion_curves.__doc__ = (insertion_curves.__doc__ or "") + _CURVE_DOC


def auc(curves: Tensor) -> Tensor:
    """Area under curves ``(B, n)`` sampled evenly on ``[0, 1]`` (trapezoid rule): ``(B,)``."""
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise SalienceError(f"expected curves of shape (B, n) with n >= 2, got {tuple(curves.shape)}")
    n = curves.shape[1] - 1
    return (curves.sum(1) - 0.5 * (curves[:, 0] + curves[:, -1])) / n


def deletion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "zero",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: bool = True,
    seed: int = 0,
) -> Tensor:
    """Deletion metric (Petsiuk et al. 2018): area under :func:`deletion_curves`, ``(B,)``.
    Lower is better: a faithful map names the pixels whose removal kills the score first."""
    return auc(deletion_curves(model, x, maps, target, steps=steps, substrate=substrate, blur_sigma=blur_sigma,
                               batch_size=batch_size, probability=probability, seed=seed))


def insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: bool = True,
    seed: int = 0,
) -> Tensor:
    """Insertion metric (Petsiuk et al. 2018): area under :func:`insertion_curves`, ``(B,)``.
    Higher is better: a faithful map names the pixels that restore the score first."""
    return auc(insertion_curves(model, x, maps, target, steps=steps, substrate=substrate, blur_sigma=blur_sigma,
                                batch_size=batch_size, probability=probability, seed=seed))


# ----------------------------------------------------------------------------- similarity


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks ``(B, n)`` float64 of each row of ``v`` ``(B, n)``, 1-based, ties given their
    average rank (as ``scipy.stats.rankdata``); all rows at once."""
    b, n = v.shape
    sorted_v, order = torch.sort(v, dim=1, stable=True)
    starts = torch.ones_like(sorted_v, dtype=torch.bool)  # first position of a tie group
    starts[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    ends = torch.ones_like(starts)  # last position of a tie group
    ends[:, :-1] = starts[:, 1:]
    pos = torch.arange(1, n + 1, device=v.device, dtype=torch.float64).expand(b, n)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    last = torch.where(ends, pos, torch.full_like(pos, n + 1)).flip(1).cummin(1).values.flip(1)
    ranks = torch.empty_like(pos)
    ranks.scatter_(1, order, (first + last) / 2)
    return ranks


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of ``(B, n)`` tensors; NaN where a row is constant."""
    a = a.to(torch.float64) - a.to(torch.float64).mean(1, keepdim=True)
    b = b.to(torch.float64) - b.to(torch.float64).mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r, torch.full_like(r, float("nan"))).float()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between maps ``(B, ...)``, image by image: ``(B,)``.

    Ties get average ranks (as ``scipy.stats.spearmanr``); NaN where a map is constant.
    """
    if a.shape != b.shape:
        raise SalienceError(f"spearman needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return _pearson(_average_ranks(fa), _average_ranks(fb))


def _minmax(m: Tensor) -> Tensor:
    flat = m.reshape(m.shape[0], -1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)


def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) of maps ``(B, H, W)``, each min-max scaled to
    ``[0, 1]`` first: the mean of the SSIM image over all positions where the Gaussian window
    (``window`` px, ``sigma``) fits entirely, ``(B,)``. Constants ``K1 = 0.01``, ``K2 = 0.03``."""
    a, b = _check_maps(a, "a"), _check_maps(b, "b")
    if a.shape != b.shape:
        raise SalienceError(f"ssim needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    window = min(window, a.shape[-1], a.shape[-2])
    if window % 2 == 0:
        window -= 1
    a, b = _minmax(a.double())[:, None], _minmax(b.double())[:, None]
    g = _gaussian_kernel1d(sigma, window // 2, a.device, a.dtype)
    k = (g[:, None] * g[None, :])[None, None]

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, k)

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a ** 2
    sbb = filt(b * b) - mu_b ** 2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean((1, 2, 3)).float()


def _hog(m: Tensor, cell: int, bins: int) -> Tensor:
    """Histograms of oriented gradients ``(B, bins * cells)``: unsigned orientation, magnitude
    votes split linearly between the two nearest bins, L2-normalized per cell."""
    x = m[:, None].double()
    gx = F.pad(x, (1, 1, 0, 0), mode="replicate")
    gx = (gx[..., 2:] - gx[..., :-2]) / 2
    gy = F.pad(x, (0, 0, 1, 1), mode="replicate")
    gy = (gy[..., 2:, :] - gy[..., :-2, :]) / 2
    mag = torch.hypot(gx, gy)
    ang = torch.atan2(gy, gx) % math.pi  # [0, pi)
    pos = ang / math.pi * bins - 0.5
    lo = torch.floor(pos)
    frac = pos - lo
    lo_bin = lo.long() % bins
    hi_bin = (lo_bin + 1) % bins
    hist = torch.zeros(m.shape[0], bins, *m.shape[-2:], dtype=x.dtype, device=x.device)
    hist.scatter_add_(1, lo_bin, mag * (1 - frac))
    hist.scatter_add_(1, hi_bin, mag * frac)
    cells = F.avg_pool2d(hist, cell) * cell * cell  # (B, bins, H / cell, W / cell)
    cells = cells / cells.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
    return cells.reshape(m.shape[0], -1)


def hog_similarity(a: Tensor, b: Tensor, *, cell: int = 8, bins: int = 9) -> Tensor:
    """Pearson correlation of the HOG features of two maps ``(B, H, W)`` (min-max scaled first),
    as Adebayo et al. compare maps' structure; ``(B,)``. ``cell``: cell side in pixels."""
    a, b = _check_maps(a, "a"), _check_maps(b, "b")
    if a.shape != b.shape:
        raise SalienceError(f"hog_similarity needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    cell = max(1, min(cell, a.shape[-1], a.shape[-2]))
    return _pearson(_hog(_minmax(a), cell, bins), _hog(_minmax(b), cell, bins))


SIMILARITIES: tuple[str, ...] = ("spearman_abs", "spearman", "ssim", "hog")
"""The similarity kinds reported by the randomization tests, in order."""


def similarity(signed_a: Tensor, signed_b: Tensor, abs_a: Optional[Tensor] = None,
               abs_b: Optional[Tensor] = None) -> dict[str, Tensor]:
    """All :data:`SIMILARITIES` between two sets of maps ``(B, H, W)``, per image.

    ``spearman_abs``, ``ssim`` and ``hog`` compare the absolute maps (``abs_a`` / ``abs_b``,
    default ``|signed|``); ``spearman`` compares the signed maps.
    """
    abs_a = signed_a.abs() if abs_a is None else abs_a
    abs_b = signed_b.abs() if abs_b is None else abs_b
    return {
        "spearman_abs": spearman(abs_a, abs_b),
        "spearman": spearman(signed_a, signed_b),
        "ssim": ssim(abs_a, abs_b),
        "hog": hog_similarity(abs_a, abs_b),
    }


# ----------------------------------------------------------------------------- randomization


def _method(method: MethodLike) -> Callable[..., Tensor]:
    if isinstance(method, str):
        from salience.methods import METHODS

        if method not in METHODS:
            raise SalienceError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        return METHODS[method]
    if not callable(method):
        raise SalienceError(f"expected a method as a name or a function, got {type(method).__name__}")
    return method


def _takes_reduce(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "reduce" in params


def _signed_and_abs(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, target: TargetLike,
                    kwargs: dict) -> tuple[Tensor, Tensor]:
    """A method's map as (signed, absolute) ``(B, H, W)``: channel sum of the raw map and of its
    magnitude when the method can return ``(B, C, H, W)``, else the map and its magnitude."""
    kw = dict(kwargs)
    if "reduce" not in kw and _takes_reduce(fn):
        kw["reduce"] = None
    m = fn(model, x, target, **kw).detach()
    if m.dim() == 4:
        return m.sum(1), m.abs().sum(1)
    if m.dim() != 3:
        raise SalienceError(f"the method returned a map of shape {tuple(m.shape)}; expected (B, H, W) or (B, C, H, W)")
    return m, m.abs()


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def randomization_layers(model: nn.Module, x: Tensor) -> list[str]:
    """The layers :func:`randomization` re-initializes, in forward order (first layer first).

    Each module that owns parameters (conv, linear, ...) is one layer; a normalization layer
    (BatchNorm, GroupNorm, LayerNorm) joins the weight layer before it, so "a layer" is e.g.
    conv + its BatchNorm. Found with one forward pass of ``x[:1]`` on a copy of the model.
    """
    groups = _layer_groups(model, x)
    return [name for name, _ in groups]


def _layer_groups(model: nn.Module, x: Tensor) -> list[tuple[str, list[str]]]:
    probe = copy.deepcopy(model)
    order: list[str] = []
    handles = []
    for name, mod in probe.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            def hook(m: nn.Module, i: object, o: object, name: str = name) -> None:
                if name not in order:
                    order.append(name)
            handles.append(mod.register_forward_hook(hook))
    try:
        with model_guard(probe), torch.no_grad():
            probe(x[:1])
    finally:
        for h in handles:
            h.remove()
    mods = dict(probe.named_modules())
    groups: list[tuple[str, list[str]]] = []
    for name in order:
        if isinstance(mods[name], _NORMS) and groups:
            groups[-1][1].append(name)
        else:
            groups.append((name, [name]))
    if not groups:
        raise SalienceError("the model has no layer with parameters that its forward pass calls; nothing to randomize")
    return groups


def _step_seed(seed: int, step: int, j: int) -> int:
    """The RNG seed for member ``j`` of step ``step``: far from small seeds such as 0, so that the
    re-initialization of a model built under ``torch.manual_seed(0)`` does not reproduce it."""
    return (int(seed) + 1) * 1_000_003 + 1000 * step + j


def _reinit(module: nn.Module, seed: int) -> None:
    """Re-initialize one module's own parameters with its ``reset_parameters`` (seeded)."""
    devices = [p.device for p in module.parameters(recurse=False) if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}) if devices else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    if p.dim() >= 2:
                        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    else:
                        nn.init.uniform_(p, -0.1, 0.1)


@dataclass
class RandomizationResult:
    """What a randomization test measured.

    ``layers``: the re-initialized layers, in the order they were randomized (top first for
    ``"cascading"``); ``mode``; ``values[kind]``: per layer, the mean over images of the
    similarity ``kind`` (one of :data:`SIMILARITIES`) between the original and the randomized
    maps; ``per_image[kind]``: the same before averaging, ``(len(layers), B)``.
    """

    layers: list[str]
    mode: str
    values: dict[str, list[float]] = field(default_factory=dict)
    per_image: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> list[float]:
        return self.values[kind]

    def as_dict(self) -> dict[str, object]:
        """Plain lists, for JSON."""
        return {"mode": self.mode, "layers": list(self.layers), **{k: list(v) for k, v in self.values.items()}}


def randomization(
    model: nn.Module,
    x: Tensor,
    method: MethodLike,
    target: TargetLike = None,
    mode: str = "cascading",
    *,
    layers: Optional[Sequence[str]] = None,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> RandomizationResult:
    """Model parameter randomization test (Adebayo et al. 2018), on a copy of ``model``.

    ``"cascading"``: re-initialize the layers one after the other from the top (output) down,
    keeping earlier re-initializations; ``"independent"``: re-initialize one layer at a time,
    the rest as trained. After each step compute ``method(copy, x, target)`` and compare it to
    the original map with :func:`similarity`. A map that stays similar after the weights are
    destroyed is not explaining the model. ``layers``: dotted names in forward order (default
    :func:`randomization_layers`). ``target``: default the class the *original* model predicts,
    fixed for every step. Re-initialization uses each module's ``reset_parameters`` under a
    seeded, scoped RNG (a seed derived from ``seed`` and the step): the same seed gives the same numbers, and the global
    RNG is left as it was. The user's model is never modified.
    """
    if mode not in ("cascading", "independent"):
        raise SalienceError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    fn = _method(method)
    check_input(x, model)
    kw = dict(method_kwargs or {})
    tgt = target
    if target is None:
        with model_guard(model), torch.no_grad():
            tgt = unwrap_output(model(x)).reshape(x.shape[0], -1).argmax(1)
    work = copy.deepcopy(model)
    groups = _layer_groups(model, x)
    if layers is not None:
        known = dict(groups)
        chosen = []
        for name in layers:
            resolve_layer(work, name)  # a clear error for unknown names
            members = known.get(name, [n for n, m in work.named_modules()
                                       if (n == name or n.startswith(name + ".")) and
                                       any(True for _ in m.parameters(recurse=False))])
            if not members:
                raise SalienceError(f"layer {name!r} has no parameters to re-initialize")
            chosen.append((name, members))
        groups = chosen
    top_down = list(reversed(groups))
    mods = dict(work.named_modules())
    original = {k: v.detach().clone() for k, v in work.state_dict().items()}

    signed0, abs0 = _signed_and_abs(fn, work, x, tgt, kw)
    per: dict[str, list[Tensor]] = {k: [] for k in SIMILARITIES}
    for step, (name, members) in enumerate(top_down):
        if mode == "independent":
            work.load_state_dict(original)
        for j, member in enumerate(members):
            _reinit(mods[member], _step_seed(seed, step, j))
        signed, absolute = _signed_and_abs(fn, work, x, tgt, kw)
        for k, v in similarity(signed0, signed, abs0, absolute).items():
            per[k].append(v.cpu())
    per_image = {k: torch.stack(v) for k, v in per.items()}
    values = {k: [float(torch.nanmean(row)) for row in v] for k, v in per_image.items()}
    return RandomizationResult(layers=[n for n, _ in top_down], mode=mode, values=values, per_image=per_image)


def data_randomization(
    train_fn: Callable[[Tensor, Tensor], nn.Module],
    images: Tensor,
    labels: Tensor,
    x: Tensor,
    method: MethodLike,
    target: TargetLike = None,
    *,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> dict[str, object]:
    """Data randomization test (Adebayo et al. 2018): train the same recipe on true and on
    shuffled labels and compare the two models' maps of ``x``.

    ``train_fn(images, labels) -> model`` is called twice: on ``(images, labels)`` and on
    ``(images, labels[perm])`` with a permutation drawn from ``seed``. A map that looks the same
    for a model that learned nothing but memorized noise does not depend on what was learned.
    ``target``: default the class predicted by the true-label model, used for both models.
    Returns ``{"values": {kind: mean}, "per_image": {kind: (B,)}, "train_accuracy":
    {"true": a, "shuffled": b}}`` (accuracy of each model on its own training labels).
    """
    if labels.shape[0] != images.shape[0]:
        raise SalienceError(f"got {labels.shape[0]} labels for {images.shape[0]} images")
    fn = _method(method)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.shape[0], generator=gen).to(labels.device)
    shuffled = labels[perm]
    m_true = train_fn(images, labels)
    m_rand = train_fn(images, shuffled)
    kw = dict(method_kwargs or {})

    def accuracy(m: nn.Module, y: Tensor) -> float:
        with model_guard(m), torch.no_grad():
            out = torch.cat([unwrap_output(m(images[i:i + 256])) for i in range(0, images.shape[0], 256)])
        return float((out.argmax(1) == y.to(out.device)).float().mean())

    tgt = target
    if target is None:
        with model_guard(m_true), torch.no_grad():
            tgt = unwrap_output(m_true(x)).reshape(x.shape[0], -1).argmax(1)
    s0, a0 = _signed_and_abs(fn, m_true, x, tgt, kw)
    s1, a1 = _signed_and_abs(fn, m_rand, x, tgt, kw)
    per = {k: v.cpu() for k, v in similarity(s0, s1, a0, a1).items()}
    return {
        "values": {k: float(torch.nanmean(v)) for k, v in per.items()},
        "per_image": per,
        "train_accuracy": {"true": accuracy(m_true, labels), "shuffled": accuracy(m_rand, shuffled)},
    }


# ----------------------------------------------------------------------------- baselines


def spectral_residual(images: Tensor, *, size: int = 64, blur_size: int = 5, blur_sigma: float = 8.0) -> Tensor:
    """Spectral-residual saliency (Hou and Zhang, 2007): a model-free baseline, ``(B, H, W)``.

    Each image ``(B, C, H, W)`` is turned to gray (channel mean), resized to ``size`` x
    ``size``; the log amplitude spectrum minus its 3x3 local mean (the "spectral residual")
    is recombined with the phase, transformed back, squared, smoothed with a ``blur_size``
    Gaussian of ``blur_sigma`` (OpenCV's StaticSaliencySpectralResidual uses 64, 5, 8),
    resized back to ``(H, W)`` and min-max scaled to ``[0, 1]`` per image.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise SalienceError(
            f"expected images of shape (B, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    b, c, h, w = images.shape
    g = images.float().mean(1, keepdim=True)
    if (h, w) != (size, size):
        g = F.interpolate(g, size=(size, size), mode="area" if h >= size and w >= size else "bilinear",
                          **({} if h >= size and w >= size else {"align_corners": False}))
    g = g[:, 0].double()
    spec = torch.fft.fft2(g)
    log_amp = torch.log(spec.abs().clamp_min(1e-12))
    phase = torch.angle(spec)
    avg = F.avg_pool2d(F.pad(log_amp[:, None], (1, 1, 1, 1), mode="reflect"), 3, stride=1)[:, 0]
    residual = log_amp - avg
    sal = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
    r = blur_size // 2
    k1 = _gaussian_kernel1d(blur_sigma, r, sal.device, sal.dtype)
    k = (k1[:, None] * k1[None, :])[None, None]
    sal = F.conv2d(F.pad(sal[:, None], (r, r, r, r), mode="reflect"), k)
    if (h, w) != (size, size):
        sal = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)
    return _minmax(sal[:, 0]).to(images.dtype if images.is_floating_point() else torch.float32)


def random_maps(shape: Sequence[int], *, seed: int = 0, device: Union[str, torch.device, None] = None) -> Tensor:
    """Uniform random maps of ``shape`` ``(B, H, W)`` from ``seed``: the chance baseline."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen).to(device if device is not None else "cpu")
