"""A module's state: the model guard's record of it, and the record of several modules.

:class:`ModuleState` is one light object per module (plain slots: its cost is paid per module and call): its
train/eval flag, a ``torch.compile`` wrapper's ``forward``, its buffers (name, version, copy), and, for a module
that is not a plain torch.nn layer (:func:`_plain_classes`: one with a hook or an instance ``forward`` is not
plain), a copy of its ``__dict__`` with the tensors, containers and storages among it, its parameters and submodules
by name, its hooks' keys and a TorchScript module's own attributes. :meth:`ModuleState.restore` puts it all back.

The same records serve :func:`record_state` ("record these modules' state here"), :func:`state_changes` ("what
changed since") and :func:`put_back_state` ("put it back"), which Ablation-CAM's split clean pass and the fx trace
(:mod:`salience._core.folding`) use.

Limits: a torch.nn layer without hooks is not copied (its forward sets nothing): what a parent's forward sets on it
stays; ``register_full_backward_hook``'s ``_is_full_backward_hook`` flag stays."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle as _Handle

from salience._core.guard.containers import (
    MISSING, NO_TENSORS, container_records, put_back_containers, restore_mapping, same_contents)
from salience._core.guard.holds import Entry, held_values, registry
from salience._core.guard.hooks import NO_KEYS, foreign_keys
from salience._core.guard.records import (
    EMPTY, NO_ATTRIBUTES, NO_NAMES, named_changes, not_put_back, put_back_storages, put_back_tensors,
    restore_attributes, restore_buffer_names, same_storage, storages_of, tell_not_put_back, tensor_attributes,
    tensor_records)
from salience._core.guard.scripted import SCRIPT_MODULE, Scripted, guard_names, script_plan
from salience._core.guard.values import Snapshot, copy_of, values_moved


class ModuleState(Entry):
    """A module's state as a guard found it: its train/eval flag, the ``forward`` attribute of a
    ``torch.compile`` wrapper (its compiled callable), its buffers (each name in order, ``None`` slots too,
    with its version counter, a copy of its values and a copy of its Python attributes) and non-persistent
    names, and a copy of its ``__dict__`` (``attrs``; ``None`` for a torch.nn layer without hooks, see the
    module's docstring), the plain tensors among them (``tensors``) and, for a module not from torch.nn, its lists,
    dicts and sets with their contents (``contents``); :meth:`restore` puts them back.

    The same class is one module's state in a :func:`record_state` record: ``index`` (its place among the modules given), ``attrs`` as asked (nn.Module's
    own dicts left out where asked; ``None``: not recorded), ``buffers`` ``None`` where not recorded, no parameters or
    submodules compared (``params`` / ``children`` ``None``), and none of the guard's hold counts.

    One small record per module and one per parameter (:class:`ParamState`), each held and put back on
    its own (modules are shared between models and threads); plain slots and tuples, not a dataclass of
    lists per object: recording resnet50's 320 objects cost 1.85 ms that way, 0.65 ms then (0.25 ms of it
    the buffers' clones, one flat copy per dtype since session 57: :class:`~salience._core.guard.values.Snapshot`),
    and putting them back 0.52 ms, then 0.22 ms."""

    __slots__ = ("module", "training", "forward", "buffers", "handles", "attrs", "quiet", "params", "children", "since",
                 "foreign", "tensors", "contents", "index", "script", "storages", "snap")

    def __init__(self, module: nn.Module, wrapper: Optional[type], snap: Optional[Snapshot] = None) -> None:
        self.take(module, wrapper, snap)

    def take(self, module: nn.Module, wrapper: Optional[type], snap: Optional[Snapshot] = None) -> None:
        """Record ``module``'s state (``wrapper``: see :func:`_capture`). ``snap``: where given, the copies of the
        plain buffers (strided or not, a plain ``torch.Tensor`` without ``requires_grad``) are left to it, taken for all
        the modules an entry records at once (:class:`~salience._core.guard.values.Snapshot`); else each is cloned."""
        self.module = module
        self.training = module.training
        self.since = _Handle.next_id  # the key of the next hook registered anywhere (see _unhook)
        # a torch.compile wrapper's own ``forward`` attribute, put back after the guard ran the original
        # module eagerly (see the module's docstring)
        self.forward = module.__dict__.get("forward", _NO_FORWARD) \
            if wrapper is not None and isinstance(module, wrapper) else _NOT_COMPILED
        # The version counter tells whether a buffer was written in place; the clone lets us put back the
        # values if it was. Each tensor's Python attributes (its ``__dict__``, copied): torch.compile marks
        # the tensors it traces (``_dynamo_static_input_type``; inductor's freezing ``_is_frozen_param``),
        # and the user's tensors must come back without them (the compiled graphs do not read them again).
        # Each name in order, a slot registered as None too (a forward that fills it, a cache, is undone).
        buffers = module._buffers
        self.snap = snap if buffers else None  # the snapshot holding copies of its buffers (compared at the exit)
        if buffers:
            if snap is None:
                self.buffers = [(name, buf, buf._version, buf.detach().clone() if buf.requires_grad else buf.clone(),
                                 tensor_attributes(buf)) if buf is not None else (name, None, 0, None, NO_ATTRIBUTES)
                                for name, buf in buffers.items()]
            else:
                self.buffers = [_buffer_record(name, buf, snap) for name, buf in buffers.items()]
            quiet = module.__dict__.get("_non_persistent_buffers_set")  # the non-persistent names, if any
            self.quiet = frozenset(quiet) if quiet else None
        else:
            self.buffers, self.quiet = (), None
        # The module's attributes, one level (a copy of its ``__dict__``: a counter or a cache its forward sets
        # on each of salience's passes, SmoothGrad's 50, is put back to the user's value), and which parameters
        # and submodules it has under which names (see restore). Not for torch.nn's own layers, whose forward sets
        # and registers none, unless a hook or an instance forward may (_plain_classes).
        attrs = module.__dict__
        try:
            plain = (type(module) in _PLAIN or type(module).forward is _SEQUENTIAL) and \
                "forward" not in attrs and not (
                attrs["_forward_hooks"] or attrs["_forward_pre_hooks"] or attrs["_backward_hooks"] or
                attrs["_backward_pre_hooks"])
        except Exception:  # a module made without nn.Module.__init__; TorchScript's forward descriptor
            plain = False
        if plain:
            self.attrs = self.script = None  # params and children are read only with attrs
            self.foreign = NO_KEYS  # no forward or backward hook (a state-dict hook's key is not looked at)
            self.tensors = self.contents = self.storages = NO_TENSORS
        else:
            self._take_attrs(module, attrs)
        # hooks the guard put on the module for the block (see refusals.refuse_mixed_batches), removed first; a list once
        # there is one (an empty list per module and call was a third of the Python objects a call held)
        self.handles: Any = ()
        self.captured = True

    def _take_attrs(self, module: nn.Module, attrs: dict) -> None:
        """The attributes of a module not plain (:meth:`take`): a copy of its ``__dict__``, the tensors, containers,
        storages among them, its parameters and submodules by name, its hooks' keys, a TorchScript module's own."""
        # a TorchScript module keeps its attributes in TorchScript, not in its __dict__ (``self.calls += 1`` in a
        # scripted forward would stay after a gradient method's call): read through TorchScript
        self.script = Scripted([module], guard=True) if isinstance(module, SCRIPT_MODULE) and (
            guard_names(module) or script_plan(module)[2]) else None
        self.attrs = attrs.copy()
        # the plain tensors among them, by version counter with a copy: one written in place keeps its identity
        self.tensors = tensor_records(self.attrs)
        # a module not from torch.nn: its lists, dicts, sets, deques (_CONTAINERS) with their contents (up to
        # CONTENTS_LIMIT items; ``self.history.append(y)``); torch.nn's own layers with a hook keep none a forward fills
        items: dict = {}
        self.contents = NO_TENSORS if not user_module(module) else \
            container_records(self.attrs, items=items)
        if items:  # the tensors among the containers' items (``self.cache[0].add_(1)``)
            self.tensors += tensor_records(items)
        self.storages = storages_of(self.buffers, self.tensors)
        self.foreign = foreign_keys(attrs, self.since)
        # copies (the shared EMPTY for an empty one), or None for what is no plain dict (TorchScript's wrapper)
        slot = attrs.get("_parameters")
        self.params = (slot.copy() if slot else EMPTY) if type(slot) is dict else None
        slot = attrs.get("_modules")
        self.children = (slot.copy() if slot else EMPTY) if type(slot) is dict else None

    def run_eagerly(self) -> None:
        """A ``torch.compile`` wrapper calls its original module, hooks and all, until :meth:`restore`."""
        if self.forward is not _NOT_COMPILED:
            self.module.__dict__["forward"] = self.module._orig_mod.__call__

    def restore(self) -> None:
        module = self.module
        handles = self.handles
        while handles:
            handles.pop().remove()
        if self.forward is _NO_FORWARD:
            module.__dict__.pop("forward", None)
        elif self.forward is not _NOT_COMPILED:
            module.__dict__["forward"] = self.forward
        if module.training != self.training:  # nn.Module.__setattr__ costs: about half of a restore on resnet50
            module.training = self.training
        saved, lost = self.attrs, ()
        if saved is not None:
            now = module.__dict__
            try:  # compared in C, each value by identity first (see restore_mapping): 0.16 us for a Linear's 19
                if now != saved:
                    restore_mapping(now, saved)
            except Exception:  # a value whose == raises (a tensor's, an array's): changed
                restore_mapping(now, saved)
            # the parameters and submodules by name, compared as the attributes (a parameter's == raises unless
            # it has one element: 25 ns a dict, 0.6 us by identity, which cost the run guard's calls 10%)
            try:
                same = self.params is None or saved["_parameters"] == self.params
            except Exception:
                same = False
            if not same:
                restore_mapping(saved["_parameters"], self.params)
            try:
                same = self.children is None or saved["_modules"] == self.children
            except Exception:  # a class of the user's with an __eq__ that raises
                same = False
            if not same:
                restore_mapping(saved["_modules"], self.children)
            # those written in place without a copy, read before the storages are set back (the set moves the
            # version counter: a large tensor whose storage alone was swapped, put back, was told lost; review)
            lost = not_put_back(self.tensors) if self.tensors else ()
            if self.storages:  # a storage swapped under a tensor (``self.buf.data = t``, ``.set_(t)``)
                put_back_storages(self.storages)
            if self.tensors:  # a plain tensor written in place: its values, from the copy
                self.tensors = put_back_tensors(self.tensors)
            if self.contents:  # a list, dict or set changed in place: its contents, from the copy
                self.contents, more = put_back_containers(self.contents)
                lost = lost + more if lost else more
        if self.buffers:
            _restore_buffers(module, self.buffers, saved, self.quiet)
        elif saved is not None and self.buffers is not None and saved.get("_buffers"):  # registered in the block (a
            restore_buffer_names(module, (), None)  # module without buffers; not a plain torch.nn layer: none; a
            # record_state record's None: not recorded)
        if self.script is not None:  # a TorchScript module's attributes other than its buffers
            self.script.put_back()
        if lost:  # last: a warning made an error raises (run once more)
            tell_not_put_back(module, lost)

    def put_back(self) -> None:
        """:meth:`restore`, then the buffers' version counters taken again (a buffer put back by a copy has
        a new version; the next :meth:`put_back` copies only what was written since)."""
        self.restore()
        if self.buffers and any(buf is not None and buf._version != version for _, buf, version, _, _ in self.buffers):
            # a piece of a Snapshot is given for the version it was taken at: the snapshot renewed for the moved ones
            # (compared again at the next release: a run guard's baseline), else their piece itself
            self.buffers = [(name, buf, buf._version if buf is not None else 0,
                             _renewed(copy, buf, version) if buf is not None and buf._version != version else copy,
                             attrs)
                            for name, buf, version, copy, attrs in self.buffers]


def _renewed(copy: Any, buf: torch.Tensor, version: int) -> Any:
    """The copy a record keeps of ``buf`` (recorded at ``version``) once :meth:`ModuleState.put_back` put it back:
    a :class:`Snapshot` renewed for ``buf``'s version now (:meth:`Snapshot.renew`), else its piece or copy."""
    if type(copy) is Snapshot and copy.renew(buf, version, buf._version):
        return copy
    return copy_of(copy, buf, version)


