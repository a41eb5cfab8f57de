"""Occlusion's region-limited passes: the model's leading *local* layers run on a crop around each window.

An occluded image differs from the clean one only inside its window, so the output of the model's leading local
layers (convolutions, eval-mode batch norm, elementwise activations, max / average pooling, constant padding, the
sum or channel concatenation of two local branches; modules or their functions, ``F.conv2d`` / ``F.max_pool2d`` /
``F.avg_pool2d`` / ``F.pad``, so a convolution that computes its weight first, timm's ``StdConv2d`` and
``ScaledStdConv2d``, too: the nodes computing a weight from parameters alone are constants; since session 51 the
per-position ops of ConvNeXt's blocks: ``permute``, ``LayerNorm`` / ``F.layer_norm`` over channels only, ``Linear`` /
``F.linear`` on channels, elementwise sums and products with constants that vary along channels only, torchvision's
``stochastic_depth`` in eval mode; and ``padding="same"`` convolutions) differs from the clean activation only inside
the window grown by their receptive field. :func:`plan` traces the model with ``torch.fx``, follows each node's
receptive field per image axis (output index ``i`` reads input rows ``[i * S - A, i * S + E]``) and the role of each
of its axes (images, channels, rows, columns: a norm over the last axis is local after ``permute(0, 2, 3, 1)``, not
before), and picks the *cut*: an NCHW local node that every later node depends on alone, where the FLOPs saved are
largest. Each pass then runs the prefix (input to cut) on a crop of
the occluded image only (the affected region plus the margin its receptive field reads; crops start on multiples of
``S``, so the crop's grid is the image's, and a crop clamped at a border ends on it, so its padding is the image's),
pastes the exact part into a copy of the clean activation and runs the rest of the model from the cut (the
suffix). The maps are those of full passes up to the convolutions' own rounding (another input size may sum in
another order: about 1e-6 of a score in float32).

A forward that fx cannot trace, or whose trace has several inputs, is traced as the call ``model(x)`` with the
images' channel count known (:func:`_trace`, session 52: Hugging Face's ``ConvNextForImageClassification``, whose
``**kwargs`` and channel check stopped fx). Every trace gives the output back as the model gives it (session 53: a
``ModelOutput`` rebuilt by :func:`salience._core.folding.fx_traced`'s tracer, not fx's plain dict, so
``output=lambda o: o.logits`` and ``output=0`` fit it).

Where the model cannot be traced, has hooks, no local prefix that saves work, or fails the check on the clean
images (the split model must give the model's output, and a crop's exact part the clean activation),
:func:`plan` says why (``Plan.why``) and occlusion runs full passes (a debug log line says so).
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Node

from salience._core.folding import fx_traced, not_rebuilt, settings, trace_inputs
from salience._core.perf import ModelCache

log = logging.getLogger("salience.occlusion")

__all__ = ["Plan", "plan", "moved", "spans", "crops", "paste", "rows_into", "log"]  # occlusion (methods.perturbation) uses them all

# elementwise modules and functions: a node of them is as local as its input, with the same receptive field
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                        nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Identity, nn.PReLU, nn.Hardtanh, nn.Softplus)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
                          torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.elu, F.mish, F.hardtanh, torch.relu_}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clamp", "clamp_"}
_SUMS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, operator.sub, torch.sub,
         operator.isub, operator.truediv, operator.itruediv, torch.div}
_SUM_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
# per-position functions (session 51: ConvNeXt's channels-last blocks), their parameters after the input and defaults:
# local where the axes they read are channels only (:meth:`_Field.per_position`)
_PER_POSITION_FUNCTIONS: dict = {
    F.layer_norm: (("normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    F.linear: (("weight", "bias"), {"bias": None})}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)
# functional window ops, each with its parameters' names in order after the input (positional or keyword) and their
# defaults: a node of one is local where its input is, every other argument a constant (a weight, a bias: parameters
# or nodes computed from them alone) and its padding a zero one (session 50: timm's StdConv2d is an nn.Conv2d whose
# forward standardises the weight and calls F.conv2d, which fx traces into)
_CONV_ARGS = (("weight", "bias", "stride", "padding", "dilation", "groups"), {"bias": None, "stride": 1, "padding": 0,
                                                                            "dilation": 1, "groups": 1})
_MAX_ARGS = (("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
             {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
_AVG_ARGS = (("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
             {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
_WINDOW_FUNCTIONS: dict = {F.conv2d: _CONV_ARGS, torch.conv2d: _CONV_ARGS, F.max_pool2d: _MAX_ARGS,
                           torch.max_pool2d: _MAX_ARGS, F.avg_pool2d: _AVG_ARGS}
_PAD_ARGS = (("pad", "mode", "value"), {"mode": "constant", "value": None})
# what a node computing a constant (from parameters alone) must not be: drawn at random (rand*, *dropout*, these), or
# written in place (a name ending in "_")
_RANDOM = {"normal", "bernoulli", "multinomial", "poisson", "native_dropout"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                      operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.setitem}


# the roles of a local node's axes: "n" the images, "c" channels (a value per position), "h" / "w" the image's rows
# and columns; the input's, and every cut's, are NCHW (session 51: ConvNeXt's blocks permute to NHWC and back)
_NCHW = ("n", "c", "h", "w")


@dataclass(frozen=True)
class _Field:
    """A local node's receptive field per image axis: output row ``i`` reads input rows ``[i*S - A, i*S + E]``;
    ``dims``: the role of each of its axes (``_NCHW``, or permuted: ``("n", "h", "w", "c")`` after
    ``x.permute(0, 2, 3, 1)``)."""
    s: tuple[int, int]
    a: tuple[int, int]
    e: tuple[int, int]
    dims: tuple[str, ...] = _NCHW

    def then(self, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], d: tuple[int, int]) -> "_Field":
        """This field followed by a window op of kernel ``k``, stride ``s``, padding ``p`` (before the first row),
        dilation ``d`` (an NCHW field)."""
        return _Field(tuple(self.s[i] * s[i] for i in range(2)),  # type: ignore[arg-type]
                      tuple(p[i] * self.s[i] + self.a[i] for i in range(2)),  # type: ignore[arg-type]
                      tuple((d[i] * (k[i] - 1) - p[i]) * self.s[i] + self.e[i] for i in range(2)))  # type: ignore

    def union(self, other: "_Field") -> Optional["_Field"]:
        if self.s != other.s or self.dims != other.dims:
            return None
        return _Field(self.s, tuple(max(a, b) for a, b in zip(self.a, other.a)),  # type: ignore[arg-type]
                      tuple(max(a, b) for a, b in zip(self.e, other.e)), self.dims)  # type: ignore[arg-type]

    def per_position(self, k: int) -> bool:
        """Whether the last ``k`` axes are all channels (a ``LayerNorm`` over them, a ``Linear`` on the last: one
        position's values only)."""
        return 0 < k <= len(self.dims) and all(r == "c" for r in self.dims[len(self.dims) - k:])


def _two(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))  # (k,): both axes
    return (int(v), int(v))


