"""The state a call found, put back before each of its passes (:class:`Found`).

A many-pass method (SmoothGrad, occlusion, RISE...) scores every pass on the model the user called, not on the state
the previous pass left: :class:`Found` records the model's own state right after the call's model guard entered and,
before each pass, compares it as whole lists in C and puts back only the modules that differ; a large array or
inference tensor by samples before each pass and whole at the call's end.

Limits: between passes, a write through ``.data`` (no version counter moved) is not seen; a buffer of a torch.nn
layer written in place with no copy of the state found is refused (a ``SalienceError``)."""
from __future__ import annotations

import operator
from collections import Counter, defaultdict
from itertools import chain, compress
from typing import Any

import torch
from torch import nn

from salience._core.errors import SalienceError
from salience._core.fingerprint import _modules
from salience._core.guard.containers import NO_TENSORS, same_contents
from salience._core.guard.holds import held_values
from salience._core.guard.records import put_back_tensors, same_storage
from salience._core.guard.scripted import Scripted
from salience._core.guard.state import record_state, settled, state_changes, user_module
from salience._core.guard.values import copy_notes, large_copy, samples_moved


class Found:
    """The model's own state as the call found it (what a forward may keep for its next call: a recurrent
    ``self.h = ...``, a counter, a tensor or a buffer it writes in place), put back before each of the call's
    passes (:meth:`before_pass`) and when the call's passes end (a context manager, also on an exception), so that
    every perturbed copy is scored by the model the user called, not by the
    state the call's previous pass left (occlusion's window ``k`` would see window ``k - 1``'s pass's state: the
    model guard puts the user's state back only when the call ends).

    Recorded right after the call's :func:`~salience._core.guard.model_guard` is entered (eval mode set), by the
    guard's own record (:func:`~salience._core.guard.record_state`, put back by the guard's own
    ``ModuleState.put_back``): the plain attributes (one level deep), parameters and submodules by name (a head
    swapped, a layer made on a first call) and buffers of the modules not from ``torch.nn``
    (whose layers in eval mode write nothing), as the model guard puts them back after a call: the contents of each
    list, dict, set, ``collections`` deque, defaultdict and Counter (exactly those types, ``self.hist.append(y)``;
    a subclass, a test's log of the passes, is not copied), each plain tensor among the attributes written in place,
    an inference tensor (no version counter: a
    forward under ``torch.inference_mode()``) by its values; here each copied whatever its size (the guard's
    containers stop at 1024 items; as Ablation-CAM's split), so that no pass sees what a pass before left that the
    call's end would undo. A copy over 1 MiB is kept across calls while its tensor holds its values
    (:func:`~salience._core.guard.values.kept_copy`: a new copy of a constant lookup table of 100 MiB would cost each
    SmoothGrad call 84 ms of an 88.5 ms call on an AMD EPYC (medians), against 3.66 ms, ``benchmarks/found-s51.md``;
    it holds that memory while the table lives). The tensors among the containers' items, NumPy arrays and each
    tensor's storage as the model guard records them. A buffer of a
    ``torch.nn`` layer that the model's own code writes is put back from the guard's copy
    (:func:`~salience._core.guard.held_values`), or from a copy of the record's own where the guard's is not of the
    state found (a call nested in another's guard, SmoothGrad's chunks or the user's block, finds it written since:
    the outer call's put-back is a write too). A TorchScript module's attributes and buffers are read and put back
    through TorchScript (:class:`~salience._core.guard.scripted.Scripted`).

    Each pass the record is compared as whole lists in C (:meth:`_moved`: the modules' dicts with their copies, the
    tensors' version counters, the containers with theirs, the buffers by name and identity), and only
    the modules that differ are put back. Where nothing changed, per pass (AMD EPYC, core 1, one thread, load 4-6,
    medians of 5 interleaved rounds, ``benchmarks/found-s50.md``): a transformers ViT-S 0.036 -> 0.018 ms, timm's
    vit_small 0.039 -> 0.022, resnet50 0.025 -> 0.018, against a pass of 110 ms an image; 2000 modules of the user's
    1.07 -> 0.54 ms, each with a list and a dict 4.5 -> 0.96. The record, once a call: 0.36, 0.42, 0.28 ms."""

    def __init__(self, model: nn.Module) -> None:
        own, layers, scripts = [], [], []
        kinds: dict = {}  # each class's kind, told once a call (0.2 us a module: a third of the record's cost on timm)
        # one walk of the modules alone (the guard's quick one, fingerprint._modules: 0.07 ms on timm's vit_small,
        # model.modules() 0.15; modules_of walks the parameters too: 0.36 ms on a scripted resnet50, its wrappers'
        # dicts slow): the model's own modules; torch.nn's layers holding buffers; TorchScript's (no
        # plain dicts: read through TorchScript)
        for m in _modules(model):
            kind = kinds.get(type(m))
            if kind is None:
                kind = kinds[type(m)] = 2 if isinstance(m, torch.jit.ScriptModule) else int(user_module(m))
            if kind == 1 or kind == 0 and _hooked(m):  # a torch.nn layer with a hook too: the hook may set attributes
                own.append(m)
            elif kind == 2:
                scripts.append(m)
            elif m._buffers:
                layers.append(m)
        # its parameters and submodules by name too, as the model guard's (``self.w = nn.Parameter``, a submodule
        # added on a first call or swapped)
        # the large copies the guard's entry just took or compared, taken as they are (values._trusted), once
        copy_notes.trusted, copy_notes.fresh = getattr(copy_notes, "fresh", None), None
        try:
            self.record = record_state(own, containers=True, inference=True, named=True) if own else []
        finally:
            copy_notes.trusted = None
        # a NumPy array or inference tensor over the copy limit: apart, by samples before each pass (:meth:`_large`)
        self.large = _large_apart(self.record)
        # the tensors and their copies: the guard told at the end which it need not put back again (:func:`settled`)
        self.tensors = [(r.module, t, version, copy) for r in self.record for _, t, version, copy in r.tensors
                        if version is not None]
        # each torch.nn layer's buffers: (module, name, buffer, its version as found, its version now); looked at
        # as a whole first (the dicts by identity in C, the versions' sum: they only grow), one by one where it moved
        self.torch_nn = [[m, k, b, b._version, b._version] for m in layers for k, b in m._buffers.items()
                         if b is not None]
        self.layers = [m._buffers for m in layers]
        self.layer_copies = [dict(d) for d in self.layers]
        self.buffers = [e[2] for e in self.torch_nn]
        # a buffer written since the guard took its copy (a call nested in another's guard: the outer call's put-back
        # is a write too; a pass of the user's in their own guard block): a copy of its own, of the state found
        self.copies = {id(e[2]): e[2].detach().clone() for e in self.torch_nn
                       if held_values(e[0], e[1], e[2], e[3], piece=False) is None}
        self.versions = sum(map(_VERSION, self.buffers))
        self.scripted = Scripted(scripts) if scripts else None
        self._flat()

    def _flat(self) -> None:
        """The record's pieces as flat lists, each compared with its copy in C in one go each pass (a Python loop
        over the modules, 2000 modules of the user's each with a list and a dict, would cost 5 ms a pass). ``owners``: each piece's module, by its index
        in the record, for the modules put back where one differs."""
        self.dicts, self.saved = [r.module.__dict__ for r in self.record], [r.attrs for r in self.record]
        # the dicts of parameters and submodules (the same objects in both: compared with copies of their own)
        self.owned = [r.attrs[k] for r in self.record for k in ("_parameters", "_modules")]
        self.owned_copies = [c for r in self.record for c in (r.params, r.children)]
        self.owned_owners = [i for i in range(len(self.record)) for _ in range(2)]
        # each tensor's storage (``self.buf.data = t`` moves no version counter)
        self.stored = [(t, alias, i) for i, r in enumerate(self.record) for _, t, alias in r.storages]
        tensors, versions, seqs, seq_copies, maps, map_copies, counts, count_copies = ([] for _ in range(8))
        held, names, held_values, bufs, buf_versions, factories, slow = ([] for _ in range(7))
        owners: dict = {"tensors": [], "seqs": [], "maps": [], "counts": [], "held": [], "bufs": [], "factories": []}
        for i, r in enumerate(self.record):
            for _, t, version, _ in r.tensors:
                if version is None:  # an inference tensor (no version counter): by its values, one by one
                    slow.append(i)
                else:
                    tensors.append(t)
                    versions.append(version)
                    owners["tensors"].append(i)
            for _, v, items in r.contents:
                if type(items) is int:  # not copied (none here: every one is): its length, one by one
                    slow.append(i)
                elif type(v) is Counter:  # its == is Python's, a key of 0 counted missing: dict's, in C
                    counts.append(v)
                    count_copies.append(items)
                    owners["counts"].append(i)
                elif isinstance(v, dict):
                    maps.append(v)
                    map_copies.append(items)
                    owners["maps"].append(i)
                    if type(v) is defaultdict:
                        factories.append((v, items.default_factory))
                        owners["factories"].append(i)
                else:
                    seqs.append(v)
                    seq_copies.append(items)
                    owners["seqs"].append(i)
            # each module's buffers by name and identity (one replaced by an equal one is changed: tensors' == is
            # not identity), none too (a forward that registers one)
            held.append(r.attrs["_buffers"])
            names.append([name for name, *_ in r.buffers])
            owners["held"].append(i)
            for _, b, version, _, _ in r.buffers:
                held_values.append(b)
                if b is not None:
                    bufs.append(b)
                    buf_versions.append(version)
                    owners["bufs"].append(i)
        self.flat = (tensors, versions, seqs, seq_copies, maps, map_copies, counts, count_copies, held, names, bufs,
                     buf_versions, factories)
        # the keys of the dicts in order (an LRU cache's move_to_end: the order is state), one list for all
        self.keys = list(chain.from_iterable(map(list, map_copies + count_copies)))
        self.held_values, self.lengths, self.names = held_values, list(map(len, names)), list(chain.from_iterable(names))
        self.owners, self.slow = owners, sorted(set(slow))

    def __enter__(self) -> "Found":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.before_pass(refuse=False)  # what cannot be put back stays
        if self.large:  # the whole of each large array or inference tensor compared, once a call
            self.large = put_back_tensors(self.large)
        for m, t, version, copy in self.tensors:  # put back from this record's copy: the guard's need not again
            if t._version != version:
                settled(m, t, version, copy)

    def before_pass(self, refuse: bool = True) -> None:
        """The state as the call found it, put back where a pass changed it (or refused where it cannot be)."""
        if self.record:
            moved = self._moved()
            if moved:
                for i in sorted(moved):  # the guard's own put-back (ModuleState.restore), the versions taken again
                    self.record[i].put_back()
                tensors, versions, *_, bufs, buf_versions, _ = self.flat  # the versions taken again, in place
                versions[:] = map(_VERSION, tensors)
                buf_versions[:] = map(_VERSION, bufs)
        if self.large and any(samples_moved(t, copy) for _, t, _, copy in self.large):
            self.large = put_back_tensors(self.large)
        if self.scripted is not None:
            self.scripted.put_back()
        if self.torch_nn and not self._layers_same():
            for entry in self.torch_nn:
                m, k, b, _, now = entry
                if m._buffers.get(k) is not b or b._version != now:
                    self._layer_buffer(entry, refuse)
            self.versions = sum(map(_VERSION, self.buffers))

    def _moved(self) -> set:
        """The indices in the record of the modules whose state differs from it (empty where none does: told in C,
        a handful of comparisons of whole lists; one by one only where one of them differs)."""
        (tensors, versions, seqs, seq_copies, maps, map_copies, counts, count_copies, held, names, bufs, buf_versions,
         factories) = self.flat
        owners, moved = self.owners, set()
        _differ(self.dicts, self.saved, range(len(self.dicts)), moved)
        _differ(self.owned, self.owned_copies, self.owned_owners, moved)
        if tensors and list(map(_VERSION, tensors)) != versions:
            moved.update(compress(owners["tensors"], map(operator.ne, map(_VERSION, tensors), versions)))
        if seqs:
            _differ(seqs, seq_copies, owners["seqs"], moved)
        if counts:
            try:
                same = list(map(_dict_eq, counts, count_copies))
            except Exception:  # noqa: BLE001 - a count's == raised (a tensor, an array as a count): one by one
                same = list(map(same_contents, count_copies, counts))
            if not all(same):
                moved.update(i for i, s in zip(owners["counts"], same) if not s)
        if maps:
            _differ(maps, map_copies, owners["maps"], moved)
        if maps or counts:  # their orders, once each has its keys (the same lengths)
            every, copies = maps + counts, map_copies + count_copies
            if list(chain.from_iterable(every)) != self.keys:
                moved.update(i for i, v, c in zip(owners["maps"] + owners["counts"], every, copies) if list(v) != list(c))
        if factories and not all(v.default_factory is f for v, f in factories):
            moved.update(i for i, (v, f) in zip(owners["factories"], factories) if v.default_factory is not f)
        if held:
            if list(map(len, held)) != self.lengths or list(chain.from_iterable(held)) != self.names or \
                    not all(map(operator.is_, chain.from_iterable(map(dict.values, held)), self.held_values)):
                moved.update(i for i, d, n in zip(owners["held"], held, names) if list(d) != n or not all(
                    map(operator.is_, d.values(), (b for _, b, *_ in self.record[i].buffers))))
            if bufs and list(map(_VERSION, bufs)) != buf_versions:
                moved.update(compress(owners["bufs"], map(operator.ne, map(_VERSION, bufs), buf_versions)))
        if self.stored and not all(same_storage(t, alias) for t, alias, _ in self.stored):
            moved.update(i for t, alias, i in self.stored if not same_storage(t, alias))
        for i in self.slow:
            if i not in moved and state_changes([self.record[i]]):
                moved.add(i)
        return moved

    def _layers_same(self) -> bool:
        """Whether no torch.nn layer's buffer was replaced or written since (the common case, told at once)."""
        try:
            if self.layers != self.layer_copies:
                return False
        except Exception:  # a buffer replaced by another: a tensor's == has no truth value
            return False
        return sum(map(_VERSION, self.buffers)) == self.versions

    def _layer_buffer(self, entry: list, refuse: bool) -> None:
        """A buffer of a ``torch.nn`` layer the model's own code replaced or wrote in place (``entry``: one of
        ``torch_nn``'s): the object put back, its values from the guard's copy."""
        m, k, b, found, _ = entry
        if m._buffers.get(k) is not b:
            m._buffers[k] = b
        copy = held_values(m, k, b, found) if b._version != found else b
        if copy is None:
            copy = self.copies.get(id(b))
        if copy is None and not refuse:
            return
        if copy is None:
            raise SalienceError(
                f"the model's forward writes the buffer {k!r} of its {type(m).__name__} layer in place, and "
                "salience cannot put it back before each pass: each of this method's passes must see the state the "
                "model had when it was called; keep that state in a buffer of a module of your own (copied and put "
                "back), or leave the layer's buffers as they are in eval mode")
        if copy is not b:
            with torch.no_grad():
                b.copy_(copy)
        entry[4] = b._version


