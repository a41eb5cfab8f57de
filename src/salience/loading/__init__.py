"""Loading: what comes into salience from outside. Image files become the tensors a model
expects (:mod:`~salience.loading.images`); model specs become modules with their
preprocessing attached (:mod:`~salience.loading.models`, Keras through
:mod:`~salience.loading.keras`). Nothing here computes saliency."""
from __future__ import annotations

from salience.loading.images import (DEFAULT_MAX_PIXELS, load_image, load_images, normalize_input, preprocess,
                                     resize_crop, unnormalize)
from salience.loading.models import IMAGENET_MEAN, IMAGENET_STD, load_model

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "load_image", "load_images", "load_model",
           "normalize_input", "preprocess", "resize_crop", "unnormalize"]
