"""The house: folders are layers and imports point one way (docs/architecture.md), and functions
stay short. Read from the source with ``ast``, imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

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
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
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
