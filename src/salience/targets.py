"""What to differentiate: a target maps the model's output to one score per sample.

A target is a small callable object used as the gradient seed. It receives the model's
output (the scores before softmax; see :func:`salience.vanilla`) of shape ``(B, K)``, or,
when its ``layer`` is set, the output of that inner layer, and returns scores ``(B,)``.
Samples are independent, so the gradient of the summed scores w.r.t. the input is the
per-sample gradient.

Anything a method accepts as ``target`` goes through :func:`as_target`:

==========================  ===================================================
``None``                    :func:`predicted`: the top class of each sample
``int``                     that class for every sample
int tensor ``(B,)``/list    one class per sample
a :class:`Target`           itself (``multilabel``, ``regression``, ``activation``...)
any other callable          :func:`custom`: ``fn(output) -> (B,)`` scores or a scalar loss
==========================  ===================================================
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from salience._core import derived as _derived
from salience._core.autograd import forward_scores
from salience._core.errors import SalienceError
from salience._core.layers import LayerSpec
from salience._core.tensors import check_int
from salience.reduce import small_values

__all__ = [
    "Target",
    "TargetLike",
    "as_target",
    "predicted",
    "classes",
    "multilabel",
    "regression",
    "activation",
    "custom",
    "Predicted",
    "Classes",
    "MultiLabel",
    "Regression",
    "Activation",
    "Custom",
    "split",
    "resolve",
    "checked_on_output",
    "check_output",
    "REGRESSION_MODES",
]


class Target:
    """Base class: ``target(output) -> scores (B,)``.

    ``layer``: if not ``None``, the target is evaluated on that layer's output instead of the
    model's, and the forward pass stops there. ``modify_gradient`` post-processes the input
    gradient (used by ``regression(mode="maintain")``); by default it does nothing.
    """

    layer: Optional[LayerSpec] = None

    def __call__(self, output: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def modify_gradient(self, grad: Tensor) -> Tensor:
        return grad

    def classes_for(self, batch: int) -> Optional[Tensor]:
        """The class each of ``batch`` items scores ``(batch,)`` long, when this target's scores are
        exactly one class's output per item and its gradient is not modified (what the engine's frozen
        gradient graph can compute, ``compile="freeze"``); ``None`` otherwise (the default)."""
        return None

    def resolved(self, output: Tensor) -> "Target":
        """This target fixed by the model's ``output`` on the clean images (``(B, K)``): the
        predicted class becomes that class; every other target stays as it is."""
        return self

    def map_part(self, grad: Tensor) -> Tensor:
        """The part of the (modified) gradient ``(B, C, H, W)`` this target's *map* shows: a
        reduction (``max_abs``, ``grayscale``...) is applied to it. All of it by default; the
        positive part for a regression direction (the raw ``reduce=None`` gradient stays signed)."""
        return grad

    def check_batch(self, batch: int) -> None:
        """Refuse per-image parts (one class per image) given for another number of images than
        ``batch``; a target without them fits any batch."""

    def for_items(self, owner: Tensor) -> "Target":
        """This target for items (noisy copies, path points) whose images are ``owner`` ``(n,)``:
        per-image classes are gathered; targets that are functions of each output stay as they are."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


TargetLike = Union[None, int, Sequence[int], Tensor, Target, Callable[[Tensor], Tensor]]


def _class_scores(output: Tensor) -> Tensor:
    """The model output as ``(B, K)`` class scores, or a clear error."""
    if output.dim() == 1:
        return output.unsqueeze(1)
    if output.dim() != 2:
        raise SalienceError(
            f"class targets need a model output of shape (B, K), got {tuple(output.shape)}; "
            "for other outputs pass a custom target, e.g. target=lambda out: out[:, 3].mean((1, 2))"
        )
    return output


def _index_on(idx: Tensor, device: torch.device) -> Tensor:
    """Class indices on ``device`` for a gather the backward pass saves: a copy of indices made under
    ``torch.inference_mode()`` (a caller's; SmoothGrad's and integrated gradients' predicted classes
    there), which autograd refuses to save ("Inference tensors cannot be saved for backward")."""
    idx = idx.to(device)
    return idx.clone() if idx.is_inference() and not torch.is_inference_mode_enabled() else idx


