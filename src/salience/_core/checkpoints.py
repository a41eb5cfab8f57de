"""``torch.utils.checkpoint`` blocks run as plain calls in salience's own passes.

A reentrant checkpoint (``use_reentrant=True``) runs its function under ``no_grad`` and recomputes it in the backward
pass: a layer inside it has no gradient in the forward pass, and ``torch.autograd.grad`` through it is refused by
torch. A non-reentrant one (``use_reentrant=False``) recomputes its function in the backward pass outside the modes
salience entered around the forward pass (the attention capture, a backprop rule): torch then finds other values than
the forward pass saved (its ``CheckpointError``), or the backward pass of the rule's function reads the plain function's
tensors. :func:`plain_checkpoints` runs both kinds of the calling thread as plain calls (the same values, with the
graph, nothing recomputed), for the engine's passes (:func:`salience._core.autograd.backward`) and the default-layer
search's.
"""

from __future__ import annotations

import collections
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["plain_checkpoints"]

_PLAIN_LOCK = threading.Lock()
# [passes inside plain_checkpoints, CheckpointFunction's own "apply" (None: inherited), torch's apply bound to the
# class (what other threads call), {(module, name): torch's non-reentrant set-up generator function}]; _plain_threads:
# thread id -> its open blocks (only those threads run plainly).
_plain_state: list = [0, None, None, {}]
_plain_threads: collections.Counter = collections.Counter()
# The generator function torch's non-reentrant checkpoint calls around its function (set-up, then tear-down): the
# newer name (torch 2.14 has it, and keeps the older one as a shim calling it) and the older one; private to torch,
# looked up when a block opens: a torch without either keeps its non-reentrant checkpoints.
_NON_REENTRANT = ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator")
# Torch's modules that import the set-up function by name (so the swap in torch.utils.checkpoint never reaches them):
# torch.distributed's composable ``checkpoint(module)`` (FSDP2's activation checkpointing), swapped there too when
# already imported (a model wrapped by it has imported it).
_BOUND = (("torch.distributed._composable.checkpoint_activation", "_checkpoint_without_reentrant_generator_impl"),)


def _plain_call(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
    """``CheckpointFunction.apply`` while a block of :func:`plain_checkpoints` is open: the function as a plain call
    in the threads inside such a block, torch's own reentrant checkpoint in every other thread."""
    if threading.get_ident() in _plain_threads:
        return function(*args)
    return _plain_state[2](function, preserve_rng_state, *args)


def _no_set_up(*args: Any, **kwargs: Any) -> Iterator[None]:
    """A non-reentrant checkpoint's set-up and tear-down for a plain call: none (it yields once, as torch's does)."""
    yield


def _plain_generator(key: tuple[Any, str]) -> Callable[..., Any]:
    """Torch's non-reentrant set-up generator ``key`` (its module, its name there) while a block of
    :func:`plain_checkpoints` is open: none in the threads inside such a block (the checkpoint calls its function,
    plainly, between the generator's two steps), torch's own in every other thread."""
    def generator(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() in _plain_threads:
            return _no_set_up()
        return _plain_state[3][key](*args, **kwargs)
    return generator


def _set_up_functions(ck: Any) -> dict[tuple[Any, str], Callable[..., Any]]:
    """Torch's non-reentrant set-up generators to swap, ``{(module, name): function}``: those of ``ck``
    (``torch.utils.checkpoint``) and of the imported modules of :data:`_BOUND`."""
    found = {(ck, name): getattr(ck, name) for name in _NON_REENTRANT if callable(getattr(ck, name, None))}
    for module_name, name in _BOUND:
        module = sys.modules.get(module_name)
        if module is not None and callable(getattr(module, name, None)):
            found[(module, name)] = getattr(module, name)
    return found


@contextmanager
def plain_checkpoints() -> Iterator[None]:
    """A ``torch.utils.checkpoint`` run in this thread runs its function as a plain call in the block. Reentrant
    (``use_reentrant=True``: timm's ``set_grad_checkpointing()`` with reentrant checkpoints, Hugging Face's gradient
    checkpointing): the same values, now with the autograd graph the search and the CAMs read (the data flow of
    ``_layer_search._refuse_parallel_streams``, which outputs depend on the input, a layer's gradient); under the checkpoint they
    had none (it runs under ``no_grad``). Non-reentrant (``use_reentrant=False``, timm's default): the same values,
    nothing recomputed in the backward pass, so what the modes entered around the forward pass computed (the attention
    capture's explicit attention, a backprop rule's functions) is what the backward pass reads; recomputed, it ran
    without them. Other threads' checkpoints (a training running meanwhile) stay torch's. Torch's own functions are put
    back when the last block open ends (counted: blocks of several threads may end in any order), also after an
    exception."""
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
            _plain_state[3] = _set_up_functions(ck)
            for module, name in _plain_state[3]:
                setattr(module, name, _plain_generator((module, name)))
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
                for (module, name), original in _plain_state[3].items():  # [3] stays too, for the same reason
                    setattr(module, name, original)
