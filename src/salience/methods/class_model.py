"""Class model visualization (Simonyan, Vedaldi, Zisserman 2014, section 2) and filter visualization.

:func:`class_model` finds, by gradient ascent on the input, the image ``I`` that maximizes

    ``S(I) - l2 * ||I||^2 - tv * TV(I)``

where ``S`` is the score of a target: a class's score before softmax (the paper), a neuron of
the output, or the mean activation of one filter of an inner layer
(``salience.targets.activation(layer, channel)``: what does this filter look for?). Only the
image is optimized; the model runs in eval mode with frozen parameters and comes back exactly as
it was. Everything the image sees is in the model's own input space (after any normalization
that happens outside the model).

Regularizers that make the picture readable, each optional:

* ``l2``: the paper's penalty ``l2 * ||I||^2`` (per image); its gradient ``-2 * l2 * I`` pulls the
  image towards zero. With a linear score ``w . I + b`` and plain ascent the optimum is
  ``w / (2 * l2)``.
* ``tv``: squared total variation ``sum (I[y+1, x] - I[y, x])^2 + (I[y, x+1] - I[y, x])^2``
  (per channel): penalizes pixel-to-pixel noise, favours flat regions with edges.
* ``jitter``: each step sees the image shifted (rolled) by a random offset of up to ``jitter``
  pixels; the gradient is shifted back. Suppresses high-frequency patterns that only work at one
  exact alignment.
* ``blur_every`` / ``blur_sigma``: every ``blur_every`` steps the image is smoothed with a Gaussian
  of ``blur_sigma`` pixels (Yosinski et al. 2015).
* ``clip``: after each step the image is clamped to the valid input range: ``"auto"`` (default)
  is ``[0, 1]`` mapped through the model's ``ModelInfo`` mean/std when the model carries one
  (models from :func:`salience.load_model`) and no clamping otherwise; ``(lo, hi)`` clamps to
  that; ``None`` never clamps.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import gradients
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.progress import progress as _progress
from salience.targets import Classes, Target, TargetLike, as_target

__all__ = ["class_model", "total_variation", "tv_gradient", "gaussian_blur"]

Callback = Callable[[int, Tensor, Tensor], Optional[bool]]
ClassModelTarget = Union[int, Sequence[int], Tensor, Target, Sequence[Target], Callable[[Tensor], Tensor]]

_OPTIMIZERS = ("ascent", "adam")


def total_variation(img: Tensor) -> Tensor:
    """Squared total variation of each image ``(B, C, H, W) -> (B,)``."""
    dh = img[..., 1:, :] - img[..., :-1, :]
    dw = img[..., :, 1:] - img[..., :, :-1]
    return dh.pow(2).flatten(1).sum(1) + dw.pow(2).flatten(1).sum(1)


def tv_gradient(img: Tensor) -> Tensor:
    """The gradient of :func:`total_variation` w.r.t. ``img``, in closed form, ``(B, C, H, W)``."""
    g = torch.zeros_like(img)
    dh = img[..., 1:, :] - img[..., :-1, :]
    dw = img[..., :, 1:] - img[..., :, :-1]
    g[..., 1:, :] += 2 * dh
    g[..., :-1, :] -= 2 * dh
    g[..., :, 1:] += 2 * dw
    g[..., :, :-1] -= 2 * dw
    return g


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Each channel of ``img`` ``(B, C, H, W)`` smoothed by a Gaussian of ``sigma`` pixels (reflect padding)."""
    if sigma <= 0:
        return img
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, img.shape[-1] - 1, img.shape[-2] - 1)
    if radius < 1:
        return img
    t = torch.arange(-radius, radius + 1, device=img.device, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    x = F.pad(img, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class _PerSample(Target):
    """Sample ``i`` of the batch is scored by target ``i`` (all on the same layer)."""

    def __init__(self, targets: Sequence[Target]):
        self.targets = list(targets)
        self.layer = self.targets[0].layer

    def __call__(self, output: Tensor) -> Tensor:
        if output.shape[0] != len(self.targets):
            raise SalienceError(f"got {len(self.targets)} targets for a batch of {output.shape[0]} images")
        return torch.cat([t(output[i:i + 1]).reshape(1) for i, t in enumerate(self.targets)])

    def __repr__(self) -> str:
        return f"PerSample({self.targets!r})"


def _targets_and_batch(target: ClassModelTarget, seed_batch: Optional[int]) -> list[tuple[Target, list[int]]]:
    """Split the request into groups ``(target, sample indices)`` that can share a forward pass."""
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, Target) for t in target):
        groups: dict[int, list[int]] = {}
        layer_of: dict[int, object] = {}
        for i, t in enumerate(target):
            key = id(t.layer) if not isinstance(t.layer, str) else hash(t.layer)
            groups.setdefault(key, []).append(i)
            layer_of[key] = t.layer
        n = len(target)
        if seed_batch is not None and seed_batch != n:
            raise SalienceError(f"got {n} targets but a seed batch of {seed_batch} images; give one seed per target")
        return [(_PerSample([target[i] for i in idx]), idx) for idx in groups.values()]
    if isinstance(target, (list, tuple, Tensor)) and not isinstance(target, Target):
        if isinstance(target, (list, tuple)) and len(target) == 0:
            raise SalienceError("class_model got an empty list of targets; give at least one class or Target")
        t = torch.as_tensor(target)
        if t.dim() == 1:
            n = t.numel()
            if seed_batch is not None and seed_batch != n:
                raise SalienceError(
                    f"got {n} target classes but a seed batch of {seed_batch} images; give one seed per class"
                )
            return [(Classes(t), list(range(n)))]
    tgt = as_target(target)  # type: ignore[arg-type]
    return [(tgt, list(range(seed_batch or 1)))]


