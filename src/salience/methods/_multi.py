"""The one-pass methods (vanilla, guided backprop, deconvnet, input x gradient), one or several targets.

A target given as a ``(B, K)`` integer tensor, a list of per-image class lists, or a list of
targets that contains ``None``, a :class:`~salience.targets.Target` or a function is *K
targets*: the result gains a ``K`` axis after the batch, ``(B, K, ...)``. The K gradients come
from one forward pass walked back K times (see :func:`salience._core.engine.input_gradients`),
so ``--top 5`` costs one forward, not five.

:func:`several_targets` marks a method that takes K targets in one call this way, so that
wrappers (SmoothGrad) hand it all K at once instead of calling it K times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
import types
import typing
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch

from torch import Tensor, nn

from salience._core import engine as _engine
from salience._core import derived as _derived
from salience._core import perf as _perf
from salience._core.fingerprint import close_walk, one_walk, walk_state
from salience import reduce as _reduce
from salience._core.errors import ArgumentError, SalienceError, suggest, user_stacklevel
from salience._core.autograd import check_input, forward_scores, seeing_output, unwrap_output
from salience._core.layers import resolve_layer
from salience.targets import Target, check_output, checked_on_output, split

F = TypeVar("F", bound=Callable[..., Tensor])


def several_targets(method: F) -> F:
    """Mark ``method`` as taking K targets in one call (a ``(B, K)`` tensor or a list of targets ->
    ``(B, K, ...)``) at the cost of one forward pass: SmoothGrad then gives it all K at once."""
    method.several_targets = True  # type: ignore[attr-defined]
    return method


def takes_several_targets(method: Callable[..., Any]) -> bool:
    """Whether ``method`` (or the function a ``functools.partial`` wraps) is marked by :func:`several_targets`."""
    while isinstance(method, functools.partial):
        method = method.func
    return bool(getattr(method, "several_targets", False))


def target_free(method: F) -> F:
    """Mark ``method`` as taking no target (Eigen-CAM: the same map for every class). The registry
    (:data:`salience.methods.METHODS`) holds it through :func:`as_method`, so that callers that
    explain targets call every method alike."""
    method.target_free = True  # type: ignore[attr-defined]
    return method


def is_target_free(method: Callable[..., Any]) -> bool:
    """Whether ``method`` (or the function a ``functools.partial`` wraps) is marked by :func:`target_free`."""
    while isinstance(method, functools.partial):
        method = method.func
    return bool(getattr(method, "target_free", False))


def checked(fn: F) -> F:
    """``fn`` as a public method (``fn`` itself if it is one; the same function for the same ``fn``): a real Python
    function (``types.FunctionType``) that calls ``fn`` as it is, but makes a call ``fn``'s signature does not take (a
    keyword it has no option for, a positional argument missing or too many) an
    :class:`~salience._core.errors.ArgumentError` naming the method, the keyword, the closest option and the method's
    options (a ``TypeError`` still). Only a failed call pays for the check: the signature is read after a
    ``TypeError``, and a ``TypeError`` raised inside ``fn`` (the user's model, a torch op: the arguments bind to the
    signature, so the call was taken) comes out as it was, with this function's one frame added. Python refuses a
    call the signature does not take before ``fn``'s body runs: no pass has run then. The ArgumentError is raised
    past the handler, so that its context is what the caller was handling (as a plain function's TypeError's), not
    Python's TypeError for the same call.

    Applied where each public method is defined (``@checked`` over ``def vanilla(...)``), so that the module's name
    for it is the checked function: it pickles by reference (its module and qualified name, which are ``fn``'s, find
    it), ``salience.vanilla``, ``salience.methods.vanilla`` and ``METHODS["vanilla"]`` are one object, and the runs'
    seed rules, which unbind ``functools.partial`` layers and compare with the module's ``smoothgrad``, find it.
    :func:`functools.update_wrapper` gives it ``fn``'s name, qualified name, module, docstring and marks
    (:func:`several_targets`, :func:`target_free`) and ``__wrapped__``: ``inspect.signature`` / ``help()`` show
    ``fn``'s signature, ``inspect.getsource`` ``fn``'s source. The signature is read once, kept as ``__signature__``
    (each call's option checks ask for it: eight times a SmoothGrad call, 20 us a reading). Its globals are those of
    the module that defines the function under ``fn``'s decorators, so doctest finders count it as that module's."""
    if is_checked(fn):
        return fn
    function = _CHECKED.get(fn)
    if function is None:
        function = _CHECKED[fn] = _checking(fn)
        _CHECKS.add(function)
    return function  # type: ignore[return-value]


def _checking(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A new function that calls ``fn``, with :func:`checked`'s message for a call ``fn``'s signature refuses."""
    # every name the call reads is a cell of this closure: the function runs under another module's globals
    refused, own, problem_of, type_error, is_a = ArgumentError, SalienceError, call_problem, TypeError, isinstance

    def checked_call(*args: Any, **kwargs: Any) -> Any:  # the name tracebacks show for its frame
        try:
            return fn(*args, **kwargs)
        except type_error as e:
            if is_a(e, own):
                raise
            problem = problem_of(fn, args, kwargs)
            if problem is None:  # raised inside the method: not about the call, re-raised as it came
                raise
        # raised past the handler: its context is what the caller was handling, as a plain function's TypeError's
        # (inside the handler it was Python's TypeError, which "from None" hid with the caller's own exception)
        raise refused(problem)

    home = getattr(inspect.unwrap(fn), "__globals__", None)  # under one_model()'s wrapper: the method's module
    if isinstance(home, dict):
        checked_call = types.FunctionType(checked_call.__code__, home, checked_call.__name__, None,
                                          checked_call.__closure__)
    checked_call = functools.update_wrapper(checked_call, fn)
    try:  # read once: each call's option checks ask it (8 times a SmoothGrad call, 20 us each; 2 us kept)
        checked_call.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # no signature to read: inspect follows __wrapped__ as before
        pass
    return checked_call


def is_checked(fn: Any) -> bool:
    """Whether ``fn`` is a public method as :func:`checked` makes it (not a ``functools.partial`` of one)."""
    try:
        return fn in _CHECKS
    except TypeError:  # unhashable
        return False


_CHECKED: dict[Callable[..., Any], Callable[..., Any]] = {}
"""The one checked function of each function (the public methods and Eigen-CAM's adapter)."""
_CHECKS: set[Callable[..., Any]] = set()
"""The checked functions themselves: ``checked`` of one is itself."""


def call_problem(method: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[str]:
    """What is wrong with calling ``method`` with ``args`` and ``kwargs`` as its signature says (the message of
    :func:`checked`'s :class:`~salience._core.errors.ArgumentError`), or ``None`` where the signature takes them."""
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # no signature to read (not a function, a builtin): nothing to say
        return None
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        return _said(getattr(method, "__name__", "the method"), sig, args, kwargs, str(e))
    return None


def _said(name: str, sig: inspect.Signature, args: tuple, kwargs: dict, bound: str) -> str:
    """The message for a call of method ``name`` (signature ``sig``) that ``sig.bind`` refused with ``bound``."""
    kinds = inspect.Parameter
    params = sig.parameters
    positional = [n for n, p in params.items() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    options = [n for n, p in params.items() if p.kind is kinds.KEYWORD_ONLY]
    shown = [n if params[n].default is kinds.empty else f"{n}={params[n].default!r}" for n in positional]
    takes = f"called as {name}({', '.join(shown)}{', *, options' if options else ''})"
    takes += f"; its options: {', '.join(options)}" if options else ""
    any_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params or params[k].kind is kinds.POSITIONAL_ONLY]
    if unknown and not any_keyword:
        word = unknown[0]
        return f"{name} has no option {word!r}{suggest(word, [*options, *positional], n=1)} ({takes})"
    if len(args) > len(positional) and not any(p.kind is kinds.VAR_POSITIONAL for p in params.values()):
        return (f"{name} takes {len(positional)} positional arguments ({', '.join(positional)}), got {len(args)}: "
                f"its options are keywords ({takes})")
    return f"{name}: {bound} ({takes})"


def options_of(method: Callable[..., Any]) -> list[str]:
    """The options of ``method`` as its signature says, for a message: its keywords past ``model, x, target``."""
    kinds = inspect.Parameter
    params = _engine.signature_of(method).parameters.values()
    positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    return positional[3:] + [p.name for p in params if p.kind is kinds.KEYWORD_ONLY]


def bound_problem(method: Callable[..., Any]) -> Optional[str]:
    """What is wrong with the keywords ``functools.partial`` binds to ``method`` (the first its function does not
    take, with the closest option and the function's options: the message of an
    :class:`~salience._core.errors.ArgumentError`), or ``None``. Such a keyword was Python's ``TypeError`` at the
    method's first call, inside a SmoothGrad or a dataset run (after the run folder was made, so that the corrected
    command was refused as another run's)."""
    root, bound = _engine.unbind(method)
    for name in bound:
        if not _engine.accepts(root, name):
            called = getattr(root, "__name__", None) or "the method"
            theirs = options_of(root)
            listed = f"{called}'s options: {', '.join(theirs)}" if theirs else f"{called} takes no options"
            return f"{called} has no option {name!r} (bound to it by functools.partial){suggest(name, theirs, n=1)} " \
                   f"({listed})"
    return None


def shape_problem(method: Callable[..., Any], options: Sequence[str] = ()) -> Optional[str]:
    """What is wrong with calling ``method`` as salience calls a method, ``method(model, x, target, **options)``
    (``options``: the names of the keywords it will be handed), as its signature says (a ``functools.partial``'s
    bindings counted), or ``None`` where the signature takes such a call or cannot be read. A function of the
    user's that takes no target (``lambda model, x: ...``), or a keyword-only argument with no default, was
    Python's raw ``TypeError`` at its first call, inside a SmoothGrad or a dataset run (after the run folder was
    made), with no word of which method; the message names it and its signature. Call it after
    :func:`bound_problem` (a keyword bound that the function does not take has its own message)."""
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension): nothing to say
        return None
    try:
        sig.bind(None, None, None, **{k: None for k in options})
    except TypeError as e:
        root = _engine.unbind(method)[0]
        name = getattr(root, "__name__", None) or "the method"
        unset = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
                 and p.default is inspect.Parameter.empty and n not in options]
        do = (f"give {unset[0]!r} a default, or bind it: functools.partial(fn, {unset[0]}=...)" if unset else
              "a method takes the model, the images and the target: def fn(model, x, target=None, **options)")
        return (f"{name} cannot be called as a method, {name}(model, x, target{', **options' if options else ''}): "
                f"{e} (its signature: {sig}); {do}")
    return None


