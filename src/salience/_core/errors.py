"""The one error class of salience, the "did you mean" hint its messages share, and where its
warnings point."""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import threading
import warnings
from typing import Any, Iterator, Sequence

__all__ = ["SalienceError", "ArgumentError", "suggest", "user_stacklevel", "uncoloured", "first_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SalienceError(ValueError):
    """Raised for bad input: the message says what was expected and what came.

    It subclasses ``ValueError`` so that code catching ``ValueError`` keeps working.
    """


class ArgumentError(SalienceError, TypeError):
    """A method called with arguments its signature does not take (a keyword it has no option for, a positional
    argument missing or too many): a :class:`SalienceError` saying what it takes, and a ``TypeError`` as Python's own
    error for such a call is, so that code catching ``TypeError`` keeps working."""


def first_line(e: BaseException, *, empty: str | None = None) -> str:
    """The first line of an error's message, for a one-line message of salience's (torch appends its C++
    stack to some errors, a traceback to others); for an empty message ``empty``, or the error's type name."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if empty is None else empty


def suggest(name: str, choices: "Sequence[str]", n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the choices closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:n]
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def uncoloured(text: str) -> str:
    """``text`` without terminal colour codes (Keras 3 writes a layer's error in bold: ``\\x1b[1m ... \\x1b[0m``),
    for a message quoting another library's error."""
    return _ANSI.sub("", text)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller that points at the first frame outside
    salience, contextlib and torch: the user's line that called salience, however deep the call
    (a fixed level points inside salience when the same warning comes by a longer path, e.g. through a
    ``with`` block's ``contextlib`` frames or from SmoothGrad's inner method)."""
    skip = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules.get("salience"), sys.modules.get("torch"))
                 if m is not None and getattr(m, "__file__", None))
    skip += (sys.modules["contextlib"].__file__,)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


WARNINGS_LOCK = threading.RLock()
"""Held while the process's warning filters change for a while: the filters and ``showwarning``
are one for all threads, so two threads changing them at once undo each other."""
CAPTURING: dict[int, list[Any]] = {}
"""Thread id -> the warning captures it holds (:func:`salience.explore.compute.caught_warnings`),
changed under :data:`WARNINGS_LOCK`."""


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """The warnings of this block are not shown (PIL's notes on an image's odd metadata), without
    undoing another thread's capture of warnings: a ``catch_warnings`` entered before a capture
    began restored, on leaving, the filters from before it (the capture's warnings went unseen
    from then on), and one entered during it ignored the capturing thread's warnings too. So no
    capture begins or ends inside this block, and while one is held this block changes nothing
    (its warnings are shown, or captured, as any other)."""
    with WARNINGS_LOCK:
        if CAPTURING:
            quiet = None
        else:
            quiet = warnings.catch_warnings()
            quiet.__enter__()
            warnings.simplefilter("ignore")
        try:
            yield
        finally:
            if quiet is not None:
                quiet.__exit__(None, None, None)
