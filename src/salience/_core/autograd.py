"""The one place that calls ``torch.autograd``: target scores -> gradients.

:func:`gradients` runs the model on ``x`` under :func:`salience._core.guard.model_guard` (eval
mode, frozen parameters, everything restored afterwards), takes the score of the target
before any final softmax, and differentiates it with respect to the input and, optionally,
inner layers' outputs. Only those gradients are computed: parameters' ``.grad`` are never
touched and no graph is built for parameters.
"""
from __future__ import annotations

import inspect
import math
import operator
import os
import re
import threading
import traceback
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from salience._core import derived as _derived
from salience._core import perf as _perf
from salience._core.checkpoints import plain_checkpoints
from salience._core.errors import SalienceError, uncoloured, user_stacklevel
from salience._core.fingerprint import close_walk, end_walk, one_walk, walk_state
from salience._core.guard import model_guard, modules_of, parameters_of
from salience._core.info import max_batch, model_info
from salience._core.layers import LayerSpec, layer_name, resolve_layer
from salience._core.tensors import check_flag, first_tensor, model_device

__all__ = ["Gradients", "Pass", "TargetLike", "backward", "gradients", "capture_hook", "StopForward", "captured_pass", "settle", "grad_input", "layer_grad", "layer_value", "layer_output", "seeing_output", "check_input", "model_call", "check_scores", "forward_scores", "predicted_classes", "unwrap_output", "describe_output", "layer_not_captured",
           "looks_like_probabilities"]