def _module_field(m: nn.Module, f: _Field) -> Optional[_Field]:
    """The field after module ``m`` (its input's field ``f``), or ``None`` where ``m`` is not local."""
    if isinstance(m, _ELEMENTWISE_MODULES) and not isinstance(m, nn.PReLU):
        return f  # in any layout (a PReLU's weights are per axis 1: NCHW only)
    if isinstance(m, nn.LayerNorm):  # over the last axes: local where they are channels (NHWC), not over H or W
        return f if f.per_position(len(m.normalized_shape)) else None
    if isinstance(m, nn.Linear):
        return f if f.per_position(1) else None
    if isinstance(m, nn.Dropout) and not m.training:
        return f
    if f.dims != _NCHW:
        return None  # a window op, batch norm or PReLU on a permuted tensor: its axes are not the image's
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return None
        pad = _same(m.kernel_size, m.dilation) if m.padding == "same" else (0, 0) if m.padding == "valid" else (
            _two(m.padding))
        return f.then(_two(m.kernel_size), _two(m.stride), pad, _two(m.dilation))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        if m.ceil_mode:
            return None
        k = _two(m.kernel_size)
        stride = _two(m.stride if m.stride is not None else m.kernel_size)
        d = _two(getattr(m, "dilation", 1))
        return f.then(k, stride, _two(m.padding), d)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return f if (not m.training and m.running_mean is not None) else None
    if isinstance(m, (nn.ConstantPad2d, nn.ZeroPad2d)):
        return _pad_field(f, m.padding)
    if isinstance(m, nn.PReLU):
        return f
    return None


def _same(kernel: Any, dilation: Any) -> tuple[int, int]:
    """``padding="same"``'s padding before the first row and column (stride 1): ``d * (k - 1) // 2``, the rest after
    (as PyTorch pads an even kernel: the field's ``E`` is ``d * (k - 1)`` less it)."""
    k, d = _two(kernel), _two(dilation)
    return (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)


def _pad_field(f: _Field, pad: Any) -> Optional[_Field]:
    """The field after a constant padding ``pad`` (``F.pad``'s ``(left, right, top, bottom)``, or an int): output row
    ``i`` reads input row ``i - top`` (the value padded is read nowhere: a crop's own padding falls in its margin, and
    a crop clamped at a border is padded as the image)."""
    if isinstance(pad, int):
        pad = (pad,) * 4
    if not isinstance(pad, (tuple, list)) or len(pad) != 4 or not all(isinstance(v, int) and v >= 0 for v in pad):
        return None  # a padding of more or fewer axes, or a negative one (a crop)
    return f.then((1, 1), (1, 1), (pad[2], pad[0]), (1, 1))


def _bound(n: Any, names: tuple, defaults: dict) -> Optional[dict]:
    """``n``'s arguments after the input by name (positional or keyword, ``defaults`` for those not given), or
    ``None`` where it has others."""
    if len(n.args) - 1 > len(names) or set(n.kwargs) - set(names) or not n.args:
        return None
    got = dict(defaults)
    got.update(zip(names, n.args[1:]))
    got.update(n.kwargs)
    return got if set(got) >= set(names) else None


def _ints(v: Any) -> bool:
    """Whether ``v`` is an int or a pair of ints (not a node: a stride computed from the input's shape)."""
    return isinstance(v, int) or (isinstance(v, (tuple, list)) and len(v) in (1, 2)
                                  and all(isinstance(i, int) for i in v))


def _function_field(n: Any, f: _Field, consts: set, kernel: Callable[[Any], Optional[tuple]]
                    ) -> Optional[_Field]:
    """The field after a functional window op ``n`` (``F.conv2d``, ``F.max_pool2d``, ``F.avg_pool2d``, a constant
    ``F.pad``; its input's field ``f``), or ``None`` where ``n`` is none of them with constant arguments and a zero
    padding (a weight computed from the input, ``ceil_mode``, ``return_indices``; ``padding="same"`` is local since
    session 51: its split is the kernel's, :func:`_same`). ``kernel``: a constant weight node's kernel size
    ``(kh, kw)``."""
    if n.target is F.pad:
        got = _bound(n, *_PAD_ARGS)
        if got is None or got["mode"] != "constant" or not isinstance(got["value"], (int, float, type(None))):
            return None
        return _pad_field(f, got["pad"])
    got = _bound(n, *_WINDOW_FUNCTIONS[n.target])
    if got is None:
        return None
    if "weight" in got:  # a convolution: weight and bias constants (parameters, or computed from them alone)
        if not all(v is None or (hasattr(v, "op") and v in consts) for v in (got["weight"], got["bias"])) or (
                got["weight"] is None):
            return None
        if got["padding"] == "valid":
            got["padding"] = 0
        k = kernel(got["weight"])
        if k is None:
            return None
        if got["padding"] == "same" and _ints(got["dilation"]) and _two(got["stride"] if _ints(got["stride"]) else 0
                                                                       ) == (1, 1):
            got["padding"] = _same(k, got["dilation"])  # stride 1 (PyTorch's condition): the kernel's own split
        if not all(_ints(got[k]) for k in ("stride", "padding", "dilation")) or not isinstance(got["groups"], int):
            return None  # a node (a stride read from the input's shape)
        return f.then(_two(k), _two(got["stride"]), _two(got["padding"]), _two(got["dilation"]))
    if got.get("ceil_mode") or got.get("return_indices"):
        return None
    stride = got["stride"] if got["stride"] not in (None, [], ()) else got["kernel_size"]
    if not all(_ints(v) for v in (got["kernel_size"], stride, got["padding"], got.get("dilation", 1))):
        return None
    if isinstance(got.get("divisor_override"), Node):
        return None
    return f.then(_two(got["kernel_size"]), _two(stride), _two(got["padding"]), _two(got.get("dilation", 1)))


