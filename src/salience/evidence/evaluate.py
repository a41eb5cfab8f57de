"""``salience evaluate``: every method through the metrics, as a report a person can read.

:func:`run_evaluation` runs each saliency method that applies to the model (:func:`salience.methods.default_methods`), plus two model-free
baselines (the spectral-residual map of the image alone and a random map), over a set of images
with ground-truth masks (by default held-out :mod:`salience.demo.data` shapes), and writes to a
folder:

* ``report.md`` and ``report.html``: one table, methods x metrics (pointing game, energy in the
  mask, weak-localization IoU, deletion and insertion AUC, model randomization similarity), and
  the pictures below;
* ``curves.png`` (mean deletion / insertion probability curves), ``randomization.png``
  (similarity to the original map as layers are re-initialized from the top), ``examples.png``
  (the maps of a few images);
* ``results.json``: every number, per method.

:func:`evaluate_methods` gives the rows without writing anything. The data randomization test
needs a ``train_fn`` (e.g. :func:`salience.demo.train.demo_train_fn`); the Clever Hans check of
``salience demo`` is :mod:`salience.demo.clever_hans`. Files are written atomically; nothing is
downloaded.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import check_input, model_input, predicted_classes
from salience._core.errors import ArgumentError, SalienceError, first_line
from salience._core.files import atomic_write, make_folder
from salience._core.info import ModelInfo, max_batch, model_info
from salience._core.progress import progress as _progress
from salience._core.tensors import MAX_INPUT_PIXELS, check_flag, check_int, count_text, model_device
from salience.demo import data
from salience.evidence._checks import (MethodLike, check_count, check_masks, check_seed, image_seeds, method_maps,
                                      resolve_method)
from salience.evidence.baselines import center_maps, random_maps, sobel_edges, spectral_residual
from salience.evidence.complexity import complexity, sparseness
from salience.evidence.faithfulness import (ProbabilityLike, auc, check_probability, deletion_curves,
                                           faithfulness_correlation, insertion_curves)
from salience.evidence.localization import energy_in_mask, pointing_game, weak_localization
from salience.evidence.road import road
from salience.evidence.robustness import max_sensitivity
from salience.evidence.sanity import data_randomization, random_logit, randomization
from salience.evidence.compare import SIMILARITIES
from salience.loading import load_image, normalize_input, resize_crop
from salience.loading.images import keep_flat, mask_values
from salience.methods import METHODS, default_methods
from salience.methods._multi import shape_problem
from salience.methods.options import check_bound_values, show_default, with_options
from salience.render import plots, viz
from salience.render.report import Report

__all__ = ["MetricRow", "BASELINES", "ORACLE", "BETTER", "evaluate_methods", "score_maps", "markdown_table",
           "run_evaluation", "evaluation_input", "bound_methods", "default_names", "options_record", "MAX_PIXELS",
           "check_images"]

MAX_PIXELS = MAX_INPUT_PIXELS
"""The most pixels (``n x H x W``) of the images one evaluation runs on: it holds them all at once (the input, the
pictures, each method's maps). The 50 megapixels of one image file's default limit: 12,207 shapes images of 64 x 64,
996 of 224 x 224. ``n=10**9`` drew a billion shapes images before anything was said."""

PathLike = Union[str, "Path"]
TrainFn = Callable[[Tensor, Tensor], nn.Module]
MethodOptions = Mapping[str, Mapping[str, Any]]

BASELINES: tuple[str, ...] = ("spectral_residual", "sobel_edges", "center", "random")
"""Model-free rows of every table: :func:`salience.evidence.spectral_residual`,
:func:`~salience.evidence.sobel_edges`, :func:`~salience.evidence.center_maps` and random maps
(the floor)."""

ORACLE = "oracle (mask)"
"""The row of the ground-truth mask used as the map (when there are masks): the ceiling a map
that names exactly the object's pixels reaches."""

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class MetricRow:
    """One method's results: means over images (NaN-free images only) and the raw material.

    ``pointing``, ``energy``, ``box_iou``: localization (``None`` without masks); ``deletion``,
    ``insertion``: AUCs; ``road_morf`` / ``road_lerf``: ROAD, most / least relevant first;
    ``faith_corr``: faithfulness correlation; ``sparseness`` (Gini) and ``complexity`` (entropy)
    of the map; for methods only (``None`` for the oracle and the baselines), on the first
    ``randomization_images`` images: ``max_sens`` (max-sensitivity), ``random_logit`` (SSIM to
    the map of a random other class), ``rand_top`` / ``rand_all``: mean Spearman rank correlation
    of the absolute maps after re-initializing the top layer / all layers (cascading), and
    ``rand_ssim_top`` / ``rand_ssim_all`` the same with SSIM. ``curves``: mean deletion and
    insertion curves; ``randomization``: the full :class:`salience.evidence.RandomizationResult`
    as a dict; ``seconds``: time of the maps and of the method-only tests; ``error``: why the
    method could not run, if it could not.
    """

    name: str
    pointing: Optional[float] = None
    energy: Optional[float] = None
    box_iou: Optional[float] = None
    deletion: Optional[float] = None
    insertion: Optional[float] = None
    road_morf: Optional[float] = None
    road_lerf: Optional[float] = None
    faith_corr: Optional[float] = None
    sparseness: Optional[float] = None
    complexity: Optional[float] = None
    max_sens: Optional[float] = None
    random_logit: Optional[float] = None
    rand_top: Optional[float] = None
    rand_all: Optional[float] = None
    rand_ssim_top: Optional[float] = None
    rand_ssim_all: Optional[float] = None
    seconds: float = 0.0
    error: Optional[str] = None
    curves: dict[str, list[float]] = field(default_factory=dict)
    randomization: Optional[dict[str, Any]] = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (
    ("pointing", "pointing game ↑"),
    ("energy", "energy in mask ↑"),
    ("box_iou", "box IoU ↑"),
    ("deletion", "deletion AUC ↓"),
    ("insertion", "insertion AUC ↑"),
    ("road_morf", "ROAD MoRF ↓"),
    ("road_lerf", "ROAD LeRF ↑"),
    ("faith_corr", "faithfulness corr. ↑"),
    ("sparseness", "sparseness (Gini) ↑"),
    ("complexity", "complexity (entropy) ↓"),
    ("max_sens", "max-sensitivity ↓"),
    ("random_logit", "random-logit SSIM ↓"),
    ("rand_top", "rand. Spearman, top layer ↓"),
    ("rand_all", "rand. Spearman, all layers ↓"),
    ("rand_ssim_top", "rand. SSIM, top layer ↓"),
    ("rand_ssim_all", "rand. SSIM, all layers ↓"),
)

BETTER: dict[str, str] = {key: ("higher" if title.endswith("↑") else "lower") for key, title in _COLUMNS}
"""For each metric of a :class:`MetricRow`, whether a ``"higher"`` or a ``"lower"`` value is better."""


def _mean(t: Tensor) -> float:
    return float(torch.nanmean(t.float()))


def _check_classifier(model: nn.Module) -> None:
    """Refuse a model whose :class:`~salience._core.info.ModelInfo` says it regresses: every column
    scores "the predicted class" (its softmax probability, another class for random logit), which
    for regressed quantities is the larger of two unrelated numbers."""
    info = model_info(model)
    if info.task == "regression":
        names = f" ({', '.join(info.class_names)})" if info.class_names else ""
        raise SalienceError(
            f"{info.name} is a regression model{names}: salience evaluate scores the predicted class, and its "
            "outputs are not classes; score its maps with the metrics and a regression target instead, e.g. "
            "salience.evidence.deletion(model, x, maps, salience.targets.regression(0), probability=False)")


STEPS_MEANING = "a pass of the model each, the deletion / insertion curves' points less one"
"""What one of the deletion / insertion ``steps`` is, as the count checks say it (``run_evaluation``, dataset runs)."""


def _check_options(steps: int, randomization_images: int, batch_size: int, seed: int, pixels: Optional[int],
                   **flags: bool) -> None:
    """An evaluation's options, checked before any work: a bad one was each row's error, found after every
    method's maps (``batch_size=0`` a raw ``ValueError``; ``randomization_images=0`` "x is an empty batch").
    ``pixels``: an image's H x W, which ``steps``' passes are cut to (``None``: not known yet, checked again)."""
    if pixels is None:
        check_int(steps, "steps", minimum=1)
    else:
        check_count(steps, "steps", 1, STEPS_MEANING, pixels)
    check_int(randomization_images, "randomization_images", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_seed(seed)
    for name, value in flags.items():
        check_flag(value, name)


def _method_list(methods: Optional[Sequence[MethodLike]]) -> Optional[list[MethodLike]]:
    """``methods`` as a list (a string of names separated by commas is split: its letters were taken as
    methods, "unknown method 'v'"), each name once (a second row of the same name lost its maps)."""
    if methods is None:
        return None
    if callable(methods):  # list(fn) was a raw "'function' object is not iterable"
        raise SalienceError(f"methods is one function; give a list of names or functions, e.g. "
                            f"methods=[{getattr(methods, '__name__', 'fn')}]")
    given = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    # a function's row is named by its __name__ (resolve_method): two partials or lambdas were one row, silently
    names = [m if isinstance(m, str) else getattr(m, "__name__", "method") for m in given]
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice and twice[0] in given:
        raise SalienceError(f"method {twice[0]!r} is given twice; give each method once")
    if twice:
        raise SalienceError(f"two methods are named {twice[0]!r} (a function's row is named by its __name__; a "
                            f"partial's is 'method'): give each its own, e.g. fn.__name__ = '{twice[0]}_2'")
    return given


def _baseline_maps(name: str, x: Tensor, masks: Optional[Tensor], seed: int) -> Tensor:
    if name == ORACLE:
        return masks.float()  # type: ignore[union-attr]
    if name == "spectral_residual":
        return spectral_residual(x)
    if name == "sobel_edges":
        return sobel_edges(x)
    if name == "center":
        return center_maps(x)
    # each image's random map from its own stream (its content), not the batch's: the same map alone
    return random_maps((x.shape[0], *x.shape[-2:]), seed=image_seeds(x, seed), device=x.device)


def _method_only(row: MetricRow, model: nn.Module, x: Tensor, fn: Callable[..., Tensor], target: Tensor,
                 seed: int) -> None:
    """The tests that need the method, not only its maps (on a few images), into its row: the
    cascading model randomization (not on a TorchScript model, which can be neither hooked nor
    re-initialized layer by layer: its columns stay empty), max-sensitivity and the random-logit test."""
    if not isinstance(model, torch.jit.ScriptModule):
        r = randomization(model, x, fn, target, seed=seed)
        row.randomization = r.as_dict()
        row.rand_top, row.rand_all = r["spearman_abs"][0], r["spearman_abs"][-1]
        row.rand_ssim_top, row.rand_ssim_all = r["ssim"][0], r["ssim"][-1]
    row.max_sens = _mean(max_sensitivity(model, x, fn, target, seed=seed))
    row.random_logit = _mean(random_logit(model, x, fn, target, seed=seed))


def score_maps(row: MetricRow, model: nn.Module, x: Tensor, maps: Tensor, masks: Optional[Tensor], target: Tensor,
               *, steps: int = 24, batch_size: int = 32, seed: int = 0,
               probability: ProbabilityLike = True) -> MetricRow:
    """Localization (with ``masks``), faithfulness and complexity of one set of maps ``(B, H, W)``
    of ``x`` for the classes ``target`` ``(B,)``, written into ``row`` and returned; every metric
    with its default settings (``steps``: of deletion / insertion; ``probability``: how deletion,
    insertion and ROAD score the class, :data:`salience.evidence.PROBABILITY`;
    faithfulness correlation scores the raw output, as in its paper)."""
    check_probability(probability)
    if masks is not None:
        row.pointing = _mean(pointing_game(maps, masks))
        row.energy = _mean(energy_in_mask(maps, masks))
        row.box_iou = _mean(weak_localization(maps, masks))
    bs = max(batch_size, 64)
    dc = deletion_curves(model, x, maps, target, steps=steps, batch_size=bs, seed=seed, probability=probability)
    ic = insertion_curves(model, x, maps, target, steps=steps, batch_size=bs, seed=seed, probability=probability)
    row.deletion, row.insertion = _mean(auc(dc)), _mean(auc(ic))
    row.curves = {"deletion": dc.mean(0).tolist(), "insertion": ic.mean(0).tolist()}
    row.road_morf = _mean(road(model, x, maps, target, batch_size=bs, seed=seed, probability=probability))
    row.road_lerf = _mean(road(model, x, maps, target, order="lerf", batch_size=bs, seed=seed,
                               probability=probability))
    row.faith_corr = _mean(faithfulness_correlation(model, x, maps, target, batch_size=bs, seed=seed))
    row.sparseness, row.complexity = _mean(sparseness(maps)), _mean(complexity(maps))
    return row


def bound_methods(model: nn.Module, x: Optional[Tensor], methods: Optional[Sequence[MethodLike]] = None,
                  method_options: Optional[MethodOptions] = None) -> list[tuple[str, Callable[..., Tensor]]]:
    """The methods evaluated, as ``(name, function)`` with their options bound: ``methods`` (names
    or functions; default: those that apply, :func:`salience.methods.default_methods` on ``x[:1]``,
    or without ``x`` on an image of the model's input size), each named one with its
    :data:`~salience.methods.QUICK` options, then ``method_options``
    (``{name: {keyword: value}}``, as :func:`salience.explain_dataset` takes them; they override
    ``QUICK``). A name in ``method_options`` that is not evaluated, or an option its method does not
    take, is a :class:`SalienceError`. The maps, the metrics, the randomization tests and the data
    randomization all call these functions. Without ``methods``, a method given ``grid`` / ``prefix_tokens`` in
    ``method_options`` is chosen with them (as ``salience evaluate --grid / --prefix-tokens``): a CAM or attention
    method is kept where they read the tokens (a ViT-like model whose tokens read two ways without them)."""
    chosen = methods if methods is not None else default_names(model, x, method_options or {})
    items = [resolve_method(m, called=False) for m in chosen]
    fns = dict(items)
    for name, given in (method_options or {}).items():
        fns[name] = with_options(fns, name, given)
    for name, fn in fns.items():  # with its options bound: a function that takes no target, a keyword-only one unset
        problem = shape_problem(fn)
        if problem is not None:
            raise ArgumentError(f"methods[{name!r}]: {problem}")
    return list(fns.items())


def default_names(model: nn.Module, x: Optional[Tensor], method_options: Mapping[str, Any]) -> list[str]:
    """The methods evaluated by default: :func:`default_methods` (no ``grid`` / ``prefix_tokens``), plus each
    method that its own ``grid`` / ``prefix_tokens`` in ``method_options`` keeps (a CAM or attention method on a
    ViT-like model whose tokens read two ways without them). The token-aware choice only adds: a method given them
    that the plain choice has stays, so its own check of them speaks (GradCAM given ``grid`` on a CNN). One choice
    per distinct pair; ``salience evaluate --grid / --prefix-tokens`` picks with this too."""
    def tokens(name: str) -> tuple[Any, Any]:
        given = method_options.get(name)
        given = given if isinstance(given, Mapping) else {}
        return given.get("grid"), given.get("prefix_tokens")

    choices: dict[str, list[str]] = {}
    for grid, prefix in [(None, None)] + [tokens(name) for name in method_options]:
        if repr((grid, prefix)) not in choices:  # a list is no key: its repr is
            choices[repr((grid, prefix))] = default_methods(model, x, grid=grid, prefix_tokens=prefix)
    plain = choices[repr((None, None))]
    return [name for name in METHODS if name in plain or name in choices[repr(tokens(name))]]


def options_record(items: Sequence[tuple[str, Callable[..., Any]]]) -> dict[str, dict[str, Any]]:
    """The options each method ran with beyond its defaults (its bound keywords: ``QUICK``'s and the
    ones given), as ``results.json`` and the report say them: a method by its name, a value that is
    no number, name or flag by its ``repr``."""
    def shown(v: Any) -> Any:
        if callable(v):
            return show_default(v)
        return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)

    return {name: {k: shown(v) for k, v in getattr(fn, "keywords", {}).items()} for name, fn in items}


def evaluate_methods(
    model: nn.Module,
    x: Tensor,
    masks: Optional[Tensor] = None,
    *,
    methods: Optional[Sequence[MethodLike]] = None,
    method_options: Optional[MethodOptions] = None,
    baselines: bool = True,
    steps: int = 24,
    randomization_images: int = 8,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    probability: ProbabilityLike = True,
) -> tuple[list[MetricRow], dict[str, Tensor]]:
    """Every method (default: those that apply, :func:`salience.methods.default_methods`), the
    oracle (the mask as the map, with ``masks``) and the model-free :data:`BASELINES` through
    the metrics on ``x`` ``(B, C, H, W)`` with optional ``masks`` ``(B, H, W)``.

    The target is the class the model predicts on each image. Returns one :class:`MetricRow`
    per method, then the oracle's and the baselines' rows (with ``baselines``), and the maps
    ``{name: (B, H, W)}``. A method that fails (e.g. Grad-CAM on a model without convolutions)
    gets a row with its ``error`` and the others go on; so does one whose maps cannot be scored
    (e.g. the model gives NaN on a perturbed copy of an image: ``error`` starts "scoring its
    maps:", none of its metrics are kept, its maps are). A regression model (``ModelInfo.task``) is
    refused: its outputs are not classes. ``probability``: how deletion, insertion and ROAD score
    the class (:data:`salience.evidence.PROBABILITY`: ``"sigmoid"`` for a multilabel
    model). Every random draw of an image comes from its own stream (``seed`` and its content,
    :func:`salience.evidence.image_seeds`): an image's values do not depend on the others in ``x``.
    A program exported with a bounded batch (:func:`salience._core.info.max_batch`) runs every pass
    within it: at most that many ``randomization_images`` (the test's one batch). ``method_options``:
    ``{name: {keyword: value}}``, each method's options (:func:`bound_methods`): its maps, metrics and
    randomization tests all run with them. ``steps`` is the deletion / insertion curves' (a method's own
    ``steps``, Integrated Gradients', goes in ``method_options``).
    """
    _check_classifier(model)
    check_probability(probability)
    pixels = x.shape[-2] * x.shape[-1] if isinstance(x, Tensor) and x.dim() >= 2 else None
    _check_options(steps, randomization_images, batch_size, seed, pixels, baselines=baselines, progress=progress)
    methods = _method_list(methods)
    x = check_input(x, model)
    masks = check_masks(masks, x[:, 0]) if masks is not None else None
    items = bound_methods(model, x, methods, method_options)
    fns = dict(items)
    extra = ([ORACLE] if masks is not None else []) + list(BASELINES)
    names = [n for n, _ in items] + (extra if baselines else [])
    target = predicted_classes(model, x, batch_size=batch_size)
    rows: list[MetricRow] = []
    all_maps: dict[str, Tensor] = {}
    k = min(randomization_images, max_batch(model) or randomization_images)  # the test runs them as one batch
    with _progress(len(names), "evaluate", enabled=progress) as bar:
        for name in names:
            row = MetricRow(name)
            t0 = time.perf_counter()
            try:
                if name in fns:
                    maps = method_maps(fns[name], model, x, target, batch_size=batch_size)
                    _method_only(row, model, x[:k], fns[name], target[:k], seed)
                else:
                    maps = _baseline_maps(name, x, masks, seed)
            # Any error, not only SalienceError: a user's method may raise anything. It is not
            # swallowed: the row carries it into every table, and the other methods go on.
            except Exception as e:  # noqa: BLE001
                # a table cell: torch's C++ frames left out
                row.error = f"{type(e).__name__}: {first_line(e, empty='')}"
            else:
                row.seconds = time.perf_counter() - t0
                all_maps[name] = maps
                try:  # the metrics of its maps: a model that gives NaN on its perturbed copies fails this row only
                    score_maps(row, model, x, maps, masks, target, steps=steps, batch_size=batch_size, seed=seed,
                               probability=probability)
                except Exception as e:  # noqa: BLE001 - as a method's failure above
                    row = MetricRow(name, seconds=row.seconds,
                                    error=f"scoring its maps: {type(e).__name__}: {first_line(e, empty='')}")
            rows.append(row)
            bar.update(1)
    return rows, all_maps


# ----------------------------------------------------------------------------- tables


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.3f}"