def _check_range(idx: Union[int, Tensor], k: int) -> None:
    """Refuse a class (an int, or any of a tensor's) outside ``0..k-1``: one synchronization for a tensor."""
    if isinstance(idx, int):
        bad: Optional[int] = None if 0 <= idx < k else idx
    else:
        out = (idx < 0) | (idx >= k)
        bad = int(idx[out][0]) if idx.numel() and bool(out.any()) else None
    if bad is not None:
        raise SalienceError(
            f"target class {bad} is out of range for a model with {k} output{'s' if k != 1 else ''} (valid: 0..{k - 1})"
        )


def _position(value: Any, name: str, what: str) -> int:
    """An index given as an int (numpy's, or a 0-d integer tensor or numpy array), or a :class:`SalienceError`:
    ``int()`` truncated ``1.5`` to 1, took the string ``"1"`` and ``True``, and raised a raw TypeError for a list."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool:
        return int(value)
    if type(value).__name__ == "ndarray" and type(value).__module__ == "numpy" and value.ndim == 0 \
            and value.dtype.kind in "iu":  # np.asarray(3), as a class target takes it
        return int(value)
    return check_int(value, name, minimum=None, what=what)


def _indices(value: Any, expected: str) -> Tensor:
    """``value`` (class indices: an int, a sequence, an array or a tensor) as a tensor, or a
    :class:`SalienceError` saying ``expected``: ``torch.as_tensor`` of a string was a raw TypeError
    ("new(): invalid data type 'str'"), of ``None`` a raw RuntimeError, of a list of strings a raw ValueError."""
    if isinstance(value, (str, bytes)) or value is None:
        raise SalienceError(f"{expected}, got {value!r}" + ("; None (the target itself) is each image's top class"
                                                            if value is None else ""))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SalienceError(f"{expected}, got {value!r}") from e


class _Indexed(Target):
    """A target that picks outputs by class index (:class:`Classes`, :class:`MultiLabel`): the indices' range
    is checked against the model's output; for the targets :meth:`Target.for_items` derives from one (``_root``)
    inside a many-pass call (:func:`salience._core.derived.run_scope`), once per call, on the root's indices,
    and the root's indices go to the device once per call: a check or a copy from the host per pass made the
    host wait for the device in each (a blocking copy synchronizes too)."""

    _root: Optional["_Indexed"] = None  # the target this one's items were derived from (for_items)
    _fits: Optional[int] = None  # a number of outputs the indices are known to fit (the predicted classes)

    def _values(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_fits(self, idx: Tensor, k: int) -> None:
        """``idx`` (this target's indices, on the output's device) checked against ``k`` outputs."""
        root = self._root
        if root is None:
            if self._fits != k:
                _check_range(idx, k)
            return
        if root._fits == k:
            return
        scope = _derived.current()
        if scope is None:
            _check_range(idx, k)
        elif scope.first(("target-range", id(root), k), root):
            _check_range(root._values(), k)  # all images' classes: the items' are among them

    def _on(self, device: torch.device) -> Tensor:
        """This target's indices on ``device``: copied once per many-pass call."""
        values = self._values()
        scope = _derived.current()
        if values.device == device:
            return values
        if scope is None:
            return values.to(device)
        return scope.once(("target-on", id(values), device), lambda: (values, values.to(device)))[1]

    def _item(self, item: "_Indexed") -> "_Indexed":
        """``item`` (a target :meth:`for_items` made from this one) marked as derived from it."""
        item._root = self._root or self
        return item


class Predicted(Target):
    """The score of each sample's top class (argmax of the output)."""

    def __call__(self, output: Tensor) -> Tensor:
        scores = _class_scores(output)
        top = scores.detach().argmax(dim=1, keepdim=True)
        return scores.gather(1, top).squeeze(1)

    def resolved(self, output: Tensor) -> Target:
        scores = _class_scores(output.detach())
        return Classes._fitting(scores.argmax(dim=1), scores.shape[1])  # an argmax: in range, not checked

    def for_items(self, owner: Tensor) -> Target:
        raise SalienceError("internal: resolve the predicted class (Target.resolved) before expanding targets")


