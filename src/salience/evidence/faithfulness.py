"""Faithfulness (Petsiuk et al., RISE, 2018): does the model's score follow the map?

:func:`deletion` / :func:`insertion` remove / add pixels in the order of the map and return the
area under the target's probability curve (:func:`deletion_curves` / :func:`insertion_curves`
give the curves, :func:`auc` the area). All steps of all images are evaluated in batches of
``batch_size`` images, never one model call per step and image. What a removed pixel becomes is
the *substrate*: a blurred copy (the default of both, chosen by measurement, see
docs/evaluation.md), zeros, the channel means, a number or a tensor like ``x``.
:func:`faithfulness_correlation` correlates the map's sums over random pixel sets with the drop
of the output when they are removed.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import (check_input, class_probabilities, forward_scores, layer_output,
                                     looks_like_probabilities, model_call, unwrap_output)
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import max_batch
from salience._core.tensors import check_int, check_number, gaussian_blur
from salience.evidence._checks import check_count, check_finite, check_maps, check_seed, image_seeds
from salience.targets import Classes, MultiLabel, Predicted, Target, TargetLike, as_target

__all__ = ["deletion", "insertion", "deletion_curves", "insertion_curves", "auc", "faithfulness_correlation",
           "PROBABILITY"]

SubstrateLike = Union[str, float, Tensor]
ProbabilityLike = Union[bool, str]
ItemMaker = Callable[[Tensor], "tuple[Tensor, Tensor]"]

PROBABILITY: tuple[ProbabilityLike, ...] = (True, "softmax", "sigmoid", False)
"""How the metrics that score a class target turn the model's output into the class's score
(``probability=``): ``True`` or ``"softmax"``: the probability of one class among all, the softmax
of the output (kept when its rows already are probabilities; the sigmoid of a single-logit output,
a binary classifier); ``"sigmoid"``: each class's own sigmoid, for a multilabel model (independent
classes, one logit each, as COCO or CheXpert models); ``False``: the raw output. Targets that are
not classes are always scored raw."""


def check_probability(probability: object) -> Optional[str]:
    """``probability`` (one of :data:`PROBABILITY`) as ``"softmax"``, ``"sigmoid"`` or ``None`` (raw),
    or a :class:`SalienceError` naming the choices."""
    if isinstance(probability, bool) or type(probability).__name__ == "bool_":  # numpy's too
        return "softmax" if probability else None
    if isinstance(probability, str) and probability in ("softmax", "sigmoid"):
        return probability
    raise SalienceError(f"probability must be True or 'softmax' (the softmax over the classes), 'sigmoid' (each "
                        "class's own sigmoid: a multilabel model) or False (the raw output), as "
                        f"salience.evidence.PROBABILITY lists; got {probability!r}")


def link_scores(out: Tensor, link: Optional[str], already: Optional[bool] = None) -> Tensor:
    """``out`` ``(n, classes)`` as the scores :data:`PROBABILITY` names: ``link`` ``"softmax"``
    (:func:`salience._core.autograd.class_probabilities`), ``"sigmoid"`` (elementwise) or ``None`` (raw).
    ``already``: for ``"softmax"``, whether the model's rows are already probabilities, judged once for
    a whole metric call (``None``: judged on ``out`` itself)."""
    if link == "softmax":
        return class_probabilities(out, already)
    if link == "sigmoid":
        return out.sigmoid()
    return out



@dataclass(frozen=True)
class _Options:
    """The options every deletion / insertion function takes (see :func:`deletion_curves`)."""

    steps: int
    substrate: SubstrateLike
    blur_sigma: float
    batch_size: int
    probability: ProbabilityLike
    seed: int


def _substrate(x: Tensor, substrate: SubstrateLike, blur_sigma: float) -> Tensor:
    """The image that replaces removed pixels: ``"zero"``, ``"blur"``, ``"mean"``, a number, or a tensor."""
    if isinstance(substrate, Tensor):
        try:
            base = torch.broadcast_to(substrate.to(x.device, x.dtype), x.shape)
        except RuntimeError:
            raise SalienceError(
                f"a substrate tensor must broadcast to x's shape {tuple(x.shape)}, got {tuple(substrate.shape)}"
            ) from None
        if not bool(torch.isfinite(base).all()):  # a removed pixel NaN: a NaN score, a NaN metric
            raise SalienceError(f"the substrate tensor has NaN or infinite values (in x's dtype, {x.dtype}); a "
                                "removed pixel becomes the substrate, so it must be finite")
        return base
    if isinstance(substrate, (int, float)) and not isinstance(substrate, bool):
        value = check_number(substrate, "substrate", what="the value a removed pixel becomes")
        if abs(value) > torch.finfo(x.dtype).max:  # torch.full_like raised a raw RuntimeError
            raise SalienceError(f"substrate={substrate!r} overflows x's dtype ({x.dtype}, at most "
                                f"{torch.finfo(x.dtype).max:g}); give a value it holds")
        return torch.full_like(x, value)
    if substrate == "zero":
        return torch.zeros_like(x)
    if substrate in ("mean", "blur") and x.shape[-2:] == (1, 1):
        raise SalienceError(f"substrate={substrate!r} of a 1 x 1 image is the image itself: no pixel would be "
                            "removed and every map would score the same; choose substrate='zero', a number or "
                            "a tensor like x")
    if substrate == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if substrate == "blur":
        # sigma 0 (or below) would leave x as it is: nothing removed, every map the same score.
        sigma = check_number(blur_sigma, "blur_sigma", what="the blur's standard deviation in pixels, > 0")
        if not sigma > 0:
            raise SalienceError(f"blur_sigma must be > 0 (pixels): a blur of {blur_sigma!r} leaves the image as "
                                "it is, so no pixel would be removed; for no blur choose another substrate")
        return gaussian_blur(x, sigma)
    raise SalienceError(
        f"unknown substrate {substrate!r}; expected 'zero', 'blur', 'mean', a number or a tensor like x"
    )


def pixel_ranks(maps: Tensor, seed: int) -> Tensor:
    """Rank of each pixel ``(B, H*W)`` when sorted by decreasing saliency (0 = most salient).

    Ties are broken in a seeded random order, so a flat map does not delete the image row by row:
    one random order of the ``H*W`` pixel positions from ``seed``, shared by every image (and every
    map) on purpose, so an image's ranks depend on its map and ``seed`` only, not on the batch.
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


