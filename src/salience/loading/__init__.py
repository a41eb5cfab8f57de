"""Loading: what comes into salience from outside. Image files become the tensors a model
expects (:mod:`~salience.loading.images`); model specs become modules with their
preprocessing attached (:mod:`~salience.loading.models`; timm and transformers through
:mod:`~salience.loading.libraries`, your own code and ``torch.export`` files through
:mod:`~salience.loading.custom`, Keras through :mod:`~salience.loading.keras`);
:func:`select_output` says which part of a model's output holds its scores. Nothing here computes saliency."""
from __future__ import annotations

from salience.loading.images import *  # noqa: F401,F403
from salience.loading.images import __all__ as _images_all
from salience.loading.models import *  # noqa: F401,F403
from salience.loading.models import __all__ as _models_all

from salience.loading.custom import select_output  # noqa: E402

__all__ = sorted(set(_images_all) | set(_models_all) | {"select_output"})
