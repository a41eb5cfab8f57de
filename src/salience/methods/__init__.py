"""Saliency methods: plain functions ``method(model, x, target=None, *, reduce=...) -> Tensor``.

``METHODS`` maps each method's public name to its function: the one registry that the CLI
and reports use to turn strings into methods.
"""
from __future__ import annotations

from typing import Callable

from salience.methods.vanilla import vanilla
from salience.methods.guided import deconvnet, guided_backprop
from salience.methods.gradcam import gradcam, guided_gradcam
from salience.methods.smoothgrad import smoothgrad
from salience.methods.integrated import input_x_gradient, integrated_gradients
from salience.methods.class_model import class_model
from salience.methods.transformer import attention_rollout, transformer_attribution

METHODS: dict[str, Callable] = {
    "vanilla": vanilla,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "gradcam": gradcam,
    "guided_gradcam": guided_gradcam,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "input_x_gradient": input_x_gradient,
}

# Methods for transformers only (they read attention matrices): not in METHODS, whose every entry the
# demo report and `salience evaluate` run on convolutional demo models, where these can only fail.
TRANSFORMER_METHODS: dict[str, Callable] = {
    "attention_rollout": attention_rollout,
    "transformer_attribution": transformer_attribution,
}

__all__ = ["METHODS", "TRANSFORMER_METHODS", "vanilla", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam",
           "smoothgrad", "integrated_gradients", "input_x_gradient", "class_model", "attention_rollout",
           "transformer_attribution"]
