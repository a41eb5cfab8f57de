"""Backprop rules: guided backpropagation and deconvnet at every ReLU, whatever its form.

A rule changes what the backward pass does at each rectifier (ReLU) of the model while the
forward pass stays exactly the same:

* **guided** (Springenberg et al. 2015, "Striving for Simplicity"): pass back only the positive
  part of the incoming gradient, and only where the rectifier's forward input was in its open
  range (``x > 0``; for a capped ReLU such as ReLU6 ``0 < x < 6``): ``g_in = max(g_out, 0) * 1[gate]``.
* **deconvnet** (Zeiler & Fergus 2014; keras-vis's ``backprop_modifier='relu'``): pass back only
  the positive part of the incoming gradient, ignoring the forward pass: ``g_in = max(g_out, 0)``.

Why an operation-level mode and not module hooks: real models apply ReLU in many ways:
``nn.ReLU`` modules (also one module reused several times, as in torchvision's ResNet),
``inplace=True``, and functional calls in ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``,
``relu_``, ``F.relu(x, inplace=True)`` as in torchvision's DenseNet), ``nn.ReLU6`` /
``F.relu6`` / ``F.hardtanh(x, 0, 6)``. Hooks on ``nn.ReLU`` modules see only the first kind and
silently give plain gradients for the others. A rule here is a
:class:`torch.overrides.TorchFunctionMode`: while it is active (only around the forward pass,
only in the thread that entered it) every rectifier call is routed through a custom
:class:`torch.autograd.Function` whose forward is the original call (in-place forms still modify
and return their input) and whose backward is the rule's. The model itself is never modified:
no module is swapped, no hook registered, nothing patched.

What counts as a rectifier (the rule applies): ``relu`` / ``relu_`` in all spellings (including
``nn.ReLU``, which calls ``F.relu``), ``relu6``, ``hardtanh`` with ``min_val == 0`` (a capped
ReLU), ``threshold(x, 0, 0)``, ``leaky_relu`` with ``negative_slope == 0``, and ``clamp`` /
``clip`` / ``clamp_min`` with a lower bound of exactly ``0`` (a Python number) and no tensor
bound: ``x.clamp(min=0)`` *is* a ReLU, so it is treated as one (its plain gradient at exactly
``x == 0`` is 1 where ReLU's is 0; the rule uses the strict gate ``x > 0``). Other clamps
(``clamp(min=eps)``, tensor bounds) are left alone.

Activations the rules are not defined for (GELU, SiLU/Swish, Mish, ELU, CELU, SELU, LeakyReLU
with a non-zero slope, PReLU, RReLU, Hardswish, Softplus, ``hardtanh`` with a non-zero lower
bound, other thresholds) are handled by the ``unsupported`` option: ``"error"`` (default) raises
:class:`~salience.SalienceError` at the first one; ``"warn"`` lets the plain gradient through them
and warns once per pass with their count (once per call of a many-pass method: SmoothGrad's
chunks); ``"ignore"`` lets the plain gradient through silently.
Gates such as ``sigmoid``, ``tanh`` and ``hardsigmoid`` (squeeze-and-excitation blocks, LSTMs)
are not rectifiers and always pass the plain gradient. A forward pass in which the rule met no
rectifier at all (a model without ReLUs) gives the plain gradient, vanilla's map: the methods
(:meth:`BackpropRule.check_rectified`) refuse it with ``"error"``, warn with ``"warn"`` (as above: once
per call of a many-pass method), return it with ``"ignore"``. So does every path: a pass that stops at a
target's inner layer (``targets.activation``, keras-vis's class and filter saliency) with no rectifier
before it, and a gradient w.r.t. a layer's output (keras-vis's ``wrt_tensor``) with none after it.

Limits: a TorchScript model (``torch.jit.ScriptModule``, also as a submodule) runs its compiled
graph without Python dispatch, so no mode can see its ReLUs: :func:`check_model` refuses it.
ReLUs written as arithmetic (``x * (x > 0)``, ``torch.where(x > 0, x, 0)``, ``torch.maximum``)
are not recognised and get the plain gradient.
"""
from __future__ import annotations

import collections
import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from salience._core import derived as _derived
from salience._core.autograd import this_thread
from salience._core.errors import SalienceError, user_stacklevel
from salience._core.guard import check_python_model

