"""One batch of a dataset run: predictions, targets, every method's maps, the summary numbers and
metrics, the thumbnails. The local engine and the Ray actors both call :func:`explain_items`, so
the two engines write the same rows and maps.
"""
from __future__ import annotations

import dataclasses
import io
import math
import numbers
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from salience._core import derived as _derived
from salience._core import perf as _perf
from salience._core.autograd import forward_scores, class_probabilities, model_input, this_thread, unwrap_output
from salience._core.engine import MemoryProbe, default_budget, unbind
from salience._core.errors import SalienceError, user_stacklevel
from salience._core.info import ModelInfo
from salience._core.tensors import model_device
from salience.evidence.faithfulness import deletion, image_names, insertion
from salience.evidence.localization import energy_in_mask, pointing_game
from salience.loading.images import unnormalize
from salience.methods.integrated import CompletenessWarning, GapReport, collect_gaps, report_gaps, thrown_away
from salience.render import viz
from salience.runs.sources import Item
from salience.runs.store import (GIVEN_LABELS_ADVICE, error_column, given_label_difference, label_text,
                                 metrics_error_column)
from salience.targets import Regression

THUMB = 96
"""Thumbnail tile size in pixels (the gallery's)."""
SPRITE_COLUMNS = 16
"""Images per row of a shard's thumbnail sprite; each image is a column of ``1 + len(methods)``
tiles: the image, then each method's overlay (first target)."""
TARGET_MODES = ("predicted", "top", "target", "label", "regression")


@dataclass
class Plan:
    """What each batch needs, picklable (Ray ships it to the actors).

    ``methods``: name -> function ``(model, x, target) -> maps``; ``mode``: how targets are chosen
    (:data:`TARGET_MODES`), ``k`` targets per image, ``fixed``: the class of mode ``"target"``;
    ``labels``: per index (or ``None``); ``item_labels``: each image's label is the one its item
    carries (:attr:`Item.label`: a user's dataset of ``(image, label)`` that does not say its labels
    without reading its items), checked against the ``classes`` of the model when its batch is
    explained; ``metrics``: the metric columns to compute. Mode
    ``"regression"`` (a regression or one-output model): ``fixed`` is the explained output and
    ``direction`` its ``increase`` / ``decrease`` / ``maintain``
    (:func:`salience.targets.regression`), as ``salience explain IMAGE --target OUTPUT --mode``.
    """

    methods: dict[str, Callable[..., Tensor]]
    info: ModelInfo
    paths: Sequence[str]
    mode: str = "predicted"
    k: int = 1
    fixed: Optional[int] = None
    labels: Optional[Sequence[Optional[int]]] = None
    metrics: Sequence[str] = ()
    item_labels: bool = False
    classes: Optional[int] = None
    thumbs: bool = True
    metric_options: dict[str, Any] = field(default_factory=dict)
    direction: str = "increase"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Each method's map shape for one target (``(H, W)`` or ``(C, H, W)``), once known: the NaN
    maps of a batch without any map of it (only failed images, or the method failed) take it."""
    first_input: Optional[tuple[int, tuple[int, ...]]] = None
    """The index and input shape ``(C, H, W)`` of the run's first image explained (with Ray, the
    actor's): every later image must have that shape (:func:`_check_shape`)."""
    gap_warned: bool = False
    """Whether Integrated Gradients' completeness warning was given in this run (once per run; with
    Ray, once per actor): :func:`_warn_gaps`."""
    map_dtype: str = "float16"
    """How the run stores its maps (the run's ``map_dtype``): with float16, :func:`_stored_warning`."""
    storage_warned: set[str] = field(default_factory=set)
    """The methods whose maps float16 storage made constant were said of (:func:`_stored_warning`)."""
    begun_labels: Optional[tuple[str, Sequence[Optional[int]]]] = None
    """A continued run of ``item_labels`` begun when the labels were given (or read) up front: its
    folder and those labels (its ``inputs.parquet``), which each item's label must equal
    (:meth:`label`): a run explains one set of labels, not the first ones for its first shards and
    the items' for the rest. With :attr:`labels_given`: the labels given up front now to a run begun
    reading them with each item (whose committed rows agree with them): each item still to explain
    must carry its given label, so that the run's rows stay the labels its items carry."""
    labels_given: bool = False
    """Whether :attr:`begun_labels` are labels given now (``labels=``, ``--labels-csv``) to a run begun
    reading its labels with each item, rather than those the run was begun with: what a refusal says
    (:func:`begun_label_refusal`)."""
    seed: Optional[int] = None
    """The run's seed (its ``run.json``'s ``seed``, :func:`draw_seed`): what SmoothGrad's and RISE's
    ``seed=None`` are in the run (:func:`call_method`)."""

    def has_labels(self) -> bool:
        """Whether the rows have labels (given, or the items')."""
        return self.labels is not None or self.item_labels

    def label(self, it: Item) -> Optional[int]:
        """Image ``it``'s label (``None``: none): the given one, else the one its item carries,
        which must be one of the model's ``classes`` (and, in a run begun with its labels up front,
        the one it was begun with: :attr:`begun_labels`)."""
        if self.labels is not None:
            return self.labels[it.index]
        v = it.label if self.item_labels else None
        if self.item_labels and self.begun_labels is not None:
            folder, was = self.begun_labels
            if it.index < len(was) and (refusal := begun_label_refusal(folder, it.index, self.paths[it.index],
                                                                       was[it.index], v, self.labels_given)
                                        ) is not None:
                raise refusal
        if v is not None and self.classes is not None and not 0 <= v < self.classes:
            raise SalienceError(f"label {v} of image {it.index} ({self.paths[it.index]}) is out of range for the "
                                f"model's {self.classes} classes (0..{self.classes - 1}); fix the labels")
        return v

    def regression(self) -> Optional[Regression]:
        """The regression target of a regression run, else ``None``."""
        return Regression(int(self.fixed or 0), self.direction) if self.mode == "regression" else None


