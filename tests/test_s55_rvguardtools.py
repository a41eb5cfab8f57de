"""Review of the merge 18f34466 (guard/refusals.py split off guard/entry.py; the benchmarks' sides in worker processes).

- ``benchmarks/fixed_cost_profile_s47.py``'s ``NAMED`` lists the functions its profile reports as named pieces, by
  name: a name that no longer exists in the files ``PIECES`` matches drops its row silently (``_eval`` became
  ``refusals.eval_mode`` in the split, and the eval-mode piece vanished from benchmarks/fixed-cost-profile-s55.txt).
- ``tests/test_no_cycles.py``'s check counts neither salience's nor a test's generated code: a torch.fx GraphModule
  an earlier test left failed its vanilla case in a long in-order run (older than the merge).
- The one-image BatchNorm hook reads the entry's live table of guarded threads (a thread entering later is refused).
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


def test_a_thread_that_enters_the_guard_later_is_refused_too():
    """The one-image hook reads the entry's table of guarded threads as it is at each pass (it is handed the table
    itself, not a copy): a second thread entering ``model_guard`` on the model already held (no new hook put on it)
    has its pass of two images refused too; a thread outside any guard meanwhile runs its batch. (Passes on the
    merge's code: the property tests/test_s55_guardtools.py did not pin down, which a snapshot would break.)"""
    import threading

    import pytest
    import torch
    from torch import nn

    from salience import SalienceError
    from salience._core.guard import model_guard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    x = torch.rand(2, 3, 6, 6)
    seen: dict = {}

    def guarded() -> None:
        with model_guard(model):
            try:
                model(x)
            except SalienceError as e:
                seen["guarded"] = str(e)

    def outside() -> None:
        seen["outside"] = model(x).shape

    with model_guard(model):
        for target in (guarded, outside):
            t = threading.Thread(target=target)
            t.start()
            t.join()
        with pytest.raises(SalienceError, match="no running statistics"):
            model(x)
    assert "no running statistics" in seen.get("guarded", ""), seen
    assert seen["outside"] == (2, 64)
    assert all(not m._forward_pre_hooks for m in model.modules())
