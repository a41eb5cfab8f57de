"""Integrated Gradients (Sundararajan et al. 2017) and input x gradient.

Integrated Gradients attributes ``f(x) - f(x')`` to the input's features:
``IG_i = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da``, the integral taken by a
quadrature rule over ``steps`` points of the straight path from the baseline ``x'`` to ``x``.
The points of all images are run together in chunks by :mod:`salience._core.engine`.
"""
from __future__ import annotations

import contextvars
import math
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from salience import reduce as _reduce
from salience._core import derived as _derived
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.autograd import backward, check_input
from salience._core.errors import SalienceError, user_stacklevel
from salience._core.tensors import baseline_tensor, check_fits, check_int, check_number, gaussian_blur, check_flag
from salience._core.guard import Found, model_guard
from salience.reduce import GradModifier, Reduction
from salience.targets import Classes, Predicted, Target, layers_tag, split
from salience.methods._multi import checked, several_targets, finish, input_gradient_maps, refuse_fp16_overflow

__all__ = ["integrated_gradients", "input_x_gradient", "quadrature", "RULES", "IGResult", "CompletenessWarning",
           "GAP_WARNING", "collect_gaps", "gap_floor", "gaps_to_report"]

RULES = ("trapezoid", "gausslegendre", "left", "right", "middle")
_ALIASES = {"riemann_trapezoid": "trapezoid", "riemann_left": "left", "riemann_right": "right",
            "riemann_middle": "middle", "gauss_legendre": "gausslegendre", "gauss-legendre": "gausslegendre"}


MAX_STEPS = _engine.MAX_PASSES
"""The most points of a trapezoid / Riemann rule (their nodes and weights are built as lists first: ``steps=10**30``
ran the process out of memory before any pass)."""
MAX_STEPS_GAUSS = 1_000
"""The most Gauss-Legendre points (``numpy.polynomial.legendre.leggauss`` solves an n x n eigenproblem: 1,000
points 0.5 s, 4,000 points 26 s and 128 MB here)."""


def quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Nodes ``a_i`` in ``[0, 1]`` and weights ``w_i`` (summing to 1) of a rule with ``steps`` points.

    ``"trapezoid"``: ``a_i = i / (n - 1)``, weights ``1 / (n - 1)``, halved at both ends (exact for
    a linear integrand). Captum's ``riemann_trapezoid`` uses the same nodes with weights ``1 / n``
    (halved at the ends), which sum to ``(n - 1) / n``: its attributions are ``(n - 1) / n`` times
    these. ``"left"``, ``"right"``, ``"middle"``: Riemann sums with ``n`` intervals of width ``1/n``
    (Captum's). ``"gausslegendre"``: Gauss-Legendre nodes and weights mapped to ``[0, 1]``.
    """
    rule = _ALIASES.get(rule, rule)
    n = steps
    if rule == "gausslegendre" and n > MAX_STEPS_GAUSS:
        raise SalienceError(f"steps={n} is more than the {MAX_STEPS_GAUSS:,} points the {rule} rule takes here: its nodes come "
                            "from an n x n eigenproblem (4,000 points took 26 s), and it reaches float precision with "
                            "far fewer (a few hundred)")
    if rule in RULES:  # each point is a forward and backward pass: the cap of every many-pass count, said alike
        _engine.check_passes(n, f"steps={n} of the {rule} rule is", "give fewer steps: the completeness gap stops "
                             "shrinking long before, and rule='gausslegendre' reaches float precision with a few "
                             "hundred")
    if rule == "trapezoid":
        if n < 2:
            raise SalienceError(f"the trapezoid rule needs steps >= 2 (both ends of the path), got {n}")
        nodes = [i / (n - 1) for i in range(n)]
        w = [1.0 / (n - 1)] * n
        w[0] /= 2
        w[-1] /= 2
        return nodes, w
    if rule == "gausslegendre":
        t, wt = np.polynomial.legendre.leggauss(n)
        return (0.5 * (t + 1)).tolist(), (0.5 * wt).tolist()
    if rule == "left":
        return [i / n for i in range(n)], [1.0 / n] * n
    if rule == "right":
        return [(i + 1) / n for i in range(n)], [1.0 / n] * n
    if rule == "middle":
        return [(i + 0.5) / n for i in range(n)], [1.0 / n] * n
    raise SalienceError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")


GAP_WARNING = 1.0
"""The relative completeness gap (:attr:`IGResult.relative_gap`) above which
:func:`integrated_gradients` warns (:class:`CompletenessWarning`): the attributions' sum is off
``f(x) - f(x')`` by more than 100 %. Measured at the default 32 steps (docs/methods.md), healthy
models stay far below it: 256 images of the demo models, a random ResNet-18 and timm ViT-tiny and the
tests' nets, black and blurred baselines: median 0.3 %, largest 0.23. Above it: the tests' small
torchvision ViT at a black baseline (3.8 to 8.8; LayerNorm on a constant image, 0.003 at 2048
steps), random BEiT / ConvNeXtV2 (1e10 and more)."""

SCORE_FLOOR = 0.05
"""The relative gap's denominator is at least this fraction of the larger end score
``max(|f(x)|, |f(x')|)`` (:func:`gap_floor`): where the score barely changes along the path, a gap
of a few % of the score is not called untrustworthy (a blurred baseline on demo:shapes-cue: 0.97
against 1 % of the score, 0.20 against 5 %)."""
SUM_FLOOR = 1e-3
"""... and at least this fraction of ``sum |IG_i|``, far above the float rounding of the attributions' sum."""


def gap_floor(fx: Tensor, fx0: Tensor, abs_sum: Tensor) -> Tensor:
    """The least denominator of the relative gap: ``max(SCORE_FLOOR * max(|f(x)|, |f(x')|),
    SUM_FLOOR * sum |IG_i|, 1e-12)``. Where ``f(x) - f(x')`` is smaller (``f(x) == f(x')``), the gap
    is measured against it, so attributions that do not sum to zero there are still seen, and the
    rounding of a sum of large attributions that cancel is not."""
    return torch.maximum(SCORE_FLOOR * torch.maximum(fx.abs(), fx0.abs()), SUM_FLOOR * abs_sum).clamp_min(1e-12)


def _relative(gap: Tensor, delta: Tensor, floor: Tensor) -> Tensor:
    """``|gap| / max(|f(x) - f(x')|, floor)``."""
    return gap.abs() / torch.maximum(delta.abs(), floor)


class CompletenessWarning(UserWarning):
    """Integrated Gradients' attributions do not sum to ``f(x) - f(x')`` by far (relative gap above
    :data:`GAP_WARNING`): the maps of the images named cannot be trusted. ``images``: their
    positions in the batch (their paths, from a dataset run); ``relative_gaps``: theirs (the largest
    over the targets); ``steps``."""

    def __init__(self, message: str, images: Sequence[Union[int, str]] = (), relative_gaps: Sequence[float] = (),
                 steps: int = 0) -> None:
        super().__init__(message)
        self.images, self.relative_gaps, self.steps = list(images), list(relative_gaps), steps


@dataclass
class GapReport:
    """What one call found: the images (positions in its batch) whose relative gap is above
    :data:`GAP_WARNING`, their gaps, the call's ``steps`` and ``rule``; ``copies``: the noisy copies
    they were seen on (SmoothGrad of IG), else 0."""

    images: list[int]
    relative_gaps: list[float]
    steps: int
    rule: str
    copies: int = 0

    def message(self, names: Optional[Sequence[str]] = None, shown: int = 5) -> str:
        """The warning's text; ``names``: the images' names (default ``image N``)."""
        names = list(names) if names is not None else [f"image {i}" for i in self.images]
        listed = ", ".join(f"{n} ({g:.3g})" for n, g in list(zip(names, self.relative_gaps))[:shown])
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        seen = f" (on {self.copies} of SmoothGrad's noisy copies)" if self.copies else ""
        why = "the gradient is probably very steep near the baseline"
        more_steps = "more steps (steps=256, --steps 256), "
        if not all(math.isfinite(g) for g in self.relative_gaps):
            # a NaN / infinite map: the model's own gradient (or score) is not finite on the path, often at the baseline
            # itself (timm's pvt_v2 at random init, x' = 0: session 51's zoo sweep); more steps do not help there
            why, more_steps = ("the attributions or the scores are NaN or infinite: the model's input gradient is not "
                               "finite at some point of the path, often at the baseline itself"), ""
        return (f"integrated_gradients: the attributions do not sum to f(x) - f(x') by far: relative gap "
                f"|sum(IG) - (f(x) - f(x'))| / |f(x) - f(x')| of {listed}{more}{seen} with steps={self.steps} "
                f"(rule {self.rule!r}), above {GAP_WARNING:g}; these maps cannot be trusted ({why}). "
                f"Use {more_steps}another "
                "baseline (baseline='blur' or the data's mean as a number or tensor; --baseline blur), or "
                "rule='gausslegendre' (--rule gausslegendre), which does not take the gradient at the baseline "
                "itself; return_gap=True gives the gaps")


_gap_sink: contextvars.ContextVar[Optional[list[GapReport]]] = contextvars.ContextVar("salience_ig_gaps", default=None)


class RawGaps(list):
    """A :func:`collect_gaps` list that takes, from each call of :func:`integrated_gradients`, its images' worst
    relative gaps ``(B,)`` as a tensor, unread (a report reads them: a synchronization per call), with its steps
    and rule: ``(worst, steps, rule)``; every call's, above :data:`GAP_WARNING` or not. SmoothGrad of IG reads
    all its chunks' at once, at its end."""


@contextmanager
def collect_gaps(raw: bool = False) -> Iterator[list]:
    """Inside it, :func:`integrated_gradients` appends its :class:`GapReport` to the list yielded
    instead of warning (this thread / context only): callers that run IG many times (SmoothGrad of
    IG, a dataset run) say it once, with their own names for the images, or drop it. ``raw``: a
    :class:`RawGaps` of the unread gaps instead."""
    found: list = RawGaps() if raw else []
    token = _gap_sink.set(found)
    try:
        yield found
    finally:
        _gap_sink.reset(token)


def report_gaps(report: GapReport) -> None:
    """``report`` to the innermost :func:`collect_gaps`, else a :class:`CompletenessWarning` pointing at
    the user's call (:func:`salience._core.errors.user_stacklevel`)."""
    sink = _gap_sink.get()
    if sink is not None:
        sink.append(report)
    else:
        warnings.warn(CompletenessWarning(report.message(), report.images, report.relative_gaps, report.steps),
                      stacklevel=user_stacklevel())


@dataclass
class IGResult:
    """Integrated Gradients with its completeness check (``return_gap=True``).

    ``attributions``: the map (reduced as asked); ``gap``: ``sum(attr) - (f(x) - f(x'))`` per image
    ``(B,)`` (``(B, K)`` for several targets), computed on the signed attributions before any
    reduction; ``delta``: ``f(x) - f(x')``; ``floor``: :func:`gap_floor`. ``relative_gap`` =
    ``|gap| / max(|delta|, floor)``: if it is more than about 1 %, use more steps; above
    :data:`GAP_WARNING` IG warns (:class:`CompletenessWarning`). Unpacks as ``attr, gap = ...``.
    """

    attributions: Tensor
    gap: Tensor
    delta: Tensor
    floor: Optional[Tensor] = None

    @property
    def relative_gap(self) -> Tensor:
        floor = self.floor if self.floor is not None else torch.full_like(self.delta, 1e-12)
        return _relative(self.gap, self.delta, floor)

    def __iter__(self):
        return iter((self.attributions, self.gap))


BASELINE_WORDS = "None/'black' (zeros), 'blur', a number or a tensor"
"""The ``baseline`` values :func:`integrated_gradients` takes, as its refusal of another says them (the command
line says them in its words, :data:`salience.cli.options.COMMAND_WORDS`)."""
BLUR_SIGMA_ALONE = ("blur_sigma is the blur of baseline='blur' and applies to it only; pass baseline='blur', or "
                    "leave blur_sigma out")
"""The refusal of ``blur_sigma`` beside another baseline (the command line says it in its flags,
:data:`salience.cli.options.COMMAND_WORDS`)."""


def _baseline(x: Tensor, baseline: Any, blur_sigma: Optional[float]) -> Tensor:
    """The path's start, ``x``'s shape. ``blur_sigma`` is refused beside any baseline but ``"blur"`` (it was
    ignored there, the map the same whatever its value) and where it is not a number (a raw ``TypeError``; an
    infinite one an ``OverflowError``)."""
    if blur_sigma is not None:
        if not (isinstance(baseline, str) and baseline == "blur"):
            raise SalienceError(BLUR_SIGMA_ALONE)
        check_number(blur_sigma, "blur_sigma", what="the blur's standard deviation in pixels, > 0")
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, str):
        if baseline == "black" or baseline == "zeros":
            return torch.zeros_like(x)
        if baseline == "blur":
            sigma = blur_sigma if blur_sigma is not None else max(1.0, min(x.shape[-2:]) / 20)
            if not sigma > 0:
                raise SalienceError(f"blur_sigma must be > 0 pixels, got {blur_sigma!r}")
            return gaussian_blur(x.detach(), float(sigma))
        raise SalienceError(f"unknown baseline {baseline!r}; expected {BASELINE_WORDS}")
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):  # numpy's numbers too
        try:
            value = float(baseline)
        except OverflowError:  # an int past float's range, 10**400: was the raw OverflowError
            value = math.inf
        if not math.isfinite(value):  # the path points are not checked one by one (they derive from these)
            raise SalienceError(f"the baseline is {baseline!r}; give a finite number")
        return torch.full_like(x, check_fits(value, x.dtype, "baseline"))
    if not isinstance(baseline, Tensor):
        raise SalienceError(f"baseline must be None, 'blur', a number or a tensor, got {type(baseline).__name__}")
    return baseline_tensor(baseline, x)


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    baseline: Union[None, str, float, Tensor] = None,
    steps: int = 32,
    rule: str = "trapezoid",
    reduce: Union[None, str, Reduction] = "grayscale",
    grad_modifier: Union[None, str, GradModifier] = None,
    return_gap: bool = False,
    blur_sigma: Optional[float] = None,
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
) -> Union[Tensor, IGResult]:
    """Integrated Gradients of the target's score along the straight path from a baseline to ``x``.

    ``x``: ``(B, C, H, W)``. ``baseline``: ``None`` (black: zeros), a number, a tensor that broadcasts
    to ``x`` (``(B, C, H, W)`` / ``(1, C, H, W)`` / ``(C, H, W)``, a per-channel mean ``(C, 1, 1)``), or ``"blur"`` (``x`` blurred with a Gaussian
    of ``blur_sigma`` pixels, default ``min(H, W) / 20``; ``blur_sigma`` goes with ``"blur"`` only).
    ``steps`` points, ``rule``:
    ``"trapezoid"`` (default; exact for a linear path integrand),
    ``"gausslegendre"``, ``"left"``, ``"right"``, ``"middle"`` (also Captum's names such as
    ``"riemann_trapezoid"``); see :func:`quadrature`.

    Returns the attributions reduced by ``reduce``: default ``"grayscale"`` (``sum_c |IG|``,
    ``(B, H, W)``); ``None`` gives the signed ``(B, C, H, W)`` attributions, whose sum is
    ``f(x) - f(x')``. With ``return_gap=True``, an :class:`IGResult` ``(attributions, gap)`` where
    ``gap = sum(IG) - (f(x) - f(x'))`` per image. ``target`` as in :func:`salience.vanilla`, resolved
    on ``x`` (the class is the argmax of ``model(x)``, whatever the path's chunks, layout or precision): ``x`` is the
    path's first point, and each image's class is read off its row of the first chunk where the two top scores there
    are more than :data:`TIE_BOUND` apart (fp32 eager on a CPU, a rule with ``a = 1``; scores that are a small
    difference of far larger activations can round by more than that: give their class); else ``x`` runs first in a
    plain fp32 forward pass of its own (what that pass, or a first chunk thrown away for a near tie, writes of the
    model's own state, a counter, a list, is put back before the path). An end point the rule lacks runs a forward pass of its
    own for the gap. Several targets per image (``(B, K)`` or a list) give ``(B, K, ...)``,
    one forward and K backward passes per chunk. ``chunk``, ``max_memory``, ``progress``,
    ``memory_format``, ``compile``, ``precision`` as in :func:`salience.smoothgrad` (they apply to
    the path's points; an end point's pass of its own runs as a plain eager pass).
    """
    return_gap = check_flag(return_gap, "return_gap")
    progress = check_flag(progress, "progress")
    check_input(x, model)
    check_int(steps, "steps", minimum=1, what="points on the path")
    if not isinstance(rule, str):
        raise SalienceError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    alphas, weights = quadrature(rule, steps)
    _engine.check_copies(len(alphas), f"integrated gradients' {len(alphas):,} steps", "fewer samples or fewer steps")
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    _reduce.get_grad_modifier(grad_modifier)
    _reduce.get_reduction(reduce)
    x0 = _baseline(x, baseline, blur_sigma)
    targets, multi = split(target, x.shape[0])
    b = x.shape[0]
    ends = _Ends(model, strip_softmax, dict(zip(alphas, weights)))
    # x (a = 1) first on the path, whatever the target: its rows are items 0..B-1, in the first chunk (the same passes
    # with the class given or not). The predicted class is read off them where that chunk gives model(x)'s own class
    # for sure (_ClassOnPath); else, and where it cannot tell, x runs a plain fp32 eager forward of its own first.
    rest = sorted(alphas, key=lambda a: a != 1.0)
    path = PathPoints(x, x0, rest)
    tag = f"ig:{strip_softmax}:{len(targets)}:{layers_tag(targets)}"  # K targets: K gradients per item; a layer's stops

    def run_path(chosen: list[Any]) -> _engine.Sums:
        """The path's passes for the targets ``chosen``: each a ``Target``, or :meth:`_ClassOnPath.target`."""
        def compute(start: int, stop: int) -> tuple[Tensor, Tensor]:
            xs, owner = path(start, stop)
            items = [t.for_items(owner) if isinstance(t, Target) else t(start, stop, owner) for t in chosen]
            grads, scores, _ = _engine.input_gradients(model, xs, items, strip_softmax=strip_softmax)
            refuse_fp16_overflow(model, grads)  # fp16 past 65504: refused at the call's end, not a NaN map
            return grads.transpose(0, 1), scores.t()  # (n, K, C, H, W), (n, K)

        run = _perf.Run(model, x, perf, tag=tag)
        try:
            return _engine.accumulate(compute, len(rest) * b, b, weights=[ends.weights[a] for a in rest], chunk=chunk,
                                      max_memory=budget, progress=progress, desc="integrated gradients",
                                      device=x.device, run=run, found=found)
        except _Undecided:  # left from the probe's pass or the first chunk: the layout put back before the class pass
            _perf.close_run(run)
            raise

    with model_guard(model), Found(model) as found:  # put back before every chunk (the engine) and end pass (session 50)
        sums, targets = _class_and_path(model, x, targets, ends, run_path, found,
                                        _ClassOnPath.applies(targets, rest, x, perf))
        # The targets' scores at the end points of the path, where the path has them.
        assert sums.scores is not None
        for a in (1.0, 0.0):
            if a in rest:
                ends.scores[a] = sums.scores[rest.index(a) * b:(rest.index(a) + 1) * b].to(torch.float64)
        missing = [(point, a) for point, a in ((x, 1.0), (x0, 0.0)) if a not in ends.scores]
        if return_gap or len(missing) == 1:  # the completeness check costs at most one forward pass of B images
            for point, a in missing:
                found.before_pass()
                ends.at(point, a, targets)  # a forward pass: the rule lacks the point
    total = sums.total
    # (B, K, C, H, W), float64; detached: an x (or baseline) that requires grad must not put the map on its graph
    attr = total * (x.detach() - x0.detach()).unsqueeze(1).to(total.dtype)
    out = finish(attr.to(x.dtype), grad_modifier, reduce, multi, targets)
    return _checked(out, attr, ends.scores, steps, rule, return_gap, multi, x.dtype)


def _class_and_path(model: nn.Module, x: Tensor, targets: list[Target], ends: "_Ends",
                    run_path: Callable[[list[Any]], _engine.Sums], found: Found,
                    on_path: bool) -> tuple[_engine.Sums, list[Target]]:
    """The path's sums and the targets with each predicted class fixed on ``x``, the argmax of ``model(x)``: read off
    ``x``'s rows of the path's first chunk where ``on_path`` (:class:`_ClassOnPath`); else, and in a near tie there (the
    chunk thrown away, what it wrote of the model's own state and its draws from the CPU generator put back), from a
    plain fp32 eager pass of ``x`` of its own first (``ends.at``). Read off every row of the path's chunk (session
    49), its rounding broke a near tie the other way (another batch size, layout or folded copy)."""
    rng = torch.get_rng_state() if on_path else None
    if on_path:
        on = _ClassOnPath(x.shape[0], x.device)
        try:
            sums = run_path([on.target if isinstance(t, Predicted) else t for t in targets])
            return sums, [on.resolved(t) for t in targets]
        except _Undecided:
            told = _thrown_away.get()
            if told is not None:  # a dataset run forgets the chunk's output it kept as model(x)'s (runs.job)
                told()
            found.before_pass()  # x's pass sees the state the call found, not the thrown-away chunk's
            torch.set_rng_state(rng)
    if any(isinstance(t, Predicted) for t in targets):
        with Found(model):  # the class pass's writes of the model's own state put back: the path starts from the
            targets = ends.at(x, 1.0, targets)  # state the call found, as with the class given (session 49 last read)
    if rng is not None:
        torch.set_rng_state(rng)  # a model drawing noise: the path sees the stream it sees with the class given
    return run_path(targets), targets


def _checked(out: Tensor, attr: Tensor, scores: dict[float, Tensor], steps: int, rule: str, return_gap: bool,
             multi: bool, dtype: torch.dtype) -> Union[Tensor, IGResult]:
    """The completeness check (:func:`_check_gap`) where both end scores are known, and the
    :class:`IGResult` when asked; ``attr`` ``(B, K, C, H, W)`` float64, signed."""
    if 1.0 not in scores or 0.0 not in scores:
        return out  # rule "middle" / "gausslegendre" with given targets: the check would cost two passes
    fx, fx0 = scores[1.0], scores[0.0]  # (B, K), float64
    delta = fx - fx0
    gap = attr.flatten(2).sum(2) - delta
    floor = gap_floor(fx, fx0, attr.abs().flatten(2).sum(2))
    _check_gap(_relative(gap, delta, floor), steps, rule)
    if not return_gap:
        return out
    gap, delta, floor = gap.to(dtype), delta.to(dtype), floor.to(dtype)
    return IGResult(out, *((gap, delta, floor) if multi else (gap[:, 0], delta[:, 0], floor[:, 0])))


def gaps_to_report(worst: Tensor) -> Tensor:
    """Which relative gaps ``worst`` are reported: above :data:`GAP_WARNING`, or not finite (a bool tensor, on
    ``worst``'s device: no synchronization)."""
    return (worst > GAP_WARNING) | ~torch.isfinite(worst)


def _check_gap(rel: Tensor, steps: int, rule: str) -> None:
    """A :class:`CompletenessWarning` (or a report to :func:`collect_gaps`) naming the images whose
    relative gap ``rel`` ``(B, K)`` is above :data:`GAP_WARNING` (or not finite)."""
    worst = rel.amax(1)
    sink = _gap_sink.get()
    if isinstance(sink, RawGaps):  # read by the caller, once for all its calls
        sink.append((worst, steps, _ALIASES.get(rule, rule)))
        return
    bad = gaps_to_report(worst)
    if bool(bad.any()):
        images = bad.nonzero()[:, 0].tolist()
        report_gaps(GapReport(images, [float(worst[i]) for i in images], steps, _ALIASES.get(rule, rule)))


class _Ends:
    """The path's end points where the path lacks them: the target scores ``f`` there ``(B, K)`` by ``alpha``, from
    a forward pass of their own (the completeness check's), and the targets fixed on ``x`` (the predicted class
    becomes a class, read off a plain fp32 eager pass of ``x``). ``weights``: the rule's, by node."""

    def __init__(self, model: nn.Module, strip_softmax: bool, weights: dict[float, float]) -> None:
        self.model, self.strip_softmax, self.weights = model, strip_softmax, weights
        self.scores: dict[float, Tensor] = {}

    def at(self, point: Tensor, alpha: float, targets: list[Target]) -> list[Target]:
        g = backward(self.model, point, targets, input_grad=False, strip_softmax=self.strip_softmax)
        self.scores[alpha] = g.score_matrix(point.shape[0]).t().to(torch.float64)
        return [t.resolved(g.output) for t in targets]


TIE_BOUND = 1e-3
"""How far apart, relative to the row's largest score ``max |f_k(x)|``, an image's two top scores in ``x``'s row of
the path's first chunk must be for integrated gradients' ``target=None`` to take that row's class as ``model(x)``'s
(:class:`_ClassOnPath`); closer, ``x`` runs a plain eager fp32 forward of its own, as before session 50. Measured
(benchmarks/ig-tie-bound-s50.md, AMD EPYC, torch 2.14.1): x's rows in the path's chunks of 8 to 256 items, contiguous,
channels-last and the BatchNorm-folded copy, with gradients on or off, differ from a plain ``model(x)`` by at most
1.0e-6 of the row's largest score (resnet50, channels-last) on resnet18, resnet50, torchvision's ViT-B/16 and the
demo models: the bound is about 1,000 times that. Relative to the output's scale: a model whose output is a small
difference of large activations may round more than these did."""


_thrown_away: contextvars.ContextVar[Optional[Callable[[], None]]] = contextvars.ContextVar("salience_ig_thrown_away",
                                                                                           default=None)
"""Called when a near tie throws the path's first chunk away (:func:`thrown_away`)."""


@contextmanager
def thrown_away(told: Callable[[], None]) -> Iterator[None]:
    """Inside it, ``told()`` is called each time :func:`integrated_gradients` throws the path's first chunk away (a
    near tie): an observer of the model's passes that kept that chunk's output as ``model(x)``'s (a dataset run's
    first pass, :func:`salience.runs.job._first_pass`) forgets it; the plain pass of ``x`` follows."""
    token = _thrown_away.set(told)
    try:
        yield
    finally:
        _thrown_away.reset(token)


class _Undecided(Exception):
    """Internal: an image's two top scores in ``x``'s row of the path's chunk are within :data:`TIE_BOUND`."""


class _ClassOnPath:
    """Each image's predicted class read off ``x``'s row in the path's first chunk (x is items ``0..B-1``), before
    that chunk's backward pass: ``model(x)``'s own class where the row's two top scores are more than
    :data:`TIE_BOUND` apart (more than the chunk's rounding, another batch size, layout or folded copy, can move
    them against a plain eager fp32 ``model(x)``), else :class:`_Undecided` is raised (the call runs that pass).
    ``classes`` ``(B,)``: the classes of images ``0..known-1``."""

    def __init__(self, b: int, device: torch.device) -> None:
        with torch.inference_mode(False):  # written in the path's passes, outside a caller's inference mode
            self.classes = torch.zeros(b, dtype=torch.long, device=device)
        self.known, self.width = 0, 0
        self._checked: Optional[tuple[int, Classes]] = None  # (known then, the classes checked then)

    @staticmethod
    def applies(targets: Sequence[Target], alphas: Sequence[float], x: Tensor, perf: _perf.Performance) -> bool:
        """Whether the class can be read on the path: a predicted class asked, ``x`` on it (``a = 1``: the
        trapezoid's and the right Riemann sum's), eager float32 passes on a CPU (where the bound was measured)."""
        return (any(isinstance(t, Predicted) for t in targets) and 1.0 in alphas and x.dtype == torch.float32
                and x.device.type == "cpu" and perf.compile is False and _perf.autocast_dtype(perf) is None)

    def target(self, start: int, stop: int, owner: Tensor) -> Target:  # noqa: ARG002 (compute's call)
        """The target of items ``start..stop-1`` (images ``owner``): each image's class, read here if not yet."""
        return _OnPath(self, start, owner)

    def read(self, scores: Tensor, start: int) -> None:
        """Decide the classes of the images whose ``x`` rows are among ``scores`` ``(n, K)`` (items from ``start``)."""
        lo, hi = max(start, self.known), min(start + scores.shape[0], self.classes.shape[0])
        if hi <= lo:
            return
        rows = scores[lo - start:hi - start].detach()
        if rows.shape[1] > 1:
            top = rows.topk(2, dim=1).values
            if not bool(((top[:, 0] - top[:, 1]) > TIE_BOUND * rows.abs().amax(1)).all()):  # NaN: not told either
                raise _Undecided
        self.classes[lo:hi] = rows.argmax(1)
        self.known, self.width = hi, rows.shape[1]

    def resolved(self, t: Target) -> Target:
        """``t`` with the predicted class fixed (as :meth:`Predicted.resolved` fixes it on a pass of ``x``)."""
        return self.checked() if isinstance(t, Predicted) else t

    def checked(self) -> Classes:
        """The classes read so far as one :class:`Classes` checked in range once (:meth:`Classes.known`) each time
        rows were read (once a call where the first chunk holds ``x``'s rows), whose items' targets
        (:meth:`Classes.for_items`) skip the check in each pass (session 51: a check per chunk read a tensor per
        chunk, tests/test_syncs.py)."""
        if self._checked is None or self._checked[0] != self.known:
            self._checked = (self.known, Classes.known(self.classes, outputs=self.width))
        return self._checked[1]


class _OnPath(Target):
    """One chunk's predicted-class target (:meth:`_ClassOnPath.target`): the score of each item's image's class."""

    def __init__(self, on: _ClassOnPath, start: int, owner: Tensor) -> None:
        self.on, self.start, self.owner = on, start, owner

    def __call__(self, output: Tensor) -> Tensor:
        if 1 <= output.dim() <= 2:  # (n, K) scores, or one per item (one class); another shape: Classes' error below
            self.on.read(output.reshape(output.shape[0], -1), self.start)
        if not self.on.width:  # nothing read (not class scores): Classes' error for the output's shape
            return Classes(self.on.classes[self.owner])(output)
        return self.on.checked().for_items(self.owner)(output)  # an argmax, checked once


class PathPoints:
    """The points of the straight paths from ``baseline`` to ``x`` ``(B, C, H, W)`` as items: item
    ``j`` is point ``alphas[j // B]`` of image ``j % B``, ``x' + a (x - x')`` (exactly ``x`` at
    ``a = 1`` and ``x'`` at ``a = 0``). Any chunk of items can be made on its own, in any order. Inside a
    many-pass call the points are marked as made from its checked ``x`` and baseline
    (:func:`salience._core.derived.derived`): their finiteness is tested once, at the end of the call."""

    def __init__(self, x: Tensor, baseline: Tensor, alphas: Sequence[float]) -> None:
        self.x, self.baseline, self.alphas = x, baseline, list(alphas)
        self.diff = x - baseline
        self._format: Optional[torch.memory_format] = None  # the layout of a chunk made at once (_made)

    def point(self, rep: int, lo: int, hi: int) -> Tensor:
        a = self.alphas[rep]
        if a == 1.0:
            return self.x[lo:hi]
        if a == 0.0:
            return self.baseline[lo:hi]
        return self.baseline[lo:hi] + a * self.diff[lo:hi]

    def _at_once(self) -> bool:
        """Whether the points of several ``alphas`` are made in one multiply and one add (:meth:`_points`): where
        ``x``, the baseline and their difference are one dtype that computes in itself (float32, float64: a scalar
        ``a`` is cast to it, as a tensor of alphas is), on a CPU, the baseline of ``x``'s shape. float16 and bfloat16
        compute ``a * d`` in float32 with ``a`` uncast; on a GPU the alphas' tensor would be a copy from the host in
        every chunk (a synchronization), and the per-point Python work this saves does not hold the device back:
        point by point."""
        x, base, diff = self.x, self.baseline, self.diff
        return x.dtype in (torch.float32, torch.float64) and base.dtype == x.dtype and diff.dtype == x.dtype and \
            base.shape == x.shape and base.device == x.device and diff.device == x.device and x.device.type == "cpu"

    def _points(self, first: int, out: Tensor) -> None:
        """The points of ``alphas[first:first + R]`` for all the images written into ``out`` ``(R B, C, H, W)``, item
        ``j`` of point ``first + j // B``: ``x' + a (x - x')`` in one multiply and one add for them all, bit for bit
        :meth:`point`'s (elementwise, the same two operations in the same dtype; the sum taken in place, which
        commutes exactly), ``x`` itself where ``a`` is 1 and ``x'`` where 0 (copied). A chunk of IG's 32 points on one
        image made 32 slices, multiplies and adds and a ``cat`` (about 0.3 ms a call on a small model). A CPU's only."""
        pts = out.view(-1, *self.x.shape)  # (R, B, C, H, W)
        alphas = self.alphas[first:first + pts.shape[0]]
        a = torch.tensor(alphas, dtype=self.x.dtype)
        torch.mul(a.view(-1, *([1] * self.x.dim())), self.diff, out=pts)
        pts.add_(self.baseline)
        for k, value in enumerate(alphas):
            if value == 1.0:
                pts[k] = self.x
            elif value == 0.0:
                pts[k] = self.baseline

    def _made(self, spans: list[tuple[int, int, int]], whole: list[int], n: int) -> Tensor:
        """The chunk's ``n`` items ``(n, C, H, W)`` written into one new tensor in ``x``'s layout (the one ``cat`` of
        the points gives): its whole points (all B images) at once (:meth:`_points`), a point at its edge that it
        takes some images of on its own (``spans``: :meth:`__call__`'s). No more than the chunk's items is made or
        kept (a slice of whole points kept the points' other images alive through the pass, up to ``2 B - 2`` items
        more than the engine's memory budget gave the chunk), and nothing is copied twice. Without autograd: the
        pass takes its input detached (:func:`salience._core.autograd.backward`), and ``out=`` refuses a graph."""
        if self._format is None:
            like = torch.empty_like(self.x)  # x's strides, or the format torch suggests for them (as cat does)
            last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
            self._format = torch.channels_last if last else torch.contiguous_format
        b = self.x.shape[0]
        xs = torch.empty((n, *self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device, memory_format=self._format)
        at = 0
        with torch.no_grad():
            for rep, lo, hi in spans:
                if rep == whole[0]:
                    self._points(rep, xs[at:at + len(whole) * b])
                    at += len(whole) * b
                elif not whole[0] < rep <= whole[-1]:
                    xs[at:at + hi - lo] = self.point(rep, lo, hi)
                    at += hi - lo
        return xs

    def __call__(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Items ``start..stop-1`` ``(n, C, H, W)`` and the image each belongs to ``(n,)``."""
        b = self.x.shape[0]
        owner = torch.arange(start, stop, device=self.x.device) % b
        # (point, first image, end) of each point the chunk takes images of
        spans = [(rep, max(start, rep * b) - rep * b, min(stop, (rep + 1) * b) - rep * b)
                 for rep in range(start // b, (stop - 1) // b + 1)]
        whole = [rep for rep, lo, hi in spans if hi - lo == b]
        if len(whole) > 1 and self._at_once():
            xs = self._made(spans, whole, stop - start)
        else:
            parts = [self.point(*s) for s in spans]
            xs = parts[0] if len(parts) == 1 else torch.cat(parts)
        # made from the method's checked x and baseline: not tested again in each pass (at the end of the call)
        return _derived.derived(xs, "Integrated Gradients' path points"), owner


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    reduce: Union[None, str, Reduction] = "grayscale",
    grad_modifier: Union[None, str, GradModifier] = None,
    strip_softmax: bool = True,
) -> Tensor:
    """The input times its gradient, ``x * df/dx`` (Shrikumar et al. 2016), one pass.

    ``x``: ``(B, C, H, W)``. For a linear model it is exactly Integrated Gradients with a zero
    baseline. Default ``reduce="grayscale"`` (``sum_c |x * g|``, ``(B, H, W)``); ``None`` gives the
    signed ``(B, C, H, W)``. Several targets per image (``(B, K)`` or a list) give ``(B, K, ...)``
    from one forward pass.
    """
    return input_gradient_maps(model, x, target, grad_modifier=grad_modifier, reduce=reduce,
                               strip_softmax=strip_softmax, times_input=True)