@dataclass
class Plan:
    """The split of a model for region-limited passes, or why there is none (``why``, ``prefix`` ``None``).

    ``prefix``: input ``(n, C, h, w)`` -> the cut's activation; ``suffix``: the cut's activation -> the model's
    output (a final softmax dropped where ``strip_softmax`` asked it); ``field``: the cut's receptive field;
    ``crop``: the crops' ``(h, w)``; ``saved``: the fraction of a pass's FLOPs saved (estimate)."""
    prefix: Optional[nn.Module] = None
    suffix: Optional[nn.Module] = None
    field: Optional[_Field] = None
    cut_shape: tuple[int, ...] = ()
    crop: tuple[int, int] = (0, 0)
    saved: float = 0.0
    cut: str = ""
    why: str = ""
    clean: Optional[Tensor] = None  # the prefix's float32 output on the clean images (the check's)
    dtype: Optional[torch.dtype] = None  # the passes' autocast, under which the prefix's constants are made


def _trace(model: nn.Module, dtype: Optional[torch.dtype] = None, written: Optional[set] = None,
           channels: Optional[int] = None) -> Any:
    """``model`` traced as the folded copy is (:func:`salience._core.folding.fx_traced`, under the passes' autocast
    ``dtype`` too: a forward's own autocast block, which fx does not record, is refused), or why not (a string).
    ``written``: filled with the plain attributes the forward writes that the trace does not read (``fx_traced``'s).
    Nothing of the user's model changes: ``fx_traced`` traces a shadow of its modules (a submodule, parameter or buffer
    its forward makes, ``self.extra = nn.Conv2d(...)`` on the first call, is made there). Session 48's ``_held`` /
    ``_put_back_held`` around the trace, from before the shadow, are gone: they copied every module's three dicts per
    trace, and put back, so dropped, a module another thread added to the model meanwhile (review of session 48).

    Where the forward itself cannot be traced, or its trace has several inputs (``forward(x, mask=None)``: fx makes
    ``mask`` a proxy, so ``if mask is not None`` took the branch salience's calls never take), the call salience makes,
    ``model(x)`` with ``x`` of ``channels`` channels, is traced instead (:class:`_Called`; session 52: Hugging Face's
    ``ConvNextForImageClassification``, whose ``**kwargs`` fx made a proxy that the forward unpacks, and whose
    embeddings compare ``x.shape[1]`` with the configured channels). Either trace gives the output back as the model
    gives it: ``fx_traced``'s tracer rebuilds a dict of a subclass, a ``ModelOutput`` (session 53: fx made it a plain
    dict, and ``output=lambda o: o.logits`` or ``output=0`` failed on the trace: full passes), so a forward of the images
    alone is traced as it is, its nodes' names the folded copy's (:func:`moved`)."""
    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript model cannot be traced by torch.fx"
    from salience._core.fingerprint import own_hooks
    hooked = own_hooks(model)
    if hooked is not None:
        return f"the model has hooks ({hooked})"
    seen: set = set()
    gm = fx_traced(model, dtype, written=seen)  # a tracing failure: its reason, full passes
    if isinstance(gm, str) and not gm.startswith("torch.fx cannot trace it") or (
            not isinstance(gm, str) and trace_inputs(gm) == 1):
        if written is not None:
            written.update(seen)
        return gm
    through: set = set()
    called = fx_traced(_Called(model, channels), dtype, written=through)
    if isinstance(called, str) and not isinstance(gm, str):
        # several inputs, and the call untraceable: that told (last read of session 52: the debug line said "no local
        # prefix ... none", the trace of several inputs having no fields)
        called = ("its forward takes more inputs than the images (fx makes a parameter such as mask=None an input), "
                  f"and the call model(x) cannot be traced either: {called}")
    elif isinstance(called, str):  # the forward's own reason told (the call's is the same or follows from it)
        called = gm
    else:  # by (module index, name) in the model's modules(): the wrapper is index 0
        seen = {(i - 1, k) for i, k in through if i > 0}
    if written is not None:
        written.update(seen)
    return called


class _Called(nn.Module):
    """``model(x)`` as a module of one input, for :func:`_trace`: the forward's other parameters take their defaults
    (``labels=None``, no ``**kwargs``: fx would make proxies of them), and ``x.shape[1]`` / ``x.size(1)`` is the
    images' channel count ``channels`` (:class:`_KnownChannels`), the same on the crops; a check of it traces."""

    def __init__(self, model: nn.Module, channels: Optional[int]) -> None:
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, x: Tensor) -> Any:
        if self.channels is not None and isinstance(x, torch.fx.Proxy):
            x = _KnownChannels(x.node, x.tracer, self.channels)
        return self.model(x)


def _not_rebuilt(gm: Any) -> str:
    """Why the trace's output may not fit the output rule (``""``: nothing to say): the types the trace gave back as
    plain dicts (:func:`salience._core.folding.not_rebuilt`: their constructors are not the dict's)."""
    kinds = not_rebuilt(gm)
    if not kinds:
        return ""
    return (f"; the trace gives the model's {', '.join(kinds)} back as a plain dict (one it cannot make again: "
            "output= a key reads it)")


class _KnownChannels(torch.fx.Proxy):
    """The traced input ``(N, C, H, W)`` whose channel count ``C`` is a number (``x.shape[1]``, ``x.shape[-3]``,
    ``x.size(1)``); its other sizes stay proxies, so a crop's own sizes are read where the model reads them."""

    def __init__(self, node: Node, tracer: Any, channels: int) -> None:
        super().__init__(node, tracer)
        self._channels = channels

    def __getattr__(self, k: str) -> Any:
        if k == "shape":
            return _Sizes(super().__getattr__("shape"), self._channels)
        return super().__getattr__(k)

    def size(self, dim: Optional[int] = None) -> Any:
        if dim in (1, -3):
            return self._channels
        sizes = super().__getattr__("size")
        return sizes() if dim is None else sizes(dim)


