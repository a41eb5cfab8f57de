"""Review of session 54's guard split (``_core/guard.py`` -> the package ``_core/guard/``).

- The package docstring lists the guard's limits "today"; the split's rewrite dropped two that the code still has
  (the old docstring named them): an attribute a torch global module hook sets on a torch.nn layer without hooks of
  its own stays, and a state-dict hook whose key another process gave (a pickled model's) on a torch.nn layer without
  other hooks is swept once this process's counter reaches its key.
- ``benchmarks/fixed_cost_profile_s47.py`` lists the guard's pieces (``_enter``, ``_capture``, ...) by the file they
  are in (``PIECES``): ``"guard.py"`` no longer matches ``_core/guard/entry.py``, so its profile dropped the guard's
  rows without a word.
"""
from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

import salience
from salience._core import guard

ROOT = Path(__file__).resolve().parents[1]


class _Parent(nn.Module):
    """A module of the user's around a torch.nn layer without hooks of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_the_package_docstring_names_the_global_hooks_limit_and_it_holds():
    """The limit, as the code has it: a global forward hook that sets an attribute on a torch.nn layer without hooks
    keeps it after the guard (the layer is not copied); and the package docstring says so."""
    model = _Parent().eval()

    def mark(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            module.seen = True

    handle = torch.nn.modules.module.register_module_forward_hook(mark)
    try:
        with salience.model_guard(model):
            model(torch.ones(1, 3))
    finally:
        handle.remove()
    assert model.linear.__dict__.get("seen") is True  # the limit is real: not put back
    doc = " ".join(guard.__doc__.split())
    assert "global module hook sets on a torch.nn layer" in doc


def test_the_package_docstring_names_the_pickled_state_dict_hook_limit():
    doc = " ".join(guard.__doc__.split())
    assert "state-dict hook" in doc and "another process" in doc


def _named_pieces_in(path: Path) -> set[str]:
    """``PIECES`` and ``NAMED`` of the benchmark, read from its source."""
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PIECES", "NAMED"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def test_the_fixed_cost_profile_still_finds_the_guards_pieces():
    """Each named piece that the guard's rooms define is in a file the benchmark's ``PIECES`` matches (its profile
    lists a function only there): else the guard's enter, leave and capture vanish from its table."""
    lists = _named_pieces_in(ROOT / "benchmarks" / "fixed_cost_profile_s47.py")
    package = ROOT / "src" / "salience" / "_core" / "guard"
    seen = 0
    for path in sorted(package.glob("*.py")):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, ast.FunctionDef)}
        if defined & set(lists["NAMED"]):
            seen += 1
            file = str(path)  # as cProfile names it
            assert any(p in file for p in lists["PIECES"]), (path.name, lists["PIECES"])
    assert seen >= 2  # entry (_enter, _hold, ...) and state / holds (take, restore)
