"""Sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

:func:`randomization` re-initializes the model's layers top-down (``"cascading"``) or one at a
time (``"independent"``) on a *copy* of the model, and :func:`data_randomization` compares the
maps of models trained on true and on shuffled labels. Both report Spearman rank correlation of
absolute and signed maps, SSIM, and the Pearson correlation of HOG features
(:func:`salience.evidence.compare.similarity`). :func:`random_logit` (Sixt et al. 2020) compares
the map of the predicted class with the map of a random other class.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from salience._core.autograd import check_input, forward_scores, model_call, predicted_classes
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.layers import resolve_layer
from salience._core.tensors import check_int, copy_model
from salience.evidence._checks import (MethodLike, check_method_map, check_seed, class_indices, image_seeds,
                                      method_maps, resolve_method, smoothgrad_seeds)
from salience.evidence.compare import SIMILARITIES, similarity
from salience.methods.integrated import collect_gaps
from salience.targets import TargetLike

__all__ = ["RandomizationResult", "randomization", "randomization_layers", "data_randomization", "random_logit"]


def _takes_reduce(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "reduce" in params


def _layer_names(layers: Sequence[str]) -> list[str]:
    """``layers`` of the randomization test as a list of names: one name for a string (its letters were
    taken as names: "no layer named 'h'"); an empty list is refused (``torch.stack``'s raw error)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise SalienceError("layers is empty: give the layers to re-initialize (randomization_layers(model, x) "
                            "lists them), or None for all")
    return names


def _signed_and_abs(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, target: TargetLike,
                    kwargs: dict, which: str) -> tuple[Tensor, Tensor]:
    """A method's map as (signed, absolute) ``(B, H, W)``: channel sum of the raw map and of its
    magnitude when the method can return ``(B, C, H, W)``, else the map and its magnitude.
    SmoothGrad with an int seed draws each image's noise from that image's content stream
    (:func:`salience.evidence._checks.smoothgrad_seeds`), not one stream over the batch. A map with
    NaN or infinite values is a :class:`SalienceError` naming the image and ``which`` model made it
    (the similarities refused it as "a contain NaN", or its rank correlation was NaN and left out of
    the mean without a word)."""
    kw = dict(kwargs)
    seeds = smoothgrad_seeds(fn, kwargs, x)
    if seeds is not None:
        kw["seed"] = seeds
    if "reduce" not in kw and _takes_reduce(fn):
        kw["reduce"] = None
    m = fn(model, x, target, **kw).detach()
    check_method_map(m, lambda j: f"image {j}, {which}",
                     "its similarity would be NaN: check the method on that model and input")
    if m.dim() == 4:
        return m.sum(1), m.abs().sum(1)
    return m, m.abs()


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def randomization_layers(model: nn.Module, x: Tensor) -> list[str]:
    """The layers :func:`randomization` re-initializes, in forward order (first layer first).

    Each module that owns parameters (conv, linear, ...) is one layer; a normalization layer
    (BatchNorm, GroupNorm, LayerNorm) joins the weight layer before it, so "a layer" is e.g.
    conv + its BatchNorm. Found with one forward pass of ``x[:1]`` on a copy of the model.
    """
    groups = _layer_groups(model, x)
    return [name for name, _ in groups]


NO_HOOKS = ("the model randomization test needs the order in which the forward pass calls the layers (forward "
            "hooks) and each layer's re-initialization, which a TorchScript model (torch.jit.ScriptModule) lacks; "
            "pass the original Python nn.Module")
"""Why the randomization test cannot run on a TorchScript model (the :class:`SalienceError` it raises)."""


def _layer_groups(model: nn.Module, x: Tensor) -> list[tuple[str, list[str]]]:
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError(NO_HOOKS)
    probe = copy_model(model)
    order: list[str] = []
    handles = []
    for name, mod in probe.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            def hook(m: nn.Module, i: object, o: object, name: str = name) -> None:
                if name not in order:
                    order.append(name)
            handles.append(mod.register_forward_hook(hook))
    try:
        with model_guard(probe), torch.no_grad(), model_call(model, x):
            probe(x[:1])
    finally:
        for h in handles:
            h.remove()
    mods = dict(probe.named_modules())
    groups: list[tuple[str, list[str]]] = []
    for name in order:
        if isinstance(mods[name], _NORMS) and groups:
            groups[-1][1].append(name)
        else:
            groups.append((name, [name]))
    if not groups:
        raise SalienceError("the model has no layer with parameters that its forward pass calls; nothing to randomize")
    return groups


def _step_seed(seed: int, step: int, j: int) -> int:
    """The RNG seed for member ``j`` of step ``step``: far from small seeds such as 0, so that the
    re-initialization of a model built under ``torch.manual_seed(0)`` does not reproduce it."""
    return ((int(seed) + 1) * 1_000_003 + 1000 * step + j) % 2 ** 63


