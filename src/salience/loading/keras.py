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
* An input the Keras model cannot take (channels, size, rank: Keras's "Input 0 of layer ... is
  incompatible with the layer"; an image too small for a model of any size: PyTorch's "Kernel size
  can't be greater than actual input size" inside a layer) is a :class:`SalienceError` naming what the
  model takes (its ``model.inputs[0].shape``), what it was given and what to do; Keras's error is its
  ``__cause__``, quoted without its terminal colours.

Keras is an optional dependency (``pip install salience[keras]``); the backend must be torch:
this module sets ``KERAS_BACKEND=torch`` when Keras is not imported yet and refuses a Keras that
was already imported with another backend.
"""
from __future__ import annotations

import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor, nn

from salience._core.autograd import CHANNEL_HINTS
from salience._core.errors import SalienceError, uncoloured
from salience._core.info import ModelInfo, attach_info

__all__ = ["import_keras", "is_keras_model", "KerasModel", "wrap_keras", "load_keras", "find_layer_idx",
           "layer_module_name", "input_error"]


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


_TOO_SMALL = re.compile(r"kernel size can't be greater than actual input|output size is too small", re.IGNORECASE)

# What Keras 3 says when an input does not fit a model or a layer: its InputSpec checks (shape, rank,
# an axis's size: "Input 0 of layer 'c1' is incompatible with the layer: expected axis -1 of input
# shape to have value 3, ...") and Reshape's (ValueErrors); and, in a model of any size, what PyTorch
# says inside a layer that the image is too small for (a RuntimeError: "Kernel size can't be greater
# than actual input size", a pooling's "Output size is too small"). Only such a failure becomes a
# SalienceError.
_KERAS_INPUT_FAILURE = re.compile(r"is incompatible with the layer|total size of the new array must be unchanged|"
                                  + _TOO_SMALL.pattern, re.IGNORECASE)

_CHANNEL_HINTS = {
    "batch": CHANNEL_HINTS,  # the words of a PyTorch model's refusal of the same batch
    "seed": {(4, 3): "drop the alpha channel (RGBA to RGB): seed_input[..., :3]",
             (1, 3): "repeat the gray channel (grayscale to RGB): np.repeat(seed_input, 3, axis=-1)",
             (3, 1): "make the image gray, e.g. seed_input.mean(-1, keepdims=True)"},
}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def input_error(model: Any, x: Tensor, said: str, *, channels_last: bool = True, seed: bool = False) -> str:
    """The words of the :class:`SalienceError` for an input ``x`` ``(B, C, H, W)`` (as given to
    :class:`KerasModel`) that the Keras ``model`` refused, Keras having said ``said``: what it was
    given, what the model takes (``model.inputs[0].shape``, when known) and what to do. ``seed``:
    the input came as keras-vis's ``seed_input``, one ``(H, W, C)`` image, and is named so."""
    mode = "seed" if seed else "batch"
    four = x.dim() == 4
    if seed and four:
        given, what = tuple(x[0].permute(1, 2, 0).shape), "seed_input"
    else:
        given, what = tuple(x.shape), "the input"
    head = f"the Keras model {getattr(model, 'name', '')!r} cannot take {what} of shape {given}"
    if four:
        _, c, h, w = x.shape
        head += f" ({_count(c, 'channel')}, {h} x {w} pixels)"
    shape = _input_shape(model)
    if shape is None:
        return (f"{head}; its input shape is not known: give it inputs of the shape it was built for "
                f"(Keras said: {said})")
    if four and len(shape) != 4:
        flat = (f"vectors of {shape[-1]} values, not images" if len(shape) == 2 and shape[-1] is not None
                else f"inputs of rank {len(shape)}, not images (batch, height, width, channels)")
        return (f"{head}: it takes inputs of shape {shape}, {flat}, and salience explains image models, (B, C, H, W) "
                "batches; give it a Keras model that takes the images (e.g. keras.Input((H, W, C)), "
                "keras.layers.Flatten(), then this model's layers, if its vectors are flattened images) "
                f"(Keras said: {said})")
    if len(shape) != 4 or not four:
        return (f"{head}: it takes inputs of shape {shape} (batch first); give it inputs of that shape "
                f"(Keras said: {said})")
    eh, ew, ec = shape[1:] if channels_last else (shape[2], shape[3], shape[1])
    size = f"{eh} x {ew} pixels" if eh is not None and ew is not None else "any size"
    takes = (f": it takes input of shape {shape} ({'channels-last' if channels_last else 'channels-first'}: "
             f"{size}, {_count(ec, 'channel') if ec is not None else 'any channels'})")
    permuted = (h, w, c) == (ec, eh, ew) if seed else (c, h, w) == (eh, ew, ec)
    if ec is not None and c != ec and permuted and channels_last:
        hint = ("seed_input looks channels-first; a Keras model's seed_input is (H, W, C): "
                "np.transpose(seed_input, (1, 2, 0))" if seed else
                "x looks channels-last already; the wrapped model takes (B, C, H, W) and makes it channels-last "
                "itself: x.permute(0, 3, 1, 2)")
    elif ec is not None and c != ec:
        hint = _CHANNEL_HINTS[mode].get((c, ec), f"give it images of {_count(ec, 'channel')}")
    elif _TOO_SMALL.search(said):
        hint = (f"the image is too small for the model's layers (a kernel or a pooling window is larger than "
                f"what is left of its {h} x {w} pixels): give it larger images, e.g. of the size it was trained on")
    elif (eh is not None and eh != h) or (ew is not None and ew != w):
        hint = (f"resize the image to {eh} x {ew} (height x width)" if seed else
                f"resize them to {eh} x {ew} (salience.loading.preprocess with the model's info does)")
    else:
        hint = "give it inputs of the shape it was built for"
    return f"{head}{takes}; {hint} (Keras said: {said})"


def _keras_said(e: BaseException) -> Optional[str]:
    """The line of a Keras error that says an input does not fit, without its terminal colours, or ``None``."""
    for line in str(e).splitlines():
        line = uncoloured(line).strip()
        if _KERAS_INPUT_FAILURE.search(line):
            return line
    return None


class KerasModel(nn.Module):
    """A Keras 3 model (PyTorch backend) as an ``nn.Module`` taking ``(B, C, H, W)``.

    ``forward`` permutes image batches to ``(B, H, W, C)``, calls the Keras model in inference mode
    (``training=False``) and returns its output unchanged. ``keras_model`` is the wrapped model;
    its layers are registered as ``layers.<name>``. An input the Keras model refuses (channels, size,
    rank, an image too small for its layers) is a :class:`SalienceError` saying what it takes and what
    to do, Keras's error its ``__cause__`` (see :func:`input_error`; ``seed=True`` names the input as keras-vis's ``seed_input``).
    """

    def __init__(self, model: Any, *, channels_last: bool = True, seed: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise SalienceError(
                f"{type(model).__name__} is not a torch module: the Keras model was built with another "
                "backend; set KERAS_BACKEND=torch before keras is first imported"
            )
        self.keras_model = model
        self.channels_last = channels_last
        self.seed = seed
        layers = nn.ModuleDict()
        for layer in getattr(model, "layers", []):
            if isinstance(layer, nn.Module):
                key = layer_module_name(layer)[len("layers."):]
                if key not in layers:
                    layers[key] = layer
        self.layers = layers

    def forward(self, x: Tensor) -> Any:
        given = x
        if self.channels_last and x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        try:
            return self.keras_model(x, training=False)
        except (ValueError, RuntimeError) as e:
            said = None if isinstance(e, SalienceError) else _keras_said(e)
            if said is None:
                raise
            raise SalienceError(input_error(self.keras_model, given, said, channels_last=self.channels_last,
                                            seed=self.seed)) from e


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
    if p.suffix.lower() == ".keras" and not zipfile.is_zipfile(p):  # Keras says "File not found" of such a file
        raise SalienceError(f"{p}: Keras could not load this model: not a .keras file (model.save writes a zip "
                            "archive; this is none, or it is cut short); save the model again")
    try:
        model = keras.saving.load_model(str(p), compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many types; report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SalienceError(
            f"{p}: Keras could not load this model ({type(e).__name__}: {first}). Keras 3 reads .keras files "
            "and most legacy .h5 files; models with custom layers need their classes registered"
        ) from None
    try:
        return wrap_keras(model, name=f"keras:{p.name}")
    except SalienceError as e:  # what is wrong with the model: said with the file it came from
        raise SalienceError(f"{p}: {e}") from None


def find_layer_idx(model: Any, name: str) -> int:
    """The index in ``model.layers`` of the Keras layer called ``name``."""
    for i, layer in enumerate(model.layers):
        if layer.name == name:
            return i
    names = [layer.name for layer in model.layers]
    raise SalienceError(f"the Keras model has no layer named {name!r}; its layers are {names}")