def begun_label_refusal(folder: str, index: int, path: str, was: Optional[int], now: Optional[int],
                        given: bool = False) -> Optional[SalienceError]:
    """The refusal of image ``index`` (``path``) whose item carries the label ``now`` in a run (in
    ``folder``) begun with ``was`` given up front (:attr:`Plan.begun_labels`); ``None`` when they agree.
    ``given``: ``was`` is the label given now to a run begun reading its labels with each item
    (:attr:`Plan.labels_given`); a ``None`` label is said as no label. :meth:`Plan.label` and the Ray
    decoding tasks (each sent only its images' begun labels) raise it."""
    if was == now:
        return None
    if given:
        detail = given_label_difference(index, path, now, was, "item carries")
        return SalienceError(f"{folder} holds a run of a different command ({detail}); {GIVEN_LABELS_ADVICE}")
    carried = "the label its item carries" if now is not None else "its item carries no label"
    return SalienceError(
        f"{folder} holds a run of a different command (labels: image {index} ({path}): label {label_text(was)} "
        f"-> {label_text(now)}, {carried}; the run was begun with its labels given up front); give the same labels= "
        "to continue it, choose another out=, or add overwrite=True to start again")


@dataclass
class Result:
    """A batch's rows (index order), maps per method ``(n, K, ...)`` float32 (NaN for failed
    images), and the uint8 thumbnail tiles ``(n, 1 + M, T, T, 3)``."""

    rows: list[dict[str, Any]]
    maps: dict[str, np.ndarray]
    tiles: Optional[np.ndarray]


SEED_STRIDE = 1_000_003
"""Image ``i`` of a run whose SmoothGrad has ``seed=S`` is seeded with ``(S * SEED_STRIDE + i) % 2**63``."""


def image_seed(seed: int, index: int) -> int:
    """The SmoothGrad seed of image ``index`` (its index in the run, the ``index`` column) of a run
    whose SmoothGrad has ``seed``: ``(seed * 1_000_003 + index) % 2**63``. The stored map of that
    image is ``salience.smoothgrad(model, x[None], target, seed=image_seed(seed, index), ...)``
    with the run's other options, whichever images share its batch (``--batch``)."""
    return (int(seed) * SEED_STRIDE + int(index)) % 2 ** 63


def draw_seed() -> int:
    """A run's seed, drawn once when a run begins and kept in its ``run.json`` (``seed``): what a method's
    ``seed=None`` stands for in that run (:func:`call_method`), so a continued run draws what an
    uninterrupted one does."""
    return secrets.randbits(63)


def per_image_seeds(fns: Mapping[str, Callable[..., Tensor]]) -> list[str]:
    """The methods of ``fns`` whose images get seeds of their own (:func:`image_seed`): part of a
    run's command, so that a run begun when one seed drew the whole batch's noise is not continued
    with per-image noise (its maps would mix the two)."""
    return [name for name, fn in fns.items() if _run_seed(fn, 0) is not None]


def _int_seed(seed: Any, run_seed: Optional[int]) -> Optional[int]:
    """An int ``seed`` as it is; ``None`` the run's seed (``run_seed``; ``None`` outside a run); else ``None``."""
    if seed is None:
        return run_seed
    return int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else None


def _run_seed(fn: Callable[..., Tensor], run_seed: Optional[int] = None) -> Optional[int]:
    """The seed of ``fn`` if it is SmoothGrad (``salience.smoothgrad`` or a ``functools.partial`` of
    it, as the command line binds options) with an int seed, or with ``seed=None`` in a run (the run's
    seed ``run_seed``), else ``None``: its images get seeds of their own (:func:`image_seed`)."""
    from salience.methods.smoothgrad import smoothgrad

    fn, keywords = unbind(fn)
    return _int_seed(keywords.get("seed", 0), run_seed) if fn is smoothgrad else None  # 0: smoothgrad's default


def _mask_seed(fn: Callable[..., Tensor], run_seed: Optional[int]) -> Optional[int]:
    """RISE (``salience.rise`` or a ``functools.partial`` of it) with ``seed=None`` in a run: the run's seed
    ``run_seed`` for its masks, the same for every image of every batch as an int seed's; else ``None``."""
    from salience.methods.perturbation import rise

    fn, keywords = unbind(fn)
    return run_seed if fn is rise and "seed" in keywords and keywords["seed"] is None else None


def call_method(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Any,
                indices: Optional[Sequence[int]] = None, run_seed: Optional[int] = None) -> Tensor:
    """``fn(model, x, target)``; SmoothGrad with the seeds of images ``indices`` (:func:`image_seed`). In a
    run (``run_seed``: its seed, :func:`draw_seed`), a ``seed=None`` of SmoothGrad or RISE is that seed.
    A refusal that names images (NaN scores) names them by ``indices``: a rerun's part, or a batch,
    numbers them from 0."""
    seed = _run_seed(fn, run_seed) if indices is not None else None
    masks = _mask_seed(fn, run_seed)
    try:
        if seed is not None:
            return fn(model, x, target, seed=[image_seed(seed, i) for i in indices])
        return fn(model, x, target) if masks is None else fn(model, x, target, seed=masks)
    except SalienceError as e:
        named = _derived.renamed(e, indices) if indices is not None else None
        if named is None:
            raise
        raise named.with_traceback(e.__traceback__) from None