def check_input(x: Any, model: Optional[nn.Module] = None, modules: Optional[Sequence[nn.Module]] = None) -> Tensor:
    """Validate an image batch ``(B, C, H, W)``: a finite floating tensor on the model's device.
    ``modules``: ``model``'s modules, ``modules_of(model)``, where the caller walked them already for its
    other checks in this call (one walk, not one per check).

    The finiteness test (a host-device synchronization) is skipped for an input a many-pass method made from
    its own checked ``x`` for the chunk that runs (:func:`salience._core.derived.derived`: noisy copies, path
    points), whose finiteness is tested once at the end of the call instead."""
    if not isinstance(x, Tensor):
        raise SalienceError(f"expected x as a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.layout != torch.strided:
        raise SalienceError(f"x is a {str(x.layout).replace('torch.', '')} tensor; saliency needs a dense one, "
                            "e.g. x.to_dense()")
    if x.dim() != 4:
        hint = "; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise SalienceError(f"expected x of shape (B, C, H, W), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise SalienceError(
            f"expected a floating-point x, got dtype {x.dtype}; convert it, e.g. x.float() / 255"
        )
    if x.shape[0] == 0:
        raise SalienceError("x is an empty batch (B = 0)")
    if x.is_meta:
        raise SalienceError("x is on the meta device: it has a shape but no values; saliency needs real "
                            "values (make x on the model's device, e.g. torch.rand(..., device='cpu'))")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
        if _bare_keras(model):
            raise SalienceError(
                f"the model is a Keras model ({type(model).__name__} {getattr(model, 'name', '')!r}), which takes "
                "channels-last images, while salience's functions give (B, C, H, W): wrap it with "
                "salience.loading.keras.wrap_keras(model) (it makes the input channels-last itself), or use "
                "salience.keras_vis's API on the model as it is"
            )
        p = first_tensor(model)
        if p is not None and p.device != x.device:
            raise SalienceError(
                f"x is on {x.device} but the model is on {p.device}; move one, e.g. x.to('{p.device}')"
            )
        dtype = _compute_dtype(model, modules)
        if dtype is not None and x.dtype != dtype:
            raise SalienceError(
                f"x is {x.dtype} but the model computes in {dtype} (its parameters' dtype); convert one, "
                f"e.g. x.to({dtype}) or model.to({x.dtype})"
            )
    if not _derived.is_derived(x) and not _all_finite(x):
        n = int((~torch.isfinite(x)).sum())
        raise SalienceError(f"x contains {n} NaN or infinite values; saliency needs finite input")
    return x


def _all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite: from its least and greatest value (one reduction; a NaN
    makes both NaN), not a boolean tensor the size of ``x`` (20 times slower on a CPU batch, and the
    check runs on every call), read with one synchronization. An empty ``x`` is finite; a device without
    ``aminmax`` checks each value."""
    if x.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(x)
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a backend without aminmax
        return bool(torch.isfinite(x).all())
    if x.device.type == "cpu":  # the two numbers read as they are (torch.isfinite is four ops each, & a fifth)
        return math.isfinite(lo.item()) and math.isfinite(hi.item())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _bare_keras(model: nn.Module) -> bool:
    """Whether ``model`` is a Keras model itself (a ``torch.nn.Module`` on Keras's PyTorch backend), not
    wrapped by ``salience.loading.keras.wrap_keras``: it would read a ``(B, C, H, W)`` batch as
    channels-last, a wrong map without a word or Keras's raw error (checked without importing Keras)."""
    return any(c.__module__.split(".")[0] == "keras" and c.__name__ in ("Model", "Functional", "Sequential")
               for c in type(model).__mro__)


# What PyTorch's layers (and timm's, Hugging Face's) say when an input does not fit them: channels,
# sizes, shapes. Only a failure that says one of these becomes a SalienceError; any other propagates.
_SHAPE_FAILURE = re.compile(
    r"to have \d+ channels, but got \d+ channels|shapes cannot be multiplied|size mismatch|"
    r"must match the size of tensor|is invalid for input of size|kernel size can't be greater than actual input|"
    r"output size is too small|expected input with shape|should contain \d+ elements not \d+|"
    r"channel dimension of the pixel values|input (image size|height|width)\b.*doesn't match model|"
    r"wrong image (height|width)",  # torchvision's ViT: "Wrong image height! Expected 224 but got 32!"
    re.IGNORECASE)
_CONV_CHANNELS = re.compile(r"to have (\d+) channels, but got (\d+) channels")


# The put-back of the model's own state as the call found it, called before every pass of the model in the block
# (:func:`each_pass_from`; the engine's chunks of SmoothGrad and integrated gradients): None outside one.
_EACH_PASS: ContextVar[Optional[Callable[[], None]]] = ContextVar("salience_each_pass", default=None)


@contextmanager
def each_pass_from(put_back: Callable[[], None]) -> Iterator[None]:
    """Every pass of a model in the block (:func:`model_call`) starts with ``put_back()`` (the call's
    :meth:`~salience._core.guard.Found.before_pass`): a method that runs passes of its own inside another's chunk
    (Guided Grad-CAM's guided and Grad-CAM passes, Grad-CAM's first call's layer search, a pass run again for a softmax)
    has each of them see the state the outer call found, as each does when the method is called alone (its guard
    blocks are then outermost and put the state back as they leave; nested in the outer call's guard they do not).
    Session 50: SmoothGrad around Guided Grad-CAM on a model counting its calls was 50 % off."""
    token = _EACH_PASS.set(put_back)
    try:
        yield
    finally:
        _EACH_PASS.reset(token)


def _again() -> None:
    """Before a pass run again within one :func:`model_call` (a compiled pass after which a softmax appeared, an
    untapped pass whose output came from a softmax): the model's own state put back where an :func:`each_pass_from`
    block is open, so the pass that counts does not see the thrown-away one's writes."""
    put_back = _EACH_PASS.get()
    if put_back is not None:
        put_back()


@contextmanager
def model_call(model: nn.Module, x: Tensor) -> Iterator[None]:
    """The block runs ``model`` on ``x`` ``(B, C, H, W)``: a failure of the model that says the input
    does not fit (channels, size, shape: a RuntimeError, or timm's / Hugging Face's assertion and
    ValueError) is a :class:`SalienceError` naming the input's shape, what the model takes where it is
    known (the channels its convolution asked for, its first convolution's ``in_channels``, its
    :class:`~salience._core.info.ModelInfo` input size) and what to do; the model's own error is its
    ``__cause__``. So is a model whose ``forward`` needs more arguments than ``x`` (Python's TypeError "X.forward()
    missing 1 required positional argument", TorchScript's and torch.export's own words: :func:`_needs_more_inputs`).
    Any other error propagates as it is (a bug in the model keeps its
    traceback). Before the pass, the options in force that concern every pass (:func:`salience._core.perf.before_pass`:
    ``allocator="reuse"`` on a CPU), and in an :func:`each_pass_from` block the model's own state put back as the
    call found it. The model's pass (the user's code) ends the thread's
    :func:`~salience._core.fingerprint.one_walk` stretches: each walk after it is made anew."""
    end_walk()
    put_back = _EACH_PASS.get()
    if put_back is not None:
        put_back()
    _perf.before_pass(x)
    try:
        yield
    except (RuntimeError, AssertionError, ValueError) as e:
        if isinstance(e, SalienceError):
            raise
        if isinstance(model, torch.jit.ScriptModule) and _SCRIPT_MISSING.match(str(e)) \
                or str(e).startswith(_EXPORT_INPUTS):
            raise SalienceError(_needs_more(str(e).split(". Declaration")[0].split(":")[0])) from e
        said = next((uncoloured(line).strip() for line in str(e).splitlines() if _SHAPE_FAILURE.search(line)), None)
        if said is None:
            raise
        raise SalienceError(_shape_message(model, x, said.removeprefix("RuntimeError: "))) from e
    except TypeError as e:  # the model's own forward needs more than x (a second input): not one of its bugs
        if not _needs_more_inputs(model, e):
            raise
        raise SalienceError(_needs_more(str(e))) from e


_MISSING = re.compile(r"(?:(\S+)\.)?forward\(\) missing \d+ required")  # Python 3.9 names no class
_TORCH_AND_OURS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
_SCRIPT_MISSING = re.compile(r"forward\(\) is missing value for argument")  # TorchScript's (its submodules' are typed)
_EXPORT_INPUTS = "Trying to flatten user inputs with exported input tree spec"  # a torch.export program's module


def _needs_more(said: str) -> str:
    return (f"the model's forward needs more than the image batch ({said}); salience calls model(x) with x alone: "
            "wrap the model in an nn.Module whose forward(x) gives it the rest")


def _needs_more_inputs(model: nn.Module, e: TypeError) -> bool:
    """Whether ``e`` is Python's refusal to call the forward of ``model`` (or of the module it wraps:
    ``torch.compile``'s, ``nn.DataParallel``'s) with ``x`` alone. Python names the function that defines it
    (a base class's, for a forward inherited); a TypeError raised once that forward runs (a submodule called
    without an argument, even one of the model's class) is the model's bug, kept as it is. Python 3.9 names
    no class: there, no frame outside torch's and salience's files may have run."""
    if type(model).__name__ == "UnflattenedModule" and str(e).startswith("There is no flat args adapter specified"):
        return True  # torch.export.unflatten's module of a program exported with more inputs
    said = _MISSING.match(str(e))
    if said is not None and said.group(1) is None:  # Python 3.9: no code of the model's (or a layer's own) ran
        called = list(traceback.walk_tb(e.__traceback__))[1:]  # below the frame that called the model
        return all(frame.f_code.co_filename.startswith(_TORCH_AND_OURS) for frame, _ in called)
    inner: Any = model
    while said is not None and isinstance(inner, nn.Module):
        forward = inspect.unwrap(type(inner).forward)
        if getattr(forward, "__qualname__", None) == f"{said.group(1)}.forward":
            code = getattr(forward, "__code__", None)
            return not any(frame.f_code is code for frame, _ in traceback.walk_tb(e.__traceback__))
        inner = (inner.module if isinstance(inner, (nn.DataParallel, nn.parallel.DistributedDataParallel))
                 else getattr(inner, "_orig_mod", None) if type(inner).__name__ == "OptimizedModule" else None)
    return False


def _first_conv(model: nn.Module) -> Optional[tuple[str, int]]:
    """The name and ``in_channels`` of the model's first ``nn.Conv2d`` (in the order of its modules: the
    stem, or a transformer's patch embedding, in the models seen), or ``None``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m.in_channels
    return None


CHANNEL_HINTS = {(4, 3): "drop the alpha channel (RGBA to RGB): x[:, :3]",
                 (1, 3): "repeat the gray channel (grayscale to RGB): x.expand(-1, 3, -1, -1) (command line: "
                         "--channels 3)",
                 (3, 1): "make the images gray, e.g. x.mean(1, keepdim=True) (command line: --channels 1)"}
"""What to do with a batch of C channels for a model that takes another number, by (given, taken):
the words of :func:`_shape_message` and of a Keras model's input errors (loading/keras.py)."""


def _shape_message(model: nn.Module, x: Tensor, said: str) -> str:
    """The words of :func:`model_call`'s error: the input, what the model takes, what to do."""
    _, c, h, w = x.shape
    head = f"the model cannot take the input of shape {tuple(x.shape)} ({c} channels, {h} x {w} pixels)"
    conv = _CONV_CHANNELS.search(said)
    first = _first_conv(model)
    takes: Optional[int] = None
    if conv is not None and int(conv.group(2)) == c:
        takes = int(conv.group(1))
        where = f"its first convolution {first[0]!r}" if first is not None and first[1] == takes else "a convolution"
    elif first is not None and first[1] != c:
        takes, where = first[1], f"its first convolution {first[0]!r}"
    size = model_info(model).input_size
    if takes is not None and takes != c:
        hint = CHANNEL_HINTS.get((c, takes), f"give it images of {takes} channel{'s' * (takes != 1)}")
        why = f": {where} takes {takes} channel{'s' * (takes != 1)}; {hint}"
    elif size is not None and tuple(size) != (h, w):
        why = (f": it takes {size[0]} x {size[1]} images; resize them (salience.loading.preprocess with the "
               "model's info does)")
    else:
        why = "; give it images of the channels and size it was made for"
    return f"{head}{why} (the model said: {said})"


def model_input(model: nn.Module, x: Tensor) -> Tensor:
    """Images read from files (float32, on the CPU) ``(B, C, H, W)`` as ``model`` takes them: on its
    device, in its parameters' one floating dtype (a float64 or float16 model takes no float32 image;
    unchanged where the model does not say: :func:`_compute_dtype`)."""
    return x.to(model_device(model), dtype=_compute_dtype(model) or x.dtype)


def _compute_dtype(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None) -> Optional[torch.dtype]:
    """The one floating dtype of all of ``model``'s parameters, which its input must have (PyTorch
    layers do not cast: a float32 image in a float64 model fails inside the model with a raw
    "Input type ... and bias type ... should be the same"); ``None`` when the parameters mix dtypes,
    or there are none, or the model casts its input itself (Keras 3 layers do). ``modules`` not given: from the
    guard's one walk of the modules and parameters (:func:`_walked_dtype`)."""
    if modules is None:
        return _walked_dtype(model)
    dtypes = set()  # every parameter's dtype, the floating ones picked from the few at the end (20 us less a call
    # on ViT-Ti's 152 parameters than asking each is_floating_point())
    # the modules' own dicts: module.parameters(recurse=False) walks again
    for module in modules_of(model) if modules is None else modules:
        where = type(module).__module__
        if where == "keras" or where.startswith("keras."):
            return None
        params = module._parameters
        if isinstance(params, dict):
            if not params:
                continue
            found = params.values()
        else:
            found = module.parameters(recurse=False)
        for p in found:
            if p is not None:
                dtypes.add(p.dtype)
    floating = [d for d in dtypes if d.is_floating_point]
    return floating[0] if len(floating) == 1 else None


_DTYPE = operator.attrgetter("dtype")


def _walked_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """:func:`_compute_dtype` from the guard's walk (one, shared in a
    :func:`~salience._core.fingerprint.one_walk` stretch): each class of module looked at once for Keras's, the
    parameters' dtypes gathered in C (resnet18: 62 parameters read once, not each module's dict asked)."""
    outer = walk_state()
    try:  # one walk for both (a stretch of its own, or the caller's)
        one_walk(model)
        modules, params = modules_of(model), parameters_of(model)
    finally:
        close_walk(outer)
    for cls in set(map(type, modules)):
        where = cls.__module__
        if where == "keras" or where.startswith("keras."):
            return None
    floating = [d for d in set(map(_DTYPE, params)) if d.is_floating_point]
    return floating[0] if len(floating) == 1 else None


_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, Tensor.softmax, Tensor.log_softmax,
            torch.special.softmax, torch.special.log_softmax}


class _SoftmaxTap(TorchFunctionMode):
    """Remembers the last softmax/log-softmax call (module or functional) of a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.last: Optional[tuple[Tensor, Tensor]] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if func in _SOFTMAX and args and isinstance(args[0], Tensor):
            self.last = (args[0], out)
        return out


class StopForward(Exception):
    """Raised by a hook to end the forward pass at the target's layer."""

    def __init__(self, value: Tensor):
        self.value = value


def unwrap_output(out: Any, model: Optional[nn.Module] = None) -> Tensor:
    """The model's score tensor from what its forward returned (the one rule of outputs).

    With ``model`` given and its :class:`~salience._core.info.ModelInfo` ``output`` set (a dict
    key, a sequence index, or a function of the returned value; see
    ``salience.loading.select_output``), that part is taken. Otherwise: a tensor as it is; an
    object with a tensor ``.logits`` (a Hugging Face ``ModelOutput``) -> its logits; a dict ->
    its ``"logits"`` key, else its only tensor value; a tuple or list -> its first element when
    that is a tensor (Hugging Face's ``return_dict=False`` puts the logits first). Anything else,
    and a dict with several tensors and no ``"logits"``, is a :class:`SalienceError` naming what
    the model returned and saying to pass ``output=``. Scores of an integer or bool dtype (an argmax's
    classes, a threshold) are a :class:`SalienceError` too: no method can explain them.
    """
    pick = model_info(model).output if model is not None else None
    scores = _pick_output(out, pick) if pick is not None else _the_scores(out)
    if not scores.is_floating_point():  # an argmax's classes, a threshold's bools: RISE's softmax, argmax raised raw
        raise SalienceError(
            f"the model returned scores of dtype {scores.dtype}; salience explains floating-point scores (logits, "
            "probabilities or a regression value): return them before an argmax, a threshold or a rounding")
    return scores


def _the_scores(out: Any) -> Tensor:
    """:func:`unwrap_output`'s rule without a pick: the score tensor of what a forward returned."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, dict):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return out[tensors[0]]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise SalienceError(
        f"the model returned {describe_output(out)}; salience needs one tensor of scores: pass output= "
        "(a key, an index or a function; --output on the command line) to say which, e.g. "
        "salience.loading.select_output(model, 'logits')"
    )


def _unwrapper(model: nn.Module) -> Any:
    """:func:`unwrap_output` for ``model`` as a function of the output alone, for a compiled graph to
    trace (:func:`salience._core.perf.gradient_call`): the default rule (one function for every model),
    or the model's ``output`` pick; equal (``==``) for the same rule, so that a cached graph is kept."""
    pick = model_info(model).output
    return unwrap_output if pick is None else _Picker(pick)


class _Picker:
    """:func:`_pick_output` of one ``pick``, equal to another of an equal pick."""

    def __init__(self, pick: Any) -> None:
        self.pick = pick

    def __call__(self, out: Any) -> Tensor:
        return _pick_output(out, self.pick)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Picker) and type(other.pick) is type(self.pick) and other.pick == self.pick

    def __hash__(self) -> int:
        return hash(self.pick)


