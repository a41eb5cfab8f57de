"""The values of large tensors and arrays: the copies kept across calls, and how values are compared.

A plain tensor attribute over :data:`COPY_LIMIT` (1 MiB) is not copied anew at each call: its copy is kept in
:data:`KEPT` while the tensor lives and holds its values (:func:`kept_copy`: by its version counter, data pointer,
shape, dtype and :data:`_KEPT_SAMPLES` samples), and so is a NumPy array's or an inference tensor's (no version
counter: :func:`kept_values`, compared whole, bit for bit, at each call's start). All kept copies together hold at
most :data:`_KEEP_LIMIT` bytes (1 GiB), the least recently used dropped first; :func:`forget_copies` drops them all.
The copies a model guard's entry just took or compared are noted (:data:`copy_notes`, per thread) for the
:class:`~salience._core.guard.Found` recorded right after it, which takes them without comparing them again.

The comparisons: :func:`_same_bits` (bit for bit in chunks, NaN equal to itself), :func:`_samples_same` and
:class:`Sampled` (values at 1024 places spread evenly), :func:`values_moved` and :func:`written_quietly` (a value
without a version counter, or a write that moved none).

Limits: a write that moves no version counter (through ``.data``, a NumPy view) of a few values of a tensor over
1 MiB between two calls is seen only where it reaches a sampled place; a sparse tensor is copied per call (its dense
size says nothing of its values); one over the cap is copied per call.

This room holds the package's state of copies (``KEPT``, its byte count, its lock, the per-thread notes) and its
tunable constants ``COPY_LIMIT``, ``_KEEP_LIMIT``, ``_KEPT_SAMPLES`` and ``FLAT_CHECK_LIMIT``: patch them here."""
from __future__ import annotations

import functools
import operator
import sys
import threading
import weakref
from typing import Any, Optional

import torch



def large_tensor(t: torch.Tensor) -> bool:
    """Whether the tensor ``t`` gets the copy kept across calls (:func:`kept_copy`, :func:`kept_values`): a strided one
    over :data:`COPY_LIMIT` bytes. A sparse one (or of another layout) is copied per call whatever its dense size,
    which says nothing of its stored values: the kept copy's data pointer and samples have no kernel for it, and its
    record would be dropped, a write in place neither put back nor told."""
    return t.layout is torch.strided and t.numel() * t.element_size() > COPY_LIMIT


def kept_copy(t: torch.Tensor, version: int) -> torch.Tensor:
    """A copy of the values of ``t`` (a plain tensor attribute over :data:`COPY_LIMIT` bytes, at ``version``), kept
    across calls while ``t`` lives and holds them: the model guard, :class:`Found` and Ablation-CAM's split each need
    such a tensor's values once a call (to put it back; a pass that writes it must still see the values found), and a
    new copy of a 100 MiB constant lookup table would cost each call of SmoothGrad or integrated gradients 50 ms and
    100 MiB (55.5 against 5.1 ms a call). The copy
    is taken again where ``t``'s version counter, storage, shape or dtype moved since (the user wrote it between the
    calls); one put back from it is taken as holding it again (:func:`put_back_tensors`). Up to :data:`_KEEP_LIMIT`
    bytes in all, the least recently used dropped first past it (:func:`_keep`), dropped with ``t`` (a weak reference)
    or by :func:`forget_copies`.
    A write that moves no version counter (through ``.data``, a NumPy view of the tensor) between two calls is told
    only where it changed one of :data:`_KEPT_SAMPLES` values spread evenly over the tensor (:func:`_samples_same`:
    else the stale copy would stay, and a pass that then wrote the tensor would put the older values back, the user's
    write lost); a write of a few values between them is not seen. The copy the model guard's entry just took or
    checked is not checked again by the :class:`Found` recorded right after it (:func:`_trusted`)."""
    key, ptr = id(t), t.data_ptr()
    values = _trusted(key, t)
    if values is not None:
        return values
    entry = KEPT.get(key)
    if entry is not None:
        ref, at, where, values = entry
        if ref() is t and at == version and where == ptr and values.shape == t.shape and values.dtype == t.dtype \
                and _samples_same(t, values):
            _used(key, entry)
            return _marked(key, values)
    return _marked(key, _keep(t, version, ptr, t.detach().clone()))