def _clip_range(model: nn.Module, clip: Union[None, str, tuple], channels: int,
                device: torch.device, dtype: torch.dtype) -> Optional[tuple[Tensor, Tensor]]:
    if clip is None:
        return None
    if isinstance(clip, str):
        if clip != "auto":
            raise SalienceError(f"clip must be 'auto', None or a (low, high) pair, got {clip!r}")
        if not hasattr(model, "salience_info"):
            return None
        info = model_info(model)
        lo = torch.zeros(channels, device=device, dtype=dtype)
        hi = torch.ones(channels, device=device, dtype=dtype)
        if info.mean is not None and info.std is not None and len(info.mean) == channels == len(info.std):
            mean = torch.tensor(info.mean, device=device, dtype=dtype)
            std = torch.tensor(info.std, device=device, dtype=dtype)
            lo, hi = (lo - mean) / std, (hi - mean) / std
        return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)
    try:
        lo_f, hi_f = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise SalienceError(f"clip must be 'auto', None or a (low, high) pair of numbers, got {clip!r}") from None
    if not lo_f < hi_f:
        raise SalienceError(f"clip needs low < high, got {clip!r}")
    return (torch.full((1, 1, 1, 1), lo_f, device=device, dtype=dtype),
            torch.full((1, 1, 1, 1), hi_f, device=device, dtype=dtype))


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


