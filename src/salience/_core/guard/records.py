"""The pieces of a module's record: its tensor attributes, tensors' storages and Python attributes.

:func:`tensor_records` records the plain tensors among a module's attributes (by version counter, with a copy: the
object stays when a forward writes it in place; over 1 MiB the copy kept across calls,
:mod:`~salience._core.guard.values`), an inference tensor and a writeable NumPy array by their values
(:func:`_array_record`: a copy up to 1 MiB, a kept copy over it, a ``numpy.memmap`` or a large object array only
sampled). :func:`storages_of` records each tensor's storage, offset, sizes and strides (``self.buf.data = t`` moves
no version counter). :func:`put_back_tensors`, :func:`put_back_storages` and :func:`restore_attributes` put them
back; :func:`not_put_back` and :func:`tell_not_put_back` name, in a warning, what changed and cannot be put back.

Limits: a read-only NumPy array is not recorded (its writable base, where that is an attribute, is); an array a
forward made read-only together with its base is told, not put back."""
from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict, deque
from types import MappingProxyType
from typing import Any, Optional

import torch
from torch import nn

from salience._core.guard import containers, values
from salience._core.guard.containers import MISSING, NO_TENSORS, restore_mapping
from salience._core.guard.values import (
    KEPT, Sampled, array_types, kept_again, kept_copy, kept_values, large_tensor, ndarray_type, tensors_moved,
    values_moved, written_quietly)


def restore_buffer_names(module: nn.Module, records: Any, quiet: Optional[frozenset]) -> None:
    """``module``'s buffers back to the names of ``records`` (:meth:`ModuleState.take`'s), in their order, and
    its non-persistent names to ``quiet`` (``None``: none): those registered since removed, those deleted put
    back; in place, a name both have never taken out (:func:`restore_mapping`)."""
    restore_mapping(module._buffers, {record[0]: record[1] for record in records})
    now = module.__dict__.get("_non_persistent_buffers_set")
    if now is not None and now != (quiet or set()):
        now.intersection_update(quiet or ())
        now.update(quiet or ())


def tensor_attributes(tensor: torch.Tensor) -> Any:
    """A copy of ``tensor``'s Python attributes (its ``__dict__``), or one shared empty mapping when it has none
    (a new empty dict per tensor and call was a Python object the call held for nothing)."""
    attrs = tensor.__dict__
    return dict(attrs) if attrs else NO_ATTRIBUTES


def restore_attributes(tensor: torch.Tensor, saved: Any) -> None:
    """Put ``tensor``'s Python attributes back to ``saved`` (a copy of its ``__dict__``): those added
    since are deleted, those changed get their old values (the user's own attributes stay)."""
    now = tensor.__dict__
    if not now and not saved:
        return
    for k in [k for k in now if k not in saved]:
        del now[k]
    for k, v in saved.items():
        if now.get(k, MISSING) is not v:
            now[k] = v


# The model's state, one record for its three users: "record these modules' state here" (:func:`record_state`), "what
# changed since" (:func:`state_changes`), "put it back" (:func:`put_back_state`). The model guard's records
# (:class:`ModuleState`) are made and put back by the same pieces (:func:`tensor_records`, :func:`put_back_tensors`,
# :func:`restore_mapping`, :func:`_restore_buffers`), kept in their own light form for the guard's speed; Ablation-CAM's
# split clean pass (``methods.scorecam``) and the fx trace (:mod:`salience._core.folding`) take the record whole.

