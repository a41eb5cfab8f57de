"""Reentrant ``torch.utils.checkpoint`` blocks run as plain calls in salience's own passes.

A reentrant checkpoint (``use_reentrant=True``) runs its function under ``no_grad`` and recomputes it in the backward
pass: a layer inside it has no gradient in the forward pass, and ``torch.autograd.grad`` through it is refused by
torch. :func:`plain_checkpoints` runs such checkpoints of the calling thread as plain calls (the same values, with the
graph), for the engine's passes (:func:`salience._core.autograd.backward`) and the default-layer search's.
"""

from __future__ import annotations

import collections
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["plain_checkpoints"]

_PLAIN_LOCK = threading.Lock()
# [passes inside _plain_checkpoints, CheckpointFunction's own "apply" (None: inherited), torch's apply bound to the
# class (what other threads call)]; _plain_threads: thread id -> its open blocks (only those threads run plainly).
_plain_state: list = [0, None, None]
_plain_threads: collections.Counter = collections.Counter()


def _plain_call(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
    """``CheckpointFunction.apply`` while a block of :func:`plain_checkpoints` is open: the function as a plain call
    in the threads inside such a block, torch's own reentrant checkpoint in every other thread."""
    if threading.get_ident() in _plain_threads:
        return function(*args)
    return _plain_state[2](function, preserve_rng_state, *args)


@contextmanager
def plain_checkpoints() -> Iterator[None]:
    """A reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``: timm's ``set_grad_checkpointing()`` with
    reentrant checkpoints, Hugging Face's gradient checkpointing) run in this thread runs its function as a plain call
    in the block: the same values, now with the autograd graph the search and the CAMs read (the data flow of
    ``gradcam._refuse_parallel_streams``, which outputs depend on the input, a layer's gradient); under the checkpoint they
    had none (it runs under ``no_grad``). Other threads' checkpoints (a training running meanwhile) stay torch's. Torch's
    ``CheckpointFunction.apply`` is put back when the last block open ends (counted: blocks of several threads may end
    in any order), also after an exception."""
    from torch.utils import checkpoint as ck

    cls = getattr(ck, "CheckpointFunction", None)
    if cls is None:
        yield
        return
    me = threading.get_ident()
    with _PLAIN_LOCK:
        if _plain_state[0] == 0:
            _plain_state[1], _plain_state[2] = cls.__dict__.get("apply"), cls.apply
            cls.apply = staticmethod(_plain_call)
        _plain_state[0] += 1
        _plain_threads[me] += 1
    try:
        yield
    finally:
        with _PLAIN_LOCK:
            _plain_threads[me] -= 1
            if _plain_threads[me] == 0:
                del _plain_threads[me]
            _plain_state[0] -= 1
            if _plain_state[0] == 0:
                if _plain_state[1] is None:
                    del cls.apply
                else:
                    cls.apply = _plain_state[1]
                _plain_state[1] = None  # [2] stays: a thread that looked up the swap just before may still call it
