"""A keras-vis style saliency API on PyTorch models and on Keras 3 models (PyTorch backend).

For people who know keras-vis (``vis.visualization``): the same calls, arguments, defaults and
results, computed by salience's own methods::

    from salience.compat.keras_vis import visualize_saliency, find_layer_idx
    idx = find_layer_idx(model, "head")              # or -1: the final layer -> class saliency
    heat = visualize_saliency(model, idx, filter_indices=3, seed_input=img)   # (H, W) in [0, 1]

What it computes, as keras-vis did: the gradient of the mean output of ``filter_indices`` (summed
over several indices) of the layer ``model.layers[layer_idx]`` w.r.t. the input (or
``wrt_tensor``): for a Dense/Linear layer ``output[:, i]`` (class saliency), for a conv layer the
mean of channel ``i`` over positions (conv filter saliency). ``backprop_modifier`` is ``None``
(plain gradients), ``"guided"`` (guided backprop) or ``"relu"`` (alias ``"rectified"``,
``"deconv"``: deconvnet). ``grad_modifier`` is then applied to the gradient (``"absolute"``,
``"negate"``, ``"relu"``, ``"small_values"``, ``None``); without ``keepdims`` the channels are
reduced by their (signed) maximum; and the whole map is scaled to ``[0, 1]`` by
``(m - min) / (max - min + 1e-7)``. The result is a NumPy array, as in keras-vis.

Layouts: ``seed_input`` is one image without the batch dimension in the model's own layout,
``(C, H, W)`` for a PyTorch model and ``(H, W, C)`` for a Keras model; ``keepdims=True`` keeps
that layout. Layers: a Keras model's ``layer_idx`` indexes ``model.layers``; a PyTorch model's
indexes :func:`model_layers` (its leaf modules in definition order), and may also be a module's
dotted name or the module. A Keras model's final Dense layer is read *before* its activation
(keras-vis users swapped a final softmax for a linear activation by hand; here the
pre-activation ``inputs @ kernel + bias`` is computed from a temporary function of the model,
which is left untouched).
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from salience import reduce as _reduce
from salience import rules
from salience._core.autograd import gradients
from salience._core.errors import SalienceError, user_stacklevel
from salience._core.tensors import check_flag, check_int, model_device, model_dtype
from salience.loading.keras import import_keras, is_keras_model, layer_module_name
from salience._core.layers import resolve_layer
from salience.methods import METHODS
from salience.methods._multi import full_precision, hooked_pass, refuse_fp16_overflow
from salience.targets import Target

__all__ = [
    "visualize_saliency",
    "visualize_saliency_with_losses",
    "find_layer_idx",
    "model_layers",
    "ActivationMaximization",
    "BACKPROP_MODIFIERS",
]

BACKPROP_MODIFIERS: dict[str, str] = {"guided": "guided_backprop", "relu": "deconvnet", "rectified": "deconvnet",
                                      "deconv": "deconvnet"}
"""keras-vis backprop modifier name -> salience method name (in :data:`salience.METHODS`)."""

_EPS = 1e-7  # keras-vis's K.epsilon() in its normalize


class ActivationMaximization(Target):
    """keras-vis's loss: minus the mean output of ``filter_indices`` of ``layer`` (summed), ``(B,)``.

    ``layer``: a module or dotted name. For 2-D outputs ``(B, K)`` the loss reads ``output[:, i]``;
    for larger outputs the channel axis is ``channel_axis`` (default: -1 for a Keras layer, whose
    outputs are channels-last, 1 otherwise) and the mean is over all other axes. Use it with weight ``-1``, as keras-vis did,
    so that the gradient points where the activation grows.
    """

    def __init__(self, layer: Any, filter_indices: Union[int, Sequence[int]], *,
                 channel_axis: Optional[int] = None):
        self.layer = layer
        self.filter_indices = _indices(filter_indices)
        if channel_axis is None:  # Keras layers are channels-last, PyTorch's channels-first
            keras_layer = type(layer).__module__.split(".")[0] == "keras"
            channel_axis = -1 if keras_layer else 1
        self.channel_axis = check_int(channel_axis, "channel_axis", minimum=None, what="the axis of the layer's "
                                      "output that holds the channels: 1 for PyTorch, -1 for Keras")

    def __call__(self, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise SalienceError(f"ActivationMaximization expects a layer output (B, ...), got {type(output).__name__}")
        axis = 1 if output.dim() == 2 else self.channel_axis
        if not -output.dim() <= axis < output.dim():
            raise SalienceError(f"channel_axis {axis} is out of range for the layer's output of shape "
                                f"{tuple(output.shape)}; give the axis that holds the channels")
        n = output.shape[axis]
        loss = output.new_zeros(output.shape[0])
        for i in self.filter_indices:
            if not -n <= i < n:
                raise SalienceError(f"filter index {i} is out of range for a layer output with {n} channels/units")
            a = output.select(axis, i)
            loss = loss - a.reshape(a.shape[0], -1).mean(dim=1)
        return loss

    def __repr__(self) -> str:
        return f"ActivationMaximization({self.layer!r}, {self.filter_indices})"


def _index(i: Any) -> Optional[int]:
    """``i`` as an int if it is one (numpy's, a 0-d integer tensor or array), else ``None``: a float,
    a bool or a string is not an index (``int(0.5)`` would explain unit 0, ``int("1")`` take a string)."""
    if isinstance(i, (Tensor, np.ndarray)) and i.ndim == 0:
        i = i.item()  # a float's or a bool's item stays refused below
    if isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_)):
        return int(i)
    return None


def _indices(filter_indices: Union[int, Sequence[int], Any]) -> list[int]:
    one = _index(filter_indices)
    if one is not None:
        return [one]
    bad = SalienceError(f"filter_indices must be an int or a list of ints, got {filter_indices!r}")
    if (isinstance(filter_indices, (str, bytes)) or not isinstance(filter_indices, (Sequence, np.ndarray, Tensor))
            or getattr(filter_indices, "ndim", 1) == 0):
        raise bad
    out = [_index(i) for i in filter_indices]
    if any(i is None for i in out):
        raise bad
    if not out:
        raise SalienceError("filter_indices is empty; give at least one index")
    return out


def model_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A PyTorch model's "layers" in keras-vis's sense: its leaf modules (no children), in order,
    as ``(dotted name, module)``; ``layer_idx`` indexes this list. A Keras model's: its
    ``model.layers`` as ``(name, layer)``, which a Keras model's ``layer_idx`` indexes."""
    if is_keras_model(model):
        return [(layer.name, layer) for layer in model.layers]
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module or a keras.Model, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def find_layer_idx(model: Any, layer_name: str) -> int:
    """The index of the layer called ``layer_name``: in ``model.layers`` for a Keras model, in
    :func:`model_layers` (dotted module names) for a PyTorch model."""
    if is_keras_model(model):
        from salience.loading.keras import find_layer_idx as _find

        return _find(model, layer_name)
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module or a keras.Model, got {type(model).__name__}")
    for i, (name, _) in enumerate(model_layers(model)):
        if name == layer_name:
            return i
    names = [n for n, _ in model_layers(model)]
    raise SalienceError(f"the model has no leaf layer named {layer_name!r}; its layers are {names}")


def _pick(seq: Sequence[Any], idx: int, what: str) -> Any:
    # Not check_int: negative indices count from the end, and both ends say "out of range".
    if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
        raise SalienceError(f"layer_idx must be an int (or, for PyTorch models, a name or module), got {idx!r}")
    if not -len(seq) <= int(idx) < len(seq):
        raise SalienceError(f"layer_idx {idx} is out of range for {what} with {len(seq)} layers")
    return seq[int(idx)]


def _torch_layer(model: nn.Module, layer_idx: Any) -> nn.Module:
    if isinstance(layer_idx, (str, nn.Module)):
        return resolve_layer(model, layer_idx)
    return _pick(model_layers(model), layer_idx, "the model")[1]


def _seed_tensor(seed_input: Any) -> Tensor:
    """``seed_input`` (a tensor, array, PIL image or nested list of real numbers) as a tensor, or a SalienceError."""
    if isinstance(seed_input, Tensor):
        if seed_input.is_meta or seed_input.layout != torch.strided:
            raise SalienceError(f"seed_input must be a dense tensor with values, got a {seed_input.layout} tensor on "
                                f"{seed_input.device}; give the image's values (t.to_dense(), on the CPU or a GPU)")
        x = seed_input.detach()
    else:
        a = np.asarray(seed_input)
        if a.dtype.kind not in "biuf":
            raise SalienceError(f"seed_input must be an image of real numbers (an array, tensor or PIL image), got "
                                f"{type(seed_input).__name__} of dtype {a.dtype}")
        x = torch.from_numpy(np.array(a))  # a copy: the user's array is never written
    if x.is_complex():
        raise SalienceError("seed_input must be real, got a complex tensor; give its real part or magnitude")
    return x


def _to_batch(seed_input: Any, channels_last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """One image (no batch dimension) in the model's layout -> ``(1, C, H, W)`` float tensor, of the
    model's floating dtype ``dtype`` when given (keras-vis took any numeric array: numpy's float64 too)."""
    x = _seed_tensor(seed_input)
    if dtype is not None and dtype.is_floating_point:
        x = x.to(dtype)
    elif not x.is_floating_point():
        x = x.float()
    if x.dim() != 3:
        layout = "(H, W, C)" if channels_last else "(C, H, W)"
        raise SalienceError(
            f"seed_input must be one image {layout} without the batch dimension, got shape {tuple(x.shape)}"
        )
    if channels_last:
        x = x.permute(2, 0, 1)
    return x.unsqueeze(0).contiguous()


def _small_values(grad: Tensor) -> Tensor:
    """keras-vis's ``small_values``: ``|1 / (g + 1e-7)|`` (not :func:`salience.reduce.small_values`,
    ``1 / (|g| + eps)``: keras-vis adds its epsilon before the absolute value)."""
    return (1.0 / (grad + _EPS)).abs()


def _finish(grad: Tensor, grad_modifier: Optional[str], keepdims: bool, channel_axis: int, to_hwc: bool,
            losses: bool = False) -> np.ndarray:
    """keras-vis's tail: grad modifier, signed max over ``channel_axis`` (unless ``keepdims``), then
    the whole map scaled to ``[0, 1]``; ``to_hwc`` turns a kept ``(C, H, W)`` into ``(H, W, C)``. ``losses``: the
    map is :func:`visualize_saliency_with_losses`'s (a constant map is said in its terms)."""
    mod = _small_values if grad_modifier == "small_values" else _reduce.get_grad_modifier(grad_modifier)
    g = grad.detach().float()
    if mod is not None:
        g = mod(g)
    g = g[0]  # one image: (C, H, W), or the wrt layer's output shape
    if keepdims:
        if to_hwc and g.dim() == 3:
            g = g.permute(1, 2, 0)
    elif g.dim() >= 2:
        g = g.amax(dim=channel_axis)
    lo, hi = g.min(), g.max()
    if bool(lo == hi):
        _say_constant(grad, float(lo), grad_modifier, keepdims, losses)
    # Not _core.tensors.minmax / reduce.normalize: keras-vis adds K.epsilon() to the span (its max lands just below 1).
    return ((g - lo) / (hi - lo + _EPS)).cpu().numpy()


def _say_constant(grad: Tensor, value: float, grad_modifier: Optional[str], keepdims: bool, losses: bool) -> None:
    """A warning that the map is one value everywhere, which its scaling to [0, 1] returns as all zeros ("nothing
    salient" to the eye; keras-vis said nothing): why, as salience's command line and explorer say of a constant
    map (``render.viz.constant_map_note``; compat does not import render: its own causes, keras-vis's terms: those
    of :func:`visualize_saliency` (``filter_indices``, a layer) or, with ``losses``, of
    :func:`visualize_saliency_with_losses` (its ``losses`` and their weights))."""
    if losses:
        source, dead = "the weighted sum of the losses", ("a loss on a dead unit (its ReLU is off everywhere for this "
                                                          "seed_input: no gradient), weights that cancel the losses")
        other = "other losses or weights"
    else:
        source, dead = "the explained filter_indices", ("a dead unit (its ReLU is off everywhere for this seed_input, "
                                                       "so ActivationMaximization of it has no gradient)")
        other = "another filter_indices or layer"
    if not bool(grad.any()):
        what = (f"the saliency map is constant (zero) everywhere: no gradient reached the input (or wrt_tensor) from "
                f"{source}. Likely causes: {dead}, a zero-initialised or untrained layer, a backprop_modifier "
                "('guided', 'relu') that stops every gradient, a model in training mode. Try another seed_input, "
                f"{other}, backprop_modifier=None, and check the weights")
    else:
        after = f"grad_modifier={grad_modifier!r}" + ("" if keepdims else " and the channels' maximum")
        what = (f"the saliency map is constant ({value:.4g}) everywhere after {after}: every pixel gets the same "
                "value (e.g. grad_modifier='relu' of a gradient negative everywhere, a score that depends on the "
                f"input only through its sum). Try grad_modifier='absolute' or None, or {other}")
    warnings.warn(what + "; the map returned, scaled to [0, 1] as keras-vis did, is all zeros",
                  stacklevel=user_stacklevel())


def _rule(backprop_modifier: Optional[str]) -> Optional[str]:
    if backprop_modifier is None:
        return None
    if backprop_modifier not in BACKPROP_MODIFIERS:
        raise SalienceError(
            f"unknown backprop_modifier {backprop_modifier!r}; expected None, 'guided' or 'relu' "
            f"(aliases: {', '.join(BACKPROP_MODIFIERS)})"
        )
    return BACKPROP_MODIFIERS[backprop_modifier]


class _Weighted(Target):
    """``sum_i w_i * loss_i(output)`` for losses on the same layer: one pass, weights inside the graph."""

    def __init__(self, terms: Sequence[tuple[Target, float]]):
        self.terms = list(terms)
        self.layer = self.terms[0][0].layer

    def __call__(self, output: Tensor) -> Tensor:
        total = None
        for loss, weight in self.terms:
            v = loss(output) * weight
            total = v if total is None else total + v
        return total


def _same_layer(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, str) and a == b)


def _loss_gradient(model: nn.Module, x: Tensor, losses: Sequence[tuple[Target, float]], method: Optional[str],
                   wrt: Optional[nn.Module]) -> Tensor:
    """``d(sum_i w_i * loss_i) / d(input or wrt)``, the weights applied before differentiating (as in
    keras-vis: it matters under guided/deconvnet rules, which are not linear in the seed).

    Losses on one layer share one pass; plain gradients of losses on different layers are summed
    (gradients are linear); rules with losses on different layers are refused.
    """
    if not losses:
        raise SalienceError("losses is empty; give a list of (loss, weight) pairs")
    groups: list[list[tuple[Target, float]]] = []
    for item in losses:
        try:
            loss, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise SalienceError(f"each loss must be a (loss, weight) pair, got {item!r}") from None
        if not isinstance(loss, Target):
            raise SalienceError(
                f"a loss must be an ActivationMaximization or another salience Target, got {type(loss).__name__}"
            )
        for g in groups:
            if _same_layer(g[0][0].layer, loss.layer):
                g.append((loss, weight))
                break
        else:
            groups.append([(loss, weight)])
    if len(groups) > 1 and method is not None:
        raise SalienceError(
            f"backprop_modifier with losses on {len(groups)} different layers is not supported (the rules are "
            "not linear, so the passes cannot be added); give losses on one layer"
        )
    total: Optional[Tensor] = None
    for group in groups:
        target = _Weighted(group)
        try:
            g = _method_gradient(model, x, target, method) if wrt is None else _wrt_gradient(model, x, target, method,
                                                                                                wrt)
        except SalienceError as e:
            said = _in_keras_vis_words(e, method or "guided_backprop")
            if said is e:
                raise
            raise said from None
        total = g if total is None else total + g
    assert total is not None
    return total


def _in_keras_vis_words(e: SalienceError, method: str = "guided_backprop") -> SalienceError:
    """A rule's refusal (a pass without ReLUs, an activation it is not defined for) said to pass ``unsupported=``,
    which keras-vis's functions do not take: said as ``backprop_modifier=None``, naming salience's function of the
    modifier's rule (``method``: guided backprop's or deconvnet's); any other error as it is."""
    msg = str(e)
    msg = msg.replace(rules.NO_RECTIFIER_ADVICE, "backprop_modifier=None gives that map (the modifier acts at ReLUs "
                                                 "only)")
    msg = msg.replace(rules.UNSUPPORTED_ADVICE, "backprop_modifier=None gives the plain gradient (keras-vis's "
                                                f"functions take no unsupported=; salience.{method}(..., "
                                                "unsupported='warn') lets it through such activations only)")
    return e if msg == str(e) else SalienceError(msg)


def _method_gradient(model: nn.Module, x: Tensor, target: Target, method: Optional[str]) -> Tensor:
    """The raw input gradient of ``method`` (``None``: vanilla)."""
    return METHODS["vanilla" if method is None else method](model, x, target, reduce=None)


_WHY_WRT_TENSOR_PASSES_SKIP = {
    "compile": "wrt_tensor's layer output is read with a hook added to the layer, which a compiled graph does not "
               "see; the passes run eagerly",
    "fold_batchnorm": "the folded copy has not the model's layers (wrt_tensor's among them) to hook; the passes run "
                      "the model itself",
}


def _wrt_gradient(model: nn.Module, x: Tensor, target: Target, method: Optional[str], wrt: nn.Module) -> Tensor:
    """The gradient of ``target`` w.r.t. ``wrt``'s output, under ``method``'s rule (``None``: plain), refused as
    the methods refuse a pass without ReLUs (:meth:`salience.rules.BackpropRule.check_rectified`) where no ReLU ran
    between ``wrt`` and the target's layer: the rule changed nothing, the map was silently the plain gradient's.
    Either pass runs under the precision and layout in force (:func:`hooked_pass`; ``compile`` / ``fold_batchnorm``
    said not applied), an fp16 gradient past float16's range refused."""
    label = f"keras_vis wrt_tensor= ({method or 'plain gradient'})"  # both passes' warnings: one scheme, their own
    if method is None:
        # The input must require grad for the layer output to be part of a graph (the parameters are frozen).
        with hooked_pass(model, x, label, why=_WHY_WRT_TENSOR_PASSES_SKIP):
            g = gradients(model, x, target, layers=[wrt]).layer_grads[0]
            refuse_fp16_overflow(model, g)
        return full_precision(g, x)
    rules.check_model(model, method)
    rule = rules.guided() if method == "guided_backprop" else rules.deconvnet()
    # a ruled pass as guided backprop's: under the precision and layout set (not compiled, not folded: said)
    with hooked_pass(model, x, label, why=_WHY_WRT_TENSOR_PASSES_SKIP), rule.marking(wrt) as mark:
        g = gradients(model, x, target, layers=[wrt], extra_modes=[rule]).layer_grads[0]
        refuse_fp16_overflow(model, g)
    rule.check_rectified(since=mark[0] if mark else 0,
                         part="between wrt_tensor's layer and the explained layer")
    return full_precision(g, x)


def visualize_saliency_with_losses(
    input_tensor: Any,
    losses: Sequence[tuple[Target, float]],
    seed_input: Any,
    wrt_tensor: Any = None,
    grad_modifier: Optional[str] = "absolute",
    keepdims: bool = False,
    *,
    backprop_modifier: Optional[str] = None,
) -> np.ndarray:
    """keras-vis's ``visualize_saliency_with_losses``: the saliency of a weighted sum of losses.

    ``input_tensor``: the model (there is no symbolic input tensor in PyTorch). ``losses``: a
    list of ``(loss, weight)``; a loss is an :class:`ActivationMaximization` or any
    :class:`~salience.targets.Target` (its score is the loss); the map is the gradient of
    ``sum(weight * loss)``. ``wrt_tensor``: a layer (index, name or module) whose output the
    gradient is taken against instead of the input. Returns the normalized map (see module doc).
    """
    return _with_losses(input_tensor, losses, seed_input, wrt_tensor, grad_modifier, keepdims, backprop_modifier,
                        True)


def _with_losses(model: Any, losses: Sequence[tuple[Target, float]], seed_input: Any, wrt_tensor: Any,
                 grad_modifier: Optional[str], keepdims: bool, backprop_modifier: Optional[str],
                 said_as_losses: bool) -> np.ndarray:
    """:func:`visualize_saliency_with_losses`; ``said_as_losses``: a constant map is said in its terms (``False``:
    :func:`visualize_saliency`'s, ``filter_indices``)."""
    keepdims = check_flag(keepdims, "keepdims")
    method = _rule(backprop_modifier)
    if is_keras_model(model):
        from salience.loading.keras import wrap_keras

        wrapped = wrap_keras(model)
        wrapped.seed = True  # a fresh wrapper: its input errors name seed_input (H, W, C)
        x = _to_batch(seed_input, wrapped.channels_last).to(model_device(wrapped))
        wrt = _keras_wrt(model, model, wrapped, wrt_tensor)
        grad = _loss_gradient(wrapped, x, losses, method, wrt)
        # Input gradients are (1, C, H, W) here; a Keras layer's are channels-last already.
        axis = 0 if wrt is None or not wrapped.channels_last else -1
        return _finish(grad, grad_modifier, keepdims, axis, wrapped.channels_last and wrt is None, said_as_losses)
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module or a keras.Model, got {type(model).__name__}")
    x = _to_batch(seed_input, False, model_dtype(model)).to(model_device(model))
    wrt = None if wrt_tensor is None else _torch_layer(model, wrt_tensor)
    grad = _loss_gradient(model, x, losses, method, wrt)
    return _finish(grad, grad_modifier, keepdims, 0, False, said_as_losses)


def _keras_wrt(model: Any, sub: Any, wrapped: nn.Module, wrt_tensor: Any, explained: Any = None) -> Optional[nn.Module]:
    """The module of the Keras layer ``wrt_tensor`` in ``wrapped`` (the wrapped ``sub``, ``model`` up to the
    explained layer), or a SalienceError: the InputLayer (no pass runs through it) or a layer at or after
    the explained one (the gradient does not pass through it)."""
    if wrt_tensor is None:
        return None
    layer = _keras_layer(model, wrt_tensor)
    keras = import_keras()
    if isinstance(layer, keras.layers.InputLayer):
        raise SalienceError(f"wrt_tensor {layer.name!r} is the model's input layer; leave wrt_tensor=None for the "
                            "gradient with respect to the input")
    if not any(layer is l for l in sub.layers):
        upto = f"the explained layer {explained.name!r}" if explained is not None else "the output"
        raise SalienceError(f"wrt_tensor {layer.name!r} is not a layer between the input and {upto} (a final Dense "
                            "is read from its input, before its activation); give an earlier layer")
    return resolve_layer(wrapped, layer_module_name(layer))


def _keras_layer(model: Any, layer: Any) -> Any:
    if isinstance(layer, str):
        from salience.loading.keras import find_layer_idx as _find

        return model.layers[_find(model, layer)]
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return _pick(model.layers, layer, "the Keras model")
    if any(layer is l for l in model.layers):
        return layer
    raise SalienceError(f"expected a layer index, name or layer of the Keras model, got {layer!r}")


def visualize_saliency(
    model: Any,
    layer_idx: Any,
    filter_indices: Union[int, Sequence[int]],
    seed_input: Any,
    wrt_tensor: Any = None,
    backprop_modifier: Optional[str] = None,
    grad_modifier: Optional[str] = "absolute",
    keepdims: bool = False,
) -> np.ndarray:
    """keras-vis's ``visualize_saliency``: the normalized saliency of ``filter_indices`` of a layer.

    ``model``: a PyTorch ``nn.Module`` or a Keras 3 model (PyTorch backend). ``layer_idx``: the
    layer whose outputs ``filter_indices`` (one or several, summed) are explained: the final
    Dense/Linear for class saliency, a conv layer for filter saliency (see module doc for how
    layers are indexed). ``seed_input``: one image in the model's layout, ``(C, H, W)`` for
    PyTorch, ``(H, W, C)`` for Keras. Returns a NumPy ``(H, W)`` map in ``[0, 1]`` (or the
    gradient's own layout with ``keepdims=True``).
    """
    keepdims = check_flag(keepdims, "keepdims")
    method = _rule(backprop_modifier)
    idx = _indices(filter_indices)
    if is_keras_model(model):
        return _keras_saliency(model, layer_idx, idx, seed_input, wrt_tensor, method, grad_modifier, keepdims)
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module or a keras.Model, got {type(model).__name__}")
    from salience.loading.keras import KerasModel

    if isinstance(model, KerasModel):
        return _keras_saliency(model.keras_model, layer_idx, idx, seed_input, wrt_tensor, method, grad_modifier,
                               keepdims)
    layer = _torch_layer(model, layer_idx)
    loss = ActivationMaximization(layer, idx, channel_axis=1)
    return _with_losses(model, [(loss, -1.0)], seed_input, wrt_tensor, grad_modifier, keepdims, backprop_modifier,
                        False)


class _PreActivation(Target):
    """Minus the mean pre-activation ``h @ kernel + bias`` of units of a Keras Dense layer (a loss)."""

    def __init__(self, dense: Any, indices: list[int]):
        self.dense = dense
        self.indices = indices

    def __call__(self, h: Tensor) -> Tensor:
        z = h @ self.dense.kernel.value
        if self.dense.bias is not None:
            z = z + self.dense.bias.value
        n = z.shape[-1]
        loss = z.new_zeros(z.shape[0])
        for i in self.indices:
            if not -n <= i < n:
                raise SalienceError(f"filter index {i} is out of range for Dense layer {self.dense.name!r} with {n} units")
            loss = loss - z[..., i].reshape(z.shape[0], -1).mean(dim=1)
        return loss


def _keras_saliency(model: Any, layer_idx: Any, idx: list[int], seed_input: Any, wrt_tensor: Any,
                    method: Optional[str], grad_modifier: Optional[str], keepdims: bool) -> np.ndarray:
    keras = import_keras()
    from salience.loading.keras import KerasModel

    layer = _keras_layer(model, layer_idx)
    is_final = layer is model.layers[-1]
    linear = getattr(keras.activations, "linear", None)
    pre_activation = (is_final and isinstance(layer, keras.layers.Dense)
                      and getattr(layer, "activation", None) not in (None, linear))
    try:
        # Named as the user's model: its input errors (see KerasModel) name that model.
        sub = keras.Model(model.inputs, layer.input if pre_activation else layer.output, name=model.name)
    except (AttributeError, ValueError) as e:
        raise SalienceError(
            f"cannot build a function of the Keras model up to layer {layer.name!r} ({e}); build the model with "
            "keras.Input(shape=...) so that its layers have symbolic inputs and outputs"
        ) from None
    channels_last = keras.config.image_data_format() == "channels_last"
    wrapped = KerasModel(sub, channels_last=channels_last, seed=True)
    loss: Target = _PreActivation(layer, idx) if pre_activation else ActivationMaximization(
        None, idx, channel_axis=-1 if channels_last else 1)
    x = _to_batch(seed_input, channels_last).to(model_device(wrapped))
    wrt = _keras_wrt(model, sub, wrapped, wrt_tensor, layer)
    grad = _loss_gradient(wrapped, x, [(loss, -1.0)], method, wrt)
    axis = 0 if wrt is None or not channels_last else -1
    return _finish(grad, grad_modifier, keepdims, axis, channels_last and wrt is None)
