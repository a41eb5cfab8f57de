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

import dataclasses
import numbers
import operator
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.autograd import gradients
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.progress import progress as _progress
from salience._core.tensors import check_input_pixels, check_int, check_number, gaussian_blur, model_device, model_dtype, check_flag
from salience.methods._multi import checked, refuse_fp16_overflow, warn_unapplied
from salience.targets import Classes, Target, as_target

__all__ = ["class_model", "total_variation", "tv_gradient", "gaussian_blur"]  # gaussian_blur: re-export of the core one

Callback = Callable[[int, Tensor, Tensor], Optional[bool]]
ClassModelTarget = Union[int, Sequence[int], Tensor, Target, Sequence[Target], Callable[[Tensor], Tensor]]
Bounds = Optional[tuple[Tensor, Tensor]]

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
        for i, t in enumerate(target):
            key = id(t.layer) if not isinstance(t.layer, str) else hash(t.layer)
            groups.setdefault(key, []).append(i)
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
                device: torch.device, dtype: torch.dtype) -> Bounds:
    """The ``(low, high)`` bounds ``(1, C or 1, 1, 1)`` that ``clip`` asks for, or ``None``: no clamping."""
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


def _check_options(model: nn.Module, steps: int, optimizer: str, lr: float, l2: float, tv: float, jitter: int,
                   blur_every: int, blur_sigma: float, callback: Optional[Callback]) -> None:
    """Refuse bad arguments of :func:`class_model` with a message naming the option."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    # Not check_int: its wording ("an int >= 1") would drop "a positive integer", which callers match.
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:  # numpy's ints too
        raise SalienceError(f"steps must be a positive integer, got {steps!r}")
    _engine.check_passes(steps, f"steps={steps} is", "the default 300 steps give readable pictures; return_history="
                         "True shows when the score stops rising")
    if optimizer not in _OPTIMIZERS:
        raise SalienceError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}")
    for name, value in (("lr", lr), ("l2", l2), ("tv", tv), ("blur_sigma", blur_sigma)):
        check_number(value, name, minimum=0)
    if lr <= 0:
        raise SalienceError(f"lr must be > 0, got {lr}")
    check_int(jitter, "jitter", minimum=0, what="pixels")
    check_int(blur_every, "blur_every", minimum=0, what="0: never")
    if callback is not None and not callable(callback):
        raise SalienceError(f"callback must be callable as callback(step, image, score), got {type(callback).__name__}")


def _seed_tensor(seed: Union[None, float, Tensor], shape: Optional[Sequence[int]], device: torch.device,
                 dtype: torch.dtype) -> tuple[Union[None, float, Tensor], Optional[int], Optional[Sequence[int]]]:
    """The seed on the model's device and dtype, its batch size (``None`` unless a batch
    ``(B, C, H, W)``) and the image shape it implies (``shape`` when given, which it must match)."""
    if isinstance(seed, Tensor):
        if seed.dim() not in (3, 4) or not seed.is_floating_point():
            raise SalienceError(
                f"seed must be a floating image (C, H, W) or batch (B, C, H, W), got dtype {seed.dtype}, "
                f"shape {tuple(seed.shape)}"
            )
        seed = seed.detach().to(device=device, dtype=dtype)
        if shape is None:
            shape = tuple(seed.shape[-3:])
        elif tuple(seed.shape[-3:]) != tuple(shape):
            raise SalienceError(f"seed has shape {tuple(seed.shape)} but shape={tuple(shape)} was asked")
        return seed, (seed.shape[0] if seed.dim() == 4 else None), shape
    if seed is not None and not isinstance(seed, (int, float)):
        raise SalienceError(f"seed must be None, a number or an image tensor, got {type(seed).__name__}")
    return seed, None, shape


def _image_shape(model: nn.Module, shape: Optional[Sequence[int]]) -> tuple[int, int, int]:
    """``(C, H, W)``: ``shape`` checked, or the model's ``ModelInfo`` channels and input size."""
    if shape is None:
        info = model_info(model)
        if info.input_size is None:
            raise SalienceError(
                "class_model needs the image shape: pass shape=(C, H, W) (the model carries no ModelInfo "
                "with an input size)"
            )
        shape = (info.channels, *info.input_size)
    try:
        shape = tuple(operator.index(s) for s in shape)  # ints, numpy's and 0-d integer tensors; not 8.5, not '8'
    except TypeError:
        raise SalienceError(f"shape must be (C, H, W) with positive sizes, got {shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise SalienceError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    check_input_pixels(shape[1:], "shape's H x W")  # (3, 10**6, 10**6) asked torch for 12 TB; 10**300 a raw TypeError
    return shape  # type: ignore[return-value]


def _start_image(seed: Union[None, float, Tensor], batch: int, shape: tuple[int, int, int], bounds: Bounds,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """The first image ``(batch, C, H, W)``: the seed (broadcast) or a constant, clipped to ``bounds``."""
    if isinstance(seed, Tensor):
        img = (seed if seed.dim() == 4 else seed.unsqueeze(0)).expand(batch, *shape).clone()
    else:
        img = torch.full((batch, *shape), float(seed or 0.0), device=device, dtype=dtype)
    return _clip(img, bounds)


def _clip(img: Tensor, bounds: Bounds) -> Tensor:
    return img if bounds is None else torch.maximum(torch.minimum(img, bounds[1]), bounds[0])


def _scores_and_gradient(model: nn.Module, img: Tensor, groups: list[tuple[Target, list[int]]], jitter: int,
                         generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """The targets' scores ``(B,)`` on the image shifted by a random jitter, and their gradient
    ``(B, C, H, W)`` shifted back: one pass per group of targets that share a layer."""
    if jitter:
        dy, dx = (int(s) for s in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
    else:
        dy = dx = 0
    seen = torch.roll(img, (dy, dx), (2, 3)) if (dy or dx) else img
    grad = torch.empty_like(img)
    scores = torch.empty(img.shape[0], device=img.device, dtype=img.dtype)
    for tgt, idx in groups:
        p = gradients(model, seen if len(groups) == 1 else seen[idx], tgt)
        if p.scores.dim() == 0:
            raise SalienceError(
                "class_model needs one score per image; the target returned a scalar. Return the "
                "scores (B,) instead of their sum or mean"
            )
        assert p.grad is not None
        refuse_fp16_overflow(model, p.grad)  # under precision="fp16" (the steps' run): not called a divergence
        grad[idx] = p.grad.to(img.dtype)
        scores[idx] = p.scores.to(img.dtype)
    if dy or dx:
        grad = torch.roll(grad, (-dy, -dx), (2, 3))
    return scores, grad


class _Update:
    """The image's update from the regularized gradient: plain ascent ``lr * grad`` or Adam, whose
    moments are kept here by hand so that no tensor but the image is ever touched."""

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, optimizer: str, lr: float, img: Tensor):
        self.adam = optimizer == "adam"
        self.lr = lr
        self.m = torch.zeros_like(img)
        self.v = torch.zeros_like(img)

    def __call__(self, img: Tensor, grad: Tensor, t: int) -> Tensor:
        """``img`` after step ``t`` (1-based)."""
        if not self.adam:
            return img + self.lr * grad
        b1, b2 = self.beta1, self.beta2
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        return img + self.lr * (self.m / (1 - b1 ** t)) / ((self.v / (1 - b2 ** t)).sqrt() + self.eps)


class _Regularizers:
    """The readability terms: ``l2`` and ``tv`` in the gradient, then Gaussian blur every
    ``blur_every`` steps and clipping to ``bounds`` after the update."""

    def __init__(self, l2: float, tv: float, blur_every: int, blur_sigma: float, bounds: Bounds):
        self.l2, self.tv, self.bounds = l2, tv, bounds
        self.blur_every, self.blur_sigma = blur_every, blur_sigma

    def gradient(self, grad: Tensor, img: Tensor) -> Tensor:
        """The score's gradient minus the penalties' gradients."""
        if self.l2:
            grad = grad - 2 * self.l2 * img
        if self.tv:
            grad = grad - self.tv * tv_gradient(img)
        return grad

    def after_update(self, img: Tensor, step: int) -> Tensor:
        """Blur (on every ``blur_every``-th step, 0-based ``step``) and clip the updated image."""
        if self.blur_every and (step + 1) % self.blur_every == 0:
            img = gaussian_blur(img, self.blur_sigma)
        return _clip(img, self.bounds)


# why the ascent's passes for a target on an inner layer (a filter's activation) take neither option, by option: the
# reason the one warning per process of salience.methods._multi.warn_unapplied gives
_WHY_INNER_LAYER_PASSES_SKIP: dict[str, str] = {
    "compile": "a target on an inner layer reads it with a hook, which a compiled graph does not follow; the passes "
               "run eagerly",
    "fold_batchnorm": "a target on an inner layer reads the model's own layer, which the folded copy has not; the "
                      "passes run the model itself",
}


@contextmanager
def _passes(model: nn.Module, img: Tensor, groups: list[tuple[Target, list[int]]]) -> Iterator[None]:
    """The ascent's passes under the performance options in force (:func:`salience._core.perf.current`), as one
    chunk of a :class:`~salience._core.perf.Run` for all the steps (each a gradient pass of one batch size): the
    layout, autocast, and after the first step (which looks for a final softmax to strip) the compiled model or the
    folded copy; with a target on an inner layer not those two, which a warning says once per process."""
    options = _perf.current()
    if _perf.active(model) is not None or not _perf.changes_single_pass(options):
        yield  # the defaults (or "auto", measured over a many-pass call's chunks): the passes as they are
        return
    if any(getattr(t, "layer", None) is not None for t, _ in groups):
        warn_unapplied("class_model", model, ("compile", "fold_batchnorm"), options,
                       why=_WHY_INNER_LAYER_PASSES_SKIP)
        options = dataclasses.replace(options, compile=False, fold_batchnorm=False)
    run = _perf.Run(model, img, options, tag="class-model")
    try:
        with run.chunk(options.memory_format == "channels_last", True):
            yield
    finally:
        _perf.close_run(run)


def _ascend(model: nn.Module, img: Tensor, groups: list[tuple[Target, list[int]]], update: _Update,
            reg: _Regularizers, *, steps: int, jitter: int, generator: Optional[torch.Generator], progress: bool,
            callback: Optional[Callback]) -> tuple[Tensor, list[Tensor]]:
    """Run up to ``steps`` steps under one model guard; the last image and the scores of each step.

    After each step: the progress bar advances, then ``callback(step, image, scores)`` may stop the run."""
    history: list[Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(model_guard(model))  # one guard for all steps
        stack.enter_context(_passes(model, img, groups))  # the performance options, one run for all steps
        bar = stack.enter_context(_progress(steps, "class model", enabled=progress))
        for step in range(steps):
            scores, grad = _scores_and_gradient(model, img, groups, jitter, generator)
            img = reg.after_update(update(img, reg.gradient(grad, img), step + 1), step)
            if not bool(torch.isfinite(img).all()):
                raise SalienceError(
                    f"class_model diverged at step {step + 1} (the image has NaN or infinite values); "
                    "lower lr, raise l2, or use optimizer='adam' or clip"
                )
            history.append(scores.detach().clone())
            bar.update(1)
            if callback is not None and callback(step, img.detach(), scores.detach()) is True:
                break
    return img, history


@checked  # the public method: a call its signature refuses is an ArgumentError
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
    :class:`~salience._core.info.ModelInfo`. ``seed``: the start, ``None`` for zeros (the paper), a
    number for a constant image, or an image ``(C, H, W)`` / ``(B, C, H, W)``.

    ``optimizer``: ``"adam"`` (default: steps of about ``lr`` per pixel whatever the scale of
    the score) or ``"ascent"`` (plain gradient ascent ``I += lr * grad``, the paper's). ``l2``,
    ``tv``, ``jitter``, ``blur_every``, ``blur_sigma``, ``clip``: the regularizers described in
    :mod:`salience.methods.class_model`; the defaults (``l2=3e-3, tv=0.05, jitter=3,
    blur_every=4, blur_sigma=0.8``, 300 Adam steps of 0.05) give readable pictures for images of
    values of order 1; ``tv=0, jitter=0, blur_every=0`` is the paper's plain L2-regularized
    ascent. ``jitter`` is limited to half the image. ``generator`` draws the jitter; ``None``: a
    generator of its own seeded with 0, so a call is reproducible and the global RNG is neither used
    nor changed (as SmoothGrad's and RISE's ``seed=0``); pass ``torch.Generator().manual_seed(n)`` for
    another draw.

    ``progress`` draws a progress bar on stderr. ``callback(step, image, score)`` is called after
    every step with the current image ``(B, C, H, W)`` (detached; clone it to keep it) and the
    scores ``(B,)`` of that step; return ``True`` from it to stop early.

    Returns the image ``(B, C, H, W)``, detached; with ``return_history=True`` also the target's
    scores at every step, ``(steps_run, B)``.
    """
    progress = check_flag(progress, "progress")
    return_history = check_flag(return_history, "return_history")
    _check_options(model, steps, optimizer, lr, l2, tv, jitter, blur_every, blur_sigma, callback)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise SalienceError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device, dtype = model_device(model), model_dtype(model)
    seed, seed_batch, shape = _seed_tensor(seed, shape, device, dtype)
    shape = _image_shape(model, shape)
    jitter = min(int(jitter), (min(shape[1:]) - 1) // 2)  # at most half the image
    groups = _targets_and_batch(target, seed_batch)
    bounds = _clip_range(model, clip, shape[0], device, dtype)
    img = _start_image(seed, sum(len(idx) for _, idx in groups), shape, bounds, device, dtype)
    img, history = _ascend(model, img, groups, _Update(optimizer, lr, img),
                           _Regularizers(l2, tv, int(blur_every), blur_sigma, bounds), steps=steps, jitter=jitter,
                           generator=generator, progress=progress, callback=callback)
    img = img.detach()
    if return_history:
        return img, torch.stack(history)
    return img