def _table(rows: Sequence[MetricRow]) -> tuple[list[str], list[list[str]]]:
    cols = [(k, t) for k, t in _COLUMNS if any(getattr(r, k) is not None for r in rows)]
    header = ["method"] + [t for _, t in cols] + ["time (s)"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.name] + [f"failed: {r.error}"] + [""] * len(cols))
            continue
        body.append([r.name] + [_fmt(getattr(r, k)) for k, _ in cols] + [f"{r.seconds:.2f}"])
    return header, body


def markdown_table(rows: Sequence[MetricRow]) -> str:
    """The results as a GitHub-flavoured markdown table."""
    header, body = _table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- inputs


def check_images(n: int, size: Sequence[int], what: str, *, holder: str = "an evaluation",
                 flag: str = "salience evaluate --n") -> None:
    """A :class:`SalienceError` where ``n`` images of ``size`` ``(H, W)`` are more than :data:`MAX_PIXELS` pixels: an
    evaluation holds every image at once. ``what``: the images as the user chose them (``"held-out shapes images"``);
    ``holder``: what holds them (``"the demo report"``); ``flag``: the option that gives ``n``."""
    n, h, w = int(n), int(size[0]), int(size[1])  # numpy's int64 n: n * h * w wrapped past 2**63 and was let through
    if n * h * w <= MAX_PIXELS:
        return
    kept = "every image, its picture and each method's map are kept at once"
    if h * w > MAX_PIXELS:  # "give n at most 0" said nothing the user could do
        raise SalienceError(f"one of the {what} is {h}x{w}, {count_text(h * w)} pixels, more than the {MAX_PIXELS:,} "
                            f"{holder} holds here ({kept}); give smaller images: a model whose input size is this "
                            "large cannot be evaluated here")
    raise SalienceError(f"n={count_text(n)} {what} of {h}x{w} are {count_text(n * h * w)} pixels, more than the "
                        f"{MAX_PIXELS:,} {holder} holds here ({kept}, {count_text(n * h * w * 24)} bytes of the "
                        f"images alone); give n at most {MAX_PIXELS // (h * w):,} ({flag})")


