"""What the explorer computes, on one model: top classes, maps, curves, the sanity check, figures.

A :class:`ModelSlot` holds one copy of a model with its :class:`~salience._core.info.ModelInfo`
and the :class:`~salience.explore.jobs.Worker` that runs its computations one at a time. The
functions here run inside that worker; they report progress and stop when cancelled through a
forward pre-hook on the model that calls :meth:`Ticker.tick` with the number of images in each
forward pass (a TorchScript model takes no hook of its own: a global pre-hook counts its calls
instead, so its jobs show progress and stop when cancelled too). Requests are checked by :func:`check_request` before they are queued, so a
bad method, option, layer or class gets its 4xx at once.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from salience import targets as _targets
from salience._core import engine as _engine, errors, perf as _perf
from salience._core.autograd import forward_scores, class_probabilities, this_thread
from salience._core.errors import SalienceError, suggest
from salience._core.info import ModelInfo, attach_info, model_info
from salience._core.tensors import model_device
from salience.evidence.faithfulness import auc, deletion_curves, insertion_curves
from salience.evidence.sanity import randomization
from salience.explore.jobs import Ticker, Worker
from salience.loading.images import luma, preprocess, resize_crop
from salience.loading.models import name_classes
from salience.methods import METHODS
from salience.methods import options as _options
from salience.methods.perturbation import check_window
from salience.render import viz

__all__ = ["ModelSlot", "ExplainRequest", "check_request", "explain", "top_classes", "curves", "sanity",
           "check_sanity", "figure_png", "map_png", "png_bytes", "npy_bytes", "display_map", "options_schema", "layer_tree",
           "caught_warnings"]

_DEFAULT_SIZE = (224, 224)
CURVE_STEPS = 24  # points of the insertion / deletion curves (as salience evaluate)
SANITY_PASS = 0.5
"""The sanity badge passes when the Spearman rank correlation of the absolute maps before and
after re-initializing every layer (cascading, Adebayo et al. 2018) is below this. A display
choice, not the paper's: the paper judges the maps by eye. For reference, on demo:shapes
(README's table) Grad-CAM is at -0.18 and vanilla at 0.24, guided backprop at 0.36."""


class ModelSlot:
    """One model of the page (``name`` "a", then "b", "c", ... for each ``--compare`` model): the
    model, its info with class names, the number of outputs, and its worker."""

    def __init__(self, name: str, model: nn.Module, *, max_queue: int = 256) -> None:
        self.name = name
        self.model = model  # no eval(): every pass runs in eval mode under the guard, the user's flags kept
        info = model_info(model)
        self.size = tuple(info.input_size) if info.input_size else _DEFAULT_SIZE
        probe = torch.zeros(1, info.channels, *self.size, device=model_device(model))
        out = forward_scores(model, probe)
        self.num_outputs = int(out.reshape(1, -1).shape[1])
        self.info: ModelInfo = name_classes(info, self.num_outputs)[0]
        self.default_layer: Optional[str] = None
        self.default_error: Optional[str] = None  # why there is no default layer (CrossViT's branches)
        self.worker = Worker(f"model {name} ({self.info.name})", max_queue=max_queue, errors=(SalienceError,))

    def describe(self) -> dict[str, Any]:
        names = list(self.info.class_names or [])
        return {"slot": self.name, "name": self.info.name, "task": self.info.task, "outputs": self.num_outputs,
                "classes": names if len(names) <= 2000 else [], "input_size": list(self.size),
                "methods": list(METHODS), "queue": self.worker.waiting(),
                "busy": self.worker.current is not None}

    def input(self, image: Tensor) -> Tensor:
        """The model's input ``(1, C, h, w)`` for an image ``(3, H, W)`` in ``[0, 1]``."""
        return preprocess(image, self.info).unsqueeze(0).to(model_device(self.model))

    def picture(self, image: Tensor) -> Tensor:
        """What the model sees, as a ``[0, 1]`` RGB picture ``(3, h, w)`` (resized and cropped): a
        1-channel model's is gray (the luma its input is made of, in all three channels)."""
        x = resize_crop(image, self.info) if self.info.input_size else image
        return luma(x).expand(3, -1, -1) if self.info.channels == 1 and x.shape[0] == 3 else x

    def target(self, index: int) -> Any:
        """The target argument of a method for output ``index``."""
        if self.info.task == "regression":
            return _targets.regression(index, "increase")
        return index

    def class_name(self, index: int) -> str:
        return self.info.class_name(index)


# --------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ExplainRequest:
    """A map to compute: model slot, image id, method, output index, and the options by keyword
    as given (texts or JSON values, before reading)."""

    slot: str
    image: str
    method: str
    target: int
    options: tuple[tuple[str, Any], ...] = ()

    def given(self) -> dict[str, Any]:
        return dict(self.options)


def read_options(method: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The options of ``raw`` (keyword -> JSON value or text) read into values; empty values are
    left out (the method's default). A :class:`SalienceError` names the option."""
    if method not in METHODS:
        raise SalienceError(f"unknown method {method!r}{suggest(method, list(METHODS))} "
                            f"(available: {', '.join(METHODS)})")
    known = _options.method_options()
    given: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise SalienceError(f"unknown option {key!r}{suggest(key, list(known))}")
        opt = known[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if opt.kind == "bool":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise SalienceError(f"option {key} must be true or false, got {value!r}")
            given[key] = value if isinstance(value, bool) else str(value).lower() == "true"
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SalienceError(f"option {key} must be a number or a name, got {value!r}")
        try:
            v = _options.read_value(opt, str(value))
        except SalienceError as e:
            raise SalienceError(f"option {key}: {str(e).replace(opt.flag + ' ', '')}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise SalienceError(f"option {key} must be a finite number, got {value!r}")
        given[key] = v
    _options.check_applicable([method], given)
    return given


EXPLORER_MAX_PASSES = 100_000
"""Most ``samples`` / ``steps`` / ``masks`` / occlusion windows a map of the explorer may ask for (each an image
through the model; the library's own cap, :data:`salience._core.engine.MAX_PASSES`, is a million). ``steps=10**30`` hung the server: integrated gradients' quadrature is a list of ``steps`` weights,
built by the request's check on the event loop, so no other request was answered again."""


def _check_passes(given: dict[str, Any]) -> None:
    """A :class:`SalienceError` for a count of forward passes over :data:`EXPLORER_MAX_PASSES`."""
    for key in ("samples", "steps", "masks"):
        v = given.get(key)
        if isinstance(v, int) and v > EXPLORER_MAX_PASSES:
            raise SalienceError(f"option {key}: at most {EXPLORER_MAX_PASSES} in the explorer (each is an image through the "
                                f"model), got {v}; call the method from Python or salience explain for more")


def _check_windows(x: Tensor, given: dict[str, Any]) -> None:
    """A :class:`SalienceError` for occlusion windows on ``x``'s images over :data:`EXPLORER_MAX_PASSES` (a window
    and stride the method refuses itself are left to its own check)."""
    try:
        win, st, n = check_window(x, given.get("window"), given.get("stride"))
    except SalienceError:
        return
    if n > EXPLORER_MAX_PASSES:
        raise SalienceError(f"options window / stride: window {win[0]}x{win[1]} with stride {st[0]}x{st[1]} is {n} "
                            f"windows, at most {EXPLORER_MAX_PASSES} in the explorer (each is an image through the "
                            "model); give a larger stride, or call the method from Python or salience explain")


def _check_wrapped(method: str, x: Tensor, given: dict[str, Any]) -> None:
    """A :class:`SalienceError` for SmoothGrad's copies times its inner method's images (:func:`_expected_items`) over
    :data:`EXPLORER_MAX_PASSES`: each count alone was checked (:func:`_check_passes`, :func:`_check_windows`), and
    1,000 samples of RISE's 1,000 masks, a million images through the model, were taken (a window the method refuses
    itself is left to its own check)."""
    try:
        n = _expected_items(method, given, x)
    except SalienceError:
        return
    if n > EXPLORER_MAX_PASSES:
        inner = _options.show_default(_inner_method(method, given))
        raise SalienceError(f"options samples / method: {method}'s noisy copies of {inner} are {n:,} images through "
                            f"the model, at most {EXPLORER_MAX_PASSES:,} in the explorer; give fewer samples or "
                            f"fewer passes of {inner}, or call the method from Python or salience explain")


def _inner_method(method: str, given: dict[str, Any]) -> Any:
    """The method SmoothGrad (``method``) runs on each copy: ``given``'s (``--smooth-method``) or its default."""
    return given.get(_options.INNER_METHOD) or _options.method_options()[_options.INNER_METHOD].defaults.get(method)


class _Stub(nn.Module):
    """A model without parameters for the dry run of :func:`check_request`: the methods check
    their option values before the first forward pass, which this model never gets to."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - stopped before by _Halting
        return x.flatten(1)


def check_request(slot: ModelSlot, method: str, target: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Everything about an explain request that can be checked without computing: the method, the
    options (types, choices, finite numbers, and the method's own checks of the values, on a
    stand-in model so the worker's model is not touched), the layer, the output index."""
    given = read_options(method, raw)
    _check_passes(given)
    try:
        _options.check_layer(slot.model, given)
    except SalienceError as e:  # e.g. model a's layer asked of model b: name the model and where its layers are
        said = str(e).replace("--layer: ", "").replace("the model", f"model {slot.name} ({slot.info.name})", 1)
        raise SalienceError(f"option layer: {said}; the layers of model {slot.name} are listed by "
                            f"GET api/models/{slot.name}/layers") from None
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < slot.num_outputs:
        raise SalienceError(f"target must be an output index 0..{slot.num_outputs - 1} of {slot.info.name}, "
                            f"got {target!r}")
    x = torch.zeros(1, slot.info.channels, *slot.size)
    if method == "occlusion":
        _check_windows(x, given)
    elif _options.wraps_methods(METHODS[method]):
        _check_wrapped(method, x, given)
    try:
        _options.check_values(_Stub(), x, [method], given)
    except SalienceError as e:  # the command line's flag (--prefix-tokens) as the page's option (prefix_tokens)
        said = str(e)
        for key, opt in sorted(_options.method_options().items(), key=lambda kv: -len(kv[1].flag)):
            said = said.replace(opt.flag, f"option {key}")
        raise SalienceError(said.replace("--", "option ")) from None
    return given


# --------------------------------------------------------------------------------- progress and cancel


UNCOUNTED = {"scorecam": "one masked forward pass per channel of the layer, counted as they run",
             "ablationcam": "one forward pass per channel of the layer, counted as they run"}
"""Methods whose number of forward passes is not known before they run: their jobs show the images
done so far and this reason instead of a fraction."""


def _expected_items(method: str, given: dict[str, Any], x: Tensor, depth: int = 0) -> int:
    """How many images the model's forward passes take in all for one map of ``x`` ``(1, C, H, W)``:
    the samples, steps or masks of a many-pass method (its default when not given) or occlusion's
    windows, plus the clean image; SmoothGrad's copies times its inner method's images (``--smooth-method``, default
    vanilla, with the options SmoothGrad does not take: it counted ``samples + 1``, a million images counted as
    1,001); 1 for a one-pass method, 0 when unknown (:data:`UNCOUNTED`)."""
    if method in UNCOUNTED or depth > 8:
        return 0
    fn = METHODS[method]
    opts = _options.method_options()
    own = _options.accepted(fn)
    if _options.wraps_methods(fn):  # SmoothGrad: each noisy copy through its inner method
        samples, inner = given.get("samples", opts["samples"].defaults.get(method)), _inner_method(method, given)
        name = _options.show_default(inner)
        if not isinstance(samples, int) or name not in METHODS:
            return 0
        return samples * _expected_items(name, {k: v for k, v in given.items() if k not in own}, x, depth + 1)
    for key in ("samples", "steps", "masks"):
        if key in own:
            value = given.get(key, opts[key].defaults.get(method))
            if isinstance(value, int):
                return value + 1
    if method == "occlusion":
        return check_window(x, given.get("window"), given.get("stride"))[2] + 1
    return 1


def _randomized_layers(model: nn.Module) -> int:
    """About how many layers the randomization test re-initializes: the modules owning parameters,
    less the normalization layers (joined to the layer before them). Only sizes the progress bar."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False))
               and not isinstance(m, norms))


@contextlib.contextmanager
def _watched(model: nn.Module, ticker: Ticker) -> Iterator[None]:
    """Tick the images of each forward pass of ``model`` (and so stop a cancelled job at its next
    pass). A forward pre-hook on the model; a TorchScript model takes none, so for it a global
    forward pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) ticks the calls
    of TorchScript modules made from Python in this thread only (a scripted model's own submodules
    run inside its compiled graph, so each call seen is one whole forward pass; other threads, and
    so the other model's worker, are not counted)."""
    def hook(module: nn.Module, args: tuple) -> None:
        first = args[0] if args else None
        n = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1
        ticker.tick(0 if _engine.discarded() else n)  # the engine's thrown-away memory probe: no image done

    thread = threading.get_ident()

    def script_hook(module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == thread and isinstance(module, torch.jit.ScriptModule):
            hook(module, args)

    try:
        handle = model.register_forward_pre_hook(_perf.observer(this_thread(hook)))  # compiled passes may not tick
    except (RuntimeError, AttributeError, TypeError):  # TorchScript: "not supported on ScriptModules"
        # an observer: salience's own, which the guards' sweep of the hooks their blocks left keeps
        handle = torch.nn.modules.module.register_module_forward_pre_hook(_perf.observer(script_hook))
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------- warnings


_capture_lock = errors.WARNINGS_LOCK  # shared with errors.quiet_warnings (image decoding in other threads)
# thread id -> the records of its captures, the outermost first (nested: a map computed again for its curves)
_capturing: dict[int, list[list[tuple[Any, Any, str, int]]]] = errors.CAPTURING
_outer: Optional[warnings.catch_warnings] = None
_forward: Any = warnings.showwarning


def _show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    stack = _capturing.get(threading.get_ident())
    if stack:
        for found in stack:  # an enclosing capture sees what an inner one sees
            found.append((message, category, filename, lineno))
    else:  # another thread's (the event loop's, a worker not capturing): as before
        _forward(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[str]]:
    """The texts of the warnings raised in this thread inside it (each text once, in order), for the
    page to show with the result; each is also shown once as before (the server's log). Every warning
    is seen, not only the first of its place in the code (``"always"``: a second image's
    :class:`~salience.methods.integrated.CompletenessWarning` is said too). Thread-safe where
    ``warnings.catch_warnings(record=True)`` is not (its record and filters are the process's: the
    two models' workers at once took each other's warnings, or left the record on): one
    ``catch_warnings`` is held while any thread captures, and its ``showwarning`` sorts the warnings
    by thread. Nested in one thread (the curves computing their map again), the enclosing capture
    gets the inner one's warnings too, and the log has each once (the outermost says them)."""
    global _outer, _forward
    me = threading.get_ident()
    found: list[tuple[Any, Any, str, int]] = []
    with _capture_lock:
        if not _capturing:
            _outer = warnings.catch_warnings()
            _outer.__enter__()
            _forward = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = _show
        _capturing.setdefault(me, []).append(found)
    texts: list[str] = []
    try:
        yield texts
    finally:
        with _capture_lock:
            stack = _capturing[me]
            del stack[next(i for i, f in enumerate(stack) if f is found)]  # by identity: lists of equal records are ==
            outermost = not stack
            if outermost:
                del _capturing[me]
            if not _capturing and _outer is not None:
                _outer.__exit__(None, None, None)
                _outer = None
        for message, category, filename, lineno in found:
            text = str(message)
            if text not in texts:
                texts.append(text)
                if outermost:
                    _forward(message, category, filename, lineno)


# --------------------------------------------------------------------------------- computations


def top_classes(slot: ModelSlot, image: Tensor, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` highest outputs: index, name, probability (``None`` for a regression model) and score."""
    out = forward_scores(slot.model, slot.input(image), strip_softmax=False).reshape(1, -1).float().cpu()
    regression = slot.info.task == "regression"
    probs = None if regression else class_probabilities(out)
    order = (torch.arange(out.shape[1]) if regression else out[0].argsort(descending=True))[:k]
    return [{"index": int(i), "name": slot.class_name(int(i)), "score": float(out[0, i]),
             "probability": None if probs is None else float(probs[0, i])} for i in order]


def explain(slot: ModelSlot, image: Tensor, method: str, target: int, given: dict[str, Any],
            ticker: Ticker) -> np.ndarray:
    """The raw map, float32: ``(H, W)``, or ``(C, H, W)`` for a per-channel reduction."""
    fn, _ = _options.bind(method, given)
    x = slot.input(image)
    ticker.total = _expected_items(method, given, x)
    ticker.note = UNCOUNTED.get(method, "")
    with _watched(slot.model, ticker):
        m = fn(slot.model, x, slot.target(target))
    return m.detach()[0].float().cpu().numpy()


def display_map(raw: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` map the page draws: the raw map, or the largest ``|value|`` over channels."""
    if raw.ndim == 3:
        return np.abs(raw).max(0) if raw.shape[0] > 1 else raw[0]
    return raw


def curves(slot: ModelSlot, image: Tensor, raw: np.ndarray, target: int, ticker: Ticker) -> dict[str, Any]:
    """Insertion and deletion curves (probability of the target, ``CURVE_STEPS + 1`` points) and their AUCs."""
    x = slot.input(image)
    m = torch.from_numpy(display_map(raw)).to(x.device)[None]
    ticker.total = 2 * (min(CURVE_STEPS, x.shape[-2] * x.shape[-1]) + 1)  # at most a step per pixel
    tgt = slot.target(target)
    with _watched(slot.model, ticker):
        ins = insertion_curves(slot.model, x, m, tgt, steps=CURVE_STEPS)
        dele = deletion_curves(slot.model, x, m, tgt, steps=CURVE_STEPS)
    return {"insertion": ins[0].tolist(), "deletion": dele[0].tolist(),
            "insertion_auc": float(auc(ins)[0]), "deletion_auc": float(auc(dele)[0]),
            "steps": len(ins[0]) - 1}  # CURVE_STEPS, or one per pixel of a smaller image


def check_sanity(slot: ModelSlot) -> None:
    """The randomization test finds and re-initializes the layers with forward hooks on them,
    which a TorchScript model does not take: a :class:`SalienceError` saying so."""
    if isinstance(slot.model, torch.jit.ScriptModule):
        raise SalienceError(f"the sanity check re-initializes the layers of {slot.info.name} one by one and finds "
                            "them with forward hooks, which a TorchScript model does not support; load the "
                            "Python nn.Module to run it")


def sanity(slot: ModelSlot, image: Tensor, method: str, target: int, given: dict[str, Any],
           ticker: Ticker) -> dict[str, Any]:
    """The cascading model randomization test (:func:`salience.evidence.randomization`) of one map:
    the rank correlation and SSIM after the top layer and after all layers, and the badge."""
    check_sanity(slot)
    fn, _ = _options.bind(method, given)
    x = slot.input(image)
    per_map = _expected_items(method, given, x)
    ticker.total = per_map * (1 + _randomized_layers(slot.model)) + 2 if per_map else 0  # the maps, two probes
    ticker.note = UNCOUNTED.get(method, "")
    with _watched(slot.model, ticker):  # the test's copy of the model keeps the hook
        r = randomization(slot.model, x, fn, slot.target(target), seed=0)
    top, every = r["spearman_abs"][0], r["spearman_abs"][-1]
    passed = math.isfinite(every) and every < SANITY_PASS
    return {"spearman_top": top, "spearman_all": every, "ssim_top": r["ssim"][0], "ssim_all": r["ssim"][-1],
            "layers": len(r.layers), "passed": passed, "threshold": SANITY_PASS,
            "badge": "changes with the weights" if passed else "barely changes with the weights"}


# --------------------------------------------------------------------------------- files


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    """``a`` as the bytes of a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def map_png(raw: np.ndarray, *, cmap: Optional[str] = None, percentile: float = 99.0,
            signed: Optional[bool] = None) -> bytes:
    """The map as a heatmap PNG (:func:`salience.viz.heatmap`)."""
    return png_bytes(viz.heatmap(display_map(raw), cmap=cmap, percentile=percentile, signed=signed))


def figure_png(rows: Sequence[tuple[Tensor, dict[str, np.ndarray]]], **display: Any) -> bytes:
    """The side-by-side figure (:func:`salience.viz.figure`): for each ``(picture, maps)`` of
    ``rows`` (one per model), the picture ``(3, h, w)`` that model sees and the maps it made, laid
    on that picture (a map lines up with the pixels it explains); the rows stacked top to bottom,
    tiles of one height, on white."""
    tile = max(max(int(p.shape[-2]) for p, _ in rows), 160)
    arrays = [viz.figure(p[None], {k: display_map(v)[None] for k, v in maps.items()}, scale_to=tile, **display)
              for p, maps in rows]
    width = max(a.shape[1] for a in arrays)
    out = np.full((sum(a.shape[0] for a in arrays), width, 3), 255, dtype=np.uint8)
    y = 0
    for a in arrays:
        out[y:y + a.shape[0], :a.shape[1]] = a
        y += a.shape[0]
    return png_bytes(out)


# --------------------------------------------------------------------------------- what the page shows


def options_schema() -> dict[str, Any]:
    """Each method's options as controls: keyword, kind, default, choices (from the signatures)."""
    opts = _options.method_options()
    out: dict[str, Any] = {}
    for name, fn in METHODS.items():
        keys = sorted(_options.accepted(fn), key=list(opts).index)
        out[name] = [{"keyword": k, "kind": opts[k].kind, "annotation": opts[k].annotation,
                      "default": _options.show_default(opts[k].defaults.get(name, _inner_default(k))),
                      "choices": list(_options.CHOICES.get(k, []))} for k in keys]
    return out


def _inner_default(keyword: str) -> Any:
    return next(iter(_options.method_options()[keyword].defaults.values()))


def layer_tree(model: nn.Module, limit: int = 5000) -> list[dict[str, Any]]:
    """The model's modules in order: dotted name, class name, depth (the root left out)."""
    out = []
    for name, module in model.named_modules():
        if name:
            out.append({"name": name, "type": type(module).__name__, "depth": name.count(".")})
            if len(out) >= limit:
                break
    return out


def name_model(model: nn.Module, name: str) -> nn.Module:
    """``model`` with ``name`` in its info (a module passed from Python has its class name)."""
    info = model_info(model)
    if info.name == type(model).__name__ and name:
        import dataclasses

        attach_info(model, dataclasses.replace(info, name=name))
    return model
