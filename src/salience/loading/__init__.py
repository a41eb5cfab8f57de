"""Loading: what comes into salience from outside. Image files become the tensors a model
expects (:mod:`~salience.loading.images`); model specs become modules with their
preprocessing attached (:mod:`~salience.loading.models`, Keras through
:mod:`~salience.loading.keras`). Nothing here computes saliency."""
from __future__ import annotations

from salience.loading.images import *  # noqa: F401,F403
from salience.loading.images import __all__ as _images_all
from salience.loading.models import *  # noqa: F401,F403
from salience.loading.models import __all__ as _models_all

__all__ = sorted(set(_images_all) | set(_models_all))
