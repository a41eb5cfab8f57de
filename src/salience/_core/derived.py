"""What the passes of one many-pass call take as already checked, so that they do not wait for the device.

A method that runs many passes (SmoothGrad, Integrated Gradients, the perturbation methods) checks
what the user passed once, on the clean images: ``x`` is finite (:func:`salience._core.autograd.check_input`),
the target classes are in range. The inputs of its passes (noisy copies, path points, masked images) and the
targets of their items (:meth:`salience.targets.Target.for_items`) derive from those. Checking them again in
every pass costs a host-device synchronization per pass (``bool(tensor)``, ``int(tensor)``): on a GPU, whose
passes are launch-bound, the host then waits for each pass before it queues the next, where a loop without them
queues a pass while the device runs the last one (SmoothGrad and IG on resnet50 ran 1.34x / 1.39x the time of
such a loop on an H200).

:func:`run_scope` (entered by :func:`salience._core.engine.accumulate` around its passes) holds, for the call:

- :func:`derived`: the inputs the method made from its checked ``x`` for the chunk that runs; ``check_input``
  skips their finiteness test. Their finiteness is still recorded, on the device (an overflow of
  ``x + noise`` is not ruled out by a finite ``x``), and tested once, when the call's passes end;
- :meth:`Derived.defer`: any such device-side condition and what to do when it holds (raise, warn), all tested
  with one synchronization at the end;
- :meth:`Derived.once`: what is to be done once per call (the range of a target's classes, the look at a
  model's output for probabilities).

Per context (a :class:`~contextvars.ContextVar`): another thread's calls have their own. A nested many-pass call
(SmoothGrad of Integrated Gradients) joins the outer call's scope: its inputs derive from the outer ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["Derived", "current", "derived", "is_derived", "run_scope"]


class Derived:
    """The scope of one many-pass call: the chunk's derived inputs, the deferred conditions, the done checks."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []  # the inputs of the chunks that run (a stack: nested calls push theirs)
        self._flags: dict[str, tuple[Tensor, Callable[[], None]]] = {}
        self._done: dict[Any, Any] = {}

    def defer(self, key: str, flag: Tensor, action: Callable[[], None]) -> None:
        """``flag`` (a 0-d bool tensor, on the device) OR-ed into the call's ``key`` condition; ``action``
        (raise, warn) runs once at the end of the call when any flag of ``key`` held. No synchronization."""
        old = self._flags.get(key)
        self._flags[key] = (flag if old is None else old[0] | flag, action)

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for in the call, then what it returned, kept for the call
        (let it hold the objects whose ``id`` ``key`` holds)."""
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def first(self, key: Any, hold: Any = None) -> bool:
        """Whether ``key`` is asked for the first time in the call (``True`` once, then ``False``). ``hold``: the
        object whose ``id`` ``key`` holds, kept for the call (its ``id`` is not another's while the call runs)."""
        if key in self._done:
            return False
        self._done[key] = hold
        return True

    def finish(self) -> None:
        """The deferred conditions, tested with one synchronization; their actions run in the order given."""
        if not self._flags:
            return
        items = list(self._flags.values())
        self._flags.clear()
        device = items[0][0].device
        held = torch.stack([f.reshape(()).to(device) for f, _ in items]).tolist()
        for h, (_, action) in zip(held, items):
            if h:
                action()


_SCOPE: ContextVar[Optional[Derived]] = ContextVar("salience_derived", default=None)


def current() -> Optional[Derived]:
    """The scope of the many-pass call running in this context, or ``None``."""
    return _SCOPE.get()


@contextmanager
def run_scope() -> Iterator[Derived]:
    """The scope of a many-pass call for the block; inside another, that one (a nested call joins it). The
    outermost tests the deferred conditions when the block ends without an error."""
    outer = _SCOPE.get()
    if outer is not None:
        yield outer
        return
    scope = Derived()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
    scope.finish()


@contextmanager
def chunk_inputs() -> Iterator[None]:
    """The inputs :func:`derived` marks inside the block are forgotten when it ends (one chunk's)."""
    scope = _SCOPE.get()
    n = len(scope.inputs) if scope is not None else 0
    try:
        yield
    finally:
        if scope is not None:
            del scope.inputs[n:]


def derived(x: Tensor, what: str = "the method's inputs") -> Tensor:
    """``x`` (returned as it is), an input a many-pass method made for the running chunk from its checked,
    finite ``x``: ``check_input`` does not test it again. Its finiteness is recorded on the device and
    tested at the end of the call (a :class:`~salience.SalienceError` naming ``what`` then). Outside a
    many-pass call: nothing is recorded, and ``check_input`` tests ``x`` as any other."""
    scope = _SCOPE.get()
    if scope is None or x.numel() == 0:
        return x
    from salience._core.errors import SalienceError

    try:
        lo, hi = torch.aminmax(x.detach())
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a backend without aminmax
        bad = ~torch.isfinite(x.detach()).all()

    def refuse() -> None:
        raise SalienceError(f"{what} contain NaN or infinite values, although x is finite: its values are too "
                            f"large for {x.dtype} (they overflow); scale x down, or compute in a wider dtype")

    scope.defer(f"finite:{what}", bad, refuse)
    scope.inputs.append(x)
    return x


def is_derived(x: Tensor) -> bool:
    """Whether ``x`` is an input :func:`derived` marked for the chunk that runs."""
    scope = _SCOPE.get()
    return scope is not None and any(t is x for t in scope.inputs)
