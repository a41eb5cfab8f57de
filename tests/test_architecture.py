"""The house: folders are layers and imports point one way (docs/architecture.md), and functions
stay short. Read from the source with ``ast``, imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "salience"

# What each room may import from salience (prefixes; a room may always import itself).
CORE = ("salience._core",)
BASICS = CORE + ("salience.reduce", "salience.targets", "salience.rules", "salience.attention")
DEMO_LEAVES = ("salience.demo.data", "salience.demo.zoo")
ALLOWED: dict[str, tuple[str, ...]] = {
    "salience._core": CORE,
    "salience.reduce": CORE,
    "salience.rules": CORE,
    "salience.attention": CORE,
    "salience.targets": CORE + ("salience.reduce",),
    "salience.methods": BASICS + ("salience.methods",),
    "salience.render": CORE + ("salience.reduce", "salience.render"),
    "salience.loading": CORE + ("salience.loading",) + DEMO_LEAVES,
    "salience.demo.data": CORE,
    "salience.demo.zoo": CORE,
    "salience.evidence": BASICS + ("salience.methods", "salience.evidence", "salience.loading",
                                   "salience.render") + DEMO_LEAVES,
    "salience.compat": BASICS + ("salience.methods", "salience.loading", "salience.compat"),
    "salience.demo": BASICS + ("salience.methods", "salience.evidence", "salience.loading", "salience.render",
                               "salience.demo"),
    "salience.runs": BASICS + ("salience.methods", "salience.evidence", "salience.loading", "salience.render",
                               "salience.runs") + DEMO_LEAVES,
    "salience.explore": BASICS + ("salience.methods", "salience.evidence", "salience.loading", "salience.render",
                                  "salience.runs", "salience.explore") + DEMO_LEAVES,
    "salience.cli": ("salience",),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """:func:`_source_imports` of the file ``path``."""
    return _source_imports(path.read_text(encoding="utf-8"))


def _source_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for each salience module the source ``source`` imports: ``import``, ``from ... import``
    (``"<relative>"`` for a relative one), and the calls ``importlib.import_module("salience.x")`` (bound
    ``importlib`` or ``import_module``, relative with a package) and ``__import__("salience.x")`` (which loads
    ``salience.x`` whatever its fromlist); imports inside functions included. A name that is not a constant is not
    seen."""
    tree = ast.parse(source)
    found = []
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            module = _imported(node, aliases, loaded=True)
            if module is not None and _is_salience(module):
                found.append((node.lineno, module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "salience" or node.module.startswith("salience."):
                # from salience.demo import zoo: the submodule zoo, not the package
                found += [(node.lineno, _submodule(node.module, a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("salience")]
    return found


def _submodule(package: str, name: str) -> str:
    folder = SRC.parent.joinpath(*package.split("."))
    is_module = (folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists()
    return f"{package}.{name}" if is_module else package


def _room(module: str) -> str:
    best = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no room of the house: add it to docs/architecture.md and ALLOWED"
    return best


def _ok(target: str, allowed: tuple[str, ...]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__main__.py" and p != SRC / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    module = _module_name(path)
    room = _room(module)
    allowed = ALLOWED[room] + (room,)
    bad = [f"line {n}: {t}" for n, t in _imports(path) if t == "<relative>" or not _ok(t, allowed)]
    assert not bad, f"{module} ({room}) may import only {allowed}; it imports {bad}"


def test_the_rooms_cover_the_package():
    rooms = {_room(_module_name(p)) for p in MODULES}
    assert {"salience._core", "salience.methods", "salience.evidence", "salience.loading", "salience.render",
            "salience.demo", "salience.compat", "salience.explore", "salience.cli"} <= rooms


def test_core_knows_no_target_class():
    """The engine takes targets as objects with a small protocol; it never imports salience.targets."""
    for p in (SRC / "_core").rglob("*.py"):
        assert all(not t.startswith("salience.targets") for _, t in _imports(p)), p


# Another room's underscore-private names (``from salience._core.perf import _fast``, ``perf._fast(...)``) a module may
# use, as "module: name": none. The underscore says "this room's own": a name one room offers another is named without
# it (``perf.changes_single_pass``, ``calm.calmly``, ``attention.einsum_labels``), so that its room knows it has
# callers outside and its tests and docs say what it promises. A room's own private names, and a room's private
# modules' public names (``methods._multi.hooked_pass``, which ``compat.keras_vis`` takes), are not concerned.
PRIVATE_IMPORTS_ALLOWED: frozenset[str] = frozenset()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_salience(module: str) -> bool:
    return module == "salience" or module.startswith("salience.")


def _room_of(module: str) -> str:
    """:func:`_room`, the package ``salience`` itself a room of its own (its ``__init__`` is no room's)."""
    return module if module == "salience" else _room(module)


def _module_of(expr: ast.expr, aliases: dict[str, str]) -> Optional[str]:
    """The salience module ``expr`` names (``rules``, ``salience.attention``: a name bound by an import, then its
    submodules; ``importlib.import_module("salience.x")``, ``__import__(...)``), or None (another object:
    ``rules.ACTIVATIONS``, a local variable)."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Call):
        module = _imported(expr, aliases)
    else:
        module = aliases.get(expr.id) if isinstance(expr, ast.Name) else None
    if module is None or not _is_salience(module):  # not salience's ("importlib": a name bound to importlib)
        return None
    for part in reversed(parts):
        if _submodule(module, part) == module:  # an attribute of the module, not a submodule
            return None
        module = _submodule(module, part)
    return module


def _constant(node: Optional[ast.expr]) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _imported(call: ast.Call, aliases: dict[str, str], loaded: bool = False) -> Optional[str]:
    """The salience module a call returns: ``importlib.import_module("salience.x")`` (``import_module`` bound by
    ``from importlib import``; ``(".x", "salience")`` relative) returns ``salience.x``; ``__import__("salience.x")``
    the package ``salience``, ``salience.x`` with a non-empty fromlist (``loaded``: ``salience.x`` either way, the
    module the call loads). None for other calls, a name not a constant, or a module that is not there."""
    import importlib.util

    f, args, kw = call.func, call.args, {k.arg: k.value for k in call.keywords}
    name = _constant(args[0] if args else kw.get("name"))
    if name is None:
        return None
    if isinstance(f, ast.Name) and f.id == "__import__":
        fromlist = args[3] if len(args) > 3 else kw.get("fromlist")
        empty = fromlist is None or (isinstance(fromlist, (ast.List, ast.Tuple)) and not fromlist.elts) \
            or (isinstance(fromlist, ast.Constant) and not fromlist.value)
        name = name.split(".")[0] if empty and not loaded else name
    elif (isinstance(f, ast.Name) and aliases.get(f.id) == "importlib.import_module") or (
            isinstance(f, ast.Attribute) and f.attr == "import_module" and isinstance(f.value, ast.Name)
            and aliases.get(f.value.id) == "importlib"):
        package = _constant(args[1] if len(args) > 1 else kw.get("package"))
        try:
            name = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        except (ImportError, ValueError):
            return None
    else:
        return None
    module, *rest = name.split(".")
    for part in rest:  # each part a module of the package: else no module (an error when it runs)
        if _submodule(module, part) == module:
            return None
        module = _submodule(module, part)
    return module


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the salience module an import binds it to (``importlib`` and ``importlib.import_module`` too),
    then names assigned a module a call returns (``m = importlib.import_module("salience.x")``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_salience(node.module):
            for a in node.names:
                if _submodule(node.module, a.name) != node.module:
                    aliases[a.asname or a.name] = _submodule(node.module, a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib":
            aliases.update({a.asname or a.name: "importlib.import_module" for a in node.names
                            if a.name == "import_module"})
        elif isinstance(node, ast.Import):
            for a in node.names:  # import salience.x binds "salience"; import salience.x as y binds y
                if _is_salience(a.name) or a.name.split(".")[0] == "importlib":  # import importlib.util too
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):  # m = ... and m: ModuleType = ...
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Call) and _imported(node.value, aliases):
            aliases[target.id] = _imported(node.value, aliases)
    return aliases


def _other_rooms_privates(path: Path, module: Optional[str] = None) -> list[str]:
    """:func:`_private_uses` of the file ``path``, its module ``module`` (by default its place under ``SRC``)."""
    return _private_uses(path.read_text(encoding="utf-8"), module or _module_name(path))


def _private_uses(source: str, module: str) -> list[str]:
    """``line N: name`` for each underscore-private name that the module ``module``, of source ``source``, takes
    from a module of another room, not in :data:`PRIVATE_IMPORTS_ALLOWED`: by ``from M import _name`` (``M`` the
    package too; a private module of a package too: ``from salience.methods import _multi``), as ``alias._name`` or
    ``alias.sub._name`` where ``alias`` is bound by ``import M [as alias]`` or ``from P import M [as alias]`` (``from
    salience import rules``) or assigned ``importlib.import_module("M")``, on such a call itself
    (``importlib.import_module("M")._name``, ``__import__("M")``), and as ``getattr(alias, "_name"[, default])``;
    imports inside functions included."""
    room = _room(module)
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_salience(node.module):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if _is_private(a.name) and _room_of(_submodule(node.module, a.name)) != room]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner, name = _module_of(node.value, aliases), node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _is_private(node.args[1].value):
            owner, name = _module_of(node.args[0], aliases), node.args[1].value
        else:
            continue
        if owner is not None and _room_of(owner) != room:
            found.append((node.lineno, f"{owner}.{name}"))
    return [f"line {n}: {name}" for n, name in sorted(found) if f"{module}: {name}" not in PRIVATE_IMPORTS_ALLOWED]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_room_takes_another_rooms_private_names(path):
    """A module uses no underscore-private name of another room's modules (the exceptions, each with its reason, in
    :data:`PRIVATE_IMPORTS_ALLOWED`: none)."""
    bad = _other_rooms_privates(path)
    assert not bad, (f"{_module_name(path)} takes another room's private names {bad}: give them a name without the "
                     "underscore in their module (and say them in docs/architecture.md), or import what is public")


def test_the_private_names_rule_sees_both_forms(tmp_path):
    """The rule's reader on a module of its own, read as ``salience.methods.probe``: ``from M import _x`` and
    ``alias._y`` of another room's modules are found; the room's own private names, and public names through a
    private alias, are not."""
    probe = tmp_path / "probe.py"
    probe.write_text("from salience._core.perf import _fast, current\n"
                     "from salience._core import perf as _perf\n"
                     "from salience.methods._multi import hooked_pass, _UNAPPLIED\n"
                     "def f():\n"
                     "    import salience.rules as r\n"
                     "    return _perf._fast, _perf.current, r._classify, r.ACTIVATIONS, _UNAPPLIED, hooked_pass\n")
    assert _other_rooms_privates(probe, "salience.methods.probe") == [
        "line 1: salience._core.perf._fast", "line 6: salience._core.perf._fast", "line 6: salience.rules._classify"]
    assert _other_rooms_privates(probe, "salience._core.probe") == ["line 3: salience.methods._multi._UNAPPLIED",
                                                                  "line 6: salience.rules._classify"]


def test_the_private_names_rule_sees_the_package_forms(tmp_path):
    """The forms the code mostly uses, ``from salience import rules`` (then ``rules._x``), and the others that reach a
    module's private name: ``import salience.attention`` then ``salience.attention._x``, ``getattr(rules, "_x")``;
    ``from salience import _x`` too. A private name of an object (``rules.ACTIVATIONS._x``) is no module's."""
    probe = tmp_path / "probe.py"
    probe.write_text("from salience import rules, reduce as _reduce\n"
                     "import salience.attention\n"
                     "def f():\n"
                     "    return rules._classify, _reduce._x, rules.ACTIVATIONS._y, rules.ACTIVATIONS\n"
                     "def g():\n"
                     "    return salience.attention._NativeMHA, getattr(rules, '_classify', None), getattr(rules, 'guided')\n")
    assert _other_rooms_privates(probe, "salience.methods.probe") == [
        "line 4: salience.reduce._x", "line 4: salience.rules._classify", "line 6: salience.attention._NativeMHA",
        "line 6: salience.rules._classify"]
    assert _other_rooms_privates(probe, "salience.rules") == ["line 4: salience.reduce._x",
                                                            "line 6: salience.attention._NativeMHA"]


MAX_LINES = 60


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body_start = node.body[0]
            # The docstring does not count: only the code.
            if isinstance(body_start, ast.Expr) and isinstance(getattr(body_start, "value", None), ast.Constant):
                first = node.body[1].lineno if len(node.body) > 1 else node.end_lineno
            else:
                first = body_start.lineno
            n = node.end_lineno - first + 1
            said = any("long:" in lines[i] for i in range(node.lineno - 1, min(len(lines), node.lineno + 2)))
            if n > MAX_LINES and not said:
                out.append(f"{node.name} ({n} lines, line {node.lineno})")
    return out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short(path):
    """No function body over 60 lines of code, unless a ``# long: why`` comment on its first lines says why."""
    assert not _long_functions(path), _long_functions(path)