class _Sizes:
    """``x.shape`` of :class:`_KnownChannels`: index 1 (or -3) the channel count, any other index (or a slice) the
    proxy's; unpacked as four sizes; compared and anything else as the proxy's."""

    def __init__(self, shape: Any, channels: int) -> None:
        self._shape = shape
        self._channels = channels

    def __getitem__(self, i: Any) -> Any:
        return self._channels if isinstance(i, int) and i in (1, -3) else self._shape[i]

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Any:
        return iter([self[i] for i in range(4)])

    def __eq__(self, other: object) -> Any:  # the proxy's: a branch on it cannot be traced (not a silent False)
        return self._shape == other

    def __ne__(self, other: object) -> Any:
        return self._shape != other

    __hash__ = None  # type: ignore[assignment]

    def __getattr__(self, k: str) -> Any:  # ``x.shape.numel()``: the proxy's
        return getattr(self._shape, k)


# Session 46: each call traced the model twice (fx_traced), uncached. A trace shares the model's modules; its nodes'
# meta (the shapes, written by the FLOPs' propagation) is written before it is kept and only read after, so threads
# share it. perf.clear_cache empties it.
_TRACES = ModelCache(4)  # an entry goes when its model dies: a trace holds the model's modules, so their weights


def _analysed(model: nn.Module, x: Tensor, dtype: Optional[torch.dtype]) -> Any:
    """``(gm, fields, cuts, cost)`` of ``model`` (its trace, :func:`_trace`, each local node's field, the cuts and the
    FLOPs per node on one image of ``x``'s shape), or why none (a string): kept for the model's structure, weights'
    state and plain attributes (:func:`salience._core.folding.settings`, as the folded copy is) but those its forward
    writes and the trace does not read (``self.last = y``, a call counter: session 48; before, a user's call between
    two of salience's traced the model again, two traces and the shapes' propagation), the passes' ``dtype`` and the
    image's shape, dtype and device; hooks are looked at every call."""
    from salience._core.compiled import weights_key
    from salience._core.fingerprint import own_hooks

    if isinstance(model, torch.jit.ScriptModule):
        return _analyse(model, x, dtype)
    hooked = own_hooks(model)
    if hooked is not None:
        return f"the model has hooks ({hooked})"
    key, sig = (dtype, tuple(x.shape[1:]), x.dtype, x.device), weights_key(model)
    hit = _TRACES.get(model, key, sig) if sig is not None else None
    # hit: (the skip, the settings but it, the trace): good while the settings but the skip are the same
    if hit is not None and settings(model, hit[0]) == hit[1]:
        return hit[2]
    written: set = set()
    made = _analyse(model, x, dtype, written)
    if sig is not None:
        skip = frozenset(written)
        _TRACES.put(model, key, sig, (skip, settings(model, skip), made))
    return made


def _analyse(model: nn.Module, x: Tensor, dtype: Optional[torch.dtype], written: Optional[set] = None) -> Any:
    """:func:`_analysed`, made (``written``: :func:`_trace`'s)."""
    gm = _trace(model, dtype, written, int(x.shape[1]) if x.dim() == 4 else None)
    if isinstance(gm, str):
        return gm
    consts = _constants(gm)
    fields = _fields(gm, consts)
    cuts = _cuts(gm, fields, consts)
    if not cuts:
        return ("the model has no local prefix (its first layer is not a convolution, pooling or elementwise: "
                f"{_first_not_local(gm, fields, consts)})")
    try:
        with torch.no_grad():
            cost = _flops(gm, x[:1].clone())  # copies: an in-place first layer must not write the user's x
    except Exception as e:  # noqa: BLE001
        return f"its shapes could not be propagated ({type(e).__name__})"
    return gm, fields, cuts, cost


def _constants(gm: Any) -> set:
    """The nodes of ``gm`` that compute a value from its parameters and buffers alone (no path from the input): its
    ``get_attr`` nodes and the functions and methods of them only (timm's ``StdConv2d`` standardising its weight,
    ``w / w.norm()``), not one drawn at random or written in place (a call of a module: not either)."""
    consts: set = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            consts.add(n)
        elif n.op in ("call_function", "call_method") and n.all_input_nodes and all(
                a in consts for a in n.all_input_nodes):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            random = name.startswith("rand") or "dropout" in name or name in _RANDOM
            if not (name.endswith("_") or random or n.kwargs.get("inplace") or n.is_impure()):
                consts.add(n)
    # a value the forward writes in place (``w = self.w * 1; w.add_(d)``, ``w[0].mul_(2)``, ``inplace=True``,
    # ``out=``) is none: held as a tensor, the write ran on it once per chunk (w + k * d after k chunks), and a view's
    # write changes its base. Not constant: what any such write reads from the parameters, nor what is computed from it
    written = [a for n in gm.graph.nodes if _writes(n)
               for a in (*n.args[:1], n.kwargs.get("out")) if isinstance(a, Node) and a in consts]
    if written:
        tainted, stack = set(), list(written)
        while stack:  # the written values' constant inputs, down to the parameters
            a = stack.pop()
            if a not in tainted:
                tainted.add(a)
                stack.extend(b for b in a.all_input_nodes if b in consts)
        # the same attribute read again is another get_attr node (``self.s.copy_(x.mean())``, then ``self.w *
        # self.s``: ``s_1``): every read of a written attribute is tainted (session 50 last read: held from the call's
        # start, the clean images' ``s`` scored every occluded pass, 0.22 off)
        targets = {a.target for a in tainted if a.op == "get_attr"}
        tainted |= {n for n in consts if n.op == "get_attr" and n.target in targets}
        for n in gm.graph.nodes:  # and all computed from them (graph order: inputs first)
            if n in consts and any(a in tainted for a in n.all_input_nodes):
                tainted.add(n)
        consts -= {n for n in tainted if n.op != "get_attr"}  # a parameter is read as it is when read
    return consts


def _writes(n: Any) -> bool:
    """Whether node ``n`` writes its first argument (or its ``out=``) in place: a method or function named ``*_``
    (``add_``, ``torch.relu_``), ``inplace=True``, an ``operator.i*`` on a tensor, ``operator.setitem``."""
    if n.op not in ("call_function", "call_method"):
        return False
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return (name.endswith("_") or bool(n.kwargs.get("inplace")) or n.kwargs.get("out") is not None
            or n.target in _INPLACE_OPERATORS)