__all__ = ["BackpropRule", "ActivationCount", "GuidedRule", "DeconvnetRule", "guided", "deconvnet", "check_model", "UNSUPPORTED",
           "ACTIVATIONS", "Activation", "activation_kind"]

UNSUPPORTED = ("error", "warn", "ignore")
# what the refusal of a pass without rectifiers says to do (salience.compat.keras_vis says it in its own words)
NO_RECTIFIER_ADVICE = "use salience.vanilla, or pass unsupported='ignore' to take it anyway"
# what the refusal of an activation the rule is not defined for says to do (keras_vis: in its own words too)
UNSUPPORTED_ADVICE = ("pass unsupported='warn' (or 'ignore') to let the plain gradient through such activations, "
                      "or use another method (e.g. vanilla)")

# How a call (or a module) is sorted: ``(kind, upper cap of a rectifier or None, the name a message says)``, kind
# one of "rectifier" (the rule takes it over), "unsupported" (the rule is not defined for it) or "other".
Sorted = tuple[str, Optional[float], str]


@dataclass(frozen=True)
class Activation:
    """What the rules know of one activation, the one table of it (:data:`ACTIVATIONS`), read by both the call
    sorter of the rules' mode (:func:`_classify`) and the module sorter (:func:`activation_kind`).

    ``sort(name, bound)``: the kind of a call with its arguments bound by name (the module sorter binds a module's
    attributes of the same names); ``params``: the call's parameters after the input, in positional order, with
    their defaults (none: the kind is the same whatever the arguments); ``modules``: the ``torch.nn`` types whose
    forward makes this call; ``calls``: torch's callables that spell it (a call is sorted by its canonical name,
    :func:`_base_name`, so every spelling is; ``tests/test_s40_struct_activations.py`` checks each)."""

    sort: Callable[[str, dict], Sorted]
    params: tuple[tuple[str, Any], ...] = ()
    modules: tuple[type, ...] = ()
    calls: tuple[Callable, ...] = ()


def _rectifier(cap: Optional[float] = None) -> Callable[[str, dict], Sorted]:
    return lambda name, b: ("rectifier", cap, name)


def _unsupported(name: str, b: dict) -> Sorted:
    return "unsupported", None, name


def _hardtanh(name: str, b: dict) -> Sorted:
    """A capped ReLU (``relu6`` is ``hardtanh(0, 6)``) with a lower bound of exactly 0."""
    if _is_num(b["min_val"], 0.0) and _is_num(b["max_val"]):
        return "rectifier", float(b["max_val"]), name
    return "unsupported", None, f"hardtanh(min_val={b['min_val']})"


def _threshold(name: str, b: dict) -> Sorted:
    if _is_num(b["threshold"], 0.0) and _is_num(b["value"], 0.0):
        return "rectifier", None, name
    return "unsupported", None, f"threshold({b['threshold']}, {b['value']})"


def _leaky_relu(name: str, b: dict) -> Sorted:
    return ("rectifier", None, name) if _is_num(b["negative_slope"], 0.0) else ("unsupported", None, name)


def _clamp(name: str, b: dict) -> Sorted:
    """A ReLU only with a lower bound of exactly 0 and no tensor bounds; any other clamp is no activation."""
    lo, hi = b.get("min"), b.get("max")
    if _is_num(lo, 0.0) and (hi is None or _is_num(hi)):
        return "rectifier", None if hi is None else float(hi), name
    return "other", None, name


_INPLACE = (("inplace", False),)
_BOUNDS = (("min", None), ("max", None))

