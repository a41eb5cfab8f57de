"""The one error class of salience, and the "did you mean" hint its messages share."""
from __future__ import annotations

import difflib
from typing import Sequence

__all__ = ["SalienceError", "suggest"]


class SalienceError(ValueError):
    """Raised for bad input: the message says what was expected and what came.

    It subclasses ``ValueError`` so that code catching ``ValueError`` keeps working.
    """


def suggest(name: str, choices: "Sequence[str]", n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the choices closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:n]
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