_VERSION = operator.attrgetter("_version")


def _large_apart(record: list) -> list:
    """The NumPy arrays and inference tensors over :data:`COPY_LIMIT` bytes among the tensors of :class:`Found`'s
    ``record`` (no version counter: each comparison reads them whole), taken out of their modules' records, as
    :func:`tensor_records`' ``(name, value, None, copy)``: :meth:`Found.before_pass` compares them by samples
    (:func:`~salience._core.guard.values.samples_moved`) and :meth:`Found.__exit__` whole (compared whole before each
    pass, a 100 MiB array would make SmoothGrad of 8 chunks 709 ms instead of 147, occlusion 822 instead of 160: AMD
    EPYC, one core, loaded, an informal run of one call each). Three whole comparisons a call: the guard's entry
    (Found takes the copy it compared: ``values._trusted``), Found's end and the guard's exit."""
    large = []
    for r in record:
        if r.tensors and any(version is None and large_copy(copy) for _, _, version, copy in r.tensors):
            large += [e for e in r.tensors if e[2] is None and large_copy(e[3])]
            r.tensors = tuple(e for e in r.tensors if not (e[2] is None and large_copy(e[3]))) or NO_TENSORS
    return large


_dict_eq = dict.__eq__


def _differ(now: list, saved: list, owners: Any, into: set) -> None:
    """The owners (``owners[i]``) of the items of ``now`` that differ from their copies in ``saved`` added to ``into``:
    the two lists compared in C first (each item by identity, then ``==``); one by one where they differ, an item whose
    ``==`` raises (a tensor put in another's place) differing."""
    try:
        if now == saved:
            return
    except Exception:  # noqa: BLE001 - an item's == raised: one by one
        pass
    for i, a, b in zip(owners, now, saved):
        try:
            same = bool(a == b)
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            into.add(i)


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a forward hook or pre-hook or an instance ``forward`` (whose attributes the model guard
    records even for a torch.nn layer: a hook may set them, ``m.count = n + 1``)."""
    d = m.__dict__
    return "forward" in d or bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks"))
