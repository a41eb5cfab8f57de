"""SmoothGrad (Smilkov et al. 2017): a method's map averaged over noisy copies of the input.

Wraps any method of the contract ``method(model, x, target, **options)``: vanilla gradients,
guided backprop, Grad-CAM, input x gradient... The noisy copies of all images are run together,
in chunks sized by :mod:`salience._engine`, and only running sums are kept.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from salience import reduce as _reduce
from salience._core import engine as _engine
from salience._core.autograd import check_input
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience.reduce import GradModifier, Reduction
from salience.methods.guided import deconvnet, guided_backprop
from salience.methods.integrated import input_x_gradient
from salience.methods.vanilla import vanilla

__all__ = ["smoothgrad", "VARIANTS"]

VARIANTS = ("mean", "squared", "vargrad")


def smoothgrad(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    method: Callable[..., Tensor] = vanilla,
    samples: int = 50,
    noise: float = 0.15,
    variant: str = "mean",
    seed: Optional[int] = 0,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    reduce_each: bool = False,
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    """The mean of ``method``'s raw map over ``samples`` noisy copies of each image.

    ``x``: ``(B, C, H, W)``. Each copy is ``x + N(0, sigma^2)`` with ``sigma = noise * (max - min)``
    of that image (the paper's noise level; 0.1-0.2 works well). ``variant``: ``"mean"``
    (SmoothGrad), ``"squared"`` (the mean of squared maps, SmoothGrad-squared) or ``"vargrad"``
    (their variance, VarGrad).

    ``target`` is resolved once, on the clean images (default: each image's predicted class),
    and used for every copy. Several targets per image (a ``(B, K)`` class tensor or a list of
    targets) give maps ``(B, K, ...)``; for the one-pass methods (vanilla, guided backprop,
    deconvnet, input x gradient) they share one forward pass per chunk.

    The wrapped method returns its raw map (``reduce=None``); ``grad_modifier`` and ``reduce``
    (default ``"max_abs"``, ``(B, H, W)``; ``None`` for the raw ``(B, C, H, W)``) are applied
    once, to the average, as in the paper: signed gradients are averaged so that noise of
    opposite signs cancels. ``reduce_each=True`` applies them to every copy before averaging
    instead (Captum's NoiseTunnel over ``Saliency(abs=True)``). Maps that are already
    ``(B, H, W)`` (Grad-CAM) are not reduced.

    ``seed``: the noise comes from a generator of its own seeded with it (the global RNG is
    neither used nor changed); ``None`` draws a fresh seed. The same seed gives the same noise
    whatever the chunking. ``samples=1, noise=0`` is exactly ``method``.
    ``chunk`` (copies per pass) or ``max_memory`` (bytes or ``"2GiB"``) override the automatic
    chunk size; ``progress=True`` draws a progress bar. Other keyword ``options`` go to
    ``method`` (e.g. ``layer=`` for Grad-CAM).
    """
    check_input(x, model)
    if not callable(method):
        raise SalienceError(f"method must be a saliency function such as salience.vanilla, got {type(method).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SalienceError(f"samples must be an int >= 1 (noisy copies per image), got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0 or noise == float("inf"):
        raise SalienceError(f"noise must be a finite number >= 0 (a fraction of each image's range, e.g. 0.15), got {noise!r}")
    if variant not in VARIANTS:
        raise SalienceError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SalienceError(f"seed must be an int or None, got {seed!r}")
    budget = _engine.check_memory_options(chunk, max_memory)
    mod = _reduce.get_grad_modifier(grad_modifier)
    red = _reduce.get_reduction(reduce)
    for name in options:
        if not _engine.accepts(method, name):
            raise SalienceError(f"{getattr(method, '__name__', 'method')} has no option {name!r}")
    raw_options = dict(options)
    if _engine.accepts(method, "reduce"):
        raw_options["reduce"] = None
    if _engine.accepts(method, "grad_modifier"):
        raw_options["grad_modifier"] = None
    if _engine.accepts(method, "strip_softmax"):
        raw_options["strip_softmax"] = strip_softmax

    targets, multi = _engine.split_targets(target, x.shape[0])
    b = x.shape[0]
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(torch.seed())))
    sigma = (noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))).view(b, 1, 1, 1)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    current: dict[str, Any] = {"rep": -1, "noise": None}
    # Methods that take the K targets in one call share each chunk's forward pass between them.
    shared = multi and method in (vanilla, guided_backprop, deconvnet, input_x_gradient)

    def finish(maps: Tensor) -> Tensor:
        """grad modifier + reduction of maps (n, ...) [reduce_each] or the average (B, ...)."""
        if mod is not None:
            maps = mod(maps)
        if red is None or maps.dim() - (1 if multi else 0) != 4:
            return maps
        if multi:
            n, k = maps.shape[:2]
            out = red(maps.reshape((n * k,) + tuple(maps.shape[2:])))
            return out.reshape((n, k) + tuple(out.shape[1:]))
        return red(maps)

    def noisy(start: int, stop: int) -> tuple[Tensor, Tensor]:
        """The copies for items start..stop-1 (item j: copy j // B of image j % B)."""
        parts = []
        j = start
        while j < stop:
            rep, img = divmod(j, b)
            n = min(stop - j, b - img)
            if noise == 0:
                parts.append(x[img:img + n])
            else:
                if current["rep"] != rep:
                    # One draw per copy of the whole batch, so chunking does not change the noise.
                    current["noise"] = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                    current["rep"] = rep
                parts.append(x[img:img + n] + sigma[img:img + n] * current["noise"][img:img + n])
            j += n
        owner = torch.arange(start, stop, device=x.device) % b
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), owner

    with model_guard(model):
        resolved = _engine.resolve_targets(model, x, targets, strip_softmax=strip_softmax)

        def compute(start: int, stop: int) -> Tensor:
            xs, owner = noisy(start, stop)
            tgts = [_engine.targets_for(t, owner) for t in resolved]
            if shared:
                maps = _call(method, model, xs, tgts, raw_options)  # (n, K, ...)
            else:
                outs = [_call(method, model, xs, t, raw_options) for t in tgts]
                maps = torch.stack(outs, dim=1) if multi else outs[0]
            if reduce_each:
                maps = finish(maps)
            return maps

        sums = _engine.accumulate(
            compute, samples * b, b, squares=variant != "mean", chunk=chunk, max_memory=budget,
            progress=progress, desc="smoothgrad", device=x.device,
        )
    mean = sums.total / samples
    if variant == "mean":
        out = mean
    else:
        assert sums.squares is not None
        sq = sums.squares / samples
        out = sq if variant == "squared" else (sq - mean * mean).clamp_min(0)
    out = out.to(x.dtype)
    return out if reduce_each else finish(out)


def _call(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Any, options: dict) -> Tensor:
    out = method(model, x, target, **options)
    if not isinstance(out, Tensor) or out.shape[:1] != x.shape[:1]:
        raise SalienceError(
            f"the wrapped method must return a tensor with one map per image, shape ({x.shape[0]}, ...), got "
            f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
        )
    return out