def _demo_size(model: nn.Module) -> int:
    """The side of the held-out shapes images for ``model``: its square input size (at least 32), else 64."""
    info = model_info(model)
    if info.input_size is not None and info.input_size[0] == info.input_size[1] and info.input_size[0] >= 32:
        return int(info.input_size[0])
    return 64


def _demo_inputs(model: nn.Module, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor, str, str]:
    """``n`` held-out shapes images for ``model``: its input, the pictures, the masks, a one-line
    description and the call that made them (what a constant mask's text names)."""
    info = model_info(model)
    size = _demo_size(model)
    check_images(n, (size, size), "held-out shapes images")  # before any is drawn
    b = data.shapes_batch(n, seed, size=size)
    x = normalize_input(b.images, info)
    made = f"salience.demo.data.shapes_batch({n}, seed={seed}, size={size})"
    return x, b.images, b.masks, f"{n} held-out shapes images (salience.data, seed {seed}, {size}x{size})", made


def _names(paths: Sequence[Path], k: int = 5) -> str:
    shown = ", ".join(p.name for p in paths[:k])
    return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")


def _image_files(folder: Path, n: int) -> list[Path]:
    if not folder.is_dir():
        raise SalienceError(f"images={folder} is not a folder; give a folder of image files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)[:n]
    if not files:
        raise SalienceError(f"images={folder}: no image files ({', '.join(_IMAGE_SUFFIXES)}) in it")
    return files


def _mask_files(mfolder: Path, files: Sequence[Path], folder: Path) -> list[Path]:
    """The mask of each image file: the file in ``mfolder`` with the image's stem."""
    if not mfolder.is_dir():
        raise SalienceError(f"masks={mfolder} is not a folder; give a folder of mask images")
    by_stem: dict[str, Path] = {}
    for p in sorted(mfolder.iterdir()):
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES:
            if p.stem in by_stem:
                raise SalienceError(f"masks={mfolder}: two masks for the image {p.stem!r}: "
                                    f"{by_stem[p.stem].name} and {p.name}; keep one")
            by_stem[p.stem] = p
    missing = [p for p in files if p.stem not in by_stem]
    if missing:
        raise SalienceError(
            f"{len(missing)} of {len(files)} images in {folder} have no mask of the same name in {mfolder} "
            f"({_names(missing)}); the mask of cat.jpg is e.g. cat.png"
        )
    return [by_stem[p.stem] for p in files]


def _pictures(files: Sequence[Path], info: ModelInfo) -> Tensor:
    """Each image file decoded once and resized for the model: ``(N, 3, h, w)`` in ``[0, 1]``.

    As :func:`salience.loading.load_images` does: resized and cropped as ``info`` says, and, for
    a model of any size, every image brought to the first image's size. Any unreadable file is an
    error naming it (:func:`_readable_pictures` leaves them out instead).
    """
    pics, skipped = _readable_pictures(files, info)
    if skipped:
        raise SalienceError(f"{len(skipped)} of {len(files)} images could not be read; the first: {skipped[0][1]}; or "
                            "leave the unreadable images out with skip_unreadable=True")
    return pics


def _readable_pictures(files: Sequence[Path], info: ModelInfo) -> tuple[Optional[Tensor], list[tuple[Path, str]]]:
    """The readable ones of ``files`` as :func:`_pictures` makes them, ``(N, 3, h, w)`` (``None`` when none is),
    and ``(file, why)`` of each unreadable one, in order."""
    pics: list[Tensor] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            img = resize_crop(load_image(path), info)
        except SalienceError as e:
            skipped.append((path, str(e)))
            continue
        except MemoryError:
            skipped.append((path, f"{path}: out of memory while decoding"))
            continue
        if pics and img.shape[-2:] != pics[0].shape[-2:]:
            img = keep_flat(img[None], F.interpolate(img[None], size=tuple(pics[0].shape[-2:]), mode="bilinear",
                                                     align_corners=False, antialias=True))[0].clamp(0, 1)
        pics.append(img)
        if len(pics) == 1:  # the size known: all of them held at once, refused before the others are decoded
            check_images(len(files), img.shape[-2:], f"images (of {files[0].parent})")
    return (torch.stack(pics) if pics else None), skipped


def _mask(path: Path, info: ModelInfo, size: tuple[int, int]) -> Tensor:
    """A mask file as bool ``(h, w)``: resized and cropped like its image (nearest), set where its
    brightest channel (its alpha, if it has transparency: :func:`~salience.loading.images.mask_values`) is at
    least half its maximum."""
    mk = resize_crop(mask_values(path), info)
    if tuple(mk.shape[-2:]) != size:
        mk = F.interpolate(mk[None], size=size, mode="nearest")[0]
    mk = mk[0]
    top = float(mk.max())
    return mk >= 0.5 * top if top > 0 else torch.zeros_like(mk, dtype=torch.bool)


def _folder_inputs(model: nn.Module, images: PathLike, masks: Optional[PathLike], n: int
                   ) -> tuple[Tensor, Tensor, Optional[Tensor], str]:
    """:func:`_folder_inputs_and_files` without the mask files."""
    return _folder_inputs_and_files(model, images, masks, n)[:4]


def _folder_inputs_and_files(model: nn.Module, images: PathLike, masks: Optional[PathLike], n: int,
                             skip_unreadable: bool = False
                             ) -> tuple[Tensor, Tensor, Optional[Tensor], str, Optional[list[Path]],
                                        list[tuple[Path, str]]]:
    """The first ``n`` image files of ``images`` (sorted by name) as the model's input
    ``(N, C, h, w)``, the same images in ``[0, 1]`` for pictures ``(N, 3, h, w)``, their masks
    ``(N, h, w)`` bool (``None`` without ``masks``), a one-line description, the mask files
    (image i's mask read from the i-th; ``None`` without ``masks``) and ``(file, why)`` of each image left out.

    A mask is the file in ``masks`` with the image's stem (``cat.jpg`` <-> ``cat.png``), resized
    and cropped like the image, and set where its brightest channel is at least half the mask's
    maximum (so white-on-black, 0/1 label images and coloured label images all work; a mask with transparency
    where its alpha is at least half its largest, :func:`~salience.loading.images.mask_values`). Any image
    without a mask, or any unreadable file, is an error: an evaluation that silently drops images
    is not the evaluation the user asked for. With ``skip_unreadable`` an unreadable image is left out (with its
    mask; every image file still needs one), said in the description (``3 of 4 images``) and in the list returned;
    none readable is still an error. Each file is decoded once.
    """
    info = model_info(model)
    folder = Path(images)
    files = _image_files(folder, n)
    mask_files = _mask_files(Path(masks), files, folder) if masks is not None else None
    if not skip_unreadable:
        raw, skipped = _pictures(files, info), []
    else:
        raw, skipped = _readable_pictures(files, info)
        if raw is None:
            raise _none_readable(len(files), folder, skipped[0][1])
    left_out = {p for p, _ in skipped}
    kept = [i for i, p in enumerate(files) if p not in left_out]
    mask_files = [mask_files[i] for i in kept] if mask_files is not None else None
    x = normalize_input(raw, info)
    size = (int(raw.shape[-2]), int(raw.shape[-1]))
    m = torch.stack([_mask(p, info, size) for p in mask_files]) if mask_files is not None else None
    count = f"{len(kept)} of {len(files)} images" if skipped else f"{len(files)} images"
    source = f"{count} from {folder}" + (f" with masks from {masks}" if masks else "") + (
        f" ({len(skipped)} unreadable, left out: {_names([p for p, _ in skipped])})" if skipped else "")
    return x, raw, m, source, mask_files, skipped


def evaluation_input(model: nn.Module, images: Optional[PathLike] = None, *, n: int = 64,
                     seed: int = 10_000, skip_unreadable: bool = False) -> Tensor:
    """The first image :func:`run_evaluation` evaluates (with the same ``images``, ``n``, ``seed`` and
    ``skip_unreadable``: the first readable one of the first ``n``), as the model's input ``(1, C, H, W)`` on its
    device: for checking options on it before the run (``salience evaluate`` does)."""
    if images is None:
        check_int(n, "n", minimum=1)
        size = _demo_size(model)
        check_images(n, (size, size), "held-out shapes images")  # the run's refusal, before it: image 0 is drawn alone
        x = _demo_inputs(model, 1, seed)[0]
    elif not skip_unreadable:
        x = _folder_inputs(model, images, None, 1)[0]
    else:
        x = _first_readable(model, Path(images), n)
    return model_input(model, x)


def _first_readable(model: nn.Module, folder: Path, n: int) -> Tensor:
    """The first readable one of the first ``n`` image files of ``folder`` as the model's input ``(1, C, h, w)``
    (each file before it decoded, and left out, once; the first's error not decoded again for the refusal): a
    :class:`SalienceError` when none is readable."""
    info = model_info(model)
    files = _image_files(folder, n)
    first_why = ""
    for path in files:
        raw, skipped = _readable_pictures([path], info)
        if raw is not None:
            return normalize_input(raw, info)
        first_why = first_why or skipped[0][1]
    raise _none_readable(len(files), folder, first_why)


def _none_readable(n: int, folder: Path, first_why: str) -> SalienceError:
    """The refusal of ``skip_unreadable`` when none of the ``n`` images of ``folder`` can be read."""
    return SalienceError(f"none of the {n} images in {folder} could be read; the first: {first_why}")


# ----------------------------------------------------------------------------- the report


def run_evaluation(
    model: nn.Module,
    out_dir: PathLike,
    *,
    images: Optional[PathLike] = None,
    masks: Optional[PathLike] = None,
    methods: Optional[Sequence[MethodLike]] = None,
    method_options: Optional[MethodOptions] = None,
    progress: bool = True,
    n: int = 64,
    seed: int = 10_000,
    steps: int = 24,
    randomization_images: int = 8,
    train_fn: Optional[TrainFn] = None,
    train_images: int = 1000,
    probability: ProbabilityLike = True,
    skip_unreadable: bool = False,
) -> Path:
    """Evaluate every method on ``model`` and write the report to ``out_dir``; returns the path
    of ``report.html`` (``report.md`` and ``results.json`` lie beside it).

    ``images``/``masks``: folders of image files and of masks with the same file names (stems);
    without them, ``n`` held-out shapes images with exact masks (seed ``seed``). ``methods``:
    names or functions (default: those that apply, :func:`salience.methods.default_methods`). ``train_fn(images, labels) ->
    model``: if given, also the data randomization test on ``train_images`` shapes (slow: it
    trains two models; see :func:`salience.demo.train.demo_train_fn`). ``probability``: how the
    class is scored (``True`` / ``"softmax"``, ``"sigmoid"`` for a multilabel model, ``False``; see
    :func:`evaluate_methods`). ``method_options``: each method's options, ``{name: {keyword: value}}``
    (e.g. ``{"integrated_gradients": {"steps": 8}}``; :func:`bound_methods`), used by its maps, its
    metrics, its randomization tests and the data randomization alike, and said in the report and in
    ``results.json`` (``method_options``, with the :data:`~salience.methods.QUICK` ones); a name not
    evaluated, an option the method does not take, or a value it refuses (checked on the first image,
    nothing computed) is a :class:`SalienceError` before any work. ``steps``: the deletion / insertion
    curves' steps (``salience evaluate --deletion-steps``), not a method's. An unreadable image among ``images`` is
    an error (a table over fewer images than asked for misleads) unless ``skip_unreadable``: then it is left out,
    the report says ``N of M images``, and ``results.json``'s ``skipped`` lists each one (``image``, ``error``);
    none readable is still an error.
    """
    check_int(n, "n", minimum=1)
    check_probability(probability)
    skip_unreadable = check_flag(skip_unreadable, "skip_unreadable")
    _check_options(steps, randomization_images, 32, seed, None, progress=progress)
    _check_classifier(model)
    if masks is not None and images is None:
        raise SalienceError("masks need their images: give images=DIR too")
    methods = _method_list(methods)
    if methods is not None:
        bound_methods(model, None, methods, method_options)  # unknown names and options: before any image is read
    start = time.perf_counter()
    mask_files: Optional[list[Path]] = None  # the demo's masks are made, not read
    demo_masks: Optional[str] = None  # the call that made them
    skipped: list[tuple[Path, str]] = []  # the unreadable images left out (skip_unreadable)
    if images is None:
        x, raw, m, source, demo_masks = _demo_inputs(model, n, seed)
    else:
        x, raw, m, source, mask_files, skipped = _folder_inputs_and_files(model, images, masks, n, skip_unreadable)
    device = model_device(model)
    x, m = model_input(model, x), (m.to(device) if m is not None else None)  # its device and dtype
    check_count(steps, "steps", 1, STEPS_MEANING, x.shape[-2] * x.shape[-1])  # its passes: before the folder is made
    predicted_classes(model, x, batch_size=32)  # a model that cannot take x: refused before the folder is made
    items = bound_methods(model, x, methods, method_options)
    check_bound_values(model, x[:1], dict(items), method_options)
    if methods is None:  # the defaults chosen once (registry names)
        methods = [name for name, _ in items]
    out = make_folder(out_dir, "out_dir=")  # created only once the inputs are known to be good
    rows, maps = evaluate_methods(model, x, m, methods=methods, method_options=method_options, steps=steps,
                                  randomization_images=randomization_images, progress=progress,
                                  probability=probability)
    pictures = _write_pictures(out, rows, raw, maps)
    flat = constant_notes({r.name: maps[r.name] for r in rows if r.name in maps}, mask_files=mask_files,
                          demo_masks=demo_masks)
    data_rand = None
    if train_fn is not None:
        data_rand = _data_randomization_rows(train_fn, items, train_images, x[:randomization_images])
    used = options_record(items)
    md = _markdown_report(rows, source, model, data_rand, time.perf_counter() - start, used)
    atomic_write(out / "report.md", md.encode("utf-8"))
    results = {
        "source": source,
        "model": model_info(model).name,
        "method_options": used,
        "rows": [r.as_dict() for r in rows],
        "data_randomization": data_rand,
        "warnings": flat,
        "skipped": [{"image": str(p), "error": why} for p, why in skipped],
        "seconds": round(time.perf_counter() - start, 2),
    }
    # Strict JSON: a metric without a value (NaN: a constant map's rank correlation) is null, not the
    # NaN token that JSON.parse, jq and other strict readers refuse.
    text = json.dumps(_json_numbers(results), indent=1, default=float, allow_nan=False)
    atomic_write(out / "results.json", text.encode("utf-8"))
    rep = _html_report(rows, source, model, data_rand, pictures, flat, used)
    rep.paragraph(f"Made in {time.perf_counter() - start:.1f} s.", css="note")
    return rep.write(out / "report.html")


def _json_numbers(value: Any) -> Any:
    """``value`` with every float NaN or infinity (also in tensors and numpy numbers) made ``None``."""
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(v) for v in value]
    if isinstance(value, Tensor):
        return _json_numbers(value.tolist())
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return f if math.isfinite(f) else None


