"""perf's ``_fast`` alias of :func:`changes_single_pass` (kept for one caller) is gone: one name for one rule."""
import inspect

from salience._core import perf


def test_one_name_for_the_single_pass_rule():
    assert not hasattr(perf, "_fast")
    assert "changes_single_pass(options)" in inspect.getsource(perf.one_pass)