def _buffer_record(name: str, buf: Optional[torch.Tensor], snap: Snapshot) -> tuple:
    """A buffer's record ``(name, buffer, version, copy, attributes)`` whose copy ``snap`` takes (appended to its
    tensors; the record's copy is ``snap`` itself, :func:`~salience._core.guard.values.copy_of` gives the piece), or
    a clone of its own for a tensor subclass or one with ``requires_grad`` (kept as ``clone`` keeps them)."""
    if buf is None:
        return name, None, 0, None, NO_ATTRIBUTES
    if type(buf) is _TENSOR and not buf.requires_grad:
        version = buf._version
        snap.tensors.append(buf)
        attrs = buf.__dict__  # tensor_attributes, inline
        return name, buf, version, snap, dict(attrs) if attrs else NO_ATTRIBUTES
    return name, buf, buf._version, buf.detach().clone() if buf.requires_grad else buf.clone(), tensor_attributes(buf)


_TENSOR = torch.Tensor


def _plain_classes() -> frozenset:
    """The classes whose modules' attributes need no copy (:meth:`ModuleState.take`) when one has no instance
    ``forward`` and no hook (which may set one): torch.nn's own layers (those of ``torch.nn.modules``), whose
    forward sets no attribute of its own (read in torch 2.14's source: all but the recurrent layers' refresh of
    their flat weights, which are copied). 138 of a ViT-Ti's 152 modules with :data:`_SEQUENTIAL`: a copy and
    a comparison each (0.26 us) and an object saved (see the module's docstring). A set made once,
    not a cache filled per class: each call takes the same path (the Ctrl-C test traces every point of it)."""
    from torch.nn import modules

    found = set()
    for name in dir(modules):
        sub = getattr(modules, name)
        for cls in vars(sub).values() if isinstance(sub, type(modules)) else (sub,):
            if isinstance(cls, type) and issubclass(cls, nn.Module) and \
                    cls.__module__.startswith("torch.nn.modules.") and not issubclass(cls, nn.RNNBase):
                found.add(cls)
    return frozenset(found)