def _evaluated(gm: Any, nodes: list) -> list:
    """The values of constant ``nodes`` of ``gm`` (:func:`_constants`), computed once: a graph of them and what they
    read, on ``gm``'s modules."""
    from torch.fx import Graph, GraphModule
    g, env = Graph(), {}

    def copy(a: Any) -> Any:
        if a not in env:
            for b in a.all_input_nodes:
                copy(b)
            env[a] = g.node_copy(a, lambda b: env[b])
        return env[a]

    g.output(tuple(copy(n) for n in nodes))
    with torch.no_grad():
        return list(GraphModule(gm, g).forward())


def _first_not_local(gm: Any, fields: dict, consts: set) -> str:
    """The first node reading a local node (the input) that is not local, told (why full passes: ``F.pad`` in
    ``"reflect"`` mode, a convolution whose weight is computed from the input)."""
    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or n in consts or n in fields or not any(
                a in fields for a in n.all_input_nodes):
            continue  # local, constant, or past the first that is not (or reads none of the image: a random draw)
        if n.op == "call_module":
            m = mods[n.target]
            extra = f", padding_mode={m.padding_mode!r}" if isinstance(m, nn.Conv2d) else ""
            return f"{type(m).__name__} {n.target!r}{extra}"
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if n.op == "call_function" and (n.target in _WINDOW_FUNCTIONS or n.target is F.pad):
            said = {k: v for k, v in n.kwargs.items() if not isinstance(v, Node)}
            weight = "its weight not a constant (from the input, or drawn at random), or " if "conv" in name else ""
            return f"{name} ({weight}arguments {said})"
        if n.op == "call_function" and n.target in _PER_POSITION_FUNCTIONS:
            return f"{name} (over an axis of the image, not channels only, or its weight not a constant)"
        return f"{name}"
    return "none"


def _fields(gm: Any, consts: Optional[set] = None) -> dict:
    """Each local node's field (the placeholder's is the identity); nodes missing are not local. ``consts``: the
    constant nodes (:func:`_constants`, made where ``None``)."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    fields: dict = {}
    if len(placeholders) != 1:
        return fields
    consts = _constants(gm) if consts is None else consts
    fields[placeholders[0]] = _Field((1, 1), (0, 0), (0, 0))
    mods = dict(gm.named_modules())
    sizes: dict = {}

    def shape(w: Any) -> Optional[tuple]:  # a constant's shape: the shapes' propagation's, else its value's
        if w not in sizes:
            meta = w.meta.get("tensor_meta")
            got = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            if got is None:
                try:
                    value = _evaluated(gm, [w])[0]
                    got = tuple(value.shape) if isinstance(value, Tensor) else None
                except Exception:  # noqa: BLE001 - a constant that cannot be computed: not local
                    got = None
            sizes[w] = None if got is None else tuple(int(v) for v in got)
        return sizes[w]

    for n in nodes:
        if n.op == "placeholder" or n.op == "output" or n in consts:
            continue
        data = [a for a in n.all_input_nodes if a not in consts]
        if not data or any(a not in fields for a in data):
            continue  # reads a non-local node (or nothing of the image): not local
        f = _node_field(n, data, fields, mods, consts, shape)
        if f is not None:
            fields[n] = f
    return fields


def _node_field(n: Any, data: list, fields: dict, mods: dict, consts: set, shape: Callable[[Any], Optional[tuple]]
                ) -> Optional[_Field]:
    """The field of node ``n`` reading the local nodes ``data`` (their ``fields``), or ``None`` where it is not
    local. ``shape``: a constant node's shape."""
    one = len(data) == 1 and bool(n.args) and n.args[0] is data[0]  # reads one local node, as its first argument
    f = fields[data[0]]
    if n.op == "call_module":
        return _module_field(mods[n.target], f) if len(data) == 1 and len(n.args) == 1 and not n.kwargs else None
    if n.op == "call_function" and (n.target in _WINDOW_FUNCTIONS or n.target is F.pad):
        if not one or f.dims != _NCHW:
            return None
        return _function_field(n, f, consts, lambda w: _kernel(shape(w)))
    if (n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS) or (
            n.op == "call_method" and n.target in _ELEMENTWISE_METHODS):
        return f if one else None
    if (n.op == "call_function" and n.target in _SUMS) or (n.op == "call_method" and n.target in _SUM_METHODS):
        return _sum_field(n, data, fields, consts, shape)
    if n.op == "call_function" and n.target is torch.cat:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        seq = n.args[0] if n.args else n.kwargs.get("tensors")
        if not (isinstance(dim, int) and -len(f.dims) <= dim < len(f.dims) and f.dims[dim] == "c"
                and isinstance(seq, (list, tuple)) and all(a in fields for a in seq)):
            return None
        return _joined(fields, seq)
    if one and ((n.op == "call_method" and n.target == "permute") or (
            n.op == "call_function" and n.target is torch.permute)):
        return _permuted(n, f)
    if one and n.op == "call_function" and n.target in _PER_POSITION_FUNCTIONS:
        return _per_position_field(n, f, consts)
    if one and n.op == "call_function" and _is_stochastic_depth(n.target):
        got = _bound(n, ("p", "mode", "training"), {"training": True})
        return f if got is not None and (got["training"] is False or got["p"] == 0) else None
    return None


def _joined(fields: dict, nodes: Sequence[Any]) -> Optional[_Field]:
    """The union (:meth:`_Field.union`) of the fields of ``nodes`` (a sum's operands, a concatenation's tensors), or
    ``None`` where two differ in stride or axes."""
    f: Optional[_Field] = fields[nodes[0]]
    for a in nodes[1:]:
        f = f.union(fields[a]) if f is not None else None
    return f


def _kernel(shape: Optional[tuple]) -> Optional[tuple]:
    """A 4-D weight's ``(kh, kw)``, or ``None``."""
    return shape[2:] if shape is not None and len(shape) == 4 else None


