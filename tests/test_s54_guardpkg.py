"""Session 54: the model guard is a package of rooms (``salience._core.guard``), read from the source with ``ast``.

- The package exports (``__all__``) every name the other modules of salience import from it, each the object its
  room defines; its ``__init__`` only imports.
- No room of the package takes another room's underscore-private names, nor does any other module of salience take
  one of the package's (``tests/test_architecture.py`` counts all of ``_core`` as one room, so it does not see these).
- The rooms import one another as the table of the package's docstring says, each only rooms above it (no cycle).
- Each piece of module state and each constant is defined in one room only; a tunable constant another room reads
  is read through its room's module (``values.COPY_LIMIT``), never bound again by ``from ... import``, so that
  patching it in its room changes what every room does.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from salience._core import guard
from salience._core.guard import containers, records, values

SRC = Path(__file__).resolve().parents[1] / "src" / "salience"
PACKAGE = SRC / "_core" / "guard"
ROOMS = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
PREFIX = "salience._core.guard"


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _outside() -> list[Path]:
    """The modules of salience outside the package that name it (the others cannot import from it)."""
    return [p for p in SRC.rglob("*.py") if PACKAGE not in p.parents and "guard" in p.read_text(encoding="utf-8")]


def _room_imports(path: Path) -> dict[str, set[str]]:
    """The rooms of the package that ``path`` imports, each with the names taken from it (``*module*`` for
    ``from salience._core.guard import room``: the module itself)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module == PREFIX:
            for a in node.names:
                if a.name in ROOMS:
                    found.setdefault(a.name, set()).add("*module*")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX + "."):
            found.setdefault(node.module.rsplit(".", 1)[1], set()).update(a.name for a in node.names)
    return found


def _module_level_names(path: Path) -> set[str]:
    """The names a module binds at its top level by assignment, definition or ``global`` (imports aside)."""
    tree = _tree(path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names.update(n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names)
    return names


def test_the_package_exports_every_name_the_rest_of_salience_imports():
    imported = set()
    for path in _outside():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module == PREFIX:
                imported.update(a.name for a in node.names)
    assert {"model_guard", "run_guard", "Found", "record_state", "MODULE_OWN", "copy_contents"} <= imported
    assert imported <= set(guard.__all__), imported - set(guard.__all__)
    defined = {room: _module_level_names(PACKAGE / f"{room}.py") for room in ROOMS}
    for name in guard.__all__:
        owners = [room for room, names in defined.items() if name in names]
        assert len(owners) == 1, (name, owners)
        room = __import__(f"{PREFIX}.{owners[0]}", fromlist=["_"])
        assert getattr(guard, name) is getattr(room, name), name
    init = _tree(PACKAGE / "__init__.py")
    assert [n for n in init.body if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr))] == \
        [n for n in init.body if isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__all__"]]


def _private_uses(path: Path, own: Optional[str]) -> list[str]:
    """The underscore-private names that ``path`` (the room ``own``, or ``None`` outside the package) takes from a room
    of the package other than its own: imported by name, or read as ``room._name``."""
    tree = _tree(path)
    aliases = {}
    found = []
    package = set()  # names bound to the package itself (``from salience._core import guard``)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "salience._core":
            package.update(a.asname or a.name for a in node.names if a.name == "guard")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX):
            room = node.module[len(PREFIX) + 1:]
            for a in node.names:
                if node.module == PREFIX and a.name in ROOMS:
                    aliases[a.asname or a.name] = a.name
                elif a.name.startswith("_") and room != own:
                    found.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in aliases and aliases[value.id] != own:
            found.append(f"{aliases[value.id]}.{node.attr}")
        elif isinstance(value, ast.Name) and value.id in package:  # guard._x
            found.append(f"guard.{node.attr}")
        elif isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id in package \
                and value.attr != own:  # guard.values._x
            found.append(f"{value.attr}.{node.attr}")
    return found


def test_no_room_takes_another_rooms_private_names():
    bad = {room: _private_uses(PACKAGE / f"{room}.py", room) for room in ROOMS + ["__init__"]}
    bad.update({str(p.relative_to(SRC)): _private_uses(p, None) for p in _outside()})
    assert not {k: v for k, v in bad.items() if v}


