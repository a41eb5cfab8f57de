"""TorchScript modules: their attributes read and put back through TorchScript.

A ``torch.jit.script`` / ``trace`` module keeps its attributes in TorchScript, not in a ``__dict__``.
:class:`Scripted` reads each tensor attribute and buffer (by identity, version counter and a copy; a buffer the model
guard holds a copy of at the same version through :func:`~salience._core.guard.holds.held_values`), each list, dict
or tuple, and each other attribute some method assigns, and puts back what differs. :func:`script_plan` reads once
per module which attributes exist and which its methods assign (``prim::SetAttr``) or may change in place;
:func:`guard_names` is the model guard's choice among them (a method that calls Python may assign any).

Limit: what TorchScript keeps as an object of a scripted class cannot be copied (a warning names it, once per
module)."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from salience._core.guard.holds import held_values
from salience._core.guard.records import tell_not_put_back
from salience._core.guard.values import KEPT, kept_again, kept_copy, kept_values, large_tensor, values_moved


class Scripted:
    """The state of a model's TorchScript modules (``torch.jit.script`` / ``trace``), which keep it in TorchScript's
    attributes, not in a ``__dict__`` (without this record each perturbation pass would see the one before's writes,
    and the call's end would leave them: the model guard's own record puts back only their buffers). Read and written
    through the module's ``_c`` (``getattr`` / ``setattr``; 0.2 us a read): each tensor attribute and buffer (by
    identity, version counter and a copy: a buffer's the model guard's own where it holds one of the same version,
    :func:`held_values`; an inference tensor by its values), each list, dict or tuple (a read gives a
    fresh copy of the whole, nested ones too: compared with ``==``, put back by ``setattr``, which gives the module a new
    list), and each other attribute (a number, a flag, a string, ``None``) that some method of the model assigns
    (``prim::SetAttr`` in its graphs; every one where a method calls Python, ``@torch.jit.ignore``); the parameters and submodules are the model guard's. What TorchScript keeps as an
    object of a scripted class cannot be copied: named in a warning, once per module."""

    def __init__(self, modules: list, guard: bool = False) -> None:
        plans = [script_plan(m) for m in modules]
        assigned = set().union(*(p[1] for p in plans))  # any module's method may assign another's (by name: safe side)
        # a method left to Python (``@torch.jit.ignore``: ``prim::PythonOp``) may assign any attribute of any module
        # without a prim::SetAttr (``self.calls = self.calls + 1``): then every one is read
        python = any(p[3] for p in plans)
        self.tensors, self.values = [], []
        for m, (names, _, objects, _, _) in zip(modules, plans):
            c = m._c
            for name, kind in names if not guard else guard_names(m):
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
        (:func:`tell_not_put_back`)."""
        lost: list = []
        for entry in self.tensors:
            c, name, t, version, copy, assigned, m, found = entry
            if assigned and c.getattr(name) is not t:
                c.setattr(name, t)
            if version is None:
                if values_moved(t, copy):
                    with torch.inference_mode():
                        t.copy_(copy)
            elif t._version != version:
                copy = copy if copy is not None else held_values(m, name, t, found)
                if copy is None:
                    lost.append((m, name, t))
                    continue
                with torch.no_grad():
                    t.copy_(copy)
                if KEPT:
                    kept_again(t, copy)
                entry[3] = t._version
        self._put_back_values()
        for m, name, t in lost:  # last: a warning made an error raises
            tell_not_put_back(m, [(name, t)])

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
    """:class:`Scripted`'s record of the tensor attribute ``name`` of the TorchScript module ``m`` (``c``, its
    ``_c``): ``[c, name, tensor, version, copy, assigned, m, version]``. No copy of a buffer the model guard holds a
    copy of at this version (a BatchNorm's: 159 on resnet50; that copy, :func:`held_values`, not one more: 0.8 ms a
    call); over :data:`COPY_LIMIT` bytes the copy kept across calls, as the model guard's other records (one written
    in place is put back; TorchScript gives the same Python object at each read while the module holds the tensor)."""
    t = c.getattr(name)
    try:
        version = t._version
    except Exception:  # noqa: BLE001 - an inference tensor: no version counter
        version = None
    if not guard and version is not None and held_values(m, name, t, version) is not None:
        return [c, name, t, version, None, assigned, m, version]
    if not large_tensor(t):
        copy = t.detach().clone()
    else:
        copy = kept_copy(t, version) if version is not None else kept_values(t)
    return [c, name, t, version, copy, assigned, m, version]


def script_plan(m: nn.Module) -> tuple:
    """What :class:`Scripted` reads of the TorchScript module ``m``: ``(name, "buffer" / "tensor" / "mutable" /
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


def guard_names(m: nn.Module) -> tuple:
    """The attributes of the TorchScript module ``m`` the model guard reads and puts back (:class:`Scripted` with
    ``guard``): each tensor that is no buffer (the guard's own record puts the buffers back), each number, flag,
    string or tuple some method of a TorchScript module planned in the process assigns (``prim::SetAttr``: a parent's
    method may assign its child's; the parent is planned first, its modules taken in order), each list or dict some
    method may change (``append``, an item set, given to a call); every one once a method calls Python. Not each list
    and dict of every module (resnet50's 53 convolutions' ``_reversed_padding_repeated_twice``: fresh copies each
    read, 2 ms a call of the guard's on a scripted resnet50). Kept per module while no new plan was made."""
    kept = _GUARD_NAMES.get(m)
    if kept is not None and kept[0] == _script_epoch:
        return kept[1]
    plan = script_plan(m)[0]  # first: a new plan adds to what the process has seen
    assigned, mutated, python = _SCRIPT_SEEN
    names = tuple((name, kind) for name, kind in plan if kind == "tensor" or kind != "buffer" and (
        python or (name in mutated if kind == "mutable" else name in assigned)))
    _GUARD_NAMES[m] = (_script_epoch, names)
    return names


SCRIPT_MODULE = torch.jit.ScriptModule
# the uses of a list or dict attribute that leave it as it is (:func:`script_plan`); any other (``aten::append``,
# ``aten::_set_item``, ``prim::CallFunction``, an item read that may be a list changed in turn) may change it
_SCRIPT_READS = frozenset({"aten::len", "aten::__contains__", "aten::eq", "aten::ne", "aten::format", "prim::Print",
                           "aten::str", "aten::__is__", "aten::__isnot__"})
# every plan's assigned names, changed lists and dicts, and whether a method calls Python (:func:`guard_names`), and
# how many plans were made (the guard's choice of names per module is kept while it holds)
_SCRIPT_SEEN: list = [set(), set(), False]
_script_epoch = 0
_GUARD_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SCRIPT_VALUES = (bool, int, float, complex, str, tuple, torch.device, torch.dtype, torch.layout, torch.memory_format)
_SCRIPT_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SCRIPT_TOLD: "weakref.WeakSet" = weakref.WeakSet()  # the modules whose scripted class objects a warning named
