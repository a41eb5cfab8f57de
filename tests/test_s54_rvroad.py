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


def test_no_pivoting_holds_on_the_worst_conditioned_removed_sets():
    # SuperLU factors without pivoting (diag_pivot_thresh=0): safe because the matrix is symmetric
    # positive definite whenever a pixel is kept (every removed region reaches a kept pixel through
    # the connected grid). The hardest cases: all pixels removed but one (a corner: condition ~1.6e4
    # at 40 x 40; the centre), a 1-pixel kept border, a 1 x 400 strip kept at one end (condition
    # ~2.6e5): equal to the dense solve of the paper's equations (tests/test_s54_road.py) within 1e-10.
    import numpy as np
    import torch

    from salience.evidence.road import linear_imputation
    from test_s54_road import _formula

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 40, generator=g, dtype=torch.float64)
    corner, centre, border = (torch.ones(1, 40, 40, dtype=torch.bool) for _ in range(3))
    corner[0, 0, 0] = centre[0, 20, 20] = False
    border[0, [0, -1], :] = border[0, :, [0, -1]] = False
    strip = torch.ones(1, 1, 400, dtype=torch.bool)
    strip[0, 0, 0] = False
    cases = {"corner": (x, corner), "centre": (x, centre), "border": (x, border),
             "strip": (torch.rand(1, 2, 1, 400, generator=g, dtype=torch.float64), strip)}
    for name, (img, rem) in cases.items():
        ref = _formula(img[0].numpy(), rem[0].numpy())
        ours = linear_imputation(img, rem)[0].numpy()
        assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max(), name