class Classes(_Indexed):
    """The score of a given class: one for all samples, or one per sample."""

    def __init__(self, index: Union[int, Sequence[int], Tensor]):
        if isinstance(index, bool):
            raise SalienceError("expected a class index as an int, got a bool")
        if isinstance(index, int):
            self.index: Union[int, Tensor] = index
        else:
            t = _indices(index, "expected a class index (an int), or one per image (a list or an int tensor)")
            if t.numel() == 0:  # torch.as_tensor([]) is float32: it was "expected integer class indices"
                raise SalienceError(f"got no target class (an empty {type(index).__name__}); give one class per "
                                    "image, one int for all, or None for each image's top class")
            if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
                raise SalienceError(f"expected integer class indices, got a tensor of dtype {t.dtype}")
            if t.dim() > 1:
                raise SalienceError(
                    f"expected one class per sample, shape (B,), got shape {tuple(t.shape)}; "
                    "for several classes per sample use salience.targets.multilabel"
                )
            self.index = int(t) if t.dim() == 0 else t.long()

    @classmethod
    def known(cls, values: Tensor, *, outputs: int) -> "Classes":
        """One class per item ``(B,)`` (long) for a model of ``outputs`` outputs, checked here once to be in
        ``0..outputs-1`` (a synchronization where ``values`` are on an accelerator), so not again in each pass
        against an output of ``outputs`` classes (still against an output of any other width). An out-of-range
        class was trusted: a raw index error in the pass (a device-side assert on CUDA) instead of this error."""
        if values.dim() != 1 or values.dtype != torch.long:
            raise SalienceError(f"internal: known classes are a (B,) long tensor, got {tuple(values.shape)} "
                                f"{values.dtype}")
        k = check_int(outputs, "Classes.known's outputs", minimum=1, what="the model's number of classes")
        _check_range(values, k)
        return cls._fitting(values, k)

    @classmethod
    def _fitting(cls, values: Tensor, outputs: int) -> "Classes":
        """Classes ``(B,)`` known to be in ``0..outputs-1``, not checked: :meth:`known`'s, checked there, and
        :meth:`Predicted.resolved`'s argmax, in range by construction (no synchronization on an accelerator)."""
        made = cls(values)
        made._fits = outputs
        return made

    def __call__(self, output: Tensor) -> Tensor:
        scores = _class_scores(output)
        b, k = scores.shape
        if isinstance(self.index, int):
            _check_range(self.index, k)
            return scores[:, self.index]
        self.check_batch(b)
        idx = _index_on(self.index, scores.device)
        self._check_fits(idx, k)
        return scores.gather(1, idx.view(-1, 1)).squeeze(1)

    def _values(self) -> Tensor:
        assert isinstance(self.index, Tensor)
        return self.index

    def classes_for(self, batch: int) -> Optional[Tensor]:
        cls = type(self)
        if cls.__call__ is not Classes.__call__ or cls.modify_gradient is not Target.modify_gradient:
            return None  # a subclass that scores otherwise
        if isinstance(self.index, int):
            return torch.full((batch,), self.index, dtype=torch.long)
        return self.index if self.index.numel() == batch else None

    def check_batch(self, batch: int) -> None:
        if not isinstance(self.index, int) and self.index.numel() != batch:
            raise SalienceError(f"got {self.index.numel()} target classes for a batch of {batch} images; "
                                "give one per image (or one int for all)")

    def for_items(self, owner: Tensor) -> Target:
        return self if isinstance(self.index, int) else self._item(Classes(self._on(owner.device)[owner]))

    def __repr__(self) -> str:
        return f"Classes({self.index if isinstance(self.index, int) else self.index.tolist()})"


