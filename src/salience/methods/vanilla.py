"""Vanilla gradient saliency (Simonyan, Vedaldi, Zisserman 2014)."""
from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from salience.methods._multi import checked, several_targets, input_gradient_maps
from salience.reduce import GradModifier, Reduction
from salience.targets import TargetLike

__all__ = ["vanilla"]


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def vanilla(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    strip_softmax: bool = True,
) -> Tensor:
    """The gradient of the target's score before softmax w.r.t. the input image.

    ``x``: ``(B, C, H, W)``. ``target``: see :mod:`salience.targets` (default: each sample's
    top class). ``grad_modifier`` (``"absolute"``, ``"negate"``, ``"small_values"``, ``"relu"``
    or a function) acts on the raw gradient, then ``reduce`` maps channels: ``"max_abs"``
    (default, ``max_c |g|``, ``(B, H, W)``), ``"colored"`` (``|g|``, ``(B, C, H, W)``),
    ``"grayscale"`` (``sum_c |g|``), ``"l2"``, ``"max"``, or ``None`` for the raw signed
    ``(B, C, H, W)`` gradient. If the model's output comes from a softmax or log-softmax
    (module or functional), the score is taken before it unless ``strip_softmax=False``.

    Several targets per image (a ``(B, K)`` tensor of classes, or a list of targets) give
    ``(B, K, ...)`` from one forward pass walked back K times.
    The model is explained in eval mode with its parameters frozen, and comes back exactly
    as it was. Raw values are returned; scaling for display is :func:`salience.reduce.normalize`.
    """
    return input_gradient_maps(model, x, target, grad_modifier=grad_modifier, reduce=reduce,
                               strip_softmax=strip_softmax)