def _write_pictures(out: Path, rows: Sequence[MetricRow], raw: Tensor, maps: dict[str, Tensor]
                    ) -> dict[str, Optional[Path]]:
    """``curves.png``, ``randomization.png`` (methods with a randomization test) and
    ``examples.png`` (when any method made maps); returns ``{"curves" | "randomization" |
    "examples": path or None}``."""
    ok = [r for r in rows if not r.error]
    dc = plots.line_plot({r.name: r.curves["deletion"] for r in ok}, title="deletion: probability of the class",
                         xlabel="fraction of pixels removed (most salient first)")
    ic = plots.line_plot({r.name: r.curves["insertion"] for r in ok}, title="insertion: probability of the class",
                         xlabel="fraction of pixels inserted (most salient first)")
    written: dict[str, Optional[Path]] = {"curves": viz.save_png(out / "curves.png", plots.side_by_side(dc, ic)),
                                          "randomization": None, "examples": None}
    rand_rows = [r for r in ok if r.randomization]
    if rand_rows:
        layers = ["original"] + list(rand_rows[0].randomization["layers"])  # type: ignore[index]
        pics = [plots.line_plot(
            {r.name: [1.0] + list(r.randomization[kind]) for r in rand_rows},  # type: ignore[index]
            title=f"cascading randomization: {label} to the original map", xlabel="re-initialized down to",
            xticks=layers, ylim=(-0.2, 1.0)) for kind, label in (("spearman_abs", "Spearman |map|"), ("ssim", "SSIM"))]
        written["randomization"] = viz.save_png(out / "randomization.png", plots.side_by_side(*pics))
    if maps:
        k = min(4, raw.shape[0])
        written["examples"] = viz.save_png(out / "examples.png", viz.figure(
            raw[:k], {nm: mp[:k] for nm, mp in maps.items()}, overlay=False, scale_to=96))
    return written


