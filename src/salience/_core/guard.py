"""Scope every change salience makes to a user's model, and always undo it.

While salience explains a model it puts it in eval mode (so BatchNorm neither mixes the
samples of a batch nor updates its running statistics, and Dropout is off) and turns off
``requires_grad`` of the parameters (so only input gradients are computed and no memory
is spent on parameter gradients). :func:`model_guard` records the model's state first and
puts it back afterwards, on success, on an exception and on ``KeyboardInterrupt``.

A ``torch.compile``d module (an ``OptimizedModule``, the model itself or any submodule) runs its
original module eagerly under the guard: its cached graphs do not see hooks added after they were
compiled (dynamo skips guards on module hooks), so a layer hooked by Grad-CAM was "not called",
and Ablation-CAM's hook on one layer was replaced by the graph of an earlier call that hooked
another, silently. The function is the same; salience's own ``compile=`` option compiles the
passes that need no hook.

The guard is reference counted per module and per parameter: nested calls (SmoothGrad around
vanilla), concurrent calls from several threads on the same model, and on models that share
modules (two heads on one backbone), share one saved state of each module and parameter, which
is restored when the last guard holding it leaves. Without that, a second thread would record
the first thread's temporary eval mode as "the user's" and restore the wrong one (and, counted
per model, the first thread to leave put a shared backbone back in train mode under the other's
running passes).

What a model's own forward changes on itself during salience's passes (SmoothGrad runs 50 the user did not ask
for, integrated gradients 32) comes back too (session 36, ``tests/test_guard_gaps.py``): its buffers by name and
in order (a slot registered as ``None`` that the forward fills, a cache; a buffer registered, replaced or deleted;
the non-persistent names); its plain attributes one level deep (a copy of each module's ``__dict__``: a call
counter, the last shape, a tensor it caches, which held salience's batch and its graph; an attribute added or
deleted), each plain tensor among them by its version counter with a copy (``self.seen.fill_(1)``, ``self.steps += 1``
on a tensor: the same object written in place, which its identity did not tell: session 48, ``tests/test_s48_putback.py``;
a copy per call up to ``_COPY_LIMIT``, 1 MiB, a copy kept across calls over it, session 53 below; an inference tensor
among them, which keeps no version counter, by its values, written back under inference mode, session 49);
the contents of each list, dict and set attribute of a module not from torch.nn (``self.history.append(y)``,
``self.cfg["k"] = v``; session 49, ``tests/test_s49_record.py``), and of each ``collections.deque`` (its ``maxlen``
stays the object's), ``defaultdict`` (its ``default_factory`` put back too), ``Counter`` and ``OrderedDict`` (a
running window's ``self.recent.append(y)`` stayed, silently: session 49 "stdc", ``tests/test_s49_stdc.py``): a
shallow copy of each, by its exact type (a subclass is not copied), up to ``_CONTENTS_LIMIT`` (1024) items, compared in C, each item by identity first (one
replaced by an equal one stays, as an attribute does), a dict's order too, and put back in place (the user's object
stays, an item both have never missing meanwhile: session 49 review); one over the limit keeps only its length, and a call that changes the length says
so, a warning naming it, as it stays changed;
the containers inside one of them (a deque of a running window in a dict, a list of lists), one level more, by the same
records, where their items and the parent's fit in the 1024 (session 50, ``tests/test_s50_found.py``; a change inside
one stayed: the parent compares its items by identity);
its parameters and submodules by name (``self.w = nn.Parameter(...)`` in a forward). Each copy is
compared with the module's dict in C (``==``, each value by identity first) and put back by identity where it
differs. The copies are not made for torch.nn's own layers that have neither a hook nor an instance ``forward``
(:func:`_plain_classes`: their forward sets and registers nothing; a user's hook may, so a layer with one is
copied), nor for a subclass that keeps ``nn.Sequential``'s forward (torchvision's MLP): 138 of a ViT-Ti's 152
modules, 134 of a resnet50's 151. Copied and compared for every module, the attributes alone cost 10 and 15%
more of the guard on a ViT-Ti (alone, in a run guard) and 152 Python objects a call, which with attention
rollout's passed the 700 that start a young garbage collection every call; now 6 and 3%, 30 objects
(docs/performance.md, session 36). The check that a layer is plain costs 0.1 us a module.

The hooks a forward registers and leaves on the model are taken off too (session 37, ``tests/test_guard_hooks.py``):
``self.fc.register_forward_hook(...)`` on each call left one per pass (SmoothGrad's 50), one registered lazily on
the first call stayed. Every registration takes the next key of one counter (``RemovableHandle.next_id``): each
hold reads it when it begins and compares it when it leaves (the common case, no hook registered anywhere meanwhile,
costs that one read); where it moved, the modules put back (their last holder left, or a run guard's baseline put
back after a call) lose the hooks whose keys are their record's or later and below the counter's value then, from
every hook dict (forward, pre, backward, backward pre, state-dict and load hooks, and the ``with_kwargs`` /
``always_called`` companions; :func:`_unhook`), but those keys the module had when recorded (:func:`_foreign`): a
key past the counter came from another process's (a model pickled whole with a hook of the user's, ``torch.load``'s
or a Ray actor's copy; swept from the block's start on with no end, it went at the first call that registered a hook,
Grad-CAM's own, and the outputs changed; this process's counter reaches it later). Salience's own hooks are kept (:func:`~salience._core.autograd.this_thread`'s and observers, which their code removes itself: a
dataset run's
observer around a call; the guard's own, in ``handles``, go first). A hold that leaves modules another guard still
holds notes them (``_stale``): the hold putting them back sweeps them even if it began after the hook. A sweep
looks at every hook dict of the modules put back (:func:`_drop_hooks`): tens of microseconds on resnet50, paid
where the counter moved (Grad-CAM's own hook, a full backward hook's per-pass handles; docs/performance.md).

Session 51 (``tests/test_s51_guard.py``): a TorchScript module's attributes other than its buffers (``self.calls +=
1`` on an int, a float or a tensor attribute replaced, a plain tensor written in place, a list appended to: put back
by :class:`Found` between a perturbation call's passes since session 50, but not by the guard after a gradient
method's call) are read and put back through TorchScript (:class:`_Scripted` with ``guard``): those some method may
change (:func:`_guard_names`: assigned by a ``prim::SetAttr``, a list or dict given to anything but a read, every
tensor that is no buffer; all once a method calls Python); the guard
on a scripted resnet18 dearer, 2.80 -> 3.59 ms (medians, a loaded machine, ``benchmarks/found-s51.md``). The tensors
among a container attribute's items (``self.cache[0].add_(1)``; a container inside one too) are recorded as the attributes' tensors, by version
counter with a copy (their container's copy held the same objects: the writes stayed). A NumPy array among the
attributes or a container's items (``self.hist[0] += 1``) by its values, a copy up to 1 MiB. Each recorded tensor's
storage, offset, sizes and strides (a detached view, :func:`_storages`): ``self.buf.data = t`` moves no version
counter, and ``.set_(t)`` gave the values back on the new storage (a view the user holds no longer followed it).

Session 52 (``tests/test_s52_guard.py``): a NumPy array attribute over 1 MiB and an inference tensor attribute over
1 MiB (no version counter: written in place, they stayed as written, silently) are put back from a copy kept across
calls (:func:`_kept_values`, in :data:`_KEPT` with the plain tensors' copies, within the same cap), compared whole at
each call's start and end, bit for bit in chunks (:func:`_same_bits`): a sampled check at the start would miss the
user's own write of a value between two calls (``model.table[5] = 1``), and the stale copy would undo it. That costs
each call two passes over the values and the copy: a 100 MiB array, the guard alone 1.1 -> 24-40 ms a call, an
inference tensor 1.1 -> 29-47 (AMD EPYC, core 1, a loaded machine; a comparison about 10 ms on an idle core;
``benchmarks/guard-s52.md``), the model without one as before. A many-pass call's :class:`Found` compares such a
value by :data:`_KEPT_SAMPLES` samples before each pass and whole once, at the call's end (review of session 52: whole
before each pass, a 100 MiB array made SmoothGrad of 8 chunks 39 -> 709 ms, an informal run;
``tests/test_s52_rvguard.py``): a forward that writes a few values no sample reads has its later passes see them; the call's end puts them back. An array the
forward wrote and made read-only is made writeable again to be put back (:func:`_put_back_array`; it raised NumPy's
"assignment destination is read-only"). An object array up to 1024 items is copied (shallow) and its
items compared by identity; a ``numpy.memmap`` (a write to it writes the user's file; a copy would read a file of any
size each call) and an object array over 1024 items are sampled (:class:`_Sampled`, 1024 places spread evenly) and a
write that reaches a sampled place is told (a warning naming the attribute, and the memmap's file). The items of a
tuple or namedtuple attribute, and of a tuple among a container's items, are looked into as a list's
(``self.pair[0].add_(1)``, ``self.cache["kv"][0].add_(1)``, a list in a tuple appended to), within the same 1024 items.
Past the kept copies' cap (:data:`_KEEP_LIMIT`, 1 GiB) the least recently used are dropped to make room (:func:`_keep`;
before, nothing more was kept and every call copied anew, the copies of models no longer used holding the room).

Session 53 (``tests/test_s53_guard.py``): a plain tensor attribute over 1 MiB written in place (``self.table.mul_(2)``;
a tensor among a container's items, a TorchScript module's too) is put back from the copy kept across calls
(:func:`_kept`: its memory held while the tensor lives, all kept copies together at most 1 GiB); it stayed written, told
by a warning. A sparse one is copied per call (its dense size says nothing of its values: review). Its version counter,
data pointer, shape, dtype and 1024 samples tell at each call's start whether the user wrote it since. A write through
``.data`` moves no version counter: a plain tensor in CPU memory whose counter did not move is compared with its copy at
the call's end (:func:`_written_quietly`: whole up to 1 MiB, by the samples over it). A 100 MiB table not written costs
the guard alone 0.1 to 0.4 ms more a call in 6 rounds of 7, 1.5 ms in the seventh, loaded (two sampled reads; medians
1.20 -> 1.49 ms on resnet18, AMD EPYC, core 1, loaded); written, the copy back, 12 -> 26 ms
(``benchmarks/guard-s53.md``). One over the kept copies' cap (1 GiB) is copied for each call, as an array is. The
:class:`Found` of a perturbation call takes the large copies the guard's entry has just compared or taken
(:func:`_trusted`): a large array or inference tensor is read whole three times a call, not four.

What remains a limit (not put back): what a forward sets or registers on a torch.nn layer without hooks
(``self.linear.cache = x`` in the parent's forward; the parent's own attributes and children are put back, and a
hook it registers on the layer is taken off, but ``register_full_backward_hook``'s ``_is_full_backward_hook`` flag
stays); a list, dict, set or deque (``collections``' too) over 1024 items changed in place (told where its length changed: a warning; two levels
only: a list in a list in a dict is not copied, nor one in a dict past the 1024 items; a tuple likewise: a tensor in
a tuple in a tuple in a dict is not looked at), one of a torch.nn layer, a subclass of one; a read-only NumPy array (it
cannot be written through the attribute, and its writable base, where that is an attribute, is recorded itself; the
last read of session 51: its values moved through a base out of reach and the put-back raised NumPy's "assignment
destination is read-only"), a subclass of ndarray other than ``numpy.memmap`` (a masked array: not looked at); a
``numpy.memmap`` or an object array over 1024 items written in place (told where a write reaches a sampled place,
session 52; a write of a few values elsewhere not); a write through ``.data`` of a few values of a plain tensor over
1 MiB that no sample reads (session 53), of any on a device, and, between a perturbation call's passes, any write
through ``.data`` (its :class:`Found` reads version counters; the call's end puts it back); a hook on a parameter
(``self.weight.register_hook``: torch refuses it on the guard's frozen parameters, unless the
forward turns ``requires_grad`` on itself, and then it stays); an attribute or parameter replaced by another equal
to it (``==``: a number, a string, a one-element tensor or parameter of the same value; a parameter of several
elements compares by identity, its ``==`` raising) keeps the new object; an attribute a global module hook
(``register_module_forward_hook``) sets on a torch.nn layer without a hook of its own; what TorchScript keeps as an
object of a scripted class (told: a warning). What another thread of
the user's sets on the model while salience's call runs (its own forward's counter) is put back with salience's:
the guard cannot tell whose it is; the dicts are put back in place, never emptied meanwhile, so that thread's
forward does not fail (``_restore_mapping``). So are the hooks it registers meanwhile on the modules put back
(a key says when a hook was registered, not by whom), and a state-dict hook of a torch.nn layer without other
hooks whose key another process gave (pickled), once this process's counter reaches it. Torch's global module hooks (``register_module_forward_hook``)
are the process's, not the model's, and are left alone, one a forward registers too: any thread registers them
(a profiler's ``ModuleTracker``, ``FlopCounterMode``, for its block), and sweeping those registered anywhere during
a call took another thread's (``tests/test_guard_hooks.py``).

One record of a model's state serves the three pieces of salience that put a model back (session 48):
:func:`record_state` ("record these modules' state here": buffers by version counter, with a copy where asked, plain
attributes one level deep, each plain tensor among them by version counter with a copy, containers' contents where
asked), :func:`state_changes` ("what changed since", by module and name) and :func:`put_back_state` ("put it back", in
place). Its records are the guard's own (:class:`ModuleState`, one light object per module for its cost per call; one
class since session 49, ``ModuleRecord`` gone), made of the same pieces (:func:`_tensor_records`,
:func:`_container_records`) and put back by the guard's own :meth:`ModuleState.put_back`; Ablation-CAM's split clean pass (``methods.scorecam._own_state``) records the modules not
from torch.nn, containers too, each plain tensor with a copy whatever its size (without one over the guard's old
limit its one pass ran on the first pass's writes, last read of session 48), tells a first pass's writes and puts
them back before its one pass (a torch.nn layer's buffer, recorded without a copy, from the guard's own copy:
:func:`held_values`); the fx trace
(:func:`salience._core.folding.fx_traced`) runs on a shadow of the model's modules and records the shadow, to tell what
the forward writes without writing, or putting back, anything of the model (another thread's writes of that moment
stay). The guard alone on resnet18 (64 px, one thread; AMD EPYC, core 1, 7 interleaved rounds of a process per tree,
min / median / max): 0.532 / 0.545 / 0.568 ms before, 0.550 / 0.557 / 0.566 after; with four plain tensor
attributes of 64 floats on its root, which it now copies, 0.526 / 0.547 / 0.561 before, 0.568 / 0.576 / 0.603 after
(``benchmarks/guard_s48.py``, ``benchmarks/guard-s48.json``). Session 49's containers and inference tensors:
``benchmarks/guard_s49.py``, ``benchmarks/guard-s49.md``.

A dataset run holds the model for the whole run (:func:`run_guard`): the full save and restore
(about 1.7 ms on resnet50 on one CPU core, 5 ms before the records were made light) is paid once per
run, not once per batch and method. Each guard entered inside it (a method's call) then only counts,
and when it leaves while every holder left is a run guard, it puts back what the run guard established
(the *baseline*: eval mode, frozen parameters, the user's data, buffers, gradients, tensor attributes),
comparing and fixing only what differs, so that no call's change (a buffer the model writes in its
forward, a flag, a layout) reaches the next batch's call.

A Ctrl-C never leaves a count wrong: the bookkeeping of each entry and exit (the counts, the states
recorded and put back) runs with Ctrl-C deferred to its end (:func:`salience._core.calm.calmly`; in the main thread,
where Python raises ``KeyboardInterrupt``; SIGINT's handler, the user's own too, put back as it was and then
called), and a Ctrl-C just before the deferral starts leaves nothing done, which the exit's ``finally``
does once more. ``tests/test_hygiene.py`` sends SIGINT at every point where Python may raise it in these
functions (and what they call), nested and run guards, and checks the model, the tables and the next call.
Two limits remain. A Ctrl-C in ``contextlib``'s ``__enter__`` just after the guard's generator took its hold
(before the ``with`` body starts) leaves the generator suspended: the model is put back when the generator is
collected, which a kept traceback (a REPL's ``sys.last_traceback``) delays. A SIGINT handler installed from C
(after Python's, invisible to ``signal.getsignal``) is replaced by Python's by the first guard in the main
thread, as any ``signal.signal`` call replaces it.
"""
from __future__ import annotations

