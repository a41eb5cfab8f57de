"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017).

Grad-CAM weighs each channel ``k`` of a layer's output ``A`` ``(B, K, h, w)`` by the spatial
mean of the target score's gradient there, ``w_k = mean_ij dS/dA_kij``, and keeps the positive
part of the weighted sum, ``ReLU(sum_k w_k A_k)`` ``(B, h, w)``, upsampled to the input's size
with bilinear interpolation, ``align_corners=False`` (Captum's ``LayerAttribution.interpolate
(..., "bilinear")``; OpenCV's ``INTER_LINEAR`` as used by pytorch-grad-cam). Values are raw, not
scaled: display scaling belongs to :func:`salience.reduce.normalize` / ``viz``.

Guided Grad-CAM multiplies guided backpropagation ``(B, C, H, W)`` by the upsampled Grad-CAM map.
"""
from __future__ import annotations

import collections
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core import engine as _engine
from salience import rules
from salience._core.autograd import backward, check_input
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.layers import LayerSpec, layer_name, resolve_layer
from salience.reduce import GradModifier, Reduction
from salience.targets import TargetLike, split
from salience.methods._multi import finish, several_targets

__all__ = ["gradcam", "guided_gradcam", "default_layer"]

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d)


def default_layer(model: nn.Module, x: Tensor) -> str:
    """The dotted name of the layer Grad-CAM uses when none is given.

    In order: ``model.salience_default_layer`` (a name or a module), ``model_info(model)
    .default_layer`` (set by :func:`salience.load_model`), else a heuristic from one forward
    pass of ``x[:1]`` without gradients: the module that *finished last* among those whose output
    is a 4-D ``(B, K, h, w)`` tensor, leaving out pooling layers, containers whose output is a
    pooling layer's, and modules called more than once; modules with ``h * w > 1`` are
    preferred. A container is preferred to its last child (it finishes later). This gives
    torchvision's resnet ``layer4``, densenet / mobilenet / efficientnet ``features``, and vgg
    the last ReLU of ``features`` (before the final max-pool).
    """
    attr = getattr(model, "salience_default_layer", None)
    if attr is not None:
        return attr if isinstance(attr, str) else layer_name(model, resolve_layer(model, attr))
    info_layer = model_info(model).default_layer
    if info_layer:
        resolve_layer(model, info_layer)
        return info_layer
    check_input(x, model)
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError("cannot look inside a TorchScript model for a Grad-CAM layer; pass the Python nn.Module")
    calls: list[tuple[str, nn.Module, Any]] = []
    counts: collections.Counter = collections.Counter()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            counts[name] += 1
            calls.append((name, module, output))
        return hook

    handles = []
    try:
        for name, m in model.named_modules():
            if name and not isinstance(m, torch.jit.ScriptModule):
                handles.append(m.register_forward_hook(make_hook(name)))
        with model_guard(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    pooled = {id(out) for _, m, out in calls if isinstance(m, _POOLS)}
    cands = [(name, out) for name, m, out in calls
             if counts[name] == 1 and isinstance(out, Tensor) and out.dim() == 4
             and not isinstance(m, _POOLS) and id(out) not in pooled]
    spatial = [c for c in cands if _channels_first(model, c[1]).shape[-2:].numel() > 1]
    chosen = spatial or cands
    if not chosen:
        raise SalienceError(
            "found no layer with a 4-D (B, K, h, w) output to use for Grad-CAM; pass layer= (a module or a "
            "dotted name from model.named_modules()) with a spatial output"
        )
    return chosen[-1][0]


def _resolve(model: nn.Module, x: Tensor, layer: Optional[LayerSpec]) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError(
            "Grad-CAM reads a layer's output with a forward hook, which a TorchScript model "
            "(torch.jit.ScriptModule) does not support; pass the original Python nn.Module"
        )
    if layer is None:
        layer = default_layer(model, x)
    mod = resolve_layer(model, layer)
    if isinstance(mod, torch.jit.ScriptModule):
        raise SalienceError(
            f"the Grad-CAM layer {layer!r} is a TorchScript module, which does not support forward hooks; "
            "pass a Python (non-scripted) layer"
        )
    return mod


def _channels_first(model: nn.Module, t: Tensor) -> Tensor:
    """A layer output of a channels-last model (a Keras model, ``ModelInfo.layout == "NHWC"``:
    its layers give ``(B, h, w, K)``) as ``(B, K, h, w)``; other models' outputs as they are."""
    if t.dim() == 4 and model_info(model).layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    return t


def _cam(model: nn.Module, acts: Tensor, grads: Tensor, relu: bool) -> Tensor:
    """``ReLU(sum_k mean_ij(G_k) A_k)``: ``(B, K, h, w)`` x 2 -> ``(B, h, w)`` (channels-last
    layer outputs of ``model`` are read as such)."""
    acts, grads = _channels_first(model, acts), _channels_first(model, grads)
    if acts.dim() != 4:
        raise SalienceError(
            f"Grad-CAM needs a layer whose output is (B, K, h, w); the chosen layer gives shape "
            f"{tuple(acts.shape)}. Pass layer= a convolutional block (see model.named_modules())"
        )
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * acts).sum(dim=1)
    return cam.clamp(min=0) if relu else cam