def _value_text(v: float) -> str:
    return "zero" if v == 0.0 else f"{v:.4g}"


def _reference_note(name: str, m: Tensor) -> Optional[str]:
    """The text for the oracle's or a baseline's map ``m`` when it is constant, else ``None``: the
    row it belongs to is the table's ceiling or floor, which a map that ranks no pixel above another
    is not (the method's text, of weights and layers, would point at the wrong thing). The oracle's
    ends at "... no ceiling for the methods.": what to check depends on where the masks came from
    (:func:`_mask_check`)."""
    v = viz.constant_value(m)
    if v is None:
        return None
    if name == ORACLE:
        marks = "no pixel" if v == 0.0 else "every pixel" if v == 1.0 else "one value everywhere"
        return (f"the map (the mask) is constant ({_value_text(v)}) everywhere: the mask marks {marks}, so the "
                "oracle ranks no pixel above another and its row is no ceiling for the methods.")
    return (f"the map is constant ({_value_text(v)}) everywhere: the image holds nothing this baseline responds "
            "to (e.g. one flat colour), so it ranks no pixel above another and its row is no floor for the "
            "methods. Check the image")


def _first(items: Sequence[str], k: int = 5) -> str:
    """The first ``k`` of ``items``, comma-separated, and how many more."""
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def _mask_check(where: Sequence[int], mask_files: Optional[Sequence[PathLike]],
                demo_masks: Optional[str] = None) -> str:
    """What to check of the constant masks of images ``where``: the mask files named (``mask_files``:
    image i's mask file, as :func:`run_evaluation` reads a ``masks`` folder; each name quoted as
    Python writes a string, so a name holding ", " stays one name; files in one folder named with it
    once, the current folder not named), the demo's generated masks by image index (``demo_masks``:
    the call that made them), else the rows of the ``masks`` tensor given (:func:`evaluate_methods`)."""
    many = len(where) > 1
    s = "s" if many else ""
    if mask_files is not None:
        files = [Path(mask_files[i]) for i in where]
        folders = {f.parent for f in files}
        if len(folders) == 1:
            folder = folders.pop()
            named = _first([repr(f.name) for f in files]) + ("" if folder == Path(".") else f" in {str(folder)!r}")
        else:
            named = _first([repr(str(f)) for f in files])
        return (f" Check the mask file{s} {named}: the object is where its brightest channel is "
                "at least half its maximum (in a file whose alpha is below half its largest alpha somewhere: where its alpha is "
                "at least half its largest alpha)")
    indices = _first([str(i) for i in where])
    if demo_masks is not None:
        return (" These are the demo's generated masks, not files: image "
                f"{'indices' if many else 'index'} {indices} of {demo_masks}, which draws each image's shape into its mask, so a constant one is salience's fault: report it "
                "with that call, and evaluate on images with masks of your own (salience evaluate --images DIR "
                "--masks DIR; run_evaluation(images=, masks=))")
    return (f" Check the mask{s} of image{s} {indices} "
            f"({_first([f'masks[{i}]' for i in where])}): {'each' if many else 'it'} should be true on the object "
            "and false elsewhere")