_PLAIN = _plain_classes()
_SEQUENTIAL = nn.Sequential.forward  # a subclass that keeps it (torchvision's MLP) is as plain


def record_state(modules: Any, attributes: Any = None, containers: bool = False, buffers: bool = True,
                 copies: Any = None, own_dicts: bool = True, tensor_copies: bool = True,
                 inference: bool = False, named: bool = False) -> Optional[list]:
    """A record of the state of ``modules`` (in order; each one's own state, not its children's): its buffers (each
    name in order, with its version counter and a copy of its values where ``copies(module)`` says so, default all),
    and where ``attributes(module)`` says so (default all) its plain attributes one level deep (a copy of its
    ``__dict__``, nn.Module's own dicts and sets too unless ``own_dicts`` is False), each plain tensor among them with
    its version counter and a copy (over :data:`COPY_LIMIT` bytes the one kept across calls, :func:`kept_copy`; none
    without ``tensor_copies``), and with
    ``containers`` a copy of each list's, dict's, set's, deque's, defaultdict's, Counter's and OrderedDict's contents. A module with neither (no attributes asked, no buffer) has no record. ``None`` where such a tensor or a buffer is an
    inference tensor (no version counter to tell a write by), unless ``inference``: such a tensor attribute is then
    recorded as the model guard records it, by its values. With
    ``named`` (and the attributes asked), its parameters and submodules by name too, as the model guard's own record
    (``self.w = nn.Parameter(...)``, a head swapped in a forward: both write nn.Module's own dicts in place, which the
    copy of the ``__dict__`` holds by identity). :func:`state_changes`
    says what changed since, :func:`put_back_state` puts it back.

    Each module's record is a :class:`ModuleState`, the model guard's own class, made here without its hold counts
    (the guard copies a container up to :data:`CONTENTS_LIMIT` items; here every one). Ablation-CAM's split clean pass records the modules not from
    torch.nn, whose layers in eval mode write nothing (the buffers of those unrecorded are put back from the guard's
    own copy); the fx trace records the shadow it traces (:mod:`salience._core.folding`), no buffer."""
    record = []
    for index, m in enumerate(modules):
        d = m.__dict__
        asked = attributes is None or attributes(m)
        held = d.get("_buffers") if buffers else None
        if not asked and not held:
            continue
        r = ModuleState.__new__(ModuleState)
        r.index, r.module, r.attrs, r.tensors, r.contents, r.buffers, r.quiet = index, m, None, NO_TENSORS, (), None, None
        r.training, r.forward, r.handles, r.params, r.children, r.script = m.training, _NOT_COMPILED, (), None, None, None
        r.storages, r.snap = NO_TENSORS, None
        if asked:
            attrs = d.copy() if own_dicts else {k: v for k, v in d.items() if k not in MODULE_OWN}
            tensors = tensor_records(attrs, refuse=not inference, copy=tensor_copies)
            if tensors is None:
                return None
            r.attrs, r.tensors = attrs, tensors
            if containers:
                items: dict = {}
                r.contents = container_records(attrs, every=True, items=items)
                more = tensor_records(items, refuse=not inference, copy=tensor_copies) \
                    if items else NO_TENSORS
                if more is None:
                    return None
                r.tensors += more
            if named and "_parameters" in attrs:
                r.params, r.children = dict(attrs["_parameters"]), dict(attrs["_modules"])
        if buffers:
            copy = copies is None or copies(m)
            try:  # an inference tensor keeps no version counter
                r.buffers = tuple((name, b, b._version, (b.detach().clone() if copy else None), tensor_attributes(b))
                                  if b is not None else (name, None, 0, None, NO_ATTRIBUTES)
                                  for name, b in (held or EMPTY).items())
            except RuntimeError:
                return None
            quiet = d.get("_non_persistent_buffers_set")
            r.quiet = frozenset(quiet) if quiet else None
        if tensor_copies:  # each tensor's storage (``self.buf.data = t``), the buffers' where copied
            r.storages = storages_of(r.buffers if buffers and (copies is None or copies(m)) else None, r.tensors)
        record.append(r)
    return record


