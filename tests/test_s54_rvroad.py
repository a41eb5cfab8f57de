"""Review of session 54's ROAD change (nested-dissection SuperLU): the comparison with the spsolve
path in tests/test_s54_road.py fails, not skips, when git fails; it skips only where the old code
cannot be had (no git, no checkout, a shallow clone without the commit)."""
from __future__ import annotations

import subprocess

import pytest


def _failing_git(kind: str):  # type: ignore[no-untyped-def]
    def run(cmd, *args, check=False, **kwargs):  # type: ignore[no-untyped-def]
        if kind == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout", 60))
        err = "fatal: detected dubious ownership in repository at '/repo'\n"
        if check:
            raise subprocess.CalledProcessError(128, cmd, "", err)
        return subprocess.CompletedProcess(cmd, 128, "", err)
    return run


def test_a_git_failure_fails_the_spsolve_comparison(monkeypatch):
    # Fixed defect: tests/test_s54_road.py skipped its comparison with the spsolve path on ANY git
    # failure (an error exit, a timeout), so a broken git hid the check as a skip. It skips only where
    # git is missing, outside a checkout, or in a shallow clone without the commit.
    import test_s54_road

    for kind in ("error", "timeout"):
        monkeypatch.setattr(subprocess, "run", _failing_git(kind))
        try:
            test_s54_road._old_module()
        except pytest.skip.Exception as e:
            pytest.fail(f"git {kind}: skipped ({e}) instead of failing")
        except (AssertionError, subprocess.SubprocessError):
            pass
        else:
            pytest.fail(f"git {kind}: no failure")


def test_shallow_clone_without_the_commit_still_skips(monkeypatch):
    import test_s54_road

    def run(cmd, *args, check=False, **kwargs):  # type: ignore[no-untyped-def]
        if cmd[1] == "rev-parse":
            return subprocess.CompletedProcess(cmd, 0, "true\n", "")
        if check:
            raise subprocess.CalledProcessError(128, cmd, "", "fatal: invalid object name")
        return subprocess.CompletedProcess(cmd, 128, "", "fatal: invalid object name")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(pytest.skip.Exception):
        test_s54_road._old_module()