# Every activation the rules know, by canonical call name: the rectifiers the rules take over (some by their
# arguments) and the ReLU-like activations they are not defined for. Sigmoid, tanh, hardsigmoid (gates) and the
# rest are no activation here: their calls pass on untouched.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(_rectifier(), _INPLACE, (nn.ReLU,),
                       (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)),
    "relu6": Activation(_rectifier(6.0), _INPLACE, (), (F.relu6,)),
    "hardtanh": Activation(_hardtanh, (("min_val", -1.0), ("max_val", 1.0), ("inplace", False)),
                           (nn.Hardtanh, nn.ReLU6), (F.hardtanh, F.hardtanh_)),
    "threshold": Activation(_threshold, (("threshold", None), ("value", None), ("inplace", False)), (nn.Threshold,),
                            (F.threshold, F.threshold_, torch.threshold, torch.threshold_)),
    "leaky_relu": Activation(_leaky_relu, (("negative_slope", 0.01), ("inplace", False)), (nn.LeakyReLU,),
                             (F.leaky_relu, F.leaky_relu_)),
    "clamp": Activation(_clamp, _BOUNDS, (), (torch.clamp, torch.clamp_, Tensor.clamp, Tensor.clamp_)),
    "clip": Activation(_clamp, _BOUNDS, (), (torch.clip, torch.clip_, Tensor.clip, Tensor.clip_)),
    "clamp_min": Activation(_clamp, (("min", None),), (), (torch.clamp_min, Tensor.clamp_min, Tensor.clamp_min_)),
    "gelu": Activation(_unsupported, (), (nn.GELU,), (F.gelu,)),
    "silu": Activation(_unsupported, (), (nn.SiLU,), (F.silu,)),
    "mish": Activation(_unsupported, (), (nn.Mish,), (F.mish,)),
    "elu": Activation(_unsupported, (), (nn.ELU,), (F.elu, F.elu_)),
    "celu": Activation(_unsupported, (), (nn.CELU,), (F.celu, F.celu_)),
    "selu": Activation(_unsupported, (), (nn.SELU,), (F.selu, F.selu_, torch.selu)),
    "prelu": Activation(_unsupported, (), (nn.PReLU,), (F.prelu,)),
    "rrelu": Activation(_unsupported, (), (nn.RReLU,), (F.rrelu, F.rrelu_)),
    "hardswish": Activation(_unsupported, (), (nn.Hardswish,), (F.hardswish,)),
    "softplus": Activation(_unsupported, (), (nn.Softplus,), (F.softplus,)),
}
# the same table by module type (a subclass is found through its bases, the nearest first)
_BY_MODULE: dict[type, str] = {t: name for name, a in ACTIVATIONS.items() for t in a.modules}


# Torch callables seen to be neither rectifiers nor unsupported activations, whatever their arguments
# (decided by name only): the mode passes them straight on. Filled as calls are met.
_PLAIN: set = set()


def _base_name(func: Callable) -> tuple[str, bool]:
    """``(canonical name, in-place?)`` of a torch callable: ``relu_`` -> ``("relu", True)``,
    ``F._threshold`` -> ``("threshold", False)``, ``aten.relu.default`` -> ``("relu", False)``."""
    name = getattr(func, "__name__", "") or ""
    if not isinstance(name, str) or name.startswith("__"):
        return "", False
    name = name.split(".")[0]  # aten overloads: "relu_.default"
    inplace = name.endswith("_")
    return name.strip("_"), inplace


def _bind(params: tuple[tuple[str, Any], ...], args: tuple, kwargs: dict) -> Optional[dict]:
    """The call's arguments by name (the input as ``"input"``), or None if they don't fit ``params``."""
    if not args:
        return None
    bound: dict[str, Any] = {"input": args[0]}
    rest = args[1:]
    if len(rest) > len(params):
        return None
    for i, (pname, default) in enumerate(params):
        bound[pname] = rest[i] if i < len(rest) else default
    for k, v in kwargs.items():
        if k in ("input", "self"):
            bound["input"] = v
        elif any(k == p for p, _ in params):
            bound[k] = v
        else:  # e.g. out=: leave the call alone
            return None
    return bound


def _is_num(v: Any, value: Optional[float] = None) -> bool:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    return value is None or float(v) == value


def _classify(func: Callable, args: tuple, kwargs: dict) -> tuple[str, Optional[tuple[Tensor, bool, Optional[float]]], str]:
    """Sort one torch call by :data:`ACTIVATIONS`: ``("rectifier", (x, inplace, upper cap), name)``,
    ``("unsupported", None, name)`` or ``("other", None, name)``."""
    name, inplace = _base_name(func)
    entry = ACTIVATIONS.get(name)
    if entry is None:
        return "other", None, name
    if not entry.params:  # the same kind whatever the arguments
        kind, _, said = entry.sort(name, {})
        return kind, None, said
    b = _bind(entry.params, args, kwargs)
    if b is None or not isinstance(b["input"], Tensor):
        return "other", None, name
    kind, cap, said = entry.sort(name, b)
    if kind != "rectifier":
        return kind, None, said
    return "rectifier", (b["input"], inplace or bool(b.get("inplace", False)), cap), said


