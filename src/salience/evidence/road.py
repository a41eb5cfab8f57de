"""ROAD, RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022).

Deletion with a black (or blurred) substrate leaves the shape of the deleted pixels in the image,
and a model may react to that shape rather than to the information removed (the out-of-
distribution effect; it can also *leak* the map's ranking through the mask's outline). ROAD
removes a fraction of the pixels and fills them by **noisy linear imputation**: each removed
pixel becomes the weighted average of its eight neighbours (weight 1/6 for the four direct ones,
1/12 for the diagonal ones, renormalized at the border), all removed pixels at once, which is one
sparse linear system per image; then Gaussian noise (standard deviation ``noise``, default 0.01
as in the authors' code) is added to the filled pixels. :func:`linear_imputation` is that step.

:func:`road_curves` gives the target's probability at each removal fraction, removing the most
relevant pixels first (``"morf"``: a faithful map kills the score fast, lower is better) or the
least relevant first (``"lerf"``: a faithful map keeps it, higher is better); :func:`road` the
mean over the fractions. The systems are solved with ``scipy.sparse`` (``pip install scipy``);
the model runs on all (image, fraction) pairs in batches.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError
from salience._core.tensors import check_number
from salience._core.engine import MAX_PASSES, check_passes
from salience.evidence._checks import check_finite, check_seed, image_keys, keyed_seed
from salience.evidence.faithfulness import ProbabilityLike, pixel_ranks, prepare_maps, score_items
from salience.targets import TargetLike

__all__ = ["ROAD_FRACTIONS", "linear_imputation", "road_curves", "road"]

ROAD_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The removal fractions of Rong et al.'s figures (10 % to 90 %)."""

# (row offset, column offset, weight) of the eight neighbours (Rong et al.'s code).
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def _scipy():  # type: ignore[no-untyped-def]
    try:
        import scipy.sparse as sparse
        import scipy.sparse.linalg as linalg
    except ImportError:
        raise SalienceError("ROAD's linear imputation needs scipy: pip install scipy") from None
    return sparse, linalg


# The blocks of at most this many pixels that the nested dissection leaves whole (4 gave the least fill at 224 x 224).
_LEAF = 4


@functools.lru_cache(maxsize=8)
def _dissection_rank(h: int, w: int) -> np.ndarray:
    """Each pixel's place ``(H * W,)`` in a nested-dissection elimination order of the ``h x w`` grid.

    A column (or row) through the middle of a block separates its two halves under the 8-neighbour
    stencil (pixels two columns apart are never neighbours): both halves come first, each ordered the
    same way, the separator last. In that order the factor of a grid of ``n`` removed pixels fills
    about ``n log n`` entries (George 1973), half as many as with SuperLU's default column ordering
    at 224 x 224 (benchmarks/road-s54.md). A subset of the grid keeps the separators, so one ranking
    serves every removed set; it is computed once per image size (read-only, cached).
    """
    grid = np.arange(h * w, dtype=np.int64).reshape(h, w)
    parts: list[np.ndarray] = []

    def dissect(r0: int, r1: int, c0: int, c1: int) -> None:
        if r1 <= r0 or c1 <= c0:
            return
        if (r1 - r0) * (c1 - c0) <= _LEAF:
            parts.append(grid[r0:r1, c0:c1].reshape(-1))
        elif c1 - c0 >= r1 - r0:
            mid = (c0 + c1) // 2
            dissect(r0, r1, c0, mid)
            dissect(r0, r1, mid + 1, c1)
            parts.append(grid[r0:r1, mid])
        else:
            mid = (r0 + r1) // 2
            dissect(r0, mid, c0, c1)
            dissect(mid + 1, r1, c0, c1)
            parts.append(grid[mid, c0:c1])

    dissect(0, h, 0, w)
    rank = np.empty(h * w, dtype=np.int64)
    rank[np.concatenate(parts)] = np.arange(h * w)
    rank.flags.writeable = False
    return rank