def _upsample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


@several_targets
def gradcam(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    layer: Optional[LayerSpec] = None,
    upsample: bool = True,
    relu: bool = True,
    strip_softmax: bool = True,
) -> Tensor:
    """Grad-CAM: a layer's channels weighted by the target's mean gradient, ReLU, upsampled.

    ``layer``: a module or dotted name (default: see :func:`default_layer`). ``x``: ``(B, C, H, W)``; returns raw values ``(B, H, W)``, or ``(B, h, w)`` at the layer's
    resolution with ``upsample=False``. ``relu=False`` keeps the negative part of the weighted
    sum (Captum's ``relu_attributions=False``). ``target`` and ``strip_softmax`` as in
    :func:`salience.vanilla`. The model comes back exactly as it was.
    """
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    mod = _resolve(model, x, layer)
    # One forward pass; one backward pass per target, down to the layer only.
    acts, grads = _engine.layer_gradients(model, x, targets, mod, strip_softmax=strip_softmax)
    cam = torch.stack([_cam(model, acts, g, relu) for g in grads], dim=1)  # (B, K, h, w)
    if upsample:
        b, k = cam.shape[:2]
        cam = _upsample(cam.flatten(0, 1), tuple(x.shape[-2:])).unflatten(0, (b, k))
    return cam if multi else cam[:, 0]


@contextmanager
def _rectified_before(module: nn.Module, rule: rules.BackpropRule) -> Iterator[list]:
    """Record how many rectifiers the rule had taken over when ``module`` first returned."""
    mark: list[int] = []

    def hook(m: nn.Module, inputs: Any, output: Any) -> None:
        if not mark:
            mark.append(rule.rectified)

    handle = module.register_forward_hook(hook)
    try:
        yield mark
    finally:
        handle.remove()


@several_targets
def guided_gradcam(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    layer: Optional[LayerSpec] = None,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    unsupported: str = "error",
    strip_softmax: bool = True,
) -> Tensor:
    """Guided Grad-CAM: guided backprop ``(B, C, H, W)`` times the upsampled Grad-CAM map.

    Returns ``(B, H, W)`` (``reduce="max_abs"``) or the raw product ``(B, C, H, W)`` with
    ``reduce=None``. Options as in :func:`gradcam` and :func:`salience.guided_backprop`.

    One forward and backward pass serves both parts when no ReLU runs after ``layer`` (e.g.
    resnet's ``layer4`` followed by pooling and one linear layer): then the layer's gradient
    under the guided rule *is* the plain gradient that Grad-CAM's weights need. Otherwise (e.g.
    vgg, whose classifier has ReLUs) the guided rule changes the layer's gradient, so Grad-CAM
    takes a second, plain pass. Several targets share those passes (one forward each, one
    backward per target).
    """
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    mod = _resolve(model, x, layer)
    rules.check_model(model, "guided Grad-CAM")
    rule = rules.guided(unsupported=unsupported)
    # One ruled pass gives all K targets' guided input gradients and the layer's gradients.
    with _rectified_before(mod, rule) as mark:
        g = backward(model, x, targets, layers=[mod], strip_softmax=strip_softmax, extra_modes=[rule])
    assert g.inputs is not None
    acts, layer_grads = g.activations[0], g.layer_grads[0]
    if not (mark and mark[0] == rule.rectified):
        # ReLUs ran after the layer: the rule changed its gradient; Grad-CAM needs the plain one.
        acts, layer_grads = _engine.layer_gradients(model, x, targets, mod, strip_softmax=strip_softmax)
    cams = torch.stack([_cam(model, acts, lg, relu=True) for lg in layer_grads], dim=1)  # (B, K, h, w)
    b, k = cams.shape[:2]
    cams = _upsample(cams.flatten(0, 1), tuple(x.shape[-2:])).unflatten(0, (b, k))
    return finish(g.inputs.transpose(0, 1) * cams.unsqueeze(2), grad_modifier, reduce, multi, targets)