def _predictions(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return _probabilities(_outputs(model, x))


def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output on ``x`` (no softmax stripped): the prediction pass, a plain pass under the
    performance options in force (:func:`salience._core.perf.one_pass`: the folded copy, the compiled
    graph for the run's batch size, built once and reused batch after batch). A compiled pass runs
    as the gradient passes do (``gradient_graph``), so it and the one-pass methods' input gradients
    share one graph."""
    with _perf.one_pass(model, x, tag="predictions", gradient_graph=True):
        return forward_scores(model, x, strip_softmax=False, compiled=True)


def _probabilities(out: Tensor) -> tuple[Tensor, Tensor]:
    out = out.detach().reshape(out.shape[0], -1).float().cpu()
    probs = class_probabilities(out)
    return probs, out


def _first_pass(plan: Plan, model: nn.Module, x: Tensor,
                indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Explaining the predicted class (one target), or a regression output: the first method runs
    with ``target=None`` (or the regression target) and
    the model's output on the clean images is read from that method's own forward pass (a forward
    hook that keeps the output of the call whose input is ``x``), so no separate prediction pass
    is paid (a second forward only when the method never ran the model on ``x`` itself, e.g.
    SmoothGrad's noisy copies). The hook is an observer (:func:`salience._core.perf.observer`): a
    folded copy or a compiled graph running the pass under the performance options calls it with its
    output, and its input may be ``x`` in another layout (channels-last), so it is recognised by
    its values. Returns ``(maps (n, 1, ...), output, classes (n, 1))``."""
    seen: list[Tensor] = []

    def keep(_module: nn.Module, args: tuple, output: Any) -> None:
        if not seen and args and isinstance(args[0], Tensor) and args[0].shape == x.shape \
                and (args[0].data_ptr() == x.data_ptr() or torch.equal(args[0].detach(), x)):
            seen.append(unwrap_output(output, model).detach())

    name, fn = next(iter(plan.methods.items()))
    # compiled / folded passes may skip it; a TorchScript model takes no hook (the second forward reads its output)
    handle = (None if isinstance(model, torch.jit.ScriptModule)
              else model.register_forward_hook(_perf.observer(this_thread(keep))))
    try:  # IG's first chunk, x's B rows, thrown away for a near tie: its output is not the class's (the plain pass)
        with thrown_away(seen.clear):
            m = call_method(fn, model, x, plan.regression(), indices, plan.seed).detach().float().cpu().unsqueeze(1)
    finally:
        if handle is not None:
            handle.remove()
    out = seen[0] if seen else _outputs(model, x)
    if plan.mode == "regression":
        return m, out, torch.full((out.shape[0], 1), int(plan.fixed or 0), dtype=torch.long)
    return m, out, out.reshape(out.shape[0], -1).argmax(1, keepdim=True).cpu()


def _targets(plan: Plan, probs: Tensor, labels: Sequence[Optional[int]]) -> Tensor:
    """The ``(n, K)`` classes to explain (``labels``: each image's, for mode ``"label"``)."""
    n = probs.shape[0]
    if plan.mode in ("target", "regression"):
        return torch.full((n, 1), int(plan.fixed or 0), dtype=torch.long)
    if plan.mode == "label" and plan.has_labels():
        pred = probs.argmax(1)
        return torch.tensor([[v if v is not None else int(pred[j])] for j, v in enumerate(labels)], dtype=torch.long)
    return probs.topk(min(plan.k, probs.shape[1]), dim=1).indices.cpu()


def display(m: Tensor) -> Tensor:
    """Maps ``(n, H, W)`` or per channel ``(n, C, H, W)`` -> ``(n, H, W)`` (``max_c |m|``)."""
    return m.abs().amax(1) if m.dim() == 4 else m


def _method_maps(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, classes: Tensor, plan: Plan,
                 indices: Sequence[int]) -> Tensor:
    """One method's maps ``(n, K, ...)`` float32 on the CPU, of the run's images ``indices``."""
    reg = plan.regression()
    target = reg if reg is not None else (classes[:, 0] if classes.shape[1] == 1 else classes).to(x.device)
    m = call_method(fn, model, x, target, indices, plan.seed).detach().float().cpu()
    return m.unsqueeze(1) if classes.shape[1] == 1 else m


def _refused_images(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, classes: Tensor, plan: Plan,
                    indices: Sequence[int], error: SalienceError,
                    suspects: Sequence[int] = ()) -> tuple[Tensor, dict[int, str]]:
    """After the method ``fn`` refused the batch ``x`` (``error``, e.g. one
    image whose score is NaN): its maps of the images it explains when run without the ones it refuses,
    and its error for each of those (by position in the batch). A bisection (:class:`_Search`): the
    method runs again on two parts (first the ``suspects``, the images whose prediction is not finite,
    apart from the others; else halves), each refused part is split in two again, down to single
    images, so ``k`` refused images of ``n`` cost at most ``2 k ceil(log2 n)`` more calls (every
    refused part's two halves; 2 more when the suspects' part passes) and every one is found. The error
    is the whole call's (an option the model refuses), and raised again, when a single image is refused
    before any part passed, every refusal with the same words (``2 ceil(log2 n)`` more calls; with
    suspects, in the others' part: the suspects' part is meant to be refused). Nothing is remembered
    from one batch to the next: a batch's rows depend on its images only, so a continued run, and the
    Ray engine's actors, write what an uninterrupted local run writes.
    Each image's map is the method's on it as a run without the refused images gives (the methods
    treat the images of a call independently)."""
    def run(part: list[int]) -> Tensor:
        with collect_gaps() as gaps:
            m = _method_maps(fn, model, x[part], classes[part], plan, [indices[j] for j in part])
        for r in gaps:  # Integrated Gradients' reports of a part passed: its positions are the batch's
            report_gaps(dataclasses.replace(r, images=[part[p] for p in r.images]))
        return m

    n = x.shape[0]
    search = _bisection(run, n, error, suspects)
    some = next(iter(search.found.values()))
    m = torch.full((n, *some.shape), float("nan"), dtype=some.dtype)
    for j, v in search.found.items():
        m[j] = v
    return m, search.refused


def _bisection(run: Callable[[list[int]], Any], n: int, error: SalienceError, suspects: Sequence[int]) -> "_Search":
    """:func:`_refused_images`' search over positions ``0 .. n-1`` refused with ``error`` (``run(part)``: the
    results of ``part``, indexable by its positions, or its ``SalienceError``), the ``suspects`` tried apart
    first; also the metrics' (:func:`_metric_rows`). Raises the whole call's error, or the last one when
    every position is refused."""
    if n < 2:
        raise error
    search = _Search(run, error)
    rest = [j for j in range(n) if j not in set(suspects)]
    if suspects and rest:  # the suspects' part is meant to be refused: only the rest's says a whole call's error
        errors = [search.attempt(part) for part in (list(suspects), rest)]
        if errors[1] is not None:
            search.error, search.alike = errors[1], True  # the rest's words, whatever the suspects said
            search.bisect(rest, errors[1])
        if errors[0] is not None and not search.whole:
            search.early = False  # all of them refused says nothing of the call
            search.bisect(list(suspects), errors[0])
    else:
        search.bisect(list(range(n)), error)
    if search.whole:  # the whole call's error
        raise search.error
    if not search.found:  # every image refused, in words of its own: each row says its image's
        raise EachRefused(search.error, search.refused) from search.error
    return search


class _Search:
    """:func:`_bisection`'s state: ``run(part)`` is the method's maps (or the metrics' columns) of the batch's
    positions ``part``, or its ``SalienceError``; ``found`` the maps by position, ``refused`` the errors;
    ``passed``: whether any part passed yet; ``alike``: whether every refusal said what ``error`` says
    (the batch's, or the part's whose bisection may find the whole call's); ``whole``: ``error`` was
    found to be the whole call's; ``early``: whether that may be found (a stop before every refused
    image is found)."""

    def __init__(self, run: Callable[[list[int]], Tensor], error: SalienceError) -> None:
        self.run, self.error = run, error
        self.found: dict[int, Tensor] = {}
        self.refused: dict[int, str] = {}
        self.passed = self.whole = False
        self.alike = self.early = True

    def attempt(self, part: list[int]) -> Optional[SalienceError]:
        """The method on ``part``: its maps in ``found``, or its error."""
        try:
            m = self.run(part)
        except SalienceError as e:
            self.alike = self.alike and str(e) == str(self.error)
            return e
        self.passed = True
        for j, pos in enumerate(part):
            self.found[pos] = m[j]
        return None

    def bisect(self, part: list[int], error: SalienceError) -> None:
        """``part``, which the method refused with ``error``: its halves tried, each refused one bisected
        in turn (depth first), until its refused images are found or the error is the whole call's."""
        if len(part) == 1:
            self.refused[part[0]] = str(error)
            return
        halves = (part[:len(part) // 2], part[len(part) // 2:])
        errors = [self.attempt(half) for half in halves]
        if self.early and not self.passed and self.alike and len(halves[0]) == 1:
            self.whole = True  # a single image refused as the whole batch was, nothing ever passed
            return
        for half, e in zip(halves, errors):
            if e is not None and not self.whole:
                self.bisect(half, e)


def _method_error(row: dict[str, Any], name: str, text: str) -> None:
    """Row ``row``'s ``METHOD.error``: method ``name`` refused its image (``text``); ``error`` stays the
    image's own (:meth:`salience.runs.store.Run.errors_of` reads them back)."""
    row[error_column(name)] = text


def _metrics_error(row: dict[str, Any], name: str, text: str) -> None:
    """Row ``row``'s ``METHOD.metrics_error``: method ``name``'s metrics refused its image (``text``)."""
    row[metrics_error_column(name)] = text


class EachRefused(SalienceError):
    """Every image of a call refused, not alike (:func:`_bisection`): the batch's words, and ``each``
    image's own by its position, which its row says (not the batch's)."""

    def __init__(self, error: SalienceError, each: dict[int, str]) -> None:
        super().__init__(str(error))
        self.each = each


def _said(e: SalienceError, position: int) -> str:
    """What the row of the image at ``position`` says of the refusal ``e``: its own words when the
    bisection found them (:class:`EachRefused`), else the call's."""
    return e.each.get(position, str(e)) if isinstance(e, EachRefused) else str(e)


def _rows_of(kept: list[int], lost: Any) -> Any:
    """The index of a batch tensor's ``kept`` rows: all of them (no copy) when none is ``lost``."""
    return kept if lost else slice(None)


def _metrics(plan: Plan, model: nn.Module, x: Tensor, first: Tensor, classes: Tensor,
             masks: Sequence[Optional[Tensor]]) -> dict[str, list[Optional[float]]]:
    """The metric columns of one method (first target): insertion / deletion AUC, and with masks the
    pointing game and energy in mask (``None`` for an image without a mask)."""
    out: dict[str, list[Optional[float]]] = {}
    opts = plan.metric_options
    reg = plan.regression()
    target = reg if reg is not None else classes[:, 0].to(x.device)
    if "insertion" in plan.metrics:
        out["insertion"] = insertion(model, x, first.to(x.device), target, **opts).tolist()
    if "deletion" in plan.metrics:
        out["deletion"] = deletion(model, x, first.to(x.device), target, **opts).tolist()
    have = [j for j, mk in enumerate(masks) if mk is not None]
    for name, fn in (("pointing", pointing_game), ("energy", energy_in_mask)):
        if name in plan.metrics:
            vals: list[Optional[float]] = [None] * len(first)
            if have:  # the images with a mask, whichever others share their batch
                for j, v in zip(have, fn(first[have], torch.stack([masks[j] for j in have])).tolist()):
                    vals[j] = None if v != v else float(v)
            out[name] = vals
    return out


def _metric_rows(plan: Plan, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Sequence[Optional[Tensor]]],
                 kept: list[int], suspects: Sequence[int], rows: list[dict[str, Any]], name: str) -> None:
    """Method ``name``'s metric columns in ``rows`` (the good items') of the ``kept`` ones it explained;
    ``batch``: their inputs, maps, classes and masks. A metric that refuses them (``SalienceError``: an
    image whose perturbed scores are NaN, or whose prediction is NaN, which a method such as SmoothGrad
    explains all the same) is computed again on parts, as a method is (:func:`_bisection`, the
    ``suspects``, prediction not finite, apart first; a batch of suspects only too): the refused images' rows
    say its error, naming the image by its index in the run (:func:`~salience.evidence.faithfulness.image_names`),
    the others get their columns; an error of the whole call is every row's, as a method's is, and every image
    refused in words of its own says its own (:class:`EachRefused`)."""
    x, m, classes, masks = batch

    def columns(part: list[int]) -> list[dict[str, Optional[float]]]:  # positions in ``kept``: each image's
        at = [kept[p] for p in part]
        sub = _rows_of(at, len(at) != len(m))
        with image_names([rows[j]["index"] for j in at]):  # a refusal names the run's image, not its place here
            cols = _metrics(plan, model, x[sub], display(m[sub, 0]), classes[sub], [masks[j] for j in at])
        return [{col: vals[i] for col, vals in cols.items()} for i in range(len(at))]

    everyone = list(range(len(kept)))
    try:
        found, refused = dict(enumerate(columns(everyone))), {}
    except SalienceError as e:
        inner = [p for p in everyone if kept[p] in set(suspects)]
        try:  # only images whose prediction is not finite too: each found, in its own words
            search = _bisection(columns, len(kept), e, inner)
            found, refused = search.found, search.refused
        except SalienceError as whole:  # the whole call's error (each row says it), or every image's own
            found, refused = {}, {p: _said(whole, p) for p in everyone}
    for p, text in refused.items():
        _metrics_error(rows[kept[p]], name, text)
    for p, cols in found.items():
        for col, v in cols.items():
            rows[kept[p]][f"{name}.{col}"] = v


@dataclass
class Computed:
    """A batch's model work done (:func:`compute_items`), what is left host work (:func:`finish_items`):
    the batch's ``items``, the positions of the ``good`` ones (decoded), the ``rows`` (predictions,
    targets, metrics, errors; the summaries still to fill), each method's maps ``(g, K, ...)`` float32
    on the CPU for the good items (a method that failed on the batch: its NaN maps' shape in
    ``failed``; one that failed on some items only: NaN rows, the positions ``kept`` leaves out), and ``x``: the good items' inputs stacked on the CPU ``(g, C, H, W)`` (the thumbnails')."""

    items: Sequence[Item]
    good: list[int]
    rows: list[dict[str, Any]]
    maps: dict[str, Tensor]
    failed: dict[str, tuple[int, ...]]
    x: Optional[Tensor]
    kept: dict[str, list[int]] = field(default_factory=dict)
    """Per method in ``maps``, the positions in ``good`` of the items it explained: whose summaries,
    ``.constant`` values and metrics the rows get. The others it refused (:func:`_refused_images`): their maps
    are NaN, their rows say the method's error."""


def explain_items(model: nn.Module, items: Sequence[Item], plan: Plan) -> Result:
    """Explain a batch of decoded items (failed ones become rows with their error): the model's work
    (:func:`compute_items`), then the host's (:func:`finish_items`)."""
    return finish_items(plan, compute_items(model, items, plan))


def compute_items(model: nn.Module, items: Sequence[Item], plan: Plan) -> Computed:  # long: one batch, step by step
    """The model's work on a batch of decoded items: predictions, targets, every method's maps
    (moved to the CPU once), the metrics. The local engine's writer thread does the rest
    (:func:`finish_items`) while the model runs the next batch."""
    good = [j for j, it in enumerate(items) if it.error is None]
    rows = [_row(plan, it) for it in items]
    maps: dict[str, Tensor] = {}
    kept_of: dict[str, list[int]] = {}
    xc: Optional[Tensor] = None
    if good:
        _check_shape(plan, model, [items[j] for j in good])
        xc = torch.stack([items[j].x for j in good])
        x = model_input(model, xc)  # its device and dtype
        indices = [items[j].index for j in good]
        with collect_gaps() as found:
            first_maps, probs, classes = _predict(plan, model, x, indices, [rows[j].get("label") for j in good])
        _warn_gaps(plan, next(iter(plan.methods)), found, indices)
        masks = [items[j].mask for j in good]
        for j, pos in enumerate(good):
            _prediction_row(rows[pos], plan, probs[j], classes[j])
        suspects = (~torch.isfinite(probs).all(1)).nonzero().flatten().tolist()  # tried apart on a refusal
        for i_method, (name, fn) in enumerate(plan.methods.items()):
            refused: dict[int, str] = {}  # positions in ``good`` the method refused, when it explained the others
            try:
                with collect_gaps() as found:
                    try:
                        m = (first_maps if i_method == 0 and first_maps is not None
                             else _method_maps(fn, model, x, classes, plan, indices))
                    except SalienceError as e:
                        found.clear()  # what the refused call reported; the parts report their own
                        m, refused = _refused_images(fn, model, x, classes, plan, indices, e, suspects)
                _warn_gaps(plan, name, found, indices)
            except SalienceError as e:  # the whole call's error, or each image's own (EachRefused)
                for j, pos in enumerate(good):
                    _method_error(rows[pos], name, _said(e, j))
                continue
            plan.shapes.setdefault(name, tuple(m.shape[2:]))
            maps[name] = m
            for j, text in refused.items():
                _method_error(rows[good[j]], name, text)
            kept = kept_of[name] = [j for j in range(len(good)) if j not in refused]
            if plan.metrics:
                _metric_rows(plan, model, (x, m, classes, masks), kept, suspects,
                             [rows[pos] for pos in good], name)
    for pos in good:  # explained, but its mask's metrics are missing: the row says why (and the run exits 1)
        if items[pos].mask_error is not None and rows[pos]["error"] is None:
            rows[pos]["error"] = items[pos].mask_error
    # a method that failed on this batch: NaN maps of the right shape
    failed = {name: _map_shape(plan, model, name, items[0].x) for name in plan.methods if name not in maps}
    return Computed(items, good, rows, maps, failed, xc, kept_of)


def finish_items(plan: Plan, done: Computed, warn: Optional[Callable[[str], None]] = None) -> Result:
    """The host's work on a batch whose model work is ``done`` (:func:`compute_items`): each method's
    maps in the batch's rows (NaN for failed images), their summaries and ``.constant`` values, the
    float16 storage's check, the thumbnail tiles. Touches no model, so the local engine runs it in its
    writer thread; ``warn``: what a warning's text goes to (default: ``warnings.warn`` here)."""
    items, good, rows = done.items, done.good, done.rows
    n = len(items)
    maps: dict[str, np.ndarray] = {}
    firsts: dict[str, Tensor] = {}
    for name in plan.methods:
        if name not in done.maps:
            maps[name] = np.full((n, plan.k, *done.failed[name]), np.nan, dtype=np.float32)
            continue
        m = done.maps[name]
        if len(good) == n and m.dtype == torch.float32:  # every item decoded: the maps as they are (no NaN rows)
            maps[name] = m.numpy()
        else:
            maps[name] = np.full((n, *m.shape[1:]), np.nan, dtype=np.float32)
            maps[name][good] = m.numpy()
        first = display(m[:, 0])
        kept = done.kept[name]  # the items the method explained
        lost = len(kept) != len(good)
        firsts[name] = first.nan_to_num(0.0) if lost else first  # the refused items' tiles: blanked below
        where = [good[j] for j in kept]
        for col, vals in _summaries(first[_rows_of(kept, lost)]).items():
            for v, pos in zip(vals, where):
                rows[pos][f"{name}.{col}"] = v
        lo, hi = picture_extremes(m[_rows_of(kept, lost)])
        constants = _constants(lo, hi)
        for c, pos in zip(constants, where):
            rows[pos][f"{name}.constant"] = c
        said = _stored_warning(plan, name, lo, hi, constants, [items[j].index for j in where])
        if said is not None:
            (warn or _warn)(said)
    tiles = _tiles(plan, items, good, firsts, done.x) if plan.thumbs else None
    for c, name in enumerate(plan.methods, start=1):  # an item the method refused: its blank tile, as a failed one's
        explained = set(done.kept.get(name, range(len(good))))
        for j in range(len(good) if tiles is not None else 0):
            if j not in explained:
                tiles[good[j], c] = 235
    return Result(rows, maps, tiles)


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=user_stacklevel())


def _check_shape(plan: Plan, model: nn.Module, items: Sequence[Item]) -> None:
    """A :class:`SalienceError` (the run stops, the batch's shard unwritten) when an image does not
    have the shape of the run's first one: a user's dataset whose items are not all the model's input
    (a raw "stack expects each tensor to be equal size" before, or maps of another size in the run).
    The model's own words when it cannot take the image (what it takes, what to do), else the shapes'."""
    for it in items:
        refusal = shape_refusal(plan, it)
        if refusal is not None:
            with torch.no_grad():  # raises the model's SalienceError for an input it refuses
                forward_scores(model, model_input(model, it.x[None]), strip_softmax=False)
            raise refusal


def shape_refusal(plan: Plan, it: Item) -> Optional[SalienceError]:
    """The error for image ``it`` when its shape is not the run's first image's (``plan.first_input``,
    set from ``it`` when unset), else ``None``; the Ray engine's decoding tasks refuse with it, before
    their images are stacked."""
    shape = tuple(it.x.shape)
    if plan.first_input is None:
        plan.first_input = (it.index, shape)
    if shape == plan.first_input[1]:
        return None
    index, first = plan.first_input
    return SalienceError(
        f"image {plan.paths[it.index]} has shape {shape} but image {plan.paths[index]} had {first}: the "
        "images of a dataset run are the model's input, all of one shape (C, H, W); give the dataset a "
        "transform that returns every item as the model takes it")


def _warn_gaps(plan: Plan, name: str, found: Sequence[GapReport], indices: Sequence[int]) -> None:
    """Integrated Gradients' completeness reports of one method on one batch (positions in the
    batch of the run's images ``indices``) as one :class:`CompletenessWarning` naming the images by
    path, the first time in the run; later batches are not named (the run would print one per batch)."""
    if not found or plan.gap_warned:
        return
    plan.gap_warned = True
    r = found[0]
    names = [str(plan.paths[indices[pos]]) for pos in r.images]
    prefix = "" if name == "integrated_gradients" else f"method {name}: "
    warnings.warn(CompletenessWarning(prefix + r.message(names) + " (said once per run: the images of later "
                                      "batches are not named)", names, r.relative_gaps, r.steps),
                  stacklevel=user_stacklevel())


def _stored_warning(plan: Plan, name: str, lo: np.ndarray, hi: np.ndarray,
                    constants: Sequence[Sequence[Optional[float]]], indices: Sequence[int]) -> Optional[str]:
    """The text of a warning, the first time in the run for method ``name`` (with Ray, once per actor), when maps
    of the run's images ``indices`` that are not constant (``constants``: their ``METHOD.constant``
    values, judged on the float32 maps) are one value everywhere once stored as float16
    (:func:`salience.runs.store.float16_note`): values below float16's range (~1e-8) stored as zeros,
    or closer together than its precision; else ``None``. Judged from the pictures' extremes ``lo``, ``hi`` ``(n, K)``
    (:func:`picture_extremes`) as the store casts them (:func:`salience.runs.store.stored_constants`),
    not from a second cast of the maps. The rows' ``.constant`` stays the float32 map's (the explorer
    says the same of the stored map)."""
    from salience.runs.store import float16_note, stored_constants

    if plan.map_dtype != "float16" or name in plan.storage_warned:
        return None
    stored = stored_constants(lo, hi, np.float16)  # (n, K) flattened
    width = lo.shape[1]
    lost: dict[str, float] = {}
    for j, values in enumerate(constants):
        for k, v in enumerate(values):
            if v is None and stored[j * width + k] is not None:
                lost.setdefault(str(plan.paths[indices[j]]), stored[j * width + k])
    if not lost:
        return None
    plan.storage_warned.add(name)
    named = list(lost)[:NAMED]
    more = f" and {len(lost) - NAMED} more" if len(lost) > NAMED else ""
    return (f"{name}, {len(lost)} image(s) of this batch ({', '.join(named)}{more}): "
            f"{float16_note(next(iter(lost.values())))} (said once per run: the images of later batches are not named)")


def _map_shape(plan: Plan, model: nn.Module, name: str, like: Tensor) -> tuple[int, ...]:
    """Method ``name``'s map shape for one target: known from an earlier batch, else from the method
    run on a black image shaped like ``like`` (``(H, W)`` of the input when it fails there too)."""
    if name not in plan.shapes:
        x = model_input(model, torch.zeros_like(like)[None])
        target = plan.regression() or torch.full((1,), int(plan.fixed or 0), dtype=torch.long, device=x.device)
        try:
            plan.shapes[name] = tuple(plan.methods[name](model, x, target).shape[1:])
        except SalienceError:
            plan.shapes[name] = tuple(like.shape[-2:])
    return plan.shapes[name]


def _predict(plan: Plan, model: nn.Module, x: Tensor, indices: Sequence[int],
             labels: Sequence[Optional[int]] = ()) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """The first method's maps when they came with the prediction (:func:`_first_pass`), the
    probabilities ``(n, classes)`` (a regression run: the outputs' values) and the targets ``(n, K)``."""
    if plan.mode == "regression" or (plan.mode == "predicted" and plan.k == 1):
        try:
            first_maps, out, classes = _first_pass(plan, model, x, indices)
            return first_maps, _scores(plan, out), classes
        except SalienceError:
            pass  # the method's error is recorded when it runs again with the classes
    probs = _scores(plan, _outputs(model, x))
    return None, probs, _targets(plan, probs, labels)


def _scores(plan: Plan, out: Tensor) -> Tensor:
    """What the rows report: the class probabilities, or a regression run's output values ``(n, outputs)``."""
    if plan.mode == "regression":
        return out.detach().reshape(out.shape[0], -1).float().cpu()
    return _probabilities(out)[0]


def _row(plan: Plan, it: Item) -> dict[str, Any]:
    row: dict[str, Any] = {"index": it.index, "path": str(plan.paths[it.index]),
                           "width": it.width if it.error is None else None,
                           "height": it.height if it.error is None else None, "error": it.error}
    if plan.has_labels():
        row["label"] = plan.label(it)
    return row


def _prediction_row(row: dict[str, Any], plan: Plan, probs: Tensor, classes: Tensor) -> None:
    if plan.mode == "regression":  # probs are the outputs' values
        out = int(classes[0])
        row.update(output=out, output_name=plan.info.class_name(out), value=float(probs[out]),
                   values=[float(v) for v in probs], targets=[out])
        return
    pred = int(probs.argmax())
    row.update(predicted=pred, predicted_name=plan.info.class_name(pred), probability=float(probs[pred]),
               targets=[int(c) for c in classes])
    if plan.has_labels() and row.get("label") is not None:
        row["correct"] = pred == row["label"]


def _summaries(first: Tensor) -> dict[str, list[float]]:
    flat = first.reshape(first.shape[0], -1).double()
    return {"min": flat.amin(1).tolist(), "max": flat.amax(1).tolist(), "mean": flat.mean(1).tolist()}


def constant_values(maps: Tensor) -> list[Optional[float]]:
    """Per target, the one value of an image's map ``maps[k]`` that holds one value everywhere
    (:func:`salience.render.viz.constant_value`), else ``None``: the ``METHOD.constant`` column, so
    that the end of a run can say which maps of every target are flat pictures (its ``min`` / ``max``
    are the first target's only). A per-channel map ``(C, H, W)`` is judged as every picture, summary
    and stored-map read of a run shows it, ``max_c |m|`` (:func:`display`): its ``.constant`` is the
    value of ``.min`` and ``.max`` when they are equal, and its thumbnail is then one flat colour
    (channels each constant at other values, ``+1`` and ``-2``, are the constant ``2``)."""
    lo, hi = picture_extremes(maps[None])
    return _constants(lo, hi)[0]


def picture_extremes(m: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The least and greatest value of each picture of maps ``m`` ``(n, K, ...)`` float32, as shown
    (a per-channel map ``(C, H, W)``: ``max_c |m|``, :func:`display`): two ``(n, K)`` arrays of ``m``'s dtype,
    NaN where a picture has one (an empty map: NaN). What its ``.constant`` (:func:`constant_values`)
    and its float16 storage's loss (:func:`_stored_warning`) are judged from, one pass over the maps."""
    if m.numel() == 0:
        nan = np.full(tuple(m.shape[:2]), np.nan)
        return nan, nan.copy()
    pics = (m.abs().amax(2) if m.dim() == 5 else m).reshape(m.shape[0], m.shape[1], -1)
    return pics.amin(-1).numpy(), pics.amax(-1).numpy()


def _constants(lo: np.ndarray, hi: np.ndarray) -> list[list[Optional[float]]]:
    """Per image, per target: the picture's one value when its extremes ``lo``, ``hi`` are equal (and
    finite: :func:`salience.render.viz.constant_value`'s criterion), else ``None``."""
    return [[a + 0.0 if a == b and math.isfinite(a) else None for a, b in zip(x, y)]  # -0.0 -> 0.0
            for x, y in zip(lo.astype(np.float64).tolist(), hi.astype(np.float64).tolist())]


NAMED = 5
"""Images named in a note of :func:`constant_notes` (the others counted)."""


@dataclass
class ConstantMaps:
    """A run table's maps that are one value everywhere, read in one walk of its columns
    (:func:`constant_maps`): each row's ``targets`` (``None``: the row has none), and per method, per
    row, ``(k, value, note)`` for each target ``k`` whose map is constant (``note``:
    :func:`~salience.render.viz.constant_map_note`, ``None`` for a non-finite value of a table
    written by hand). What :func:`constant_notes` and :func:`flat_maps` both say."""

    targets: list[Optional[list[Any]]]
    found: dict[str, list[list[tuple[int, float, Optional[str]]]]]


def constant_maps(table: Any, methods: Sequence[str]) -> ConstantMaps:
    """The constant maps of ``table`` (rows: a whole run, or a page of it) for ``methods``, from the
    ``METHOD.constant`` column (:func:`constant_values`; a row of a run begun before that column, null
    there, has its first target's, read from ``.min`` / ``.max``): one walk, each note made once per value."""
    n = table.num_rows
    targets = table.column("targets").to_pylist() if "targets" in table.column_names else [None] * n
    notes: dict[float, Optional[str]] = {}

    def note(v: float) -> Optional[str]:
        if v not in notes:
            notes[v] = viz.constant_map_note(np.array([v]))
        return notes[v]

    found = {name: [[(k, v, note(v)) for k, v in enumerate(values or []) if v is not None]
                    for values in _table_constants(table, name)] for name in methods}
    return ConstantMaps(targets, found)


def constant_notes(table: Any, methods: Sequence[str], what: str = "image(s)",
                   found: Optional[ConstantMaps] = None) -> list[str]:
    """A text per method and kind of constant map in a run's ``table`` (rows: a whole run, or a
    page of it): the method, how many of the rows (``what`` they are) have one, the first
    :data:`NAMED` named by path (with the classes whose maps are flat when a row has several
    targets), then :func:`salience.render.viz.constant_map_note`. Every target's map, from the
    ``METHOD.constant`` column (:func:`constant_values`); a row of a run begun before that column
    (null there) has its first target's, read from ``.min`` / ``.max`` (constant when its extremes are).
    ``found``: :func:`constant_maps` of the same table and methods, when the caller has it already
    (:func:`flat_maps` says the same maps)."""
    n = table.num_rows
    paths = table.column("path").to_pylist() if "path" in table.column_names else [None] * n
    paths = [p if p is not None else f"row {i}" for i, p in enumerate(paths)]
    found = found if found is not None else constant_maps(table, methods)
    targets = found.targets
    several = any(t is not None and len(t) > 1 for t in targets)
    out = []
    for name in methods:
        said: dict[str, dict[str, list[str]]] = {}  # note -> path -> the classes of its flat maps
        for i, flat in enumerate(found.found[name]):
            for k, _, note in flat:
                if note is not None:
                    kept = targets[i] or []
                    said.setdefault(note, {}).setdefault(paths[i], []).append(str(kept[k]) if k < len(kept) else "?")
        for note, where in said.items():
            named = [f"{p} (class{'es' if len(ks) > 1 else ''} {', '.join(ks)})" if several else p
                     for p, ks in list(where.items())[:NAMED]]
            more = f" and {len(where) - NAMED} more" if len(where) > NAMED else ""
            maps = f"; {sum(len(ks) for ks in where.values())} map(s)" if several else ""
            out.append(f"{name}, {len(where)} of {n} {what} ({', '.join(named)}{more}{maps}): {note}")
    return out


def flat_maps(table: Any, methods: Sequence[str], class_names: Sequence[str] = (),
              found: Optional[ConstantMaps] = None) -> list[dict[str, list[dict[str, Any]]]]:
    """Per row of ``table``, its maps that are one value everywhere (flat pictures; a thumbnail cannot
    say so itself): method -> ``[{"k", "class", "name", "value", "note"}]``, ``k`` the target's position
    (0: the thumbnail's map), ``class`` its class (``None`` when the row does not say), ``name`` its name
    in ``class_names`` (else ``None``), ``value`` the map's one value, ``note``
    :func:`~salience.render.viz.constant_map_note`; methods without one left out. From the
    ``METHOD.constant`` column as :func:`constant_notes` reads it (``found``: :func:`constant_maps`
    of the same table and methods, when the caller has it already): what the explorer's gallery and
    ``index.html`` say under each thumbnail (``constant map (V)``, ``class NAME: constant map (V)``)."""
    n = table.num_rows
    found = found if found is not None else constant_maps(table, methods)
    names = list(class_names or [])
    out: list[dict[str, list[dict[str, Any]]]] = [{} for _ in range(n)]
    for name in methods:
        for i, flat in enumerate(found.found[name]):
            kept = found.targets[i] or []
            said = []
            for k, v, note in flat:
                c = kept[k] if k < len(kept) else None
                said.append({"k": k, "class": c, "name": names[c] if c is not None and 0 <= c < len(names)
                             else None, "value": v, "note": note})
            if said:
                out[i][name] = said
    return out


def _table_constants(table: Any, name: str) -> list[list[Optional[float]]]:
    """Per row of ``table``, the constant value of each target's map of method ``name`` (``None``: not
    constant); a row without the ``.constant`` column's list has its first target's, from ``.min`` / ``.max``."""
    n = table.num_rows

    def column(c: str) -> list[Any]:
        return table.column(c).to_pylist() if c in table.column_names else [None] * n

    return [values if values is not None else
            [None if lo is None or hi is None else viz.constant_value(np.array([lo, hi]))]
            for values, lo, hi in zip(column(f"{name}.constant"), column(f"{name}.min"), column(f"{name}.max"))]


def _tiles(plan: Plan, items: Sequence[Item], good: Sequence[int], firsts: dict[str, Tensor],
           batch: Optional[Tensor] = None) -> np.ndarray:
    """Thumbnail tiles ``(n, 1 + M, T, T, 3)`` uint8: the image, then each method's overlay.
    ``batch``: the good items' images stacked already (the model's input), else stacked here."""
    import torch.nn.functional as F

    n, cols = len(items), 1 + len(plan.methods)
    tiles = np.full((n, cols, THUMB, THUMB, 3), 235, dtype=np.uint8)
    if not good:
        return tiles
    x = (batch if batch is not None else torch.stack([items[j].x for j in good])).float().cpu()
    pics = unnormalize(x, plan.info)  # in [0, 1]
    pics = pics.repeat(1, 3, 1, 1) if pics.shape[1] == 1 else pics[:, :3]
    small = F.interpolate(pics, size=(THUMB, THUMB), mode="bilinear", align_corners=False, antialias=True)
    images = viz.to_uint8_image(small)
    tiles[good, 0] = images
    for c, name in enumerate(plan.methods, start=1):
        if name in firsts:
            m = F.interpolate(firsts[name][:, None], size=(THUMB, THUMB), mode="bilinear", align_corners=False)[:, 0]
            tiles[good, c] = viz.overlay(images, m)  # the images as uint8 once: what overlay makes of ``small``
    return tiles


def sprite(tiles: np.ndarray) -> bytes:
    """A shard's tiles as one JPEG: :data:`SPRITE_COLUMNS` images a row, each a column of tiles."""
    from PIL import Image

    n, c = tiles.shape[:2]
    rows = -(-n // SPRITE_COLUMNS)
    canvas = np.full((rows * c * THUMB, min(n, SPRITE_COLUMNS) * THUMB, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, SPRITE_COLUMNS)
        for j in range(c):
            canvas[(r * c + j) * THUMB:(r * c + j + 1) * THUMB, col * THUMB:(col + 1) * THUMB] = tiles[i, j]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def choose_batch(model: nn.Module, item: Item, plan: Plan, cap: int) -> int:
    """Images per batch from memory: one image's peak memory through the first method, measured by
    :class:`~salience._core.engine.MemoryProbe`, against the engine's budget; at most ``cap``.

    The probe runs with the default performance options (:func:`salience._core.perf.plain`), whatever
    the run's and whatever the method's own keywords (``method_options={"smoothgrad": {"compile": ...}}``,
    a ``functools.partial``): under them its one image would be a call of
    :func:`salience._core.perf.one_pass` (a size seen, not compiled; it was the one compiled size when
    the first call's size was: no real batch ran the compiled graph) or a many-pass call's compiled
    chunks, and its peak would count one-time costs as the image's (the folded copy made in the probe,
    the parameters converted to channels-last, the autocast's copies of the weights). In fp32 on the
    model as it is, the measure is the conservative one, and the batch size the same under every
    option. The method's other options reach it as they reach the batches: those that change the work
    (``samples``, ``steps``) and its memory (``chunk``, ``max_memory``: a many-pass method's peak).
    Integrated Gradients' completeness reports of the probe's image are dropped (the run says its
    images' once, by path)."""
    device = model_device(model)
    x = model_input(model, item.x[None])
    name, fn = next(iter(plan.methods.items()))
    probe = MemoryProbe()
    with _perf.plain(), collect_gaps(), probe:  # its completeness reports dropped: the run says its own
        probs, _ = _predictions(model, x)
        _method_maps(fn, model, x, _targets(plan, probs, [plan.label(item)]), plan, [item.index])
    per = max(int(probe.peak), 1)
    return int(max(1, min(cap, int(0.8 * default_budget(device)) // per)))
