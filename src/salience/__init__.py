"""salience: saliency maps for PyTorch image models: which pixels made the model decide.

Every method is a plain function ``method(model, x, target=None, *, reduce=...)`` over an
image batch ``x`` of shape ``(B, C, H, W)``; it returns the raw map ``(B, H, W)`` (or
``(B, C, H, W)`` with ``reduce=None`` / ``"colored"``) and leaves the model as it was.

The packages are the layers (``docs/architecture.md``): ``_core`` (machinery), ``targets``,
``rules`` and ``reduce``, ``methods``, then ``evidence`` (metrics, evaluation), ``loading``
(images and models in), ``render`` (pictures), ``demo`` (synthetic data, shipped models) and
``compat`` (keras-vis), with the command line on top.
"""
from __future__ import annotations

from salience import attention, reduce, rules, targets
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.perf import performance, set_performance
from salience.methods import (METHODS, attention_rollout, class_model, deconvnet, gradcam,
                              guided_backprop, guided_gradcam, input_x_gradient, integrated_gradients, smoothgrad,
                              transformer_attribution, vanilla, scorecam, ablationcam, occlusion, rise)
from salience.methods import eigencam, gradcam_plus_plus, hirescam, layercam, xgradcam
from salience.reduce import normalize
from salience import methods, evidence, loading, render, demo, compat
from salience.loading import load_model
from salience import runs
from salience.runs import explain_dataset, open_run
from salience.explore import explore  # the function; the package's modules stay importable

# Shorter names for the modules users reach most (and the names of salience 0.1).
from salience.demo import data, zoo
from salience.render import viz
from salience.compat import keras_vis
metrics = evidence
io = loading

# ...also as modules, so that salience 0.1's `import salience.zoo` / `from salience.metrics import ...` keep working.
import sys as _sys

for _name, _module in {"data": data, "zoo": zoo, "viz": viz, "keras_vis": keras_vis, "metrics": evidence,
                       "io": loading}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)

__version__ = "0.1.0"

__all__ = [
    "SalienceError",
    "set_performance",
    "performance",
    "METHODS",
    "model_guard",
    "normalize",
    "load_model",
    "explore",
    "vanilla",
    "guided_backprop",
    "deconvnet",
    "gradcam",
    "guided_gradcam",
    "gradcam_plus_plus",
    "hirescam",
    "xgradcam",
    "layercam",
    "eigencam",
    "smoothgrad",
    "integrated_gradients",
    "input_x_gradient",
    "class_model",
    "attention_rollout",
    "transformer_attribution",
    "scorecam",
    "ablationcam",
    "occlusion",
    "rise",
    "attention",
    "reduce",
    "rules",
    "targets",
    "methods",
    "evidence",
    "loading",
    "render",
    "demo",
    "compat",
    "runs",
    "explain_dataset",
    "open_run",
    "data",
    "zoo",
    "viz",
    "keras_vis",
    "metrics",
    "io",
    "__version__",
]
