"""The one-pass methods (vanilla, guided backprop, deconvnet, input x gradient), one or several targets.

A target given as a ``(B, K)`` integer tensor, a list of per-image class lists, or a list of
targets that contains ``None``, a :class:`~salience.targets.Target` or a function is *K
targets*: the result gains a ``K`` axis after the batch, ``(B, K, ...)``. The K gradients come
from one forward pass walked back K times (see :func:`salience._core.engine.input_gradients`),
so ``--top 5`` costs one forward, not five.

:func:`several_targets` marks a method that takes K targets in one call this way, so that
wrappers (SmoothGrad) hand it all K at once instead of calling it K times.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from torch import Tensor, nn

from salience._core import engine as _engine
from salience import reduce as _reduce
from salience._core.autograd import check_input
from salience.targets import Target, split

F = TypeVar("F", bound=Callable[..., Tensor])


def several_targets(method: F) -> F:
    """Mark ``method`` as taking K targets in one call (a ``(B, K)`` tensor or a list of targets ->
    ``(B, K, ...)``) at the cost of one forward pass: SmoothGrad then gives it all K at once."""
    method.several_targets = True  # type: ignore[attr-defined]
    return method


def takes_several_targets(method: Callable[..., Any]) -> bool:
    """Whether ``method`` (or the function a ``functools.partial`` wraps) is marked by :func:`several_targets`."""
    while isinstance(method, functools.partial):
        method = method.func
    return bool(getattr(method, "several_targets", False))


def target_free(method: F) -> F:
    """Mark ``method`` as taking no target (Eigen-CAM: the same map for every class): callers that
    explain targets call it through :func:`apply_method`, which leaves the target out."""
    method.target_free = True  # type: ignore[attr-defined]
    return method


def is_target_free(method: Callable[..., Any]) -> bool:
    """Whether ``method`` (or the function a ``functools.partial`` wraps) is marked by :func:`target_free`."""
    while isinstance(method, functools.partial):
        method = method.func
    return bool(getattr(method, "target_free", False))


def apply_method(method: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Any, **options: Any) -> Tensor:
    """``method(model, x, target, **options)``; a target-free method is called without the target and
    its map ``(B, ...)`` stands for each of the K targets (``(B, K, ...)`` when ``target`` is several,
    as :func:`salience.targets.split` reads it): what the command line and the evaluation call."""
    if not is_target_free(method):
        return method(model, x, target, **options)
    maps = method(model, x, **options)
    targets, multi = split(target, x.shape[0])
    return maps.unsqueeze(1).repeat(1, len(targets), *([1] * (maps.dim() - 1))) if multi else maps


def finish(maps: Tensor, grad_modifier: Any, reduce: Any, multi: bool,
           targets: Optional[Sequence[Target]] = None) -> Tensor:
    """``(B, K, C, H, W)`` -> the grad modifier, then the reduction, per target ``k``; the K axis is
    dropped unless ``multi``. A reduction sees the part of the gradient its target's map shows
    (:meth:`salience.targets.Target.map_part`: the positive part for a regression direction)."""
    mod = _reduce.get_grad_modifier(grad_modifier)
    red = _reduce.get_reduction(reduce)
    outs = []
    for k in range(maps.shape[1]):
        m = maps[:, k]
        if mod is not None:
            m = mod(m)
        if red is not None:
            m = red(targets[k].map_part(m) if targets is not None else m)
        outs.append(m)
    out = torch.stack(outs, dim=1)
    return out if multi else out[:, 0]


def input_gradient_maps(
    model: nn.Module,
    x: Tensor,
    target: Any,
    *,
    grad_modifier: Any,
    reduce: Any,
    strip_softmax: bool,
    extra_modes: Sequence[Any] = (),
    times_input: bool = False,
) -> Tensor:
    """The (ruled) input gradient of one or several targets (times ``x`` with ``times_input``),
    modified and reduced.

    ``x`` ``(B, C, H, W)`` -> ``(B, ...)`` for one target, ``(B, K, ...)`` for K targets.
    """
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    _reduce.get_grad_modifier(grad_modifier)
    _reduce.get_reduction(reduce)
    grads, _, _ = _engine.input_gradients(model, x, targets, strip_softmax=strip_softmax, extra_modes=extra_modes)
    if times_input:
        grads = grads * x.unsqueeze(0)
    return finish(grads.transpose(0, 1), grad_modifier, reduce, multi, targets)