def constant_notes(maps: dict[str, Tensor], *, mask_files: Optional[Sequence[PathLike]] = None,
                   demo_masks: Optional[str] = None) -> list[str]:
    """A text per method (or the oracle, or a baseline) and kind of map that is one value everywhere
    among its maps ``(B, ...)``: ``"NAME, J of B image(s) (image i, ...): "`` then, for a method,
    :func:`salience.render.viz.constant_map_note` (its picture a flat colour, its metrics of
    nothing: a rank correlation of a constant map is NaN); for :data:`ORACLE` (an empty or full
    mask) and the :data:`BASELINES` (e.g. Sobel edges of a flat image), a text saying that its row
    is no ceiling / floor and what to check. The first five images are named by position.

    ``mask_files``: the file each image's mask was read from (``run_evaluation`` with a ``masks``
    folder): a constant oracle's text names the files to check, each quoted (``'b.png' in 'masks'``;
    the folder left out when it is the current one); a list of another length than the oracle's
    images is refused (a :class:`SalienceError`). ``demo_masks``: the masks are the demo's own, made
    by this call (``run_evaluation`` without ``images``): the text says so, by image index, and what
    to do. Without either (masks given as a tensor to :func:`evaluate_methods`) it names the masks
    of those images, ``masks[i]``."""
    if mask_files is not None and demo_masks is not None:
        raise SalienceError("constant_notes: give mask_files= (masks read from files) or demo_masks= (the demo's "
                            "generated masks), not both")
    if mask_files is not None and ORACLE in maps and len(mask_files) != maps[ORACLE].shape[0]:
        raise SalienceError(f"mask_files: {len(mask_files)} file(s) for {maps[ORACLE].shape[0]} image(s) of the "
                            "oracle's maps; give one mask file per image, image i's at mask_files[i]")
    out = []
    for name, m in maps.items():
        found: dict[str, list[int]] = {}
        for i in range(m.shape[0]):
            one = m[i].detach().cpu()
            note = _reference_note(name, one) if name == ORACLE or name in BASELINES else viz.constant_map_note(one)
            if note is not None:
                found.setdefault(note, []).append(i)
        for note, where in found.items():
            named = f"image{'s' if len(where) > 1 else ''} {_first([str(i) for i in where])}"
            check = _mask_check(where, mask_files, demo_masks) if name == ORACLE else ""
            out.append(f"{name}, {len(where)} of {m.shape[0]} image(s) ({named}): {note}{check}")
    return out