def activation_kind(module: nn.Module) -> Optional[str]:
    """``"rectifier"`` (the rules act at its call), ``"unsupported"`` (they refuse it) or ``None`` (no activation) for a
    module, by :data:`ACTIVATIONS` as its call would be sorted: its type (or its nearest base there) and the
    arguments the rules read, its attributes of the call's parameter names (a capped ReLU's bounds, a leaky
    ReLU's slope). A module of another type is ``None`` whatever its forward calls. A rectifier only with its table
    type's own forward: one with a forward of its own (a subclass's ``forward``, an instance's) may call anything, and
    is ``None``; a subclass of an activation the rules are not defined for stays one (timm's ``PReLU``)."""
    base = next((t for t in type(module).__mro__ if t in _BY_MODULE), None)
    if base is None:
        return None
    name = _BY_MODULE[base]
    entry = ACTIVATIONS[name]
    kind = entry.sort(name, {p: getattr(module, p, default) for p, default in entry.params})[0]
    own_forward = "forward" not in vars(module) and type(module).forward is base.forward
    return kind if kind == "unsupported" or kind == "rectifier" and own_forward else None


class _Rectify(torch.autograd.Function):
    """Forward: the original rectifier call, unchanged (in-place stays in-place).
    Backward: ``max(g, 0)``, masked by the forward gate unless the rule is deconvnet.

    Used for every rectifier except guided backprop at a plain ``relu`` (see :func:`_guided_relu`).
    Cost (``benchmarks/profile_rules.py``): the rule keeps no mask of its own. Guided backprop saves
    the tensor autograd would save for the plain rectifier anyway (the output of ``relu`` and of
    in-place calls, the input of the others), so the rule adds no memory and no forward work; its
    backward is the plain rectifier's own kernel (``threshold_backward``, or ``hardtanh_backward``
    for a cap) on the incoming gradient, then ``clamp_(min=0)`` in place on that fresh tensor:
    one extra pass over the gradient per rectifier. The gate from the output equals the gate from
    the input: ``relu(x) > 0`` iff ``x > 0``, and ``clamp(x, 0, c) < c`` iff ``x < c``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, call: Callable[[], Tensor], inplace: bool, cap: Optional[float],  # type: ignore[override]
                use_gate: bool, save_output: bool) -> Tensor:
        out = call()
        if inplace:
            if out is not x:
                raise SalienceError("an in-place rectifier did not return its input; cannot apply the rule")
            ctx.mark_dirty(x)
        ctx.cap, ctx.use_gate = cap, use_gate
        if use_gate:
            ctx.save_for_backward(out if (inplace or save_output) else x)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if not ctx.use_gate:
            return g.clamp(min=0), None, None, None, None, None
        (a,) = ctx.saved_tensors  # the forward's input or output: the same gate either way
        if ctx.cap is None:
            gi = torch.ops.aten.threshold_backward(g, a, 0)  # g where a > 0, else 0
        else:
            gi = torch.ops.aten.hardtanh_backward(g, a, 0.0, ctx.cap)  # g where 0 < a < cap, else 0
        return gi.clamp_(min=0), None, None, None, None, None


def _clamp_grad(g: Tensor) -> Tensor:
    return g.clamp(min=0)


def _clamp_grad_input(grad_inputs: tuple, grad_outputs: tuple) -> tuple:
    # The node's fresh output (threshold_backward's result): clamped in place, no new tensor.
    return tuple(g.clamp_(min=0) if g is not None else None for g in grad_inputs)


def _guided_relu(out: Tensor) -> Tensor:
    """Guided backprop at a plain ``relu`` (the common case), without a custom Function: the
    plain ``relu``'s own backward (``ReluBackward0``: ``threshold_backward``, gate ``x > 0``) runs,
    and a hook on that node clamps the gradient it produces, in place (a fresh tensor of the node's
    own). Gating and clamping commute, so this is ``max(g, 0) * 1[x > 0]`` exactly, as
    :class:`_Rectify` computes it, with one short Python call per rectifier in the backward pass
    instead of a Function's forward and backward (``benchmarks/profile-rules.md``). Where the
    output's node is not ``ReluBackward0`` (never seen), a tensor hook clamps the incoming gradient
    instead (same values; a new tensor per rectifier). Not used for an in-place call on a view (the
    gradient reaches the base through ``CopySlices``) nor for clamps (their plain gate is
    ``x >= 0``): those take :class:`_Rectify`.
    """
    node = out.grad_fn
    if node is not None and type(node).__name__ == "ReluBackward0":
        node.register_hook(_clamp_grad_input)
    else:
        out.register_hook(_clamp_grad)
    return out


def _sort_call(func: Callable, args: tuple, kwargs: dict) -> tuple[str, Optional[tuple[Tensor, bool, Optional[float]]], str]:
    """:func:`_classify`, remembering in :data:`_PLAIN` a callable that is no activation whatever its arguments."""
    kind, info, name = _classify(func, args, kwargs)
    if kind == "other" and name not in ACTIVATIONS:
        try:
            _PLAIN.add(func)
        except TypeError:  # an unhashable callable: classified again next time
            pass
    return kind, info, name


def _taken_over(info: Optional[tuple[Tensor, bool, Optional[float]]]) -> bool:
    """Whether a rule takes a rectifier call over: its input is on the pass's graph (a float that requires grad)."""
    assert info is not None
    x = info[0]
    return torch.is_grad_enabled() and x.requires_grad and x.is_floating_point()


