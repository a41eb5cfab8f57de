"""Ctrl-C deferred while salience changes its own tables: :func:`calmly`, for the guards' bookkeeping
(:mod:`salience._core.guard`: hold counts, states recorded and put back, and the run's kept channels-last copies,
:mod:`salience._core.layouts`, opened and dropped in the run guard's entry and exit) and the attention hooks
(:mod:`salience.attention`). A module of its own since session 42: it was in ``guard``, and ``layouts`` imported it
from there, so the run guard could not open the layouts' copies itself."""
from __future__ import annotations

import _signal  # signal's C module: without the Handlers enum's conversion (a ValueError caught per call, 2.7 us)
import threading
from typing import Any, Callable, Optional

__all__ = ["calmly"]


class _Deferred:
    """SIGINT's handler while a guard changes its tables (:func:`calmly`): it notes a Ctrl-C, which the
    handler it replaced (``previous``) gets when they are consistent again."""

    __slots__ = ("previous", "caught", "frame")

    def __init__(self) -> None:
        self.previous: Any = None
        self.caught = False
        self.frame: Any = None

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.caught:
            self.caught, self.frame = True, frame


def calmly(fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` (a guard's bookkeeping: hold counts, states recorded or put back) with Ctrl-C deferred
    to its end. Python raises ``KeyboardInterrupt`` from SIGINT's handler, in the main thread, at a call's
    start or end or a loop's back jump, anywhere: in ``_release`` after some counts were lowered, it left
    counts that no guard would lower (the model never put back, or a later guard sure that another held
    it). ``SIGINT``'s handler is replaced for the call by one that notes the signal (in the main thread
    only, and only a Python handler: the default one, or the user's own), then put back, and called with
    the signal noted: a model_guard's entry and exit cost 3 us more on a one-layer model, 10 to 14 us
    (under 1 %) more than their 1.8 ms on resnet50 (four ``sigaction`` calls). A Ctrl-C at this function's
    own start, before the deferral, raises here with nothing done (``KeyboardInterrupt``, or whatever the
    user's handler raises): the callers' ``finally`` blocks run it once more on any exception."""
    deferred = _defer_sigint()
    try:
        fn(*args)
    finally:
        if deferred is not None:
            _resume_sigint(deferred)


def _defer_sigint() -> Optional[_Deferred]:
    """A :class:`_Deferred` put in SIGINT's handler's place, or ``None`` where no Ctrl-C can be raised in
    this thread (not the main one, a handler that is not Python's: ignored, the OS default) or where an outer
    deferral is in place."""
    if threading.get_ident() != threading.main_thread().ident:
        return None
    previous = _signal.getsignal(_signal.SIGINT)
    if not callable(previous) or type(previous) is _Deferred:
        return None
    deferred = _Deferred()
    try:
        # the signals pending run first, with the handler still in place: a Ctrl-C raises with nothing changed
        deferred.previous = _signal.signal(_signal.SIGINT, deferred)
    except ValueError:  # signal handlers are only set in the main interpreter
        return None
    return deferred


def _resume_sigint(deferred: _Deferred) -> None:
    """The handler ``deferred`` replaced put back, and called if a Ctrl-C came meanwhile (the default one
    raises ``KeyboardInterrupt`` here)."""
    try:
        _signal.signal(_signal.SIGINT, deferred.previous)
    except BaseException:  # another signal's handler raised before the change (pending ones run first)
        _signal.signal(_signal.SIGINT, deferred.previous)
        raise
    if deferred.caught and callable(deferred.previous):
        deferred.previous(_signal.SIGINT, deferred.frame)
