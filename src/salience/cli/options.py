"""The methods' options on the command line, read from their signatures (no table of the CLI's own).

Every keyword-only parameter of a method in :data:`salience.methods.METHODS` is a flag of
``salience explain``: the keyword with ``-`` for ``_`` (``grad_modifier`` -> ``--grad-modifier``),
but ``method`` (SmoothGrad's inner method, ``--method`` being taken) is ``--smooth-method``.
The flag's value is read by the parameter's annotation (``int``, ``float``, a number or a name,
``none`` for ``None`` where the annotation allows it; ``bool`` parameters are ``--x`` /
``--no-x``); names with a registry are checked against it (:data:`salience.reduce.REDUCTIONS`,
:data:`~salience.reduce.GRAD_MODIFIERS`, :data:`salience.rules.UNSUPPORTED`, SmoothGrad's
``VARIANTS``, :data:`~salience.methods.METHODS`); the methods check the rest themselves.

Each method gets only the given options it takes (a method with ``**options`` and a ``method``
parameter, SmoothGrad, also takes those of its inner method); an option that no chosen method
takes is refused, naming the methods that take it.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

from salience._core.errors import SalienceError, suggest
from salience._core.layers import resolve_layer
from salience.methods import METHODS
from salience.methods.smoothgrad import VARIANTS
from salience.reduce import GRAD_MODIFIERS, REDUCTIONS
from salience.rules import UNSUPPORTED

NOT_FLAGS: dict[str, str] = {
    "progress": "the command draws its own progress bar (--progress)",
    "return_gap": "it turns the result into (maps, gap); the command writes maps",
    "memory_format": "a flag of the command for every method (--memory-format)",
    "compile": "a flag of the command for every method (--compile)",
    "precision": "a flag of the command for every method (--precision)",
}
"""Keyword parameters that are no flag, and why."""

_FLAG_NAMES = {"method": "--smooth-method"}
_INNER = "method"  # the keyword of a method that wraps another (SmoothGrad)
_CHOICES: dict[str, Sequence[str]] = {
    "reduce": [*REDUCTIONS, "none"], "grad_modifier": list(GRAD_MODIFIERS), "unsupported": UNSUPPORTED,
    "variant": VARIANTS, _INNER: list(METHODS),
}
"""The registry each named value is looked up in (as the methods themselves do)."""

_DEST = "method_option_"


@dataclass
class MethodOption:
    """One keyword parameter of one or more methods, as a flag: ``defaults`` per method name."""

    keyword: str
    flag: str
    annotation: str
    kind: str  # "bool", "int", "float", "number" (a number or a name), "name", "method"
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return _DEST + self.keyword

    def metavar(self) -> str:
        return {"int": "N", "float": "X", "number": "VALUE"}.get(self.kind, "NAME")


def keyword_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """``fn``'s keyword-only parameters that are flags (not those of :data:`NOT_FLAGS`)."""
    return [p for p in _signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_FLAGS]


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: no options
        return inspect.Signature()