def _resolve_class_target(model: nn.Module, x: Tensor, target: TargetLike, batch_size: int,
                          link: Optional[str]) -> tuple[Target, Optional[bool]]:
    """``None`` becomes the class predicted on the *unperturbed* image, fixed for all steps; with
    ``link`` ``"softmax"``, also whether the model's output rows already are probabilities, judged
    once on the unperturbed images' output and kept for every chunk (judged per chunk, a chunk of
    raw outputs that happened to be non-negative and sum to 1 was kept while the others were
    softmaxed: two scales in one curve, and a curve that depended on ``batch_size``)."""
    tgt = as_target(target)
    predicted = isinstance(tgt, Predicted)
    already = None
    if predicted or (link == "softmax" and isinstance(tgt, (Classes, MultiLabel))):
        clean = forward_scores(model, x, strip_softmax=False, batch_size=batch_size)
        if predicted:
            tgt = Classes(clean.reshape(clean.shape[0], -1).argmax(1))
        already = looks_like_probabilities(clean)
    tgt.check_batch(x.shape[0])  # one class (or class set) per image of x, not per perturbed copy
    return tgt, already


def _gather_scores(tgt: Target, out: Tensor, img: Tensor) -> Tensor:
    """The target's score of each row of ``out``, where row ``i`` belongs to image ``img[i]``: a
    per-image part of the target (a class or a multilabel class set per image) is taken for that
    image (:meth:`~salience.targets.Target.for_items`)."""
    scores = tgt.for_items(img.to(out.device))(out)
    if scores.shape != (out.shape[0],):
        raise SalienceError(
            f"the target must give one score per image for deletion/insertion, got shape {tuple(scores.shape)}"
        )
    return scores