def _system(img: np.ndarray, removed: np.ndarray, idx: np.ndarray):  # type: ignore[no-untyped-def]
    """The imputation's equations for one image ``(C, H, W)`` float64: ``(A, rhs)``, ``A`` ``(n, n)``
    CSC with unknown ``k`` the pixel ``idx[k]`` (flat index), ``rhs`` ``(n, C)``.

    Equation of removed pixel ``i`` with in-image neighbours ``N(i)``:
    ``sum_{j in N(i)} w_ij * (v_i - v_j) = 0``; known ``v_j`` go to the right-hand side, one column
    per channel. ``A`` is symmetric and, as every removed region touches a kept pixel, positive
    definite (and diagonally dominant).
    """
    sparse, _ = _scipy()
    c, h, w = img.shape
    flat_removed = removed.reshape(-1)
    n = idx.size
    var = np.full(h * w, -1, dtype=np.int64)
    var[idx] = np.arange(n)
    r, col = np.divmod(idx, w)
    flat = img.reshape(c, -1)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for dr, dc, wt in _NEIGHBOURS:
        rr, cc = r + dr, col + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        eq = np.flatnonzero(ok)
        nb = rr[ok] * w + cc[ok]
        diag[eq] += wt
        unknown = flat_removed[nb]
        rows.append(eq[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        rhs[eq[~unknown]] += wt * flat[:, nb[~unknown]].T  # one neighbour per offset: no repeated rows
    a = sparse.csc_matrix((np.concatenate([diag] + vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n, n))
    return a, rhs


def _impute_one(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One image ``(C, H, W)`` float64 with its ``removed`` ``(H, W)`` pixels imputed (no noise).

    The unknowns are numbered in the nested-dissection order of :func:`_dissection_rank` and the
    system (:func:`_system`) is factored by SuperLU in that order, without pivoting (``A`` is
    symmetric positive definite: ``SymmetricMode``, ``diag_pivot_thresh=0``); one factorization
    serves all channels.
    """
    _, linalg = _scipy()
    c, h, w = img.shape
    idx = np.flatnonzero(removed.reshape(-1))
    if idx.size == 0 or c == 0:
        return img.copy()
    idx = idx[np.argsort(_dissection_rank(h, w)[idx])]
    a, rhs = _system(img, removed, idx)
    lu = linalg.splu(a, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    out = img.copy().reshape(c, -1)
    out[:, idx] = lu.solve(rhs).T
    return out.reshape(c, h, w)


def linear_imputation(x: Tensor, removed: Tensor, *, noise: float = 0.0, seed: int | Sequence[int] = 0) -> Tensor:
    """``x`` ``(B, C, H, W)`` with the pixels ``removed`` ``(B, H, W)`` (bool, all channels)
    filled by ROAD's linear imputation, plus Gaussian noise of standard deviation ``noise`` (in
    ``x``'s units) on the filled pixels only. Each image's noise comes from its own generator, so
    an image's result does not depend on the batch it is in nor on its position there: given one
    int ``seed``, image ``i``'s generator is seeded ``keyed_seed(seed, key_i)`` from its content
    key (:func:`salience.evidence.image_seeds` with ``stream=0``, docs/evaluation.md, "Random
    draws"); given one int per image, with that int. Kept pixels are returned unchanged.
    Solved in float64 on the CPU, one sparse system per image factored by SuperLU in a
    nested-dissection order (over the nine ROAD fractions at 224 x 224, 2x faster than ``spsolve``'s
    default ordering; the same solution up to rounding); returned in ``x``'s dtype and device. At least one pixel per
    image must be kept; an empty batch (or no channel) gives an empty result.
    """
    if not isinstance(x, Tensor) or not isinstance(removed, Tensor):
        raise SalienceError(f"expected x and removed as torch.Tensors, got {type(x).__name__} and "
                            f"{type(removed).__name__}")
    if x.dim() != 4 or removed.shape != (x.shape[0], *x.shape[-2:]):
        raise SalienceError(f"expected x (B, C, H, W) and removed (B, H, W), got {tuple(x.shape)} and "
                            f"{tuple(removed.shape)}")
    noise = check_number(noise, "noise", minimum=0.0)
    check_finite(x, "x", "the pixels filled from their neighbours would be NaN")
    rem = removed.detach().to("cpu", torch.bool).numpy()
    if rem.all(axis=(1, 2)).any():
        raise SalienceError("linear imputation needs at least one kept pixel per image; remove less")
    xs = x.detach().to("cpu", torch.float64).numpy()
    imputed = [_impute_one(xs[i], rem[i]) for i in range(xs.shape[0])]
    out = torch.from_numpy(np.stack(imputed) if imputed else xs.copy())  # np.stack refuses an empty list
    if noise > 0:
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            s = check_seed(seed)
            seed = [keyed_seed(s, k) for k in image_keys(x)]
        eps = _noise(out.shape, seed) * noise
        out = torch.where(torch.from_numpy(rem)[:, None], out + eps, out)
    return out.to(x.device, x.dtype)


def _noise(shape: torch.Size, seeds: Sequence[int]) -> Tensor:
    """Standard normal float64 noise of ``shape`` ``(B, ...)``: image ``i``'s slice from its own
    generator, seeded ``seeds[i]``."""
    if isinstance(seeds, (Tensor, np.ndarray)):
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise SalienceError(f"seed must be an int or one int per image, got {type(seeds).__name__}")
    ss = [check_seed(s) for s in seeds]
    if len(ss) != shape[0]:
        raise SalienceError(f"expected one seed per image ({shape[0]}), got {len(ss)}")
    if not ss:  # an empty batch: nothing to draw (torch.stack refuses an empty list)
        return torch.zeros(shape, dtype=torch.float64)
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in ss])


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    """``fractions`` as floats in (0, 1), at most :data:`MAX_PASSES` of them; a 1-D tensor (``torch.linspace``) gives
    its values (its 0-d elements are no numbers to :func:`check_number`), a 0-d one (tensor or numpy array) is one
    number, refused."""
    if isinstance(fractions, Tensor) and fractions.dim() == 1:
        fractions = fractions.detach().cpu().tolist()
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__") or (
            isinstance(fractions, (Tensor, np.ndarray)) and np.ndim(fractions) == 0):  # np.array(0.5): no sequence
        raise SalienceError(f"ROAD fractions must be a sequence of fractions, e.g. (0.5,) or ROAD_FRACTIONS; got "
                            f"{fractions!r}")
    fr = list(itertools.islice(fractions, MAX_PASSES + 1))  # an endless iterator: refused, not read for ever
    check_passes(len(fr), f"{len(fr):,} ROAD fractions or more are",
                 f"give at most {MAX_PASSES:,} fractions (a pass of the model each), e.g. ROAD_FRACTIONS")
    fr = [check_number(f, "each ROAD fraction", what="in (0, 1)") for f in fr]
    if not fr or any(not 0.0 < f < 1.0 for f in fr):
        raise SalienceError(f"ROAD fractions must lie strictly between 0 and 1, got {fr}")
    return fr


def road_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    order: str = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    batch_size: int = 64,
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """The target's probability after removing each fraction of the pixels (ROAD): ``(B, F)``.

    ``order``: ``"morf"`` removes the most relevant pixels first, ``"lerf"`` the least relevant.
    ``x`` ``(B, C, H, W)``; ``maps`` ``(B, H, W)`` (resized bilinearly to ``x`` if needed; ties
    broken in a random order from ``seed``). ``fractions`` in ``(0, 1)``; a fraction removes
    ``round(f * H * W)`` pixels (at most ``H * W - 1``). ``noise``: the imputation noise (in ``x``'s
    units): item ``(image i, fraction j)`` draws it from its own generator seeded
    ``keyed_seed(seed, key_i, j)``, ``key_i`` the content key of image ``i``
    (:func:`salience.evidence.image_seeds` with ``stream=j``; docs/evaluation.md, "Random draws"):
    an image's curve is the same alone, in any batch, at any position, whatever ``batch_size``.
    ``target``, ``probability``, ``batch_size``: as :func:`salience.evidence.deletion_curves`.
    """
    if order not in ("morf", "lerf"):
        raise SalienceError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    fr = _check_fractions(fractions)
    maps = prepare_maps(model, x, maps)
    seed = check_seed(seed)
    b, _, h, w = x.shape
    n = h * w
    if n < 2:
        raise SalienceError("ROAD removes at most H * W - 1 pixels (the rest are imputed from the pixels kept): a "
                            "1 x 1 image has none to remove and every map would score the same; give larger images")
    rank = pixel_ranks(maps, seed).reshape(b, h, w)
    if order == "lerf":
        rank = n - 1 - rank
    counts = torch.tensor([min(round(f * n), n - 1) for f in fr], device=x.device)
    k = len(fr)
    keys = image_keys(x)

    def make(ids: Tensor) -> tuple[Tensor, Tensor]:
        img, step = ids // k, ids % k
        removed = rank[img] < counts[step][:, None, None]
        # One noise seed per item (image's content, fraction): the curves depend neither on batch_size
        # nor on where the image is in x.
        seeds = [keyed_seed(seed, keys[i], j) for i, j in zip(img.tolist(), step.tolist())]
        return linear_imputation(x[img], removed, noise=noise, seed=seeds), img

    def describe(j: int) -> str:
        i, step = divmod(j, k)
        return (f"image {i} with {int(counts[step])} of its {n} pixels removed ({order}, fraction {fr[step]:g}) "
                f"and imputed (noise={noise!r}, seed={seed})")

    return score_items(model, x, target, b * k, make, batch_size=batch_size, probability=probability,
                       describe=describe).reshape(b, k)


def road(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    order: str = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    batch_size: int = 64,
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """ROAD (Rong et al. 2022): the mean of :func:`road_curves` over the fractions, ``(B,)``.
    ``order="morf"``: lower is better; ``order="lerf"``: higher is better."""
    return road_curves(model, x, maps, target, order=order, fractions=fractions, noise=noise, batch_size=batch_size,
                       probability=probability, seed=seed).mean(1)
