"""salience: saliency maps for PyTorch image models: which pixels made the model decide.

Every method is a plain function ``method(model, x, target=None, *, reduce=...)`` over an
image batch ``x`` of shape ``(B, C, H, W)``; it returns the raw map ``(B, H, W)`` (or
``(B, C, H, W)`` with ``reduce=None`` / ``"colored"``) and leaves the model as it was.
"""
from __future__ import annotations

from . import reduce, targets
from . import data, zoo
from . import io
from .io import load_model
from ._errors import SalienceError
from ._guard import model_guard
from .methods import METHODS, vanilla
from .methods import deconvnet, gradcam, guided_backprop, guided_gradcam
from .methods import input_x_gradient, integrated_gradients, smoothgrad
from . import rules
from .methods.class_model import class_model
from . import keras_vis
from . import metrics
from .reduce import normalize
from . import viz

__version__ = "0.1.0"

__all__ = [
    "SalienceError",
    "METHODS",
    "model_guard",
    "normalize",
    "reduce",
    "targets",
    "data",
    "zoo",
    "vanilla",
    "guided_backprop",
    "deconvnet",
    "gradcam",
    "guided_gradcam",
    "smoothgrad",
    "integrated_gradients",
    "input_x_gradient",
    "rules",
    "io",
    "load_model",
    "class_model",
    "keras_vis",
    "metrics",
    "viz",
    "__version__",
]