import functools
import operator
import sys
import threading
import weakref
from collections import Counter, OrderedDict, defaultdict, deque
from contextlib import contextmanager
from itertools import chain, compress
from types import MappingProxyType
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle as _Handle

from salience._core import layouts
from salience._core.calm import calmly
from salience._core.errors import SalienceError
from salience._core.fingerprint import _modules
from salience._core.tensors import autocast_off

__all__ = ["model_guard", "run_guard", "ModuleState", "ParamState", "check_python_model", "modules_of", "parameters_of",
           "train_mode_op", "held_values", "settled", "record_state", "state_changes", "put_back_state", "forget_copies"]


class _Entry:
    """A guard's count of one module or parameter, in ``_held``: ``holders`` (how many guards hold it),
    ``runs`` (how many of them are run guards), ``baseline`` (its state as the first run guard established
    it, or ``None``) and ``captured`` (whether its own state, the record's other slots, was recorded: not
    yet, or never after an error while entering). The entry is the state record itself (a
    :class:`ModuleState` or :class:`ParamState` made by :meth:`entry`), not a list holding one: a call held
    two Python objects per module and parameter and a tensor per parameter, 1100 on a ViT-Ti (152 modules,
    152 parameters), over the 700 that start a young garbage collection: one every call, each tenth moving the
    objects alive then to the old generation, whose growth set off a full collection (0.13 to 0.4 s with
    torchvision imported) every 2000 calls of attention rollout. 493 now (docs/performance.md, session 35)."""

    __slots__ = ("holders", "runs", "baseline", "captured")

    @classmethod
    def entry(cls) -> Any:
        """A record held by one guard, its state not recorded yet (:meth:`take` records it)."""
        e = cls.__new__(cls)
        e.holders, e.runs, e.baseline, e.captured = 1, 0, None, False
        return e


class ModuleState(_Entry):
    """A module's state as a guard found it: its train/eval flag, the ``forward`` attribute of a
    ``torch.compile`` wrapper (its compiled callable), its buffers (each name in order, ``None`` slots too,
    with its version counter, a copy of its values and a copy of its Python attributes) and non-persistent
    names, and a copy of its ``__dict__`` (``attrs``; ``None`` for a torch.nn layer without hooks, see the
    module's docstring), the plain tensors among them (``tensors``) and, for a module not from torch.nn, its lists,
    dicts and sets with their contents (``contents``); :meth:`restore` puts them back.

    The same class is one module's state in a :func:`record_state` record (session 49: it was a class of its own,
    ``ModuleRecord``, of the same data): ``index`` (its place among the modules given), ``attrs`` as asked (nn.Module's
    own dicts left out where asked; ``None``: not recorded), ``buffers`` ``None`` where not recorded, no parameters or
    submodules compared (``params`` / ``children`` ``None``), and none of the guard's hold counts.

    One small record per module and one per parameter (:class:`ParamState`), each held and put back on
    its own (modules are shared between models and threads); plain slots and tuples, not a dataclass of
    lists per object: recording resnet50's 320 objects cost 1.85 ms that way, 0.65 ms now (0.25 ms of it
    the buffers' clones), and putting them back 0.52 ms, now 0.22 ms."""

    __slots__ = ("module", "training", "forward", "buffers", "handles", "attrs", "quiet", "params", "children", "since",
                 "foreign", "tensors", "contents", "index", "script", "storages")

    def __init__(self, module: nn.Module, wrapper: Optional[type]) -> None:
        self.take(module, wrapper)

    def take(self, module: nn.Module, wrapper: Optional[type]) -> None:
        """Record ``module``'s state (``wrapper``: see :func:`_capture`)."""
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
        if buffers:
            self.buffers = [(name, buf, buf._version, buf.detach().clone() if buf.requires_grad else buf.clone(),
                             _attributes(buf)) if buf is not None else (name, None, 0, None, _NO_ATTRIBUTES)
                            for name, buf in buffers.items()]
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
            self.foreign = _NO_KEYS  # no forward or backward hook (a state-dict hook's key is not looked at)
            self.tensors = self.contents = self.storages = _NO_TENSORS
        else:
            self._take_attrs(module, attrs)
        # hooks the guard put on the module for the block (see _refuse_mixed_batches), removed first; a list once
        # there is one (an empty list per module and call was a third of the Python objects a call held)
        self.handles: Any = ()
        self.captured = True

    def _take_attrs(self, module: nn.Module, attrs: dict) -> None:
        """The attributes of a module not plain (:meth:`take`): a copy of its ``__dict__``, the tensors, containers,
        storages among them, its parameters and submodules by name, its hooks' keys, a TorchScript module's own."""
        # a TorchScript module keeps its attributes in TorchScript, not in its __dict__ (``self.calls += 1`` in a
        # scripted forward stayed after a gradient method's call: session 51): read through TorchScript
        self.script = _Scripted([module], guard=True) if isinstance(module, _SCRIPT_MODULE) and (
            _guard_names(module) or _script_plan(module)[2]) else None
        self.attrs = attrs.copy()
        # the plain tensors among them, by version counter with a copy: one written in place keeps its identity
        self.tensors = _tensor_records(self.attrs)
        # a module not from torch.nn: its lists, dicts, sets, deques (_CONTAINERS) with their contents (up to
        # _CONTENTS_LIMIT items; ``self.history.append(y)``, session 49); torch.nn's own layers with a hook keep none a forward fills
        items: dict = {}
        self.contents = _NO_TENSORS if not user_module(module) else \
            _container_records(self.attrs, items=items)
        if items:  # the tensors among the containers' items (``self.cache[0].add_(1)``: session 51)
            self.tensors += _tensor_records(items)
        self.storages = _storages(self.buffers, self.tensors)
        self.foreign = _foreign(attrs, self.since)
        # copies (the shared _EMPTY for an empty one), or None for what is no plain dict (TorchScript's wrapper)
        slot = attrs.get("_parameters")
        self.params = (slot.copy() if slot else _EMPTY) if type(slot) is dict else None
        slot = attrs.get("_modules")
        self.children = (slot.copy() if slot else _EMPTY) if type(slot) is dict else None

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
            try:  # compared in C, each value by identity first (see _restore_mapping): 0.16 us for a Linear's 19
                if now != saved:
                    _restore_mapping(now, saved)
            except Exception:  # a value whose == raises (a tensor's, an array's): changed
                _restore_mapping(now, saved)
            # the parameters and submodules by name, compared as the attributes (a parameter's == raises unless
            # it has one element: 25 ns a dict, 0.6 us by identity, which cost the run guard's calls 10%)
            try:
                same = self.params is None or saved["_parameters"] == self.params
            except Exception:
                same = False
            if not same:
                _restore_mapping(saved["_parameters"], self.params)
            try:
                same = self.children is None or saved["_modules"] == self.children
            except Exception:  # a class of the user's with an __eq__ that raises
                same = False
            if not same:
                _restore_mapping(saved["_modules"], self.children)
            # those written in place without a copy, read before the storages are set back (the set moves the
            # version counter: a large tensor whose storage alone was swapped, put back, was told lost; review)
            lost = _not_put_back(self.tensors) if self.tensors else ()
            if self.storages:  # a storage swapped under a tensor (``self.buf.data = t``, ``.set_(t)``: session 51)
                _put_back_storages(self.storages)
            if self.tensors:  # a plain tensor written in place (session 48): its values, from the copy
                self.tensors = _put_back_tensors(self.tensors)
            if self.contents:  # a list, dict or set changed in place (session 49): its contents, from the copy
                self.contents, more = _put_back_containers(self.contents)
                lost = lost + more if lost else more
        if self.buffers:
            _restore_buffers(module, self.buffers, saved, self.quiet)
        elif saved is not None and self.buffers is not None and saved.get("_buffers"):  # registered in the block (a
            _restore_buffer_names(module, (), None)  # module without buffers; not a plain torch.nn layer: none; a
            # record_state record's None: not recorded)
        if self.script is not None:  # a TorchScript module's attributes other than its buffers (session 51)
            self.script.put_back()
        if lost:  # last: a warning made an error raises (run once more)
            _tell_not_put_back(module, lost)

    def put_back(self) -> None:
        """:meth:`restore`, then the buffers' version counters taken again (a buffer put back by a copy has
        a new version; the next :meth:`put_back` copies only what was written since)."""
        self.restore()
        if self.buffers and any(buf is not None and buf._version != version for _, buf, version, _, _ in self.buffers):
            self.buffers = [(name, buf, buf._version if buf is not None else 0, copy, attrs)
                            for name, buf, _, copy, attrs in self.buffers]


class ParamState(_Entry):
    """A parameter's state as a guard found it: ``requires_grad``, ``.grad``, its data (storage and
    strides: the engine may convert it to channels-last for a run, salience._core.perf, and must leave the
    user's layout) and a copy of its Python attributes; :meth:`restore` puts them back."""

    __slots__ = ("param", "requires_grad", "grad", "data", "attrs")

    def __init__(self, param: torch.Tensor) -> None:
        self.take(param)

    def take(self, param: torch.Tensor, wrapper: Optional[type] = None) -> None:
        """Record ``param``'s state (``wrapper``: unused, as :meth:`ModuleState.take`'s)."""
        self.param = param
        self.requires_grad = param.requires_grad
        self.grad = param.grad
        self.data = param.data
        self.attrs = _attributes(param)
        self.captured = True

    def run_eagerly(self) -> None:
        pass

    def restore(self) -> None:
        param, data = self.param, self.data
        try:  # the data first: data set by a forward in inference mode refuses requires_grad=True (session 51)
            same = param.is_set_to(data)  # the same storage, offset, sizes and strides (half the time of comparing them)
        except Exception:  # no kernel for meta and sparse tensors (nor some tensor subclasses): put the data back
            same = False
        if not same:
            param.data = data
        if param.requires_grad != self.requires_grad:
            param.requires_grad_(self.requires_grad)
        if param.grad is not self.grad:
            param.grad = self.grad
        _restore_attributes(param, self.attrs)

    put_back = restore


def _capture(obj: Any, wrapper: Optional[type], into: Any = None) -> "ModuleState | ParamState":
    """The state of a module or a parameter (``wrapper``: torch.compile's ``OptimizedModule``, or ``None``
    where dynamo was never imported), recorded in ``into`` (its entry in ``_held``) if given."""
    if into is not None:
        into.take(obj, wrapper)
        return into
    return ModuleState(obj, wrapper) if isinstance(obj, nn.Module) else ParamState(obj)


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


def _restore_mapping(now: dict, saved: dict) -> None:
    """Put the dict ``now`` (a module's ``__dict__``, ``_parameters``, ``_modules`` or ``_buffers``) back to ``saved``,
    its copy: the keys added since deleted, those deleted put back, the values replaced since put back (by identity),
    in the saved order. A key both have is never taken out, even for an instant: clearing and refilling the dict left
    it empty between the two calls, and the user's own thread running the model meanwhile failed at random ("object
    has no attribute '_backward_hooks'", or a layer's name; ``tests/test_guard_gaps.py``). Only where the order
    differs (a key the block deleted, put back at the end) are the keys after the first one out of place moved back
    behind it (each taken out and put back). The caller compares ``now != saved`` first (in C, each value by identity
    first): a value replaced by one equal to it (a number, a string) stays."""
    for k in [k for k in list(now) if k not in saved]:  # list(): a copy made in C, at once (another thread may add)
        now.pop(k, None)
    for k, v in saved.items():
        if now.get(k, _MISSING) is not v:
            now[k] = v
    keys, order = list(saved), list(now)
    if order != keys:  # a key put back at the end: the ones after its place moved behind it, in order
        first = next(i for i, (a, b) in enumerate(zip(order, keys)) if a != b)
        for k in keys[first:]:
            now.pop(k, None)
            now[k] = saved[k]


def _restore_buffer_names(module: nn.Module, records: Any, quiet: Optional[frozenset]) -> None:
    """``module``'s buffers back to the names of ``records`` (:meth:`ModuleState.take`'s), in their order, and
    its non-persistent names to ``quiet`` (``None``: none): those registered since removed, those deleted put
    back; in place, a name both have never taken out (:func:`_restore_mapping`)."""
    _restore_mapping(module._buffers, {record[0]: record[1] for record in records})
    now = module.__dict__.get("_non_persistent_buffers_set")
    if now is not None and now != (quiet or set()):
        now.intersection_update(quiet or ())
        now.update(quiet or ())


