"""``salience.runs.ray_engine.quiet`` without a cluster: what it changes (Ray's loggers, the current
Ray Data ``DataContext``) and that it puts each setting back, also when two runs overlap in one
process (two threads, each with its own ``explain_dataset(..., engine="ray")`` on the caller's
cluster). The runs themselves: tests/test_runs_ray.py."""
from __future__ import annotations

import logging
import threading

import pytest

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("ray.data")

from salience.runs import ray_engine  # noqa: E402


def _state() -> tuple:
    ctx = ray.data.DataContext.get_current()
    return (logging.getLogger("ray").level, logging.getLogger("ray.data").level, ctx.enable_progress_bars,
            ctx.print_on_execution_start, ctx.execution_options.preserve_order)


QUIET = (logging.CRITICAL, logging.CRITICAL, False, False, True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, when its DataContext is made
def test_two_overlapping_runs_stay_quiet_until_both_end_and_leave_ray_as_it_was(monkeypatch):
    """Run A starts, run B starts, A ends, B ends (threads): B is still quiet after A ended, and after
    B the loggers and the DataContext are what they were before A. Each run put back what it saw on
    entry, so A's end made B loud, and B's end left Ray quiet for the rest of the process (the ``ray``
    logger at CRITICAL: the caller's own Ray errors no longer shown)."""
    monkeypatch.delenv(ray_engine.RAY_LOGS, raising=False)
    before = _state()
    assert before != QUIET  # else the test could not tell a restored setting from a left one
    a_in, b_in, a_go, b_go = (threading.Event() for _ in range(4))
    seen = {}

    def run(name: str, entered: threading.Event, go: threading.Event, after: "threading.Event | None") -> None:
        if after is not None:
            after.wait(10)
        with ray_engine.quiet(ray):
            entered.set()
            go.wait(10)
        seen[name] = "done"

    a = threading.Thread(target=run, args=("a", a_in, a_go, None))
    b = threading.Thread(target=run, args=("b", b_in, b_go, a_in))
    try:
        a.start()
        b.start()
        assert a_in.wait(10) and b_in.wait(10)
        assert _state() == QUIET
        a_go.set()
        a.join(10)
        assert seen.get("a") == "done"
        assert _state() == QUIET  # B still runs
        b_go.set()
        b.join(10)
        assert seen.get("b") == "done"
        assert _state() == before
    finally:
        a_go.set(), b_go.set()
        a.join(10), b.join(10)
        ctx = ray.data.DataContext.get_current()
        logging.getLogger("ray").setLevel(before[0]), logging.getLogger("ray.data").setLevel(before[1])
        ctx.enable_progress_bars, ctx.print_on_execution_start = before[2], before[3]
        ctx.execution_options.preserve_order = before[4]


def test_quiet_puts_everything_back_after_an_interrupt(monkeypatch):
    """Ctrl-C (KeyboardInterrupt) inside the run: every setting back; ``SALIENCE_RAY_LOGS=1``: the loggers
    and progress bars untouched (only the run's own ``preserve_order``)."""
    monkeypatch.delenv(ray_engine.RAY_LOGS, raising=False)
    before = _state()
    with pytest.raises(KeyboardInterrupt):
        with ray_engine.quiet(ray):
            assert _state() == QUIET
            raise KeyboardInterrupt
    assert _state() == before
    monkeypatch.setenv(ray_engine.RAY_LOGS, "1")
    with ray_engine.quiet(ray):
        assert _state() == (*before[:4], True)
    assert _state() == before