def _reinit(module: nn.Module, seed: int) -> None:
    """Re-initialize one module's own parameters with its ``reset_parameters`` (seeded)."""
    devices = [p.device for p in module.parameters(recurse=False) if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}) if devices else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    if p.dim() >= 2:
                        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    else:
                        nn.init.uniform_(p, -0.1, 0.1)


@dataclass
class RandomizationResult:
    """What a randomization test measured.

    ``layers``: the re-initialized layers, in the order they were randomized (top first for
    ``"cascading"``); ``mode``; ``values[kind]``: per layer, the mean over images of the
    similarity ``kind`` (one of :data:`SIMILARITIES`) between the original and the randomized
    maps; ``per_image[kind]``: the same before averaging, ``(len(layers), B)``.
    """

    layers: list[str]
    mode: str
    values: dict[str, list[float]] = field(default_factory=dict)
    per_image: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> list[float]:
        return self.values[kind]

    def as_dict(self) -> dict[str, object]:
        """Plain lists, for JSON."""
        return {"mode": self.mode, "layers": list(self.layers), **{k: list(v) for k, v in self.values.items()}}


def randomization(
    model: nn.Module,
    x: Tensor,
    method: MethodLike,
    target: TargetLike = None,
    mode: str = "cascading",
    *,
    layers: Optional[Sequence[str]] = None,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> RandomizationResult:
    """Model parameter randomization test (Adebayo et al. 2018), on a copy of ``model``.

    ``"cascading"``: re-initialize the layers one after the other from the top (output) down,
    keeping earlier re-initializations; ``"independent"``: re-initialize one layer at a time,
    the rest as trained. After each step compute ``method(copy, x, target)`` and compare it to
    the original map with
    :func:`salience.evidence.compare.similarity`. A map that stays similar after the weights are
    destroyed is not explaining the model. ``layers``: dotted names in forward order (default
    :func:`randomization_layers`). ``target``: default the class the *original* model predicts,
    fixed for every step. Re-initialization uses each module's ``reset_parameters`` under a
    seeded, scoped RNG (a seed derived from ``seed`` and the step): the same seed gives the same
    numbers, and the global RNG is left as it was. The user's model is never modified.
    """
    if mode not in ("cascading", "independent"):
        raise SalienceError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    _, fn = resolve_method(method, method_kwargs)
    check_input(x, model)
    seed = check_seed(seed)
    kw = dict(method_kwargs or {})
    tgt = predicted_classes(model, x) if target is None else target
    work = copy_model(model)
    groups = _layer_groups(model, x)
    if layers is not None:
        known = dict(groups)
        chosen = []
        for name in _layer_names(layers):
            resolve_layer(work, name)  # a clear error for unknown names
            members = known.get(name, [n for n, m in work.named_modules()
                                       if (n == name or n.startswith(name + ".")) and
                                       any(True for _ in m.parameters(recurse=False))])
            if not members:
                raise SalienceError(f"layer {name!r} has no parameters to re-initialize")
            chosen.append((name, members))
        groups = chosen
    top_down = list(reversed(groups))
    mods = dict(work.named_modules())
    original = {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)  # extra state: any object
                for k, v in work.state_dict().items()}

    signed0, abs0 = _signed_and_abs(fn, work, x, tgt, kw, "the original model's map")
    per: dict[str, list[Tensor]] = {k: [] for k in SIMILARITIES}
    for step, (name, members) in enumerate(top_down):
        if mode == "independent":
            work.load_state_dict(original)
        for j, member in enumerate(members):
            _reinit(mods[member], _step_seed(seed, step, j))
        done = "and every layer above it " if mode == "cascading" and step else ""
        with collect_gaps():  # IG's completeness on a deliberately broken model is not the question: not warned
            signed, absolute = _signed_and_abs(fn, work, x, tgt, kw, f"the map after re-initializing {name!r} {done}"
                                               f"(step {step + 1} of {len(top_down)}, {mode}, seed={seed})")
        for k, v in similarity(signed0, signed, abs0, absolute).items():
            per[k].append(v.cpu())
    per_image = {k: torch.stack(v) for k, v in per.items()}
    values = {k: [float(torch.nanmean(row)) for row in v] for k, v in per_image.items()}
    return RandomizationResult(layers=[n for n, _ in top_down], mode=mode, values=values, per_image=per_image)