def prepare_maps(model: nn.Module, x: Tensor, maps: Tensor) -> Tensor:
    """``maps`` checked against ``x`` (one per image) and resized bilinearly to its ``(H, W)``."""
    check_input(x, model)
    maps = check_maps(maps)
    if maps.shape[0] != x.shape[0]:
        raise SalienceError(f"got {maps.shape[0]} maps for {x.shape[0]} images; give one map per image")
    maps = maps.to(x.device)
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return maps


def score_items(model: nn.Module, x: Tensor, target: TargetLike, total: int, make: ItemMaker, *,
                batch_size: int, probability: ProbabilityLike, describe: Callable[[int], str]) -> Tensor:
    """The target's score on ``total`` perturbed images, ``batch_size`` per model call (at most the model's
    :func:`~salience._core.info.max_batch`): ``(total,)``.

    ``make(ids)`` returns the perturbed images of the item numbers ``ids`` and the index in ``x``
    of the image each comes from. The target (default: the class predicted on the unperturbed
    ``x``) is resolved once; class targets are scored as ``probability`` says (:data:`PROBABILITY`).
    Whether the output already is probabilities is judged once, on ``x``'s output, for every chunk.
    The one loop behind deletion, insertion, ROAD and faithfulness correlation.

    A NaN or infinite score is a :class:`SalienceError` naming the item as ``describe(id)`` says
    (its image and which perturbed copy), not a NaN metric (averaged away by ``nanmean``).
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    batch_size = min(batch_size, max_batch(model) or batch_size)  # a program exported with a bounded batch
    link = check_probability(probability)
    scores = torch.empty(total, device=x.device, dtype=torch.float32)
    with model_guard(model), torch.no_grad():
        tgt, already = _resolve_class_target(model, x, target, batch_size, link)
        if not isinstance(tgt, (Classes, MultiLabel)):
            link = None  # a regression output, a neuron, a function: raw
        layer = getattr(tgt, "layer", None)
        for s in range(0, total, batch_size):
            ids = torch.arange(s, min(s + batch_size, total), device=x.device)
            images, img = make(ids)
            # A target on an inner layer (activation, custom(..., layer=)) reads that layer's output. A
            # model that cannot take the input says so about the caller's x, not the chunk of copies.
            with model_call(model, x):
                out = (unwrap_output(model(images), model) if layer is None
                       else layer_output(model, images, layer))
            out = link_scores(out, link, already)
            got = _gather_scores(tgt, out, img)
            bad = ~torch.isfinite(got)
            if bool(bad.any()):
                j = int(ids[bad.nonzero()[0, 0]])
                raise SalienceError(
                    f"the model's score is {float(got[bad][0])} on {describe(j)}; the metric would be NaN. The "
                    "model gives no finite output on that perturbed image (a raw output of inf, or NaN): check "
                    "it on such inputs, or try another substrate or probability=False")
            scores[s:s + len(ids)] = got
    return scores


_IMAGE_NAMES: ContextVar[Optional[Sequence[int]]] = ContextVar("salience_curve_image_names", default=None)


@contextmanager
def image_names(names: Sequence[int]) -> Iterator[None]:
    """Inside the block, a refusal of a deletion or insertion curve (a NaN score of a perturbed copy) names
    image ``i`` of the call ``names[i]``: a dataset run's index of it, which its row says (not ``0``, its
    position in a rerun's part)."""
    token = _IMAGE_NAMES.set(list(names))
    try:
        yield
    finally:
        _IMAGE_NAMES.reset(token)


