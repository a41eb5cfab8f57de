"""What a loaded model needs beside its weights: input size, preprocessing, class names.

Every model that :func:`salience.load_model` returns carries a :class:`ModelInfo` as the plain
attribute ``model.salience_info``; :func:`model_info` reads it (or a neutral default for a
user's own model). Preprocessing lives *outside* the model so that saliency is taken w.r.t. the
tensor the model actually sees; ``mean``/``std`` say how that tensor was made from an image in
``[0, 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

__all__ = ["ModelInfo", "model_info", "attach_info"]


@dataclass(frozen=True)
class ModelInfo:
    """Description of a model's input and output.

    ``input_size``: ``(H, W)`` the model expects (``None``: any size).
    ``resize``: shorter side to resize to before a centre crop of ``input_size`` (torchvision's
    ``Resize(256) + CenterCrop(224)``); ``None``: resize straight to ``input_size``.
    ``mean``/``std``: per-channel normalization applied after scaling to ``[0, 1]`` (``None``:
    none; the model takes ``[0, 1]`` images). ``channels``: 3 for RGB, 1 for grayscale.
    ``class_names``: one name per output (classification) or per regressed quantity.
    ``task``: ``"classification"`` or ``"regression"``. ``default_layer``: dotted name of the
    layer Grad-CAM uses when none is given. ``layout``: ``"NCHW"`` (PyTorch) or ``"NHWC"`` (Keras).
    ``interpolation``: how images are resized, ``"bilinear"`` or ``"bicubic"`` (both antialiased).
    ``output``: which part of what the model's forward returns holds the scores, when it is not
    a tensor (:func:`salience._core.autograd.unwrap_output`): ``None`` (the rule), a dict key, a
    sequence index, or a function of the returned value (``salience.loading.select_output``).
    """

    name: str = "model"
    input_size: Optional[tuple[int, int]] = None
    resize: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    channels: int = 3
    class_names: Optional[tuple[str, ...]] = None
    task: str = "classification"
    default_layer: Optional[str] = None
    layout: str = "NCHW"
    interpolation: str = "bilinear"
    output: Any = None
    extra: dict = field(default_factory=dict, compare=False)

    def class_name(self, index: int) -> str:
        """The name of output ``index``, or the index as a string when there are no names."""
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` attached to ``model``, or a neutral default."""
    info = getattr(model, "salience_info", None)
    return info if isinstance(info, ModelInfo) else ModelInfo(name=type(model).__name__)


def max_batch(model: nn.Module) -> Optional[int]:
    """The largest batch ``model`` runs (``info.extra["max_batch"]``: a ``torch.export`` program exported
    with ``Dim("batch", max=N)`` refuses more), or ``None`` for no limit. Many-pass methods chunk
    their passes to it."""
    n = model_info(model).extra.get("max_batch")
    return int(n) if n is not None else None


def attach_info(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Attach ``info`` to ``model`` (as ``model.salience_info``) and return the model."""
    object.__setattr__(model, "salience_info", info)
    return model


def _names(names: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    return None if names is None else tuple(str(n) for n in names)
