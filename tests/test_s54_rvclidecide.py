"""Session 54's review of the command line's open ends (tests/test_s54_clidecide.py): the defects found, each
pinned here; every test fails on the merged code (b812cff1)."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from salience.loading import read_state_dict


def _loads(monkeypatch) -> list[dict]:
    """Record each ``torch.load`` call's keywords (the call still made)."""
    calls: list[dict] = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_trust_pickle_reads_a_checkpoint_that_needs_it_once(tmp_path, monkeypatch):
    """``trust_pickle=True`` first tries a safe load, to say when it was needless. On a checkpoint whose unpickled
    object comes after its weights (``{"state_dict": ..., "args": Namespace}``, as training scripts save) that
    safe try read every tensor before it failed, and the trusted load read them again: a 500 MB file read twice.
    The try is memory-mapped now: the tensors are read once, by the one full load, with the same result and no
    warning."""
    path = tmp_path / "ckpt.pt"
    w = torch.arange(12.0).reshape(3, 4)
    torch.save({"state_dict": {"w": w}, "args": argparse.Namespace(lr=0.1)}, path)
    calls = _loads(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the trust was needed
        got = read_state_dict(path, trust_pickle=True)
    assert list(got) == ["w"] and torch.equal(got["w"], w)
    full = [c for c in calls if not c.get("mmap")]
    assert len(full) == 1 and full[0]["weights_only"] is False, calls


def test_trust_pickle_for_a_safe_state_dict_warns_and_reads_it_once(tmp_path, monkeypatch):
    """A plain state dict with ``trust_pickle=True``: the warning that it was needless, the same tensors, one full
    read of the file (a safe one)."""
    path = tmp_path / "sd.pt"
    w = torch.arange(6.0)
    torch.save({"w": w}, path)
    calls = _loads(monkeypatch)
    with pytest.warns(UserWarning, match="trust_pickle=True was not needed"):
        got = read_state_dict(path, trust_pickle=True)
    assert torch.equal(got["w"], w)
    full = [c for c in calls if not c.get("mmap")]
    assert len(full) == 1 and full[0]["weights_only"] is True, calls


def test_occlusion_baseline_nan_is_answered_with_the_command_lines_words(tmp_path, capsys):
    """``--baseline nan`` with occlusion said ``a pixel value, 'blur' or a tensor`` (a tensor is no command-line
    value): its wording was not among the phrases :data:`salience.cli.options.COMMAND_WORDS` matched. The table is
    keyed on the methods' own constants now (``perturbation.BASELINE_VALUES`` among them), exit 2."""
    import numpy as np
    from PIL import Image

    import test_s53_cliaudit

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    rc, _, err = test_s53_cliaudit._run(capsys, "explain", image, "--model", "demo:shapes", "--method", "occlusion",
                                        "--baseline", "nan", "--out", tmp_path / "o")
    assert rc == 2 and err == ("salience: error: --baseline: baseline must be a finite number (a pixel value or blur), "
                               "got nan\n")
