"""The BatchNorm-folded copy of a model (``fold_batchnorm=True``, :mod:`salience._core.perf`): made with
``torch.fx``, cached for the process per model and weights' state (:func:`~salience._core.fingerprint._fold_key`).

Apart from :mod:`salience._core.perf`, which runs the copy (:class:`~salience._core.perf.Run`), because making
and caching it is a job of its own; it imports :mod:`~salience._core.fingerprint`, never perf.
"""
from __future__ import annotations

import copy
import enum
import functools
import threading
import types
import weakref
from collections import OrderedDict, deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from salience._core.casts import drop_entry
from salience._core.fingerprint import _HOOK_DICTS, _fold_key, _lock, own_hooks
from salience._core.guard import MODULE_OWN, copy_contents, record_state, state_changes
from salience._core.tensors import copy_model
from torch.fx._symbolic_trace import _orig_module_call  # nn.Module.__call__ as it was before fx patched it

__all__ = ["fold_failed", "folded_model", "fx_traced", "kept_for", "settings", "ThisThreadTracer", "FxPlainDict",
           "not_rebuilt"]

# (id(model), dtype) -> (weak reference to the model, what it is kept for, the copy or why none, the attributes its
# forward rewrites: settings' skip); a float32 copy for passes under one autocast only (bf16-mixed's) is kept at
# (id(model), None, that dtype): folded_model; a copy's failure also at its key and _FAILED. An entry goes when its
# model dies (the weak reference's callback).
_folded: "OrderedDict[tuple, tuple[Any, tuple, Any, frozenset]]" = OrderedDict()
_FOLDED_KEEP = 2  # folded copies kept for the process (each holds a copy of its model's weights)
# reasons why a model has no copy kept besides (a string each): they hold nothing of the model, and a model whose
# float32 copy is refused for an autocast block keeps that refusal beside bf16-mixed's own copy (two such models
# explained in turn evicted each other's entries when the reasons counted towards _FOLDED_KEEP: every call folded
# again; session 47)
_REASONS_KEEP = 16
# failures of copies in a pass (fold_failed), kept at their entry's key and _FAILED apart from the reasons: a model
# whose copy failed is not folded again for the same state once its entry went (session 48); they hold nothing of it
_FAILED_KEEP = 64
_FAILED = "failed"
# the modules whose weight and bias every pass under an autocast casts to its dtype (F.conv*d, F.linear: autocast's
# lower-precision list): a low-precision folded copy holds them in that dtype, the rest in float32
_CAST_BY_AUTOCAST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fold(model: nn.Module, dtype: Optional[torch.dtype] = None, passes: Optional[torch.dtype] = None) -> Any:
    """A copy of ``model`` (eval mode, parameters frozen) with each BatchNorm after a convolution
    folded into it, or the reason there is none (a string). ``passes``: the autocast dtype its passes run under, when
    only that (:func:`fx_traced`; ``dtype`` implies it). The attributes its forward writes go to the set of the
    enclosing :func:`_noting_writes` (:func:`fx_traced`; the copy's modules are the model's, in the same order). ``dtype`` (bf16 / fp16: the passes' autocast): the
    convolutions' and linear layers' weights are held in it (the autocast's own cast of the float32 fold, so the
    same values), folded one layer at a time from the model's float32 tensors: no float32 copy of all the weights
    is ever held (on resnet50, 98 MiB, plus the autocast's 49 MiB of casts of it, against 49 MiB now)."""
    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript model cannot be traced by torch.fx"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return "the model has no BatchNorm layer"
    own = (*model.parameters(), *model.buffers()) if dtype is not None else ()
    try:
        clone = copy_model(model, share=own).eval()  # sharing the model's tensors until _own_tensors
        if dtype is None:
            clone.requires_grad_(False)
        # no hook in the copy: own_hooks() found none on the model, but another thread's pass may have hooked it
        # since (salience's hooks for that thread), and a copied hook would fire in this thread's passes of the copy
        for m in clone.modules():
            for name in (*_HOOK_DICTS, "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks_with_kwargs"):
                hooks = m.__dict__.get(name)
                if hooks:
                    hooks.clear()
        traced = fx_traced(clone, dtype, passes, _WRITES.get(), source=model)
        if isinstance(traced, str):
            return traced
        if trace_inputs(traced) != 1:
            return _SEVERAL_INPUTS
        folded = _fuse(traced, dtype)
    except Exception as e:  # noqa: BLE001 - the copy or the fuse failing: run the model as it is
        return f"torch.fx cannot trace it ({_described(e, 200)})"
    if dtype is not None:
        _own_tensors(folded, own, dtype)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if left == len(norms):
        return "no BatchNorm layer follows a convolution directly (one the forward calls once)"
    return folded


_AUTOCAST_DEVICES = ("cpu", "cuda")  # torch.autocast(device_type), torch.cuda.amp.autocast, torch.cpu.amp.autocast


def _autocast_state() -> tuple:
    """The thread's autocast: its blocks' nesting (every ``with torch.autocast(...)`` block counts, ``enabled=False``
    too, in any spelling), and on or off and the dtype per device type (a forward's ``torch.set_autocast_enabled``)."""
    depth = torch.autocast_increment_nesting() - 1  # read, not changed: no other way to read it (torch 2.14)
    torch.autocast_decrement_nesting()
    return (depth, *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES))


class ThisThreadTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer for this thread only: while it traces, it patches ``nn.Module.__call__`` and
    ``nn.Module.__getattr__`` for the whole process, so another thread's model call in that time raised ``NameError``
    (a model not under the traced root) or got proxies back (the same model's parameters). Calls and attribute reads
    of other threads pass through as they are. Every fx trace of salience uses it (:func:`fx_traced`, the folded
    copy's and occlusion's region-limited passes'). ``shadows``: ``{id(module): its shadow}`` (:func:`_shadow`) for a
    trace of a shadow: a module of the model that its forward calls other than through the shadow's attributes (a
    closure, a global, ``functools.partial``) is traced as its shadow (the review of session 48: such a model was
    refused, "module is not installed as a submodule", and its writes landed on the model); and every attribute read,
    write and delete of a module of the model in this thread goes to its shadow for the trace (:func:`_on_shadows`: a
    closure calling ``block.forward(x)`` directly, which no ``__call__`` sees, ran on the model: session 49)."""

    def __init__(self, shadows: Optional[dict] = None) -> None:
        super().__init__()
        self._thread = threading.get_ident()
        self._shadows = shadows or {}

    def trace(self, root: Any, concrete_args: Optional[dict] = None) -> torch.fx.Graph:
        if not self._shadows or "__getattribute__" in nn.Module.__dict__:  # another tool's replacement: no redirect
            return super().trace(root, concrete_args)
        get, put, drop = _on_shadows(self._shadows, self._thread)
        setattr_, delattr_ = nn.Module.__setattr__, nn.Module.__delattr__
        # installed inside the try and taken off in the finally with no call (no point where Python runs a Ctrl-C's
        # handler): a generator's context manager left them in place for good on a Ctrl-C in its __enter__ while
        # the traceback was kept (a REPL's sys.last_traceback; session 49 review)
        try:
            nn.Module.__getattribute__ = get  # type: ignore[method-assign]
            nn.Module.__setattr__ = put  # type: ignore[method-assign]
            nn.Module.__delattr__ = drop  # type: ignore[method-assign]
            graph = super().trace(root, concrete_args)  # the point after the call still inside the try
        finally:
            if nn.Module.__delattr__ is drop:
                nn.Module.__delattr__ = delattr_  # type: ignore[method-assign]
            if nn.Module.__setattr__ is put:
                nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]
            if nn.Module.__getattribute__ is get:
                del nn.Module.__getattribute__
        return graph

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        shadow = self._shadows.get(id(m))
        if shadow is not None:
            m, forward = shadow, functools.partial(_orig_module_call, shadow)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        """fx's lowering of a value into the graph, but a dict of a subclass (what the forward returns, or passes on)
        becomes a node that makes it again (:func:`_rebuilt`): fx's own makes any dict a plain one, so the folded copy
        and occlusion's trace of a model returning a Hugging Face ``ModelOutput`` gave ``{"logits": ...}``, and
        ``output=lambda o: o.logits`` or ``output=0`` raised on it where the model itself worked (session 53)."""
        if isinstance(a, dict) and type(a) is not dict:
            return _rebuilt(self, a)
        return super().create_arg(a)


def _rebuilds(kind: type, keys: Any) -> str:
    """How a dict of ``kind`` with ``keys`` is made again from its items: ``"fields"`` (a dataclass whose init fields
    hold the keys and need no other: a ``ModelOutput``, its keys its fields not None, in their order), ``"items"``
    (an ``OrderedDict`` or a dict subclass with the dict's own constructor), or ``""`` (another constructor)."""
    if is_dataclass(kind):
        init = [f for f in fields(kind) if f.init]
        needed = {f.name for f in init if f.default is MISSING and f.default_factory is MISSING}
        if needed <= set(keys) <= {f.name for f in init} and _fields_give(kind, list(keys)):
            return "fields"
    if kind.__init__ in (dict.__init__, OrderedDict.__init__) and kind.__new__ in (dict.__new__, OrderedDict.__new__):
        return "items"
    return ""


def _fields_give(kind: type, keys: list) -> bool:
    """Whether ``kind`` called with ``keys`` as its fields gives back a dict of those keys, in that order, holding the
    values given (a ``ModelOutput``, whose ``__post_init__`` fills its items in field order): a dataclass whose
    constructor fills no items, or a ``ModelOutput`` a key was set on after it was made (``out.loss = ...``: last, out
    of field order, so ``output=0`` picked another field), is not made again so (review of session 53). Tried once per
    trace on empty tensors; a constructor that refuses them: not made so."""
    probe = {k: torch.empty(0) for k in keys}
    try:
        made = kind(**probe)
    except Exception:  # noqa: BLE001 - a user's constructor's own check: the type is given back as a plain dict
        return False
    got = list(dict.items(made)) if isinstance(made, dict) else []
    return [k for k, _ in got] == keys and all(v is probe[k] for k, v in got)


def _rebuilt(tracer: torch.fx.Tracer, a: dict) -> torch.fx.Node:
    """A node of ``tracer``'s graph that makes the dict ``a`` (of a subclass, proxies in it) again: its type called
    with its fields (a ``ModelOutput``) or its items (:func:`_rebuilds`); where its type cannot be made so,
    :class:`FxPlainDict` of its items, which tells what to do on an attribute or index pick."""
    how = _rebuilds(type(a), a)
    if how == "fields":
        return tracer.create_node("call_function", type(a), (), {k: tracer.create_arg(v) for k, v in a.items()})
    items = [(tracer.create_arg(k), tracer.create_arg(v)) for k, v in a.items()]
    if how == "items":
        return tracer.create_node("call_function", type(a), (items,), {})
    return tracer.create_node("call_function", FxPlainDict, (items, type(a).__qualname__), {})


class _NoKey(KeyError):
    """A key :class:`FxPlainDict` has not: a ``KeyError`` (a pick that falls back on one, ``except KeyError``, still
    does; review of session 53: a ``TypeError``, which it did not catch) whose message is the hint itself."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FxPlainDict(dict):
    """What a torch.fx trace of salience gives back for a dict of a type it cannot make again (its own constructor,
    :func:`_rebuilt`): a plain dict of the same items, which says so where an attribute or a key it has not is asked
    for (an ``output=`` pick by attribute or index: the model's own object had it). ``lost``: that type's name."""

    __slots__ = ("lost",)
    described_as = "dict"  # in :func:`salience._core.autograd.describe_output`'s words (not this class's name)

    def __init__(self, items: Any = (), lost: str = "dict") -> None:
        super().__init__(items)
        self.lost = lost

    def _hint(self) -> str:
        first = next(iter(self), "logits")
        return (f"a torch.fx trace of the model (fold_batchnorm=True's folded copy, occlusion's region-limited passes) "
                f"gives its {self.lost} back as a plain dict (one it cannot make again): pick by key, "
                f"output={first!r}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "lost":  # copy's and pickle's look-ups, a slot not yet set
            raise AttributeError(name)
        raise AttributeError(f"no attribute {name!r}: {self._hint()}")

    def __missing__(self, key: Any) -> Any:
        raise _NoKey(f"no key {key!r}: {self._hint()}")

    def __reduce__(self) -> tuple:
        return (FxPlainDict, (list(self.items()), self.lost))


def not_rebuilt(gm: Any) -> list:
    """The names of the types a trace (``gm``, a ``GraphModule``) gives back as plain dicts (:class:`FxPlainDict`)."""
    return [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is FxPlainDict]


def _on_shadows(shadows: dict, thread: int) -> tuple[Callable[..., Any], Callable[..., None], Callable[..., None]]:
    """``nn.Module``'s ``__getattribute__``, ``__setattr__`` and ``__delattr__`` for a trace
    (:meth:`ThisThreadTracer.trace` installs them for the trace and takes them off): an attribute read, write or delete
    of a module of the model (a key of ``shadows``, ``{id(module): its shadow}``) in ``thread`` acts on its shadow: a
    forward reached other than through ``module(...)`` (a closure or a global calling ``block.forward(x)``, a bound
    ``forward`` taken before) reads the shadow's state and writes there, as the shadow's own forward does; the model is
    not touched (session 49: its count, list and tensor were written, an fx proxy left in it). Replaced for the trace
    as fx replaces ``__call__`` and ``__getattr__``; other threads and other modules go through with an id look-up
    (the trace holds :data:`_TRACING`: one at a time). A class that defines its own ``__getattribute__`` /
    ``__setattr__`` is not redirected (a limit)."""
    get, put, drop = object.__getattribute__, nn.Module.__setattr__, nn.Module.__delattr__
    ident = threading.get_ident

    def getattribute(self: Any, name: str) -> Any:
        shadow = shadows.get(id(self))
        return get(self if shadow is None or ident() != thread else shadow, name)

    def setattr(self: Any, name: str, value: Any) -> None:
        shadow = shadows.get(id(self))
        put(self if shadow is None or ident() != thread else shadow, name, value)

    def delattr(self: Any, name: str) -> None:
        shadow = shadows.get(id(self))
        drop(self if shadow is None or ident() != thread else shadow, name)

    return getattribute, setattr, delattr


class _AutocastSeeingTracer(ThisThreadTracer):
    """``torch.fx``'s tracer, noting in :attr:`changed` an operation recorded inside an autocast block of the forward
    (or under other autocast settings than the trace began with: :func:`_autocast_state`). fx runs a
    ``with torch.autocast(...)`` block (``enabled=False``: a float32 island of a bf16 model; ``torch.cuda.amp.autocast``
    likewise) while tracing and records none of it, so the folded copy would run that block's operations under the
    passes' autocast (session 44: a linear layer in float32 in the model ran in bf16 in the copy under
    ``precision="bf16"``, with no warning). Such a model is not folded; :func:`fx_traced` traces under the passes'
    autocast too (a block entered only under one). With ``passes`` (the autocast settings, on or off and the dtype per
    device type, that the copy's passes run under, when only those: ``precision="bf16"`` / ``"fp16"``'s eager passes),
    an operation inside a block that sets exactly those (``with torch.autocast("cpu", dtype=torch.bfloat16)`` in a bf16
    run) is not noted: under the passes it changes nothing (session 45: every block was, and such a model ran unfolded,
    at the speed of no fold). Grad-mode blocks (``torch.no_grad()``) are not recorded either, but change no value of a
    forward pass, and the copy runs only plain passes (no backward)."""

    def __init__(self, passes: Optional[tuple] = None, shadows: Optional[dict] = None) -> None:
        super().__init__(shadows)
        self._start, self._passes = _autocast_state(), passes
        self.changed = ""

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: Optional[str] = None,
                    type_expr: Optional[Any] = None) -> torch.fx.Node:
        if not self.changed and self._changes(_autocast_state()):
            self.changed = str(target if isinstance(target, str) else getattr(target, "__name__", target))
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def _changes(self, state: tuple) -> bool:
        """Whether an operation recorded in autocast ``state`` runs otherwise in the copy: any other state than the
        trace's start, but inside a block (nested deeper) whose settings are the passes' own."""
        return state != self._start and (self._passes is None or state[0] <= self._start[0]
                                         or state[1:] != self._passes)


def trace_inputs(gm: torch.fx.GraphModule) -> int:
    """How many inputs ``gm`` (an :func:`fx_traced` trace) takes: one, the images, where it is the call salience
    makes; more where fx made a parameter such as ``mask=None`` an input (the folded copy and occlusion's plan
    refuse such a trace: it took the branch salience's calls, ``model(x)``, never take)."""
    return sum(n.op == "placeholder" for n in gm.graph.nodes)


# a trace of more than the images (``forward(x, mask=None)``, ``**kwargs``): fx makes ``mask`` an input, so ``if mask is
# not None`` traced the branch salience's calls, model(x), never take, and the copy ran it (review of session 52:
# fold_batchnorm=True gave every plain pass's scores of that branch, wrong maps); the model runs as it is (a warning)
_SEVERAL_INPUTS = ("its forward takes more inputs than the images (fx traces a parameter such as mask=None as an input "
                   "and a branch on it as taken)")
_IN_BLOCK = "its forward runs "  # the start of the refusal of an operation in an autocast block (fx_traced)
# one fx trace at a time in the process: a trace patches nn.Module.__call__ / __getattr__ for the process and puts
# back what it found, so two at once in two threads (the first ending before the second) left the second's find, the
# first's patch, in place for good: a later thread whose id was the first's got fx proxies back from its model
# (session 46: "the model returned a Proxy", occlusion from four threads)
_TRACING = threading.Lock()


def fx_traced(clone: nn.Module, dtype: Optional[torch.dtype], passes_dtype: Optional[torch.dtype] = None,
              written: Optional[set] = None, source: Optional[nn.Module] = None) -> Any:
    """``clone`` traced by ``torch.fx`` (a ``GraphModule``), or why the trace cannot stand for the model (a string): a
    tracing error (``"torch.fx cannot trace it (...)"``), an operation run in an autocast block of its forward
    (:class:`_AutocastSeeingTracer`). The folded copy's trace and
    occlusion's region-limited passes' (:mod:`salience.methods._occlusion_local`: until session 44's last read its
    own trace ran a float32 island in bf16 under ``precision="bf16"``). Traced twice: as it is, and under the autocast the
    passes run it in (``dtype``, else the device's default: ``"bf16-mixed"`` and compiled passes run a float32 copy
    under one), on the model's device type. A forward that enters its float32 island only when an autocast is on (``if
    torch.is_autocast_enabled(): with torch.autocast(..., enabled=False)``, ``torch.amp.custom_fwd(cast_inputs=...)``)
    showed the first trace nothing (session 44 review: the copy ran the island in bf16); one whose graph differs under
    the autocast reads the autocast, and the copy would run one branch for both. An operation under other autocast
    settings than the trace's, or in an autocast block, refuses the trace (:class:`_AutocastSeeingTracer`); with
    ``dtype`` (a copy for passes under that autocast only: ``precision="bf16"`` / ``"fp16"``'s eager passes) but a
    block that sets exactly the passes' autocast (``with torch.autocast("cpu", dtype=torch.bfloat16)`` in a bf16 run,
    in both traces: a CUDA block on a CPU model sets no CPU autocast), which is traced and folded (session 45); without
    (a float32 copy may run with or without an autocast: ``"fp32"``, ``"bf16-mixed"``, compiled passes), every block
    is refused. ``passes_dtype``: a float32 copy (``dtype`` None) whose passes run under that autocast only
    (``"bf16-mixed"``'s eager passes, whose float32 islands turn the autocast off themselves, inside a block or not:
    session 46), traced as for a copy in that dtype.

    Each trace runs on a shadow of ``clone``'s modules (:func:`_shadow`): what the forward writes (``self.last = attn``,
    a counter, a list appended to, a tensor written in place) lands there, and nothing of ``clone`` changes, not even
    for the trace's moment (session 48: the trace ran on the model itself and put back what it found changed, another
    thread's writes of that moment too). What it wrote is told by :func:`~salience._core.guard.record_state`'s record
    of the shadow; ``written`` (a set) is filled with each one, by ``(module
    index, name)`` in ``clone.modules()``'s order: the trace does not depend on it, so the copy is not kept for it
    (:func:`settings`' ``skip``; session 47: a tensor the forward stored every call refolded every call once the user
    had run the model). ``source``: the model ``clone`` was copied from (:func:`_fold`'s), whose modules (in the same
    order) stand for the shadows too: a closure of its forward holds the model's modules, not the copy's."""
    device = next((t.device.type for t in (*clone.parameters(), *clone.buffers())), "cpu")
    graphs, passes, autocast = [], None, dtype or passes_dtype
    if autocast is not None:  # the autocast settings of the copy's passes, the only ones it runs under
        with torch.autocast(device, dtype=autocast):
            passes = _autocast_state()[1:]
    after: dict = {}
    consts: dict = {}
    for under in (False, True):
        try:
            root, shadows = _shadow(clone)
            # what the forward writes in the shadow, told by version counters (the shadow goes: no copies)
            record = record_state(shadows, containers=True, buffers=False, own_dicts=False, tensor_copies=False)
            if record is None:
                return ("a plain tensor attribute of the model is an inference tensor (no version counter): for the "
                        "folded copy or region-limited passes, make it outside torch.inference_mode() (or .clone() it "
                        "there)")
            with _TRACING, torch.autocast(device, dtype=autocast or torch.get_autocast_dtype(device), enabled=under):
                tracer = _AutocastSeeingTracer(passes, _shadow_map(clone, shadows, source))
                graph = tracer.trace(root)
            made = _constants(root, graph, record[0].attrs)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: run the model as it is
            return f"torch.fx cannot trace it ({_described(e, 200)})"
        _note_writes(record, made, written, after)
        if not under:
            consts = made
        if tracer.changed:
            return (f"{_IN_BLOCK}{tracer.changed!r} in a torch.autocast block, which torch.fx does not record "
                    "(the copy would run it under the passes' autocast)")
        graphs.append(graph)
    if str(graphs[0]) != str(graphs[1]):
        return ("its forward reads the autocast (another graph under torch.autocast), which torch.fx does not record "
                "(the copy would run one branch under any autocast)")
    if written:
        _keep_read(clone, str(graphs[0]), after, written, lambda: torch.autocast(
            device, dtype=autocast or torch.get_autocast_dtype(device), enabled=False), source)
    # the GraphModule takes its modules, parameters and buffers from the model (by the nodes' names, as fx would from
    # the traced root), and fx's constants from the shadow's root: a view of the model's root with them added
    try:
        return torch.fx.GraphModule(_root_view(clone, consts), graphs[0], type(clone).__name__)
    except AttributeError as e:  # the graph reads what the forward made on the shadow: the model does not have it
        return (f"its forward makes what the trace reads ({_described(e, 200)}): a module, parameter or buffer it adds "
                "on a call; run the model once first")


def _constants(root: nn.Module, graph: torch.fx.Graph, was: dict) -> dict:
    """The constants ``torch.fx`` set on ``root`` in tracing ``graph`` (``_tensor_constant0``: a tensor the forward
    made, ``torch.tensor(0.5)``), by name: the attributes of ``root`` that ``graph`` reads and ``was``
    (the root's plain attributes as recorded before the trace) has not. Put back as attributes the forward added, they were gone when the ``GraphModule``
    copied them (b36ecb9: every such model refused by ``fold_batchnorm``, and ``salience.occlusion`` raised
    ``AttributeError``); left there, the second trace's were other names (``_tensor_constant1``) and the model was
    refused for "reading the autocast" (before session 47)."""
    own = root.__dict__
    return {n.target: own[n.target] for n in graph.nodes
            if n.op == "get_attr" and n.target in own and n.target not in was and n.target not in MODULE_OWN}


_MISSING = object()
# the set the attributes a forward writes go to in a fold (_noting_writes): not an argument of _fold, which tests
# replace with a function of (model, dtype)
_WRITES: ContextVar[Optional[set]] = ContextVar("salience_fold_writes", default=None)


@contextmanager
def _noting_writes() -> Iterator[set]:
    """A set that :func:`_fold` in the block fills with the attributes the forward writes (:func:`fx_traced`)."""
    written: set = set()
    token = _WRITES.set(written)
    try:
        yield written
    finally:
        _WRITES.reset(token)


def _shadow(model: nn.Module) -> tuple[nn.Module, list]:
    """A shadow of ``model``'s modules for a trace to run on: ``(its root, its modules in model.modules()'s order)``.
    Each module a new object of its class whose ``__dict__`` is a copy of the module's, with the shadows of its
    submodules, its parameters (the same tensors: fx records them by name and proxies them, a write in place is a
    node), its buffers and plain tensor attributes cloned (fx reads those as they are, and a write in place,
    ``self.seen.fill_(1)``, ran on the model's own tensor), each list, tuple, dict or set copied with the shadows of the
    modules in it (a subclass of one, a log of the user's, copied as it is: session 49), a method bound to a module
    bound to its shadow (one held elsewhere, a closure's, and a direct ``module.forward(x)``: :func:`_on_shadows`). The forward's writes in a trace land in the shadow
    (an fx proxy in ``self.last``, a counter, a list appended to), never in the model: before session 48 the trace ran
    on the model and put back what it found changed, another thread's writes of that moment too (its own forward's
    counter), and that thread's forward could meet the trace's proxies. The shadow holds no state of its own once the
    trace is made: the GraphModule takes the model's modules (:func:`_root_view`)."""
    modules = list(model.modules())
    # object.__new__, not the class's own __new__: a GraphModule's makes a new class without the forward each time
    # (the folded copy, traced by occlusion, raised "missing the required forward"), another's may need arguments
    shadows = {id(m): object.__new__(type(m)) for m in modules}
    clones: dict = {}  # id -> clone: a tensor held twice (a buffer and an attribute) stays one

    def cloned(t: torch.Tensor) -> torch.Tensor:
        c = clones.get(id(t))
        if c is None:
            # outside the caller's inference mode: a clone made in it is an inference tensor, which the shadow's record
            # refuses (no version counter; last read of session 48: under the user's torch.inference_mode() every
            # model with a plain tensor attribute lost its fold and occlusion's trace)
            with torch.inference_mode(False):
                c = clones[id(t)] = t.detach().clone()
        return c

    def shadowed(v: Any) -> Any:
        t = type(v)
        if isinstance(v, nn.Module):
            return shadows.get(id(v), v)
        if isinstance(v, torch.Tensor):
            return v if isinstance(v, nn.Parameter) else cloned(v)
        if t is types.MethodType and isinstance(v.__self__, nn.Module) and id(v.__self__) in shadows:
            return types.MethodType(v.__func__, shadows[id(v.__self__)])
        if t is functools.partial:  # functools.partial(self.block.forward, ...)
            return t(shadowed(v.func), *map(shadowed, v.args), **{k: shadowed(x) for k, x in v.keywords.items()})
        if t in (list, tuple, set):
            return t(map(shadowed, v))
        if t is dict or t is OrderedDict:
            return t((k, shadowed(x)) for k, x in v.items())
        if t is deque:  # a running window, its maxlen kept (session 49 "stdc": the trace appended to the model's)
            return deque(map(shadowed, v), v.maxlen)
        if isinstance(v, (list, dict, set)):  # a subclass (a log of the user's; collections' defaultdict, Counter): a
            # shallow copy, its items the same
            try:
                return copy.copy(v)
            except Exception:  # noqa: BLE001 - one that cannot be copied stays the model's
                return v
        return v

    for m in modules:
        d = {k: shadowed(v) for k, v in m.__dict__.items()}
        d["_parameters"] = dict(m._parameters)
        d["_buffers"] = {k: cloned(b) if b is not None else None for k, b in m._buffers.items()}
        shadows[id(m)].__dict__.update(d)
    return shadows[id(model)], [shadows[id(m)] for m in modules]


def _shadow_map(model: nn.Module, shadows: list, source: Optional[nn.Module] = None) -> dict:
    """``{id(module): its shadow}`` for ``model``'s modules and their shadows (:func:`_shadow`'s, in the same order),
    and for ``source``'s (the model ``model`` was copied from: :func:`fx_traced`) where it has as many."""
    found = dict(zip(map(id, model.modules()), shadows))
    if source is not None and source is not model:
        modules = list(source.modules())
        if len(modules) == len(shadows):
            found.update(zip(map(id, modules), shadows))
    return found


def _root_view(model: nn.Module, consts: dict) -> nn.Module:
    """``model``'s root as a GraphModule takes the nodes' targets from (``_modules``, ``_parameters``, ``_buffers`` the
    model's own dicts), with fx's constants (``consts``) added: a new object of its class, nothing written on the
    model (before session 48 they were set on it for that moment)."""
    view = object.__new__(type(model))  # as :func:`_shadow`'s
    view.__dict__.update(model.__dict__)
    view.__dict__.update(consts)
    return view


def _note_writes(record: list, made: dict, written: Optional[set], after: dict) -> None:
    """The plain attributes a trace wrote in its shadow (``record``, :func:`~salience._core.guard.record_state`'s of the
    shadow's modules, but fx's constants ``made`` on its root) noted in ``written`` (``(module index, name)``) when
    given, and the value left there in ``after`` (a container's contents copied; :data:`_MISSING`: deleted)."""
    for i, k in state_changes(record):
        if i == 0 and k in made:
            continue
        if written is not None:
            written.add((i, k))
        cur = record[i].module.__dict__.get(k, _MISSING)
        after[(i, k)] = c if (c := copy_contents(cur)) is not None else cur


def _has_proxy(v: Any) -> bool:
    """Whether ``v`` (a value a trace left in an attribute) is or holds a ``torch.fx`` proxy: an activation stored."""
    if type(v) in (dict, OrderedDict):
        v = v.values()
    elif type(v) not in (list, tuple, set, deque):
        return isinstance(v, torch.fx.Proxy)
    return any(isinstance(a, torch.fx.Proxy) for a in v)


def _bumped(v: Any) -> Any:
    """Another value of ``v``'s kind (a bool, an int, a float), or :data:`_MISSING`: :func:`_keep_read`'s probe."""
    t = type(v)
    return (not v) if t is bool else v * 2 + 1 if t in (int, float) else _MISSING


class _Unread:
    """:func:`_keep_read`'s stand-in for an activation the forward stored (a ``Proxy`` in the trace): any use of it
    fails (no arithmetic, no attribute, not ``None``), so a trace that reads it does not give the same graph."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<an activation the forward stored>"


_UNREAD = _Unread()


def _unread(v: Any) -> Any:
    """``v`` (an activation stored, :func:`_has_proxy`) with each proxy in it :data:`_UNREAD` (a dict's or list's
    other items kept: ``self.stats["last"] = y`` beside ``self.stats["n"]``)."""
    t = type(v)
    if t in (dict, OrderedDict):
        return t((k, _UNREAD if isinstance(a, torch.fx.Proxy) else a) for k, a in v.items())
    if t in (list, tuple, set):
        return t(_UNREAD if isinstance(a, torch.fx.Proxy) else a for a in v)
    if t is deque:
        return deque((_UNREAD if isinstance(a, torch.fx.Proxy) else a for a in v), v.maxlen)
    return _UNREAD


def _keep_read(clone: nn.Module, graph: str, after: dict, written: set, autocast: Callable[[], Any],
               source: Optional[nn.Module] = None) -> None:
    """Take out of ``written`` the attributes the forward writes that the trace also reads: ``clone`` traced again
    with the values the trace left (a counter one up, ``self.warmed = True``) and with other ones (a bool flipped, a
    number changed): a graph other than ``graph`` (that of the attributes as found) means the trace bakes one in (a
    first-call branch, a lazily set constant ``self.scale``), and the folded copy stays kept for them (review of
    session 47: a copy traced before the user's first call, or before the user set ``scale``, ran that state's
    branch or constant for good). An activation stored (a proxy: ``self.h = y``) is traced as :data:`_UNREAD`, which
    fails any use: a recurrent state the next call reads (``y = y + self.h``, or a branch on ``self.h is None``)
    stays counted (session 48: skipped, the copy and occlusion's kept trace ran the state the trace found for good);
    one only written (``self.last = y``) is still skipped."""
    values = {at: v for at, v in after.items() if at in written and not _has_proxy(v)}
    stored = {at: _unread(v) for at, v in after.items() if at in written and _has_proxy(v)}
    if not values and not stored:
        return
    bumped = {at: b for at, v in values.items() if (b := _bumped(v)) is not _MISSING}
    off = autocast()
    on = torch.autocast(off.device, dtype=off.fast_dtype, enabled=True)
    # each state traced as it is and under the passes' autocast (fx_traced's two traces gave ``graph`` both ways): a
    # forward that reads a written value under an autocast only (``if torch.is_autocast_enabled() and self.calls``)
    # showed the first trace nothing (review of session 48: the bf16 copy ran the first call's branch for good)
    states = ({**values, **stored}, {**values, **bumped, **stored}) if bumped else ({**values, **stored},)
    for state, under in ((s, u) for s in states for u in (off, on)):
        try:  # on a shadow of its own (:func:`_shadow`), which the values are set on
            root, modules = _shadow(clone)
            for (i, k), v in state.items():
                if v is _MISSING:
                    modules[i].__dict__.pop(k, None)
                else:
                    modules[i].__dict__[k] = c if (c := copy_contents(v)) is not None else v
            with _TRACING, under:
                same = str(ThisThreadTracer(_shadow_map(clone, modules, source)).trace(root)) == graph  # the graph only
        except Exception:  # noqa: BLE001 - another state cannot be traced: the trace depends on it
            same = False
        if not same:
            written.difference_update(values)
            written.difference_update(stored)
            return


def _own_tensors(folded: nn.Module, shared: tuple, dtype: torch.dtype) -> None:
    """Give the low-precision folded copy tensors of its own: the float32 weights and biases of its convolutions and
    linear layers in ``dtype`` (the folded ones are new float32 tensors, freed here one by one), every other tensor still
    ``shared`` with the model copied in float32; all frozen. Nothing of the copy is the model's afterwards (its
    channels-last conversion in place, :meth:`salience._core.perf.Run.set_layout`, would have been the model's)."""
    ids = {id(t) for t in shared}
    for m in folded.modules():
        cast = isinstance(m, _CAST_BY_AUTOCAST)
        for name, p in list(m.named_parameters(recurse=False)):
            # float32 only: autocast leaves float64 as it is (a bf16 weight failed a float64 model's pass), and a
            # weight in dtype already is cloned (.to would have shared the model's storage)
            if (cast and p.dtype == torch.float32) or id(p) in ids:
                data = p.detach().to(dtype) if cast and p.dtype == torch.float32 else p.detach().clone()
                setattr(m, name, nn.Parameter(data, requires_grad=False))
        for name, b in list(m.named_buffers(recurse=False)):
            if id(b) in ids:
                setattr(m, name, b.clone())
    folded.requires_grad_(False)


def _fuse(traced: Any, dtype: Optional[torch.dtype]) -> nn.Module:
    """``torch.fx.experimental.optimization.fuse(traced, inplace=True, no_trace=True)`` on the ``GraphModule`` of
    :func:`fx_traced` (never traced again here), with each fused layer's float32 weight and
    bias cast to ``dtype`` (when given) as soon as it is made: the fuse made every fused float32 tensor before
    :func:`_own_tensors` cast them, 94 MiB at once on resnet50, freed one by one between the bf16 copies, holes that
    glibc's heap kept through the call (session 44). The same values: each is the same cast of the same tensor. Unlike
    torch's, a convolution / linear layer the forward calls more than once is not fused (its other calls would run
    the fused weights)."""
    from torch import fx
    from torch.fx.experimental.optimization import matches_module_pattern, replace_node_module
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    patterns = [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d),
                (nn.Linear, nn.BatchNorm1d)]
    modules = dict(traced.named_modules())
    graph = traced.graph
    # a module the forward calls more than once: replacing it by the fused one changes every call of it (a second
    # call with no BatchNorm after it, or another BatchNorm, ran the fused weights: torch's fuse does so; review s44)
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for pattern in patterns:
        for node in list(graph.nodes):
            if not matches_module_pattern(pattern, node, modules) or len(node.args[0].users) > 1:
                continue
            if calls[node.args[0].target] > 1:
                continue
            first, bn = modules[node.args[0].target], modules[node.target]
            if not bn.track_running_stats:
                continue
            fused = (fuse_linear_bn_eval if pattern[0] is nn.Linear else fuse_conv_bn_eval)(first, bn)
            if dtype is not None:
                for name, p in list(fused.named_parameters(recurse=False)):
                    if p.dtype == torch.float32:
                        setattr(fused, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            replace_node_module(node.args[0], modules, fused)
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(traced, graph)


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype})
# the functions a module may hold as a plain attribute and its forward call (a trace records the one it met)
_CALLED = frozenset({types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial})
_HELD = frozenset({OrderedDict, dict, set})  # a module's own dicts (parameters, buffers, hooks) and sets: skipped fast


def _plain(v: Any) -> bool:
    """A plain value or an enum member (:func:`settings`' slow path: a tuple or list that is not all plain values)."""
    return type(v) in _PLAIN or isinstance(v, enum.Enum)


def _alive(v: Any) -> Any:
    """``v``'s identity as a key that no later object takes over: ``id`` and a weak reference (the same reference
    object while ``v`` lives, so two keys of one live object compare by identity; once ``v`` is gone its reference
    equals no other). An ``id`` alone was taken by a new function or tensor made where the old one had died, and the
    folded copy of the old one ran (session 47). A strong reference where ``v`` takes no weak one."""
    try:
        return id(v), weakref.ref(v)
    except TypeError:
        return id(v), v


def _item_key(v: Any) -> Any:
    """An item of a dict, set, list or tuple attribute as :func:`settings` counts it: a plain value or enum member as
    it is, a tensor by its version and identity, a function or module by its identity (:func:`_alive`), a container
    in it or anything else by its class only (as :func:`settings` leaves such attributes out)."""
    t = type(v)
    if t in _PLAIN or (t is tuple and _PLAIN.issuperset(map(type, v))):
        return v
    if isinstance(v, enum.Enum):
        return (t, v)
    if issubclass(t, torch.Tensor):
        return (torch.Tensor, v._version if not v.is_inference() else v.data_ptr(), *_alive(v))
    if t in _CALLED or isinstance(v, nn.Module):
        return (t, *_alive(v))
    return t


def _held_key(v: Any) -> tuple:
    """A dict's, set's, list's or tuple's items as :func:`settings` counts them (:func:`_item_key`: one level)."""
    t = type(v)
    if t is dict or t is OrderedDict:
        # a key by _item_key too: a tensor's == is elementwise (two keys compared, ``bool`` of it raised)
        return (t, *((k if type(k) in _PLAIN else _item_key(k), _item_key(x)) for k, x in tuple(v.items())))
    items = tuple(map(_item_key, tuple(v)))
    if t is set:
        try:
            return (t, frozenset(items))
        except TypeError:  # an unhashable key of an item (its class's __eq__ without __hash__)
            return (t, *items)
    return (t, *items)


def settings(model: nn.Module, skip: frozenset = frozenset()) -> tuple:
    """The plain attributes of ``model``'s modules (booleans, numbers, strings, dtypes, enum members and tuples or
    lists of them: a flag ``self.probs`` the forward reads, a temperature, swin's ``shift_size`` list, a mode
    ``self.mode = Mode.PROBS``), which a ``torch.fx`` trace bakes
    in (the branch taken, the constant) and :func:`~salience._core.fingerprint.structure` does not see: what a trace
    is kept for besides the structure and the weights (session 46: a folded copy traced with a softmax flag off ran
    the logits after the flag was turned on, with ``strip_softmax=False``). A tensor that is no parameter or buffer
    (``self.shift = torch.tensor(0.5)``: a trace's constant, which the folded copy holds a copy of) counts by its
    identity and version, a function (``self.act = torch.tanh``: a trace's call) by its identity (session 46's
    review: either replaced, the copy ran the old one); an identity that a new object cannot take over once the old one
    died (:func:`_alive`; session 47). A dict, set, list or tuple of the user's counts by its items, one level
    (:func:`_held_key`: a setting ``self.cfg["k"]`` changed in place, a recurrent state ``self.state["h"] = y``, a
    list of tensors; review of session 48: left out, the copy of the first one ran for good); a module's own dicts
    (``_parameters``, the hooks) are not read. ``skip``: ``(module index, name)`` in ``model.modules()``'s order of the
    attributes the forward itself writes (:func:`fx_traced`'s ``written``; the trace does not depend on them). Not
    ``training``: a copy is traced in eval mode whatever the
    model's mode (salience's passes run it so; the guard puts it back). About 0.41 ms on resnet50, 0.35 before the
    containers were read (one thread, AMD EPYC core 1; benchmarks/rvoctrace-s48.md)."""
    out: list = []
    add, plain, called, held, own = out.append, _PLAIN, _CALLED, _HELD, MODULE_OWN
    for i, m in enumerate(model.modules()):
        for k, v in m.__dict__.items():
            t = type(v)
            if k == "training" or (skip and (i, k) in skip):
                continue
            if t in held:
                if k not in own:  # a dict or set of the user's: a setting in it (``self.cfg["k"]``), a state
                    add(k)
                    add(_held_key(v))
                continue
            if t in plain or (t is tuple and plain.issuperset(map(type, v))):
                add(k)
                add(v)
            elif t is list and plain.issuperset(map(type, v)):
                add(k)
                add((list, *v))
            elif t in called:
                add(k)
                add((t, *_alive(v)))
            elif issubclass(t, torch.Tensor):
                add(k)
                add((torch.Tensor, v._version if not v.is_inference() else v.data_ptr(), *_alive(v)))
            elif isinstance(v, enum.Enum) or ((t is tuple or t is list) and all(map(_plain, v))):
                add(k)
                add((t, v) if t is not list else (list, *v))  # an enum member's class too (IntEnum == int)
            elif t is tuple or t is list:  # tensors or functions in it (anchors, a state list): each by identity
                add(k)
                add((t, *map(_item_key, v)))
        add(None)  # the module's end
    return tuple(out)


def kept_for(model: nn.Module, sig: Optional[tuple], skip: frozenset = frozenset()) -> Optional[tuple]:
    """What a folded copy is kept for: the weights' state ``sig`` and the plain attributes (``None``: not comparable)
    but ``skip`` (:func:`settings`)."""
    return None if sig is None else (sig, settings(model, skip))


def folded_model(model: nn.Module, key: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
                 passes: Optional[torch.dtype] = None) -> tuple[Optional[nn.Module], str]:
    """The process's BatchNorm-folded copy of ``model`` (made again when the model's structure, see
    :func:`~salience._core.fingerprint.structure`, or its parameters or buffers changed since: ``key``,
    its :func:`~salience._core.fingerprint._fold_key`, when the caller has it, or a plain attribute of a module,
    :func:`settings`, but those its forward writes), or ``(None, why)`` when folding does not apply. ``dtype``: the
    copy for passes under an
    autocast to it (:func:`_fold`), one of its own. ``passes`` (with ``dtype`` None: ``"bf16-mixed"``'s float32
    copy, whose passes run under that autocast only): where the float32 copy the float32 runs share is refused for
    an autocast block of the forward, a float32 copy of its own traced for those passes (a block at their dtype
    changes nothing there: :func:`fx_traced`); kept apart, since in a float32 run the block is the model's math."""
    why = own_hooks(model)
    if why is not None:
        return None, why
    sig = key if key is not None else _fold_key(model)
    made = _kept_fold(model, sig, (id(model), dtype))
    if made is None:
        with _noting_writes() as written:
            made = _fold(model, dtype)
        _remember_fold(model, sig, made, dtype, skip=frozenset(written))
    if isinstance(made, str) and made.startswith(_IN_BLOCK) and passes is not None and dtype is None:
        made = _kept_fold(model, sig, (id(model), None, passes))
        if made is None:
            with _noting_writes() as written:
                made = _fold(model, None, passes)
            _remember_fold(model, sig, made, None, passes, frozenset(written))
    return (made, "") if isinstance(made, nn.Module) else (None, made)


def _kept_fold(model: nn.Module, sig: Optional[tuple], at: tuple) -> Any:
    """The process's copy (or why none) at ``at`` when made for ``model`` as it is now (its weights' state ``sig``
    and :func:`settings`, but the attributes the entry's trace saw the forward write), else None; a copy's failure
    (:func:`fold_failed`) from its own entry where the copy's is gone."""
    if sig is None:
        return None
    for k in (at, at + (_FAILED,)):
        with _lock:
            hit = _folded.get(k)
        if hit is None or hit[0]() is not model or hit[1] != kept_for(model, sig, hit[3]):
            continue
        with _lock:
            if _folded.get(k) is hit:
                _folded.move_to_end(k)
        return hit[2]
    return None


def _remember_fold(model: nn.Module, sig: Optional[tuple], made: Any, dtype: Optional[torch.dtype] = None,
                   passes: Optional[torch.dtype] = None, skip: frozenset = frozenset()) -> None:
    """Cache ``made`` (the folded copy, or why there is none) for ``model`` in the state ``sig`` (its
    :func:`~salience._core.fingerprint._fold_key`; its :func:`settings` but ``skip`` read here) and ``dtype``
    (``passes``: a float32 copy for passes under that autocast only, :func:`folded_model`). At most
    :data:`_FOLDED_KEEP` copies, :data:`_REASONS_KEEP` reasons and :data:`_FAILED_KEEP` failures
    (:func:`fold_failed`'s) are kept (the least recently used go)."""
    at = (id(model), dtype) if passes is None else (id(model), None, passes)
    _keep(model, at, (kept_for(model, sig, skip), made, skip))


def _keep(model: nn.Module, at: tuple, entry: tuple) -> None:
    """``_folded[at]``: ``model``'s weak reference and ``entry`` (what it is kept for, the copy or why none, the skip);
    the least recently used copies, reasons and failures past their counts dropped."""
    with _lock:
        _folded[at] = (weakref.ref(model, functools.partial(drop_entry, _folded, at)), *entry)
        _folded.move_to_end(at)
        # .get: a dead model's entry may go at any allocation (drop_entry, the weak reference's callback, takes no lock)
        entries = [(k, _folded.get(k)) for k in tuple(_folded)]
        copies = [k for k, e in entries if e is not None and isinstance(e[2], nn.Module)]
        failed = [k for k, e in entries if e is not None and k[-1] is _FAILED]
        reasons = [k for k, e in entries if e is not None and not isinstance(e[2], nn.Module) and k[-1] is not _FAILED]
        for k in copies[:-_FOLDED_KEEP] + reasons[:-_REASONS_KEEP] + failed[:-_FAILED_KEEP]:
            _folded.pop(k, None)


def fold_failed(model: nn.Module, copy: nn.Module, why: str) -> None:
    """The folded ``copy`` of ``model`` failed in a pass: ``why`` is kept in its own entry (that of its dtype, or
    bf16-mixed's own float32 copy's), for the state it was made for, and in an entry of failures beside it, which
    the copies and reasons of other models do not push out (session 48: once the entry went, the model was folded
    again, two traces, and its copy failed again). Before (session 47), bf16-mixed's own copy's
    failure was written in the float32 copy's entry, so a float32 run was told of bf16-mixed's failure instead of why
    its copy was refused, and the failing copy was taken again."""
    with _lock:
        found = next(((at, hit) for at in tuple(_folded) if (hit := _folded.get(at)) is not None
                      and hit[2] is copy and hit[0]() is model), None)
        if found is not None:
            _folded[found[0]] = (found[1][0], found[1][1], why, found[1][3])
    if found is not None:
        _keep(model, found[0] + (_FAILED,), (found[1][1], why, found[1][3]))


def _described(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (cut at ``limit`` characters), for warnings."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:limit] if text else ''}"
