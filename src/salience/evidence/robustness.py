"""Robustness: does a small change of the input change the map much?

:func:`max_sensitivity` (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations",
NeurIPS 2019): the largest relative change of a method's map over a few inputs drawn uniformly in
a small box around ``x``, the target class held fixed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from salience._core.autograd import check_input
from salience._core.tensors import check_int, check_number
from salience.evidence._checks import (MethodLike, check_count, check_seed, class_indices, image_keys, keyed_seed,
                                      method_maps, resolve_method)

__all__ = ["max_sensitivity"]


def max_sensitivity(
    model: nn.Module,
    x: Tensor,
    method: MethodLike,
    target: object = None,
    *,
    samples: int = 10,
    radius: float = 0.02,
    batch_size: int = 32,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019), relative: ``max_k ||m(x + d_k) - m(x)|| / ||m(x)||``, ``(B,)``.

    ``method``: a name of :data:`salience.METHODS` or a function ``(model, x, target) -> maps``;
    maps are compared as ``(B, H, W)`` (a ``(B, 1, H, W)`` map squeezed, a ``(B, C, H, W)`` one
    reduced by the channels' largest magnitude), Frobenius norms. ``d_k`` (``samples`` of them) is uniform in
    ``[-r, r]`` per input value, ``r = radius * (max(x_i) - min(x_i))`` per image, image ``i``'s
    ``d_k`` drawn from its own generator, seeded from ``seed`` and the image's content
    (:func:`salience.evidence.image_seeds`), so an image's value is the same alone or in any batch. ``target``: the class explained on every copy, default the class predicted on ``x``
    (class targets only). Lower is better; 0 for a map that does not change. ``NaN`` where the
    map of ``x`` is zero. The noisy copies of all images go through the method ``batch_size``
    at a time. A map with NaN or infinite values is a :class:`SalienceError` naming the image
    and, for a noisy copy, which copy (``k`` of ``samples``, counted from 0).
    """
    n = check_count(samples, "samples", 1, "noisy copies of each image, a map of the method each")
    _, fn = resolve_method(method, method_kwargs)
    check_input(x, model)
    r = check_number(radius, "radius", minimum=0.0)
    bs = check_int(batch_size, "batch_size", minimum=1)
    b = x.shape[0]
    cls = class_indices(model, x, target)
    m0 = method_maps(fn, model, x, cls, batch_size=bs, kwargs=method_kwargs)  # keys: x's own
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(1, b, 1, 1, 1)
    s = check_seed(seed)
    keys = image_keys(x)
    draws = [torch.rand((n, *x.shape[1:]), generator=torch.Generator(device="cpu").manual_seed(keyed_seed(s, k)),
                        dtype=x.dtype) for k in keys]  # image i's n copies from its own generator
    noise = (torch.stack(draws, 1).to(x.device) * 2 - 1) * r * span
    noisy = (x[None] + noise).reshape(n * b, *x.shape[1:])  # item j = k * B + i
    # copy j = k * B + i is a copy of image i: it takes image i's key, so its SmoothGrad noise is image i's
    # a bad map named by its image and copy (row j of the flattened batch means nothing to the caller)
    maps = method_maps(fn, model, noisy, cls.repeat(n), batch_size=bs, kwargs=method_kwargs, keys=keys * n,
                       label=lambda j: (f"image {j % b}, noisy copy {j // b} of its {n} (samples={n}, "
                                        f"radius={radius!r}, seed={seed!r})")).reshape(n, b, -1)
    diff = (maps - m0.reshape(1, b, -1)).double().norm(dim=2).amax(0)
    ref = m0.reshape(b, -1).double().norm(dim=1)
    return torch.where(ref > 0, diff / ref.clamp_min(1e-300), torch.full_like(ref, float("nan"))).float()
