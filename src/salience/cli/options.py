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
takes is refused, naming the methods that take it. Reading values and binding them to methods is
:mod:`salience.methods.options`'s (shared with the explorer); this module adds the flags.
"""
from __future__ import annotations

import argparse
import inspect
import re
from typing import Any, Callable, Optional, Sequence

from torch import Tensor, nn

from salience._core.errors import SalienceError, suggest
from salience._core.info import ModelInfo
from salience.methods import METHODS, integrated, perturbation
from salience.cli.common import with_flags
from salience.methods.options import (CHOICES, NOT_FLAGS, MethodOption, accepted, bind, check_applicable,  # noqa: F401
                                      keyword_parameters, method_options, option_error,
                                      read_value, show_default, wraps_methods)
from salience.methods.options import check_values as _check_values
from salience.methods.options import check_layer as _check_layer
from salience.methods.options import INNER_METHOD, signature_of

__all__ = ["NOT_FLAGS", "CHOICES", "MethodOption", "method_options", "keyword_parameters", "accepted",
           "wraps_methods", "show_default", "read_value", "bind", "check_applicable", "check_layer", "check_values",
           "option_error", "add_method_args", "given_options", "top_targets", "describe"]


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
    choices = f" One of {', '.join(CHOICES[opt.keyword])}." if opt.keyword in CHOICES else ""
    wrappers = [n for n, fn in METHODS.items() if wraps_methods(fn) and opt.keyword not in accepted(fn)]
    via = "".join(f" Also {w} --smooth-method NAME." for w in wrappers) if opt.keyword != INNER_METHOD else ""
    return f"{defaults}.{choices}{via}".replace("%", "%%")


PYTHON_LAYER_HINT = "list the names with [n for n, _ in model.named_modules()]"
"""What :func:`salience._core.layers.resolve_layer` says of a layer name with no close match: Python's way to list them."""


def check_layer(model: nn.Module, given: dict[str, Any]) -> None:
    """``--layer`` looked up in the model before anything is computed (:func:`salience.methods.options.check_layer`);
    a name with no close match is answered with the model's top-level layers and a dotted name inside one (the
    command's user has no ``model.named_modules()`` to call), instead of the Python hint."""
    try:
        _check_layer(model, given)
    except SalienceError as e:
        top = [n for n, _ in model.named_children()]
        inside = next((n for n, _ in model.named_modules() if "." in n), None)
        hint = "the model has no layers"
        if top:
            hint = f"the model's top-level layers are {', '.join(top[:12])}" + (
                f", ... ({len(top)} in all)" if len(top) > 12 else "")
        if inside:
            hint += f"; a dotted name reaches inside one, e.g. {inside}"
        raise SalienceError(str(e).replace(PYTHON_LAYER_HINT, hint)) from None


COMMAND_WORDS = {integrated.BASELINE_WORDS: "black (zeros), blur or a number (a pixel value, e.g. 0.5)",
                 perturbation.BASELINE_WORDS: "a number (a pixel value, e.g. 0.5) or blur",
                 perturbation.BASELINE_VALUES: "a pixel value or blur",
                 integrated.BLUR_SIGMA_ALONE: ("it is the blur of --baseline blur and applies to it only; give "
                                               "--baseline blur, or leave --blur-sigma out")}
"""The values the methods' refusals of a ``baseline`` name as Python gives them (``None``, a quoted name, a tensor:
no command-line value), as ``--baseline`` takes them (integrated gradients' and occlusion's words), keyed on the
methods' own constants: a change of their wording changes the key with it."""


def check_values(model: nn.Module, x: Tensor, methods: Sequence[str], given: dict[str, Any], targets: int = 1,
                 said: str = "") -> None:
    """:func:`salience.methods.options.check_values` (each method's checks of the given values, before any work;
    ``x`` ``(1, C, H, W)``), its refusal in the command line's words (:data:`COMMAND_WORDS`): ``--baseline white``
    said ``expected None/'black' (zeros), 'blur', a number or a tensor``."""
    try:
        _check_values(model, x, methods, given, targets, said)
    except SalienceError as e:
        raise SalienceError(with_flags(str(e), COMMAND_WORDS)) from None


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line, by keyword, read into their values."""
    given: dict[str, Any] = {}
    for opt in method_options().values():
        text = getattr(args, opt.dest, None)
        if text is not None:
            given[opt.keyword] = text if opt.kind == "bool" else read_value(opt, text)
    return given


def top_targets(top: Optional[int], info: ModelInfo, labels: Optional[Sequence[str]] = None,
                unnamed: Optional[int] = None) -> tuple[int, str]:
    """How many targets ``--top K`` makes the methods explain at once, and the flag that says it
    (:func:`check_values`' ``targets``, ``said``): K, or the model's classes where it names fewer (``--labels``,
    else ``info``'s names; one output is one target). Without ``--top``: one, ``""``. Names unknown: K, or
    ``unnamed`` where given (a file run: it checks the real count again once its prediction pass tells the outputs,
    and refuses K > 1 on a one-output model there)."""
    if top is None:
        return 1, ""
    names = labels if labels is not None else info.class_names
    n = (top if unnamed is None else unnamed) if not names else 1 if len(names) == 1 else min(top, len(names))
    return n, f"--top {top}"


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
    skipped = [k for k in signature_of(fn).parameters if k in NOT_FLAGS]
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