class MultiLabel(_Indexed):
    """The sum of several classes' scores: the same classes for every sample, or ``(B, k)``; a set, so a class
    given twice (in a row) is refused."""

    def __init__(self, indices: Union[Sequence[int], Tensor]):
        t = _indices(indices, "multilabel expects a non-empty list of class indices or a (B, k) integer tensor")
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() not in (1, 2) or t.numel() == 0:
            raise SalienceError(
                f"multilabel expects a non-empty list of class indices or a (B, k) integer tensor, got {indices!r}"
            )
        self.indices = t.long()
        _refuse_repeats(self.indices)

    @classmethod
    def _of(cls, indices: Tensor) -> "MultiLabel":
        """A target of checked indices (:meth:`for_items`'): no check, so no copy to the host per pass."""
        made = cls.__new__(cls)
        made.indices = indices
        return made

    def __call__(self, output: Tensor) -> Tensor:
        scores = _class_scores(output)
        b, k = scores.shape
        idx = _index_on(self.indices, scores.device)
        self._check_fits(idx, k)
        if idx.dim() == 1:
            return scores[:, idx].sum(dim=1)
        self.check_batch(b)
        return scores.gather(1, idx).sum(dim=1)

    def check_batch(self, batch: int) -> None:
        if self.indices.dim() == 2 and self.indices.shape[0] != batch:
            raise SalienceError(f"multilabel got class sets for {self.indices.shape[0]} samples, but the batch "
                                f"has {batch}; give one row per image (or one list for all)")

    def for_items(self, owner: Tensor) -> Target:
        if self.indices.dim() == 1:  # the same classes for every item: on the items' device, once per call
            return self._item(MultiLabel._of(self._on(owner.device)))
        return self._item(MultiLabel._of(self._on(owner.device)[owner]))

    def _values(self) -> Tensor:
        return self.indices

    def __repr__(self) -> str:
        return f"MultiLabel({self.indices.tolist()})"


def _refuse_repeats(indices: Tensor) -> None:
    """Refuse a class given twice in multilabel's set (in a row of a ``(B, k)`` one): it was summed twice. Peers
    set no rule (Captum and tf-keras-vis pick one class per image; keras-vis's ``filter_indices`` loop sums a
    repeat); a repeat in a set is a slip, and dropping it would hide it (``tests/test_s39_small_targets.py``)."""
    rows = indices.detach().cpu().reshape(1, -1) if indices.dim() == 1 else indices.detach().cpu()
    ordered = rows.sort(dim=1).values
    same = ordered[:, 1:] == ordered[:, :-1]
    if not bool(same.any()):
        return
    r = int(same.any(dim=1).nonzero()[0])
    c = int(ordered[r, 1:][same[r]][0])
    n = int((rows[r] == c).sum())
    where = f" in row {r}" if indices.dim() == 2 else ""
    raise SalienceError(f"multilabel got class {c} {'twice' if n == 2 else f'{n} times'}{where}: it takes a set of "
                        "classes, each score summed once; give each class once (a class that should count more: "
                        "targets.custom(lambda out: 2 * out[:, 1] + out[:, 3]))")


REGRESSION_MODES = ("increase", "decrease", "maintain")


class Regression(Target):
    """A regression output: what increases it, decreases it, or keeps it as it is.

    ``increase``: the gradient of the output; ``decrease``: of its negation; ``maintain``:
    ``|1/grad|`` (keras-vis's ``small_values``): the pixels the output is least sensitive to.
    A reduced map of ``increase`` / ``decrease`` shows the positive part of that gradient (the
    default ``max_abs`` gives ``max_c max(g, 0)``, so the two maps differ and do not overlap);
    ``reduce=None`` returns the signed gradient.
    """

    def __init__(self, index: int = 0, mode: str = "increase"):
        if mode not in REGRESSION_MODES:
            raise SalienceError(f"regression mode must be one of {', '.join(REGRESSION_MODES)}; got {mode!r}")
        self.index = _position(index, "regression index", "the output's position")
        self.mode = mode

    def __call__(self, output: Tensor) -> Tensor:
        out = output.reshape(output.shape[0], -1)
        if not 0 <= self.index < out.shape[1]:
            raise SalienceError(
                f"regression output {self.index} is out of range for a model with {out.shape[1]} outputs"
            )
        y = out[:, self.index]
        return -y if self.mode == "decrease" else y

    def modify_gradient(self, grad: Tensor) -> Tensor:
        return small_values(grad) if self.mode == "maintain" else grad

    def map_part(self, grad: Tensor) -> Tensor:
        # keras-vis keeps the sign: the increase map is where the gradient of the output is
        # positive, the decrease map where it is negative (the gradient of -output is positive).
        return grad if self.mode == "maintain" else grad.clamp(min=0)

    def __repr__(self) -> str:
        return f"Regression(index={self.index}, mode={self.mode!r})"


