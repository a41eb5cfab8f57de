"""Baselines that do not look at the model: :func:`spectral_residual` (Hou and Zhang, 2007),
:func:`sobel_edges` (the image's edge strength), :func:`center_maps` (a centred Gaussian: photos
put their subject in the middle) and :func:`random_maps`. A method that does not beat them says
little about the model.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from salience._core.errors import SalienceError
from salience._core.tensors import check_int, check_number, minmax
from salience._core.tensors import gaussian_kernel1d
from salience.evidence._checks import check_finite, check_seed

__all__ = ["spectral_residual", "sobel_edges", "center_maps", "random_maps"]


def spectral_residual(images: Tensor, *, size: int = 64, blur_size: int = 5, blur_sigma: float = 8.0) -> Tensor:
    """Spectral-residual saliency (Hou and Zhang, 2007): a model-free baseline, ``(B, H, W)``.

    Each image ``(B, C, H, W)`` is turned to gray (channel mean), resized to ``size`` x
    ``size``; the log amplitude spectrum minus its 3x3 local mean (the "spectral residual")
    is recombined with the phase, transformed back, squared, smoothed with a ``blur_size``
    Gaussian of ``blur_sigma`` (OpenCV's StaticSaliencySpectralResidual uses 64, 5, 8),
    resized back to ``(H, W)`` and min-max scaled to ``[0, 1]`` per image. A flat image (one grey
    value everywhere) has nothing salient: its map is 0 (the spectrum's rounding noise, scaled to
    ``[0, 1]``, made a map of noise that no check for a constant map could see).
    """
    images = _check_images(images)
    size = check_int(size, "size", minimum=3, what="the side of the square the spectrum is computed on")
    blur_size = check_int(blur_size, "blur_size", minimum=1)
    blur_sigma = check_number(blur_sigma, "blur_sigma", minimum=1e-6)
    b, c, h, w = images.shape
    if b == 0:  # no images, no maps (as the other baselines and the metrics of an empty batch)
        return images.new_zeros((0, h, w))
    g = images.float().mean(1, keepdim=True)
    flat = (g.amax((1, 2, 3)) == g.amin((1, 2, 3)))[:, None, None]  # before the resize's rounding
    if (h, w) != (size, size):
        g = F.interpolate(g, size=(size, size), mode="area" if h >= size and w >= size else "bilinear",
                          **({} if h >= size and w >= size else {"align_corners": False}))
    g = g[:, 0].double()
    spec = torch.fft.fft2(g)
    log_amp = torch.log(spec.abs().clamp_min(1e-12))
    phase = torch.angle(spec)
    avg = F.avg_pool2d(F.pad(log_amp[:, None], (1, 1, 1, 1), mode="reflect"), 3, stride=1)[:, 0]
    residual = log_amp - avg
    sal = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
    r = blur_size // 2
    k1 = gaussian_kernel1d(blur_sigma, r, sal.device, sal.dtype)
    k = (k1[:, None] * k1[None, :])[None, None]
    sal = F.conv2d(F.pad(sal[:, None], (r, r, r, r), mode="reflect"), k)
    if (h, w) != (size, size):
        sal = F.interpolate(sal, size=(h, w), mode="bilinear", align_corners=False)
    out = minmax(sal[:, 0]).masked_fill(flat, 0.0)
    return out.to(images.dtype)


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise SalienceError(
            f"expected images of shape (B, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    images = images.float() if not images.is_floating_point() else images
    return check_finite(images, "images", "a baseline map of them would be NaN")


def sobel_edges(images: Tensor) -> Tensor:
    """Edge strength of each image ``(B, C, H, W)``: the magnitude of the 3x3 Sobel gradient of
    the channel mean (replicate padding), ``(B, H, W)``. Saliency methods that mostly show
    edges (guided backprop, Adebayo et al. 2018) are close to it. Differences first, then the
    1-2-1 smoothing, so a flat region is exactly 0 (a 3x3 convolution's sums left rounding noise,
    e.g. 6e-08 everywhere on a flat grey image, which is no longer "constant")."""
    p = F.pad(_check_images(images).mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")[:, 0]
    dx = p[:, :, 2:] - p[:, :, :-2]  # (B, H + 2, W)
    dy = p[:, 2:, :] - p[:, :-2, :]  # (B, H, W + 2)
    gx = dx[:, :-2] + 2 * dx[:, 1:-1] + dx[:, 2:]
    gy = dy[:, :, :-2] + 2 * dy[:, :, 1:-1] + dy[:, :, 2:]
    return (gx.square() + gy.square()).sqrt()


def center_maps(images: Tensor, *, sigma: float = 0.25) -> Tensor:
    """A Gaussian centred on each image, standard deviation ``sigma`` times the side, ``(B, H, W)``
    in ``(0, 1]``: the "the object is in the middle" prior (the centre bias of photographs)."""
    b, _, h, w = _check_images(images).shape
    sigma = check_number(sigma, "sigma", minimum=1e-6, what="the Gaussian's standard deviation, a fraction of the side")
    ys = (torch.arange(h, device=images.device, dtype=torch.float32) + 0.5) / h - 0.5
    xs = (torch.arange(w, device=images.device, dtype=torch.float32) + 0.5) / w - 0.5
    m = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2) / sigma ** 2)
    return m.expand(b, h, w).clone()


def random_maps(shape: Sequence[int], *, seed: Union[int, Sequence[int]] = 0,
                device: Union[str, torch.device, None] = None) -> Tensor:
    """Uniform random maps of ``shape`` ``(B, H, W)``: the chance baseline.

    ``seed``: one int, drawn as one stream over the batch (map ``i`` depends on ``i``: these maps
    know no image); or one int per map, map ``i`` from its own generator seeded ``seed[i]``. For
    maps that belong to images and do not depend on their position, give the images' seeds,
    ``random_maps(shape, seed=salience.evidence.image_seeds(x, 0))`` (what ``salience evaluate``
    does)."""
    if isinstance(shape, int) or not hasattr(shape, "__iter__"):
        raise SalienceError(f"shape must be a sequence of sides, e.g. (B, H, W), got {shape!r}")
    shape = tuple(check_int(s, "each side of shape") for s in shape)
    try:
        device = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError, ValueError):
        raise SalienceError(f"device {device!r}: not a device torch knows; use cpu, cuda or cuda:N") from None
    # float32 draws whatever torch's default dtype: the same seed gives the same maps
    if isinstance(seed, (Tensor, np.ndarray)):
        seed = seed.tolist()
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s) for s in seed]
        if len(shape) < 1 or len(seeds) != shape[0]:
            raise SalienceError(f"expected one seed per map ({shape[0] if shape else 0}), got {len(seeds)}")
        maps = torch.stack([torch.rand(shape[1:], generator=torch.Generator(device="cpu").manual_seed(s),
                                       dtype=torch.float32) for s in seeds]) if seeds else torch.empty(shape)
    else:
        gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        maps = torch.rand(shape, generator=gen, dtype=torch.float32)
    return maps.to(device)
