"""The one error class of salience."""
from __future__ import annotations


class SalienceError(ValueError):
    """Raised for bad input: the message says what was expected and what came.

    It subclasses ``ValueError`` so that code catching ``ValueError`` keeps working.
    """