def _sum_field(n: Any, data: list, fields: dict, consts: set, shape: Callable[[Any], Optional[tuple]]
               ) -> Optional[_Field]:
    """The field of an elementwise sum, difference, product or quotient of one or two local nodes, numbers and
    constants whose shape varies along channels only (``x * gamma``, ``gamma`` of shape ``(C, 1, 1)`` on NCHW or
    ``(C,)`` on NHWC: ConvNeXt's layer scale); ``None`` where a constant varies along the images or their rows or
    columns (another value at another position: a crop would read the wrong one), or ``n`` writes in place into a
    constant."""
    if len(data) > 2 or n.kwargs.get("out") is not None or (_writes(n) and not (n.args and n.args[0] in data)):
        return None
    f = _joined(fields, data)
    if f is None:
        return None
    for o in list(n.args) + list(n.kwargs.values()):
        if o in data or isinstance(o, (int, float)):
            continue
        size = shape(o) if isinstance(o, Node) and o in consts else None
        if size is None or len(size) > len(f.dims) or any(
                v != 1 and r != "c" for r, v in zip(f.dims[len(f.dims) - len(size):], size)):
            return None
    return f


def _permuted(n: Any, f: _Field) -> Optional[_Field]:
    """The field after ``x.permute(...)`` / ``torch.permute(x, dims)``: the axes' roles reordered, the field kept."""
    order = list(n.args[1:]) + ([n.kwargs["dims"]] if "dims" in n.kwargs else [])
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = list(order[0])
    rank = len(f.dims)
    if len(order) != rank or not all(isinstance(i, int) for i in order) or sorted(i % rank for i in order) != list(
            range(rank)) or len(n.kwargs) > ("dims" in n.kwargs):
        return None
    return replace(f, dims=tuple(f.dims[i % rank] for i in order))


def _per_position_field(n: Any, f: _Field, consts: set) -> Optional[_Field]:
    """The field after ``F.layer_norm`` over the last axes or ``F.linear``, local where those axes are channels
    (NHWC) and their weights constants; ``None`` over an axis of the image (a norm over W mixes a row)."""
    names, defaults = _PER_POSITION_FUNCTIONS[n.target]
    got = _bound(n, names, defaults)
    if got is None or not all(got[k] is None or (isinstance(got[k], Node) and got[k] in consts)
                              for k in ("weight", "bias")):
        return None
    if "normalized_shape" not in got:  # F.linear: over the last axis
        return f if got["weight"] is not None and f.per_position(1) else None
    shape = got["normalized_shape"]
    shape = [shape] if isinstance(shape, int) else shape
    if not isinstance(shape, (list, tuple)) or not all(isinstance(v, int) or (isinstance(v, Node) and v in consts)
                                                       for v in shape) or not isinstance(got["eps"], (int, float)):
        return None  # a size read from the input (a size read from a weight is a constant: only its count matters)
    return f if f.per_position(len(shape)) else None


def _is_stochastic_depth(target: Any) -> bool:
    """Whether ``target`` is torchvision's ``stochastic_depth`` (fx-wrapped: a node of its own, the identity when
    ``training`` is ``False``, as in eval mode, or ``p`` is 0)."""
    return getattr(target, "__name__", "") == "stochastic_depth" and getattr(target, "__module__", "") == (
        "torchvision.ops.stochastic_depth")


def _cuts(gm: Any, fields: dict, consts: Optional[set] = None) -> list:
    """The local nodes that every later node depends on alone (in graph order; the constant nodes, ``consts``, are
    made again where used: :func:`_subgraphs`)."""
    consts = _constants(gm) if consts is None else consts
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    out = []
    live: set = set()
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if n not in consts:
            live.add(n)
        live = {m for m in live if last_use.get(m, -1) > i}
        if n in fields and n.op != "placeholder" and live == {n} and fields[n].dims == _NCHW:
            out.append(n)
    return out


