"""The gradient CAMs beside Grad-CAM, and Eigen-CAM.

Each reads a layer's output ``A`` ``(B, K, h, w)`` (a map, channels-last, or a transformer's
tokens, read as in :func:`salience.gradcam`) and, for the gradient CAMs, the target score's gradient
``G = dS/dA`` there; ``S_k = sum_ab A_kab``:

* Grad-CAM++ (Chattopadhyay et al. 2018, Eq. 19 with the exponential): ``alpha_kij = G^2 /
  (2 G^2 + S_k G^3) = 1 / (2 + S_k G_kij)`` where ``G_kij != 0`` (else 0), ``w_k = sum_ij alpha_kij
  ReLU(G_kij)``, map ``ReLU(sum_k w_k A_k)``;
* HiResCAM (Draelos & Carin 2020): ``ReLU(sum_k G_k * A_k)``, element-wise;
* XGrad-CAM (Fu et al. 2020): ``w_k = sum_ij (A_kij / S_k) G_kij`` (0 where ``S_k = 0``), map
  ``ReLU(sum_k w_k A_k)``;
* LayerCAM (Jiang et al. 2021): ``ReLU(sum_k ReLU(G_k) * A_k)``; with several layers, each layer's
  map is scaled as the paper's Eq. 9, ``tanh(gamma * M / max M)``, and they are fused by the
  element-wise maximum;
* Eigen-CAM (Muhammad & Yeasin 2020): no target and no gradient; the projection of each position's
  activations ``(h w, K)`` on their first principal direction (first right-singular vector).

Values are raw (not min-max scaled), upsampled like Grad-CAM. ``docs/methods-cams.md`` says where
and why they differ from pytorch-grad-cam.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from salience._core.autograd import backward, check_input, layer_output
from salience._core.errors import SalienceError
from salience._core.layers import LayerSpec
from salience._core.tensors import check_flag
from salience.targets import TargetLike, split
from salience.methods._multi import (checked, full_precision, hooked_pass, refuse_fp16_overflow, several_targets,
                                     target_free, warn_unapplied)
from salience.methods.gradcam import gradient_cam, grid_layout, resolve_cam_layer, upsample_maps
from salience.methods._tokens import one_model

__all__ = ["gradcam_plus_plus", "hirescam", "xgradcam", "layercam", "eigencam"]

LayerOrLayers = Union[LayerSpec, Sequence[LayerSpec], None]


def _plus_plus_map(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ before its ReLU, ``(B, K, h, w)`` x 2 -> ``(B, h, w)``. ``G^2 / (2 G^2 + S G^3)`` is
    computed as ``1 / (2 + S G)``: the same where ``G != 0``, and no ``G^3`` to underflow."""
    s = acts.sum(dim=(2, 3), keepdim=True)
    denom = 2 + s * grads
    alpha = torch.where((grads != 0) & (denom != 0), 1 / denom, torch.zeros_like(denom))
    weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def _hires_map(acts: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM before its ReLU: ``sum_k G_k * A_k``."""
    return (grads * acts).sum(dim=1)


def _xgrad_map(acts: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM before its ReLU: ``sum_k (sum_ij A_kij G_kij / S_k) A_k``, a channel with ``S_k = 0`` weighing 0."""
    s = acts.sum(dim=(2, 3), keepdim=True)
    num = (acts * grads).sum(dim=(2, 3), keepdim=True)
    weights = torch.where(s != 0, num / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return (weights * acts).sum(dim=1)


def _layer_map(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM before its ReLU: ``sum_k ReLU(G_k) * A_k``."""
    return (grads.clamp(min=0) * acts).sum(dim=1)


_DOC_OPTIONS = """
    ``layer``: a module or dotted name (default: Grad-CAM's, :func:`salience.methods.gradcam.default_layer`;
    maps, channels-last maps and transformer tokens, with ``grid`` / ``prefix_tokens`` as in
    :func:`salience.gradcam`). ``x``: ``(B, C, H, W)``; returns raw values ``(B, H, W)`` (``(B, K, H, W)``
    for K targets, from one forward pass and K backward passes down to the layer), or at the layer's
    resolution with ``upsample=False``. ``relu=False`` keeps the negative part of the map. ``target``
    and ``strip_softmax`` as in :func:`salience.vanilla`. The model comes back exactly as it was."""


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def gradcam_plus_plus(
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
    """Grad-CAM++: channels weighted by the positive gradients, each scaled by ``1 / (2 + S_k G)``."""
    upsample = check_flag(upsample, "upsample")
    relu = check_flag(relu, "relu")
    return gradient_cam(model, x, target, _plus_plus_map, layer=layer, upsample=upsample, relu=relu,
                        strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens, method='gradcam_plus_plus')


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def hirescam(
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
    """HiResCAM: the gradient times the activation, summed over channels (no spatial averaging)."""
    upsample = check_flag(upsample, "upsample")
    relu = check_flag(relu, "relu")
    return gradient_cam(model, x, target, _hires_map, layer=layer, upsample=upsample, relu=relu,
                        strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens, method='hirescam')


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def xgradcam(
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
    """XGrad-CAM: channels weighted by their activation-weighted mean gradient ``sum_ij A G / sum_ij A``."""
    upsample = check_flag(upsample, "upsample")
    relu = check_flag(relu, "relu")
    return gradient_cam(model, x, target, _xgrad_map, layer=layer, upsample=upsample, relu=relu,
                        strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens, method='xgradcam')


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def layercam(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    layer: LayerOrLayers = None,
    upsample: bool = True,
    relu: bool = True,
    gamma: Optional[float] = None,
    strip_softmax: bool = True,
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
) -> Tensor:
    """LayerCAM: the positive gradient times the activation, element-wise; several layers fused.

    ``layer`` may be a list of layers: one forward pass and one backward per target give every
    layer's map; each is upsampled (to the input, or without upsampling to the largest layer's
    size), scaled per image as the paper's Eq. 9, ``tanh(gamma * M / max |M|)`` (a map that is all 0
    stays 0), and fused by the element-wise maximum: values in ``[0, tanh(gamma)]``, no longer raw.
    ``gamma``: the scaling's slope (``None``: the paper's 2); it scales only a list of layers, and given
    with one layer it is refused (it would change nothing: an option silently lost).
    """
    upsample = check_flag(upsample, "upsample")
    relu = check_flag(relu, "relu")
    if isinstance(layer, (list, tuple)):
        gamma = 2.0 if gamma is None else gamma
        return _fused_layercam(model, x, target, list(layer), upsample=upsample, relu=relu, gamma=gamma,
                               strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens)
    if gamma is not None:
        raise SalienceError(f"gamma={gamma!r} scales LayerCAM's maps only where several layers are fused "
                            "(layer=[...]); with one layer it would change nothing: leave gamma out, or pass a list "
                            "of layers")
    return gradient_cam(model, x, target, _layer_map, layer=layer, upsample=upsample, relu=relu,
                        strip_softmax=strip_softmax, grid=grid, prefix_tokens=prefix_tokens, method='layercam')


for _f in (gradcam_plus_plus, hirescam, xgradcam, layercam):  # the checked function and its implementation
    _f.__doc__ = _f.__wrapped__.__doc__ = (_f.__doc__ or "") + "\n" + _DOC_OPTIONS


@one_model()  # one trace of the model's grids for the default layer and the layout
def _fused_layercam(model: nn.Module, x: Tensor, target: TargetLike, layers: list[LayerSpec], *, upsample: bool,
                    relu: bool, gamma: float, strip_softmax: bool, grid: Optional[tuple[int, int]],
                    prefix_tokens: Optional[int]) -> Tensor:
    """LayerCAM over several layers (see :func:`layercam`): ``(B, H, W)`` or ``(B, K, H, W)``."""
    check_input(x, model)
    if not layers:
        raise SalienceError("layer=[] names no layer; give one layer, or a list of layers to fuse")
    # up to float's largest, not inf: an int past it (10**400) passed and was float()'s raw OverflowError below
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= sys.float_info.max:
        raise SalienceError(f"gamma must be a positive finite number (the paper's is 2), got {gamma!r}")
    gamma = float(gamma)  # an int past 2**63 was torch's raw OverflowError in gamma * ratio
    targets, multi = split(target, x.shape[0])
    mods = [resolve_cam_layer(model, x, spec, checked=True) for spec in layers]
    with hooked_pass(model, x, "layercam"):  # precision (autocast) applies; compile does not
        g = backward(model, x, targets, layers=mods, input_grad=False, strip_softmax=strip_softmax)
        refuse_fp16_overflow(model, *g.layer_grads)
    maps = []
    for mod, acts, grads in zip(mods, g.activations, g.layer_grads):
        layout = grid_layout(model, mod, acts, x, grid, prefix_tokens)
        a, gr = full_precision(layout.to_grid(acts), x), full_precision(layout.to_grid(grads), x)
        cam = torch.stack([_layer_map(a, gk) for gk in gr], dim=1)  # (B, K, h, w)
        maps.append(cam.clamp(min=0) if relu else cam)
    size = tuple(x.shape[-2:]) if upsample else (max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps))
    fused = None
    for cam in maps:
        cam = upsample_maps(cam, size)
        peak = cam.abs().amax(dim=(2, 3), keepdim=True)
        ratio = cam / torch.where(peak > 0, peak, torch.ones_like(peak))
        # a gamma past float32's range is inf in the product: 0 * inf was NaN where the map is 0 (tanh(0) = 0)
        scaled = torch.where(ratio == 0, ratio, torch.tanh(gamma * ratio))
        fused = scaled if fused is None else torch.maximum(fused, scaled)
    assert fused is not None
    return fused if multi else fused[:, 0]


@checked  # the public method: a call its signature refuses is an ArgumentError
@target_free
@one_model()  # one trace of the model's grids for the default layer and the layout
def eigencam(
    model: nn.Module,
    x: Tensor,
    target: None = None,
    *,
    layer: Optional[LayerSpec] = None,
    center: bool = False,
    upsample: bool = True,
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
) -> Tensor:
    """Eigen-CAM: a layer's activations projected on their first principal direction; no target.

    Per image, the activations as a matrix ``M`` ``(h w, K)`` (positions x channels) and its first
    right-singular vector ``v``: the map is ``M v`` ``(h, w)``, upsampled like Grad-CAM. One forward
    pass in inference mode, stopped at the layer; no gradient. ``center=True`` subtracts each
    channel's mean over the positions first (pytorch-grad-cam does). An SVD's sign is arbitrary: it is
    chosen so that the map's largest magnitude is positive (the sign correction of Seg-Eigen-CAM, Chung
    & Ying 2025, Eq. 13); uncentered non-negative activations (after a ReLU) give a map ``>= 0``.
    Signed raw values ``(B, H, W)`` (``(B, h, w)`` with ``upsample=False``). ``target`` must be None:
    the map is the same for every class. ``layer``, ``grid``, ``prefix_tokens`` as in
    :func:`salience.gradcam`. The model comes back exactly as it was.

    The registry entry (``salience.METHODS["eigencam"]``, :func:`salience.methods.as_method`) takes a
    target and refuses a wrong one as every method does; a class target is checked against the
    model's output, so there the one pass runs on past the layer to the output instead of stopping
    (the layers after it cost that much more; no second pass, the same map). The model's class names
    are not trusted for the number of outputs. See docs/methods-cams.md.
    """
    center = check_flag(center, "center")
    upsample = check_flag(upsample, "upsample")
    if target is not None:
        raise SalienceError(
            "eigencam takes no target: its map is the first principal component of the layer's activations, "
            f"the same for every class; call eigencam(model, x) (got target={target!r}). For a class's map use "
            "gradcam, hirescam, layercam ..."
        )
    check_input(x, model)
    mod = resolve_cam_layer(model, x, layer, checked=True)
    # its pass (layer_output's, under its own guard, which turns a caller's autocast off) takes no option: said
    warn_unapplied("eigencam", model, ("compile", "fold_batchnorm", "precision", "memory_format"))
    acts = layer_output(model, x, mod)
    try:
        layout = grid_layout(model, mod, acts, x, grid, prefix_tokens)
    except SalienceError as e:  # a layer without channels: say which method asked
        raise SalienceError(str(e).replace("Grad-CAM and the other CAMs need", "Eigen-CAM needs")) from None
    a = layout.to_grid(acts)  # (B, K, h, w)
    h, w = a.shape[-2:]
    cam = _first_component(a.flatten(2).transpose(1, 2), center)  # (B, h w)
    cam = cam.unflatten(1, (h, w)).to(a.dtype)
    return upsample_maps(cam.unsqueeze(1), tuple(x.shape[-2:]))[:, 0] if upsample else cam


def _first_component(m: Tensor, center: bool) -> Tensor:
    """``M v`` for each ``M`` ``(B, n, K)`` (positions x channels), ``v`` its first right-singular vector,
    signed so that the largest magnitude of ``M v`` is positive; float64 ``(B, n)`` (float32 on MPS).

    From the smaller Gram matrix in float64 (``M M^T`` ``(n, n)``: ``M v = sqrt(lambda_1) u_1``; or
    ``M^T M`` ``(K, K)``: ``v = v_1``): the same vector as the SVD, ~30x faster than ``torch.linalg.svd``
    on CPU for resnet50's ``(49, 2048)``."""
    m = m.to(torch.float32 if m.device.type == "mps" else torch.float64)  # MPS has no float64
    if center:
        m = m - m.mean(dim=1, keepdim=True)
    if m.shape[1] <= m.shape[2]:
        vals, vecs = torch.linalg.eigh(m @ m.transpose(1, 2))
        proj = vecs[..., -1] * vals[..., -1:].clamp(min=0).sqrt()
    else:
        _, vecs = torch.linalg.eigh(m.transpose(1, 2) @ m)
        proj = (m @ vecs[..., -1:]).squeeze(-1)
    flip = proj.amin(dim=1, keepdim=True).abs() > proj.amax(dim=1, keepdim=True).abs()
    return torch.where(flip, -proj, proj)