def as_method(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``method`` under the registry's contract ``method(model, x, target=None, **options)``.

    A method that takes a target is returned as it is. A target-free method (Eigen-CAM) gets an
    adapter that takes the target and gives the one map ``(B, ...)`` for it, or for each of K
    targets ``(B, K, ...)`` when ``target`` is several (as :func:`salience.targets.split` reads it);
    its signature is the method's, with ``target``: option readers (the CLI) see the same options.
    The one place that knows about target-free methods: :data:`salience.methods.METHODS` holds the
    adapted functions, and every caller that takes a user's function passes it through here.

    The map does not depend on the target, but a wrong target is still refused with the error every
    other method gives (:func:`free_maps`): per-image targets for another batch, and a class (or
    output) the model does not have, out of range or negative, checked against the model's output."""
    if not is_target_free(method) or getattr(method, "adapts", None) is not None:
        return method
    cached = isinstance(method, types.FunctionType)  # not partials, which callers make per call
    if cached and method in _ADAPTED:
        return _ADAPTED[method]
    # a checked method's adapter is checked too: a keyword the method has no option for is refused at once (the
    # ArgumentError of the adapter's own check, before the input and the targets are read), and the implementation
    # is called under it, not the checked method again (one checked frame in a traceback, not two)
    takes = _keywords_taken(method) if is_checked(method) else None
    impl = method.__wrapped__ if takes is not None else method  # type: ignore[attr-defined]

    def call(model: nn.Module, x: Tensor, target: Any = None, **options: Any) -> Tensor:
        if options and takes is not None and not takes.issuperset(options):
            raise TypeError("an option the method does not take")  # read against the signature: an ArgumentError
        if not isinstance(x, Tensor) or x.dim() != 4:
            check_input(x, model)  # says what x must be (a list, an image without its batch dimension...)
        targets, multi = split(target, x.shape[0])
        maps = free_maps(lambda: impl(model, x, **options), model, x, targets)
        return maps.unsqueeze(1).repeat(1, len(targets), *([1] * (maps.dim() - 1))) if multi else maps

    functools.update_wrapper(call, method)
    del call.__wrapped__  # type: ignore[attr-defined]  # the signature below, not the method's
    call.__annotations__ = {**_hints(method), "target": Any}  # read under this module's globals: resolved
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.name != "target"]
    at = 2 if len(params) >= 2 else len(params)
    params.insert(at, inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=Any))
    call.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    call.target_free = True  # type: ignore[attr-defined]
    call.several_targets = True  # type: ignore[attr-defined]  # K targets cost the one map
    call.adapts = method  # type: ignore[attr-defined]
    adapter: Callable[..., Tensor] = call
    if is_checked(method):  # a checked method's adapter is checked, and pickles by reference: its qualified name
        call.__qualname__ = f"{method.__qualname__}.as_method"  # finds it as an attribute of the method
        adapter = checked(call)
        method.as_method = adapter  # type: ignore[attr-defined]
    if cached:  # the same adapter for the same function
        _ADAPTED[method] = adapter
    return adapter  # type: ignore[return-value]


