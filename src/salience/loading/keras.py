"""Keras 3 models as PyTorch modules, so that every salience method works on them.

Keras 3 runs on several backends; on its PyTorch backend (``KERAS_BACKEND=torch``) a Keras model
*is* a ``torch.nn.Module`` whose weights are ``torch.nn.Parameter``s, and its forward pass is made
of torch operations. :func:`wrap_keras` puts a thin adapter around it: :class:`KerasModel` takes
the PyTorch layout ``(B, C, H, W)`` and permutes to Keras's channels-last ``(B, H, W, C)`` inside,
so saliency maps come out in the usual ``(B, H, W)`` / ``(B, C, H, W)``. The user's Keras model is
never modified.

* A final softmax (``Dense(..., activation="softmax")`` or a ``Softmax``/``Activation`` layer)
  runs ``torch.nn.functional.softmax`` on this backend, so salience's usual softmax stripping
  applies: class scores are taken before it.
* The Keras layers are registered in the adapter as ``layers.<name>`` (dots in names become
  ``_``), so ``targets.activation``/``gradcam``-style layer arguments can name them. Their outputs
  are channels-last: a filter of a conv layer is ``output[..., k]``, not ``output[:, k]``.

Keras is an optional dependency (``pip install salience[keras]``); the backend must be torch:
this module sets ``KERAS_BACKEND=torch`` when Keras is not imported yet and refuses a Keras that
was already imported with another backend.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor, nn

from salience._core.errors import SalienceError
from salience._core.info import ModelInfo, attach_info

__all__ = ["import_keras", "is_keras_model", "KerasModel", "wrap_keras", "load_keras", "find_layer_idx",
           "layer_module_name"]


def import_keras() -> Any:
    """The ``keras`` module on its PyTorch backend, or a :class:`SalienceError` saying what to do."""
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND")
        if wanted is not None and wanted != "torch":
            raise SalienceError(
                f"salience needs Keras on its PyTorch backend, but KERAS_BACKEND={wanted!r}; set "
                "KERAS_BACKEND=torch before starting Python"
            )
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras  # type: ignore[import-not-found]
    except ImportError:
        raise SalienceError(
            "Keras models need keras 3 with the PyTorch backend: pip install 'keras>=3' (or salience[keras])"
        ) from None
    version = getattr(keras, "__version__", "0")
    if int(version.split(".")[0]) < 3:
        raise SalienceError(f"salience supports Keras 3 (PyTorch backend); found keras {version}; pip install 'keras>=3'")
    backend = keras.backend.backend()
    if backend != "torch":
        raise SalienceError(
            f"keras was imported with the {backend!r} backend; salience needs the PyTorch backend. Set "
            "KERAS_BACKEND=torch before keras is first imported (at the top of your script, or in the shell)"
        )
    return keras


def is_keras_model(obj: Any) -> bool:
    """Whether ``obj`` is a Keras model (checked without importing Keras)."""
    return any(c.__module__.split(".")[0] == "keras" and c.__name__ in ("Model", "Functional", "Sequential")
               for c in type(obj).__mro__)


def layer_module_name(layer: Any) -> str:
    """The dotted name under which :class:`KerasModel` registers a Keras layer: ``layers.<name>``."""
    return "layers." + str(layer.name).replace(".", "_")


def _input_shape(model: Any) -> Optional[tuple]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs or len(inputs) != 1:
        return None
    return tuple(inputs[0].shape)


class KerasModel(nn.Module):
    """A Keras 3 model (PyTorch backend) as an ``nn.Module`` taking ``(B, C, H, W)``.

    ``forward`` permutes image batches to ``(B, H, W, C)``, calls the Keras model in inference mode
    (``training=False``) and returns its output unchanged. ``keras_model`` is the wrapped model;
    its layers are registered as ``layers.<name>``.
    """

    def __init__(self, model: Any, *, channels_last: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise SalienceError(
                f"{type(model).__name__} is not a torch module: the Keras model was built with another "
                "backend; set KERAS_BACKEND=torch before keras is first imported"
            )
        self.keras_model = model
        self.channels_last = channels_last
        layers = nn.ModuleDict()
        for layer in getattr(model, "layers", []):
            if isinstance(layer, nn.Module):
                key = layer_module_name(layer)[len("layers."):]
                if key not in layers:
                    layers[key] = layer
        self.layers = layers

    def forward(self, x: Tensor) -> Any:
        if self.channels_last and x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return self.keras_model(x, training=False)


def wrap_keras(model: Any, *, name: Optional[str] = None) -> KerasModel:
    """Wrap a Keras 3 model as a :class:`KerasModel` with a :class:`ModelInfo` (``layout="NHWC"``)."""
    keras = import_keras()
    if isinstance(model, KerasModel):
        return model
    if not isinstance(model, keras.Model):
        raise SalienceError(f"expected a keras.Model, got {type(model).__name__}")
    shape = _input_shape(model)
    if shape is None:
        raise SalienceError(
            "the Keras model has no known input shape (or several inputs); build it with keras.Input(shape=...) "
            "or call it once on a batch before explaining it"
        )
    channels_last = keras.config.image_data_format() == "channels_last"
    input_size: Optional[tuple[int, int]] = None
    channels = 3
    if len(shape) == 4:
        h, w, c = shape[1:] if channels_last else (shape[2], shape[3], shape[1])
        input_size = (int(h), int(w)) if h is not None and w is not None else None
        channels = int(c) if c is not None else 3
    wrapper = KerasModel(model, channels_last=channels_last)
    info = ModelInfo(
        name=name or f"keras:{model.name}",
        input_size=input_size,
        channels=channels,
        layout="NHWC" if channels_last else "NCHW",
        extra={"keras_class": type(model).__name__},
    )
    return attach_info(wrapper, info)  # type: ignore[return-value]


def load_keras(path: Union[str, Path]) -> KerasModel:
    """Load a ``.keras`` file (or a legacy ``.h5`` that Keras 3 can read, e.g. a Teachable Machine
    export) without compiling it, and return it wrapped by :func:`wrap_keras`."""
    keras = import_keras()
    p = Path(path)
    if not p.exists():
        raise SalienceError(f"{p}: no such file")
    try:
        model = keras.saving.load_model(str(p), compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SalienceError(
            f"{p}: Keras could not load this model ({type(e).__name__}: {first}). Keras 3 reads .keras files "
            "and most legacy .h5 files; models with custom layers need their classes registered"
        ) from None
    return wrap_keras(model, name=f"keras:{p.name}")


def find_layer_idx(model: Any, name: str) -> int:
    """The index in ``model.layers`` of the Keras layer called ``name``."""
    for i, layer in enumerate(model.layers):
        if layer.name == name:
            return i
    names = [layer.name for layer in model.layers]
    raise SalienceError(f"the Keras model has no layer named {name!r}; its layers are {names}")
