"""Scope every change salience makes to a user's model, and always undo it.

While salience explains a model, :func:`model_guard` puts it in eval mode (BatchNorm neither mixes the samples of a
batch nor updates its running statistics; Dropout is off), turns off its parameters' ``requires_grad`` (only input
gradients are computed) and runs each ``torch.compile`` wrapper's original module eagerly (its cached graphs would
not see the hooks added after they were compiled). When the block ends, on success, on an exception or on Ctrl-C,
the model comes back as the guard found it:

- each module's train/eval flag; each parameter's ``requires_grad``, ``.grad``, data (storage and strides) and Python
  attributes;
- the buffers by name and in order (registered, replaced, deleted, a ``None`` slot filled, written in place: by its
  version counter, and by its values compared with the guard's copy at the exit, a BatchNorm's running statistics
  updated in train mode or a write through ``.data`` moving none), each tensor's storage;
- each module's plain attributes one level deep (a copy of its ``__dict__``), the tensors and NumPy arrays among
  them written in place, the contents of its lists, dicts, sets, deques, defaultdicts, Counters and OrderedDicts
  (up to 1024 items, one level more inside them), its parameters and submodules by name;
- a TorchScript module's attributes, read and written through TorchScript;
- the hooks its forward registered on the modules put back (salience's own and torch's global module hooks stay).

The guard holds each module and parameter, not the model: nested calls, threads explaining one model and models
sharing modules share one saved state of each, put back when the last guard holding it leaves. :func:`run_guard`
holds a model for a whole dataset run and puts its *baseline* back after each call. :class:`Found` puts the state a
call found back before each of a many-pass method's passes. :func:`record_state`, :func:`state_changes` and
:func:`put_back_state` are the same records for Ablation-CAM's split clean pass and the fx trace.

Limits (not put back): what a forward sets or registers on a torch.nn layer without hooks (``self.linear.cache =
x`` in the parent's forward); a container over 1024 items changed in place (a warning where its length changed),
containers nested deeper than two levels; a ``numpy.memmap`` or an object array over 1024 items written in place (a
warning where a write reaches a sampled place), a read-only array, a subclass of ndarray other than ``memmap``; a
write through ``.data`` of a few values of a plain tensor over 1 MiB that no sample reads, of any tensor on a
device, of a buffer that is a tensor subclass or requires grad (copied apart, put back by its version counter), and between a perturbation call's passes any write through ``.data`` (the call's end puts it back); a hook
on a parameter; an attribute or parameter replaced by one equal to it (``==``) keeps the new object; an attribute a
global module hook sets on a torch.nn layer without hooks of its own; what TorchScript keeps as an object of a
scripted class (a warning); what another thread of the user's sets on the model during the call is put back with
salience's (a key says when a hook was registered, not by whom), and a state-dict hook of a torch.nn layer without
other hooks whose key another process gave (a pickled model's) is swept once this process's counter reaches it. Each
room's docstring says the limits of its part.

The rooms, each importing only rooms above it in this table:

============== ====================================================================== ==============================
room           what it holds                                                          imports
============== ====================================================================== ==============================
``values``     the copies of large tensors and arrays kept across calls (``KEPT``,    (none)
               its cap), an entry's copy of the buffers (``Snapshot``), how values
               are compared (bit for bit, sampled)
``containers`` the copies of lists, dicts, sets and ``collections``' containers;      values
               a dict put back in place
``records``    the pieces of a module's record: tensor attributes, storages,          values, containers
               Python attributes of tensors, what is told as not put back
``holds``      the guards' registry of held modules and parameters (``registry``),    values, records
               a parameter's state (``ParamState``), the held copy of a buffer
``scripted``   TorchScript modules' attributes, read and put back through             values, records, holds
               TorchScript (``Scripted``), and which attributes to read
``hooks``      the hook dicts of a module, the keys a sweep leaves alone              (none)
``state``      a module's state (``ModuleState``) and the record of several           values, containers, records,
               modules: ``record_state`` / ``state_changes`` / ``put_back_state``     holds, scripted, hooks
``found``      ``Found``: the state a call found, put back before each pass           values, containers, records,
                                                                                      holds, scripted, state
``refusals``   eval mode and what a first hold refuses: a graph exported in train     containers, records, holds
               mode, inference tensors and lazy parameters, a BatchNorm without
               running statistics given several images (its hook)
``entry``      ``model_guard`` and ``run_guard``: the counted holds, the walk of      values, holds, hooks, state,
               the model, the hook sweep on release, Ctrl-C deferred                  refusals
============== ====================================================================== ==============================
"""
from __future__ import annotations

from salience._core.guard.containers import copy_contents
from salience._core.guard.entry import check_python_model, model_guard, modules_of, parameters_of, run_guard
from salience._core.guard.found import Found
from salience._core.guard.holds import ParamState, held_values
from salience._core.guard.refusals import train_mode_op
from salience._core.guard.state import (
    MODULE_OWN, ModuleState, put_back_state, record_state, settled, state_changes, user_module)
from salience._core.guard.values import forget_copies

__all__ = ["model_guard", "run_guard", "Found", "ModuleState", "ParamState", "check_python_model", "modules_of",
           "parameters_of", "train_mode_op", "held_values", "settled", "record_state", "state_changes", "put_back_state",
           "forget_copies", "user_module", "MODULE_OWN", "copy_contents"]