def _attributes(tensor: torch.Tensor) -> Any:
    """A copy of ``tensor``'s Python attributes (its ``__dict__``), or one shared empty mapping when it has none
    (a new empty dict per tensor and call was a Python object the call held for nothing)."""
    attrs = tensor.__dict__
    return dict(attrs) if attrs else _NO_ATTRIBUTES


def _restore_attributes(tensor: torch.Tensor, saved: Any) -> None:
    """Put ``tensor``'s Python attributes back to ``saved`` (a copy of its ``__dict__``): those added
    since are deleted, those changed get their old values (the user's own attributes stay)."""
    now = tensor.__dict__
    if not now and not saved:
        return
    for k in [k for k in now if k not in saved]:
        del now[k]
    for k, v in saved.items():
        if now.get(k, _MISSING) is not v:
            now[k] = v


# The model's state, one record for its three users: "record these modules' state here" (:func:`record_state`), "what
# changed since" (:func:`state_changes`), "put it back" (:func:`put_back_state`). The model guard's records
# (:class:`ModuleState`) are made and put back by the same pieces (:func:`_tensor_records`, :func:`_put_back_tensors`,
# :func:`_restore_mapping`, :func:`_restore_buffers`), kept in their own light form for the guard's speed; Ablation-CAM's
# split clean pass (``methods.scorecam``) and the fx trace (:mod:`salience._core.folding`) take the record whole.

def _tensor_records(attrs: dict, refuse: bool = False, copy: bool = True) -> Any:
    """The plain tensors among a module's attributes ``attrs`` (its ``__dict__``, or a copy: its parameters and buffers
    live in their own dicts), each ``(name, tensor, version, copy)``, or :data:`_NO_TENSORS`. A forward that writes one
    in place (``self.seen.fill_(1)``, ``self.steps += 1`` on a tensor) keeps the object, so its identity does not tell;
    the version counter does, and the copy puts the values back. An inference tensor keeps no version counter: left
    out, or ``None`` returned where ``refuse`` (Ablation-CAM's split then runs its one pass). The types are looked at
    first, in C (most modules hold no tensor: 1 us a module). One over :data:`_COPY_LIMIT` bytes gets the copy kept
    across calls (:func:`_kept`; session 53: the guard took none, and a lookup table the forward wrote in place stayed
    written, told by a warning; a new copy each call had cost 60 ms and 100 MiB for 100 MiB, session 48 review). No
    copy (``None``) without ``copy`` (the fx trace's record of its shadow, thrown away after). Without ``refuse`` (the
    model guard), an inference tensor is recorded with the version ``None`` and a copy (kept across calls over the
    limit: :func:`_kept_values`, session 52): written in place (a forward under ``torch.inference_mode()``), it is put
    back by its values (session 49); a writeable NumPy array too, by :func:`_array_record`'s copy (none without
    ``copy``)."""
    tensor = torch.Tensor
    kinds = set(map(type, attrs.values()))
    if kinds <= _NO_TENSOR_KINDS:  # in C: a module's usual dicts, flags and numbers
        return _NO_TENSORS
    arrays = _array_types()
    for t in kinds:
        if issubclass(t, tensor) or t in arrays:
            break
    else:
        return _NO_TENSORS
    found = []
    for k, v in attrs.items():
        if type(v) in arrays:  # a NumPy array or memmap, no version counter: by its values (:func:`_array_record`)
            if copy and v.flags.writeable and v.size:
                found.append((k, v, None, _array_record(v)))
        elif isinstance(v, tensor) and not isinstance(v, nn.Parameter):
            large = _large_tensor(v)
            try:  # an inference tensor (or a subclass without one) has no version counter
                version = v._version
                found.append((k, v, version, (_kept(v, version) if large else v.detach().clone()) if copy else None))
            except Exception:
                if refuse:
                    return None
                if copy and v.is_inference():  # told by its values, a copy kept across calls over the limit
                    found.append((k, v, None, _kept_values(v) if large else v.clone()))
    return tuple(found) or _NO_TENSORS


def _large_tensor(t: torch.Tensor) -> bool:
    """Whether the tensor ``t`` gets the copy kept across calls (:func:`_kept`, :func:`_kept_values`): a strided one
    over :data:`_COPY_LIMIT` bytes. A sparse one (or of another layout) is copied per call whatever its dense size,
    which says nothing of its stored values: the kept copy's data pointer and samples have no kernel for it, and its
    record was dropped, a write in place neither put back nor told (review of session 53; before it, told)."""
    return t.layout is torch.strided and t.numel() * t.element_size() > _COPY_LIMIT


def _array_record(v: Any) -> Any:
    """The copy a record holds of the writeable NumPy array ``v`` (an attribute, or a container's item), told and
    put back by its values (no version counter): a copy up to :data:`_COPY_LIMIT` bytes, a copy kept across calls over
    it (:func:`_kept_values`, session 52: a 100 MiB table written in place stayed as written, silently); an object array
    a shallow copy up to :data:`_CONTENTS_LIMIT` items (its items compared by identity); a ``numpy.memmap`` (a write
    to it writes the user's file; a copy of a file of any size would read it all each call) and a larger object array
    only sampled (:class:`_Sampled`): told if changed, not put back."""
    if type(v) is not _ndarray() or v.dtype.hasobject and v.size > _CONTENTS_LIMIT:
        return _Sampled(v)
    if v.dtype.hasobject or v.nbytes <= _COPY_LIMIT:
        return v.copy()
    return _kept_values(v)


def _kept(t: torch.Tensor, version: int) -> torch.Tensor:
    """A copy of the values of ``t`` (a plain tensor attribute over :data:`_COPY_LIMIT` bytes, at ``version``), kept
    across calls while ``t`` lives and holds them: the model guard (session 53), :class:`Found` and Ablation-CAM's split
    copy every such tensor once a call (to put it back; a pass that writes it must still see the values found), and a 100 MiB constant lookup table cost each call of
    SmoothGrad or integrated gradients 50 ms and 100 MiB (session 50: 55.5 against 5.1 ms a call; session 51). The copy
    is taken again where ``t``'s version counter, storage, shape or dtype moved since (the user wrote it between the
    calls); one put back from it is taken as holding it again (:func:`_put_back_tensors`). Up to :data:`_KEEP_LIMIT`
    bytes in all, the least recently used dropped first past it (:func:`_keep`), dropped with ``t`` (a weak reference)
    or by :func:`forget_copies`.
    A write that moves no version counter (through ``.data``, a NumPy view of the tensor) between two calls is told
    only where it changed one of :data:`_KEPT_SAMPLES` values spread evenly over the tensor (:func:`_samples_same`,
    review of session 51: the copy stayed, and a pass that then wrote the tensor put the older values back, the user's
    write lost); a write of a few values between them is not seen. The copy the model guard's entry just took or
    checked is not checked again by the :class:`Found` recorded right after it (:func:`_trusted`)."""
    key, ptr = id(t), t.data_ptr()
    values = _trusted(key, t)
    if values is not None:
        return values
    entry = _KEPT.get(key)
    if entry is not None:
        ref, at, where, values = entry
        if ref() is t and at == version and where == ptr and values.shape == t.shape and values.dtype == t.dtype \
                and _samples_same(t, values):
            _used(key, entry)
            return _marked(key, values)
    return _marked(key, _keep(t, version, ptr, t.detach().clone()))


def _kept_values(v: Any) -> Any:
    """A copy of the values of ``v`` (a NumPy array or an inference tensor over :data:`_COPY_LIMIT` bytes: no version
    counter), kept across calls while ``v`` lives and holds them (session 52: such an attribute written in place was
    neither put back nor told). Without a version counter only a comparison of every value tells whether the user wrote
    ``v`` between two calls (``model.table[5] = 1``: a sampled check misses it, and the kept copy, stale, would undo
    that write at the next call's put-back): each reuse compares the whole (:func:`_same_bits`, bit for bit, in chunks
    of 256 KiB; about 10 ms for 100 MiB on an AMD EPYC core, against 39 ms for a new copy of it, which its memory's
    first writes make dear); a copy taken again where it differs. The :class:`Found` recorded right after the model
    guard's entry takes the copy that entry just compared or took (:func:`_trusted`): compared again, the same values
    read twice at each call's start (session 53)."""
    key = id(v)
    values = _trusted(key, v)
    if values is not None:
        return values
    entry = _KEPT.get(key)
    if entry is not None:
        values = entry[3]
        if entry[0]() is v and entry[1] is None and _same_bits(v, values):
            _used(key, entry)
            return _marked(key, values)
    return _marked(key, _keep(v, None, 0, v.copy() if type(v) is _ndarray() else v.clone()))


def _marked(key: int, values: Any) -> Any:
    """``values``, the copy of the object of id ``key`` just compared or taken, noted where this thread's model guard
    is entering (:func:`_enter_guard`: ``_local.marking``), for the :class:`Found` recorded right after it."""
    marking = getattr(_local, "marking", None)
    if marking is not None:
        marking[key] = values
    return values


def _trusted(key: int, now: Any) -> Any:
    """The copy of the object of id ``key`` that this thread's model guard took or compared while entering, where a
    :class:`Found` recorded right after that entry asks (``_local.trusted``, set only then), where it still has the
    shape and dtype of ``now`` (the tensor or array itself); else ``None``. Nothing ran
    between the two (``with model_guard(model), Found(model)``), so the values are those the entry saw; another guard's
    entry or exit in between drops the notes (:func:`_enter_guard`, :func:`_leave_guard`)."""
    trusted = getattr(_local, "trusted", None)
    values = trusted.get(key) if trusted else None
    return values if values is not None and values.shape == now.shape and values.dtype == now.dtype else None


def _keep(t: Any, version: Optional[int], ptr: int, values: Any) -> Any:
    """``values``, a copy of ``t`` taken at ``version`` (``None``: compared by values), kept in :data:`_KEPT` where it
    fits in :data:`_KEEP_LIMIT` bytes with the others, the least recently used dropped first to make room (session 52:
    past the cap each call copied anew the tensors of models long gone but not yet collected, in a reference cycle, or
    no longer used); one larger than the cap, or of an object without weak references, not kept."""
    global _kept_bytes
    key, size = id(t), values.nbytes
    with _kept_lock:
        _forget(key)  # the stale entry, if any (the lock is re-entrant)
        if size > _KEEP_LIMIT:
            return values
        while _KEPT and _kept_bytes + size > _KEEP_LIMIT:
            _forget(next(iter(_KEPT)))  # the least recently used first (:func:`_used` moves an entry last)
        try:  # dropped with the tensor (a subclass without weak references: not kept)
            _KEPT[key] = (weakref.ref(t, lambda _, key=key: _forget(key)), version, ptr, values)
        except TypeError:
            return values
        _kept_bytes += size
    return values


def _used(key: int, entry: tuple) -> None:
    """The kept copy ``entry`` of the object of id ``key`` reused: moved last in :data:`_KEPT`'s order (the most
    recently used; :func:`_keep` drops from the first)."""
    with _kept_lock:
        if _KEPT.get(key) is entry:
            del _KEPT[key]
            _KEPT[key] = entry


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
    first and the last among them (every one where ``n`` is smaller): :func:`_samples_same`'s and :class:`_Sampled`'s.
    In integers: a float's linspace rounds an index past the end over 2 ** 24 values. Made once per size and device
    (read only): 50 us each time, a third of a sampled check (session 53). The device always named: the default one
    (``torch.set_default_device("cuda")``, ``with torch.device("meta")``) made :class:`_Sampled`'s indices there, a
    raw TypeError from ``.numpy()``, and the cache kept them for every later array of that size (review of session 53)."""
    k = min(n, _KEPT_SAMPLES)
    return torch.arange(k, device=device) * (n - 1) // max(k - 1, 1)


def _forget(key: int) -> None:
    """The kept copy of the tensor of id ``key`` (:func:`_kept`) dropped: the tensor is gone."""
    global _kept_bytes
    with _kept_lock:
        old = _KEPT.pop(key, None)
        if old is not None:
            _kept_bytes -= old[3].nbytes


def _kept_again(t: torch.Tensor, copy: torch.Tensor) -> None:
    """``t`` put back from ``copy``: where that copy is the one kept for ``t`` (:func:`_kept`), its version is ``t``'s
    now (it holds the kept values again; the next call takes no copy)."""
    with _kept_lock:  # not between another thread's pop and put of the entry (:func:`_kept`)
        entry = _KEPT.get(id(t))
        if entry is not None and entry[3] is copy and entry[0]() is t:
            del _KEPT[id(t)]  # the most recently used (:func:`_used`)
            _KEPT[id(t)] = (entry[0], t._version, t.data_ptr(), copy)


def forget_copies() -> None:
    """Drop every copy kept across calls (:func:`_kept`): the memory they hold, at once."""
    global _kept_bytes
    with _kept_lock:
        _KEPT.clear()
        _kept_bytes = 0


def _storages(buffers: Any, tensors: Any) -> Any:
    """``(name, tensor, alias)`` of each buffer of ``buffers`` and plain tensor of ``tensors`` (the records of
    :class:`ModuleState`), ``alias`` a view of its storage as recorded (``detach()``: its storage, offset, sizes and
    strides), or :data:`_NO_TENSORS`. A forward that swaps the storage under the object (``self.buf.data = t``, which
    moves no version counter; ``self.buf.set_(t)``) kept the object, its name and perhaps its values: its new storage
    stayed, silently (session 51). Taken for the modules whose dicts are recorded (about 1 us a tensor)."""
    found = [(k, b, b.detach()) for k, b, *_ in buffers if b is not None] if buffers else []
    if tensors:
        found += [(k, t, t.detach()) for k, t, version, _ in tensors if version is not None]
    return tuple(found) or _NO_TENSORS


def _same_storage(t: torch.Tensor, alias: torch.Tensor) -> bool:
    """Whether ``t`` still views the storage, offset, sizes and strides of ``alias`` (:func:`_storages`); a tensor
    without that kernel (meta, sparse) is taken as the same."""
    try:
        return t.is_set_to(alias)
    except Exception:  # noqa: BLE001
        return True


def _put_back_storages(storages: Any) -> None:
    """Each tensor of ``storages`` (:func:`_storages`) set back to its storage, offset, sizes and strides where a
    forward swapped them (its values then those of its storage; a write in place besides is put back after, from its
    copy: the set moves its version counter)."""
    for _, t, alias in storages:
        if not _same_storage(t, alias):
            with torch.no_grad():
                t.set_(alias)


def _tensors_moved(records: Any) -> bool:
    """Whether a tensor of :func:`_tensor_records`' ``records`` was written in place since."""
    return any(_tensor_moved(t, version, copy) for _, t, version, copy in records)


