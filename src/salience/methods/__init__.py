"""Saliency methods: plain functions ``method(model, x, target=None, *, reduce=...) -> Tensor``.

``METHODS`` maps each method's public name to its function: the one registry that the CLI
and reports use to turn strings into methods.
"""
from __future__ import annotations

from typing import Callable

from .vanilla import vanilla

METHODS: dict[str, Callable] = {
    "vanilla": vanilla,
}

__all__ = ["METHODS", "vanilla"]
