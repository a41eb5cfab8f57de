"""Saliency methods: plain functions ``method(model, x, target=None, *, reduce=...) -> Tensor``.

``METHODS`` maps each method's public name to its function: the one registry that the CLI
and reports use to turn strings into methods. Every entry has the same contract,
``fn(model, x, target, **options)``: a target-free method (Eigen-CAM) is held through
:func:`as_method`, which takes the target and gives the one map for it (or for each of K targets).
A function from a user goes through :func:`as_method` too.

The public methods (``METHODS``' entries, this package's names for them, which ``salience.gradcam`` is, and
``class_model``, which is not in ``METHODS``) are the functions their modules define under
:func:`~salience.methods._multi.checked`: real Python functions with the implementation's name, docstring and
signature (``help()``), pickled by reference, but a call with a keyword the method has no option for, or a
positional argument missing or too many, is an :class:`~salience._core.errors.ArgumentError` (a
:class:`SalienceError` and a ``TypeError``) naming the method, the closest option and the options it takes
(SmoothGrad's, for a keyword neither it nor its method takes, too).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from salience._core import perf as _perf
from salience._core.autograd import model_call
from salience._core.checkpoints import plain_checkpoints
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.tensors import model_device

from salience.methods.vanilla import vanilla
from salience.methods.guided import deconvnet, guided_backprop
from salience.methods.gradcam import default_layer_readable, gradcam, guided_gradcam
from salience.methods.cams import eigencam, gradcam_plus_plus, hirescam, layercam, xgradcam
from salience import rules
from salience.methods._tokens import _check_grid, _check_prefix, patch_embeddings
from salience.methods._multi import apply_method, as_method, is_target_free
from salience.methods.smoothgrad import smoothgrad
from salience.methods.integrated import input_x_gradient, integrated_gradients
from salience.methods.class_model import class_model
from salience.methods.transformer import attention_rollout, transformer_attribution
from salience.methods.scorecam import ablationcam, scorecam
from salience.methods.perturbation import occlusion, rise

# class_model: a public method, not in METHODS (it makes an image, it does not explain one)
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
# each entry is the checked function its module defines (salience.gradcam is METHODS["gradcam"]; held to it by
# tests/test_s58_functions.py); Eigen-CAM's function takes no target, its entry (eigencam.as_method) does

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


LAYER_METHODS = frozenset({"gradcam", "guided_gradcam", "gradcam_plus_plus", "hirescam", "xgradcam", "layercam",
                           "eigencam", "scorecam", "ablationcam"})
"""The methods that read a layer's output, the Grad-CAM default layer when ``layer=`` is not given
(:func:`salience.methods.gradcam.default_layer`): on a model with no default layer (CrossViT's two
branches) they refuse unless a layer is named."""


GUIDED_METHODS = frozenset({"guided_backprop", "deconvnet", "guided_gradcam"})
"""The methods that run a backprop rule (:mod:`salience.rules`): with their defaults they refuse a model whose
pass calls an activation the rule is not defined for (GELU, SiLU...) or no ReLU at all (their map would be
vanilla's), so :func:`default_methods` leaves them out there."""


def default_methods(model: nn.Module, x: Optional[Tensor] = None, *, grid: Optional[tuple[int, int]] = None,
                    prefix_tokens: Optional[int] = None) -> list[str]:
    """The names of the methods that run on ``model`` with their defaults: what ``salience demo``,
    ``salience evaluate``, ``salience list --model`` and the examples run or show when no method is
    named. Left out: the :data:`HOOKED_METHODS` on a TorchScript model; the :data:`GUIDED_METHODS` on a model whose
    pass calls an activation the backprop rules are not defined for (GELU, SiLU, LeakyReLU...) or no ReLU (their
    default refusal, :func:`_rules_apply`); the attention methods on a
    model where attention rollout refuses it (on an image; without one, a model without attention modules); the :data:`LAYER_METHODS`
    where the Grad-CAM default layer is refused (CrossViT: they run with ``layer=``) or its output's layout cannot
    be read without ``grid=`` / ``prefix_tokens=`` (tokens with several readings, :mod:`salience.methods._tokens`).
    ``grid`` / ``prefix_tokens``: the user's, which the CAMs and the attention methods will be given (the
    command line's ``--grid`` / ``--prefix-tokens``, ``method_options``): the tokens are read with them, so those
    methods are kept where they read them (a bad value is a :class:`SalienceError` naming it).

    The attention methods need global self-attention over the same ``N`` tokens in every layer and a
    class token, which attention that subsamples or pools tokens (LeViT, PVT v2, MViTv2, Hiera) or a
    model without a class token does not give; and the default layer may depend on what the layers
    output. The guided methods are decided by the activations the search's pass calls (functional ones too,
    :class:`salience.rules.ActivationCount`: no pass of their own). Both are decided by running the default-layer
    search and, where its pass saw an attention
    operation or module (or the modules' names say attention), attention rollout, once each, on an image: ``x[:1]``, or without ``x`` a random image of the model's input size
    (:class:`~salience._core.info.ModelInfo`, known for a model from :func:`salience.load_model`).
    Without either (a bare module, or a model that cannot take that image), only what the modules
    say: the attention methods are kept on a model with attention modules, the layer methods are
    left out on a model with several patch embeddings (kept with ``grid`` / ``prefix_tokens``), the guided
    methods left out on a model with an activation module the rules are not defined for (``nn.GELU``...)."""
    tokens = {"grid": _check_grid(grid), "prefix_tokens": _check_prefix(prefix_tokens)}
    if isinstance(model, torch.jit.ScriptModule):
        return [n for n in METHODS if n not in HOOKED_METHODS and n not in ATTENTION_METHODS]
    image = x[:1] if x is not None else _model_image(model)
    # with an image, attention rollout decides alone: attention written as a bare function (SDPA or a softmax
    # in a module of any name) runs there too; without one, the modules' names say. The search's pass also says
    # which activations a backprop rule meets there ("guided": no pass of _rules_apply's own)
    seen: dict = {}
    layer = _default_layer_found(model, image, seen, tokens)
    # the search's pass saw no attention operation or module: attention rollout would refuse; not run
    attention = (has_attention(model) if image is None
                 else (seen.get("attention", True) or has_attention(model)) and _attention_runs(model, image, tokens))
    guided = seen["guided"] if seen.get("guided") is not None else _rules_apply(model, image)
    return [n for n in METHODS if (attention or n not in ATTENTION_METHODS) and (layer or n not in LAYER_METHODS)
            and (guided or n not in GUIDED_METHODS)]


def _model_image(model: nn.Module) -> Optional[Tensor]:
    """A random image ``(1, C, H, W)`` of the model's :class:`~salience._core.info.ModelInfo` input size
    (a fixed seed, the global one untouched), or ``None`` when the size is not known or the model cannot
    take the image (what the methods would then do is not known: :func:`default_methods` keeps them)."""
    info = model_info(model)
    if info.input_size is None:
        return None
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, info.channels, *info.input_size, generator=g).to(model_device(model))
    try:
        with model_guard(model), torch.no_grad(), model_call(model, image):
            model(image)
    except SalienceError:
        return None
    return image


