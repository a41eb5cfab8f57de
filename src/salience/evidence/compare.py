"""Similarity of two sets of saliency maps ``(B, H, W)``, image by image.

What the randomization tests (:mod:`salience.evidence.sanity`) report, after Adebayo et
al. 2018: Spearman rank correlation of the absolute and of the signed maps (:func:`spearman`),
structural similarity (:func:`ssim`) and the Pearson correlation of HOG features
(:func:`hog_similarity`); :func:`similarity` gives all of :data:`SIMILARITIES` at once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from salience._core.errors import SalienceError
from salience._core.tensors import check_int, check_number, minmax
from salience._core.tensors import gaussian_kernel1d
from salience.evidence._checks import check_finite, check_maps

__all__ = ["spearman", "ssim", "hog_similarity", "similarity", "SIMILARITIES"]


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
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise SalienceError(f"expected {name} as a torch.Tensor of maps (B, ...), got {type(t).__name__}")
        check_finite(t, name, "a NaN has no rank, and the correlation of the others would be a number")
    if a.shape != b.shape:
        raise SalienceError(f"spearman needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = math.prod(a.shape[1:])  # not -1: reshape(0, -1) of an empty batch raised
    fa, fb = a.reshape(a.shape[0], n), b.reshape(b.shape[0], n)
    return _pearson(_average_ranks(fa), _average_ranks(fb))



def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) of maps ``(B, H, W)``, each min-max scaled to
    ``[0, 1]`` first: the mean of the SSIM image over all positions where the Gaussian window
    (``window`` px, ``sigma``) fits entirely, ``(B,)``. Constants ``K1 = 0.01``, ``K2 = 0.03``."""
    a, b = check_maps(a, "a"), check_maps(b, "b")
    if a.shape != b.shape:
        raise SalienceError(f"ssim needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    window = min(check_int(window, "window", minimum=1, what="the Gaussian window's side in pixels"),
                 a.shape[-1], a.shape[-2])
    sigma = check_number(sigma, "sigma", minimum=1e-6, what="the Gaussian window's standard deviation in pixels")
    data_range = check_number(data_range, "data_range", minimum=1e-12, what="the range of the scaled maps, 1")
    if window % 2 == 0:
        window -= 1
    a, b = minmax(a.double())[:, None], minmax(b.double())[:, None]
    g = gaussian_kernel1d(sigma, window // 2, a.device, a.dtype)
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
    a, b = check_maps(a, "a"), check_maps(b, "b")
    if a.shape != b.shape:
        raise SalienceError(f"hog_similarity needs maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    cell = min(check_int(cell, "cell", minimum=1, what="the cell's side in pixels"), a.shape[-1], a.shape[-2])
    bins = check_int(bins, "bins", minimum=1, what="the orientation bins")
    return _pearson(_hog(minmax(a), cell, bins), _hog(minmax(b), cell, bins))


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