def test_the_rule_sees_both_forms_of_a_private_name(tmp_path):
    """The check itself: a private name imported from another room, or read through its module, is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from salience._core.guard.values import _same_bits, kept_copy\n"
                     "from salience._core.guard import values\n"
                     "values._KEEP_LIMIT\nvalues.KEPT\n"
                     "from salience._core import guard as g\ng.values._kept_lock\ng._held\ng.model_guard\n")
    assert _private_uses(probe, "state") == ["salience._core.guard.values._same_bits", "values._KEEP_LIMIT",
                                             "values._kept_lock", "guard._held"]
    assert _private_uses(probe, "values") == ["guard._held"]
    outside = tmp_path / "outside.py"  # a module outside the package: folding.py's import before
    outside.write_text("from salience._core.guard import _MODULE_OWN, record_state\n")
    assert _private_uses(outside, None) == ["salience._core.guard._MODULE_OWN"]


def _docstring_table() -> dict[str, str]:
    """The package docstring's table of rooms: room -> its "imports" cell, in the table's order (columns cut where
    the ``====`` line under the header says)."""
    lines = guard.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( =+)+", line)]
    assert len(rules) == 3, rules
    last = lines[rules[0]].rindex(" ") + 1  # the imports column starts after the last gap
    table: dict[str, str] = {}
    for line in lines[rules[1] + 1:rules[2]]:
        if not line.startswith(" "):
            room = line.split()[0].strip("`")
            table[room] = ""
        table[room] += " " + line[last:]
    return table


def test_the_rooms_import_as_the_package_docstring_says():
    """Each room imports exactly the rooms its row of the docstring's table names, all of them in rows above it."""
    table = _docstring_table()
    order = list(table)
    assert sorted(order) == ROOMS
    for room in ROOMS:
        uses = set(_room_imports(PACKAGE / f"{room}.py"))
        listed = set(re.findall(r"\w+", table[room])) - {"none"}
        assert uses == listed, (room, uses, listed)
        assert all(order.index(u) < order.index(room) for u in uses), room


def test_each_piece_of_state_and_each_constant_is_defined_in_one_room():
    defined: dict[str, list[str]] = {}
    for room in ROOMS:
        for name in _module_level_names(PACKAGE / f"{room}.py"):
            defined.setdefault(name, []).append(room)
    twice = {name: rooms for name, rooms in defined.items() if len(rooms) > 1}
    assert not twice
    assert _module_level_names(PACKAGE / "__init__.py") == {"__all__"}
    # the module state and the tunable constants, each in its one room
    for name, room in [("KEPT", "values"), ("_kept_bytes", "values"), ("_kept_lock", "values"),
                       ("copy_notes", "values"), ("COPY_LIMIT", "values"), ("_KEEP_LIMIT", "values"),
                       ("_KEPT_SAMPLES", "values"), ("CONTENTS_LIMIT", "containers"), ("registry", "holds"),
                       ("_lock", "entry"), ("_threads", "entry"), ("_guarding", "entry"), ("_stale", "entry"),
                       ("_SCRIPT_PLANS", "scripted"), ("_GUARD_NAMES", "scripted"), ("_script_epoch", "scripted")]:
        assert defined[name] == [room], name
    # a number constant is never bound again in another room by ``from room import NAME``: read as room.NAME
    numbers = {name for room in ROOMS for name in _module_level_names(PACKAGE / f"{room}.py")
               if type(getattr(__import__(f"{PREFIX}.{room}", fromlist=["_"]), name)) is int}
    assert {"COPY_LIMIT", "CONTENTS_LIMIT", "_KEEP_LIMIT", "_KEPT_SAMPLES"} <= numbers
    for room in ROOMS + ["__init__"]:
        for owner, names in _room_imports(PACKAGE / f"{room}.py").items():
            assert not names & numbers, (room, owner, names & numbers)


class _Holder(nn.Module):
    """A module of the user's with a tensor, an array, a list and an object array among its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.arange(64.0)  # 256 bytes
        self.array = np.arange(64.0)  # 512 bytes
        self.hist = [1, 2, 3]
        self.objects = np.array([object(), object(), object()], dtype=object)


def test_patching_a_limit_in_its_room_changes_what_every_room_does(monkeypatch):
    """The copy limit patched in ``values`` (100 bytes) reaches ``records``: the tensor and the array, under the real
    1 MiB, get the copies kept across calls; the cap patched there (300 bytes) keeps the tensor's 256, not the array's 512. The
    contents limit patched in ``containers`` (2 items) reaches ``records``' object arrays and the warning's number."""
    guard.forget_copies()
    m = _Holder()
    state = guard.ModuleState(m, None)
    assert id(m.table) not in values.KEPT and id(m.array) not in values.KEPT
    assert [k for k, _, items in state.contents if type(items) is int] == []
    monkeypatch.setattr(values, "COPY_LIMIT", 100)
    try:
        guard.ModuleState(m, None)
        assert id(m.table) in values.KEPT and id(m.array) in values.KEPT
        guard.forget_copies()
        monkeypatch.setattr(values, "_KEEP_LIMIT", 300)
        guard.ModuleState(m, None)
        assert id(m.table) in values.KEPT and id(m.array) not in values.KEPT  # 256 bytes under the cap, 512 over
    finally:
        guard.forget_copies()
    monkeypatch.setattr(values, "COPY_LIMIT", 1 << 20)
    monkeypatch.setattr(containers, "CONTENTS_LIMIT", 2)
    state = guard.ModuleState(m, None)
    assert [k for k, _, items in state.contents if type(items) is int] == ["hist"]
    assert type(records._array_record(m.objects)) is values.Sampled
    m.hist.append(4)
    with pytest.warns(UserWarning, match="only up to 2 items"):
        state.restore()