def kept_values(v: Any) -> Any:
    """A copy of the values of ``v`` (a NumPy array or an inference tensor over :data:`COPY_LIMIT` bytes: no version
    counter), kept across calls while ``v`` lives and holds them (so that such an attribute written in place is put
    back). Without a version counter only a comparison of every value tells whether the user wrote
    ``v`` between two calls (``model.table[5] = 1``: a sampled check misses it, and the kept copy, stale, would undo
    that write at the next call's put-back): each reuse compares the whole (:func:`_same_bits`, bit for bit, in chunks
    of 256 KiB; about 10 ms for 100 MiB on an AMD EPYC core, against 39 ms for a new copy of it, which its memory's
    first writes make dear); a copy taken again where it differs. The :class:`Found` recorded right after the model
    guard's entry takes the copy that entry just compared or took (:func:`_trusted`): compared again, the same values
    would be read twice at each call's start."""
    key = id(v)
    values = _trusted(key, v)
    if values is not None:
        return values
    entry = KEPT.get(key)
    if entry is not None:
        values = entry[3]
        if entry[0]() is v and entry[1] is None and _same_bits(v, values):
            _used(key, entry)
            return _marked(key, values)
    return _marked(key, _keep(v, None, 0, v.copy() if type(v) is ndarray_type() else v.clone()))


def _marked(key: int, values: Any) -> Any:
    """``values``, the copy of the object of id ``key`` just compared or taken, noted where this thread's model guard
    is entering (:func:`_enter_guard`: ``copy_notes.marking``), for the :class:`Found` recorded right after it."""
    marking = getattr(copy_notes, "marking", None)
    if marking is not None:
        marking[key] = values
    return values


def _trusted(key: int, now: Any) -> Any:
    """The copy of the object of id ``key`` that this thread's model guard took or compared while entering, where a
    :class:`Found` recorded right after that entry asks (``copy_notes.trusted``, set only then), where it still has the
    shape and dtype of ``now`` (the tensor or array itself); else ``None``. Nothing ran
    between the two (``with model_guard(model), Found(model)``), so the values are those the entry saw; another guard's
    entry or exit in between drops the notes (:func:`_enter_guard`, :func:`_leave_guard`)."""
    trusted = getattr(copy_notes, "trusted", None)
    values = trusted.get(key) if trusted else None
    return values if values is not None and values.shape == now.shape and values.dtype == now.dtype else None


def _keep(t: Any, version: Optional[int], ptr: int, values: Any) -> Any:
    """``values``, a copy of ``t`` taken at ``version`` (``None``: compared by values), kept in :data:`KEPT` where it
    fits in :data:`_KEEP_LIMIT` bytes with the others, the least recently used dropped first to make room (else,
    past the cap, each call would copy anew while the copies of models no longer used, or gone but not yet collected
    in a reference cycle, held the room); one larger than the cap, or of an object without weak references, not kept."""
    global _kept_bytes
    key, size = id(t), values.nbytes
    with _kept_lock:
        _forget(key)  # the stale entry, if any (the lock is re-entrant)
        if size > _KEEP_LIMIT:
            return values
        while KEPT and _kept_bytes + size > _KEEP_LIMIT:
            _forget(next(iter(KEPT)))  # the least recently used first (:func:`_used` moves an entry last)
        try:  # dropped with the tensor (a subclass without weak references: not kept)
            KEPT[key] = (weakref.ref(t, lambda _, key=key: _forget(key)), version, ptr, values)
        except TypeError:
            return values
        _kept_bytes += size
    return values


