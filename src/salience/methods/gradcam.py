"""Grad-CAM and Guided Grad-CAM (Selvaraju et al. 2017).

Grad-CAM weighs each channel ``k`` of a layer's output ``A`` ``(B, K, h, w)`` by the spatial
mean of the target score's gradient there, ``w_k = mean_ij dS/dA_kij``, and keeps the positive
part of the weighted sum, ``ReLU(sum_k w_k A_k)`` ``(B, h, w)``, upsampled to the input's size
with bilinear interpolation, ``align_corners=False`` (Captum's ``LayerAttribution.interpolate
(..., "bilinear")``; OpenCV's ``INTER_LINEAR`` as used by pytorch-grad-cam). Values are raw, not
scaled: display scaling belongs to :func:`salience.reduce.normalize` / ``viz``. The layer, when none is given, is
:func:`default_layer`'s (its search lives in :mod:`salience.methods._layer_search`; the names are importable here).

Guided Grad-CAM multiplies guided backpropagation ``(B, C, H, W)`` by the upsampled Grad-CAM map.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from salience._core import derived as _derived
from salience._core import engine as _engine
from salience import rules
from salience._core.autograd import backward, check_input
from salience._core.errors import SalienceError
from salience._core.layers import LayerSpec, layer_name, resolve_layer
from salience._core.tensors import check_flag, upsample_bilinear
from salience.reduce import GradModifier, Reduction
from salience.targets import TargetLike, split
from salience.methods._multi import (checked, finish, full_precision, hooked_pass, refuse_fp16_overflow,
                                     several_targets)
from salience.methods._layer_search import _pick_default, default_layer, default_layer_readable, describe_default_layer
from salience.methods._tokens import Layout, layer_layout, one_model

__all__ = ["gradcam", "guided_gradcam", "default_layer", "describe_default_layer", "default_layer_readable",
           "gradient_cam", "resolve_cam_layer", "grid_layout", "upsample_maps"]


def resolve_cam_layer(model: nn.Module, x: Tensor, layer: Optional[LayerSpec], *, checked: bool = False) -> nn.Module:
    """The module of ``layer`` (default: :func:`default_layer`), refused on TorchScript (no hooks). ``checked``:
    the caller checked ``x`` (:func:`~salience._core.autograd.check_input`; every CAM does, first), so the
    default-layer search does not test it again."""
    if not isinstance(model, nn.Module):  # the default-layer search's raw "'NoneType' has no attribute 'named_modules'"
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError(
            "Grad-CAM and the other CAMs read a layer's output with a forward hook, which a TorchScript model "
            "(torch.jit.ScriptModule) does not support; pass the original Python nn.Module"
        )
    if layer is None:
        layer = _pick_default(model, x, checked=checked)[0]
    mod = resolve_layer(model, layer)
    if isinstance(mod, torch.jit.ScriptModule):
        raise SalienceError(
            f"the CAM layer {layer!r} is a TorchScript module, which does not support forward hooks; "
            "pass a Python (non-scripted) layer"
        )
    return mod


def grid_layout(model: nn.Module, mod: nn.Module, acts: Tensor, x: Tensor, grid: object,
                prefix_tokens: object) -> Layout:
    """How the layer's output ``acts`` becomes ``(B, K, h, w)`` (see :mod:`salience.methods._tokens`)."""
    try:
        name = layer_name(model, mod)
    except SalienceError:
        name = type(mod).__name__
    if acts.dim() in (3, 4) and x.dim() > 0 and int(acts.shape[0]) != int(x.shape[0]):
        # a sequence-first (N, B, D) read as (B, N, D) indexed past the images (a raw IndexError, session 45's review)
        raise SalienceError(
            f"the CAM layer {name!r} gives shape {tuple(acts.shape)}, whose first axis ({acts.shape[0]}) is not the "
            f"{x.shape[0]} images': a sequence-first output (N, B, D) (nn.MultiheadAttention or nn.Transformer* "
            "without batch_first=True) cannot be read as a grid; pass layer= a batch-first layer (B, N, D) or "
            "(B, K, h, w), or build the model with batch_first=True")
    return layer_layout(model, mod, acts.shape, x.shape, grid=grid, prefix_tokens=prefix_tokens,
                        what=f"the CAM layer {name!r}")