def _tensor_moved(t: Any, version: Optional[int], copy: Any) -> bool:
    """Whether the tensor (or NumPy array) ``t``, recorded at ``version`` with ``copy``, was written in place since: by
    its version counter, else by its values (:func:`_values_moved`); a plain tensor whose counter did not move by its
    values too (:func:`_written_quietly`)."""
    if version is None:
        return _values_moved(t, copy)
    return t._version != version or _written_quietly(t, copy)


def _written_quietly(t: torch.Tensor, copy: Any) -> bool:
    """Whether the plain tensor ``t``, its version counter unmoved, no longer holds the values of ``copy``: a write
    through ``t.data`` (``self.table.data.mul_(2)``) or a NumPy view moves no counter, and stayed (session 53). Compared
    whole up to :data:`_COPY_LIMIT` bytes, over it at :data:`_KEPT_SAMPLES` places (:func:`_samples_same`: a write of a
    few values no sample reads stays); not where there is no copy, nor where the two cannot be compared, nor on a
    device (its answer would wait for the device: a synchronization per tensor and call)."""
    if copy is None or copy.shape != t.shape or copy.dtype != t.dtype or t.device.type != "cpu":
        return False
    try:
        return not (_samples_same(t, copy) if copy.nbytes > _COPY_LIMIT else _equal_nan(t.detach(), copy))
    except Exception:  # noqa: BLE001 - no kernel for the comparison (meta, sparse, a subclass): by its counter only
        return False


def _values_moved(t: Any, copy: Any) -> bool:
    """Whether the inference tensor or NumPy array ``t`` (no version counter) no longer holds the values of ``copy``
    (its copy when recorded, bit for bit: :func:`_same_bits`; its sampled values, :class:`_Sampled`; or ``None``: not
    told)."""
    if copy is None:
        return False
    if type(copy) is _Sampled:
        return not copy.same(t)
    return not _same_bits(t, copy)


def _same_bits(a: Any, b: Any) -> bool:
    """Whether ``a`` holds the values of its copy ``b`` (two NumPy arrays or two tensors of one shape and dtype): bit for
    bit where both lie in one contiguous block of CPU memory (a NaN equal to itself, -0.0 not 0.0), compared as unsigned
    integers in chunks of :data:`_CHUNK` items (a comparison of 100 MiB at once made a 25 MiB mask: 31 ms, against 10 in
    chunks; ``torch.equal`` 58: AMD EPYC, one core, session 52); else by value, NaN equal to NaN
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
    # read: compared by identity, such an array was changed at every call, review of session 52)
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


class _Sampled:
    """:data:`_KEPT_SAMPLES` values of a NumPy array spread evenly over it (the first and the last among them), for one
    not copied (:func:`_array_record`: a ``numpy.memmap``, whose file a copy would read whole each call; an object
    array over :data:`_CONTENTS_LIMIT` items, compared by identity): a write in place that reaches one of them is told,
    as it stays (:func:`_not_put_back`)."""

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


def _ndarray() -> Optional[type]:
    """NumPy's array type, where NumPy was imported (else no array can be among a module's attributes)."""
    numpy = sys.modules.get("numpy")
    return None if numpy is None else numpy.ndarray


def _array_types() -> tuple:
    """NumPy's array and memmap types (exact types: another subclass, a masked array, is not looked at), where NumPy
    was imported; else none."""
    numpy = sys.modules.get("numpy")
    return () if numpy is None else (numpy.ndarray, numpy.memmap)


def _put_back_tensors(records: Any) -> Any:
    """The values of each tensor of ``records`` (:func:`_tensor_records`) written in place since, put back in place
    from its copy (one without a copy stays as written: :func:`_not_put_back`); the records with the versions after
    that (the same object where none was written), for a record put back again."""
    if not _tensors_moved(records):
        return records
    with torch.no_grad():
        for _, t, version, copy in records:
            if version is None:  # an inference tensor (written in place only in inference mode) or an array
                if type(copy) is _Sampled or not _values_moved(t, copy):  # sampled: told (_not_put_back), not put back
                    continue
                if type(t) is _ndarray():
                    _put_back_array(t, copy)
                    continue
                with torch.inference_mode():
                    t.copy_(copy)
            elif copy is not None and (t._version != version or _written_quietly(t, copy)):
                t.copy_(copy)
                if _KEPT:
                    _kept_again(t, copy)
    return tuple((k, t, t._version if version is not None else None, _Sampled(t) if type(copy) is _Sampled else copy)
                 for k, t, version, copy in records)


def _put_back_array(t: Any, copy: Any) -> None:
    """The values of ``copy`` put back into the NumPy array ``t`` (writeable when recorded: :func:`_tensor_records`),
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


def _not_put_back(records: Any) -> list:
    """The names and tensors of ``records`` (:func:`_tensor_records`) written in place since that have no copy: a tensor
    by its version counter, a NumPy array only sampled (:class:`_Sampled`) by its sampled values."""
    return [(k, t) for k, t, version, copy in records if copy is None and version is not None and t._version != version
            or type(copy) is _Sampled and not copy.same(t)]


def _tell_not_put_back(module: nn.Module, lost: list) -> None:
    """A warning naming the plain attributes of ``module`` (``lost``: ``(name, value)`` each, :func:`_not_put_back`'s
    and :func:`_put_back_containers`') that a call changed in place and the guard could not put back: a container over
    :data:`_CONTENTS_LIMIT` items (not copied), a ``numpy.memmap`` or large object array (sampled), a tensor without a
    copy (a TorchScript buffer whose guard copy is gone)."""
    import warnings

    from salience._core.errors import user_stacklevel

    names = ", ".join(_described(k, t) for k, t in lost)
    warnings.warn(f"the model's forward changed in place the plain attribute {names} of a "
                  f"{type(module).__name__} during salience's passes, and it keeps those values: salience copies a "
                  f"list, dict, set, deque or object array to put it back only up to {_CONTENTS_LIMIT} items, and "
                  "never a numpy.memmap (its file may be of any size; a write to it writes the file: open it with "
                  "mode='r' or 'c' if the forward must not); save and restore it yourself",
                  stacklevel=user_stacklevel())


def _described(k: str, t: Any) -> str:
    """The attribute ``k`` of value ``t`` as :func:`_tell_not_put_back` names it."""
    if isinstance(t, torch.Tensor):
        return f"{k!r} ({t.numel() * t.element_size() / 2 ** 20:.1f} MiB)"
    if type(t) is not _ndarray() and type(t) in _array_types():
        written = "copy-on-write: its file not written" if t.mode == "c" else "its file written too"
        return f"{k!r} (a numpy.memmap of {t.filename!r}, {t.nbytes / 2 ** 20:.1f} MiB: {written})"
    if type(t) is _ndarray():
        return f"{k!r} (an object array of {t.size} items)"
    return f"{k!r} (a {type(t).__name__} of {len(t)} items)"


def _contents(v: Any) -> Any:
    """A copy of a list's, dict's or set's contents, or of ``collections``' ``deque`` (its ``maxlen`` too),
    ``defaultdict`` (its ``default_factory`` too), ``Counter`` or ``OrderedDict`` (a forward may change them in place;
    ``self.recent.append(y)`` on a running window: session 49 "stdc"), of the same exact type (an OrderedDict's as a
    dict); else ``None`` (a subclass of one: a log of the user's, not copied)."""
    t = type(v)
    if t in _PLAIN_CONTAINERS:  # list, dict, set, Counter (Counter(v): dict.update, in C)
        return t(v)
    if t is OrderedDict:  # a plain dict: an OrderedDict's copy and comparison cost 40 us more at 1024 items
        return dict(v)
    if t is deque:
        return deque(v, v.maxlen)
    return defaultdict(v.default_factory, v) if t is defaultdict else None


def _same_contents(items: Any, v: Any, identity: bool = False) -> bool:
    """Whether the container ``v`` holds ``items`` (:func:`_contents`), a dict in the same order; ``items`` an int (a
    container over :data:`_CONTENTS_LIMIT` items, not copied): whether it still has that many. Compared in C, each
    item by identity first, as the attributes are (an item replaced by one equal to it, ``==``, stays; one whose
    ``==`` raises, a tensor's, is changed): item by item in Python (``operator.is_``, a generator) a module's record
    and put-back with 1024 items cost 37 us more a call for a list, 100 for a dict, now 2.5 and 22 (AMD EPYC, core 0;
    session 49 review, ``benchmarks/guard-containers-rvrecord-s49.txt``). ``identity``: each item by identity, no ``==``
    called (:func:`state_changes`: the fx trace's record of its shadow may hold proxies)."""
    if type(items) is int:
        return len(v) == items
    if isinstance(items, dict):  # a dict, OrderedDict, Counter (its == counts a missing key as 0) or defaultdict
        if type(items) is defaultdict and items.default_factory is not v.default_factory:
            return False
        if identity:  # no == called on an item (a trace's record of its shadow: an fx proxy's == adds a node)
            return len(items) == len(v) and all(map(operator.is_, items, v)) and \
                all(map(operator.is_, items.values(), v.values()))
    elif identity:
        if type(items) is set:
            return items == v  # by hash (an fx proxy cannot be in one)
        return len(items) == len(v) and all(map(operator.is_, items, v))  # a list, a deque
    try:
        if isinstance(items, dict):  # its keys in order (an LRU cache's move_to_end, ``d[k] = d.pop(k)``: session 49
            # review), by lists: in C, and a Counter's own == (Python, a key of 0 counted missing) not called
            return len(items) == len(v) and list(items) == list(v) and list(items.values()) == list(v.values())
        return items == v  # a list's, set's, deque's: in C
    except Exception:  # noqa: BLE001 - an item's == raised (a tensor put in another's place): changed
        return False


def _put_back_contents(v: Any, items: Any) -> None:
    """The container ``v`` holding ``items`` (:func:`_contents`) again, in place (the object stays the user's), an
    item both have never missing meanwhile: ``clear()`` then refilling left it empty for that moment, and the user's
    other thread reading it (its own forward) failed (session 49 review); a dict's order put back too
    (:func:`_restore_mapping`); a deque's (its ``maxlen`` stays the object's) by adding the items at its right then
    dropping those before them, a defaultdict's ``default_factory`` too."""
    t = type(v)
    if t is list:
        v[:] = items
    elif t is set:
        v.intersection_update(items)
        v.update(items)
    elif t is deque:
        v.extend(items)  # in C; over its maxlen the oldest go at once
        for _ in range(len(v) - len(items)):
            v.popleft()
    else:
        _restore_mapping(v, items)
        if t is defaultdict and v.default_factory is not items.default_factory:
            v.default_factory = items.default_factory


def _container_records(attrs: dict, every: bool = False, items: Optional[dict] = None) -> Any:
    """The lists, dicts, sets and ``collections``' deques, defaultdicts, Counters and OrderedDicts (:data:`_CONTAINERS`,
    exact types) among a module's plain attributes ``attrs`` (its ``__dict__`` or a copy; nn.Module's own dicts left
    out), each ``(name, container, a copy of its contents)``, or :data:`_NO_TENSORS`. Over :data:`_CONTENTS_LIMIT`
    items, unless ``every``, the length instead of a copy (its cost per call): a change of length is told
    (:func:`_put_back_containers`), the contents stay. The names past nn.Module's own found in C first (most modules: a
    few numbers). ``items``: filled with the tensors among the items of the containers copied (not a set's), by the
    name ``"name[index]"`` / ``"name[key]"`` (:func:`_item_tensors`). A tuple (a namedtuple too) has no record of its
    own (its items cannot change), but its items are looked into as a list's (session 52: ``self.pair[0].add_(1)``,
    and a list in a tuple appended to, stayed), within the same item limit."""
    found = []
    for k in attrs.keys() - _MODULE_KEYS:
        v = attrs[k]
        if type(v) in _CONTAINERS:
            n = len(v)
            if not every and n > _CONTENTS_LIMIT:
                found.append((k, v, n))
                continue
            found.append((k, v, _contents(v)))
            if n and type(v) is not set:  # a set holds no container (unhashable)
                found += _inner_records(k, v, every, _CONTENTS_LIMIT - n, items)
        elif isinstance(v, tuple) and v and (every or len(v) <= _CONTENTS_LIMIT):
            found += _inner_records(k, v, every, _CONTENTS_LIMIT - len(v), items)
    return tuple(found) or _NO_TENSORS


def _item_tensors(k: str, v: Any, kinds: set, into: Optional[dict]) -> None:
    """The plain tensors among the items of the container ``v`` (the attribute ``k``; ``kinds``, its items' types) put in
    ``into`` by the names ``"k[index]"`` / ``"k[key]"``: a forward that writes one in place (``self.cache[0].add_(1)``)
    keeps the object, which the container's copy compares by identity (session 51); recorded as the attributes' tensors
    (:func:`_tensor_records`: version counter and copy)."""
    arrays = _array_types()
    if into is None or not any(issubclass(t, torch.Tensor) or t in arrays for t in kinds):
        return
    pairs = v.items() if isinstance(v, dict) else enumerate(v)
    into.update((f"{k}[{key!r}]", u) for key, u in pairs if isinstance(u, torch.Tensor) or type(u) in arrays)


def _inner_records(k: str, v: Any, every: bool, room: int, tensors: Optional[dict] = None) -> list:
    """The containers (:data:`_CONTAINERS`) among the items of the container ``v`` (the attribute ``k``; a dict's
    values), one level more (a deque of a running window inside a dict, ``self.state["recent"].append(y)``: session 50;
    its dict compared its items by identity, so a change inside one stayed), each ``(k, container, a copy of its
    contents)``, after its parent's record (put back after it: the parent gives the container back first). Unless
    ``every``, only where their items fit in ``room`` (:data:`_CONTENTS_LIMIT` less the parent's), else none: one
    level as before. Looking at the items' types costs about 65 ns an item (67 us for 1024 on an AMD EPYC, core 0,
    against 1.3 us for the parent's copy), paid where the parent is copied."""
    items = v.values() if isinstance(v, dict) else v
    kinds = set(map(type, items))  # in C: most containers hold numbers, strings, tensors
    _item_tensors(k, v, kinds, tensors)
    tuples = not all(map(_not_tuple, kinds))  # a tuple's tensors (``self.cache["kv"] = (k, v)``: session 52)
    if _CONTAINERS.isdisjoint(kinds) and not tuples:
        return []
    inner = [u for u in items if type(u) in _CONTAINERS]
    if not every and sum(map(len, inner)) + (sum(len(u) for u in items if isinstance(u, tuple)) if tuples else 0) > room:
        return []
    if tensors is not None:  # the tensors among an inner container's items (``self.state["cache"][0].add_(1)``)
        for key, u in v.items() if isinstance(v, dict) else enumerate(v):
            if type(u) in _CONTAINERS and type(u) is not set or isinstance(u, tuple):
                _item_tensors(f"{k}[{key!r}]", u, set(map(type, u.values() if isinstance(u, dict) else u)), tensors)
    return [(k, u, _contents(u)) for u in inner]


