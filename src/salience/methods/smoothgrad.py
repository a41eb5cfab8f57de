"""SmoothGrad (Smilkov et al. 2017): a method's map averaged over noisy copies of the input.

Wraps any method of the contract ``method(model, x, target, **options)``: vanilla gradients,
guided backprop, Grad-CAM, input x gradient... The noisy copies of all images are run together,
in chunks sized by :mod:`salience._core.engine`, and only running sums are kept.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from salience import reduce as _reduce
from salience._core import derived as _derived
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.autograd import check_input
from salience._core.errors import ArgumentError, SalienceError, suggest
from salience._core.fingerprint import close_walk, end_walk, one_walk, walk_state
from salience._core.tensors import check_int, check_number, check_flag, fresh_seed
from salience._core.guard import Found, model_guard
from salience.reduce import GradModifier, Reduction
from salience.methods import perturbation
from salience.methods._multi import (as_method, bound_problem, checked, shape_problem, free_maps, is_target_free,
                                     options_of, takes_several_targets)
from salience.methods.integrated import GapReport, collect_gaps, gaps_to_report, report_gaps
from salience.methods.vanilla import vanilla
from salience.targets import Target, checked_on_output, layers_tag, resolve, split

__all__ = ["smoothgrad", "VARIANTS"]

VARIANTS = ("mean", "squared", "vargrad")
_PERF_SETTINGS = ("chunks", "fold_batchnorm", "allocator")  # the engine's options that are settings only, not keywords


@checked  # the public method: a call its signature refuses is an ArgumentError
def smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    method: Callable[..., Tensor] = vanilla,
    samples: int = 50,
    noise: float = 0.15,
    variant: str = "mean",
    seed: Union[None, int, Sequence[int]] = 0,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    reduce_each: bool = False,
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
    **options: Any,
) -> Tensor:
    """The mean of ``method``'s raw map over ``samples`` noisy copies of each image.

    ``x``: ``(B, C, H, W)``. Each copy is ``x + N(0, sigma^2)`` with ``sigma = noise * (max - min)``
    of that image (the paper's noise level; 0.1-0.2 works well). ``variant``: ``"mean"``
    (SmoothGrad), ``"squared"`` (the mean of squared maps, SmoothGrad-squared) or ``"vargrad"``
    (their variance, VarGrad).

    ``target`` is resolved once, on the clean images (default: each image's predicted class),
    and used for every copy. Several targets per image (a ``(B, K)`` class tensor or a list of
    targets) give maps ``(B, K, ...)``; for every method that takes K targets in one call
    (salience's own, also through ``functools.partial``; see
    :func:`salience.methods._multi.several_targets`) they share one forward pass per chunk.
    A target-free method (``method=salience.eigencam``) gives the mean of its one map over the
    copies (no target is resolved); with several targets that map stands for each. A wrong target is
    refused there too, as by the method's registry entry (:func:`salience.methods._multi.free_maps`).

    The wrapped method returns its raw map (``reduce=None``); ``grad_modifier`` and ``reduce``
    (default ``"max_abs"``, ``(B, H, W)``; ``None`` for the raw ``(B, C, H, W)``) are applied
    once, to the average, as in the paper: signed gradients are averaged so that noise of
    opposite signs cancels. ``reduce_each=True`` applies them to every copy before averaging
    instead (Captum's NoiseTunnel over ``Saliency(abs=True)``). Maps that are already
    ``(B, H, W)`` (Grad-CAM) are not reduced.

    ``seed``: the noise comes from a generator of its own seeded with it (the global RNG is
    neither used nor changed); ``None`` draws a fresh seed. The same seed gives the same noise
    whatever the chunking. A sequence of ints, one per image, gives each image a noise stream of
    its own, seeded with its int: image ``b``'s map is then that of ``smoothgrad`` on image ``b``
    alone with ``seed=[seed[b]]`` (or ``seed=seed[b]``: one image's int seed is the same stream),
    whichever images share its batch. Dataset runs (:func:`salience.explain_dataset`) seed image
    ``i`` of the run with ``seed * 1_000_003 + i`` (modulo ``2**63``; docs/datasets.md), so its
    stored map does not depend on ``--batch``. ``samples=1, noise=0`` is exactly ``method``.
    ``chunk`` (copies per pass) or ``max_memory`` (bytes or ``"2GiB"``) override the automatic
    chunk size; ``progress=True`` draws a progress bar. ``memory_format`` (``"auto"``,
    ``"contiguous"``, ``"channels_last"``), ``compile`` (``True``, a backend; ``"freeze"``: the passes
    without gradients, Score-CAM's, RISE's, occlusion's, frozen) and ``precision``
    (``"bf16"``, ``"bf16-mixed"``, ``"fp16"``) choose how the passes run (``None``: the settings of
    :func:`salience.set_performance`; see docs/performance.md). Other keyword ``options`` go to
    ``method`` (e.g. ``layer=`` for Grad-CAM).
    """
    reduce_each, progress = check_flag(reduce_each, "reduce_each"), check_flag(progress, "progress")
    check_input(x, model)
    _check_options(method, samples, noise, variant, options, x)
    seed = check_seed(seed, x.shape[0])
    if isinstance(seed, int) and x.shape[0] == 1:
        seed = [seed]  # one image: its own stream, as in a per-image list
    method = as_method(method)  # a target-free method (Eigen-CAM) is called with target=None
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    mod = _reduce.get_grad_modifier(grad_modifier)
    red = _reduce.get_reduction(reduce)
    raw_options = _raw_options(method, options, strip_softmax,
                               dict(memory_format=memory_format, compile=compile, precision=precision))
    targets, multi = split(target, x.shape[0])
    copies = NoisyCopies(x, noise, fresh_seed() if seed is None else seed)
    # K targets: one call sharing the pass (several_targets), the one map of a target-free one (Eigen-CAM), or K calls
    shared, free = multi and takes_several_targets(method), is_target_free(method)
    calls = len(targets) if multi and not shared and not free else 1
    _check_inner_passes(method, samples, options, x, calls)

    gaps = _CopyGaps(x.shape[0])
    outer = walk_state()
    try:  # the guard's entry, the state found, the run's fingerprint: one walk (fingerprint.one_walk)
        one_walk(model)
        with model_guard(model), Found(model) as found:  # the state found: the engine puts it back before each pass
            resolved = targets if free else resolve(targets, model, x, strip_softmax=strip_softmax)

            @gaps.watch
            def compute(start: int, stop: int) -> Tensor:
                xs, owner = copies(start, stop)
                if free:  # its one map; the targets checked against the output of its pass on the copies
                    checked = [t.for_items(owner) for t in checked_on_output(resolved)]
                    m = free_maps(lambda: _call(method, model, xs, None, raw_options), model, xs, checked)
                    _check_channels(m, reduce, False, method)
                    return _finish(m, mod, red, False, resolved) if reduce_each else m
                tgts = [t.for_items(owner) for t in resolved]
                if shared:
                    maps = _call(method, model, xs, tgts, raw_options)  # (n, K, ...)
                else:
                    outs = [_call(method, model, xs, t, raw_options) for t in tgts]
                    maps = torch.stack(outs, dim=1) if multi else outs[0]
                _check_channels(maps, reduce, multi, method)
                return _finish(maps, mod, red, multi, resolved) if reduce_each else maps

            # the method's own many passes (Score-CAM's channels) check the product
            with _engine.passes_within(samples, calls):
                sums = _engine.accumulate(
                    compute, samples * x.shape[0], x.shape[0], squares=variant != "mean", chunk=chunk,
                    max_memory=budget, progress=progress, desc="smoothgrad", device=x.device,
                    run=_perf.Run(model, x, perf, tag=_tag(method, targets, reduce, reduce_each, raw_options)),
                    found=found)
    finally:
        close_walk(outer)
    gaps.report()
    out = _statistic(sums, samples, variant, x.dtype)
    if free:  # one map for every target
        out = out if reduce_each else _finish(out, mod, red, False, resolved)
        return out.unsqueeze(1).repeat(1, len(targets), *([1] * (out.dim() - 1))) if multi else out
    return out if reduce_each else _finish(out, mod, red, multi, resolved)


def _statistic(sums: _engine.Sums, samples: int, variant: str, dtype: torch.dtype) -> Tensor:
    """The variant's map from the copies' sums (:func:`salience._core.engine.accumulate`'s ``total`` and ``squares``):
    their mean (SmoothGrad), the mean of their squares (SmoothGrad-squared) or their variance (VarGrad), in ``dtype``
    (the input's)."""
    mean = sums.total / samples
    if variant == "mean":
        return mean.to(dtype)
    assert sums.squares is not None
    sq = sums.squares / samples
    return (sq if variant == "squared" else (sq - mean * mean).clamp_min(0)).to(dtype)


class _CopyGaps:
    """The completeness reports of Integrated Gradients on the noisy copies
    (:func:`salience.methods.integrated.collect_gaps`), gathered per image over all chunks and said
    once: one warning per call, naming the images whose copies had a gap, not one per chunk. The gaps are
    kept on the device and read once, at the end (:class:`~salience.methods.integrated.RawGaps`): not a
    synchronization per chunk."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.worst: Optional[Tensor] = None  # (B,) the largest relative gap of each image's copies that had one
        self.copies: Optional[Tensor] = None  # how many copies had one
        self.steps, self.rule = 0, ""

    def watch(self, compute: Callable[[int, int], Tensor]) -> Callable[[int, int], Tensor]:
        def watched(start: int, stop: int) -> Tensor:
            with collect_gaps(raw=True) as found:
                out = compute(start, stop)
            if _engine.discarded():  # the engine's memory probe: its copies run again, counted then
                return out
            for worst, steps, rule in found:
                self._add(start, worst)
                self.steps, self.rule = steps, rule
            return out
        return watched

    def _add(self, start: int, worst: Tensor) -> None:
        """A call's worst gaps ``(n,)`` of the copies ``start..start+n-1``, to their images (no synchronization)."""
        w = torch.where(torch.isnan(worst), torch.inf, worst.detach())  # a NaN gap counts as an infinite one
        bad = gaps_to_report(w)
        owner = (torch.arange(len(w), device=w.device) + start) % self.batch
        if self.worst is None:
            self.worst = torch.full((self.batch,), -torch.inf, dtype=w.dtype, device=w.device)
            self.copies = torch.zeros((), dtype=w.dtype, device=w.device)
        self.worst.scatter_reduce_(0, owner, torch.where(bad, w, -torch.inf).to(self.worst.dtype), reduce="amax")
        self.copies = self.copies + bad.sum()

    def report(self) -> None:
        if self.worst is None or self.copies is None:
            return
        *worst, copies = torch.cat([self.worst, self.copies.view(1).to(self.worst.dtype)]).tolist()  # one read
        images = [b for b, g in enumerate(worst) if g > -math.inf]
        if images:
            report_gaps(GapReport(images, [worst[b] for b in images], self.steps, self.rule, int(copies)))


def _check_options(method: Any, samples: Any, noise: Any, variant: Any, options: dict, x: Tensor) -> None:
    if not callable(method):
        named = f" (the function, not its name: method=salience.{method})" if isinstance(method, str) else ""
        raise SalienceError(f"method must be a saliency function such as salience.vanilla, got "
                            f"{type(method).__name__}{named}")
    if getattr(method, "__module__", None) == "salience.methods.class_model":  # its (model, target): a raw TypeError
        raise SalienceError("method=class_model makes an image for a class, it does not explain x: SmoothGrad averages "
                            "a map of x over noisy copies; give a method that explains x, e.g. salience.vanilla")
    check_int(samples, "samples", minimum=1, what="noisy copies per image")
    _engine.check_passes(samples, f"samples={samples} is", "SmoothGrad's maps settle with tens of samples (the paper: "
                         "50)")
    check_number(noise, "noise", minimum=0, what="a fraction of each image's range, e.g. 0.15")
    if variant not in VARIANTS:
        raise SalienceError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    _check_keywords(method, options)


def _check_keywords(method: Callable[..., Any], options: dict, depth: int = 0) -> None:
    """An :class:`~salience._core.errors.ArgumentError` for a keyword given to SmoothGrad (``options``, which it hands
    to ``method``) or bound to ``method`` by ``functools.partial`` that ``method`` does not take, naming the closest
    option and the options of both; through a SmoothGrad inside, to every level, what it hands on to its own method
    (refused before any pass: the inner SmoothGrad's own check came after the outer one's first pass)."""
    problem = bound_problem(method)  # a keyword bound to it that it does not take: Python's TypeError in the engine
    if problem is not None:
        raise ArgumentError(problem)
    for name in options:
        if not _engine.accepts(method, name):
            root = _engine.unbind(method)[0]  # the function under functools.partial
            called = getattr(root, "__name__", None) or "the method"
            theirs = options_of(root)
            listed = f"{called}'s options: {', '.join(theirs)}" if theirs else f"{called} takes no options"
            where = (f"; {name} is a setting of how the passes run: salience.set_performance({name}=...) or "
                     f"`with salience.performance({name}=...):`" if name in _PERF_SETTINGS
                     else suggest(name, _option_names(method), n=1))
            raise ArgumentError(f"{called} has no option {name!r} (nor has smoothgrad){where} ({listed}; "
                                f"smoothgrad's: {', '.join(options_of(smoothgrad))})")
    called = as_method(method)  # a function that takes no target, an unset keyword-only one: a raw TypeError
    own = [n for n in ("reduce", "grad_modifier", "strip_softmax") if n in _engine.signature_of(called).parameters]
    problem = shape_problem(called, [*options, *own])  # with what _raw_options hands it
    if problem is not None:
        raise ArgumentError(problem)
    root, bound = _engine.unbind(method)
    if root is smoothgrad and depth < 32:  # a SmoothGrad inside: what it hands on to its method
        handed, own = {**bound, **options}, _engine.signature_of(smoothgrad).parameters
        inner = handed.get("method", own["method"].default)
        if callable(inner):
            _check_keywords(inner, {k: v for k, v in handed.items() if k not in own}, depth + 1)


def _check_inner_passes(method: Callable[..., Any], samples: int, options: dict, x: Tensor, calls: int = 1) -> None:
    """The passes of each image of SmoothGrad of a many-pass method within :data:`~salience._core.engine.MAX_PASSES`:
    ``samples`` times the method's passes (:func:`_passes_of`: its ``steps`` / ``masks`` / ``samples``, given or its
    default, occlusion's windows on ``x``'s images, every level of a SmoothGrad inside it), times its ``calls`` on
    each copy (K targets to a method that takes one a call), times the noisy copies and calls of the SmoothGrads around
    this one (:func:`~salience._core.engine.outer_passes`; said apart, :func:`~salience._core.engine.outer_counts`).
    Each count alone was checked, and ``samples=10**6`` of RISE's 4,000 masks was 4e9 passes an image; a third level
    multiplied only two counts; K targets were counted as one."""
    outer = _engine.outer_passes()
    inner, said = _passes_of(method, options, x)
    total = outer * samples * calls * inner
    if total == samples:
        return
    copies, theirs = _engine.outer_counts()  # said apart: the calls for K targets are not noisy copies
    within = f" within {copies:,} noisy copies" if copies > 1 else ""
    around = " of the SmoothGrad around it" if outer > 1 else ""
    # the refusal carries the K targets it counts (_engine.TargetsCounted): this call's, else those of the one around
    head, tail = f"samples={samples} of {said}", f"{within}{_engine.calls_said(theirs)}{around}"
    if calls == 1:
        head, tail, calls = head + within, around, theirs
    _engine.check_passes(total, f"{tail} is {total:,} passes of each image,",
                         "fewer samples or " + ("a larger stride" if _root(method) is _root(perturbation.occlusion)
                                                else "fewer inner passes"), (head, calls))


def _passes_of(method: Callable[..., Any], options: dict, x: Tensor, depth: int = 0) -> tuple[int, str]:
    """The passes of each image one call of ``method`` with the keywords ``options`` runs, as far as its signature says
    before any pass, and how to say it (``"rise with masks=4000"``): a SmoothGrad's ``samples`` times those of its
    inner method, to every level; occlusion's windows on ``x``; a ``steps`` / ``masks`` / ``samples`` count (given, or
    its default, a ``functools.partial``'s too). 1 where unknown (a value the method will refuse itself, Score-CAM's
    channels: it checks them after its first pass, :func:`~salience._core.engine.outer_passes`)."""
    params = _engine.signature_of(method).parameters
    root = _root(method)
    name = getattr(root, "__name__", "the method")  # partial(rise, masks=4000): 'rise'

    def given(key: str) -> Any:
        return options.get(key, params[key].default if key in params else None)

    if root is _root(perturbation.occlusion):
        win, st, n = perturbation.check_window(x, given("window"), given("stride"))
        return n, f"occlusion with {n:,} windows (window {win[0]}x{win[1]}, stride {st[0]}x{st[1]})"
    for key in ("steps", "masks", "samples"):
        inner = given(key) if key in params else None
        if not (isinstance(inner, numbers.Integral) and not isinstance(inner, bool) and inner > 0):  # np.int64 too
            continue
        if root is _root(smoothgrad) and callable(given("method")) and depth < 32:  # every level: its copies of its method
            handed = {**_engine.unbind(method)[1], **options}  # partial(smoothgrad, masks=100): its **options' too
            rest = {k: v for k, v in handed.items() if k not in params}  # what it hands on to its method
            n, said = _passes_of(given("method"), rest, x, depth + 1)
            return int(inner) * n, f"smoothgrad with samples={int(inner)}" + (f" of {said}" if n > 1 else "")
        return int(inner), f"{name} with {key}={int(inner)}"
    return 1, name


def _option_names(method: Callable[..., Any]) -> list[str]:
    """What a keyword given to SmoothGrad may have meant (for the message of one neither takes): SmoothGrad's own
    keywords first (``sample`` is ``samples``, not an option of the method), then ``method``'s."""
    names = []
    for fn in (smoothgrad, method):
        params = _engine.signature_of(fn).parameters.values()  # a builtin without a signature: none
        names += [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
    return names


def _check_channels(maps: Tensor, reduce: Any, multi: bool, method: Callable[..., Tensor]) -> None:
    """Refuse a ``reduce`` given for maps that have no channels to reduce (Grad-CAM's ``(n, H, W)``): it was
    ignored silently, whatever it was (a function returning ``None`` too). The default (``"max_abs"``) and
    ``None`` stand for "the method's map as it is" there."""
    default = reduce is _reduce.max_abs or (isinstance(reduce, str) and reduce == "max_abs")
    if reduce is None or default or maps.dim() - (1 if multi else 0) != 3:
        return
    raise SalienceError(f"reduce={getattr(reduce, '__name__', reduce)!r} reduces a gradient's channels, but "
                        f"{getattr(method, '__name__', 'the method')}'s maps (B, H, W) have none; leave reduce out")


def _raw_options(method: Callable[..., Tensor], options: dict, strip_softmax: bool,
                 perf: Optional[dict] = None) -> dict:
    """The wrapped method's options with its reduction and modifier off: SmoothGrad averages raw maps. ``perf``:
    SmoothGrad's own ``memory_format`` / ``compile`` / ``precision`` keywords, given to a many-pass method that names
    them (Integrated Gradients, RISE...) where ``options`` does not: its passes run under its own options, and
    SmoothGrad's were lost (its fp16 overflow never seen)."""
    raw = dict(options)
    for name, value in (perf or {}).items():
        if (value is not None and name not in raw and name in _engine.signature_of(method).parameters
                and name not in _engine.unbind(method)[1]):  # a partial's binding: the user's choice for the method
            raw[name] = value
    if _engine.accepts(method, "reduce"):
        raw["reduce"] = None
    if _engine.accepts(method, "grad_modifier"):
        raw["grad_modifier"] = None
    if _engine.accepts(method, "strip_softmax"):
        raw["strip_softmax"] = strip_softmax
    return raw


def _root(method: Callable[..., Any]) -> Callable[..., Any]:
    """The function under ``method``'s ``functools.partial`` bindings and decorators."""
    return inspect.unwrap(_engine.unbind(method)[0])


_SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


def check_seed(seed: Any, batch: int) -> Union[None, int, list[int]]:
    """``seed`` checked: ``None``, an int, or a sequence of ``batch`` ints (one per image, a list);
    a :class:`SalienceError` otherwise."""
    if seed is None:
        return None
    array = getattr(seed, "ndim", None) == 1 and hasattr(seed, "tolist")  # a tensor or numpy array of ints
    if isinstance(seed, (str, bytes)) or not (isinstance(seed, Sequence) or array):
        return _check_seed_int(seed, "seed", "an int, a list of one int per image, or None")
    seeds = seed.tolist() if array else list(seed)
    if len(seeds) != batch:
        raise SalienceError(f"seed has {len(seeds)} int(s) for a batch of {batch} image(s); give one seed per "
                            "image, or one int for the batch")
    return [_check_seed_int(s, f"seed[{b}]", "one int per image") for b, s in enumerate(seeds)]


def _check_seed_int(value: Any, name: str, what: str) -> int:
    v = check_int(value, name, minimum=None, what=what)
    if not _SEED_RANGE[0] <= v <= _SEED_RANGE[1]:
        raise SalienceError(f"{name} must be an int from -2**63 to 2**64 - 1 (a generator's seed), got {v}")
    return v


class NoisyCopies:
    """The noisy copies of a batch ``x`` ``(B, C, H, W)`` as items: item ``j`` is copy ``j // B`` of
    image ``j % B``, ``x + sigma * N(0, 1)`` with ``sigma = noise * (max - min)`` per image.

    The noise is the documented stream. An int ``seed``: one ``N(0, 1)`` draw of the batch's shape
    per copy, in copy order, from a generator of its own seeded with ``seed``. A list of ``B`` ints
    (one per image): image ``b`` has a stream of its own, one ``N(0, 1)`` draw of shape
    ``(C, H, W)`` per copy, in copy order, from a generator seeded with ``seed[b]``; so image
    ``b``'s noise does not depend on the other images (a single image's int seed is the same
    stream as ``[seed]``). Either way the same seed gives the same noise whatever the chunking,
    and whatever ``x``'s dtype (drawn in float32, then cast).
    It is a stream: chunks must be asked for in increasing order, as
    :func:`salience._core.engine.accumulate` runs them (asking for an earlier copy is an error).
    Inside a many-pass call the copies are marked as made from its checked ``x``
    (:func:`salience._core.derived.derived`): their finiteness is tested once, at the end of the call.
    """

    def __init__(self, x: Tensor, noise: float, seed: Union[int, Sequence[int]]) -> None:
        self.x, self.noise = x, float(noise)
        b = x.shape[0]
        self.sigma = (self.noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))).view(b, 1, 1, 1)
        seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
        self._gens = [torch.Generator(device=x.device).manual_seed(s) for s in seeds]
        # per stream (one for the batch, or one per image): the last copy drawn and its noise
        self._reps, self._draws = [-1] * len(seeds), [x] * len(seeds)
        self._shape = tuple(x.shape) if isinstance(seed, int) else tuple(x.shape[1:])

    def _stream(self, s: int, rep: int) -> Tensor:
        """Stream ``s``'s draw of copy ``rep`` in ``x``'s dtype (``rep`` at least the last one drawn: that one is
        kept)."""
        if rep < self._reps[s]:
            raise RuntimeError(f"noisy copy {rep} asked for after copy {self._reps[s]}: copies are a stream")
        while self._reps[s] < rep:
            # drawn in float32 whatever x's dtype (then cast): the same seed is the same noise for a
            # float64 or half input as for a float32 one (a float64 draw was another sample)
            self._draws[s] = torch.randn(self._shape, generator=self._gens[s], device=self.x.device,
                                         dtype=torch.float32).to(self.x.dtype)
            self._reps[s] += 1
        return self._draws[s]

    def __call__(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Items ``start..stop-1`` ``(n, C, H, W)`` and the image each belongs to ``(n,)``."""
        b = self.x.shape[0]
        spans = [(rep, max(start, rep * b) - rep * b, min(stop, (rep + 1) * b) - rep * b)
                 for rep in range(start // b, (stop - 1) // b + 1)]
        owner = torch.arange(start, stop, device=self.x.device) % b
        if self.noise == 0:
            parts = [self.x[lo:hi] for _, lo, hi in spans]
            xs = parts[0] if len(parts) == 1 else torch.cat(parts)
        elif self.x.dtype is torch.float32:
            # the chunk's noise drawn into one buffer, then made into the copies in place: sigma * noise + x, the
            # same elementwise multiply and add as copy by copy, so the same bits. Where the chunk is whole copies of
            # the batch, sigma and x broadcast over them (no gathered sigma[owner], x[owner] of the chunk's size).
            xs = self._drawn_into_one(spans, stop - start)
            if start % b == 0 and (stop - start) % b == 0:
                xs.view(((stop - start) // b,) + tuple(self.x.shape)).mul_(self.sigma).add_(self.x)
            else:
                xs.mul_(self.sigma[owner]).add_(self.x[owner])
        else:  # the chunk's noise gathered first (cast draws), then one multiply and one add for all its copies: the
            # same elementwise sigma * noise + x, so the same bits as copy by copy; the add in place. Other dtypes than
            # float32 keep this: their draws are cast tensors of their own, and the memory probe measured this path
            xs = (self.sigma[owner] * self._chunk_noise(spans)).add_(self.x[owner])
        # made from the method's checked x: not tested again in each pass (their finiteness at the end of the call)
        return _derived.derived(xs, "SmoothGrad's noisy copies"), owner

    def _chunk_noise(self, spans: list[tuple[int, int, int]]) -> Tensor:
        """The noise ``(n, C, H, W)`` of the copies ``spans`` (copy, first image, image after the last), in item order."""
        if len(self._gens) == 1 and len(self._shape) == 4:  # one stream for the batch: slices of each copy's draw
            parts = [self._stream(0, rep)[lo:hi] for rep, lo, hi in spans]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return torch.stack([self._stream(i, rep) for rep, lo, hi in spans for i in range(lo, hi)])

    def _drawn_into_one(self, spans: list[tuple[int, int, int]], n: int) -> Tensor:
        """:meth:`_chunk_noise` for a float32 ``x``, in a buffer ``(n, C, H, W)`` of the chunk's own (the caller makes
        the copies in it, in place). A draw that is the next of its stream goes straight into the buffer's rows
        (``normal_`` on the same generator: ``torch.randn``'s kernel, the same numbers), not into a tensor of its own
        then stacked. The last draw of each stream is kept as before (a copy of its rows, as large as the draw it
        stands for, so the memory probe measures the same), since the next chunk may ask for it again (the engine's
        memory probe, a chunk that ends inside a copy)."""
        buf = torch.empty((n,) + tuple(self.x.shape[1:]), dtype=torch.float32, device=self.x.device)
        batch = len(self._gens) == 1 and len(self._shape) == 4  # one stream for the batch: one draw a copy
        kept: dict[int, tuple[int, int, int]] = {}  # stream -> its draw's first row in buf, rows, copy
        i = 0
        for rep, lo, hi in spans:
            for s in (0,) if batch else range(lo, hi):
                rows = hi - lo if batch else 1
                if rep == self._reps[s] + 1 and (not batch or rows == self._shape[0]):
                    buf[i:i + rows].normal_(generator=self._gens[s])  # the stream's next draw, in place
                    self._reps[s] = rep
                    kept[s] = (i, rows, rep)
                else:  # a draw asked for again, one a partial copy needs whole, or one after a skipped draw
                    draw = self._stream(s, rep)
                    buf[i:i + rows] = draw[lo:hi] if batch else draw
                i += rows
        for s, (at, rows, rep) in kept.items():
            if self._reps[s] == rep:  # still the stream's last draw
                self._draws[s] = buf[at:at + rows].clone() if batch else buf[at].clone()
        return buf


def _finish(maps: Tensor, mod: Optional[GradModifier], red: Optional[Reduction], multi: bool,
            targets: list[Target]) -> Tensor:
    """Grad modifier and reduction of maps ``(n, [K,] ...)``; maps already ``(n, [K,] H, W)`` stay
    unreduced. The reduction sees each target's :meth:`~salience.targets.Target.map_part`."""
    if mod is not None:
        maps = mod(maps)
    if red is None or maps.dim() - (1 if multi else 0) != 4:
        return maps
    if multi:
        return torch.stack([red(t.map_part(maps[:, k])) for k, t in enumerate(targets)], dim=1)
    return red(targets[0].map_part(maps))


def _tag(method: Callable[..., Tensor], targets: Sequence[Target], reduce: Any, reduce_each: bool,
         raw_options: dict) -> str:
    """The engine run's tag: what a chunk keeps per item besides the method's pass (K maps, reduced per chunk or
    not) and the layers the targets read (:func:`~salience.targets.layers_tag`) are part of it, since the memory
    probe's bytes per item are reused by a later call of the same tag (K-fold too small for K targets after one)."""
    kept = f"{len(targets)}:{layers_tag(targets)}:{reduce if reduce_each and isinstance(reduce, str) else reduce_each}"
    return f"smoothgrad:{getattr(method, '__name__', type(method).__name__)}:{kept}:{sorted(raw_options.items())!r}"[:400]


def _call(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Any, options: dict) -> Tensor:
    """``method``'s maps of the copies ``x``. The call's guard entry, state found, run fingerprint and weights' sum
    walked the model once (its :func:`~salience._core.fingerprint.one_walk`): the stretch ends here, the method
    being possibly the user's code, which may change the model."""
    end_walk()
    out = method(model, x, target, **options)
    if not isinstance(out, Tensor) or out.shape[:1] != x.shape[:1]:
        raise SalienceError(
            f"the wrapped method must return a tensor with one map per image, shape ({x.shape[0]}, ...), got "
            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
        )
    return out