def _gradcam_map(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM before its ReLU: ``sum_k mean_ij(G_k) A_k``, ``(B, K, h, w)`` x 2 -> ``(B, h, w)``."""
    return (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1)


def upsample_maps(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, K, h, w)`` -> ``(B, K, H, W)`` by Grad-CAM's bilinear upsampling (see the module doc)."""
    b, k = cam.shape[:2]
    return upsample_bilinear(cam.flatten(0, 1), size).unflatten(0, (b, k))


@one_model()  # one trace of the model's grids for the default layer and the layout
def gradient_cam(
    model: nn.Module,
    x: Tensor,
    target: TargetLike,
    combine: Callable[[Tensor, Tensor], Tensor],
    *,
    layer: Optional[LayerSpec],
    upsample: bool,
    relu: bool,
    strip_softmax: bool,
    grid: Optional[tuple[int, int]],
    prefix_tokens: Optional[int],
    method: str = "gradcam",
) -> Tensor:
    """A gradient CAM of one or K targets: ``combine(A, G)`` ``(B, D, h, w)`` x 2 -> ``(B, h, w)``
    for each target's layer gradient ``G``, then the ReLU (``relu``) and the upsampling. ``method``: its name in
    the warnings of performance options not applied (:func:`~salience.methods._multi.hooked_pass`).

    One forward pass, one backward per target down to the layer only (the engine's
    :func:`~salience._core.engine.layer_gradients`); the layer's output read as a grid by
    :mod:`salience.methods._tokens`. Returns ``(B, H, W)``, or ``(B, K, H, W)`` for K targets.
    """
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    mod = resolve_cam_layer(model, x, layer, checked=True)
    # One forward pass; one backward pass per target, down to the layer only (the engine's backward() runs a
    # checkpoint as a plain call: a layer inside a reentrant one has no gradient in the forward pass otherwise).
    with hooked_pass(model, x, method):  # precision (autocast) applies; compile does not
        acts, grads = _engine.layer_gradients(model, x, targets, mod, strip_softmax=strip_softmax)
        refuse_fp16_overflow(model, grads)
    layout = grid_layout(model, mod, acts, x, grid, prefix_tokens)
    acts, grads = full_precision(layout.to_grid(acts), x), full_precision(layout.to_grid(grads), x)
    cam = torch.stack([combine(acts, g) for g in grads], dim=1)  # (B, K, h, w)
    if relu:
        cam = cam.clamp(min=0)
    if upsample:
        cam = upsample_maps(cam, tuple(x.shape[-2:]))
    return cam if multi else cam[:, 0]


@checked  # the public method: a call its signature refuses is an ArgumentError
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
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
) -> Tensor:
    """Grad-CAM: a layer's channels weighted by the target's mean gradient, ReLU, upsampled.

    ``layer``: a module or dotted name (default: see :func:`default_layer`). ``x``: ``(B, C, H, W)``;
    returns raw values ``(B, H, W)``, or ``(B, h, w)`` at the layer's resolution with
    ``upsample=False``. ``relu=False`` keeps the negative part of the weighted sum (Captum's
    ``relu_attributions=False``). ``target`` and ``strip_softmax`` as in :func:`salience.vanilla`.

    The layer's output may be a map ``(B, K, h, w)``, channels-last ``(B, h, w, K)`` (Swin,
    ConvNeXt's blocks, Keras) or tokens ``(B, N, D)`` (a ViT block): tokens are read as
    ``prefix_tokens`` class / distillation / register tokens, then a ``grid=(h, w)`` of patches;
    both are inferred from the patch embedding when not given (rules in
    :mod:`salience.methods._tokens`). The model comes back exactly as it was.
    """
    upsample = check_flag(upsample, "upsample")
    relu = check_flag(relu, "relu")
    return gradient_cam(model, x, target, _gradcam_map, layer=layer, upsample=upsample, relu=relu,
                        strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens)


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
@one_model()  # one trace of the model's grids for the default layer and the layout
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
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
) -> Tensor:
    """Guided Grad-CAM: guided backprop ``(B, C, H, W)`` times the upsampled Grad-CAM map.

    Returns ``(B, H, W)`` (``reduce="max_abs"``) or the raw product ``(B, C, H, W)`` with
    ``reduce=None``. Options (``layer``, ``grid``, ``prefix_tokens``) as in :func:`gradcam` and
    :func:`salience.guided_backprop`.

    One forward and backward pass serves both parts when no ReLU runs after ``layer`` (e.g.
    resnet's ``layer4`` followed by pooling and one linear layer): then the layer's gradient
    under the guided rule *is* the plain gradient that Grad-CAM's weights need. Otherwise (e.g.
    vgg, whose classifier has ReLUs) the guided rule changes the layer's gradient, so Grad-CAM
    takes a second, plain pass. Several targets share those passes (one forward each, one
    backward per target).
    """
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    mod = resolve_cam_layer(model, x, layer, checked=True)
    rules.check_model(model, "guided Grad-CAM")
    rule = rules.guided(unsupported=unsupported)
    # the passes' deferred checks and the product's finiteness: one synchronization, when the scope ends
    with _derived.run_scope() as scope:
        # One ruled pass gives all K targets' guided input gradients and the layer's gradients.
        with hooked_pass(model, x, "guided_gradcam"), rule.marking(mod) as mark:  # precision applies, compile not
            g = backward(model, x, targets, layers=[mod], strip_softmax=strip_softmax, extra_modes=[rule])
            assert g.inputs is not None
            rule.check_rectified()  # a model without ReLUs: Grad-CAM times vanilla's gradient, not guided backprop's
            acts, layer_grads = g.activations[0], g.layer_grads[0]
            if not (mark and mark[0] == rule.rectified):
                # ReLUs ran after the layer: the rule changed its gradient; Grad-CAM needs the plain one.
                acts, layer_grads = _engine.layer_gradients(model, x, targets, mod, strip_softmax=strip_softmax)
            refuse_fp16_overflow(model, g.inputs, layer_grads)
        layout = grid_layout(model, mod, acts, x, grid, prefix_tokens)
        acts, layer_grads = full_precision(layout.to_grid(acts), x), full_precision(layout.to_grid(layer_grads), x)
        cams = torch.stack([_gradcam_map(acts, lg).clamp(min=0) for lg in layer_grads], dim=1)  # (B, K, h, w)
        cams = upsample_maps(cams, tuple(x.shape[-2:]))
        guided = g.inputs.transpose(0, 1)  # (B, K, C, H, W)
        product = guided * cams.unsqueeze(2)
        # the factors' largest values (0-d, on the device; a SmoothGrad of this keeps each call's, not its maps)
        sizes = scope.once("guided_gradcam:sizes", list)
        sizes.append(torch.stack([guided.detach().abs().amax(), cams.detach().amax()]))
        dtype = product.dtype  # not the product: the action waits for the call's end (a SmoothGrad's, chunks later)
        scope.defer("finite:guided_gradcam", ~torch.isfinite(product).all(), lambda: _refuse_overflow(sizes, dtype))
    return finish(product, grad_modifier, reduce, multi, targets)