def _not_tuple(t: type) -> bool:
    """Whether the type ``t`` is no tuple (a namedtuple is one)."""
    return not issubclass(t, tuple)


def _put_back_containers(records: Any) -> tuple[Any, list]:
    """The containers of ``records`` (:func:`_container_records`) changed in place since, their contents put back;
    ``(the records, with the lengths now of those not copied, the (name, container) of each such one that changed)``:
    a container over the limit keeps what the call did to it, told (:func:`_tell_not_put_back`)."""
    lost = []
    for k, v, items in records:
        if not _same_contents(items, v):
            if type(items) is int:
                lost.append((k, v))
            else:
                _put_back_contents(v, items)
    if lost:
        records = tuple((k, v, len(v) if type(items) is int else items) for k, v, items in records)
    return records, lost


def record_state(modules: Any, attributes: Any = None, containers: bool = False, buffers: bool = True,
                 copies: Any = None, own_dicts: bool = True, tensor_copies: bool = True,
                 inference: bool = False, named: bool = False) -> Optional[list]:
    """A record of the state of ``modules`` (in order; each one's own state, not its children's): its buffers (each
    name in order, with its version counter and a copy of its values where ``copies(module)`` says so, default all),
    and where ``attributes(module)`` says so (default all) its plain attributes one level deep (a copy of its
    ``__dict__``, nn.Module's own dicts and sets too unless ``own_dicts`` is False), each plain tensor among them with
    its version counter and a copy (over :data:`_COPY_LIMIT` bytes the one kept across calls, :func:`_kept`; none
    without ``tensor_copies``), and with
    ``containers`` a copy of each list's, dict's, set's, deque's, defaultdict's, Counter's and OrderedDict's contents. A module with neither (no attributes asked, no buffer) has no record. ``None`` where such a tensor or a buffer is an
    inference tensor (no version counter to tell a write by), unless ``inference``: such a tensor attribute is then
    recorded as the model guard records it, by its values. With
    ``named`` (and the attributes asked), its parameters and submodules by name too, as the model guard's own record
    (``self.w = nn.Parameter(...)``, a head swapped in a forward: both write nn.Module's own dicts in place, which the
    copy of the ``__dict__`` holds by identity; Ablation-CAM's split missed them, session 51). :func:`state_changes`
    says what changed since, :func:`put_back_state` puts it back.

    Each module's record is a :class:`ModuleState`, the model guard's own class, made here without its hold counts
    (the guard copies a container up to :data:`_CONTENTS_LIMIT` items; here every one). Ablation-CAM's split clean pass records the modules not from
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
        r.index, r.module, r.attrs, r.tensors, r.contents, r.buffers, r.quiet = index, m, None, _NO_TENSORS, (), None, None
        r.training, r.forward, r.handles, r.params, r.children, r.script = m.training, _NOT_COMPILED, (), None, None, None
        r.storages = _NO_TENSORS
        if asked:
            attrs = d.copy() if own_dicts else {k: v for k, v in d.items() if k not in _MODULE_OWN}
            tensors = _tensor_records(attrs, refuse=not inference, copy=tensor_copies)
            if tensors is None:
                return None
            r.attrs, r.tensors = attrs, tensors
            if containers:
                items: dict = {}
                r.contents = _container_records(attrs, every=True, items=items)
                more = _tensor_records(items, refuse=not inference, copy=tensor_copies) \
                    if items else _NO_TENSORS
                if more is None:
                    return None
                r.tensors += more
            if named and "_parameters" in attrs:
                r.params, r.children = dict(attrs["_parameters"]), dict(attrs["_modules"])
        if buffers:
            copy = copies is None or copies(m)
            try:  # an inference tensor keeps no version counter
                r.buffers = tuple((name, b, b._version, (b.detach().clone() if copy else None), _attributes(b))
                                  if b is not None else (name, None, 0, None, _NO_ATTRIBUTES)
                                  for name, b in (held or _EMPTY).items())
            except RuntimeError:
                return None
            quiet = d.get("_non_persistent_buffers_set")
            r.quiet = frozenset(quiet) if quiet else None
        if tensor_copies:  # each tensor's storage (``self.buf.data = t``: session 51), the buffers' where copied
            r.storages = _storages(r.buffers if buffers and (copies is None or copies(m)) else None, r.tensors)
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
                changed += [(i, k) for k in d if k not in saved and (own or k not in _MODULE_OWN)]
                changed += [(i, k) for k, v in saved.items() if d.get(k, _MISSING) is not v]
            if r.tensors:  # a container's item by the container's name (``"cache[0]"``: ``"cache"``)
                changed += [(i, k) for k in dict.fromkeys(k.partition("[")[0] for k, t, version, copy in r.tensors if (
                    t._version != version if version is not None else _values_moved(t, copy))) if (i, k) not in changed]
            if r.contents:
                changed += [(i, k) for k, v, items in r.contents
                            if not _same_contents(items, v, identity=True) and (i, k) not in changed]
            if r.params is not None:  # recorded by name (``named``): a parameter or submodule replaced, added, deleted
                changed += [(i, k) for k in _named_changes(d.get("_parameters", _EMPTY), r.params) +
                            _named_changes(d.get("_modules", _EMPTY), r.children) if (i, k) not in changed]
        if r.storages:
            changed += [(i, k) for k, t, alias in r.storages if (i, k) not in changed and not _same_storage(t, alias)]
        records = r.buffers
        if records is not None:
            now = d.get("_buffers") or _EMPTY
            if len(now) != len(records):
                names = {name for name, *_ in records}
                changed += [(i, k) for k in now if k not in names]
            changed += [(i, name) for name, b, version, _, _ in records
                        if now.get(name, _MISSING) is not b or b is not None and b._version != version]
    return changed


def _named_changes(now: dict, saved: dict) -> list:
    """The names whose entries differ between a module's ``_parameters`` or ``_modules`` ``now`` and ``saved`` (its copy):
    added, deleted or replaced (by identity); compared in C first (a parameter's ``==`` raises unless it has one
    element: then by identity)."""
    try:
        if now == saved:
            return []
    except Exception:  # noqa: BLE001 - a parameter's == (several elements) raised: by identity
        pass
    return [k for k in now.keys() | saved.keys() if now.get(k, _MISSING) is not saved.get(k, _MISSING)]


def put_back_state(record: list) -> None:
    """The modules of ``record`` (:func:`record_state`) put back as recorded: the plain attributes (in place, a name
    both have never missing meanwhile: :func:`_restore_mapping`), each tensor among them written in place from its copy,
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
        if buf._version != version:
            if copy is None:
                copy = held_values(module, name, buf, version)
            if copy is not None:
                with torch.no_grad():
                    buf.copy_(copy)
        _restore_attributes(buf, attrs)
    # deleted or registered since: the names, in order; or the same names, one registered again persistent or not
    # (``register_buffer``'s default, persistent: the user's state dict gained or lost a key; a plain torch.nn layer's
    # forward registers none)
    if missing or len(buffers) != len(records) or saved is not None and \
            module.__dict__.get("_non_persistent_buffers_set", _NO_NAMES) != (quiet or _NO_NAMES):
        _restore_buffer_names(module, records, quiet)


_NO_TENSORS: tuple = ()
# the largest tensor or array attribute (bytes) the records copy anew at each call (:func:`_tensor_records`); a larger
# one gets a copy kept across calls (:func:`_kept`, :func:`_kept_values`)
_COPY_LIMIT = 1 << 20
# the copies of larger ones kept across calls (:func:`_kept`): id -> (weak reference, version, data_ptr, copy), and
# the most bytes they may hold in all
_KEPT: dict = {}
_KEEP_LIMIT = 1 << 30
_kept_bytes = 0
# re-entrant: a tensor that dies while its thread holds it (the garbage collector, run by any allocation inside it,
# frees a model in a reference cycle) calls :func:`_forget`, which takes it again (review of session 51: a deadlock)
_kept_lock = threading.RLock()
# per thread: the copies its model guard's entry took or compared (``marking``, while entering; ``fresh``, after it),
# and those the :class:`Found` recorded right after it takes without comparing them again (``trusted``: :func:`_trusted`)
_local = threading.local()
# the values of a kept copy compared with its tensor's at each call (:func:`_samples_same`)
_KEPT_SAMPLES = 1024
# the CPU, named (not the default device: :func:`_sample_places`)
_CPU = torch.device("cpu")
# the items compared at once by :func:`_same_bits` (256 KiB of 4-byte values), and the unsigned integers it views
# values of each size as
_CHUNK = 1 << 16
_UINTS = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}
_TORCH_UINTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# the types of a module's attributes that are no tensors, looked at first (:func:`_tensor_records`)
_NO_TENSOR_KINDS = frozenset({bool, int, float, str, type(None), dict, OrderedDict, set, tuple, list, torch.dtype,
                              torch.device, deque, defaultdict, Counter})
# nn.Module's own dicts and sets (parameters, buffers, submodules, hooks): not a forward's plain attributes
_MODULE_OWN = frozenset(k for k, v in nn.Module().__dict__.items() if type(v) in (OrderedDict, dict, set))
_MODULE_KEYS = frozenset(nn.Module().__dict__)  # every attribute nn.Module.__init__ sets
# the containers whose contents the records copy (:func:`_contents`), and the most items the model guard copies of one
# (a shallow copy and a comparison in C: 1024 items cost a module's record and put-back about 2.5 us more a call for a
# list, 8 for a set, 22 for a dict, its order compared too: AMD EPYC, core 0, benchmarks/guard-containers-rvrecord-s49.txt)
# collections' deque, defaultdict and Counter too, by their exact types (session 49 "stdc": a forward's
# ``self.recent.append(y)`` on a deque stayed, silently); a subclass of any is not copied (a log of the user's). A
# deque of 1024 costs 14 us more a call unchanged (its == and copy; a list's 2.5), defaultdict and Counter as a dict's
# (AMD EPYC, core 0, benchmarks/guard-containers-stdc-s49.txt)
_PLAIN_CONTAINERS = frozenset({list, dict, set, Counter})
_CONTAINERS = _PLAIN_CONTAINERS | {OrderedDict, deque, defaultdict}
_CONTENTS_LIMIT = 1024


_NO_FORWARD = object()
_NOT_COMPILED = object()
_MISSING = object()
_NO_ATTRIBUTES: Any = MappingProxyType({})
_EMPTY: dict = {}  # the copy of an empty _parameters or _modules, shared (never changed)
_NO_NAMES: frozenset = frozenset()  # no non-persistent buffer names