def data_randomization(
    train_fn: Callable[[Tensor, Tensor], nn.Module],
    images: Tensor,
    labels: Tensor,
    x: Tensor,
    method: MethodLike,
    target: TargetLike = None,
    *,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> dict[str, object]:
    """Data randomization test (Adebayo et al. 2018): train the same recipe on true and on
    shuffled labels and compare the two models' maps of ``x``.

    ``train_fn(images, labels) -> model`` is called twice: on ``(images, labels)`` and on
    ``(images, labels[perm])`` with a permutation drawn from ``seed``. A map that looks the same
    for a model that learned nothing but memorized noise does not depend on what was learned.
    ``target``: default the class predicted by the true-label model, used for both models.
    Returns ``{"values": {kind: mean}, "per_image": {kind: (B,)}, "train_accuracy":
    {"true": a, "shuffled": b}}`` (accuracy of each model on its own training labels).
    """
    check_input(images)  # before the two trainings: a raw error of the model after them cost both
    check_input(x)
    # float labels of whole numbers (2.0) are class indices, given to train_fn as they are
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype == torch.bool or labels.is_complex() or \
            labels.is_floating_point() and not bool((labels == labels.round()).all()):
        got = f"{labels.dtype}{tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise SalienceError(f"expected labels as a (N,) tensor of class indices (whole numbers), e.g. "
                            f"torch.as_tensor(labels), got {got}")
    if labels.shape[0] != images.shape[0]:
        raise SalienceError(f"got {labels.shape[0]} labels for {images.shape[0]} images")
    _, fn = resolve_method(method, method_kwargs)
    gen = torch.Generator().manual_seed(check_seed(seed))
    perm = torch.randperm(labels.shape[0], generator=gen).to(labels.device)
    shuffled = labels[perm]
    m_true = train_fn(images, labels)
    m_rand = train_fn(images, shuffled)
    kw = dict(method_kwargs or {})

    def accuracy(m: nn.Module, y: Tensor) -> float:
        pred = predicted_classes(m, images, batch_size=256)
        return float((pred == y.to(pred.device)).float().mean())

    tgt = predicted_classes(m_true, x) if target is None else target
    s0, a0 = _signed_and_abs(fn, m_true, x, tgt, kw, "the map of the model trained on the true labels")
    s1, a1 = _signed_and_abs(fn, m_rand, x, tgt, kw, "the map of the model trained on the shuffled labels")
    per = {k: v.cpu() for k, v in similarity(s0, s1, a0, a1).items()}
    return {
        "values": {k: float(torch.nanmean(v)) for k, v in per.items()},
        "per_image": per,
        "train_accuracy": {"true": accuracy(m_true, labels), "shuffled": accuracy(m_rand, shuffled)},
    }


def random_logit(
    model: nn.Module,
    x: Tensor,
    method: MethodLike,
    target: object = None,
    *,
    kind: str = "ssim",
    batch_size: int = 32,
    seed: int = 0,
    method_kwargs: Optional[dict] = None,
) -> Tensor:
    """Random-logit test (Sixt et al., "When Explanations Lie", ICML 2020): ``(B,)``, lower is better.

    The similarity ``kind`` (one of :data:`SIMILARITIES`, default SSIM of the absolute maps)
    between the map of each image's class (``target``, default the predicted class) and the map
    of another class drawn uniformly from the model's other outputs (image ``i``'s from its own
    generator, seeded from ``seed`` and its content, :func:`salience.evidence.image_seeds`). A map that
    looks the same whatever class it explains does not explain the class. Maps as ``(B, H, W)``
    (a ``(B, 1, H, W)`` map squeezed, a ``(B, C, H, W)`` one reduced by the channels' largest
    magnitude); both sets of maps run through the method ``batch_size`` images at a time.
    """
    if kind not in SIMILARITIES:
        raise SalienceError(f"kind must be one of {', '.join(SIMILARITIES)}, got {kind!r}")
    _, fn = resolve_method(method, method_kwargs)
    check_input(x, model)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    out = forward_scores(model, x[:1], strip_softmax=False)
    k = out.reshape(1, -1).shape[1]
    if k < 2:
        raise SalienceError(f"the random-logit test needs a classifier with at least 2 outputs; the model has {k}")
    cls = class_indices(model, x, target)
    draw = torch.cat([torch.randint(0, k - 1, (1,), generator=torch.Generator(device="cpu").manual_seed(s))
                      for s in image_seeds(x, check_seed(seed))]).to(cls.device)
    other = draw + (draw >= cls).long()  # uniform over the k - 1 classes that are not cls
    a = method_maps(fn, model, x, cls, batch_size=batch_size, kwargs=method_kwargs,
                    label=lambda i: f"image {i}, the map of its class {int(cls[i])}")
    b = method_maps(fn, model, x, other, batch_size=batch_size, kwargs=method_kwargs,
                    label=lambda i: f"image {i}, the map of the random other class {int(other[i])}")
    return similarity(a, b)[kind]