def class_model(
    model: nn.Module,
    target: ClassModelTarget,
    *,
    shape: Optional[Sequence[int]] = None,
    steps: int = 300,
    lr: float = 0.05,
    optimizer: str = "adam",
    l2: float = 3e-3,
    tv: float = 0.05,
    jitter: int = 3,
    blur_every: int = 4,
    blur_sigma: float = 0.8,
    clip: Union[None, str, tuple[float, float]] = "auto",
    seed: Union[None, float, Tensor] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    return_history: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The image that maximizes the target's score minus regularizers, by gradient ascent.

    ``target``: a class index (one image), a list / 1-D tensor of class indices (one image per
    class, optimized together in one batch), a :class:`~salience.targets.Target` (e.g.
    ``targets.activation("features.3", 7)`` for a filter, ``targets.regression(1)`` for an output
    neuron) or a list of Targets (one image each), or a function of the output. Class scores are
    taken before a final softmax, as in the paper.

    ``shape``: ``(C, H, W)`` of the image; default ``(channels, *input_size)`` from the model's
    :class:`~salience._info.ModelInfo`. ``seed``: the start, ``None`` for zeros (the paper), a
    number for a constant image, or an image ``(C, H, W)`` / ``(B, C, H, W)``.

    ``optimizer``: ``"adam"`` (default: steps of about ``lr`` per pixel whatever the scale of
    the score) or ``"ascent"`` (plain gradient ascent ``I += lr * grad``, the paper's). ``l2``,
    ``tv``, ``jitter``, ``blur_every``, ``blur_sigma``, ``clip``: the regularizers described in
    :mod:`salience.methods.class_model`; the defaults (``l2=3e-3, tv=0.05, jitter=3,
    blur_every=4, blur_sigma=0.8``, 300 Adam steps of 0.05) give readable pictures for images of
    values of order 1; ``tv=0, jitter=0, blur_every=0`` is the paper's plain L2-regularized
    ascent. ``jitter`` is limited to half the image. ``generator`` seeds the jitter.

    ``progress`` draws a progress bar on stderr. ``callback(step, image, score)`` is called after
    every step with the current image ``(B, C, H, W)`` (detached; clone it to keep it) and the
    scores ``(B,)`` of that step; return ``True`` from it to stop early.

    Returns the image ``(B, C, H, W)``, detached; with ``return_history=True`` also the target's
    scores at every step, ``(steps_run, B)``.
    """
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SalienceError(f"steps must be a positive integer, got {steps!r}")
    if optimizer not in _OPTIMIZERS:
        raise SalienceError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}")
    for name, value in (("lr", lr), ("l2", l2), ("tv", tv), ("blur_sigma", blur_sigma)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise SalienceError(f"{name} must be a finite number >= 0, got {value!r}")
    if lr <= 0:
        raise SalienceError(f"lr must be > 0, got {lr}")
    if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
        raise SalienceError(f"jitter must be an integer number of pixels >= 0, got {jitter!r}")
    if isinstance(blur_every, bool) or not isinstance(blur_every, int) or blur_every < 0:
        raise SalienceError(f"blur_every must be an integer >= 0 (0: never), got {blur_every!r}")
    if callback is not None and not callable(callback):
        raise SalienceError(f"callback must be callable as callback(step, image, score), got {type(callback).__name__}")

    device, dtype = _model_device_dtype(model)
    seed_batch: Optional[int] = None
    if isinstance(seed, Tensor):
        if seed.dim() not in (3, 4) or not seed.is_floating_point():
            raise SalienceError(
                f"seed must be a floating image (C, H, W) or batch (B, C, H, W), got dtype {seed.dtype}, "
                f"shape {tuple(seed.shape)}"
            )
        seed = seed.detach().to(device=device, dtype=dtype)
        if seed.dim() == 4:
            seed_batch = seed.shape[0]
        if shape is None:
            shape = tuple(seed.shape[-3:])
        elif tuple(seed.shape[-3:]) != tuple(shape):
            raise SalienceError(f"seed has shape {tuple(seed.shape)} but shape={tuple(shape)} was asked")
    elif seed is not None and not isinstance(seed, (int, float)):
        raise SalienceError(f"seed must be None, a number or an image tensor, got {type(seed).__name__}")

    if shape is None:
        info = model_info(model)
        if info.input_size is None:
            raise SalienceError(
                "class_model needs the image shape: pass shape=(C, H, W) (the model carries no ModelInfo "
                "with an input size)"
            )
        shape = (info.channels, *info.input_size)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SalienceError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    jitter = min(jitter, (min(shape[1:]) - 1) // 2)  # at most half the image

    groups = _targets_and_batch(target, seed_batch)
    batch = sum(len(idx) for _, idx in groups)
    if isinstance(seed, Tensor):
        img = (seed if seed.dim() == 4 else seed.unsqueeze(0)).expand(batch, *shape).clone()
    else:
        img = torch.full((batch, *shape), float(seed or 0.0), device=device, dtype=dtype)
    bounds = _clip_range(model, clip, shape[0], device, dtype)
    if bounds is not None:
        img = torch.maximum(torch.minimum(img, bounds[1]), bounds[0])

    # Adam moments, kept by hand so that no tensor but the image is ever touched.
    m = torch.zeros_like(img)
    v = torch.zeros_like(img)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    history: list[Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(model_guard(model))  # one guard for all steps
        bar = stack.enter_context(_progress(steps, "class model", enabled=progress))
        for step in range(steps):
            if jitter:
                dy, dx = (int(s) for s in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
            else:
                dy = dx = 0
            seen = torch.roll(img, (dy, dx), (2, 3)) if (dy or dx) else img
            grad = torch.empty_like(img)
            scores = torch.empty(batch, device=device, dtype=dtype)
            for tgt, idx in groups:
                sel = seen if len(groups) == 1 else seen[idx]
                p = gradients(model, sel, tgt)
                if p.scores.dim() == 0:
                    raise SalienceError(
                        "class_model needs one score per image; the target returned a scalar. Return the "
                        "scores (B,) instead of their sum or mean"
                    )
                assert p.grad is not None
                grad[idx] = p.grad.to(dtype)
                scores[idx] = p.scores.to(dtype)
            if dy or dx:
                grad = torch.roll(grad, (-dy, -dx), (2, 3))
            if l2:
                grad = grad - 2 * l2 * img
            if tv:
                grad = grad - tv * tv_gradient(img)
            if optimizer == "ascent":
                img = img + lr * grad
            else:
                t = step + 1
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad * grad
                img = img + lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
            if blur_every and (step + 1) % blur_every == 0:
                img = gaussian_blur(img, blur_sigma)
            if bounds is not None:
                img = torch.maximum(torch.minimum(img, bounds[1]), bounds[0])
            if not bool(torch.isfinite(img).all()):
                raise SalienceError(
                    f"class_model diverged at step {step + 1} (the image has NaN or infinite values); "
                    "lower lr, raise l2, or use optimizer='adam' or clip"
                )
            history.append(scores.detach().clone())
            bar.update(1)
            if callback is not None and callback(step, img.detach(), scores.detach()) is True:
                break
    img = img.detach()
    if return_history:
        return img, torch.stack(history)
    return img