def _compiled_wrapper_class() -> Optional[type]:
    """torch.compile's wrapper class (``OptimizedModule``). Dynamo is not imported for it: where it was
    never imported, there is no wrapper (``None``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return None if eval_frame is None else eval_frame.OptimizedModule


_M = nn.Module


def _walk(model: nn.Module) -> tuple[list, list]:
    """``list(model.modules())`` and ``list(model.parameters())``: the same objects in the same order, from
    one walk of the modules' ``_modules`` (:func:`~salience._core.fingerprint._modules`, which
    :func:`~salience._core.fingerprint.structure` walks too) and their ``_parameters`` (the generators cost 0.38 ms
    on resnet50), unless a class changes how modules or parameters are listed."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    root, attrs = type(model), model.__dict__
    if root.parameters is not _M.parameters or root.named_parameters is not _M.named_parameters or \
            root._named_members is not _M._named_members or "parameters" in attrs:
        return list(model.modules()), list(model.parameters())
    modules = _modules(model)
    if type(modules) is not list:  # a class lists its modules itself: the generators, both
        return list(modules), list(model.parameters())
    params: list = []
    seen_params: set = set()  # ids: Tensor.__hash__ is id() in Python, 0.2 us a call
    for m in modules:
        if m._parameters:
            for p in m._parameters.values():
                if p is not None and id(p) not in seen_params:
                    seen_params.add(id(p))
                    params.append(p)
    return modules, params


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` from the one quick walk (:func:`_walk`): what per-call checks iterate over (the
    generators cost about 1 ms a call on a ViT-B of 150 modules)."""
    return _walk(model)[0]


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    """``list(model.parameters())`` (each once) from the same quick walk: for per-call sums over the weights
    (:func:`salience._core.engine.weight_bytes`; the generator walked the modules building their dotted names)."""
    return _walk(model)[1]


_lock = threading.Lock()
# Every module and parameter some guard holds: id -> its _Entry (its hold counts, its baseline, and its state as
# the first holder found it: the entry is that state's record).
_held: dict[int, Any] = {}
# thread id -> its open model_guard blocks: the passes the guard's own hooks (the one-image BatchNorm check) act on
_guarding: dict[int, int] = {}
# (thread id, id(model)) -> that thread's hold of the model: [the key, the objects held, how many of the thread's
# open model_guard blocks share it]. The thread's first model_guard on the model holds its modules and
# parameters; a guard nested in it (SmoothGrad around vanilla, a method inside evaluate's guard) that finds the
# same ones only counts itself here (0.45 -> 0.12 ms on resnet50): the outer block holds them until it leaves.
_threads: dict[tuple[int, int], list] = {}
# ids of the modules a hold left while a model_guard still held them, the hook counter moved in its block: their
# hooks are swept when they are put back, whatever the hold putting them back saw (see _unhook)
_stale: set[int] = set()


def held_values(module: nn.Module, name: str, buf: torch.Tensor, version: int) -> Optional[torch.Tensor]:
    """The copy a guard holding ``module`` took of its buffer ``name`` when it entered, where that buffer is still
    ``buf`` and was at ``version`` then (so the copy has the values ``buf`` had at ``version``); else ``None``. For a
    pass run again that must start from the state the first found (Ablation-CAM's split clean pass: a buffer of a
    ``torch.nn`` layer the user's forward wrote), without a copy of its own: :func:`put_back_state` of a record that
    took no copy of that buffer."""
    entry = _held.get(id(module))
    if entry is None or type(entry) is not ModuleState or not entry.captured:
        return None
    for slot, held, at, values, _ in entry.buffers:
        if slot == name and held is buf and at == version:
            return values
    return None


def settled(module: nn.Module, t: torch.Tensor, version: int, values: torch.Tensor) -> None:
    """The plain tensor attribute ``t`` of ``module``, which the caller (:class:`Found`) recorded at ``version`` with the
    copy ``values`` and has put back from it, taken as put back by a guard holding ``module`` that recorded it at the
    same version with the same copy (the one kept across calls, :func:`_kept`) or none: the guard's exit copies it back
    no more (a 100 MiB table: 100 MiB copied once more; session 53). A dataset run's baseline (:func:`run_guard`, put
    back after each call) too."""
    entry = _held.get(id(module))
    if entry is None or type(entry) is not ModuleState or not entry.captured:
        return
    for record in (entry, entry.baseline):
        if type(record) is ModuleState and record.tensors:
            record.tensors = tuple((k, v, v._version if v is t and at == version and (copy is None or copy is values)
                                    else at, copy) for k, v, at, copy in record.tensors)


def _hold(objects: list, held: list, new: list) -> None:
    """Count one more holder of each of ``objects``, each appended to ``held`` as soon as it is counted
    (so that an interruption part way releases exactly those), and to ``new`` if no guard held it."""
    for obj in objects:
        entry = _held.get(id(obj))
        if entry is None:
            _held[id(obj)] = (ModuleState if isinstance(obj, _M) else ParamState).entry()
            new.append(obj)
        else:
            entry.holders += 1
        held.append(obj)


def _release(objects: list, run: bool = False, start: int = -1) -> None:
    """One holder fewer of each of ``objects`` (``run``: a run guard): the state of each that no guard
    holds any more is put back; one that only run guards hold now gets its baseline back. ``start``: the
    hold's :data:`_Handle.next_id` when it began (-1: unknown); where a hook was registered since (or a hold
    left one to sweep, ``_stale``), the hooks registered since on what is put back are removed (:func:`_unhook`)."""
    until = _Handle.next_id  # the key the next hook registered anywhere gets
    moved = until != start  # the common case: no hook registered anywhere since, one attribute read
    last: tuple[list, list] = ([], [])
    back: tuple[list, list] = ([], [])
    for obj in objects:
        entry = _held[id(obj)]
        entry.holders -= 1
        if run:
            entry.runs -= 1
            if entry.runs == 0:
                entry.baseline = None
        if entry.holders == 0:
            del _held[id(obj)]
            if entry.captured:  # not: its capture did not happen (an error while entering)
                last[type(entry) is ParamState].append(entry)
        elif entry.holders == entry.runs and entry.baseline is not None:
            back[type(entry.baseline) is ParamState].append(entry.baseline)
    # modules first (compiled forwards, modes, buffers), then parameters; each put back even if one raises
    error = _each(last[0] + last[1], False)
    error = _each(back[0] + back[1], True) or error
    if moved or _stale:
        try:  # some objects still held by a model_guard (or not captured, an error while entering): noted, see _unhook
            kept = len(last[0]) + len(last[1]) + len(back[0]) + len(back[1]) < len(objects)
            _unhook(objects if kept else (), last[0] + back[0], moved, until)
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def _each(states: list, put_back: bool) -> Optional[BaseException]:
    """Each of ``states`` restored (or put back), all of them even if one raises (a buffer the block resized,
    a ``KeyboardInterrupt`` raised by code: a Ctrl-C waits for the end, see :func:`calmly`): the one that raised is run once more (a restore may
    run twice) and the others still run; returns the first error. Before, the objects after it stayed in
    eval mode, frozen, for good (no guard held them any more)."""
    error = None
    for state in states:
        try:
            state.put_back() if put_back else state.restore()
        except BaseException as e:
            error = error or e
            try:
                state.put_back() if put_back else state.restore()
            except BaseException:
                pass
    return error


def _unhook(objects: Any, states: list, moved: bool, until: int) -> None:
    """The hooks registered since each of ``states`` was recorded and before ``until`` (the counter when the hold
    left) removed from its module (the :class:`ModuleState` records put back: their last holder left, or their
    baseline put back), all but salience's own (:func:`_own_hook`). Then ``objects`` (a hold's, left; empty where all
    were put back) that a model_guard still holds are noted in ``_stale`` if the counter ``moved`` in the hold's
    block: what their forward registered then is swept by the hold that puts them back, which may have begun after
    it."""
    if _stale:
        for state in states:
            _stale.discard(id(state.module))
    try:  # the modules with a hook of any kind, found in C (0.2 us a module; a Python loop over the dicts cost 0.65)
        hooked = list(compress(states, map(any, map(_HOOKS_OF, map(_ATTRS_OF, states)))))
    except Exception:  # a module made without nn.Module.__init__ (a dict missing)
        hooked = states
    for state in hooked:
        _drop_hooks(state.module.__dict__, state.since, until, state.foreign)
    for obj in objects:
        entry = _held.get(id(obj))
        if entry is None:
            _stale.discard(id(obj))  # released without a state put back (an error while entering)
        elif moved and type(entry) is ModuleState and entry.holders > entry.runs:
            _stale.add(id(obj))


def _drop_hooks(attrs: dict, since: int, until: int, foreign: Any) -> None:
    """The hooks of a module (``attrs``, its ``__dict__``) whose keys (:class:`~torch.utils.hooks.RemovableHandle`
    ids, from one counter) are ``since`` or later and below ``until`` removed from each of its hook dicts, with their
    keys in the companion dicts (``with_kwargs``, ``always_called``), but salience's own and the ``foreign`` keys
    (:func:`_foreign`). A key past ``until`` was not given in the block either: another process's counter gave it (a
    model pickled whole with its hooks, a Ray actor's copy)."""
    for name in _HOOK_DICTS:
        hooks = attrs.get(name)
        if not hooks or not isinstance(hooks, dict):
            continue
        # a copy at once (in C): another thread may add its hook meanwhile
        for key in [k for k, h in tuple(hooks.items())
                    if type(k) is int and since <= k < until and k not in foreign and not _own_hook(h)]:
            hooks.pop(key, None)
            for companion in _COMPANIONS:
                extra = attrs.get(companion)
                if extra:
                    extra.pop(key, None)


def _foreign(attrs: dict, since: int) -> Any:
    """The keys of a module's hooks (``attrs``, its ``__dict__``) that are ``since`` (the counter when its state is
    recorded) or later: another process's counter gave them (a model pickled whole with the user's hooks, a Ray
    actor's copy), and this one's reaches them in some later block, which must not sweep them (:func:`_drop_hooks`)."""
    try:
        dicts = _HOOKS_OF(attrs)
        if not any(dicts):  # in C, as _unhook's look (most modules: none)
            return _NO_KEYS
    except Exception:  # a module made without nn.Module.__init__ (a dict missing)
        return _NO_KEYS
    return frozenset(k for d in dicts if isinstance(d, dict) for k in tuple(d) if type(k) is int and k >= since) \
        or _NO_KEYS


def _own_hook(hook: Any) -> bool:
    """Whether ``hook`` is salience's own, which salience removes itself: scoped to its thread
    (:func:`~salience._core.autograd.this_thread`) or an observer (:func:`~salience._core.fingerprint.observer`)."""
    return getattr(hook, "salience_thread", None) is not None or getattr(hook, "salience_observer", False) is True


# every hook dict of a module; the companions hold flags under the same keys. Not torch's global module hooks
# (``register_module_forward_hook``): the process's, which any thread registers (a profiler's, for its block), and a
# key says when a hook was registered, not by whom
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_COMPANIONS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_HOOKS_OF = operator.itemgetter(*_HOOK_DICTS)
_NO_KEYS: frozenset = frozenset()
_ATTRS_OF = operator.attrgetter("module.__dict__")


@contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters (its ``torch.compile`` wrappers running their
    original modules eagerly) for the block, then restore it.

    Restores every module's train/eval flag, every parameter's ``requires_grad``, ``.grad`` and
    data (storage and strides: a channels-last run is undone), any buffer written in place, registered,
    replaced, deleted or filled (a ``None`` slot), the modules' plain attributes (one level; see the module's
    docstring for torch.nn's own layers and the limits), and each parameter's and buffer's Python attributes
    (those ``torch.compile`` sets on the tensors it traces are removed), and takes off the hooks registered in the
    block on the model's modules (salience's own excepted; torch's global module hooks, the process's, stay), also
    if the block raises. A caller's ``torch.autocast`` is off in the block (this thread's): the passes run in the
    precision of salience's ``precision=`` option (fp32 unless asked), which enters its own autocast inside.

    The guard holds each module and parameter, not the model: nested calls (SmoothGrad around
    vanilla), threads explaining the same model, and threads explaining two models that share
    modules (two heads on one backbone) share one saved state per module and parameter, put back
    when the last guard holding it leaves. Holding the model only, a thread that entered while
    another held the shared backbone recorded the other's eval mode and frozen flags as the
    user's and put them back last: the backbone stayed in eval mode, its parameters frozen.
    """
    me = threading.get_ident()
    hold: list = []  # this block's hold, once held and counted (see _enter_guard)
    try:  # inside: a Ctrl-C as calmly ends still releases what was held
        calmly(_enter_guard, model, me, hold)
        with autocast_off():
            yield model
    finally:
        try:  # a Ctrl-C before calmly deferred it (at its call) left all to do: done once more (see run_guard)
            calmly(_leave_guard, me, hold)
        except BaseException:  # not only KeyboardInterrupt: the user's SIGINT handler may raise anything (sys.exit)
            calmly(_leave_guard, me, hold)
            raise


def _enter_guard(model: nn.Module, me: int, box: list) -> None:
    """A model_guard block of thread ``me`` entered: counted in ``_guarding`` and ``model`` held
    (:func:`_enter_thread`); the hold is appended to ``box`` once both are done, and not at all on an error."""
    with _lock:
        _guarding[me] = _guarding.get(me, 0) + 1
    _local.fresh, _local.marking = None, {}  # the copies this entry takes or compares, for a Found right after it
    try:
        _enter_thread(model, me, box)
    except BaseException:
        if not box:
            with _lock:
                _unguard(me)
        raise
    finally:
        _local.fresh, _local.marking = _local.marking if box else None, None


def _leave_guard(me: int, box: list) -> None:
    """The model_guard block whose hold is in ``box`` left (nothing if ``box`` is empty: it was not
    entered, or this ran already)."""
    _local.fresh = None  # a Found after this exit compares the values itself (:func:`_trusted`)
    if box:
        with _lock:
            _unguard(me)
            _leave(box.pop())


def _unguard(me: int) -> None:
    """One open model_guard block of thread ``me`` fewer (under the lock)."""
    _guarding[me] -= 1
    if not _guarding[me]:
        del _guarding[me]


def _enter_thread(model: nn.Module, me: int, box: list) -> None:
    """Hold ``model`` for a model_guard block of thread ``me``: the thread's open hold of it counts one more
    block if it holds the same modules and parameters (the model's tree did not change since), else
    :func:`_enter`. The hold is appended to ``box``."""
    modules, params = _walk(model)
    objects = modules + params
    key = (me, id(model))
    with _lock:
        hold = _threads.get(key)
        if hold is not None and len(hold[1]) == len(objects) and all(map(operator.is_, hold[1], objects)):
            hold[2] += 1
            box.append(hold)
            return
    _enter(model, modules, params, box, key)


def _leave(hold: list) -> None:
    """One block fewer sharing ``hold`` (under the lock); the last releases its objects."""
    hold[2] -= 1
    if hold[2] == 0:
        if _threads.get(hold[0]) is hold:
            del _threads[hold[0]]
        _release(hold[1], start=hold[3])


def _enter(model: nn.Module, modules: list, params: list, box: list, key: Optional[tuple[int, int]]) -> None:
    """Hold ``model``'s ``modules`` and ``params`` (each one no guard held: its state recorded, then the
    model put in eval mode with frozen parameters); the hold, ``[key, objects, 1, start]`` (``start``: see
    :func:`_release`), is appended to
    ``box``, and registered as the thread's hold of the model under ``key`` if it has none (``None``: a run
    guard's, which nested blocks do not share)."""
    objects = modules + params
    held: list = []
    start = _Handle.next_id  # see _unhook
    with _lock:
        try:  # also an error part way: what was counted is released (a state not yet captured is None)
            new: list = []
            _hold(objects, held, new)
            if new:
                _refuse_inference_tensors(model, new)
                wrapper = _compiled_wrapper_class()
                for o in new:  # a module or parameter no guard held: recorded, then the model put in eval mode
                    _capture(o, wrapper, _held[id(o)])
                if wrapper is not None:
                    for o in new:
                        _held[id(o)].run_eagerly()
                _eval(model, modules)
                _refuse_mixed_batches(model, new)
                for p in params:
                    if p.requires_grad:
                        p.requires_grad_(False)
            hold = [key, objects, 1, start]
            box.append(hold)  # from here on the caller releases it
            if key is not None and key not in _threads:
                _threads[key] = hold
        except BaseException:
            if not box:
                _release(held)
            raise


def _refuse_inference_tensors(model: nn.Module, new: list) -> None:
    """A model made (or loaded) under ``torch.inference_mode()`` holds inference tensors, which keep
    no version counter and cannot be saved for a backward pass: every method failed with torch's
    raw RuntimeError ("Inference tensors do not track version counter"). A lazy module's uninitialized
    parameters (torch's raw ValueError before) are refused too. Checked on the modules and
    parameters no guard held yet (``new``): inside a call, a forward run under inference mode may
    replace a buffer with an inference tensor, which the outer guard puts back at its end.

    Only ``new``'s own tensors are looked at (a module's direct parameters and buffers), and nothing
    when all is held already: walking every named parameter and buffer of the model under the lock
    cost each call 0.66 ms on resnet50 even then (each guard of a dataset run's calls, +50%)."""
    lazy = nn.parameter.UninitializedTensorMixin
    for o in new:
        for tensors in (o._parameters.values(), o._buffers.values()) if isinstance(o, nn.Module) else ((o,),):
            for t in tensors:  # is_inference() after the lazy check: an uninitialized parameter raises there
                if t is not None and (isinstance(t, lazy) or t.is_inference()):
                    _refuse_tensor(model, t, isinstance(t, lazy))


def _refuse_tensor(model: nn.Module, t: torch.Tensor, lazy: bool) -> None:
    """The refusal of ``model``'s tensor ``t`` (an uninitialized lazy parameter, or an inference tensor), by name."""
    name = next((n for n, u in list(model.named_parameters(remove_duplicate=False)) +
                 list(model.named_buffers(remove_duplicate=False)) if u is t), "?")
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if lazy:
        raise SalienceError(
            f"the model's {name!r} ({type(owner).__name__}) is not initialized yet: a lazy module takes its "
            "shapes from its first forward pass, which would change the model. Run one pass first, "
            "model(x) under torch.no_grad() with an input of the shape you will explain, then explain it")
    raise SalienceError(
        f"the model's {name!r} is an inference tensor: the model was built or loaded (or a forward pass "
        "stored it) under torch.inference_mode(), and such tensors can be neither tracked nor differentiated. Build or "
        "load the model outside inference_mode (torch.no_grad() is fine), or explain a copy made "
        "outside it: copy.deepcopy(model)")


@contextmanager
def run_guard(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`model_guard` for a whole dataset run: the model is saved and put in eval mode with frozen
    parameters once, and restored exactly once at the end (also on an exception or Ctrl-C).

    Every guard entered in the block (each method's call, batch after batch) only counts itself; when it
    leaves and only run guards hold a module or parameter, that object gets back its *baseline*, its
    state as this guard established it (recorded here, after eval mode and the frozen flags): what
    differs is put back (a buffer written in place is copied back, a flag, a mode, a parameter's data
    or strides, a ``.grad``, a tensor attribute), so each call starts as it would under a guard of its
    own. Guards of other threads share it as they share any guard's (counted per module and
    parameter); the baseline is put back only when no guard but run guards holds the object, never
    under another thread's running pass.

    A model the guard refuses (a graph exported in train mode) is not held: each call's guard refuses
    it, as without a run guard (a dataset run records the error per method).

    The block also keeps the channels-last copies of the model's 4-D weights for the run
    (:func:`salience._core.layouts.open_copies`: each call's channels-last pass copies a weight once a run, not once a
    call), dropped when it ends, by an exception or a Ctrl-C too: one entry point for a run over a model, which both
    dataset engines use."""
    box: list = []  # the run's hold, once held with its run counts raised
    copies: list = []  # the run's kept channels-last copies (layouts), once registered
    try:
        calmly(_enter_run, model, box, copies)
        yield model
    finally:
        # Inline, not a helper: a Ctrl-C at a helper's start (before its try) would leave the hold. One
        # arriving before calmly deferred it (at calmly's own start) left everything to do: done once more.
        # Any exception, not only KeyboardInterrupt: the user's SIGINT handler may raise anything (sys.exit);
        # an error of the exit itself left box empty (popped first), and the second call does nothing.
        try:
            calmly(_leave_run, box, copies)
        except BaseException:
            calmly(_leave_run, box, copies)
            raise


def _enter_run(model: nn.Module, box: list, copies: list) -> None:
    """Keep the run's channels-last copies (``copies``, :func:`salience._core.layouts.open_copies`), hold ``model``
    for a run guard and raise its objects' run counts (each one's baseline recorded by the first run guard); the hold
    is appended to ``box`` when all is done, and not at all on an error or a refused model."""
    layouts.open_copies(model, copies)
    try:
        modules, params = _walk(model)
        _enter(model, modules, params, box, None)
    except SalienceError:
        return
    except BaseException:
        if box:
            with _lock:
                _release(box.pop()[1])
        raise
    objects = box[0][1]
    counted: list = []
    with _lock:
        try:  # also an error part way: the run counts raised are lowered, the holds released
            wrapper = _compiled_wrapper_class()
            for o in objects:
                entry = _held[id(o)]
                if entry.baseline is None:
                    entry.baseline = _capture(o, wrapper)
                    if type(entry) is ModuleState and entry.attrs is None:
                        # the state recorded copied no dict (a torch.nn layer without hooks): nor does the baseline,
                        # which saw another thread's call mid-way (its instance forward, attention._NativeMHA) and put
                        # it back after each call, for good (the final restore had no dict to put back)
                        entry.baseline.attrs = None
                entry.runs += 1
                counted.append(o)
        except BaseException:
            for o in counted:
                entry = _held[id(o)]
                entry.runs -= 1
                if entry.runs == 0:
                    entry.baseline = None
            box.clear()
            _release(objects)
            raise


def _leave_run(box: list, copies: list) -> None:
    """The run guard whose hold is in ``box`` and copies in ``copies`` left (nothing of either that is empty: the
    model was refused, the copies shared with another run's, or this ran already)."""
    layouts.close_copies(copies)
    if box:
        with _lock:
            hold = box.pop()
            _release(hold[1], run=True, start=hold[3])


def _eval(model: nn.Module, modules: Optional[list] = None) -> None:
    """``model.eval()``, and a refusal of a graph that keeps train mode whatever the flags say
    (``modules``: ``list(model.modules())``).

    ``torch.export``'s ``ExportedProgram.module()`` refuses ``eval()`` (a raw NotImplementedError):
    its graph is fixed in the mode it was exported in, so only the flags are set. A graph exported
    in train mode (that flat module, or ``torch.export.unflatten`` of it, whose ``eval()`` succeeds)
    would compute BatchNorm with the batch's statistics, mixing the images, and draw Dropout.

    Where no class (nor instance) changes how ``train`` / ``eval`` switch the modules, the flags that are
    on are turned off directly, nothing done if none is (``eval()`` cost 0.54 ms on resnet50 in eval mode),
    and only modules that may have a ``graph`` are asked for it (a missing attribute costs a raised
    AttributeError in ``nn.Module.__getattr__``: 0.23 ms)."""
    if modules is None:
        modules = list(model.modules())
    kinds: dict[type, tuple[bool, bool]] = {}
    plain = type(model).eval is _M.eval and "eval" not in model.__dict__
    training = False
    graphs = []
    for m in modules:
        kind = kinds.get(type(m))
        if kind is None:
            kind = kinds[type(m)] = _kind(type(m))
        attrs = m.__dict__
        if not kind[0] or "train" in attrs:
            plain = False
        if m.training:
            training = True
        if kind[1] or "graph" in attrs:
            graphs.append(m)
    if not plain:
        try:
            model.eval()
        except NotImplementedError:
            for m in modules:
                m.training = False
    elif training:
        for m in modules:
            if m.training:
                m.training = False
    for m in graphs:
        graph = getattr(m, "graph", None)  # torch.fx.GraphModule, torch.export.unflatten's modules
        op = train_mode_op(graph) if isinstance(graph, torch.fx.Graph) else None
        if op is not None:
            name = next((n for n, u in model.named_modules() if u is m), "?")
            where = "the model's graph" if name == "" else f"the graph of its submodule {name!r}"
            raise SalienceError(
                f"{where} was exported in train mode ({op} with training on), and an exported graph keeps "
                "that mode: BatchNorm would mix the images of a batch and Dropout draw at random. Export it "
                "after model.eval()")


def _kind(cls: type) -> tuple[bool, bool]:
    """Whether ``cls``'s ``train`` switches its modules as nn.Module's does (no override of ``train``,
    ``children``, ``named_children``, ``__setattr__``), and whether an instance may have a ``graph`` other
    than in its ``__dict__`` (a class attribute or property, a custom ``__getattr__``)."""
    switches = cls.train is _M.train and cls.children is _M.children and \
        cls.named_children is _M.named_children and cls.__setattr__ is _M.__setattr__
    graph = getattr(cls, "graph", None) is not None or cls.__getattr__ is not _M.__getattr__ or \
        cls.__getattribute__ is not _M.__getattribute__
    return switches, graph


def _refuse_mixed_batches(model: nn.Module, new: list) -> None:
    """A BatchNorm without running statistics (``track_running_stats=False``) normalizes by the
    statistics of the batch it is given, in eval mode too: the images of a pass (a batch, or the
    noisy copies / masked images a method runs together) changed each other's maps, silently. Such
    a layer (among ``new``, the modules no guard held) gets a forward pre-hook for the block that
    refuses a pass of more than one image."""
    names: Optional[dict[int, str]] = None
    for m in new:
        # the buffer read from the module's dict (``m.running_mean`` went through nn.Module.__getattr__: 15 us a call
        # on resnet18's 20 layers), the attribute where it is no buffer there (a subclass's property)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _running_mean(m) is None:
            if names is None:
                names = {id(u): n for n, u in model.named_modules()}
            state = _held[id(m)]
            if not state.handles:
                state.handles = []
            state.handles.append(m.register_forward_pre_hook(_one_image_per_pass(names.get(id(m), "?"))))


def _running_mean(m: nn.Module) -> Any:
    """``m.running_mean``, read from the module's buffers (through nn.Module.__getattr__ it cost 15 us a call on
    resnet18's 20 layers), or as the attribute where it is no buffer there (a subclass's property)."""
    found = m.__dict__.get("_buffers", _EMPTY).get("running_mean", _MISSING)
    return m.running_mean if found is _MISSING else found


def _one_image_per_pass(name: str) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        # only the passes of a thread inside a guard (salience's): the user's own batch in another thread is theirs
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] > 1 and threading.get_ident() in _guarding:
            raise SalienceError(
                f"the model's BatchNorm {name!r} has no running statistics (track_running_stats=False): even in "
                f"eval mode it normalizes by the statistics of the batch it is given, so the {x.shape[0]} images "
                "of this pass would change each other's maps. Explain one image at a time (x[i:i + 1]) and pass "
                "chunk=1 to the methods that run several copies of it per pass (SmoothGrad, Integrated "
                "Gradients, occlusion, RISE, Score-CAM, Ablation-CAM); or give the layer running statistics")
    return hook


def train_mode_op(graph: Any) -> Optional[str]:
    """The first operation of a ``torch.fx`` graph (``torch.export``'s ATen graph) that runs BatchNorm
    or Dropout in train mode (its ``training`` argument fixed to ``True``), or ``None``."""
    for node in graph.nodes:
        name = str(node.target) if node.op == "call_function" else ""
        if ("batch_norm" in name and len(node.args) > 5 and node.args[5] is True) or \
                ("dropout" in name and len(node.args) > 2 and node.args[2] is True):
            return name
    return None


def check_python_model(model: nn.Module, method: str, why: str) -> None:
    """Refuse what is no ``nn.Module``, and a model with TorchScript in it: an interception mode
    (backprop rules, attention capture) cannot see inside compiled graphs. ``why`` ends the message
    (what the method would miss there)."""
    script = torch.jit.ScriptModule
    if not any(isinstance(m, script) for m in modules_of(model)):  # raises the SalienceError for no nn.Module
        return
    for name, m in model.named_modules():  # the name for the message
        if isinstance(m, script):
            where = "the model is" if name == "" else f"its submodule {name!r} is"
            raise SalienceError(
                f"{method} cannot be applied to TorchScript: {where} a torch.jit.ScriptModule, {why}. "
                "Pass the original Python nn.Module instead"
            )


class Found:
    """The model's own state as the call found it (what a forward may keep for its next call: a recurrent
    ``self.h = ...``, a counter, a tensor or a buffer it writes in place), put back before each of the call's
    passes (:meth:`before_pass`) and when the call's passes end (a context manager, also on an exception), so that
    every perturbed copy is scored by the model the user called, not by the
    state the call's previous pass left (session 49: occlusion's window ``k`` saw window ``k - 1``'s pass's state; the
    model guard puts the user's state back only when the call ends).

    Recorded right after the call's :func:`~salience._core.guard.model_guard` is entered (eval mode set), by the
    guard's own record (:func:`~salience._core.guard.record_state`, put back by the guard's own
    ``ModuleState.put_back``): the plain attributes (one level deep), parameters and submodules by name (session 50
    review: a head swapped, a layer made on a first call) and buffers of the modules not from ``torch.nn``
    (whose layers in eval mode write nothing), as the model guard puts them back after a call: the contents of each
    list, dict, set, ``collections`` deque, defaultdict and Counter (exactly those types, ``self.hist.append(y)``;
    a subclass, a test's log of the passes, is not copied), each plain tensor among the attributes written in place,
    an inference tensor (no version counter: a
    forward under ``torch.inference_mode()``) by its values; here each copied whatever its size (the guard's
    containers stop at 1024 items; as Ablation-CAM's split, session 48), so that no pass sees what a pass before left that the
    call's end would undo (session 49 review). A copy over 1 MiB is kept across calls while its tensor holds its values
    (:func:`_kept`, session 51: a constant lookup table of 100 MiB cost each SmoothGrad call its copy, 84 ms of an
    88.5 ms call on an AMD EPYC (medians), 3.66 ms now, ``benchmarks/found-s51.md``; it holds that memory while the table lives). The
    tensors among the containers' items, NumPy arrays and each tensor's storage as the model guard records them
    (session 51). A buffer of a
    ``torch.nn`` layer that the model's own code writes is put back from the guard's copy
    (:func:`~salience._core.guard.held_values`), or from a copy of the record's own where the guard's is not of the
    state found (a call nested in another's guard, SmoothGrad's chunks or the user's block, finds it written since:
    the outer call's put-back is a write too; session 50 review: refused before). A TorchScript module's attributes
    and buffers are read and put back through TorchScript (:class:`_Scripted`, session 50; before, skipped).

    Each pass the record is compared as whole lists in C (:meth:`_moved`: the modules' dicts with their copies, the
    tensors' version counters, the containers with theirs, the buffers by name and identity; session 50), and only
    the modules that differ are put back. Where nothing changed, per pass (AMD EPYC, core 1, one thread, load 4-6,
    medians of 5 interleaved rounds, ``benchmarks/found-s50.md``): a transformers ViT-S 0.036 -> 0.018 ms, timm's
    vit_small 0.039 -> 0.022, resnet50 0.025 -> 0.018, against a pass of 110 ms an image; 2000 modules of the user's
    1.07 -> 0.54 ms, each with a list and a dict 4.5 -> 0.96. The record, once a call: 0.36, 0.42, 0.28 ms."""

    def __init__(self, model: nn.Module) -> None:
        own, layers, scripts = [], [], []
        kinds: dict = {}  # each class's kind, told once a call (0.2 us a module: a third of the record's cost on timm)
        # one walk of the modules alone (the guard's quick one, fingerprint._modules: 0.07 ms on timm's vit_small,
        # model.modules() 0.15; modules_of walks the parameters too: 0.36 ms on a scripted resnet50, its wrappers'
        # dicts slow, session 50 review): the model's own modules; torch.nn's layers holding buffers; TorchScript's (no
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
        # added on a first call or swapped: session 50 review)
        # the large copies the guard's entry just took or compared, taken as they are (:func:`_trusted`), once
        _local.trusted, _local.fresh = getattr(_local, "fresh", None), None
        try:
            self.record = record_state(own, containers=True, inference=True, named=True) if own else []
        finally:
            _local.trusted = None
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
                       if held_values(e[0], e[1], e[2], e[3]) is None}
        self.versions = sum(map(_VERSION, self.buffers))
        self.scripted = _Scripted(scripts) if scripts else None
        self._flat()

    def _flat(self) -> None:
        """The record's pieces as flat lists, each compared with its copy in C in one go each pass (session 50: a
        Python loop over the modules, 2000 modules of the user's each with a list and a dict, cost 5 ms a pass; the
        record's own :func:`state_changes` told a change as before). ``owners``: each piece's module, by its index
        in the record, for the modules put back where one differs."""
        self.dicts, self.saved = [r.module.__dict__ for r in self.record], [r.attrs for r in self.record]
        # the dicts of parameters and submodules (the same objects in both: compared with copies of their own)
        self.owned = [r.attrs[k] for r in self.record for k in ("_parameters", "_modules")]
        self.owned_copies = [c for r in self.record for c in (r.params, r.children)]
        self.owned_owners = [i for i in range(len(self.record)) for _ in range(2)]
        # each tensor's storage (``self.buf.data = t`` moves no version counter: session 51)
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
            self.large = _put_back_tensors(self.large)
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
        if self.large and any(_samples_moved(t, copy) for _, t, _, copy in self.large):
            self.large = _put_back_tensors(self.large)
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
                same = list(map(_same_contents, count_copies, counts))
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
        if self.stored and not all(_same_storage(t, alias) for t, alias, _ in self.stored):
            moved.update(i for t, alias, i in self.stored if not _same_storage(t, alias))
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
    """The NumPy arrays and inference tensors over :data:`_COPY_LIMIT` bytes among the tensors of :class:`Found`'s
    ``record`` (no version counter: each comparison reads them whole), taken out of their modules' records, as
    :func:`_tensor_records`' ``(name, value, None, copy)``: :meth:`Found.before_pass` compares them by samples
    (:func:`_samples_moved`) and :meth:`Found.__exit__` whole (review of session 52: compared whole before each
    pass, a 100 MiB array made SmoothGrad of 8 chunks 39 -> 709 ms, occlusion 40 -> 822 ms, AMD EPYC, one core, loaded;
    an informal run of one call each, not a benchmark under the lock; after: 147 and 160 ms). Three whole comparisons
    a call: the guard's entry (Found takes the copy it compared: :func:`_trusted`, session 53; four before), Found's
    end and the guard's exit."""
    large = []
    for r in record:
        if r.tensors and any(version is None and _large_copy(copy) for _, _, version, copy in r.tensors):
            large += [e for e in r.tensors if e[2] is None and _large_copy(e[3])]
            r.tensors = tuple(e for e in r.tensors if not (e[2] is None and _large_copy(e[3]))) or _NO_TENSORS
    return large


def _large_copy(copy: Any) -> bool:
    """Whether ``copy``, a record's copy of a value without version counter, is one over :data:`_COPY_LIMIT` bytes."""
    return copy is not None and type(copy) is not _Sampled and copy.nbytes > _COPY_LIMIT


def _samples_moved(t: Any, copy: Any) -> bool:
    """Whether the NumPy array or inference tensor ``t`` no longer holds the values of ``copy`` at
    :data:`_KEPT_SAMPLES` places spread evenly over it (or its shape or dtype changed): :class:`Found`'s check before
    each pass, a write of a few values elsewhere seen by the next passes and put back at the call's end."""
    if t.shape != copy.shape or t.dtype != copy.dtype:
        return True
    if isinstance(t, torch.Tensor):
        return not _samples_same(t, copy)
    return not _Sampled(copy).same(t)


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


class _Scripted:
    """The state of a model's TorchScript modules (``torch.jit.script`` / ``trace``), which keep it in TorchScript's
    attributes, not in a ``__dict__`` (session 50: :class:`Found` skipped them, so each perturbation pass saw the one
    before's writes, and the call's end left them; the model guard puts back only their buffers). Read and written
    through the module's ``_c`` (``getattr`` / ``setattr``; 0.2 us a read): each tensor attribute and buffer (by
    identity, version counter and a copy: a buffer's the model guard's own where it holds one of the same version,
    :func:`held_values`, session 50 review; an inference tensor by its values), each list, dict or tuple (a read gives a
    fresh copy of the whole, nested ones too: compared with ``==``, put back by ``setattr``, which gives the module a new
    list), and each other attribute (a number, a flag, a string, ``None``) that some method of the model assigns
    (``prim::SetAttr`` in its graphs; every one where a method calls Python, ``@torch.jit.ignore``); the parameters and submodules are the model guard's. What TorchScript keeps as an
    object of a scripted class cannot be copied: named in a warning, once per module."""

    def __init__(self, modules: list, guard: bool = False) -> None:
        plans = [_script_plan(m) for m in modules]
        assigned = set().union(*(p[1] for p in plans))  # any module's method may assign another's (by name: safe side)
        # a method left to Python (``@torch.jit.ignore``: ``prim::PythonOp``) may assign any attribute of any module
        # without a prim::SetAttr (``self.calls = self.calls + 1``: session 50 review): then every one is read
        python = any(p[3] for p in plans)
        self.tensors, self.values = [], []
        for m, (names, _, objects, _, _) in zip(modules, plans):
            c = m._c
            for name, kind in names if not guard else _guard_names(m):
                if kind != "other" and kind != "mutable":
                    self.tensors.append(_script_tensor(c, name, m, python or name in assigned, guard))
                elif kind == "mutable" or python or name in assigned:
                    self.values.append((c, name, c.getattr(name)))
            if objects and m not in _SCRIPT_TOLD:
                _SCRIPT_TOLD.add(m)
                import warnings

                from salience._core.errors import user_stacklevel

                warnings.warn(f"salience cannot copy {', '.join(objects)} of the TorchScript module "
                              f"{getattr(m, 'original_name', type(m).__name__)!r}: what its methods change there during "
                              "salience's passes is not put back between them, nor after the call",
                              stacklevel=user_stacklevel())

    def put_back(self) -> None:
        """Each attribute put back where it differs from the record (a tensor replaced, or written in place); a buffer
        written in place whose copy the model guard no longer holds (:func:`held_values`) told, as it stays written
        (:func:`_tell_not_put_back`)."""
        lost: list = []
        for entry in self.tensors:
            c, name, t, version, copy, assigned, m, found = entry
            if assigned and c.getattr(name) is not t:
                c.setattr(name, t)
            if version is None:
                if _values_moved(t, copy):
                    with torch.inference_mode():
                        t.copy_(copy)
            elif t._version != version:
                copy = copy if copy is not None else held_values(m, name, t, found)
                if copy is None:
                    lost.append((m, name, t))
                    continue
                with torch.no_grad():
                    t.copy_(copy)
                if _KEPT:
                    _kept_again(t, copy)
                entry[3] = t._version
        self._put_back_values()
        for m, name, t in lost:  # last: a warning made an error raises
            _tell_not_put_back(m, [(name, t)])

    def _put_back_values(self) -> None:
        """Each attribute other than a tensor put back where it differs from the record (``==`` and its type)."""
        for c, name, v in self.values:
            now = c.getattr(name)
            try:
                same = type(now) is type(v) and bool(now == v)
            except Exception:  # noqa: BLE001 - an item's == raised (a tensor in another's place)
                same = False
            if not same:
                c.setattr(name, v)


def _script_tensor(c: Any, name: str, m: nn.Module, assigned: bool, guard: bool) -> list:
    """:class:`_Scripted`'s record of the tensor attribute ``name`` of the TorchScript module ``m`` (``c``, its
    ``_c``): ``[c, name, tensor, version, copy, assigned, m, version]``. No copy of a buffer the model guard holds a
    copy of at this version (a BatchNorm's: 159 on resnet50; that copy, :func:`held_values`, not one more: 0.8 ms a
    call); over :data:`_COPY_LIMIT` bytes the copy kept across calls, as the model guard's other records (session 53:
    the guard took none, and one written in place stayed written, told; TorchScript gives the same Python object at
    each read while the module holds the tensor)."""
    t = c.getattr(name)
    try:
        version = t._version
    except Exception:  # noqa: BLE001 - an inference tensor: no version counter
        version = None
    if not guard and version is not None and held_values(m, name, t, version) is not None:
        return [c, name, t, version, None, assigned, m, version]
    if not _large_tensor(t):
        copy = t.detach().clone()
    else:
        copy = _kept(t, version) if version is not None else _kept_values(t)
    return [c, name, t, version, copy, assigned, m, version]


def _script_plan(m: nn.Module) -> tuple:
    """What :class:`_Scripted` reads of the TorchScript module ``m``: ``(name, "buffer" / "tensor" / "mutable" /
    "other")`` of each attribute not a parameter or submodule, the names its methods assign (``prim::SetAttr``), the names of the scripted
    class objects it holds (not copied), whether a method calls Python (``prim::PythonOp``: an ignored method, which
    may assign any attribute). Made once per module (TorchScript's attributes and methods are fixed once
    compiled): about 0.1 ms a module."""
    plan = _SCRIPT_PLANS.get(m)
    if plan is None:
        c = m._c
        try:  # torch's own reading of a scripted module's attributes (private: refused if it goes)
            found = torch._C._jit_debug_module_iterators(c)
        except Exception:  # noqa: BLE001
            return (), frozenset(), ("the attributes (this torch cannot list them)",), False, frozenset()
        skip = {n for n, _ in found["named_parameters"]} | {n for n, _ in found["named_children"]}
        buffers = {n for n, _ in found["named_buffers"]}
        names, objects = [], []
        for name, v in found["named_attributes"]:
            if name in skip:
                continue
            if isinstance(v, torch.Tensor):
                names.append((name, "buffer" if name in buffers else "tensor"))
            elif isinstance(v, (list, dict)):
                names.append((name, "mutable"))
            elif v is None or isinstance(v, _SCRIPT_VALUES):  # changed by an assignment only (a tuple too)
                names.append((name, "other"))
            else:  # an object of a scripted class (its own attributes written in place: ``self.box.n += 1``)
                objects.append(f"the scripted class object {name!r}")
        graphs = [c._get_method(method).graph for method in c._method_names()]
        assigned = {node.s("name") for graph in graphs for node in graph.findAllNodes("prim::SetAttr")}
        python = any(graph.findAllNodes("prim::PythonOp") for graph in graphs)
        # the lists and dicts a method may change in place: read, then given to anything but a read (``append``,
        # ``_set_item``, a function call)
        mutated = {node.s("name") for graph in graphs for node in graph.findAllNodes("prim::GetAttr")
                   if any(use.user.kind() not in _SCRIPT_READS for use in node.output().uses())}
        plan = _SCRIPT_PLANS[m] = (tuple(names), frozenset(assigned), tuple(objects), python, frozenset(mutated))
        global _script_epoch
        _SCRIPT_SEEN[0].update(assigned)
        _SCRIPT_SEEN[1].update(mutated)
        _SCRIPT_SEEN[2] = _SCRIPT_SEEN[2] or python
        _script_epoch += 1
    return plan


def _guard_names(m: nn.Module) -> tuple:
    """The attributes of the TorchScript module ``m`` the model guard reads and puts back (:class:`_Scripted` with
    ``guard``): each tensor that is no buffer (the guard's own record puts the buffers back), each number, flag,
    string or tuple some method of a TorchScript module planned in the process assigns (``prim::SetAttr``: a parent's
    method may assign its child's; the parent is planned first, its modules taken in order), each list or dict some
    method may change (``append``, an item set, given to a call); every one once a method calls Python. Not each list
    and dict of every module (resnet50's 53 convolutions' ``_reversed_padding_repeated_twice``: fresh copies each
    read, 2 ms a call of the guard's on a scripted resnet50). Kept per module while no new plan was made."""
    kept = _GUARD_NAMES.get(m)
    if kept is not None and kept[0] == _script_epoch:
        return kept[1]
    plan = _script_plan(m)[0]  # first: a new plan adds to what the process has seen
    assigned, mutated, python = _SCRIPT_SEEN
    names = tuple((name, kind) for name, kind in plan if kind == "tensor" or kind != "buffer" and (
        python or (name in mutated if kind == "mutable" else name in assigned)))
    _GUARD_NAMES[m] = (_script_epoch, names)
    return names


_SCRIPT_MODULE = torch.jit.ScriptModule
# the uses of a list or dict attribute that leave it as it is (:func:`_script_plan`); any other (``aten::append``,
# ``aten::_set_item``, ``prim::CallFunction``, an item read that may be a list changed in turn) may change it
_SCRIPT_READS = frozenset({"aten::len", "aten::__contains__", "aten::eq", "aten::ne", "aten::format", "prim::Print",
                           "aten::str", "aten::__is__", "aten::__isnot__"})
# every plan's assigned names, changed lists and dicts, and whether a method calls Python (:func:`_guard_names`), and
# how many plans were made (the guard's choice of names per module is kept while it holds)
_SCRIPT_SEEN: list = [set(), set(), False]
_script_epoch = 0
_GUARD_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SCRIPT_VALUES = (bool, int, float, complex, str, tuple, torch.device, torch.dtype, torch.layout, torch.memory_format)
_SCRIPT_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SCRIPT_TOLD: "weakref.WeakSet" = weakref.WeakSet()  # the modules whose scripted class objects a warning named


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a forward hook or pre-hook or an instance ``forward`` (whose attributes the model guard
    records even for a torch.nn layer: a hook may set them, ``m.count = n + 1``)."""
    d = m.__dict__
    return "forward" in d or bool(d.get("_forward_hooks") or d.get("_forward_pre_hooks"))


def user_module(m: nn.Module) -> bool:
    """Whether ``m`` is no layer of ``torch.nn`` (whose layers in eval mode write no state in a forward)."""
    return not type(m).__module__.startswith("torch.nn.")