def tensor_records(attrs: dict, refuse: bool = False, copy: bool = True) -> Any:
    """The plain tensors among a module's attributes ``attrs`` (its ``__dict__``, or a copy: its parameters and buffers
    live in their own dicts), each ``(name, tensor, version, copy)``, or :data:`NO_TENSORS`. A forward that writes one
    in place (``self.seen.fill_(1)``, ``self.steps += 1`` on a tensor) keeps the object, so its identity does not tell;
    the version counter does, and the copy puts the values back. An inference tensor keeps no version counter: left
    out, or ``None`` returned where ``refuse`` (Ablation-CAM's split then runs its one pass). The types are looked at
    first, in C (most modules hold no tensor: 1 us a module). One over :data:`COPY_LIMIT` bytes gets the copy kept
    across calls (:func:`kept_copy`: a lookup table the forward writes in place is put back; a new copy each call
    would cost 60 ms and 100 MiB for 100 MiB). No
    copy (``None``) without ``copy`` (the fx trace's record of its shadow, thrown away after). Without ``refuse`` (the
    model guard), an inference tensor is recorded with the version ``None`` and a copy (kept across calls over the
    limit: :func:`kept_values`): written in place (a forward under ``torch.inference_mode()``), it is put
    back by its values; a writeable NumPy array too, by :func:`_array_record`'s copy (none without
    ``copy``)."""
    tensor = torch.Tensor
    kinds = set(map(type, attrs.values()))
    if kinds <= _NO_TENSOR_KINDS:  # in C: a module's usual dicts, flags and numbers
        return NO_TENSORS
    arrays = array_types()
    for t in kinds:
        if issubclass(t, tensor) or t in arrays:
            break
    else:
        return NO_TENSORS
    found = []
    for k, v in attrs.items():
        if type(v) in arrays:  # a NumPy array or memmap, no version counter: by its values (:func:`_array_record`)
            if copy and v.flags.writeable and v.size:
                found.append((k, v, None, _array_record(v)))
        elif isinstance(v, tensor) and not isinstance(v, nn.Parameter):
            large = large_tensor(v)
            try:  # an inference tensor (or a subclass without one) has no version counter
                version = v._version
                found.append((k, v, version, (kept_copy(v, version) if large else v.detach().clone()) if copy else None))
            except Exception:
                if refuse:
                    return None
                if copy and v.is_inference():  # told by its values, a copy kept across calls over the limit
                    found.append((k, v, None, kept_values(v) if large else v.clone()))
    return tuple(found) or NO_TENSORS


def _array_record(v: Any) -> Any:
    """The copy a record holds of the writeable NumPy array ``v`` (an attribute, or a container's item), told and
    put back by its values (no version counter): a copy up to :data:`COPY_LIMIT` bytes, a copy kept across calls over
    it (:func:`kept_values`: a 100 MiB table written in place is put back too); an object array
    a shallow copy up to :data:`CONTENTS_LIMIT` items (its items compared by identity); a ``numpy.memmap`` (a write
    to it writes the user's file; a copy of a file of any size would read it all each call) and a larger object array
    only sampled (:class:`Sampled`): told if changed, not put back."""
    if type(v) is not ndarray_type() or v.dtype.hasobject and v.size > containers.CONTENTS_LIMIT:
        return Sampled(v)
    if v.dtype.hasobject or v.nbytes <= values.COPY_LIMIT:
        return v.copy()
    return kept_values(v)


def storages_of(buffers: Any, tensors: Any) -> Any:
    """``(name, tensor, alias)`` of each buffer of ``buffers`` and plain tensor of ``tensors`` (the records of
    :class:`ModuleState`), ``alias`` a view of its storage as recorded (``detach()``: its storage, offset, sizes and
    strides), or :data:`NO_TENSORS`. A forward that swaps the storage under the object (``self.buf.data = t``, which
    moves no version counter; ``self.buf.set_(t)``) keeps the object, its name and perhaps its values: only this
    record tells that its storage changed. Taken for the modules whose dicts are recorded (about 1 us a tensor)."""
    found = [(k, b, b.detach()) for k, b, *_ in buffers if b is not None] if buffers else []
    if tensors:
        found += [(k, t, t.detach()) for k, t, version, _ in tensors if version is not None]
    return tuple(found) or NO_TENSORS


def same_storage(t: torch.Tensor, alias: torch.Tensor) -> bool:
    """Whether ``t`` still views the storage, offset, sizes and strides of ``alias`` (:func:`storages_of`); a tensor
    without that kernel (meta, sparse) is taken as the same."""
    try:
        return t.is_set_to(alias)
    except Exception:  # noqa: BLE001
        return True


def put_back_storages(storages: Any) -> None:
    """Each tensor of ``storages`` (:func:`storages_of`) set back to its storage, offset, sizes and strides where a
    forward swapped them (its values then those of its storage; a write in place besides is put back after, from its
    copy: the set moves its version counter)."""
    for _, t, alias in storages:
        if not same_storage(t, alias):
            with torch.no_grad():
                t.set_(alias)


def put_back_tensors(records: Any) -> Any:
    """The values of each tensor of ``records`` (:func:`tensor_records`) written in place since, put back in place
    from its copy (one without a copy stays as written: :func:`not_put_back`); the records with the versions after
    that (the same object where none was written), for a record put back again."""
    if not tensors_moved(records):
        return records
    with torch.no_grad():
        for _, t, version, copy in records:
            if version is None:  # an inference tensor (written in place only in inference mode) or an array
                if type(copy) is Sampled or not values_moved(t, copy):  # sampled: told (not_put_back), not put back
                    continue
                if type(t) is ndarray_type():
                    _put_back_array(t, copy)
                    continue
                with torch.inference_mode():
                    t.copy_(copy)
            elif copy is not None and (t._version != version or written_quietly(t, copy)):
                t.copy_(copy)
                if KEPT:
                    kept_again(t, copy)
    return tuple((k, t, t._version if version is not None else None, Sampled(t) if type(copy) is Sampled else copy)
                 for k, t, version, copy in records)