class Activation(Target):
    """The mean activation of one channel (filter) of an inner layer: conv filter saliency.

    The forward pass stops at ``layer`` (its first call, if the module is reused).
    """

    def __init__(self, layer: LayerSpec, channel: int):
        self.layer = layer
        self.channel = _position(channel, "activation channel", "the filter's index")

    def __call__(self, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise SalienceError(
                f"activation target expects the layer to output (B, C, ...), got "
                f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
            )
        c = output.shape[1]
        if not 0 <= self.channel < c:
            raise SalienceError(
                f"channel {self.channel} is out of range for layer {self.layer!r} with {c} channels (valid: 0..{c - 1})"
            )
        a = output[:, self.channel]
        return a.reshape(a.shape[0], -1).mean(dim=1)

    def __repr__(self) -> str:
        return f"Activation({self.layer!r}, channel={self.channel})"


class Custom(Target):
    """Any function of the output (or of ``layer``'s output): scores ``(B,)`` or a scalar loss."""

    def __init__(self, fn: Callable[[Tensor], Tensor], layer: Optional[LayerSpec] = None):
        if not callable(fn):
            raise SalienceError(f"custom target needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.layer = layer

    def __call__(self, output: Tensor) -> Tensor:
        return self.fn(output)

    def __repr__(self) -> str:
        return f"Custom({getattr(self.fn, '__name__', repr(self.fn))})"


def predicted() -> Target:
    """The top class of each sample (the default)."""
    return Predicted()


def classes(index: Union[int, Sequence[int], Tensor]) -> Target:
    """One class for all samples (``int``) or one per sample (``(B,)``)."""
    return Classes(index)


def multilabel(indices: Union[Sequence[int], Tensor]) -> Target:
    """Several classes at once: the sum of their scores."""
    return MultiLabel(indices)


def regression(index: int = 0, mode: str = "increase") -> Target:
    """A regression output; ``mode`` is ``"increase"``, ``"decrease"`` or ``"maintain"``."""
    return Regression(index, mode)


def activation(layer: LayerSpec, channel: int) -> Target:
    """Mean activation of filter ``channel`` of ``layer`` (a module or a dotted name)."""
    return Activation(layer, channel)


def custom(fn: Callable[[Tensor], Tensor], layer: Optional[LayerSpec] = None) -> Target:
    """Any function of the output, e.g. a loss; with ``layer``, of that layer's output."""
    return Custom(fn, layer)


def as_target(target: TargetLike) -> Target:
    """Turn anything a method accepts as ``target`` into a :class:`Target`."""
    if target is None:
        return Predicted()
    if isinstance(target, Target):
        return target
    if isinstance(target, bool):
        raise SalienceError("expected a target class as an int, got a bool")
    if isinstance(target, np.ndarray):  # labels from numpy: as a tensor (its __index__ takes 0-d arrays only)
        target = torch.as_tensor(target)
    if isinstance(target, (int, Tensor, list, tuple)):
        return Classes(target)  # type: ignore[arg-type]
    if getattr(target, "ndim", 0) >= 1 and hasattr(target, "tolist") and not callable(target):
        return Classes(torch.as_tensor(target.tolist()))  # a numpy array of class indices, one per image
    if hasattr(target, "__index__") and not callable(target):
        return Classes(int(target))  # numpy integers
    if callable(target):
        return Custom(target)
    raise SalienceError(
        f"cannot use {type(target).__name__} as a target; pass None, a class index, a tensor of "
        "indices, a salience.targets.Target, or a function of the output"
    )


def layers_tag(targets: Sequence[Target]) -> str:
    """Which layer each of ``targets`` reads (``-``: the model's output), for a many-pass run's tag
    (:class:`salience._core.perf.Run`): a target on a layer stops the forward pass there, so an item's memory is
    a fraction of a whole pass's, and the memory probe's bytes per item are reused by a later call of the same
    tag (a later call on the output took the layer's: chunks many times what ``max_memory`` allows; session 45's
    review). A module layer by its ``id`` (a module of the model: replacing it changes the model's structure,
    which forgets the probes)."""
    return ",".join("-" if t.layer is None else t.layer if isinstance(t.layer, str) else f"#{id(t.layer)}"
                    for t in targets)


def split(target: Any, batch: Optional[int] = None) -> tuple[list[Target], bool]:
    """``target`` -> (targets, several). Several targets per image are a ``(B, K)`` integer tensor
    (or nested list), or a list/tuple of targets (``Target`` objects, functions, ``None``, class
    indices) with at least one that is not a class index; anything else is one target (see
    :func:`as_target`). ``batch``: the ``B`` a ``(B, K)`` tensor, and every per-image target (one
    class or one class set per image, :meth:`Target.check_batch`), must have: the methods that
    index targets by image (SmoothGrad's copies, RISE's masked images) would otherwise use the first
    ``B`` of more classes silently."""
    targets, several = _split(target, batch)
    if batch is not None:
        for t in targets:
            t.check_batch(batch)
    return targets, several


def _split(target: Any, batch: Optional[int]) -> tuple[list[Target], bool]:
    if isinstance(target, np.ndarray):  # a (B,) array is one class per image, a (B, K) one K targets
        target = torch.as_tensor(target)
    if isinstance(target, Tensor) and target.dim() == 2:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise SalienceError(f"expected integer class indices (B, K), got a tensor of dtype {target.dtype}")
        if target.shape[1] == 0:
            raise SalienceError("the target tensor has K = 0 targets per image")
        if batch is not None and target.shape[0] != batch:
            raise SalienceError(
                f"several targets per image are a (B, K) tensor with B = {batch} (the batch), got shape "
                f"{tuple(target.shape)}"
            )
        return [Classes(target[:, k]) for k in range(target.shape[1])], True
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, (list, tuple)) for t in target):
        return _split(_indices(target, "several targets per image are a (B, K) integer tensor or nested list"), batch)
    if isinstance(target, (list, tuple)) and target and any(
            t is None or isinstance(t, Target) or callable(t) for t in target):
        return [as_target(t) for t in target], True
    return [as_target(target)], False