def state_changes(record: list) -> list:
    """What changed in the modules of ``record`` (:func:`record_state`) since: ``(index of the module among those
    recorded, name)`` of each plain attribute added, deleted, replaced (by identity), a tensor among them written in
    place, a container's contents changed, and of each buffer registered, deleted, replaced or written in place. An
    empty list where nothing did, told in C for most modules (the dict compared with its copy, each value by identity
    first, as the guard's)."""
    changed = []
    for r in record:
        i, d, saved = r.index, r.module.__dict__, r.attrs
        if saved is not None:
            try:
                same = "_buffers" in saved and d == saved
            except Exception:  # a value whose == raises (a tensor's, an array's): changed
                same = False
            if not same:
                own = "_buffers" in saved
                changed += [(i, k) for k in d if k not in saved and (own or k not in MODULE_OWN)]
                changed += [(i, k) for k, v in saved.items() if d.get(k, MISSING) is not v]
            if r.tensors:  # a container's item by the container's name (``"cache[0]"``: ``"cache"``)
                changed += [(i, k) for k in dict.fromkeys(k.partition("[")[0] for k, t, version, copy in r.tensors if (
                    t._version != version if version is not None else values_moved(t, copy))) if (i, k) not in changed]
            if r.contents:
                changed += [(i, k) for k, v, items in r.contents
                            if not same_contents(items, v, identity=True) and (i, k) not in changed]
            if r.params is not None:  # recorded by name (``named``): a parameter or submodule replaced, added, deleted
                changed += [(i, k) for k in named_changes(d.get("_parameters", EMPTY), r.params) +
                            named_changes(d.get("_modules", EMPTY), r.children) if (i, k) not in changed]
        if r.storages:
            changed += [(i, k) for k, t, alias in r.storages if (i, k) not in changed and not same_storage(t, alias)]
        records = r.buffers
        if records is not None:
            now = d.get("_buffers") or EMPTY
            if len(now) != len(records):
                names = {name for name, *_ in records}
                changed += [(i, k) for k in now if k not in names]
            changed += [(i, name) for name, b, version, _, _ in records
                        if now.get(name, MISSING) is not b or b is not None and b._version != version]
    return changed