def _put_back_array(t: Any, copy: Any) -> None:
    """The values of ``copy`` put back into the NumPy array ``t`` (writeable when recorded: :func:`tensor_records`),
    made writeable again where the forward made it read-only (``self.table.flags.writeable = False``; review of session
    52: NumPy's raw "assignment destination is read-only" out of the call, the values and the flag left as the forward
    set them); where its memory is no longer writeable (its base made read-only), told (a warning), left as it is."""
    if not t.flags.writeable:
        try:
            t.flags.writeable = True
        except ValueError:
            import warnings

            from salience._core.errors import user_stacklevel

            warnings.warn(f"the model's forward wrote in place a NumPy array attribute ({t.nbytes / 2 ** 20:.1f} MiB) "
                          "and made it and its base read-only, so salience cannot put its values back: keep it "
                          "writeable in the forward, or save and restore it yourself", stacklevel=user_stacklevel())
            return
    t[...] = copy


def not_put_back(records: Any) -> list:
    """The names and tensors of ``records`` (:func:`tensor_records`) written in place since that have no copy: a tensor
    by its version counter, a NumPy array only sampled (:class:`Sampled`) by its sampled values."""
    return [(k, t) for k, t, version, copy in records if copy is None and version is not None and t._version != version
            or type(copy) is Sampled and not copy.same(t)]


def tell_not_put_back(module: nn.Module, lost: list) -> None:
    """A warning naming the plain attributes of ``module`` (``lost``: ``(name, value)`` each, :func:`not_put_back`'s
    and :func:`put_back_containers`') that a call changed in place and the guard could not put back: a container over
    :data:`CONTENTS_LIMIT` items (not copied), a ``numpy.memmap`` or large object array (sampled), a tensor without a
    copy (a TorchScript buffer whose guard copy is gone)."""
    import warnings

    from salience._core.errors import user_stacklevel

    names = ", ".join(_described(k, t) for k, t in lost)
    warnings.warn(f"the model's forward changed in place the plain attribute {names} of a "
                  f"{type(module).__name__} during salience's passes, and it keeps those values: salience copies a "
                  "list, dict, set, deque or object array to put it back only up to "
                  f"{containers.CONTENTS_LIMIT} items, and never a numpy.memmap (its file may be of any size; a write "
                  "to it writes the file: open it with mode='r' or 'c' if the forward must not); save and restore it "
                  "yourself",
                  stacklevel=user_stacklevel())


def _described(k: str, t: Any) -> str:
    """The attribute ``k`` of value ``t`` as :func:`tell_not_put_back` names it."""
    if isinstance(t, torch.Tensor):
        return f"{k!r} ({t.numel() * t.element_size() / 2 ** 20:.1f} MiB)"
    if type(t) is not ndarray_type() and type(t) in array_types():
        written = "copy-on-write: its file not written" if t.mode == "c" else "its file written too"
        return f"{k!r} (a numpy.memmap of {t.filename!r}, {t.nbytes / 2 ** 20:.1f} MiB: {written})"
    if type(t) is ndarray_type():
        return f"{k!r} (an object array of {t.size} items)"
    return f"{k!r} (a {type(t).__name__} of {len(t)} items)"


def named_changes(now: dict, saved: dict) -> list:
    """The names whose entries differ between a module's ``_parameters`` or ``_modules`` ``now`` and ``saved`` (its copy):
    added, deleted or replaced (by identity); compared in C first (a parameter's ``==`` raises unless it has one
    element: then by identity)."""
    try:
        if now == saved:
            return []
    except Exception:  # noqa: BLE001 - a parameter's == (several elements) raised: by identity
        pass
    return [k for k in now.keys() | saved.keys() if now.get(k, MISSING) is not saved.get(k, MISSING)]
# the types of a module's attributes that are no tensors, looked at first (:func:`tensor_records`)
_NO_TENSOR_KINDS = frozenset({bool, int, float, str, type(None), dict, OrderedDict, set, tuple, list, torch.dtype,
                              torch.device, deque, defaultdict, Counter})
NO_ATTRIBUTES: Any = MappingProxyType({})
EMPTY: dict = {}  # the copy of an empty _parameters or _modules, shared (never changed)
NO_NAMES: frozenset = frozenset()  # no non-persistent buffer names