def _html_report(rows: Sequence[MetricRow], source: str, model: nn.Module, data_rand: Optional[dict],
                 pictures: dict[str, Optional[Path]], flat: Sequence[str] = (),
                 used: Optional[dict[str, dict[str, Any]]] = None) -> Report:
    rep = Report("salience evaluate", f"model {model_info(model).name}; {source}")
    for text in flat:  # flat maps (a method, the oracle, a baseline): said before the numbers they make meaningless
        rep.paragraph(f"warning: {text}", css="bad")
    rep.heading("Methods and metrics")
    said = _options_text(used)
    if said:
        rep.paragraph(said, css="note")
    header, body = _table(rows)
    rep.table(header, body)
    rep.paragraph(_LEGEND, css="note")
    if data_rand:
        rep.heading("Data randomization")
        rep.table(["method", "Spearman |map|", "Spearman", "SSIM", "HOG"], _data_rand_table(data_rand))
        acc = data_rand["train_accuracy"]
        if acc:
            rep.paragraph(f"train accuracy, true labels {acc['true']:.3f}; shuffled labels {acc['shuffled']:.3f}",
                          css="note")
    rep.heading("Deletion and insertion curves")
    rep.figure(pictures["curves"], "mean probability of the predicted class; left deletion (lower is better), "
               "right insertion (higher is better)")
    if pictures["randomization"] is not None:
        rep.heading("Model randomization (cascading, top layer first)")
        rep.figure(pictures["randomization"], "similarity of the map of the randomized model to the original map; "
                   "a method that explains the model should fall quickly")
    if pictures["examples"] is not None:
        rep.heading("Examples")
        rep.figure(pictures["examples"], "the maps of the first images")
    return rep