def resolve(targets: Sequence[Target], model: nn.Module, x: Tensor, *, strip_softmax: bool = True,
            output: Optional[Tensor] = None) -> list[Target]:
    """The targets fixed on the clean images ``x`` (:meth:`Target.resolved`): the predicted class
    becomes the class the model predicts for ``x``. One forward pass without gradient, and only
    when a target needs it (or pass the model's ``output`` for ``x``)."""
    if not any(isinstance(t, Predicted) for t in targets):
        return list(targets)
    if output is None:
        output = forward_scores(model, x, strip_softmax=strip_softmax)
    return [t.resolved(output) for t in targets]


def checked_on_output(targets: Sequence[Target]) -> list[Target]:
    """The targets whose fit to a model shows only against its output: those that pick outputs by
    index (a class, one class per image, class sets, a regression output). The predicted class fits
    any model; a function of the output, and a target of an inner layer, are not checked here."""
    return [t for t in targets if isinstance(t, (Classes, MultiLabel, Regression))]


def check_output(targets: Sequence[Target], output: Tensor) -> None:
    """Refuse the targets that do not fit the model's ``output`` ``(B, ...)`` (its scores) with the
    error scoring them raises in every other method (a class out of range, a negative one, per-image
    classes for another batch, an output that holds no class scores): each target of
    :func:`checked_on_output` is scored on ``output`` once, and the scores are dropped. For the
    methods whose map does not depend on the target (Eigen-CAM, attention rollout), so that a wrong
    target is a user error there too."""
    with torch.no_grad():
        for t in checked_on_output(targets):
            t(output)