def describe_output(out: Any) -> str:
    """What a forward returned, in words: its type, and its keys or length."""
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict) or hasattr(out, "keys"):
        try:
            keys = list(out.keys())
        except Exception:  # noqa: BLE001 - a keys() that is not a mapping's
            keys = []
        name = getattr(type(out), "described_as", None) or type(out).__name__  # folding.FxPlainDict: "dict"
        return f"a {name} with keys {keys}"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join("tensor" if isinstance(v, Tensor) else type(v).__name__ for v in out[:8])
        return f"a {type(out).__name__} of length {len(out)} ({kinds}{', ...' if len(out) > 8 else ''})"
    return type(out).__name__


def _pick_output(out: Any, pick: Any) -> Tensor:
    """The part ``pick`` (a key, an index, or a function) of what the model returned."""
    what = f"output={pick!r}"
    try:
        if callable(pick):
            what = f"the output function {getattr(pick, '__name__', type(pick).__name__)}"
            value = pick(out)
        elif isinstance(out, Tensor):
            raise TypeError("a key or an index picks from a tuple, list or dict, not from a tensor")
        else:
            value = out[pick]
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        # a bare KeyError / IndexError names the key alone; a subclass says more (folding.FxPlainDict's: pick by key)
        kind = next(t for t in type(e).__mro__ if t.__module__ == "builtins").__name__
        detail = "" if type(e) in (KeyError, IndexError) else f" ({kind}: {e})"
        raise SalienceError(f"{what} does not fit: the model returned {describe_output(out)}{detail}") from None
    if not isinstance(value, Tensor):
        raise SalienceError(
            f"{what} picked a {type(value).__name__}, not a tensor; the model returned {describe_output(out)}"
        )
    return value


class TargetLike(Protocol):
    """What the core needs of a target (:mod:`salience.targets` implements it): a callable from
    the model's output (or ``layer``'s output) to scores ``(B,)`` or a scalar loss, and a
    modifier of the input gradient."""

    layer: Optional[LayerSpec]

    def __call__(self, output: Tensor) -> Tensor: ...

    def modify_gradient(self, grad: Tensor) -> Tensor: ...


@dataclass
class Gradients:
    """The result of one forward pass walked back once per target (K targets).

    ``output``: the model's output (pre-softmax if stripped), detached, ``(B, ...)``;
    ``scores``: each target's scores, detached, ``(B,)`` (or ``()`` for a scalar loss);
    ``inputs``: d score_k / d x with each target's gradient modifier, ``(K, B, C, H, W)``, or
    ``None`` if not asked; ``activations``: the captured layers' outputs ``(B, ...)`` and
    ``layer_grads``: their gradients ``(K, B, ...)``, in the order of ``layers``.
    """

    output: Tensor
    scores: list[Tensor]
    inputs: Optional[Tensor]
    activations: list[Tensor]
    layer_grads: list[Tensor]

    def score_matrix(self, batch: int) -> Tensor:
        """The scores as ``(K, B)`` (a scalar loss repeated over the batch)."""
        return torch.stack([s.reshape(-1) if s.dim() else s.expand(batch) for s in self.scores])


@dataclass
class Pass:
    """One target's forward and backward pass (:func:`gradients`).

    ``output``: the model's output (pre-softmax if stripped), detached, ``(B, K)``;
    ``scores``: the target's scores, detached, ``(B,)`` (or ``()`` for a scalar loss);
    ``grad``: d scores / d x, ``(B, C, H, W)``, or ``None`` if not asked;
    ``activations`` and ``layer_grads``: the captured layers' outputs and their gradients,
    in the order of ``layers``.
    """

    output: Tensor
    scores: Tensor
    grad: Optional[Tensor]
    activations: list[Tensor]
    layer_grads: list[Tensor]