_LEGEND = (
    "pointing game: share of images whose map maximum is on the object; energy in mask: share of the map's "
    "mass on the object; box IoU: box of the map thresholded at 20% of its maximum vs the object's box; "
    "deletion / insertion AUC: area under the probability of the predicted class as pixels are replaced by / "
    "put back onto a blurred copy of the image in the map's order (Petsiuk et al.); ROAD MoRF / LeRF: mean "
    "probability after removing 10% to 90% of the pixels, most / least relevant first, filled by noisy linear "
    "imputation (Rong et al.); faithfulness corr.: Pearson correlation between the map's sum over random pixel "
    "sets and the output's drop when they are blurred (Bhatt et al.); sparseness: Gini index of |map| "
    "(Chalasani et al.); complexity: entropy of |map| (Bhatt et al.); max-sensitivity: largest relative change of "
    "the map under 2% uniform input noise (Yeh et al.); random-logit SSIM: similarity of the map to the map of a "
    "random other class (Sixt et al.); rand. Spearman / SSIM: Spearman rank correlation / structural similarity "
    "of |map| with the map after re-initializing the top layer / all layers, top down (Adebayo et al.; low means "
    "the map depends on the weights; a map of the image alone would score 1). Rows below the methods: the "
    "oracle (the ground-truth mask as the map: the ceiling), and maps that never look at the model: spectral "
    "residual, Sobel edges, a centred Gaussian, random (the floor)."
)


def _data_rand_table(data_rand: dict) -> list[list[str]]:
    """Rows of the data randomization table: a method's similarities, or why it could not run."""
    rows = [[k] + [_fmt(v[s]) for s in SIMILARITIES] for k, v in data_rand["values"].items()]
    rows += [[k, f"failed: {e}"] + [""] * (len(SIMILARITIES) - 1) for k, e in data_rand.get("errors", {}).items()]
    return rows


def _options_text(used: Optional[dict[str, dict[str, Any]]]) -> str:
    """The options the methods ran with beyond their defaults, one sentence (empty when none)."""
    said = [f"{name} " + ", ".join(f"{k}={v}" for k, v in kw.items()) for name, kw in (used or {}).items() if kw]
    return ("Method options (beyond each method's defaults): " + "; ".join(said) + ".") if said else ""


def _markdown_report(rows: Sequence[MetricRow], source: str, model: nn.Module, data_rand: Optional[dict],
                     seconds: float, used: Optional[dict[str, dict[str, Any]]] = None) -> str:
    parts = [f"# salience evaluate: {model_info(model).name}", "", f"{source}.", ""]
    said = _options_text(used)
    parts += [said, ""] if said else []
    parts += [markdown_table(rows), "", _LEGEND, ""]
    if data_rand:
        parts += ["## Data randomization", "", "| method | Spearman abs | Spearman | SSIM | HOG |",
                  "|---|---|---|---|---|"]
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _data_rand_table(data_rand)]
        acc = data_rand["train_accuracy"]
        if acc:
            parts += ["", f"train accuracy: true labels {acc['true']:.3f}, shuffled {acc['shuffled']:.3f}"]
        parts += [""]
    parts += ["![deletion and insertion curves](curves.png)", "", "![randomization](randomization.png)", "",
              f"Made in {seconds:.1f} s.", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- data randomization


def _data_randomization_rows(train_fn: TrainFn, methods: Sequence[tuple[str, Callable[..., Tensor]]], n_train: int,
                             x: Tensor) -> dict:
    """The data randomization test of every method on ``n_train`` shapes (two models trained once,
    shared by all methods). A method that does not apply to the model (a :class:`SalienceError`)
    is recorded under ``"errors"``; any other error ends the run."""
    b = data.shapes_batch(n_train, 0)
    images, labels = b.images.to(x.device), b.labels.to(x.device)
    trained: dict[str, nn.Module] = {}

    def cached(imgs: Tensor, y: Tensor) -> nn.Module:  # train once per label set, reuse for every method
        key = "true" if torch.equal(y, labels) else "shuffled"
        if key not in trained:
            trained[key] = train_fn(imgs, y)
        return trained[key]

    values: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    acc: dict[str, float] = {}
    for name, fn in methods:  # bound_methods: with the options of the maps and the other tests
        try:
            r = data_randomization(cached, images, labels, x, fn)
        except SalienceError as e:
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        values[name] = r["values"]  # type: ignore[assignment]
        acc = r["train_accuracy"]  # type: ignore[assignment]
    return {"values": values, "errors": errors, "train_accuracy": acc, "n_train": n_train}