def _curves(model: nn.Module, x: Tensor, maps: Tensor, target: TargetLike, *, insert: bool,
            opts: _Options) -> Tensor:
    """The one implementation behind the four public functions: ``(B, min(steps, H*W) + 1)`` scores."""
    pixels = x.shape[-2] * x.shape[-1] if isinstance(x, Tensor) and x.dim() >= 2 else None
    steps = check_count(opts.steps, "steps", 1, "a pass of the model each, the curve's points less one", pixels)
    maps = prepare_maps(model, x, maps)
    b, c, h, w = x.shape
    # More steps than pixels only repeat points (the pixel count is round(k H W / steps)), unevenly, and each
    # costs a forward pass: at most one step per pixel, the curve then the exact per-pixel one.
    steps = min(steps, h * w)
    rank = pixel_ranks(maps, check_seed(opts.seed)).reshape(b, h, w)
    base = _substrate(x, opts.substrate, opts.blur_sigma)
    start, end = (base, x) if insert else (x, base)
    counts = torch.tensor([round(k * h * w / steps) for k in range(steps + 1)], device=x.device)

    def make(ids: Tensor) -> tuple[Tensor, Tensor]:
        img, step = ids // (steps + 1), ids % (steps + 1)
        # Pixels with rank < count are switched from the start image to the end image.
        switched = (rank[img] < counts[step][:, None, None])[:, None]
        return torch.where(switched, end[img], start[img]), img

    names = _IMAGE_NAMES.get()

    def describe(j: int) -> str:
        i, k = divmod(j, steps + 1)
        i = names[i] if names is not None and i < len(names) else i  # a dataset run's index (image_names)
        what = "put back onto the substrate" if insert else "removed"
        return (f"image {i} at step {k} of {steps} of its {'insertion' if insert else 'deletion'} curve "
                f"({int(counts[k])} of its {h * w} pixels {what})")

    scores = score_items(model, x, target, b * (steps + 1), make, batch_size=opts.batch_size,
                         probability=opts.probability, describe=describe)
    return scores.reshape(b, steps + 1)


def deletion_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """The target's probability as the most salient pixels are removed first:
    ``(B, min(steps, H * W) + 1)``.

    ``x`` ``(B, C, H, W)``; ``maps`` ``(B, H, W)`` (resized bilinearly to ``x`` if needed).
    ``target``: default the class predicted on the unperturbed image, kept for every step; or
    anything :func:`salience.targets.as_target` accepts (a class, classes per image, a
    regression output). ``probability``: for class targets, score the softmax probability
    (``True`` or ``"softmax"``, RISE; the sigmoid of a model with a single logit output, ``(B,)`` or
    ``(B, 1)``), each class's own sigmoid (``"sigmoid"``: a multilabel model) or the raw output
    (``False``); other targets are always raw (:data:`PROBABILITY`). ``steps``: the curve has
    ``steps + 1`` points, at ``k / steps`` of the pixels; at most ``H * W`` steps are taken (more
    would only repeat points: the curve then has ``H * W + 1``, one per pixel count). ``substrate``: what a removed pixel
    becomes: ``"blur"`` (default: a Gaussian-blurred copy, ``blur_sigma`` px, the canvas RISE
    inserts into), ``"zero"``, ``"mean"`` (the image's channel means), a number, or a tensor like
    ``x``. Black is not the default: on the demo model it scores deleting the object *worse* than
    deleting random pixels (docs/evaluation.md, "Choosing the substrate"). Ties in the map are broken in a random
    order fixed by ``seed``. The model runs under :func:`salience.model_guard` (eval mode,
    restored after) in batches of ``batch_size``.
    """
    opts = _Options(steps, substrate, blur_sigma, batch_size, probability, seed)
    return _curves(model, x, maps, target, insert=False, opts=opts)


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
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """The target's probability as the most salient pixels are put back first onto the
    substrate (default: a blurred copy, as in RISE): ``(B, min(steps, H * W) + 1)``.

    ``x`` ``(B, C, H, W)``; ``maps`` ``(B, H, W)`` (resized bilinearly to ``x`` if needed).
    ``target``: default the class predicted on the unperturbed image, kept for every step; or
    anything :func:`salience.targets.as_target` accepts (a class, classes per image, a
    regression output). ``probability``: for class targets, score the softmax probability
    (``True`` or ``"softmax"``, RISE; the sigmoid of a model with a single logit output, ``(B,)`` or
    ``(B, 1)``), each class's own sigmoid (``"sigmoid"``: a multilabel model) or the raw output
    (``False``); other targets are always raw (:data:`PROBABILITY`). ``steps``: the curve has
    ``steps + 1`` points, at ``k / steps`` of the pixels; at most ``H * W`` steps are taken (more
    would only repeat points: the curve then has ``H * W + 1``, one per pixel count). ``substrate``: what a pixel not yet
    inserted is: ``"zero"``, ``"blur"`` (Gaussian, ``blur_sigma`` px), ``"mean"`` (the image's
    channel means), a number, or a tensor like ``x``. Ties in the map are broken in a random
    order fixed by ``seed``. The model runs under :func:`salience.model_guard` (eval mode,
    restored after) in batches of ``batch_size``.
    """
    opts = _Options(steps, substrate, blur_sigma, batch_size, probability, seed)
    return _curves(model, x, maps, target, insert=True, opts=opts)