def _default_layer_found(model: nn.Module, image: Optional[Tensor], seen: dict, tokens: dict) -> bool:
    """Whether the CAMs find their default layer on ``image`` and read its output's layout with ``tokens`` (the
    user's ``grid`` / ``prefix_tokens``; one forward pass, two where the tokens' grid is read off the model's own
    maps; ``seen`` as in :func:`~salience.methods.gradcam.default_layer_readable`); without an image, whether the
    modules allow one: a layer the model names, at most one patch embedding, or the tokens' reading given."""
    if image is not None:
        try:
            return default_layer_readable(model, image, seen, **tokens)
        except Exception:  # noqa: BLE001 - not a refusal: the CAMs' own calls say what failed
            return True
    named = getattr(model, "salience_default_layer", None) is not None or model_info(model).default_layer
    given = any(v is not None for v in tokens.values())
    return bool(named) or given or len(patch_embeddings(model, model_info(model).channels)) <= 1


def _rules_apply(model: nn.Module, image: Optional[Tensor]) -> bool:
    """Whether guided backprop with its defaults takes ``model`` (:data:`GUIDED_METHODS`) where the default-layer
    search's pass did not say it (no image, a pass that failed): its activation modules say so where they can
    (:func:`salience.rules.activation_kind`: one the rules are not defined for: no; ReLUs and none such: yes), else
    a forward pass of ``image`` under the guided rule, counting (``unsupported="ignore"``: nothing raised) the
    rectifiers and the activations it is not defined for; without an image, kept (the methods' own calls refuse it)."""
    kinds = {rules.activation_kind(m) for m in model.modules()}
    if "unsupported" in kinds:
        return False
    if "rectifier" in kinds or image is None:
        return True
    rule = rules.guided(unsupported="ignore")
    one = image.detach().clone().requires_grad_(True)  # the rule counts the rectifiers of a pass with gradients
    try:
        # a checkpoint run as a plain call, as the methods' passes run it (a reentrant one runs its ReLUs without
        # gradients, where the rule counts none)
        with model_guard(model), torch.inference_mode(False), torch.enable_grad(), plain_checkpoints(), \
                model_call(model, one), rule:
            model(one)
    except Exception:  # noqa: BLE001 - not the rule's refusal: the methods' own calls say what failed
        return True
    return rule.rectified > 0 and not rule.unsupported_seen


def _attention_runs(model: nn.Module, x: Tensor, tokens: dict) -> bool:
    """Whether attention rollout (whose requirements transformer attribution shares) runs on ``x[:1]`` with
    ``tokens`` (the user's ``grid`` / ``prefix_tokens``); any other error than its refusal keeps them, for the
    methods' own calls to report it. Run with the default options (:func:`salience._core.perf.plain`): a probe, not
    the user's call, so it neither depends on the performance settings nor gives their once-per-process warnings."""
    try:
        with _perf.plain():
            attention_rollout(model, x[:1], **tokens)
    except SalienceError:
        return False
    except Exception:  # noqa: BLE001 - not a refusal: the caller runs the methods and says what failed
        return True
    return True


__all__ = ["METHODS", "QUICK", "ATTENTION_METHODS", "HOOKED_METHODS", "GUIDED_METHODS", "TARGET_FREE_METHODS", "LAYER_METHODS",
           "as_method", "apply_method", "is_target_free",
           "default_methods", "has_attention", "vanilla", "guided_backprop", "deconvnet", "gradcam", "guided_gradcam",
           "gradcam_plus_plus", "hirescam", "xgradcam", "layercam", "eigencam", "smoothgrad", "integrated_gradients",
           "input_x_gradient", "class_model", "attention_rollout", "transformer_attribution", "scorecam",
           "ablationcam", "occlusion", "rise"]
