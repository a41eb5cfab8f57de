"""What the guards hold: the registry of held modules and parameters, and a parameter's state.

Every module and parameter some guard holds has one entry in :data:`registry` (id -> its record, an
:class:`Entry`): how many guards hold it, how many of them are run guards, its baseline, and its state as the first
holder found it (the entry is that state's record: :class:`ParamState` here,
:class:`~salience._core.guard.state.ModuleState` for a module). :func:`held_values` gives the copy a hold took of a
buffer, for a pass that must start again from the state found without a copy of its own."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from salience._core.guard.records import NO_ATTRIBUTES, restore_attributes
from salience._core.guard.values import copy_of


class Entry:
    """A guard's count of one module or parameter, in ``registry``: ``holders`` (how many guards hold it),
    ``runs`` (how many of them are run guards), ``baseline`` (its state as the first run guard established
    it, or ``None``) and ``captured`` (whether its own state, the record's other slots, was recorded: not
    yet, or never after an error while entering). The entry is the state record itself (a
    :class:`ModuleState` or :class:`ParamState` made by :meth:`entry`), not a list holding one: that would make
    a call hold two Python objects per module and parameter and a tensor per parameter, 1100 on a ViT-Ti (152 modules,
    152 parameters) against 493, over the 700 that start a young garbage collection: one every call, each tenth moving
    the objects alive then to the old generation, whose growth sets off a full collection (0.13 to 0.4 s with
    torchvision imported) every 2000 calls of attention rollout (docs/performance.md)."""

    __slots__ = ("holders", "runs", "baseline", "captured")

    @classmethod
    def entry(cls) -> Any:
        """A record held by one guard, its state not recorded yet (:meth:`take` records it)."""
        e = cls.__new__(cls)
        e.holders, e.runs, e.baseline, e.captured = 1, 0, None, False
        return e


class ParamState(Entry):
    """A parameter's state as a guard found it: ``requires_grad``, ``.grad``, its data (storage and
    strides: the engine may convert it to channels-last for a run, salience._core.perf, and must leave the
    user's layout) and a copy of its Python attributes; :meth:`restore` puts them back."""

    __slots__ = ("param", "requires_grad", "grad", "data", "attrs")

    def __init__(self, param: torch.Tensor) -> None:
        self.take(param)

    def take(self, param: torch.Tensor, wrapper: Optional[type] = None, snap: Any = None) -> None:
        """Record ``param``'s state (``wrapper``, ``snap``: unused, as :meth:`ModuleState.take`'s)."""
        self.param = param
        self.requires_grad = param.requires_grad
        self.grad = param.grad
        self.data = param.data
        attrs = param.__dict__  # tensor_attributes, inline (a call per parameter and guard)
        self.attrs = dict(attrs) if attrs else NO_ATTRIBUTES
        self.captured = True

    def run_eagerly(self) -> None:
        pass

    def restore(self) -> None:
        param, data = self.param, self.data
        try:  # the data first: data set by a forward in inference mode refuses requires_grad=True
            same = param.is_set_to(data)  # the same storage, offset, sizes and strides (half the time of comparing them)
        except Exception:  # no kernel for meta and sparse tensors (nor some tensor subclasses): put the data back
            same = False
        if not same:
            param.data = data
        if param.requires_grad != self.requires_grad:
            param.requires_grad_(self.requires_grad)
        if param.grad is not self.grad:
            param.grad = self.grad
        if self.attrs or param.__dict__:  # restore_attributes' own first test, without its call
            restore_attributes(param, self.attrs)

    put_back = restore
# Every module and parameter some guard holds: id -> its Entry (its hold counts, its baseline, and its state as
# the first holder found it: the entry is that state's record).
registry: dict[int, Any] = {}


def held_values(module: nn.Module, name: str, buf: torch.Tensor, version: int, piece: bool = True) -> Any:
    """The copy a guard holding ``module`` took of its buffer ``name`` when it entered, where that buffer is still
    ``buf`` and was at ``version`` then (so the copy has the values ``buf`` had at ``version``); else ``None``. For a
    pass run again that must start from the state the first found (Ablation-CAM's split clean pass: a buffer of a
    ``torch.nn`` layer the user's forward wrote), without a copy of its own: :func:`put_back_state` of a record that
    took no copy of that buffer. Without ``piece``, whatever the hold keeps for it, not sliced out of its
    :class:`~salience._core.guard.values.Snapshot` (where the caller only asks whether there is one)."""
    entry = registry.get(id(module))
    if entry is None or type(entry) is ParamState or not entry.captured:
        return None
    for slot, held, at, values, _ in entry.buffers:
        if slot == name and held is buf and at == version:
            return copy_of(values, buf, version) if piece else values
    return None