def _used(key: int, entry: tuple) -> None:
    """The kept copy ``entry`` of the object of id ``key`` reused: moved last in :data:`KEPT`'s order (the most
    recently used; :func:`_keep` drops from the first)."""
    with _kept_lock:
        if KEPT.get(key) is entry:
            del KEPT[key]
            KEPT[key] = entry


def _samples_same(t: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``t`` holds the values of its kept copy ``values`` at :data:`_KEPT_SAMPLES` places spread evenly over
    it (the first and the last among them; NaN equal to NaN): a write that moves no version counter between two calls
    (``t.data[...] = v``, ``t.numpy()[...] = v``) that reaches one of them is told (about 0.2 ms on a 100 MiB tensor, each
    sampled place a cache miss; AMD EPYC, core 0, loaded: against 84 ms for its copy, ``benchmarks/found-s51.md``)."""
    at = _sample_places(t.numel(), t.device)
    return _equal_nan(torch.take(t.detach(), at), torch.take(values, at))


@functools.lru_cache(maxsize=64)
def _sample_places(n: int, device: torch.device) -> torch.Tensor:
    """The flat indices (int64, on ``device``) of :data:`_KEPT_SAMPLES` places spread evenly over ``n`` values, the
    first and the last among them (every one where ``n`` is smaller): :func:`_samples_same`'s and :class:`Sampled`'s.
    In integers: a float's linspace rounds an index past the end over 2 ** 24 values. Made once per size and device
    (read only): 50 us each time, a third of a sampled check. The device always named: the default one
    (``torch.set_default_device("cuda")``, ``with torch.device("meta")``) would make :class:`Sampled`'s indices there,
    a raw TypeError from ``.numpy()``, and the cache would keep them for every later array of that size."""
    k = min(n, _KEPT_SAMPLES)
    return torch.arange(k, device=device) * (n - 1) // max(k - 1, 1)


def _forget(key: int) -> None:
    """The kept copy of the tensor of id ``key`` (:func:`kept_copy`) dropped: the tensor is gone."""
    global _kept_bytes
    with _kept_lock:
        old = KEPT.pop(key, None)
        if old is not None:
            _kept_bytes -= old[3].nbytes


def kept_again(t: torch.Tensor, copy: torch.Tensor) -> None:
    """``t`` put back from ``copy``: where that copy is the one kept for ``t`` (:func:`kept_copy`), its version is ``t``'s
    now (it holds the kept values again; the next call takes no copy)."""
    with _kept_lock:  # not between another thread's pop and put of the entry (:func:`kept_copy`)
        entry = KEPT.get(id(t))
        if entry is not None and entry[3] is copy and entry[0]() is t:
            del KEPT[id(t)]  # the most recently used (:func:`_used`)
            KEPT[id(t)] = (entry[0], t._version, t.data_ptr(), copy)


def forget_copies() -> None:
    """Drop every copy kept across calls (:func:`kept_copy`): the memory they hold, at once."""
    global _kept_bytes
    with _kept_lock:
        KEPT.clear()
        _kept_bytes = 0


def tensors_moved(records: Any) -> bool:
    """Whether a tensor of :func:`tensor_records`' ``records`` was written in place since."""
    return any(_tensor_moved(t, version, copy) for _, t, version, copy in records)


def _tensor_moved(t: Any, version: Optional[int], copy: Any) -> bool:
    """Whether the tensor (or NumPy array) ``t``, recorded at ``version`` with ``copy``, was written in place since: by
    its version counter, else by its values (:func:`values_moved`); a plain tensor whose counter did not move by its
    values too (:func:`written_quietly`)."""
    if version is None:
        return values_moved(t, copy)
    return t._version != version or written_quietly(t, copy)


def written_quietly(t: torch.Tensor, copy: Any) -> bool:
    """Whether the plain tensor ``t``, its version counter unmoved, no longer holds the values of ``copy``: a write
    through ``t.data`` (``self.table.data.mul_(2)``) or a NumPy view moves no counter. Compared
    whole up to :data:`COPY_LIMIT` bytes, over it at :data:`_KEPT_SAMPLES` places (:func:`_samples_same`: a write of a
    few values no sample reads stays); not where there is no copy, nor where the two cannot be compared, nor on a
    device (its answer would wait for the device: a synchronization per tensor and call)."""
    if copy is None or copy.shape != t.shape or copy.dtype != t.dtype or t.device.type != "cpu":
        return False
    try:
        return not (_samples_same(t, copy) if copy.nbytes > COPY_LIMIT else _equal_nan(t.detach(), copy))
    except Exception:  # noqa: BLE001 - no kernel for the comparison (meta, sparse, a subclass): by its counter only
        return False


def values_moved(t: Any, copy: Any) -> bool:
    """Whether the inference tensor or NumPy array ``t`` (no version counter) no longer holds the values of ``copy``
    (its copy when recorded, bit for bit: :func:`_same_bits`; its sampled values, :class:`Sampled`; or ``None``: not
    told)."""
    if copy is None:
        return False
    if type(copy) is Sampled:
        return not copy.same(t)
    return not _same_bits(t, copy)


def _same_bits(a: Any, b: Any) -> bool:
    """Whether ``a`` holds the values of its copy ``b`` (two NumPy arrays or two tensors of one shape and dtype): bit for
    bit where both lie in one contiguous block of CPU memory (a NaN equal to itself, -0.0 not 0.0), compared as unsigned
    integers in chunks of :data:`_CHUNK` items (a comparison of 100 MiB at once made a 25 MiB mask: 31 ms, against 10 in
    chunks; ``torch.equal`` 58: AMD EPYC, one core); else by value, NaN equal to NaN
    (:func:`_same_values`); an object array's items by identity."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = _bits(a), _bits(b)
    if x is None or y is None:
        return _same_values(a, b)
    import numpy

    if x.size <= _CHUNK:
        return bool(numpy.array_equal(x, y))
    out = numpy.empty(_CHUNK, bool)
    for i in range(0, x.size, _CHUNK):
        part = out[:min(_CHUNK, x.size - i)]
        numpy.equal(x[i:i + _CHUNK], y[i:i + _CHUNK], out=part)
        if not part.all():
            return False
    return True


def _bits(v: Any) -> Any:
    """The values of ``v`` (a NumPy array or a tensor) as a flat NumPy array of unsigned integers of their size (bytes
    where no such integer exists) viewing its memory, or ``None`` where it is not one contiguous block in CPU memory (a
    view with strides, a device's tensor, an object array, a tensor with a lazy conjugation or negation)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or not v.is_contiguous() or v.is_conj() or v.is_neg():
            return None
        try:
            return v.detach().reshape(-1).view(_TORCH_UINTS.get(v.element_size(), torch.uint8)).numpy()
        except Exception:  # noqa: BLE001 - a subclass, a layout without a NumPy view: compared by value
            return None
    if v.dtype.hasobject or not v.flags.c_contiguous:
        return None
    return v.reshape(-1).view(_UINTS.get(v.itemsize, "u1"))


def _same_values(a: Any, b: Any) -> bool:
    """:func:`_same_bits` by value, where no view of the bits exists: tensors by ``torch.equal``, NaN equal to NaN; NumPy
    arrays by ``numpy.array_equal`` (NaN equal to NaN), an object array's items by identity (as a container's), a
    structured array's fields each so."""
    if isinstance(a, torch.Tensor):
        return _equal_nan(a, b)
    import numpy

    # a structured dtype with an object field: field by field (its records, ``numpy.void``, are new objects at each
    # read: compared by identity, such an array would be changed at every call)
    if a.dtype.names:
        return all(_same_values(a[n], b[n]) for n in a.dtype.names)
    if a.dtype.hasobject:
        return all(map(operator.is_, a.flat, b.flat))
    return bool(numpy.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _equal_nan(now: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether two tensors of one shape hold the same values, NaN equal to NaN."""
    if torch.equal(now, kept):
        return True
    return bool(((now == kept) | (now.isnan() & kept.isnan())).all()) if now.is_floating_point() or \
        now.is_complex() else False


class Sampled:
    """:data:`_KEPT_SAMPLES` values of a NumPy array spread evenly over it (the first and the last among them), for one
    not copied (:func:`_array_record`: a ``numpy.memmap``, whose file a copy would read whole each call; an object
    array over :data:`CONTENTS_LIMIT` items, compared by identity): a write in place that reaches one of them is told,
    as it stays (:func:`not_put_back`)."""

    __slots__ = ("at", "values")

    def __init__(self, v: Any) -> None:
        import numpy

        self.at = numpy.unravel_index(_sample_places(v.size, _CPU).numpy(), v.shape) if v.ndim else ()
        self.values = numpy.array(v[self.at])  # a plain array (a memmap's fancy index is one too, without its file)

    def same(self, v: Any) -> bool:
        """Whether ``v`` still holds the sampled values."""
        import numpy

        try:
            now = numpy.array(v[self.at])
        except IndexError:  # resized in place (``ndarray.resize``)
            return False
        return _same_bits(now, self.values)


def ndarray_type() -> Optional[type]:
    """NumPy's array type, where NumPy was imported (else no array can be among a module's attributes)."""
    numpy = sys.modules.get("numpy")
    return None if numpy is None else numpy.ndarray


def array_types() -> tuple:
    """NumPy's array and memmap types (exact types: another subclass, a masked array, is not looked at), where NumPy
    was imported; else none."""
    numpy = sys.modules.get("numpy")
    return () if numpy is None else (numpy.ndarray, numpy.memmap)
# the largest tensor or array attribute (bytes) the records copy anew at each call (:func:`tensor_records`); a larger
# one gets a copy kept across calls (:func:`kept_copy`, :func:`kept_values`)
COPY_LIMIT = 1 << 20
# the copies of larger ones kept across calls (:func:`kept_copy`): id -> (weak reference, version, data_ptr, copy), and
# the most bytes they may hold in all
KEPT: dict = {}
_KEEP_LIMIT = 1 << 30
_kept_bytes = 0
# re-entrant: a tensor that dies while its thread holds it (the garbage collector, run by any allocation inside it,
# frees a model in a reference cycle) calls :func:`_forget`, which takes it again (a plain lock would deadlock)
_kept_lock = threading.RLock()
# per thread: the copies its model guard's entry took or compared (``marking``, while entering; ``fresh``, after it),
# and those the :class:`Found` recorded right after it takes without comparing them again (``trusted``: :func:`_trusted`)
copy_notes = threading.local()
# the values of a kept copy compared with its tensor's at each call (:func:`_samples_same`)
_KEPT_SAMPLES = 1024
# the CPU, named (not the default device: :func:`_sample_places`)
_CPU = torch.device("cpu")
# the items compared at once by :func:`_same_bits` (256 KiB of 4-byte values), and the unsigned integers it views
# values of each size as
_CHUNK = 1 << 16
_UINTS = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}
_TORCH_UINTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# the quantized dtypes: their tensors are never viewed as integers (:func:`_same_quantized`)
_QUANTIZED = frozenset(d for d in (getattr(torch, n, None) for n in ("quint8", "qint8", "qint32", "quint4x2",
                                                                      "quint2x4")) if d is not None)
# the largest group of buffers (bytes, one dtype) whose values :meth:`Snapshot.check` reads in one flat copy at a
# guard's exit; a larger one is compared tensor by tensor in place (no second copy of it)
FLAT_CHECK_LIMIT = COPY_LIMIT


def large_copy(copy: Any) -> bool:
    """Whether ``copy``, a record's copy of a value without version counter, is one over :data:`COPY_LIMIT` bytes."""
    return copy is not None and type(copy) is not Sampled and copy.nbytes > COPY_LIMIT


def samples_moved(t: Any, copy: Any) -> bool:
    """Whether the NumPy array or inference tensor ``t`` no longer holds the values of ``copy`` at
    :data:`_KEPT_SAMPLES` places spread evenly over it (or its shape or dtype changed): :class:`Found`'s check before
    each pass, a write of a few values elsewhere seen by the next passes and put back at the call's end."""
    if t.shape != copy.shape or t.dtype != copy.dtype:
        return True
    if isinstance(t, torch.Tensor):
        return not _samples_same(t, copy)
    return not Sampled(copy).same(t)


_DTYPE = operator.attrgetter("dtype")
_flatten = torch._C._nn.flatten_dense_tensors  # a cat of the tensors flattened, in C
_SHAPE, _VERSION_OF = operator.attrgetter("shape"), operator.attrgetter("_version")


class Snapshot:
    """One copy of the values of many tensors (the buffers of the modules a model guard's entry records), taken in
    one C call per dtype, device and layout (torch's ``flatten_dense_tensors``: a ``cat`` of the tensors flattened),
    not one ``clone`` per tensor: resnet18's 60 buffers cost 93 us a call as clones, 24 us as two flat copies (the
    demo CNN's 14: 14 copies, 2 now; ``tests/test_s57_guardcost.py`` counts them). A record's copy of a buffer is the
    snapshot itself (no Python object per buffer); :meth:`of` slices a buffer's piece out only where the record asks
    for it (a buffer written in the block, which is rare).

    ``tensors`` is filled first (:meth:`ModuleState.take` appends each buffer it leaves to it), then :meth:`take`
    copies them all, with their version counters: a piece is given only for the version it was copied at (a buffer
    written between its record and the copy, which runs only salience's bookkeeping, gets none, as a record without a
    copy). A group torch cannot flatten (a sparse tensor, a backend without ``cat``), and a quantized dtype's, is
    cloned tensor by tensor. :meth:`check` compares them at the exit (a group over :data:`FLAT_CHECK_LIMIT` bytes in place, without a
    second copy). Not taken (an error or Ctrl-C before :meth:`take`): no piece at all; nothing of the user's ran yet, so no
    buffer was written that a piece would put back."""

    __slots__ = ("tensors", "versions", "shapes", "groups", "where", "moved", "index")

    def __init__(self) -> None:
        self.tensors: list = []
        self.versions = self.shapes = self.groups = self.where = self.moved = self.index = None

    def take(self) -> None:
        """Copy the values of :attr:`tensors` (each a plain ``torch.Tensor`` without ``requires_grad``), grouped by
        dtype: ``groups`` maps a dtype to ``(indices, flat copy or list of clones, the group's tensors)`` (a group torch
        cannot flatten, tensors on several devices or of another layout, is cloned tensor by tensor; a device or
        layout of their own per tensor read each call cost as much as the copies saved)."""
        tensors = self.tensors
        if not tensors:
            return
        versions, shapes, keys = list(map(_VERSION_OF, tensors)), list(map(_SHAPE, tensors)), list(map(_DTYPE, tensors))
        if keys.count(keys[0]) == len(keys):  # one dtype (told in C)
            by = {keys[0]: list(range(len(tensors)))}
        else:
            by = {}
            for i, k in enumerate(keys):
                by.setdefault(k, []).append(i)
        groups = {}
        for key, members in by.items():
            group = tensors if len(members) == len(tensors) else [tensors[i] for i in members]
            try:  # one tensor alone: torch gives a view of it (``t.contiguous().view(-1)``), no copy: a clone; quantized
                # ones a clone each (a flat copy of them, viewed as integers to compare, crashed the process)
                values: Any = _flatten(group) if len(group) > 1 and key not in _QUANTIZED else [t.clone() for t in group]
            except Exception:  # noqa: BLE001 - no flat copy for this group (devices, a sparse tensor): one clone each
                values = [t.clone() for t in group]
            groups[key] = (members, values, group)
        self.versions, self.shapes, self.where = versions, shapes, keys
        self.groups = groups  # last: a piece is given only once all is taken

    def of(self, t: torch.Tensor, version: int) -> Optional[torch.Tensor]:
        """The copy of ``t``'s values as taken at ``version`` (a view of the flat copy, in ``t``'s shape then), or
        ``None`` where ``t`` was not copied at that version (or not copied: :meth:`take` did not run). Found by ``t``'s
        id (:meth:`_where`): a scan of :attr:`tensors` per buffer put back made a put-back of every buffer square in
        their number (4000 buffers written in a block: 1.0 s, against 28 ms by clones)."""
        if self.groups is None:
            return None
        at = self._where().get(id(t))
        if at is None:
            return None
        i, k, start = at
        if self.tensors[i] is not t or self.versions[i] != version:
            return None
        values = self.groups[self.where[i]][1]
        if type(values) is list:
            return values[k]
        return values.narrow(0, start, _numel(self.shapes[i])).view(self.shapes[i])

    def renew(self, t: torch.Tensor, version: int, now: int) -> bool:
        """``t``, copied at ``version``, now holds its copy's values again at version ``now`` (a run guard's baseline
        put back from it: :meth:`ModuleState.put_back`): its piece is given for ``now`` from here on, and it is
        compared again at the next :meth:`check` (a piece handed out instead, a plain tensor, was compared by version
        only: a write through ``.data`` in a later call of the run stayed for the calls after it). ``False`` where
        ``t`` has no piece for ``version`` (nothing renewed)."""
        if self.groups is None:
            return False
        at = self._where().get(id(t))
        if at is None or self.tensors[at[0]] is not t or self.versions[at[0]] != version:
            return False
        self.versions[at[0]] = now
        return True

    def _where(self) -> dict:
        """``id(tensor) -> (its index in tensors, its index in its group, its piece's start in the group's flat
        copy)``, the first of each tensor (one listed twice, a buffer shared by two modules, was copied twice at one
        version), made once a snapshot where a piece is first asked for (the offsets summed as they go)."""
        index = self.index
        if index is None:
            index = {}
            shapes = self.shapes
            for members, _, _ in self.groups.values():
                start = 0
                for k, i in enumerate(members):
                    index.setdefault(id(self.tensors[i]), (i, k, start))
                    start += _numel(shapes[i])
            self.index = index
        return index

    def check(self) -> None:
        """Note in :attr:`moved` the ids of the tensors whose values differ from the copy, bit for bit, whatever their
        version counters say: BatchNorm's running statistics, updated in train mode (a forward that trains its
        layer: ``self.bn.train()``), move no version counter (torch 2.14's CPU kernel), nor does a write through
        ``.data``; a put-back by version alone left them written. A group of up to :data:`FLAT_CHECK_LIMIT` bytes is
        read in one flat copy of its values now, compared whole (one ``equal``); tensor by tensor only where it
        differs. A larger group is compared tensor by tensor in place, without a copy: a flat read of it would hold a
        second copy of all its buffers at the exit (a model with 512 MiB of buffers peaked 1 GiB over its size, the
        per-buffer clones of before 512 MiB). A quantized tensor is compared by its integers and parameters
        (:func:`_same_quantized`); one that cannot be compared (no kernel: meta, sparse) is taken as unchanged, as
        before (by its version only)."""
        moved: set = set()
        if self.groups is not None:
            for members, values, group in self.groups.values():
                if type(values) is not list and values.nbytes <= FLAT_CHECK_LIMIT:
                    try:
                        now = _flatten(group)
                        if now.shape == values.shape and now.dtype == values.dtype and \
                                torch.equal(_as_bits(now), _as_bits(values)):
                            continue
                    except Exception:  # noqa: BLE001 - a tensor resized, on another device: one by one
                        pass
                moved.update(self._differ(members, values))
        self.moved = moved

    def _differ(self, members: list, values: Any) -> list:
        """The ids of the tensors of the group ``members`` (their indices; ``values`` its flat copy or clones) whose
        version counter did not move and whose values differ from their copy (:func:`_same_bytes`, in place). One
        whose counter moved is put back by it anyway: not compared (4000 buffers written in a block cost 70 ms
        more compared)."""
        tensors, versions, shapes = self.tensors, self.versions, self.shapes
        flat = type(values) is not list
        out, start = [], 0
        for k, i in enumerate(members):
            t = tensors[i]
            n = _numel(shapes[i]) if flat else 0
            if t._version == versions[i]:
                piece = values.narrow(0, start, n).view(shapes[i]) if flat else values[k]
                if not _same_bytes(t, piece):
                    out.append(id(t))
            start += n
        return out


def _same_bytes(t: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether ``t`` holds the values of ``copy`` bit for bit (its shape and dtype too; NaN equal to itself, -0.0 not
    0.0), read in place: viewed as integers of its element's size whatever its strides (no contiguous copy of a large
    buffer); a lazy conjugate or negative view resolved first (its bits are not its values: a view of them as integers
    raised, and the tensor was taken as unchanged). ``True`` where they cannot be compared (no kernel for the
    tensor's kind)."""
    try:
        if t.shape != copy.shape or t.dtype != copy.dtype:
            return False
        t = t.detach()
        if t.is_quantized:
            return _same_quantized(t, copy)
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return torch.equal(_in_bits(t), _in_bits(copy))
    except Exception:  # noqa: BLE001 - meta, sparse, a subclass without these kernels
        return True


def _same_quantized(t: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether the quantized tensor ``t`` holds the values of ``copy``: its integers (``int_repr``) and its scheme,
    scales and zero points. Not viewed as integers of its element's size: torch gives a tensor of no valid storage
    there, and ``equal`` of it crashed the process (a model with a quantized buffer, at each guard's exit)."""
    if t.qscheme() != copy.qscheme():
        return False
    if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        params = (t.q_scale(), t.q_zero_point()) == (copy.q_scale(), copy.q_zero_point())
    else:
        params = t.q_per_channel_axis() == copy.q_per_channel_axis() and \
            torch.equal(t.q_per_channel_scales(), copy.q_per_channel_scales()) and \
            torch.equal(t.q_per_channel_zero_points(), copy.q_per_channel_zero_points())
    return params and torch.equal(t.int_repr(), copy.int_repr())


def _in_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` (any strides) viewed as integers of its element's size; a complex one of 16 bytes as its real and
    imaginary parts' (``view_as_real``: a view of another element size needs a contiguous last dimension)."""
    if t.element_size() not in _TORCH_UINTS and t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_TORCH_UINTS[t.element_size()])


def _as_bits(flat: torch.Tensor) -> torch.Tensor:
    """The 1-D contiguous tensor ``flat`` viewed as integers of its element's size (8 bytes for a larger one): compared
    with ``equal``, bit for bit, NaN equal to itself (a view as bytes compared 4 times as many values, 4 times as
    slowly)."""
    size = flat.element_size()
    return flat.view(_TORCH_UINTS.get(size, torch.int64))


def _numel(shape: torch.Size) -> int:
    """The number of values of a tensor of ``shape``."""
    return shape.numel()


def copy_of(copy: Any, t: torch.Tensor, version: int) -> Optional[torch.Tensor]:
    """A record's copy of the buffer ``t`` recorded at ``version``: ``copy`` itself (a tensor, or ``None``), or its
    piece where ``copy`` is a :class:`Snapshot`."""
    return copy.of(t, version) if type(copy) is Snapshot else copy