def layer_value(output: Any) -> Any:
    """The tensor a layer gives: its output, or the first element of a tuple / list whose first element
    is a tensor (Hugging Face's blocks return ``(hidden_states, attention weights)``, Hiera's, Swin's,
    an attention's ``(output, weights)``: the hidden states first, as :func:`unwrap_output` reads a
    model's); anything else as it is (a caller refuses it with :func:`layer_not_captured`)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


def capture_hook(store: list, stop: bool, copy: bool = True):
    """A forward hook that keeps a module's first output (:func:`layer_value`: a tuple's first tensor) in
    ``store`` (and ends the pass with ``stop``). The rest of the forward runs on the layer's own output, as the
    model computes it; an in-place operation there (a ResNet block's ``out += identity`` and in-place ReLU after
    its ``bn3``, DenseNet's in-place ReLU after a norm, or one on a tensor the output aliases: the input that an
    ``Identity`` or an eval-mode ``Dropout`` returns) would change what ``store`` holds, so a tensor's values are
    also copied when the layer returns, with its version counter and gradient edge (:class:`_Kept`);
    :func:`settle` picks, after the pass, the tensor itself (unchanged) or the copy and the edge. Without ``copy``
    only the tensor's version counter is kept beside it (``None`` for an inference tensor, which has none): a caller
    that runs the pass again where it moved (Score-CAM's capture, which spares the copy)."""
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if store:  # the first call of a reused module only
            return None
        value = layer_value(output)
        store.append(value)
        if stop:
            raise StopForward(output)
        if isinstance(value, Tensor):
            store.append(_Kept(value) if copy else (None if value.is_inference() else value._version))
        return None

    return hook


class _Kept:
    """A captured output as the layer returned it: its version counter (``None`` for an inference tensor, which
    has none), a copy of its values (one activation, alive through the rest of the forward: 1.6 MB at resnet50's
    ``layer4`` for 4 images at 224, not seen in a call's time nor its peak memory, benchmarks/capture-inplace-s42.md;
    at an early layer part of the peak, +4.6 MiB of 224 at resnet18's ``layer1``, benchmarks/capture-peak-s42.md) and its gradient edge (``None`` without
    gradients): the place in the graph of the output's values at that moment, which the gradients of every later use
    reach, also through the in-place operations that changed the tensor since (``torch.autograd.grad`` of the tensor
    itself would differentiate its latest version). For a view (``nn.Flatten``'s output, a slice) the edge is its
    base's, with ``region`` (:class:`_Region`) to read the view's part of the base's gradient: an in-place change of
    the view or of its base rebases both on the base's new version, whose gradient reaches the base's edge, never the
    view's own (where every later use would be lost: a zero gradient after ``flatten`` and an in-place ReLU)."""

    __slots__ = ("version", "values", "edge", "region")

    def __init__(self, value: Tensor) -> None:
        self.version = None if value.is_inference() else value._version
        self.values = value.detach().clone()
        self.edge: Any = None
        self.region: Optional[_Region] = None
        if value.requires_grad:
            base = value._base
            if base is not None and base.requires_grad:
                self.edge, self.region = torch.autograd.graph.get_gradient_edge(base), _Region(base, value)
            else:
                self.edge = torch.autograd.graph.get_gradient_edge(value)


class _Region:
    """Where a view lies in its base (sizes, strides, storage offsets): :meth:`read` takes the view's gradient out of
    the base's gradient (a tensor of the base's shape, whatever its strides)."""

    __slots__ = ("base", "view")

    def __init__(self, base: Tensor, view: Tensor) -> None:
        self.base = (base.size(), base.stride(), base.storage_offset())
        self.view = (view.size(), view.stride(), view.storage_offset())

    def read(self, g: Tensor) -> Tensor:
        size, stride, offset = self.base
        full = g.new_empty_strided(size, stride)
        full.copy_(g)
        vsize, vstride, voffset = self.view
        return full.as_strided(vsize, vstride, voffset - offset)


def settle(store: list) -> list:
    """``store`` of :func:`capture_hook` after the pass, made ``[tensor]`` where the output is as the layer returned
    it (its version counter did not move: the tensor itself, its copy dropped), else ``[copy of its values, gradient
    edge or None]`` (changed in place since, under its name or another's: a view of it, the input it is), with the
    view's :class:`_Region` third where the edge is its base's; a store without a tensor as it is. Read the values as
    ``store[0]``, differentiate :func:`grad_input`\\ ``(store)``, make autograd's answer :func:`layer_grad`."""
    if len(store) > 1 and isinstance(store[1], _Kept):
        kept = store[1]
        if kept.version is not None and store[0]._version == kept.version:
            del store[1:]
        else:
            store[:] = [kept.values, kept.edge] + ([kept.region] if kept.region is not None else [])
    return store


def grad_input(store: list) -> Any:
    """What to differentiate for a settled store's output (:func:`settle`): its gradient edge where its tensor was
    changed in place after the layer returned (a view's: its base's), else the tensor."""
    return store[1] if len(store) > 1 and store[1] is not None else store[0]


def layer_grad(store: list, g: Optional[Tensor]) -> Tensor:
    """The gradient of a settled store's output from autograd's for :func:`grad_input`\\ ``(store)``: zeros where
    it was unused (``None``), a view's part of its base's gradient (:class:`_Region`), else ``g`` as it is."""
    if g is None:
        return torch.zeros_like(store[0])
    return store[2].read(g) if len(store) > 2 else g


def captured_pass(mod: nn.Module, run: Callable[[], Any]) -> tuple[list, Any]:
    """``run()`` (one forward pass of the model) with ``mod``'s first output kept (:func:`capture_hook`):
    ``(store, run's result)``, the store settled (:func:`settle`): its values as the layer returned them, whatever
    the rest of the pass changed in place, in one pass (the model's state and random numbers are one pass's)."""
    store: list[Any] = []
    handle = mod.register_forward_hook(this_thread(capture_hook(store, False)))
    try:
        result = run()
    finally:
        handle.remove()
    return settle(store), result


_SEEN_OUTPUTS: ContextVar[Optional[list[Any]]] = ContextVar("salience_seen_outputs", default=None)


@contextmanager
def seeing_output() -> Iterator[list[Any]]:
    """For the block, :func:`layer_output` runs its pass on to the model's output (the layers after its
    layer run too) and appends what the model returned (not unwrapped) to the list this yields: the
    output of a gradient-free method's own pass, for a caller that checks targets against it
    (:func:`salience.methods._multi.as_method`) without a pass of its own. Per thread and task (a
    context variable); nothing is put on the model."""
    seen: list[Any] = []
    token = _SEEN_OUTPUTS.set(seen)
    try:
        yield seen
    finally:
        _SEEN_OUTPUTS.reset(token)


def layer_output(model: nn.Module, x: Tensor, layer: LayerSpec) -> Tensor:
    """``layer``'s output on ``x`` ``(B, C, H, W)`` from one forward pass, under :func:`model_guard` and
    ``torch.inference_mode`` (no graph is built), stopped when the layer returns: the layers after
    it do not run, unless the call is inside :func:`seeing_output` (then they run on the layer's own output, the
    model's output as the model computes it, and the layer's values are a copy taken when it returned: inference
    tensors have no version counter to tell an in-place change after it, :func:`capture_hook`). For the
    gradient-free methods that read a layer (Eigen-CAM)."""
    check_input(x, model)
    seen = _SEEN_OUTPUTS.get()
    store: list[Any] = []
    handle = _hooked(model, layer, capture_hook(store, seen is None))
    try:
        with model_guard(model), torch.inference_mode():
            try:
                with model_call(model, x):
                    out = model(x)
                if seen is not None:
                    seen.append(out)
            except StopForward:
                pass
    finally:
        handle.remove()
    if not store or not isinstance(store[0], Tensor):
        raise layer_not_captured(model, layer, store)
    return settle(store)[0]


def this_thread(hook: Callable) -> Callable:
    """``hook`` (a module hook) run only for passes of the thread that made it: another thread's
    forward through the same module (the user's own code, or a second salience call on the shared
    model) is neither captured nor changed by it (a capture took that thread's activation, an
    ablation changed that thread's output)."""
    owner = threading.get_ident()

    def scoped(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)
    scoped.salience_thread = owner  # type: ignore[attr-defined]  # perf.structure() leaves other threads' out
    return scoped


def _hooked(model: nn.Module, layer: LayerSpec, hook: Any) -> Any:
    """``hook`` on ``layer``'s module; a TorchScript layer (which takes no hook) is refused by name,
    where ``register_forward_hook`` raised a raw RuntimeError ("not supported on ScriptModules")."""
    mod = resolve_layer(model, layer)
    if isinstance(mod, torch.jit.ScriptModule):
        name = layer if isinstance(layer, str) else layer_name(model, layer)
        raise SalienceError(f"the layer {name!r} is a TorchScript module, which does not support forward hooks; "
                            "pass a Python (non-scripted) layer, or the model without TorchScript in it")
    return mod.register_forward_hook(this_thread(hook))


def layer_not_captured(model: nn.Module, layer: LayerSpec, store: list) -> SalienceError:
    """The error for a hooked layer that gave no tensor: never called, or called and returned something
    else (a dict, a tuple whose first element is not a tensor), said as such, the layer by its name
    (its repr, many lines for a block, and "was not called" for a layer that was, before). Under
    nn.DataParallel on several GPUs the layer ran, in a replica's thread (:func:`this_thread`): said so."""
    name = layer if isinstance(layer, str) else layer_name(model, layer)
    if not store:
        if any(isinstance(m, nn.DataParallel) for m in model.modules()):  # its replicas run in threads of their own
            return SalienceError(
                f"layer {name!r} was not called in this thread's forward pass: nn.DataParallel runs the model's "
                "replicas in threads of their own, whose passes salience's layer hooks do not see (they see only "
                "the explaining thread's); explain the model inside it, model.module, on one device")
        return SalienceError(f"layer {name!r} was not called in the forward pass")
    return SalienceError(
        f"layer {name!r} returned {describe_output(store[0])}, not a tensor; pass a layer whose output is the "
        "tensor to explain (a submodule of it, or the block around it)")


def _common_layer(targets: Sequence[TargetLike]) -> Optional[LayerSpec]:
    layers = {id(t.layer) if not isinstance(t.layer, str) else t.layer for t in targets}
    if len(layers) > 1:
        raise SalienceError(
            "several targets at once must all read the same layer (or all the model's output); "
            "explain targets of different layers in separate calls"
        )
    return targets[0].layer


def _forward(model: nn.Module, x_in: Tensor, target_layer: Optional[LayerSpec], layers: Sequence[LayerSpec],
             strip_softmax: bool, extra_modes: Sequence[Any]) -> tuple[Tensor, list[list[Any]]]:
    """Run the model on ``x_in`` with hooks on ``layers`` (and the target's layer, where the pass
    stops); returns the scored tensor (pre-softmax when stripped) and the captured outputs."""
    captured: list[list[Any]] = [[] for _ in layers]
    run = _perf.active(model)
    if run is not None and not layers and target_layer is None and not extra_modes:
        compiled = run.forward_fn(True, strip_softmax)
        if compiled is not None:
            out, done = _perf.forward_call(model, x_in, True, strip_softmax, lambda: None)
            if done:  # a plain pass of the compiled model (an eager pass showed no softmax to strip)
                out = unwrap_output(out, model)
                if not softmax_appeared(run, out, strip_softmax):
                    return out, captured
                del out  # a softmax appeared since the answer was found: the pass runs eagerly, as below
                _again()
    # the tap (every torch call of the forward through Python) runs until a pass of the model's structure
    # showed whether it ends in a softmax; after one that showed none, a softmax's gradient function on the
    # output says that it now does (the pass is then run again with the tap)
    softmax = _SoftmaxPass(model, run) if strip_softmax and target_layer is None else None
    tap = softmax.tap if softmax is not None else None
    out, captured = _hooked_pass(model, x_in, target_layer, layers, extra_modes, run, tap)
    if softmax is not None and softmax.untapped_softmax(out):
        softmax.record(True)  # known now: the pass under the tap records nothing again
        del out, captured  # the first pass's graph freed before the second is built
        _again()
        out, captured = _hooked_pass(model, x_in, target_layer, layers, extra_modes, run, softmax.tap_again())
    if softmax is not None:
        out, stripped = softmax.strip(out)
        if not stripped:
            _warn_if_probabilities(out)
    for layer, store in zip(layers, captured):
        if not store or not isinstance(store[0], Tensor):
            raise layer_not_captured(model, layer, store)
    return out, captured


def _warn_if_probabilities(out: Tensor) -> None:
    """Warn when ``out`` (a gradient pass's output, no softmax stripped) looks like probabilities: at once
    outside a many-pass call; inside one, the condition is kept on the device and the warning given once at
    the end of the call (:meth:`salience._core.derived.Derived.defer`: no synchronization per pass)."""
    scope = _derived.current()
    rows = _probability_rows(out, scope is None or scope.items is None)  # read at once: not an engine run's pass
    if rows is None:
        return
    if scope is not None:
        scope.defer("probabilities", rows, _warn_probabilities)
    elif bool(rows):
        _warn_probabilities()


def _warn_probabilities() -> None:
    warnings.warn(
        "the model's output looks like probabilities (non-negative rows summing to 1) but no final "
        "softmax call was seen to take the scores before it; saliency of probabilities is dominated "
        "by the other classes. Give salience the model without its final softmax.",
        stacklevel=user_stacklevel(),
    )


def _hooked_pass(model: nn.Module, x_in: Tensor, target_layer: Optional[LayerSpec], layers: Sequence[LayerSpec],
                 extra_modes: Sequence[Any], run: Any, tap: Optional["_SoftmaxTap"]) -> tuple[Any, list[list[Any]]]:
    """One forward of :func:`_forward` with the layers' hooks (and the target's layer's, where the pass stops), the
    modes and the tap: the output (the target layer's, or the model's unwrapped) and the captured outputs, settled
    (:func:`settle`: the values each layer returned, whatever the rest of the pass changed in place since, and what
    to differentiate for them: one pass, the model's output its own)."""
    captured: list[list[Any]] = [[] for _ in layers]
    target_store: list[Any] = []
    handles = []
    try:
        for layer, store in zip(layers, captured):
            handles.append(_hooked(model, layer, capture_hook(store, False)))
        if target_layer is not None:
            # Registered last, so the other layers' hooks on the same module run first.
            handles.append(_hooked(model, target_layer, capture_hook(target_store, True)))
        try:
            if not extra_modes and tap is None and run is None:  # nothing to enter: no ExitStack
                out = model(x_in)
            else:
                with ExitStack() as modes:
                    for mode in extra_modes:
                        modes.enter_context(mode)
                    if tap is not None:
                        modes.enter_context(tap)
                    if run is not None:
                        modes.enter_context(run.autocast())
                    out = model(x_in)
        except StopForward as stop:
            out = stop.value
    finally:
        for h in handles:
            h.remove()
    for store in captured:
        settle(store)
    if target_layer is not None:
        if not target_store:
            raise SalienceError(f"the target's layer {target_layer!r} was not called in the forward pass")
        for layer, store in zip(layers, captured):
            if not store:  # the pass stopped at the target's layer before this one ran
                name = layer if isinstance(layer, str) else layer_name(model, layer)
                tname = target_layer if isinstance(target_layer, str) else layer_name(model, target_layer)
                raise SalienceError(
                    f"layer {name!r} gave no output before the target's layer {tname!r}, where the forward pass "
                    f"stops (the target reads that layer's output): pass a layer that runs before {tname!r}, or a "
                    "target on the model's output")
        return unwrap_output(target_store[0]), captured
    return unwrap_output(out, model), captured


def _walk_back(scores: list[Tensor], stores: list[list[Any]], need_input: bool) -> list[list[Tensor]]:
    """One backward pass per target's scores, the graph kept until the last; zeros where unused. ``stores``: settled
    stores (:func:`settle`; ``[x]`` for the input), differentiated at :func:`grad_input`, read with :func:`layer_grad`."""
    wrt = [grad_input(store) for store in stores]
    if not wrt:
        return [[] for _ in scores]
    out = []
    for k, s in enumerate(scores):
        if not s.requires_grad:
            raise SalienceError(
                "the target's score does not depend on the input: the model has no gradient path from "
                "x to the output (is a part of it non-differentiable, detached, or under no_grad?)"
            )
        grads = torch.autograd.grad(s.sum(), wrt, retain_graph=k < len(scores) - 1, allow_unused=True)
        if need_input and grads[0] is None:
            raise SalienceError(
                "the target's score does not depend on the input x (no gradient path); check that the "
                "model uses its input and that the target reads the model's output"
            )
        out.append([layer_grad(store, g) for g, store in zip(grads, stores)])
    return out


def _stack(grads: list[Tensor]) -> Tensor:
    """``(K, ...)`` from K gradients; one target's is a view, not a copy."""
    return grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)


