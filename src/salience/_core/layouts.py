"""The channels-last copies of a model's weights, kept across the calls of a dataset run.

Under ``memory_format="channels_last"`` each call (each chunk of a :class:`salience._core.perf.Run`) converts the
model's 4-D parameters to channels-last and puts the user's tensors back when it ends
(:meth:`~salience._core.perf.Run.set_layout`): on resnet50 a copy of 45 MB of weights per call (its 17 4-D weights
that are not 1x1), 1.2 ms an image in a bf16 dataset run of batch 16 on one CPU core (docs/performance.md, session
40). A dataset run calls the methods batch after batch on weights nobody changes meanwhile
(:func:`salience._core.guard.run_guard` holds the model), so that guard keeps the copies for the run
(:func:`open_copies` to :func:`close_copies`): each call still swaps every parameter's data to its channels-last
copy and back (the model outside a call is the user's, strides and tensors, as without the run), but the copy is
made once per parameter and run, not once per call.

A kept copy is used only while its parameter is the same object, holds the same user tensor (the same storage,
offset, sizes and strides: ``is_set_to``) and its version counter did not move since the copy was made (an in-place
change of the parameter, ``p.mul_(2)`` under ``no_grad`` or an optimizer's step, in the user's layout or on the copy
during a pass): else a fresh copy is made, as a call outside a run does. What a version counter does not see is not
seen here either: a value changed in place through ``p.data`` (``p.data.mul_(2)``) during a run, by the model's own
forward or another thread (the call outside a run converts the values of the moment; the run keeps the copy).
Outside a run guard nothing is kept. The copies cost their memory for the run (one more copy of the 4-D
weights) and are dropped at its end; a call that made a copy drops those of parameters it no longer has
(:func:`keep_only`: a folded copy made again, for a model whose forward writes a buffer, else each batch's dead
folded copy was held to the end).
"""
from __future__ import annotations

import threading
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["open_copies", "close_copies", "channels_last_data", "keep_only", "copies_made", "keeping"]

# per model (id): {id(parameter): (parameter, its user data, the channels-last copy, the version counter then)}
_kept: dict[int, dict[int, tuple]] = {}
_lock = threading.Lock()
# channels-last copies made of 4-D parameters (every call's, kept or not): what tests count
_copies = [0]


def copies_made() -> int:
    """How many channels-last copies of a parameter this process made (:func:`channels_last_data`)."""
    return _copies[0]


def open_copies(model: nn.Module, box: list) -> None:
    """Keep the channels-last copies of ``model``'s 4-D parameters (and of its folded copy's) from now on: a dataset
    run's calls then copy each once. The model itself is not changed here (each call converts and puts back its
    parameters as always). ``box`` gets the copies' dict (with the model's key), unless a run already keeps the
    model's (nested, or another thread's run): this one shares them, and the first run's :func:`close_copies` drops
    them (the other's later calls then copy every call, as outside a run). Called by the run guard
    (:func:`salience._core.guard.run_guard`), with Ctrl-C deferred (:func:`salience._core.calm.calmly`)."""
    key = id(model)
    with _lock:
        if key not in _kept:
            box.append((key, {}))
            _kept[key] = box[0][1]


def close_copies(box: list) -> None:
    """Drop the copies :func:`open_copies` kept in ``box`` (nothing if it is empty: the run shared another's, or
    this ran already)."""
    if box:
        key, kept = box[0]
        with _lock:
            if _kept.get(key) is kept:
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
    """Whether a run guard keeps ``model``'s channels-last copies (:func:`open_copies`)."""
    return id(model) in _kept


def channels_last_data(model: nn.Module, p: Tensor, data: Tensor) -> Tensor:
    """The channels-last copy of ``p``'s data ``data`` (``p.data``, in another layout): kept from an earlier call of
    the run on ``model`` if a run guard keeps its copies (:func:`open_copies`) and the copy is still ``p``'s (see the module
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
