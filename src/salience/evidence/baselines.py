"""Baselines that do not look at the model: :func:`spectral_residual` (Hou and Zhang, 2007) and
:func:`random_maps`. A method that does not beat them at localization says little about the model.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from salience._core.errors import SalienceError
from salience._core.tensors import minmax
from salience._core.tensors import gaussian_kernel1d

__all__ = ["spectral_residual", "random_maps"]


def spectral_residual(images: Tensor, *, size: int = 64, blur_size: int = 5, blur_sigma: float = 8.0) -> Tensor:
    """Spectral-residual saliency (Hou and Zhang, 2007): a model-free baseline, ``(B, H, W)``.

    Each image ``(B, C, H, W)`` is turned to gray (channel mean), resized to ``size`` x
    ``size``; the log amplitude spectrum minus its 3x3 local mean (the "spectral residual")
    is recombined with the phase, transformed back, squared, smoothed with a ``blur_size``
    Gaussian of ``blur_sigma`` (OpenCV's StaticSaliencySpectralResidual uses 64, 5, 8),
    resized back to ``(H, W)`` and min-max scaled to ``[0, 1]`` per image.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise SalienceError(
            f"expected images of shape (B, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    b, c, h, w = images.shape
    g = images.float().mean(1, keepdim=True)
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
    return minmax(sal[:, 0]).to(images.dtype if images.is_floating_point() else torch.float32)


def random_maps(shape: Sequence[int], *, seed: int = 0, device: Union[str, torch.device, None] = None) -> Tensor:
    """Uniform random maps of ``shape`` ``(B, H, W)`` from ``seed``: the chance baseline."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen).to(device if device is not None else "cpu")
