"""Review of the merge 18f34466 (guard/refusals.py split off guard/entry.py; the benchmarks' sides in worker processes).

- ``benchmarks/fixed_cost_profile_s47.py``'s ``NAMED`` lists the functions its profile reports as named pieces, by
  name: a name that no longer exists in the files ``PIECES`` matches drops its row silently (``_eval`` became
  ``refusals.eval_mode`` in the split, and the eval-mode piece vanished from benchmarks/fixed-cost-profile-s55.txt).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _assigned(path: Path, name: str):
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


def test_every_named_piece_of_the_fixed_cost_profile_is_a_function_today():
    bench = ROOT / "benchmarks" / "fixed_cost_profile_s47.py"
    named, pieces = _assigned(bench, "NAMED"), _assigned(bench, "PIECES")
    defined: set[str] = set()
    for path in (ROOT / "src" / "salience" / "_core").rglob("*.py"):
        if any(p in str(path) for p in pieces):
            defined |= {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                        if isinstance(n, ast.FunctionDef)}
    # names of older trees may stay (the profile runs on both sides), but each piece today's tree has must be named
    assert "eval_mode" in named, "the guard's eval mode (refusals.eval_mode) is no named piece"
    assert {"_enter", "_leave", "_capture", "structure", "take", "restore", "modules_of"} <= defined & set(named)


def test_the_cycle_check_does_not_count_a_graph_modules_generated_forward():
    """``test_no_cycles._ours`` took torch.fx's generated forward of a test's model for a test's function (its file
    name, ``<eval_with_key>.N from .../tests/conftest.py:158 in forward``, holds ``/tests/``): a GraphModule an earlier
    test left (``torch.export`` of the SmallCNN in tests/test_cli_audit.py), freed while the vanilla case ran, failed
    it in a long run, on the code before the merge 18f34466 too. Salience's own functions still count."""
    import torch
    from conftest import seeded_small_cnn
    from test_no_cycles import _ours

    import salience

    traced = torch.fx.symbolic_trace(seeded_small_cnn())
    forward = type(traced).forward
    assert "/tests/" in forward.__code__.co_filename
    assert not _ours(forward) and not _ours(traced)
    assert _ours(salience.vanilla) and _ours(_ours)
