"""The channels-last copies of a model's weights, kept across the calls of a dataset run.

Under ``memory_format="channels_last"`` each call (each chunk of a :class:`salience._core.perf.Run`) converts the
model's 4-D parameters to channels-last and puts the user's tensors back when it ends
(:meth:`~salience._core.perf.Run.set_layout`): on resnet50 a copy of 45 MB of weights per call (its 17 4-D weights
that are not 1x1), 1.2 ms an image in a bf16 dataset run of batch 16 on one CPU core (docs/performance.md, session
40). A dataset run calls the methods batch
after batch on weights nobody changes meanwhile (:func:`salience._core.guard.run_guard` holds the model), so it keeps
the copies for the run (:func:`kept_layouts`): each call still swaps every parameter's data to its channels-last
copy and back (the model outside a call is the user's, strides and tensors, as without the run), but the copy is
made once per parameter and run, not once per call.

A kept copy is used only while its parameter is the same object, holds the same user tensor (the same storage,
offset, sizes and strides: ``is_set_to``) and its version counter did not move since the copy was made (an in-place
change of the parameter, ``p.mul_(2)`` under ``no_grad`` or an optimizer's step, in the user's layout or on the copy
during a pass): else a fresh copy is made, as a call outside a run does. What a version counter does not see is not
seen here either: a value changed in place through ``p.data`` (``p.data.mul_(2)``) during a run, by the model's own
forward or another thread (the call outside a run converts the values of the moment; the run keeps the copy).
Outside :func:`kept_layouts` nothing is kept. The copies cost their memory for the run (one more copy of the 4-D
weights) and are dropped at its end; a call that made a copy drops those of parameters it no longer has
(:func:`keep_only`: a folded copy made again, for a model whose forward writes a buffer, else each batch's dead
folded copy was held to the end).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from salience._core.guard import calmly

__all__ = ["kept_layouts", "channels_last_data", "keep_only", "copies_made", "keeping"]

# per model (id): {id(parameter): (parameter, its user data, the channels-last copy, the version counter then)}
_kept: dict[int, dict[int, tuple]] = {}
_lock = threading.Lock()
# channels-last copies made of 4-D parameters (every call's, kept or not): what tests count
_copies = [0]


def copies_made() -> int:
    """How many channels-last copies of a parameter this process made (:func:`channels_last_data`)."""
    return _copies[0]


@contextmanager
def kept_layouts(model: nn.Module) -> Iterator[None]:
    """Keep the channels-last copies of ``model``'s 4-D parameters (and of its folded copy's) for the block: a
    dataset run's calls then copy each once. The model itself is not changed here (each call converts and puts
    back its parameters as always); the copies are dropped when the block ends, also on an error or Ctrl-C (one in
    the block's own entry or exit too: the bookkeeping runs with Ctrl-C deferred, as the run guard's,
    :func:`salience._core.guard.calmly`). A block opened while another is open on the model (nested, or another
    thread's run) shares its copies, which the first block drops when it ends (the other's later calls then copy
    every call, as outside a run)."""
    key = id(model)
    box: list = []  # the copies' dict, when this block registered it (not when it shares an open block's)
    try:
        calmly(_open, key, box)
        yield
    finally:
        # Inline, as run_guard's: a Ctrl-C at calmly's start (before its deferral) left the drop to do: once more.
        try:
            calmly(_close, key, box)
        except BaseException:
            calmly(_close, key, box)
            raise


def _open(key: int, box: list) -> None:
    """Register a dict of copies for the model ``key`` unless a block holds one; ``box`` gets it first."""
    with _lock:
        if key not in _kept:
            box.append({})
            _kept[key] = box[0]


def _close(key: int, box: list) -> None:
    """Drop the dict of copies ``box`` holds (nothing if it is empty: the block shared another's, or this ran)."""
    if box:
        with _lock:
            if _kept.get(key) is box[0]:
                del _kept[key]
        box.clear()


def keep_only(model: nn.Module, params: Iterable[Tensor]) -> None:
    """Drop the copies kept for ``model`` of parameters not among ``params`` (a call's: the model's and its folded
    copy's). A folded copy made again (for a model whose forward writes a buffer: each batch) has new parameters; the
    old ones' entries, their data and copies were held to the run's end. Called where a call made a copy."""
    kept = _kept.get(id(model))
    if kept is not None:
        live = {id(p) for p in params}
        for key in [k for k in tuple(kept) if k not in live]:
            kept.pop(key, None)


def keeping(model: nn.Module) -> bool:
    """Whether a :func:`kept_layouts` block is open on ``model`` (its channels-last copies are kept)."""
    return id(model) in _kept


def channels_last_data(model: nn.Module, p: Tensor, data: Tensor) -> Tensor:
    """The channels-last copy of ``p``'s data ``data`` (``p.data``, in another layout): kept from an earlier call of
    the run on ``model`` if :func:`kept_layouts` is open on it and the copy is still ``p``'s (see the module
    docstring), else made now (and kept if a block is open)."""
    kept: Optional[dict] = _kept.get(id(model))
    if kept is not None:
        got = kept.get(id(p))
        if got is not None and got[0] is p and got[3] == p._version and data.is_set_to(got[1]):
            return got[2]
    copy = data.contiguous(memory_format=torch.channels_last)
    _copies[0] += 1
    if kept is not None:
        kept[id(p)] = (p, data, copy, p._version)
    return copy
