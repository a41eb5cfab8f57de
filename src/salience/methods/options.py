"""The methods' options, read from their signatures: the one place that turns an option's text into
its value and binds it to a method (no table of options of its own).

Every keyword-only parameter of a method in :data:`salience.methods.METHODS` is an option:
:func:`method_options` gives each with its kind (read from the annotation: ``int``, ``float``,
a number or a name, ``bool``), its default per method, and, for names with a registry, the
choices (:data:`CHOICES`: :data:`salience.reduce.REDUCTIONS`, :data:`~salience.reduce.GRAD_MODIFIERS`,
:data:`salience.rules.UNSUPPORTED`, SmoothGrad's ``VARIANTS``, :data:`~salience.methods.METHODS`).
:func:`read_value` reads a text into the value; :func:`bind` gives a method with the options it
takes (a method with ``**options`` and a ``method`` parameter, SmoothGrad, also takes those of
its inner method); :func:`check_values` runs the methods' own checks of the values without
computing anything. The command line (:mod:`salience.cli.options`, whose flags are the keywords
with ``-`` for ``_``, ``method`` being ``--smooth-method``) and the explorer
(:mod:`salience.explore`) both read options here.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from salience._core.engine import TargetsCounted, signature_of
from salience._core.errors import ArgumentError, SalienceError, suggest
from salience._core.layers import resolve_layer
from salience.methods import METHODS
from salience.methods._tokens import _check_grid, _check_prefix
from salience.methods.smoothgrad import VARIANTS
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS
from salience.rules import UNSUPPORTED

__all__ = ["NOT_FLAGS", "CHOICES", "MethodOption", "method_options", "keyword_parameters", "accepted", "wraps_methods",
           "show_default", "read_value", "bind", "check_taken", "with_options", "check_applicable", "check_layer",
           "check_values", "check_bound_values", "dry_run", "option_error"]


NOT_FLAGS: dict[str, str] = {
    "progress": "the command draws its own progress bar (--progress)",
    "return_gap": "it turns the result into (maps, gap); the command writes maps",
    "memory_format": "a flag of the command for every method (--memory-format)",
    "compile": "a flag of the command for every method (--compile)",
    "precision": "a flag of the command for every method (--precision)",
}
"""Keyword parameters that are no flag, and why."""

_FLAG_NAMES = {"method": "--smooth-method", "masks": "--rise-masks"}
"""Flags renamed where the plain name means something else on the command line: `--masks DIR` is
the object masks of `salience evaluate` and of dataset runs."""
INNER_METHOD = "method"  # the keyword of a method that wraps another (SmoothGrad)
CHOICES: dict[str, Sequence[str]] = {
    "reduce": [*REDUCTIONS, "none"], "grad_modifier": list(GRAD_MODIFIERS), "unsupported": UNSUPPORTED,
    "variant": VARIANTS, INNER_METHOD: list(METHODS),
}
"""The registry each named value is looked up in (as the methods themselves do)."""

_DEST = "method_option_"


@dataclass
class MethodOption:
    """One keyword parameter of one or more methods, as a flag: ``defaults`` per method name."""

    keyword: str
    flag: str
    annotation: str
    kind: str  # "bool", "int", "float", "number" (a number or a name), "pair" (two ints H,W), "name", "method"
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return _DEST + self.keyword

    def metavar(self) -> str:
        return {"int": "N", "float": "X", "number": "VALUE", "pair": "H,W"}.get(self.kind, "NAME")


def keyword_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """``fn``'s keyword-only parameters that are flags (not those of :data:`NOT_FLAGS`)."""
    return [p for p in signature_of(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_FLAGS]


def wraps_methods(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes an inner method (``method=``) and hands it other options (``**options``)."""
    params = signature_of(fn).parameters.values()
    return (any(p.name == INNER_METHOD and p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
            and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


def accepted(fn: Callable[..., Any], inner: Optional[Callable[..., Any]] = None) -> set[str]:
    """The flag keywords ``fn`` takes; with ``inner`` (for a method that wraps one) also the inner's."""
    names = {p.name for p in keyword_parameters(fn)}
    if inner is not None and wraps_methods(fn):
        names |= {p.name for p in keyword_parameters(inner)} - {INNER_METHOD}
    return names


def _annotation(p: inspect.Parameter) -> str:
    a = p.annotation
    if a is inspect.Parameter.empty:
        return type(p.default).__name__ if p.default is not None else ""
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def _kind(keyword: str, annotation: str, default: Any) -> str:
    if keyword == INNER_METHOD:
        return "method"
    if isinstance(default, bool):
        return "bool"
    words = set(re.findall(r"[A-Za-z_]+", annotation))
    if "tuple" in words and "int" in words and "str" not in words:
        return "pair"  # e.g. grid: (h, w)
    if "str" in words or not words & {"int", "float"}:
        return "number" if words & {"int", "float"} else "name"
    return "float" if "float" in words else "int"


def method_options(methods: Optional[dict[str, Callable[..., Any]]] = None) -> dict[str, MethodOption]:
    """Every flag keyword of the methods (default :data:`METHODS`), in the order first met."""
    options: dict[str, MethodOption] = {}
    for name, fn in (METHODS if methods is None else methods).items():
        for p in keyword_parameters(fn):
            if p.name not in options:
                ann = _annotation(p)
                flag = _FLAG_NAMES.get(p.name, "--" + p.name.replace("_", "-"))
                options[p.name] = MethodOption(p.name, flag, ann, _kind(p.name, ann, p.default))
            options[p.name].defaults[name] = p.default
    return options


def show_default(value: Any) -> str:
    """A default as the command line writes it."""
    if callable(value):
        return next((n for n, f in METHODS.items() if f is value), getattr(value, "__name__", repr(value)))
    return "none" if value is None else str(value)


def read_value(opt: MethodOption, text: str) -> Any:
    """``text`` as ``opt``'s value; a :class:`SalienceError` naming the flag if it cannot be."""
    t = text.strip()
    if opt.keyword in CHOICES and t not in CHOICES[opt.keyword]:
        raise SalienceError(f"{opt.flag} must be one of {', '.join(CHOICES[opt.keyword])}, got {t!r}"
                            f"{suggest(t, list(CHOICES[opt.keyword]))}")
    if opt.kind == "method":
        return METHODS[t]
    if t.lower() == "none" and ("None" in opt.annotation or opt.keyword in CHOICES):
        return None
    if opt.kind == "pair":  # "H,W", "HxW", "(H, W)", or one N for (N, N)
        m = re.fullmatch(r"\(?\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?\)?", t)
        if m is None:
            raise SalienceError(f"{opt.flag} must be two ints H,W (e.g. 14,14), or one N for N,N; got {text!r}")
        return int(m.group(1)), int(m.group(2) or m.group(1))
    if opt.kind in ("int", "float", "number"):
        for convert in ((int,) if opt.kind == "int" else (float,) if opt.kind == "float" else (int, float)):
            try:
                return convert(t)
            except ValueError:
                pass
        if opt.kind != "number":
            raise SalienceError(f"{opt.flag} must be {'an int' if opt.kind == 'int' else 'a number'}, got {text!r}")
    return t



# --------------------------------------------------------------------------------- methods


def check_applicable(methods: Sequence[str], given: dict[str, Any]) -> None:
    """Refuse a given option that none of ``methods`` takes, naming the methods that take it, and
    ``gamma`` without a list of layers (LayerCAM ignores it for one layer: an option silently lost)."""
    inner = given.get(INNER_METHOD)
    taken: set[str] = set()
    for name in methods:
        taken |= accepted(METHODS[name], inner or _default_inner(METHODS[name]))
    for keyword in given:
        if keyword not in taken:
            opt = method_options()[keyword]
            raise SalienceError(f"{opt.flag} is an option of {_takers(keyword)}; not of "
                                f"{', '.join(methods)} (add --method with one that takes it, or drop {opt.flag})")
    if "gamma" in given and not isinstance(given.get("layer"), (list, tuple)):
        # LayerCAM uses gamma only to fuse a list of layers; one layer name (all a flag can give) ignored it
        raise SalienceError("--gamma scales LayerCAM's maps only where several layers are fused, and --layer names "
                            "one layer, so it would change nothing: drop --gamma (several layers: from Python, "
                            "salience.layercam(model, x, layer=[...], gamma=...))")


def _default_inner(fn: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    p = signature_of(fn).parameters.get(INNER_METHOD)
    return p.default if p is not None and wraps_methods(fn) and callable(p.default) else None


def _takers(keyword: str) -> str:
    """The methods that take ``keyword``: themselves, and through a wrapping method."""
    own = [n for n, fn in METHODS.items() if keyword in accepted(fn)]
    wrappers = [n for n, fn in METHODS.items() if wraps_methods(fn) and keyword not in accepted(fn)]
    via = [f"{w} --smooth-method {'|'.join(n for n in own if n != w)}" for w in wrappers if own]
    return ", ".join(own) + (f" (also through {', '.join(via)})" if via else "")


def bind(name: str, given: dict[str, Any]) -> tuple[Callable[..., Tensor], dict[str, Any]]:
    """Method ``name`` with those of the ``given`` options that it takes, and those options."""
    fn = METHODS[name]
    taken = {k: v for k, v in given.items() if k in accepted(fn, given.get(INNER_METHOD) or _default_inner(fn))}
    return (functools.partial(fn, **taken) if taken else fn), taken


def check_taken(fn: Callable[..., Any], given: Any, name: str, what: Optional[str] = None) -> None:
    """A :class:`SalienceError` for ``given`` that is not a dict of keyword options, or an
    :class:`~salience._core.errors.ArgumentError` (a ``TypeError`` too, as a method's own for a keyword it has no
    option for) naming the closest option for an option the method ``fn`` (called ``name``) does not take (a
    function with ``**options`` takes any), before any work: it was the method's raw ``TypeError`` at its first
    call. ``what``: how the message names the options (default: the options of method ``name``)."""
    if not isinstance(given, Mapping):
        raise SalienceError(f"{what or f'the options of method {name!r}'} must be a dict of keyword options, e.g. "
                            f"{{'samples': 8}}; got {type(given).__name__}")
    params = signature_of(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in given if k not in params or k in ("model", "x", "target")]
        if unknown:
            names = [k for k in params if k not in ("model", "x", "target")]
            raise ArgumentError(f"method {name!r} takes no option {unknown[0]!r} (it takes: {', '.join(names)})"
                                f"{suggest(str(unknown[0]), names, n=1)}")


def with_options(fns: Mapping[str, Callable[..., Any]], name: str, given: Any) -> Callable[..., Any]:
    """``fns[name]`` with the keyword options ``given`` bound (the Python form, ``method_options={name:
    {...}}`` of :func:`salience.explain_dataset` and :func:`salience.evidence.evaluate.run_evaluation`);
    a method that is not run, or an option the method does not take, is refused before the run."""
    if name not in fns:
        raise SalienceError(f"method_options names {name!r}, which is not one of the methods run ({', '.join(fns)})")
    check_taken(fns[name], given, name, f"method_options[{name!r}]")
    return functools.partial(fns[name], **given) if given else fns[name]


def option_error(message: str, given: dict[str, Any]) -> Optional[str]:
    """``message`` prefixed with the flag of the first given option it names, or ``None`` if it names none."""
    options = method_options()
    for keyword in given:
        if keyword != INNER_METHOD and re.search(rf"\b{re.escape(keyword)}\b", message):
            return f"{options[keyword].flag}: {message}"
    return None


def check_layer(model: nn.Module, given: dict[str, Any]) -> None:
    """``--layer`` looked up in the model before anything is computed."""
    if given.get("layer") is not None:
        try:
            resolve_layer(model, given["layer"])
        except SalienceError as e:
            raise SalienceError(f"--layer: {e}") from None


class _Halt(BaseException):
    """Raised by :class:`_Halting` at the first forward pass of a dry run."""


class _Halting(nn.Module):
    """The model for a dry run: the same layers under the same names (a ``layer`` option bound to the
    method names them as in the model), the same parameters, a forward pass that stops the method.
    The model itself is not changed: its layers are shared, not moved."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.training = model.training  # the flag only: train() would set the model's layers too
        try:
            for name, child in model.named_children():
                self.add_module(name, child)
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, p)
            for name, b in model.named_buffers(recurse=False):
                self.register_buffer(name, b)
        except (KeyError, AttributeError):  # a name nn.Module keeps for itself: the model as one layer
            for table in (self._modules, self._parameters, self._buffers):
                table.clear()
            self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Halt()


def check_values(model: nn.Module, x: Tensor, methods: Sequence[str], given: dict[str, Any], targets: int = 1,
                 said: str = "") -> None:
    """Run each method's own checks of the given option values, stopping it at its first forward
    pass (a dry run on ``x``, nothing computed): a bad value is a :class:`SalienceError` naming the
    flag. Errors that name no given option (the model, the input) are left to the real run.
    ``targets``: how many targets the real call explains (``--top K``; a ``(1, K)`` target in the dry run, so
    SmoothGrad counts its passes for each, as the real call does), ``said`` the flag that asks for them
    (``"--top 3"``), named where the refusal counts them: a :class:`~salience._core.engine.TargetsCounted` of K
    targets says itself again with the flag (session 43; the message's words were searched for ``"K targets"``)."""
    for keyword, check in (("grid", _check_grid), ("prefix_tokens", _check_prefix)):
        # checked by the CAMs after their first pass (the layer's output), which the dry run never reaches
        if given.get(keyword) is not None:
            try:
                check(given[keyword])
            except SalienceError as e:
                raise SalienceError(f"{method_options()[keyword].flag}: {e}") from None
    options = {k: v for k, v in given.items() if k != "layer"}  # looked up in the model by check_layer
    if not options:
        return
    target = torch.arange(targets, device=x.device).unsqueeze(0) if targets > 1 else None
    for name in methods:
        e = dry_run(bind(name, options)[0], model, x, target)
        msg = option_error(str(e), given) if e is not None else None
        if msg:
            if said and isinstance(e, TargetsCounted) and e.targets == targets:  # the K it counts: said's
                msg = option_error(e.naming(said), given)
            raise SalienceError(msg) from None


def check_bound_values(model: nn.Module, x: Tensor, fns: Mapping[str, Callable[..., Any]],
                       given: Optional[Mapping[str, Mapping[str, Any]]]) -> None:
    """The Python form of :func:`check_values`: each method ``fns[name]`` (``given[name]``, its options,
    bound to it by :func:`with_options`) run by :func:`dry_run` on ``x`` ``(1, C, H, W)``, nothing
    computed; a refusal that names one of its given options is a :class:`SalienceError` naming
    ``method_options[name]`` (:func:`salience.explain_dataset` and
    :func:`salience.evidence.evaluate.run_evaluation` call it before they write anything)."""
    for name, options in (given or {}).items():
        e = dry_run(fns[name], model, x) if options else None
        if e is not None and any(re.search(rf"\b{re.escape(k)}\b", str(e)) for k in options):
            raise SalienceError(f"method_options[{name!r}]: {e}") from None


def dry_run(fn: Callable[..., Any], model: nn.Module, x: Tensor, target: Any = None) -> Optional[SalienceError]:
    """The :class:`SalienceError` that method ``fn`` (its options bound) raises on ``x`` (for ``target``) before
    its first forward pass of ``model`` (which stops it: nothing is computed), or ``None``. Other errors
    are not about the options: the real run reports them."""
    try:
        fn(_Halting(model), x) if target is None else fn(_Halting(model), x, target)
    except _Halt:
        pass
    except SalienceError as e:
        return e
    except Exception:  # noqa: BLE001 - not about the options: the real run reports it
        pass
    return None