def _flops(gm: Any, x: Tensor) -> dict:
    """Multiply-adds of each node on ``x`` (convolutions and linear layers; others their output's size)."""
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(x)
    consts = _constants(gm)
    mods = dict(gm.named_modules())
    cost = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
        numel = math.prod(shape) if shape else 0
        c = float(numel)
        if n.op == "call_module":
            m = mods[n.target]
            if isinstance(m, nn.Conv2d):
                c = numel * (m.in_channels // m.groups) * math.prod(_two(m.kernel_size))
            elif isinstance(m, nn.Linear):
                c = numel * m.in_features
        elif n.op == "call_function" and n.target in (F.conv2d, torch.conv2d, F.linear):
            weight = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")  # positional or keyword
            w = getattr(weight, "meta", {}).get("tensor_meta")  # (out, in / groups, kh, kw) or (out, in)
            if w is not None and hasattr(w, "shape") and len(w.shape) in (2, 4):
                c = numel * math.prod(int(v) for v in w.shape[1:])
        elif n in consts:
            c = 0.0  # a weight computed once (the prefix's) or as the model does it (the suffix's)
        cost[n] = c
    return cost


def _crop_len(side: int, win: int, stride: int, n: int, s: int, a: int, e: int, cut_side: int) -> int:
    """The crop's length along one axis: the longest span any window needs, aligned (see :func:`spans`)."""
    need = 1
    for j in range(n):
        lo, hi = _affected(j * stride, win, side, s, a, e, cut_side)
        if lo > hi:
            continue
        r0, r1 = max(0, lo * s - a), min(side, hi * s + e + 1)
        need = max(need, r1 - (r0 // s) * s)
    length = side - ((side - need) // s) * s  # side - length a multiple of s: a crop clamped at the end starts aligned
    return min(side, length)


def _affected(y: int, win: int, side: int, s: int, a: int, e: int, cut_side: int) -> tuple[int, int]:
    """The cut's rows ``[lo, hi]`` whose field meets the window's rows ``[y, min(y + win, side))`` (``lo > hi``:
    none, a window past the image)."""
    end = min(y + win, side)
    if y >= end:
        return 1, 0
    return max(0, -((e - y) // s)), min(cut_side - 1, (end - 1 + a) // s)


def spans(p: Plan, corners: Tensor, window: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Per window ``(n, 2, 3)``: per axis the crop's start in pixels and the affected cut rows ``[lo, hi + 1)``."""
    f = p.field
    assert f is not None
    rows = []
    for y, x in corners.tolist():
        one = []
        for i, c in enumerate((y, x)):
            s, a, e, side, cl = f.s[i], f.a[i], f.e[i], size[i], p.crop[i]
            lo, hi = _affected(c, window[i], side, s, a, e, p.cut_shape[2 + i])
            if lo > hi:
                one.append((0, 0, 0))
                continue
            r0 = max(0, lo * s - a)
            one.append((min((r0 // s) * s, side - cl), lo, hi + 1))
        rows.append(one)
    return torch.tensor(rows, dtype=torch.long)


def _subgraphs(gm: Any, cut: Any, strip_softmax: bool, dtype: Optional[torch.dtype] = None
               ) -> tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)`` GraphModules sharing ``gm``'s modules: input -> ``cut``, ``cut`` -> output. A constant
    node (:func:`_constants`: a weight computed from parameters alone) is made in each where used; the prefix's,
    which runs once per chunk of crops, computed here once (under the passes' autocast ``dtype``, ``None``: none) and
    read as a tensor (:func:`_once`); the suffix's computed as the model does, each pass (held once, every
    standardised weight of a BiT would be a second copy of its convolutions' weights: 89 MiB on resnetv2_50x1_bit)."""
    from torch.fx import Graph, GraphModule
    nodes = list(gm.graph.nodes)
    at = nodes.index(cut)
    consts = _constants(gm)

    def copier(graph: Any, env: dict) -> Callable[[Any], Any]:
        def lookup(a: Any) -> Any:  # a constant node made where first read, after what it reads
            if a not in env and a in consts:
                env[a] = graph.node_copy(a, lookup)
            return env[a]
        return lookup

    pre, post = Graph(), Graph()
    env_pre: dict = {}
    lookup_pre = copier(pre, env_pre)
    for n in nodes[:at + 1]:
        if n not in consts:
            env_pre[n] = pre.node_copy(n, lookup_pre)
    pre.output(env_pre[cut])
    env: dict = {cut: post.placeholder("cut")}
    lookup = copier(post, env)
    for n in nodes[at + 1:]:
        if n in consts:
            continue
        if n.op == "output":
            result = n.args[0]
            if strip_softmax and hasattr(result, "op") and _is_softmax(gm, result):
                result = result.args[0] if result.args else result.kwargs["input"]
            post.output(torch.fx.node.map_arg(result, lookup))
            break
        env[n] = post.node_copy(n, lookup)
    return _once(GraphModule(gm, pre), dtype), GraphModule(gm, post)


def _once(g: Any, dtype: Optional[torch.dtype]) -> Any:
    """``g`` (a prefix) with each computed constant that its other nodes read (:func:`_constants`: timm's
    standardised weights) computed now, under the autocast ``dtype`` (the passes'; ``None``: none) on ``g``'s
    device, and read as a tensor attribute: the same values, made once a call instead of once a chunk."""
    consts = _constants(g)
    roots = [n for n in g.graph.nodes if n in consts and n.op != "get_attr"
             and any(u not in consts for u in n.users)]
    if not roots:
        return g
    device = next((t.device.type for t in (*g.parameters(), *g.buffers())), "cpu")
    try:
        with torch.autocast(device, dtype=dtype or torch.get_autocast_dtype(device), enabled=dtype is not None):
            values = _evaluated(g, roots)
    except Exception:  # noqa: BLE001 - a constant that cannot be made apart: made each pass, as the model does
        return g
    for i, (n, v) in enumerate(zip(roots, values)):
        if not isinstance(v, Tensor):
            continue  # a size or a number read from a weight: a node, as it was
        name = f"_salience_constant_{i}"
        g.register_buffer(name, v, persistent=False)  # not in a state dict: made from the weights
        with g.graph.inserting_before(n):
            read = g.graph.get_attr(name)
        n.replace_all_uses_with(read, delete_user_cb=lambda u: u not in consts)
    for n in reversed(list(g.graph.nodes)):  # the chains no node reads now
        if n in consts and not n.users:
            g.graph.erase_node(n)
    g.recompile()
    return g


def _is_softmax(gm: Any, n: Any) -> bool:
    if n.op == "call_function":
        return n.target in _SOFTMAX_FUNCTIONS
    if n.op == "call_method":
        return n.target in ("softmax", "log_softmax")
    if n.op == "call_module":
        return isinstance(dict(gm.named_modules())[n.target], _SOFTMAX_MODULES)
    return False


def plan(model: nn.Module, x: Tensor, window: tuple[int, int], stride: tuple[int, int], corners: Tensor,
         strip_softmax: bool, out: Tensor, unwrap: Callable[[Any], Tensor], dtype: Optional[torch.dtype] = None,
         batch: Optional[int] = None) -> Plan:
    """The split for occlusion of ``x`` ``(B, C, H, W)`` with these windows, checked on the clean images
    (``out``: the model's output on them, ``unwrap``: the output rule; ``dtype``: the passes' autocast, ``None``
    for float32; ``batch``: images per pass of the check, all where ``None``), or a :class:`Plan` with ``why``."""
    if x.dim() != 4:
        return Plan(why="the input is not a batch of images")
    analysed = _analysed(model, x, dtype)
    if isinstance(analysed, str):
        return Plan(why=analysed)
    gm, fields, cuts, cost = analysed
    h, w = int(x.shape[-2]), int(x.shape[-1])
    nodes = list(gm.graph.nodes)
    total = sum(cost.values()) or 1.0
    n_along = [math.ceil((s - k) / st) + 1 for s, k, st in zip((h, w), window, stride)]
    best: Optional[Plan] = None
    for c in cuts:
        meta = c.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 4:
            continue
        f = fields[c]
        shape = tuple(int(v) for v in meta.shape)
        crop = tuple(_crop_len((h, w)[i], window[i], stride[i], n_along[i], f.s[i], f.a[i], f.e[i], shape[2 + i])
                     for i in range(2))
        prefix = sum(cost[n] for n in nodes[:nodes.index(c) + 1])
        ratio = crop[0] * crop[1] / (h * w)
        # saved: the prefix on the rest of the image, less the copy of the clean activation (its size, twice)
        saved = (prefix * (1 - ratio) - 2 * math.prod(shape[1:])) / total
        if best is None or saved > best.saved:
            best = Plan(field=f, cut_shape=shape, crop=crop, saved=saved, cut=c.name,  # type: ignore[arg-type]
                        dtype=dtype)
    if best is None or best.saved < 0.05:
        return Plan(why="no cut saves 5 % of a pass (the windows' fields cover most of the image)")
    cut = next(n for n in nodes if n.name == best.cut)
    # checked in float32, as ``out`` is: its constants made so (made under a bf16 autocast, one computed by a matmul
    # or a convolution was bf16, and the float32 check failed on it: full passes); then the passes' prefix, with its
    # constants made under their autocast
    best.prefix, best.suffix = _subgraphs(gm, cut, strip_softmax)
    why = _check(best, x, window, corners, out, unwrap, batch)
    if why:
        return Plan(why=why + _not_rebuilt(gm))
    if dtype is not None:
        best.prefix = _subgraphs(gm, cut, strip_softmax, dtype)[0]
    return best


def moved(p: Plan, gm: Any, strip_softmax: bool) -> Optional[Plan]:
    """``p``'s split (found and checked on the model's own trace) on ``gm``, a ``GraphModule`` of the same model with
    its BatchNorm layers folded (the low-precision copy the passes run, :func:`salience._core.folding.folded_model`):
    the same cut, field and crops (a BatchNorm is elementwise: folding it changes no receptive field), its prefix and
    suffix on ``gm``'s modules; ``None`` where the cut is no cut of ``gm`` (a BatchNorm folded away, or a node named
    otherwise). The prefix's constants are made under ``p.dtype``, the passes' autocast."""
    node = next((n for n in gm.graph.nodes if n.name == p.cut), None)
    if node is None or node not in _cuts(gm, _fields(gm)):
        return None
    prefix, suffix = _subgraphs(gm, node, strip_softmax, p.dtype)
    return replace(p, prefix=prefix, suffix=suffix, clean=None)


def _check(p: Plan, x: Tensor, window: tuple[int, int], corners: Tensor, out: Tensor,
           unwrap: Callable[[Any], Tensor], batch: Optional[int] = None) -> str:
    """Why the split fails on the clean images (``""``: it holds): the suffix of the clean activation must be the
    model's output, and the crops of the first, middle and last windows must give the clean activation's exact part.
    ``batch`` images a pass (the call's clean passes', :func:`salience.methods.perturbation.clean_batch`): the whole
    model in float32 on all ``B`` images at once was the clean passes' peak twice over (session 45)."""
    assert p.prefix is not None and p.suffix is not None
    b = int(x.shape[0])
    step = b if batch is None else max(1, min(int(batch), b))
    try:
        with torch.no_grad():
            # .forward, not the call: a GraphModule's call prints an error's traceback to stderr before raising it,
            # and a failure here is no error of the user's but the documented fallback (a debug log line)
            act: Optional[Tensor] = None  # all B images' clean activation, written part by part (no cat of parts)
            for i in range(0, b, step):
                part = p.prefix.forward(x[i:i + step].clone())
                again = unwrap(p.suffix.forward(part.clone())).float()  # the passes hand the suffix a copy (in-place)
                want = out[i:i + step].float()
                if again.shape != want.shape or not torch.allclose(again, want, rtol=1e-4, atol=1e-4 * (
                        1 + float(out.float().abs().max()))):
                    return "the model split at the cut does not give its output (a final softmax, or a traced branch)"
                del again
                act = rows_into(act, part, i, b)
                del part
            assert act is not None
            p.clean = act
            picks = sorted({0, len(corners) // 2, len(corners) - 1})
            sp = spans(p, corners[picks], window, (int(x.shape[-2]), int(x.shape[-1])))
            owner = torch.zeros(len(picks), dtype=torch.long, device=x.device)
            cropped = p.prefix.forward(crops(x[:1], owner, sp.to(x.device), p.crop))
            pasted = paste(p, act[:1].repeat(len(picks), 1, 1, 1), cropped, sp.tolist())
            scale = 1 + float(act.abs().max())
            if not torch.allclose(pasted, act[:1].expand_as(pasted), rtol=1e-4, atol=1e-4 * scale):
                return "a crop's exact part differs from the clean activation (an op is not local)"
    except Exception as e:  # noqa: BLE001 - anything the split cannot run: full passes
        return f"the split model failed on the clean images ({type(e).__name__}: {str(e)[:120]})"
    return ""


def format_of(t: Tensor) -> torch.memory_format:
    """``t``'s memory format (channels-last where a 4-D ``t`` is, else contiguous), for a buffer written from it."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def rows_into(acc: Optional[Tensor], part: Tensor, i: int, b: int) -> Tensor:
    """``part``, rows ``i..`` of a ``(b, ...)`` tensor taken part by part, in ``acc`` (made at the first part, in
    ``part``'s layout; no cat of the parts at the end): ``part`` itself where it holds all ``b`` rows."""
    if acc is None:
        if int(part.shape[0]) >= b:
            return part
        acc = torch.empty((b,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device,
                          memory_format=format_of(part))
    acc[i:i + int(part.shape[0])] = part
    return acc


def crops(x: Tensor, owner: Tensor, sp: Tensor, size: tuple[int, int]) -> Tensor:
    """The crops ``(n, C, h, w)`` of images ``x[owner]`` starting at ``sp[:, :, 0]``."""
    dev = x.device
    r = sp[:, 0, 0].to(dev)[:, None] + torch.arange(size[0], device=dev)
    c = sp[:, 1, 0].to(dev)[:, None] + torch.arange(size[1], device=dev)
    return x[owner[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None],
             r[:, None, :, None], c[:, None, None, :]]


def paste(p: Plan, clean: Tensor, act: Tensor, sp: list) -> Tensor:
    """``clean`` ``(n, C', H', W')`` (a fresh copy of the clean activations of the items' images, written in place)
    with each item's affected rows and columns taken from its crop's activation ``act``; ``sp``: the items' spans
    (:func:`spans`) as a list, read on the host once per call (no read of a device tensor per chunk)."""
    s = p.field.s if p.field is not None else (1, 1)
    out = clean
    for k, ((c0, a0, a1), (d0, b0, b1)) in enumerate(sp):
        if a1 <= a0 or b1 <= b0:
            continue
        oy, ox = c0 // s[0], d0 // s[1]
        out[k, :, a0:a1, b0:b1] = act[k, :, a0 - oy:a1 - oy, b0 - ox:b1 - ox]
    return out