def backward(
    model: nn.Module,
    x: Tensor,
    targets: Sequence[TargetLike],
    *,
    layers: Sequence[LayerSpec] = (),
    input_grad: bool = True,
    strip_softmax: bool = True,
    extra_modes: Sequence[Any] = (),
    checked: bool = False,
) -> Gradients:
    """Differentiate K targets' scores w.r.t. ``x`` ``(B, C, H, W)`` and ``layers``' outputs.

    One forward pass, then one backward pass per target (the graph is kept between them with
    ``retain_graph``): K targets cost one forward, not K. All targets read the same output (the
    model's, or the same layer's). ``extra_modes`` are context managers entered around the
    forward pass (backprop rules). Runs under :func:`model_guard`: eval mode, parameters frozen
    (only these gradients are computed, ``.grad`` is never touched), everything restored.
    ``checked``: the caller ran :func:`check_input` on this ``x`` and ``model`` just before, no code of the user's
    between (a one-pass method's call): not run again (its finiteness test, a reduction over the batch, and the
    walk of the model for its dtype: 0.8 ms a call of 16 images on resnet50 at 224, docs/performance.md session 41).
    """
    if not checked:
        check_input(x, model)
    strip_softmax = check_flag(strip_softmax, "strip_softmax")
    if not targets:
        raise SalienceError("no target to differentiate")
    target_layer = _common_layer(targets)
    # the call's deferred checks (the targets' scores finite, the probabilities warning): one synchronization
    # after the backward pass, none in a many-pass call (its scope, which this joins, tests them at its end).
    # A torch.utils.checkpoint of this thread as a plain call (plain_checkpoints): torch refuses autograd.grad through
    # a reentrant one, and a layer inside one has no gradient in the forward pass; a non-reentrant one recomputes its
    # block in the backward pass outside the extra modes (the attention capture, a backprop rule). One with
    # statement, not an ExitStack: the same order in and out, without its Python calls per context.
    with _derived.run_scope(), model_guard(model), torch.inference_mode(False), torch.enable_grad(), \
            plain_checkpoints():
        # With parameters frozen, the graph to the layers' outputs starts at x: it needs grad even
        # when only the layers' gradients are asked for.
        x_in = (x.clone() if x.is_inference() else x).detach()
        run = _perf.active(model)
        if run is not None:  # the run's layout (channels-last input for a channels-last model)
            x_in = run.prepare(x_in)
        x_in = x_in.requires_grad_(input_grad or bool(layers))
        frozen = None
        if run is not None and input_grad and not layers and target_layer is None and not extra_modes \
                and len(targets) == 1:
            # compile="freeze": the forward and the input gradient in one frozen graph
            with model_call(model, x_in):
                frozen = _perf.gradient_call(model, x_in, targets[0], strip_softmax, _unwrapper(model))
            if frozen is not None and softmax_appeared(run, frozen[0], strip_softmax):
                frozen = None  # a softmax appeared since the answer was found: the pass runs eagerly, below
        if frozen is not None:
            out, captured = frozen[0], []  # already the score tensor (_unwrapper's, in the graph)
            # the classes' range checked here
            scores = _finite_scores([check_scores(targets[0](out), x.shape[0])], targets)
            per_target = [[frozen[1]]]
        else:
            with model_call(model, x_in):
                out, captured = _forward(model, x_in, target_layer, layers, strip_softmax, extra_modes)
            scores = _finite_scores([check_scores(t(out), x.shape[0]) for t in targets], targets,
                                    run is not None and run.dtype is torch.float16)
            per_target = _walk_back(scores, ([[x_in]] if input_grad else []) + captured, input_grad)
    inputs = None
    if input_grad:
        inputs = _stack([t.modify_gradient(g[0]) for t, g in zip(targets, per_target)])
    first = 1 if input_grad else 0
    layer_grads = [_stack([g[first + i] for g in per_target]) for i in range(len(layers))]
    return Gradients(
        output=out.detach(),
        scores=[s.detach() for s in scores],
        inputs=inputs,
        activations=[c[0].detach() for c in captured],
        layer_grads=layer_grads,
    )