class ActivationCount(TorchFunctionMode):
    """Around a forward pass with gradients, changing nothing: what a backprop rule with its defaults would meet
    there, ``rectified`` (the rectifier calls it would take over) and ``unsupported_seen`` (a
    :class:`collections.Counter` of the activations it refuses). :attr:`rules_apply`: whether guided backprop with
    its defaults takes such a pass (:func:`salience.methods.default_methods` reads it off the default-layer search's
    pass, with no pass of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.rectified = 0
        self.unsupported_seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func not in _PLAIN:
            kind, info, name = _sort_call(func, tuple(args), kwargs)
            if kind == "rectifier" and _taken_over(info):
                self.rectified += 1
            elif kind == "unsupported":
                self.unsupported_seen[name] += 1
        return func(*args, **kwargs)

    @property
    def rules_apply(self) -> bool:
        """A rectifier met and no activation the rules refuse: the default call neither refuses it nor gives
        vanilla's map."""
        return self.rectified > 0 and not self.unsupported_seen


class BackpropRule(TorchFunctionMode):
    """A backprop rule as a context manager: enter it around a model's forward pass only.

    ``rectified``: how many rectifier calls the rule took over; ``unsupported_seen``: a
    :class:`collections.Counter` of unsupported activations met (with ``"warn"`` / ``"ignore"``).
    Use a fresh instance per pass; it is thread-local like every TorchFunctionMode.
    """

    name = "rule"
    use_gate = True

    def __init__(self, *, unsupported: str = "error"):
        super().__init__()
        if unsupported not in UNSUPPORTED:
            raise SalienceError(f"unsupported must be one of {', '.join(map(repr, UNSUPPORTED))}; got {unsupported!r}")
        self.unsupported = unsupported
        self.rectified = 0
        self.unsupported_seen: collections.Counter = collections.Counter()
        self.ran_through = False  # whether a pass under the rule ended: at the output, or stopped at a target's layer
        self.stopped = False  # whether it stopped at a target's inner layer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _PLAIN:  # most calls (conv2d, batch_norm, add_, dim, ...): no rule, no bookkeeping
            return func(*args, **kwargs)
        kind, info, name = _sort_call(func, tuple(args), kwargs)
        if kind == "rectifier":
            assert info is not None
            x, inplace, cap = info
            if _taken_over(info):
                self.rectified += 1
                if self.use_gate and name == "relu" and not (inplace and x._is_view()):
                    return _guided_relu(func(*args, **kwargs))
                return _Rectify.apply(x, lambda: func(*args, **kwargs), inplace, cap, self.use_gate,
                                      name == "relu")
        elif kind == "unsupported":
            if self.unsupported == "error":
                raise SalienceError(f"{self.name} is defined for ReLU-type activations only, but the model calls "
                                    f"{name}; {UNSUPPORTED_ADVICE}")
            self.unsupported_seen[name] += 1
        return func(*args, **kwargs)

    def __exit__(self, exc_type, exc, tb):  # type: ignore[override]
        result = super().__exit__(exc_type, exc, tb)
        if self.unsupported == "warn" and self.unsupported_seen and (exc_type is None or exc_type.__name__ == "StopForward") \
                and _first_in_call(("rules:unsupported", self.name)):
            what = ", ".join(f"{n} x{c}" for n, c in sorted(self.unsupported_seen.items()))
            warnings.warn(
                f"{self.name}: the rule is not defined for {sum(self.unsupported_seen.values())} activation "
                f"call(s) in this model ({what}); the plain gradient passed through them",
                stacklevel=user_stacklevel(),
            )
        # a pass that ended: at the model's output, or stopped at a target's inner layer (the rest never ran)
        self.stopped = exc_type is not None and exc_type.__name__ == "StopForward"
        self.ran_through = exc_type is None or self.stopped
        return result

    @contextmanager
    def marking(self, module: nn.Module) -> Iterator[list[int]]:
        """For the block: a list that gets how many rectifiers the rule had taken over when ``module`` first
        returned (Guided Grad-CAM: whether ReLUs ran after its layer; a gradient w.r.t. the module's output,
        keras-vis's ``wrt_tensor``: :meth:`check_rectified`'s ``since``)."""
        mark: list[int] = []

        def hook(m: nn.Module, inputs: Any, output: Any) -> None:
            if not mark:
                mark.append(self.rectified)

        handle = module.register_forward_hook(this_thread(hook))
        try:
            yield mark
        finally:
            handle.remove()

    def check_rectified(self, since: int = 0, part: Optional[str] = None) -> None:
        """After the pass: a forward pass without a rectifier the rule took over (a model without ReLUs, or with
        ReLUs written as arithmetic) gives the plain gradient, vanilla's map. Refused (``"error"``) or said
        (``"warn"``; not again after the warning of unsupported activations); the methods returned it silently as
        the rule's. A pass stopped at a target's inner layer (``StopForward``) is checked alike: the rule met no
        ReLU before that layer, and the layers after it never ran, so the map is vanilla's all the same.
        ``since``: the rectifiers taken over before the part of the pass the gradient goes through (a gradient
        w.r.t. a layer's output: those before the layer act on nothing), ``part`` says that part."""
        if not self.ran_through or self.rectified > since or self.unsupported == "ignore" or self.unsupported_seen:
            return
        where = part or ("in the forward pass before the target's layer, where the pass stops" if self.stopped
                         else "in the model's forward pass")
        what = (f"{self.name} found no ReLU {where} (the rule acts at relu, relu6, hardtanh(0, c), clamp(min=0) "
                "and threshold(0, 0) calls; x * (x > 0), torch.where and torch.maximum are not seen), so its map "
                "is the plain gradient, vanilla's")
        if self.unsupported == "error":
            raise SalienceError(f"{what}; {NO_RECTIFIER_ADVICE}")
        if _first_in_call(("rules:no rectifier", self.name)):
            warnings.warn(what, stacklevel=user_stacklevel())