def _refuse_overflow(sizes: list[Tensor], dtype: torch.dtype) -> None:
    """Guided Grad-CAM's product is not finite: a :class:`SalienceError` saying which factor is not, or by how much
    their product exceeds ``dtype`` (the model's outputs near its largest value: each map finite, their product
    not), and what to do. ``sizes``: each pass's largest ``|guided backprop|`` and Grad-CAM value."""
    g, c = torch.stack(sizes).double().amax(0).tolist()
    if not (math.isfinite(g) and math.isfinite(c)):
        which = "guided backprop's map" if not math.isfinite(g) else "Grad-CAM's map"
        raise SalienceError(f"Guided Grad-CAM's map is not finite: {which} is NaN or infinite itself in {dtype} (the "
                            "model's gradients overflow); scale the model's output down, or explain a float64 copy")
    raise SalienceError(
        f"Guided Grad-CAM's map is not finite in {dtype}: guided backprop's map reaches {g:.3g} and Grad-CAM's "
        f"{c:.3g}, each finite, but their product ({g * c:.3g}) exceeds {dtype}'s largest value "
        f"{torch.finfo(dtype).max:.3g}; explain a float64 copy, salience.guided_gradcam(copy.deepcopy(model).double(), "
        "x.double(), ...), or scale the model's output down")