def put_back_state(record: list) -> None:
    """The modules of ``record`` (:func:`record_state`) put back as recorded: the plain attributes (in place, a name
    both have never missing meanwhile: :func:`restore_mapping`), each tensor among them written in place from its copy,
    the containers' contents, the buffers by name and in order, each written in place from its copy; one recorded
    without a copy (a torch.nn layer's, in Ablation-CAM's split) from the model guard's own copy where that copy is of
    the same version (:func:`held_values`), else it stays as written. A record made without nn.Module's own dicts
    (``own_dicts=False``: the fx trace's, which only asks :func:`state_changes`) is refused: it cannot say which
    parameters, buffers, submodules and hooks the module had (a ``ValueError``, salience's own misuse)."""
    if any(r.attrs is not None and "_buffers" not in r.attrs and "_buffers" in r.module.__dict__ for r in record):
        raise ValueError("put_back_state needs a record made with own_dicts=True (nn.Module's own dicts recorded)")
    for r in record:
        r.put_back()  # the guard's own put-back (ModuleState.restore), the versions taken again


def _restore_buffers(module: nn.Module, records: Any, saved: Optional[dict], quiet: Any) -> None:
    """``module``'s buffers put back to ``records`` (``(name, buffer, version, copy, attributes)`` each, in order, as
    :class:`ModuleState` and :func:`record_state` take them): each one replaced since put back by identity, each one
    written in place since copied back from its copy (from the model guard's copy, :func:`held_values`, where the
    record has none), its Python attributes put back; the names registered or deleted since, in order, and the
    non-persistent names (``quiet``). ``saved``: the module's recorded ``__dict__`` (``None``: a torch.nn layer's,
    whose forward registers no buffer)."""
    buffers = module._buffers
    missing = False
    for name, buf, version, copy, attrs in records:
        # TorchScript modules' _buffers is a mapping without .get()
        if name in buffers:
            if buffers[name] is not buf:
                buffers[name] = buf
        else:
            missing = True
        if buf is None:
            continue
        # a write that moved no version counter too: told by the values at the exit (Snapshot.check's ``moved``)
        if buf._version != version or type(copy) is Snapshot and copy.moved and id(buf) in copy.moved:
            copy = copy_of(copy, buf, version)
            if copy is None:
                copy = held_values(module, name, buf, version)
            if copy is not None:
                with torch.no_grad():
                    buf.copy_(copy)
        if attrs or buf.__dict__:  # restore_attributes' own first test, without its call
            restore_attributes(buf, attrs)
    # deleted or registered since: the names, in order; or the same names, one registered again persistent or not
    # (``register_buffer``'s default, persistent: the user's state dict gained or lost a key; a plain torch.nn layer's
    # forward registers none)
    if missing or len(buffers) != len(records) or saved is not None and \
            module.__dict__.get("_non_persistent_buffers_set", NO_NAMES) != (quiet or NO_NAMES):
        restore_buffer_names(module, records, quiet)