def _first_in_call(key: tuple) -> bool:
    """Whether a rule's warning of kind ``key`` is the first of the running many-pass call (SmoothGrad's chunks
    of noisy copies each run a ruled pass: it came once per pass); outside one, every pass warns."""
    scope = _derived.current()
    return scope is None or scope.first(key)


class GuidedRule(BackpropRule):
    """Guided backpropagation: ``g_in = max(g_out, 0) * 1[forward gate open]`` at every rectifier."""

    name = "guided backprop"
    use_gate = True


class DeconvnetRule(BackpropRule):
    """Deconvnet ("rectified" backprop): ``g_in = max(g_out, 0)`` at every rectifier, forward ignored."""

    name = "deconvnet"
    use_gate = False


def guided(*, unsupported: str = "error") -> GuidedRule:
    """A fresh guided-backprop rule (context manager) for one forward pass."""
    return GuidedRule(unsupported=unsupported)


def deconvnet(*, unsupported: str = "error") -> DeconvnetRule:
    """A fresh deconvnet rule (context manager) for one forward pass."""
    return DeconvnetRule(unsupported=unsupported)


def check_model(model: nn.Module, method: str = "this method") -> None:
    """Refuse models whose rectifiers a rule cannot see (TorchScript), with a clear message."""
    check_python_model(model, method, "whose compiled graph runs its ReLUs out of salience's reach (the result "
                                      "would silently be plain gradients)")