def auc(curves: Tensor) -> Tensor:
    """Area under curves ``(B, n)`` sampled evenly on ``[0, 1]`` (trapezoid rule): ``(B,)``."""
    if not isinstance(curves, Tensor):
        raise SalienceError(f"expected curves as a torch.Tensor (B, n), got {type(curves).__name__}")
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise SalienceError(f"expected curves of shape (B, n) with n >= 2, got {tuple(curves.shape)}")
    check_finite(curves, "curves", "an area of them would be NaN")
    n = curves.shape[1] - 1
    # in float64 (a float32 sum of values near 1e38 overflowed to inf, where the area is finite), but for a device
    # without float64 (Apple's MPS): there in float32
    c = curves.to(torch.float32 if curves.device.type == "mps" else torch.float64)
    return ((c.sum(1) - 0.5 * (c[:, 0] + c[:, -1])) / n).to(curves.dtype if curves.is_floating_point() else
                                                           torch.float32)


def deletion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    steps: int = 32,
    substrate: SubstrateLike = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """Deletion metric (Petsiuk et al. 2018): area under :func:`deletion_curves`, ``(B,)``.
    Lower is better: a faithful map names the pixels whose removal kills the score first.
    The arguments are those of :func:`deletion_curves`."""
    opts = _Options(steps, substrate, blur_sigma, batch_size, probability, seed)
    return auc(_curves(model, x, maps, target, insert=False, opts=opts))


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
    probability: ProbabilityLike = True,
    seed: int = 0,
) -> Tensor:
    """Insertion metric (Petsiuk et al. 2018): area under :func:`insertion_curves`, ``(B,)``.
    Higher is better: a faithful map names the pixels that restore the score first.
    The arguments are those of :func:`insertion_curves`."""
    opts = _Options(steps, substrate, blur_sigma, batch_size, probability, seed)
    return auc(_curves(model, x, maps, target, insert=True, opts=opts))