# nn.Module's own dicts and sets (parameters, buffers, submodules, hooks): not a forward's plain attributes
MODULE_OWN = frozenset(k for k, v in nn.Module().__dict__.items() if type(v) in (OrderedDict, dict, set))


_NO_FORWARD = object()
_NOT_COMPILED = object()


def settled(module: nn.Module, t: torch.Tensor, version: int, values: torch.Tensor) -> None:
    """The plain tensor attribute ``t`` of ``module``, which the caller (:class:`Found`) recorded at ``version`` with the
    copy ``values`` and has put back from it, taken as put back by a guard holding ``module`` that recorded it at the
    same version with the same copy (the one kept across calls, :func:`kept_copy`) or none: the guard's exit copies it back
    no more (a 100 MiB table: 100 MiB not copied once more). A dataset run's baseline (:func:`run_guard`, put
    back after each call) too."""
    entry = registry.get(id(module))
    if entry is None or type(entry) is not ModuleState or not entry.captured:
        return
    for record in (entry, entry.baseline):
        if type(record) is ModuleState and record.tensors:
            record.tensors = tuple((k, v, v._version if v is t and at == version and (copy is None or copy is values)
                                    else at, copy) for k, v, at, copy in record.tensors)


def user_module(m: nn.Module) -> bool:
    """Whether ``m`` is no layer of ``torch.nn`` (whose layers in eval mode write no state in a forward)."""
    return not type(m).__module__.startswith("torch.nn.")