def wraps_methods(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes an inner method (``method=``) and hands it other options (``**options``)."""
    params = _signature(fn).parameters.values()
    return (any(p.name == _INNER and p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
            and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params))


def accepted(fn: Callable[..., Any], inner: Optional[Callable[..., Any]] = None) -> set[str]:
    """The flag keywords ``fn`` takes; with ``inner`` (for a method that wraps one) also the inner's."""
    names = {p.name for p in keyword_parameters(fn)}
    if inner is not None and wraps_methods(fn):
        names |= {p.name for p in keyword_parameters(inner)} - {_INNER}
    return names


def _annotation(p: inspect.Parameter) -> str:
    a = p.annotation
    if a is inspect.Parameter.empty:
        return type(p.default).__name__ if p.default is not None else ""
    return a if isinstance(a, str) else getattr(a, "__name__", str(a))


def _kind(keyword: str, annotation: str, default: Any) -> str:
    if keyword == _INNER:
        return "method"
    if isinstance(default, bool):
        return "bool"
    words = set(re.findall(r"[A-Za-z_]+", annotation))
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


# --------------------------------------------------------------------------------- parser


def add_method_args(p: argparse.ArgumentParser) -> None:
    """A flag per method option, in a group of its own; each help names the methods that take it."""
    group = p.add_argument_group("method options", "  each goes to the chosen methods that take it; "
                                 "'salience list METHOD' shows a method's options")
    for opt in method_options().values():
        group.add_argument(opt.flag, dest=opt.dest, default=None, help=_help(opt),
                           **({"action": argparse.BooleanOptionalAction} if opt.kind == "bool"
                              else {"metavar": opt.metavar()}))


def _help(opt: MethodOption) -> str:
    groups: dict[str, list[str]] = {}
    for name, d in opt.defaults.items():
        groups.setdefault(show_default(d), []).append(name)
    defaults = "; ".join(f"{', '.join(ns)}: default {d}" for d, ns in groups.items())
    choices = f" One of {', '.join(_CHOICES[opt.keyword])}." if opt.keyword in _CHOICES else ""
    wrappers = [n for n, fn in METHODS.items() if wraps_methods(fn) and opt.keyword not in accepted(fn)]
    via = "".join(f" Also {w} --smooth-method NAME." for w in wrappers) if opt.keyword != _INNER else ""
    return f"{defaults}.{choices}{via}".replace("%", "%%")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line, by keyword, read into their values."""
    given: dict[str, Any] = {}
    for opt in method_options().values():
        text = getattr(args, opt.dest, None)
        if text is not None:
            given[opt.keyword] = text if opt.kind == "bool" else read_value(opt, text)
    return given


def read_value(opt: MethodOption, text: str) -> Any:
    """``text`` as ``opt``'s value; a :class:`SalienceError` naming the flag if it cannot be."""
    t = text.strip()
    if opt.keyword in _CHOICES and t not in _CHOICES[opt.keyword]:
        raise SalienceError(f"{opt.flag} must be one of {', '.join(_CHOICES[opt.keyword])}, got {t!r}"
                            f"{suggest(t, list(_CHOICES[opt.keyword]))}")
    if opt.kind == "method":
        return METHODS[t]
    if t.lower() == "none" and ("None" in opt.annotation or opt.keyword in _CHOICES):
        return None
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
    """Refuse a given option that none of ``methods`` takes, naming the methods that take it."""
    inner = given.get(_INNER)
    taken: set[str] = set()
    for name in methods:
        taken |= accepted(METHODS[name], inner or _default_inner(METHODS[name]))
    for keyword in given:
        if keyword not in taken:
            opt = method_options()[keyword]
            raise SalienceError(f"{opt.flag} is an option of {_takers(keyword)}; not of "
                                f"{', '.join(methods)} (add --method with one that takes it, or drop {opt.flag})")


def _default_inner(fn: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    p = _signature(fn).parameters.get(_INNER)
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
    taken = {k: v for k, v in given.items() if k in accepted(fn, given.get(_INNER) or _default_inner(fn))}
    return (functools.partial(fn, **taken) if taken else fn), taken


def option_error(message: str, given: dict[str, Any]) -> Optional[str]:
    """``message`` prefixed with the flag of the first given option it names, or ``None`` if it names none."""
    options = method_options()
    for keyword in given:
        if keyword != _INNER and re.search(rf"\b{re.escape(keyword)}\b", message):
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
    """The model for a dry run: the same parameters, a forward pass that stops the method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Halt()


def check_values(model: nn.Module, x: Tensor, methods: Sequence[str], given: dict[str, Any]) -> None:
    """Run each method's own checks of the given option values, stopping it at its first forward
    pass (a dry run on ``x``, nothing computed): a bad value is a :class:`SalienceError` naming the
    flag. Errors that name no given option (the model, the input) are left to the real run."""
    options = {k: v for k, v in given.items() if k != "layer"}  # looked up in the model by check_layer
    if not options:
        return
    halting = _Halting(model)
    for name in methods:
        fn, _ = bind(name, options)
        try:
            fn(halting, x)
        except _Halt:
            pass
        except SalienceError as e:
            msg = option_error(str(e), given)
            if msg:
                raise SalienceError(msg) from None
        except Exception:  # noqa: BLE001 - not about the options: the real run reports it
            pass


# --------------------------------------------------------------------------------- salience list METHOD


def describe(name: str) -> list[str]:
    """``salience list NAME``: the method's first doc line, then each option: its flag, keyword,
    type and default (from the signature) and what the docstrings say of it."""
    if name not in METHODS:
        raise SalienceError(f"unknown method {name!r}{suggest(name, list(METHODS))} (available: {', '.join(METHODS)})")
    fn = METHODS[name]
    doc = inspect.getdoc(fn) or ""
    lines = [f"{name}: {_clean(doc.splitlines()[0]) if doc else ''}",
             f"options (salience explain IMAGE --model MODEL --method {name} OPTIONS):"]
    flags = method_options()
    for p in keyword_parameters(fn):
        opt = flags[p.name]
        flag = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.kind == "bool" else f"{opt.flag} {opt.metavar()}"
        lines.append(f"  {flag:<36} {p.name}: {opt.annotation or '?'} = {show_default(p.default)}")
        said = _doc_sentence(p.name, fn)
        if said:
            lines.append(f"  {'':<36}   {said}")
    if wraps_methods(fn):
        lines.append("  the inner method's options (--smooth-method NAME) go to it, e.g. --layer for gradcam; "
                     "'salience list NAME' lists them")
    skipped = [k for k in _signature(fn).parameters if k in NOT_FLAGS]
    lines += [f"  ({k}= is no flag: {NOT_FLAGS[k]})" for k in skipped]
    return lines


def _clean(text: str) -> str:
    """reStructuredText markup off: ``x`` -> x, :func:`a.b` -> a.b."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def _doc_sentence(keyword: str, fn: Callable[..., Any], limit: int = 160) -> str:
    """What ``fn``'s docstring (else another method's) says of ``keyword``: the first sentence that
    starts with it, else the first that names it."""
    own = inspect.getdoc(fn) or ""
    others = " ".join(inspect.getdoc(f) or "" for f in METHODS.values() if f is not fn)
    for doc in (own, others):
        sentences = re.split(r"(?<=[.])\s+(?=[A-Z`(])", " ".join(doc.split()))
        named = [t for t in sentences if f"``{keyword}``" in t or f"``{keyword}=" in t]
        first = next((t for t in named if t.startswith(f"``{keyword}``")), named[0] if named else "")
        if first:
            text = _clean(first)
            return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
    return ""