_ADAPTED: dict[Callable[..., Any], Callable[..., Tensor]] = {}


def _hints(method: Callable[..., Any]) -> dict[str, Any]:
    """``method``'s annotations resolved in its own module (``typing.get_type_hints``), for its adapter, whose
    globals are this module's (Eigen-CAM's ``LayerSpec`` was a ``NameError`` there); as written where they do not
    resolve."""
    try:
        return typing.get_type_hints(method)
    except Exception:  # noqa: BLE001 - a user's annotation that does not resolve: kept as it is written
        return dict(getattr(method, "__annotations__", None) or {})


def _keywords_taken(method: Callable[..., Any]) -> Optional[frozenset[str]]:
    """The keywords a target-free ``method`` takes past ``model`` and ``x`` (``None``: any, a ``**options``; or its
    signature cannot be read): what its adapter (:func:`as_method`) lets through to it."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params[2:] if p.kind is not inspect.Parameter.POSITIONAL_ONLY)


def free_maps(call: Callable[[], Tensor], model: nn.Module, x: Tensor, targets: Sequence[Target]) -> Tensor:
    """``call()``, a target-free method's maps of ``x``, with ``targets`` (for ``x``'s images) checked
    against the model's output as scoring them would (:func:`salience.targets.check_output`: the same
    errors as every other method). Only the targets that pick outputs by index need the output
    (:func:`salience.targets.checked_on_output`); with none (``None``, the predicted class, a function)
    ``call`` runs as it is. Else the output comes from the method's own pass
    (:func:`salience._core.autograd.seeing_output`): Eigen-CAM's pass then runs on past its layer to
    the output (the layers after it, for the default layer the pooling and the classifier) instead of
    stopping there. A method whose pass does not report the output gets one forward pass without
    gradient (:func:`salience._core.autograd.forward_scores`) for the check. A target on an inner layer
    (``targets.activation``, a custom target with ``layer=``) has its layer looked up in the model: a name
    the model does not have was taken silently."""
    for t in targets:
        if t.layer is not None:
            resolve_layer(model, t.layer)
    check = checked_on_output(targets)
    if not check:
        return call()
    with seeing_output() as seen:
        maps = call()
    output = unwrap_output(seen[-1], model) if seen else forward_scores(model, x)
    check_output(check, output)
    return maps


def apply_method(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Any, **options: Any) -> Tensor:
    """``as_method(method)(model, x, target, **options)``: kept for callers written before
    :func:`as_method`; call ``METHODS[name]`` (or ``as_method(fn)``) directly instead."""
    return as_method(method)(model, x, target, **options)


def finish(maps: Tensor, grad_modifier: Any, reduce: Any, multi: bool,
           targets: Optional[Sequence[Target]] = None) -> Tensor:
    """``(B, K, C, H, W)`` -> the grad modifier, then the reduction, per target ``k``; the K axis is
    dropped unless ``multi``. A reduction sees the part of the gradient its target's map shows
    (:meth:`salience.targets.Target.map_part`: the positive part for a regression direction)."""
    mod = _reduce.get_grad_modifier(grad_modifier)
    red = _reduce.get_reduction(reduce)
    outs = []
    for k in range(maps.shape[1]):
        m = maps[:, k]
        if mod is not None:
            m = mod(m)
        if red is not None:
            m = red(targets[k].map_part(m) if targets is not None else m)
        outs.append(m)
    if not multi and len(outs) == 1 and outs[0].is_contiguous() and (mod is not None or red is not None) and \
            _reduce.own(mod) and _reduce.own(red):
        # one target's map as it is (salience's own modifier or reduction made it, a new tensor): a stack of one copied
        # it, and its [:, 0] gave these values, contiguous. Not with neither: maps[:, 0] is then a view of the method's
        # maps, which may be a target's modify_gradient result, a tensor the user holds (copied, as a user's reduce's)
        return outs[0]
    out = torch.stack(outs, dim=1)
    return out if multi else out[:, 0]


# (method, option) pairs whose "not applied" warning was given: once per process each
_UNAPPLIED: set[tuple[str, str]] = set()
_UNAPPLIED_LOCK = threading.Lock()

# why a pass with a backprop rule or a hooked layer does not take each performance option, by option: the reason the
# one warning per process of an option not applied gives (precision and memory_format: a hooked layer's pass without
# gradients, Eigen-CAM's); a method whose passes skip an option for reasons of their own passes its own table as ``why``
_WHY_HOOKED_PASSES_SKIP: dict[str, str] = {
    "compile": "a compiled graph does not see the backprop rule's interception of the ReLUs nor a hook added to a "
               "layer after it was compiled; the passes run eagerly",
    "fold_batchnorm": "the folded copy has neither the model's layers to hook nor its activations as the rule "
                      "sees them; the passes run the model itself",
    "precision": "its pass (a layer's output read without gradients) runs in the model's own precision",
    "memory_format": "its pass (a layer's output read without gradients) runs in the model's own layout",
}


@contextlib.contextmanager
def hooked_pass(model: nn.Module, x: Tensor, method: str, *,
                why: Optional[Mapping[str, str]] = None) -> Iterator[Optional[_perf.Run]]:
    """The block's passes (a backprop rule's, or a hooked layer's: guided backprop, deconvnet, the gradient CAMs,
    Guided Grad-CAM) under the performance options in force (:func:`salience._core.perf.current`), as far as they
    apply: ``precision`` (autocast around the forward pass) and ``memory_format="channels_last"`` (the model's
    and the input's layout), as one chunk of a :class:`~salience._core.perf.Run`; not ``compile`` nor
    ``fold_batchnorm`` (:data:`_WHY_HOOKED_PASSES_SKIP`), which a warning says once per process for each method and
    option. Inside a many-pass method's chunk (SmoothGrad of guided backprop) that run's options are in force and
    checked alike. Yields the run in force (``None``: none, the passes run as they are;
    :func:`salience._core.autograd.backward` finds it itself). ``x``: checked by the caller. ``why``: the method's own
    reasons, by option, for the warning (default :data:`_WHY_HOOKED_PASSES_SKIP`: a backprop rule's, a hooked
    layer's)."""
    active = _perf.active(model)
    options = active.options if active is not None else _perf.current()
    _warn_unapplied(method, options, ("compile", "fold_batchnorm"), why)
    channels_last = options.memory_format == "channels_last"
    if active is not None or (options.precision == "fp32" and not channels_last):
        yield active
        return
    run = _perf.Run(model, x, dataclasses.replace(options, compile=False, fold_batchnorm=False), tag=f"hooked:{method}")
    try:
        with run.chunk(channels_last, False):
            yield run
    finally:
        _perf.close_run(run)


def full_precision(t: Tensor, x: Tensor) -> Tensor:
    """A layer's output or gradient from a pass under ``precision="bf16"`` / ``"fp16"`` (autocast) in ``x``'s dtype,
    so that what a method computes from it, and its map, are in the input's precision as without the option."""
    low = (torch.float16, torch.bfloat16)
    return t.to(x.dtype) if t.dtype in low and x.dtype not in low and x.is_floating_point() else t


def refuse_fp16_overflow(model: nn.Module, *grads: Tensor, what: str = "the gradients") -> None:
    """Inside a pass's block: under ``precision="fp16"`` (the run in force on ``model``), a :class:`SalienceError`
    where ``grads`` (the pass's gradients, cast back or not) are NaN or infinite: float16 holds magnitudes up to
    65504, and a map cast back from an overflowed pass was NaN / infinite in float32 without a word. Inside a
    many-pass call tested at its end (:meth:`salience._core.derived.Derived.defer`: no synchronization per pass);
    nothing at all under another precision. ``what``: the tensors, as the message names them (attention rollout's
    are the attention matrices of its forward pass)."""
    run = _perf.active(model)
    if run is None or run.dtype is not torch.float16 or not grads:
        return
    bad = torch.stack([~torch.isfinite(g.detach()).all() for g in grads]).any()

    def refuse() -> None:
        raise SalienceError(f"{what} overflow float16 under precision='fp16' (NaN or infinite values: float16 holds "
                            "magnitudes up to 65504); use precision='bf16' (float32's range) or 'fp32'")

    scope = _derived.current()
    if scope is not None:
        scope.defer("fp16 overflow", bad, refuse)
    elif bool(bad):
        refuse()


def warn_unapplied(method: str, model: nn.Module, unapplied: Sequence[str], options: Any = None, *,
                   why: Optional[Mapping[str, str]] = None) -> None:
    """:func:`_warn_unapplied` of ``options`` (default: those in force for ``model``, a many-pass method's run's, else
    the settings), for a method whose pass takes none of ``unapplied`` (Eigen-CAM's; Ablation-CAM's ``compile`` and
    ``fold_batchnorm``); ``why``: its reasons by option (default :data:`_WHY_HOOKED_PASSES_SKIP`)."""
    if options is None:
        active = _perf.active(model)
        options = active.options if active is not None else _perf.current()
    _warn_unapplied(method, options, unapplied, why)


def _warn_unapplied(method: str, options: Any, unapplied: Sequence[str],
                    why: Optional[Mapping[str, str]] = None) -> None:
    """The one warning per process of each option of ``unapplied`` set in ``options`` (not its default) that
    ``method``'s passes do not apply (a user who set ``compile=True`` learns that these passes ran eagerly);
    ``why``: the reason for each option (default :data:`_WHY_HOOKED_PASSES_SKIP`)."""
    set_to = {"compile": options.compile if options.backend is not None else None,
              "fold_batchnorm": True if options.fold_batchnorm else None,
              "precision": options.precision if options.precision != "fp32" else None,
              # "auto" is measured over a many-pass call's chunks only: no single pass applies it, none says so
              "memory_format": options.memory_format if options.memory_format == "channels_last" else None}
    for option in unapplied:
        value = set_to[option]
        if value is None:
            continue
        with _UNAPPLIED_LOCK:
            if (method, option) in _UNAPPLIED:
                continue
            _UNAPPLIED.add((method, option))
        reason = (why or _WHY_HOOKED_PASSES_SKIP)[option]
        warnings.warn(f"{method}: {option}={value!r} is not applied to its passes: {reason} (said once per process)",
                      stacklevel=user_stacklevel())


def input_gradient_maps(
    model: nn.Module,
    x: Tensor,
    target: Any,
    *,
    grad_modifier: Any,
    reduce: Any,
    strip_softmax: bool,
    extra_modes: Sequence[Any] = (),
    times_input: bool = False,
    method: str = "",
) -> Tensor:
    """The (ruled) input gradient of one or several targets (times ``x`` with ``times_input``),
    modified and reduced. ``method``: the name a ruled pass's warnings give (:func:`hooked_pass`).

    ``x`` ``(B, C, H, W)`` -> ``(B, ...)`` for one target, ``(B, K, ...)`` for K targets. The input's checks,
    the guard's entry and the rest before the pass walk the model once (:func:`~salience._core.fingerprint.one_walk`).
    """
    outer = walk_state()
    try:
        one_walk(model)
        check_input(x, model)
        targets, multi = split(target, x.shape[0])
        _reduce.get_grad_modifier(grad_modifier)
        _reduce.get_reduction(reduce)
        # A plain pass (no backprop rule) runs under the performance options in force, as one chunk of
        # the engine's (perf.one_pass: nothing changes with the defaults, or inside a many-pass run); a ruled
        # pass under those that apply to it (hooked_pass: not compiled, not folded).
        ruled = hooked_pass(model, x, method) if extra_modes else None
        with ruled if ruled is not None else _perf.one_pass(model, x, tag="input-gradient"):
            # x checked above, nothing of the user's run since: not checked again (a second finiteness test and walk)
            grads, _, _ = _engine.input_gradients(model, x, targets, strip_softmax=strip_softmax,
                                                  extra_modes=extra_modes, checked=True)
            refuse_fp16_overflow(model, grads)
    finally:
        close_walk(outer)
    if times_input:  # x detached: a caller's x that requires grad must not put the map on its graph
        grads = grads * x.detach().unsqueeze(0)
    return finish(grads.transpose(0, 1), grad_modifier, reduce, multi, targets)
