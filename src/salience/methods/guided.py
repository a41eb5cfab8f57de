"""Guided backpropagation (Springenberg et al. 2015) and deconvnet (Zeiler & Fergus 2014).

Both are the input gradient of the target's score taken under a backprop rule from
:mod:`salience.rules`, which acts at every ReLU of the model whatever its form (modules,
reused modules, in-place, functional, ReLU6).
"""
from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from salience import rules
from salience.reduce import GradModifier, Reduction
from salience.targets import TargetLike
from salience.methods._multi import checked, several_targets, input_gradient_maps

__all__ = ["guided_backprop", "deconvnet"]


def _ruled_maps(model: nn.Module, x: Tensor, target: TargetLike, rule: rules.BackpropRule, method: str,
                strip_softmax: bool, grad_modifier: Union[None, str, GradModifier],
                reduce: Union[None, str, Reduction]) -> Tensor:
    rules.check_model(model, method)
    # the registry's name in the warnings of performance options not applied (multi.hooked_pass)
    maps = input_gradient_maps(model, x, target, grad_modifier=grad_modifier, reduce=reduce,
                               strip_softmax=strip_softmax, extra_modes=[rule], method=method.replace(" ", "_"))
    rule.check_rectified()  # a model without ReLUs: vanilla's map, not the rule's
    return maps


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def guided_backprop(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    unsupported: str = "error",
    strip_softmax: bool = True,
) -> Tensor:
    """Guided backpropagation: the input gradient with every ReLU passing back positive gradients only.

    At each ReLU (any form, see :mod:`salience.rules`) only positive gradients pass back, and only
    where the forward input was positive (Springenberg et al. 2015).
    ``x``: ``(B, C, H, W)``; returns ``(B, H, W)`` (``reduce="max_abs"``, default) or the raw
    ``(B, C, H, W)`` with ``reduce=None``; ``target``, ``grad_modifier``, ``reduce`` and
    ``strip_softmax`` as in :func:`salience.vanilla`. ``unsupported``: what to do with
    activations the rule is not defined for (GELU, SiLU, LeakyReLU, ...): ``"error"``
    (default), ``"warn"`` or ``"ignore"`` (both let the plain gradient through them). See
    :mod:`salience.rules`. TorchScript models are refused (the rule cannot see inside them).
    """
    return _ruled_maps(model, x, target, rules.guided(unsupported=unsupported), "guided backprop",
                       strip_softmax, grad_modifier, reduce)


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def deconvnet(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    reduce: Union[None, str, Reduction] = "max_abs",
    grad_modifier: Union[None, str, GradModifier] = None,
    unsupported: str = "error",
    strip_softmax: bool = True,
) -> Tensor:
    """Deconvnet: every ReLU passes back positive gradients only, whatever its forward input.

    Zeiler & Fergus 2014; keras-vis's ``backprop_modifier='relu'`` ("rectified" saliency).

    Shapes and options as in :func:`guided_backprop`.
    """
    return _ruled_maps(model, x, target, rules.deconvnet(unsupported=unsupported), "deconvnet",
                       strip_softmax, grad_modifier, reduce)
