"""Saliency methods: plain functions ``method(model, x, target=None, *, reduce=...) -> Tensor``.

``METHODS`` maps each method's public name to its function: the one registry that the CLI
and reports use to turn strings into methods. Every entry has the same contract,
``fn(model, x, target, **options)``: a target-free method (Eigen-CAM) is held through
:func:`as_method`, which takes the target and gives the one map for it (or for each of K targets).
A function from a user goes through :func:`as_method` too.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError

from salience.methods.vanilla import vanilla
from salience.methods.guided import deconvnet, guided_backprop
from salience.methods.gradcam import gradcam, guided_gradcam
from salience.methods.cams import eigencam, gradcam_plus_plus, hirescam, layercam, xgradcam
from salience.methods._multi import apply_method, as_method, is_target_free
from salience.methods.smoothgrad import smoothgrad
from salience.methods.integrated import input_x_gradient, integrated_gradients
from salience.methods.class_model import class_model
from salience.methods.transformer import attention_rollout, transformer_attribution
from salience.methods.scorecam import ablationcam, scorecam
from salience.methods.perturbation import occlusion, rise

METHODS: dict[str, Callable] = {
    "vanilla": vanilla,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "gradcam": gradcam,
    "guided_gradcam": guided_gradcam,
    "gradcam_plus_plus": gradcam_plus_plus,
    "hirescam": hirescam,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "eigencam": as_method(eigencam),  # the registry's contract: takes the target, one map for each
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "input_x_gradient": input_x_gradient,
    "scorecam": scorecam,
    "ablationcam": ablationcam,
    "occlusion": occlusion,
    "rise": rise,
    "attention_rollout": attention_rollout,
    "transformer_attribution": transformer_attribution,
}

TARGET_FREE_METHODS = frozenset(n for n, f in METHODS.items() if is_target_free(f))
"""The methods whose map does not depend on the target (Eigen-CAM): one map per image whatever the
class. Their entries in :data:`METHODS` take the target like every method (:func:`as_method`), so
callers need not know which they are; the functions themselves (``salience.eigencam``) take none."""

QUICK: dict[str, dict[str, Any]] = {"rise": {"masks": 256}}
"""Cheaper options for the reports that run every method on many images (``salience demo``,
``salience evaluate``, which also reruns each method on randomized models): RISE's 4000 masks (the
paper's number for 224 x 224 ImageNet images) cost 4000 forward passes per image; 256 masks keep
RISE's cost near SmoothGrad's 50 noisy copies with their backward passes on the small demo images.
A method called directly, or by ``salience explain``, keeps its own defaults."""

ATTENTION_METHODS = frozenset({"attention_rollout", "transformer_attribution"})
"""The methods that read attention matrices: they apply to transformers only (on other models they
raise a :class:`~salience.SalienceError` saying so)."""


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has global attention: an ``nn.MultiheadAttention``, or a module whose class
    name says attention (timm's, Hugging Face's), leaving out windowed attention (Swin), which the
    attention methods refuse. It only chooses defaults (see :func:`default_methods`); the attention
    methods themselves look at the operations that run."""
    def attention(m: nn.Module) -> bool:
        name = type(m).__name__.lower()
        return isinstance(m, nn.MultiheadAttention) or ("attention" in name and "window" not in name
                                                          and "swin" not in name)
    return any(attention(m) for m in model.modules())


HOOKED_METHODS = frozenset({"guided_backprop", "deconvnet", "gradcam", "guided_gradcam", "gradcam_plus_plus",
                            "hirescam", "xgradcam", "layercam", "eigencam", "scorecam", "ablationcam"}
                           | ATTENTION_METHODS)
"""The methods that read a layer's output with a hook, or change the backward pass of the
activations, or capture attention operations: a TorchScript model runs its own compiled graph, which
allows none of these, so they refuse it (vanilla, SmoothGrad, integrated gradients, input x gradient,
occlusion and RISE need only the model's output and the input's gradient)."""


def default_methods(model: nn.Module, x: Optional[Tensor] = None) -> list[str]:
    """The names of the methods that apply to ``model``: every method, less the attention methods
    on a model without attention and the :data:`HOOKED_METHODS` on a TorchScript model. What
    ``salience demo``, ``salience evaluate``, ``salience list`` and the examples run or show when no
    method is named.

    With an input ``x`` ``(B, C, H, W)``, the attention methods are kept only when attention
    rollout runs on ``x[:1]`` (one forward pass): both need global self-attention over the same
    ``N`` tokens in every layer and a class token, which attention that subsamples or pools tokens
    (LeViT, PVT v2, MViTv2, Hiera) or a model without a class token does not give."""
    script = isinstance(model, torch.jit.ScriptModule)
    attention = has_attention(model) and not script and (x is None or _attention_runs(model, x))
    return [n for n in METHODS if (attention or n not in ATTENTION_METHODS) and not (script and n in HOOKED_METHODS)]


def _attention_runs(model: nn.Module, x: Tensor) -> bool:
    """Whether attention rollout (whose requirements transformer attribution shares) runs on ``x[:1]``;
    any other error than its refusal keeps them, for the methods' own calls to report it."""
    try:
        attention_rollout(model, x[:1])
    except SalienceError:
        return False
    except Exception:  # noqa: BLE001 - not a refusal: the caller runs the methods and says what failed
        return True
    return True


__all__ = ["METHODS", "QUICK", "ATTENTION_METHODS", "HOOKED_METHODS", "TARGET_FREE_METHODS", "as_method", "apply_method",
           "is_target_free",
           "default_methods", "has_attention", "vanilla", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam",
           "gradcam_plus_plus", "hirescam", "xgradcam", "layercam", "eigencam", "smoothgrad", "integrated_gradients",
           "input_x_gradient", "class_model", "attention_rollout", "transformer_attribution", "scorecam",
           "ablationcam", "occlusion", "rise"]