def gradients(
    model: nn.Module,
    x: Tensor,
    target: TargetLike,
    *,
    layers: Sequence[LayerSpec] = (),
    input_grad: bool = True,
    strip_softmax: bool = True,
    extra_modes: Sequence[Any] = (),
) -> Pass:
    """One target's :func:`backward`: d score / d ``x`` ``(B, C, H, W)`` and ``layers``' gradients.

    ``target``: a target object (see :func:`salience.targets.as_target` to make one from an
    int, a tensor or a function).
    """
    g = backward(model, x, [target], layers=layers, input_grad=input_grad, strip_softmax=strip_softmax,
                 extra_modes=extra_modes)
    return Pass(
        output=g.output,
        scores=g.scores[0],
        grad=None if g.inputs is None else g.inputs[0],
        activations=g.activations,
        layer_grads=[lg[0] for lg in g.layer_grads],
    )


def check_scores(scores: Any, batch: int) -> Tensor:
    """A target's scores must be one per sample ``(B,)`` or a scalar; anything else is a clear error."""
    if not isinstance(scores, Tensor) or not (scores.dim() == 0 or scores.shape == (batch,)):
        raise SalienceError(
            f"the target must return one score per sample, shape ({batch},), or a scalar; got "
            f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    return scores


def _finite_scores(scores: list[Tensor], targets: Sequence[TargetLike], fp16: bool = False) -> list[Tensor]:
    """``scores``, with their finiteness deferred to the end of the call (:func:`salience._core.derived.run_scope`):
    a NaN or infinite score of the target made a map of NaN silently. The target's scores only: another class's
    output may be ``-inf`` (log-probabilities of a class ruled out). Which items were not finite is kept on the
    device (:meth:`~salience._core.derived.Derived.note_scores`), read only for the refusal's message, which names
    the images and the target (no synchronization more). ``fp16``: the pass ran under ``precision="fp16"``, whose
    overflow the message names (``torch.isfinite(model(x))`` in float32 would not show it)."""
    scope = _derived.current()
    assert scope is not None  # backward runs in a scope
    if scope.items is None and all(s.device.type == "cpu" and s.dim() == 1 for s in scores) and \
            not scope.noted("finite:target", len(scores)) and \
            all(_all_finite(s.detach()) for s in scores):  # aminmax: 3 ops, not isfinite's 6
        # a CPU pass outside an engine run (a one-pass call's own scope), every score finite, none noted bad before in
        # the scope: read at once (no device to wait for); nothing to note (a refusal names only the bad items: their
        # rows were all there were in the notes), the key deferred as not holding (its place in the actions' order)
        scope.defer("finite:target", False, lambda: _refuse_target_scores(scope, len(targets), fp16))
        return scores
    if all(s.dim() == 1 for s in scores):
        bad = torch.stack([~torch.isfinite(s.detach()) for s in scores], 1)  # (n, K)
        scope.note_scores("finite:target", bad, targets)
        flag = bad.any()
    else:  # a scalar score (a loss over the batch): no image to name
        flag = torch.stack([~torch.isfinite(s.detach()).all() for s in scores]).any()
    scope.defer("finite:target", flag, lambda: _refuse_target_scores(scope, len(targets), fp16))
    return scores


def _refuse_target_scores(scope: _derived.Derived, k: int, fp16: bool = False) -> None:
    under = ("; under precision='fp16' the forward pass may overflow float16 (magnitudes past 65504) where float32 "
             "does not: try precision='bf16' (float32's range) or 'fp32'") if fp16 else ""
    raise _derived.refusal(scope, "finite:target", k, "the target's score is NaN or infinite",
                           " (the model's output, or the target's function of it), which makes the map NaN; check "
                           "torch.isfinite(model(x)) and the target, e.g. a log or a division in the model's forward"
                           + under)


def looks_like_probabilities(out: Tensor) -> bool:
    """Whether ``out`` ``(n, classes)`` reads as a softmax's output: rows of non-negative values summing to 1
    (within 1e-4); one host-device synchronization."""
    rows = _probability_rows(out)
    return rows is not None and bool(rows)


def softmax_appeared(run: Any, out: Any, strip_softmax: bool) -> bool:
    """Whether ``out``, the output of a pass that ran a copy or a graph of the model (``run.forward_fn``, the frozen
    gradient graph) on a final-softmax answer ``run`` took from an earlier call (``run.softmax_reused``: no eager
    pass of this call looked), reads as probabilities now: a softmax the forward adds by a flag or a setting
    changed between the calls (no change of :func:`~salience._core.fingerprint.structure`), which the eager first
    pass of every call showed (:meth:`_SoftmaxPass.look`). Looked at once per run (one host-device
    synchronization); then the answer is unknown again (``run.softmax_checked`` off): the caller runs the pass
    eagerly, whose tap or look finds the softmax and strips it, and the later passes run eagerly too. Before
    (session 45's review), a later ``compile=True`` or ``"freeze"`` call, whose first chunk runs compiled on the
    earlier call's answer (:meth:`~salience._core.perf.Run.reused_probe`), explained the probabilities."""
    if not strip_softmax or not getattr(run, "softmax_reused", False):
        return False
    run.softmax_reused = False
    if run.softmax_stripped or not isinstance(out, Tensor) or not _probabilities_like(out):
        return False
    run.softmax_checked = False
    return True


def _probability_rows(out: Tensor, read: bool = True) -> "Optional[Tensor | bool]":
    """:func:`looks_like_probabilities` as a 0-d bool tensor on ``out``'s device (read without waiting for
    it), ``None`` for an output without two classes or more; ``torch.allclose``'s test of the sums
    (``|s - 1| <= 1e-4 + 1e-5``, NaN never close). ``read``: a CPU output's least value may be read at once (not in
    a many-pass call's passes, which read nothing per pass: tests/test_syncs.py counts CPU reads for a GPU's
    synchronizations); ``False`` (a Python bool) then where it is negative or NaN."""
    if out.dim() != 2 or out.shape[1] < 2 or not out.is_floating_point():
        return None
    o = out.detach()
    if read and o.device.type == "cpu" and o.numel() and not o.amin().item() >= 0:
        return False  # a negative value (or a NaN), known at once on a CPU: one op, not seven (most models' scores)
    return (o >= 0).all() & ((o.sum(1) - 1).abs() <= 1e-4 + 1e-5).all()


def class_probabilities(out: Tensor, already: Optional[bool] = None) -> Tensor:
    """Class probabilities of a model's scores, the shape kept: for ``(n, classes)``, ``out`` itself
    when its rows already are probabilities (a softmax), else their softmax; for one logit per
    image, ``(n,)`` or ``(n, 1)`` (a binary classifier), its sigmoid: the softmax over a single
    class is 1 whatever the input. Other shapes are returned as they are.

    ``already``: whether the rows already are probabilities, judged once by a caller that scores
    the same model's output in several chunks (:func:`looks_like_probabilities` of the clean
    images' output) and applied to every chunk; ``None`` (default): judged on ``out`` itself.
    Judged per chunk, a chunk of raw outputs that happened to be non-negative and sum to 1 (a
    blank image's bias row ``[1, 0]``) was kept while the others were softmaxed: two scales in one
    result, and a result that changed with the chunk size."""
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        return out.sigmoid()
    if out.dim() == 2:
        keep = looks_like_probabilities(out) if already is None else bool(already)
        return out if keep else out.softmax(dim=1)
    return out


def forward_scores(model: nn.Module, x: Tensor, *, strip_softmax: bool = True,
                   batch_size: Optional[int] = None, compiled: bool = False,
                   before_pass: Optional[Callable[[], None]] = None) -> Tensor:
    """The model's scores for ``x`` ``(B, C, H, W)``, detached: one forward pass, no gradient.

    Under :func:`model_guard` (eval mode, everything restored), the output unwrapped to a tensor
    and, with ``strip_softmax``, taken before a final softmax / log-softmax. ``batch_size``: run
    the images in chunks of that many (``None``: all at once; at most the model's
    :func:`~salience._core.info.max_batch`). Inside an engine run
    (:class:`salience._core.perf.Run`) the pass takes the run's layout and autocast; with
    ``compiled=True`` (the caller's promise that no hook of its own is on the model: a plain pass)
    a chunk the run marks as compiled runs the compiled model. ``before_pass``: called before each chunk's pass, and
    before a pass run again within it (a softmax that appeared: :func:`_again`) (the perturbation methods put the
    model's own state back as the call found it, :meth:`~salience._core.guard.Found.before_pass`: each chunk scored by
    the model the user called, not by the state the chunk before left).
    """
    strip_softmax = check_flag(strip_softmax, "strip_softmax")
    step = x.shape[0] if batch_size is None else max(1, int(batch_size))
    limit = max_batch(model)  # a program exported with Dim("batch", max=N) refuses more
    if limit is not None:
        step = min(step, limit)
    outs = []
    run = _perf.active(model)
    each = each_pass_from(before_pass) if before_pass is not None else nullcontext()
    with model_guard(model), torch.no_grad(), each:  # before_pass: called by model_call before each chunk's pass
        for i in range(0, x.shape[0], step):
            xb = x[i:i + step]
            if run is not None:
                xb = run.prepare(xb)
            with model_call(model, xb):
                out = _scores_pass(model, xb, run, strip_softmax, compiled)
            outs.append(out.detach() if run is None or run.dtype is None else out.detach().to(x.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _scores_pass(model: nn.Module, xb: Tensor, run: Optional[_perf.Run], strip_softmax: bool,
                 compiled: bool) -> Tensor:
    """One forward pass of :func:`forward_scores`: compiled when the run allows it, else eager under
    the run's autocast (an eager pass tells the run whether a final softmax was stripped)."""
    appeared = False
    if run is not None and compiled and run.forward_fn(True, strip_softmax) is not None:
        out, done = _perf.forward_call(model, xb, True, strip_softmax, lambda: None)
        if done:
            out = unwrap_output(out, model)
            appeared = softmax_appeared(run, out, strip_softmax)
            if not appeared:
                return out
    # without gradients there is no gradient function to say that a softmax appeared (a flag the forward reads):
    # an output of probabilities (or their logarithms) does, and the pass runs again under the tap
    softmax = _SoftmaxPass(model, run) if strip_softmax else None
    if softmax is not None and appeared:  # the compiled pass's output looked: straight under the tap
        _again()
        return softmax.strip(_tapped_pass(model, xb, run, softmax.tap_again()))[0]
    out = _tapped_pass(model, xb, run, softmax.tap if softmax is not None else None)
    if softmax is None:
        return out
    if softmax.untapped_probabilities(out):
        _again()
        out = _tapped_pass(model, xb, run, softmax.tap_again())
    return softmax.strip(out)[0]


def _tapped_pass(model: nn.Module, xb: Tensor, run: Optional[_perf.Run], tap: Optional["_SoftmaxTap"]) -> Tensor:
    """One eager forward of :func:`_scores_pass` under the tap (when given) and the run's autocast: the output,
    unwrapped."""
    with ExitStack() as stack:
        if tap is not None:
            stack.enter_context(tap)
        if run is not None:
            stack.enter_context(run.autocast())
        return unwrap_output(model(xb), model)


def _probabilities_like(out: Tensor) -> bool:
    """Whether ``out`` ``(n, classes)`` reads as a softmax's or a log-softmax's output (rows of non-negative values
    summing to 1, or of non-positive values whose exponentials do)."""
    rows = _probability_rows(out)  # None: not (n, classes) of floats
    if rows is None:
        return False
    if bool(rows):
        return True
    o = out.detach().float()
    return bool((o <= 0).all()) and bool(torch.allclose(o.logsumexp(1), torch.zeros_like(o[:, 0]), atol=1e-4))


class _SoftmaxPass:
    """One forward pass's final softmax (:func:`_forward`, :func:`_scores_pass`). The pass runs under the tap
    (:class:`_SoftmaxTap`) until a pass of the model's structure showed whether its output is a softmax's
    (:func:`final_softmax`); after one that showed none, an untapped output that came from a softmax all the same
    (:meth:`untapped_softmax`, :meth:`untapped_probabilities`) runs the pass again under the tap
    (:meth:`tap_again`). :meth:`strip` gives the scores before the softmax the tap saw, tells the run whether there
    was one and records it for the structure (:meth:`record`, once per pass)."""

    def __init__(self, model: nn.Module, run: Any) -> None:
        self.model, self.run = model, run
        self.tap: Optional[_SoftmaxTap] = _SoftmaxTap() if final_softmax(model) is not False else None
        self.recorded = False  # what this pass showed is recorded for the structure already

    def untapped_softmax(self, out: Any) -> bool:
        """Whether ``out``, a gradient pass's output without the tap (a structure that showed no final softmax),
        came from a softmax after all: its gradient function says so (the model's forward takes another path now,
        by a flag it reads)."""
        fn = getattr(out, "grad_fn", None)
        return self.tap is None and fn is not None and type(fn).__name__ in _SOFTMAX_GRAD_FNS

    def untapped_probabilities(self, out: Tensor) -> bool:
        """Whether ``out``, an output without the tap and without gradients (no gradient function to tell), reads
        as probabilities or their logarithms, when this pass looks (:meth:`look`)."""
        return self.tap is None and self.look(out) is True

    def look(self, out: Tensor) -> Optional[bool]:
        """Whether ``out`` reads as probabilities or log-probabilities (:func:`_probabilities_like`, a host-device
        synchronization); None where the pass does not look. Outside a many-pass call every pass looks; inside one
        (:func:`salience._core.derived.run_scope`) only the call's first look at the model is made, and asking
        takes it: the rest would wait for the device. A softmax that appears without a change of structure does so
        by a flag or a setting the forward reads, which the user sets between calls, not while one runs (salience
        changes nothing on the model in a call, and restores all of it after): the first pass of the call shows it
        (it is then run again with the tap, which records that the structure ends in a softmax; its later passes
        run with the tap). The clean images' pass of a perturbation method, before its many passes, looks too."""
        scope = _derived.current()
        if scope is not None and not scope.first(("softmax-look", id(self.model)), self.model):
            return None
        return _probabilities_like(out)

    def tap_again(self) -> "_SoftmaxTap":
        """A new tap, for the pass run again."""
        self.tap = _SoftmaxTap()
        return self.tap

    def record(self, ends: bool) -> None:
        """Record for the model's structure whether its output is a final softmax's (:func:`final_softmax`)."""
        _note_final_softmax(self.model, ends)
        self.recorded = True

    def strip(self, out: Any) -> tuple[Any, bool]:
        """``out``, or the scores a final softmax turned into ``out`` when the tap saw that call; whether it did
        (told to the run, and recorded for the structure unless the pass recorded already). Without a tap (a
        structure known to end in no softmax) the answer is no."""
        if self.tap is None and final_softmax(self.model) is not False:
            return out, False  # not looked for (the structure changed in the pass)
        stripped = self.tap is not None and self.tap.last is not None and out is self.tap.last[1]
        if self.run is not None:
            self.run.note_softmax(stripped)
        if self.tap is not None and not self.recorded and (stripped or self.look(out) is False):
            # an output of probabilities that no softmax call made is never "known: no softmax": a pass without
            # gradients would run twice (_scores_pass) where the tap costs a fraction of one. Inside a many-pass
            # call, only its first look records "no softmax" (the later passes would wait for the device to say it
            # again; a pass whose structure changes in every chunk, under a hook of its own, keeps the tap)
            self.record(stripped)
        if stripped:
            assert self.tap is not None and self.tap.last is not None
            return self.tap.last[0], True
        return out, False


# Whether a model ends in a softmax, per model (weakly), output pick and structure (perf.clear_cache() empties it).
_FINAL_SOFTMAX = _perf.ModelCache(keep=64)
_SOFTMAX_GRAD_FNS = frozenset({"SoftmaxBackward0", "LogSoftmaxBackward0"})


def final_softmax(model: nn.Module) -> Optional[bool]:
    """Whether an earlier pass of ``model`` in its present :func:`~salience._core.perf.structure` showed that
    its output is a final softmax's (``None``: no such pass yet). The passes that strip the softmax run
    under :class:`_SoftmaxTap`, a torch-function mode through which every torch call of the forward goes in
    Python (about 2 ms of resnet50's forward on this CPU, a tenth of a pass on a GPU, whose passes cost their
    kernels' launches): only until this is known, and always on a structure that ends in a softmax. A
    module replaced, added or hooked since, or another output picked (``select_output``, a plain attribute the
    structure does not see): asked again."""
    return _FINAL_SOFTMAX.get(model, _pick_key(model), _perf.structure(model))


def _note_final_softmax(model: nn.Module, ends: bool) -> None:
    try:
        _FINAL_SOFTMAX.put(model, _pick_key(model), _perf.structure(model), ends)
    except TypeError:  # a model that takes no weak reference: asked at every pass
        pass


def _pick_key(model: nn.Module) -> tuple:
    """What the final-softmax answer depends on besides the structure: the model's output pick
    (:func:`unwrap_output`), a key or an index as it is, a function by its identity."""
    pick = model_info(model).output
    return (type(pick).__name__, pick if pick is None or isinstance(pick, (str, int)) else id(pick))


def predicted_classes(model: nn.Module, x: Tensor, *, batch_size: Optional[int] = None) -> Tensor:
    """Each image's top class ``(B,)``: the argmax of the model's scores, no gradient."""
    out = forward_scores(model, x, strip_softmax=False, batch_size=batch_size)
    return out.reshape(out.shape[0], -1).argmax(1)