def faithfulness_correlation(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: TargetLike = None,
    *,
    subsets: int = 64,
    subset_size: float = 0.1,
    substrate: SubstrateLike = "blur",
    blur_sigma: float = 5.0,
    batch_size: int = 64,
    probability: ProbabilityLike = False,
    seed: int = 0,
) -> Tensor:
    """Faithfulness correlation (Bhatt et al., IJCAI 2020): ``(B,)``, higher is better.

    For ``subsets`` random sets ``S`` of ``round(subset_size * H * W)`` pixels (uniform; image
    ``i``'s sets drawn from its own generator, seeded from ``seed`` and the image's content,
    :func:`salience.evidence.image_seeds`, so they do not depend on the batch), the pixels of ``S`` are replaced by the ``substrate`` (as in
    :func:`deletion_curves`) and the drop of the target's score ``f(x) - f(x_S)`` is correlated
    (Pearson, over the sets) with the map's sum over ``S``. A map whose values add up like the
    model's output scores 1; a map unrelated to it about 0. ``probability=False`` (default):
    the raw output, as in the paper (the softmax probability with ``True``, each class's sigmoid
    with ``"sigmoid"``, :data:`PROBABILITY`). ``NaN`` where the
    drops or the sums do not vary. All ``B * (subsets + 1)`` images run in batches.
    """
    t = check_count(subsets, "subsets", 2, "random pixel sets, a pass of the model each")
    maps = prepare_maps(model, x, maps)
    b, c, h, w = x.shape
    frac = check_number(subset_size, "subset_size", what="the fraction of the pixels each set replaces, in (0, 1]")
    if not 0 < frac <= 1:
        raise SalienceError(f"subset_size must be a fraction of the pixels in (0, 1], got {subset_size!r}")
    k = min(max(round(frac * h * w), 1), h * w)
    sets = _RandomSets(maps, image_seeds(x, check_seed(seed)), t, k)
    base = _substrate(x, substrate, blur_sigma)  # first: a 1 x 1 image's blur is refused as it is everywhere
    if k == h * w:  # every set the same: the sums do not vary, and the correlation was NaN for every map
        raise SalienceError(f"subset_size {subset_size!r} replaces all {h * w} pixels in every set, so every set's sum "
                            "of the map is the same and the correlation is undefined; give a smaller fraction "
                            "(default 0.1)")

    def make(ids: Tensor) -> tuple[Tensor, Tensor]:
        img = ids // (t + 1)  # item s == 0 of an image: the image itself
        return torch.where(sets(int(ids[0]), len(ids))[:, None], base[img], x[img]), img

    def describe(j: int) -> str:
        i, s = divmod(j, t + 1)
        return (f"image {i} itself" if s == 0 else
                f"image {i} with its random pixel set {s - 1} of {t} ({k} pixels) replaced by the substrate")

    scores = score_items(model, x, target, b * (t + 1), make, batch_size=batch_size, probability=probability,
                         describe=describe)
    scores = scores.reshape(b, t + 1).double()
    drops = scores[:, :1] - scores[:, 1:]
    return _pearson_rows(drops, sets.sums).float()


class _RandomSets:
    """Faithfulness correlation's random pixel sets, drawn as the items that replace them are made, a batch at a
    time, with the map's sum over each: memory of a batch, not of all ``subsets x H x W`` (4,096 sets of one 224 x 224
    image were 822 MB of keys, 206 MB of sets and 1.6 GB of products at once). Item ``j`` is set ``j % (t + 1) - 1``
    of image ``j // (t + 1)`` (``-1``: the image itself). Image ``i``'s sets are the ``k`` largest of ``t`` rows of
    ``H x W`` float32 keys from a generator seeded with ``seeds[i]``, drawn in order (one draw of all rows is the
    same stream), so the sets and ``sums`` ``(B, t)`` are those of the whole draw at once."""

    def __init__(self, maps: Tensor, seeds: Sequence[int], t: int, k: int) -> None:
        self.maps, self.t, self.k = maps, t, k
        self.gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        self.drawn = [0] * len(seeds)
        self.sums = torch.empty(len(seeds), t, dtype=torch.float64, device=maps.device)

    def __call__(self, start: int, n: int) -> Tensor:
        """Which pixels items ``start..start+n-1`` replace ``(n, H, W)`` bool (none for an image itself)."""
        h, w = self.maps.shape[-2:]
        drop = torch.zeros(n, h, w, dtype=torch.bool, device=self.maps.device)
        per = self.t + 1
        for i in range(start // per, (start + n - 1) // per + 1):
            lo, hi = max(start, i * per + 1), min(start + n, (i + 1) * per)  # its sets' items in the batch
            if lo >= hi:
                continue
            if lo - i * per - 1 != self.drawn[i]:
                raise RuntimeError(f"faithfulness correlation's sets of image {i} asked for out of order")
            keys = torch.rand((hi - lo, h * w), generator=self.gens[i], dtype=torch.float32).to(self.maps.device)
            chosen = torch.zeros(hi - lo, h * w, dtype=torch.bool, device=self.maps.device)
            chosen.scatter_(1, keys.topk(self.k, dim=1).indices, True)
            chosen = chosen.reshape(hi - lo, h, w)
            first = self.drawn[i]
            self.sums[i, first:first + hi - lo] = (self.maps[i].double() * chosen).sum((1, 2))
            self.drawn[i] += hi - lo
            drop[lo - start:hi - start] = chosen
        return drop


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` ``(B, n)``; NaN where one is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
