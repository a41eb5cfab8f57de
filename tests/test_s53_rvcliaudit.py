"""Review of session 53's command-line audit (tests/test_s53_cliaudit.py): the defects its changes left, each pinned by
the command's exit code and its one line, through :func:`salience.cli.main` with demo models (a few seconds)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience.cli import evaluate_cmd, explain_cmd, main, visualize_cmd

LONG = "x" * 300
"""A file name longer than any file system takes (255 bytes): ``stat`` fails with ``ENAMETOOLONG``, which
``Path.exists`` raises instead of answering ``False``."""


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    """A 48 x 64 RGB PNG of noise."""
    path = tmp_path_factory.mktemp("s53rv") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _never(*args, **kwargs):
    raise AssertionError("reached: the command should have stopped before the model loads")


@pytest.mark.parametrize("command, module", [
    (["explain", "{png}", "--model", "demo:shapes"], explain_cmd),
    (["evaluate", "--model", "demo:shapes", "--n", "2", "--method", "vanilla"], evaluate_cmd),
])
def test_an_out_the_system_will_not_look_at_is_a_usage_error(png, tmp_path, capsys, monkeypatch, command, module):
    """The file check added before the model loads (``check_no_file_in_way``) called ``Path.exists``, which raises
    ``OSError`` for a name too long (or a folder without permission): ``unexpected OSError ... please report it``,
    exit 3, where the folder's creation had said it with exit 2. Now exit 2 naming ``--out``, before the model."""
    monkeypatch.setattr(module, "load_model_arg", _never)
    out = tmp_path / LONG / "run"
    rc, err = _run(capsys, *[a.format(png=png) for a in command], "--out", out)
    assert rc == 2, err
    assert err == f"salience: error: --out {out}: File name too long; choose another --out\n"


def test_visualize_out_too_long_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """``visualize --out NAME.png`` with a name too long: ``out.is_dir()`` raised ``OSError`` (exit 3)."""
    monkeypatch.setattr(visualize_cmd, "load_model_arg", _never)
    out = tmp_path / (LONG + ".png")
    rc, err = _run(capsys, "visualize", "--model", "demo:shapes", "--target", "0", "--steps", "1", "--out", out)
    assert rc == 2 and err == f"salience: error: --out {out}: File name too long; choose another --out\n"


def test_an_out_that_is_a_link_to_nothing_is_refused_before_the_model(png, tmp_path, capsys, monkeypatch):
    """``--out LINK`` where ``LINK`` points to a folder that is not there: ``mkdir`` cannot make a folder at the
    link, so every map was computed and then ``cannot create the output folder LINK (File exists)``. Now it is said
    before the model loads, naming where the link points; a link to a folder is an output folder as before."""
    link = tmp_path / "results"
    os.symlink(tmp_path / "gone", link)
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    rc, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--out", link / "run")
    assert rc == 2
    assert err == (f"salience: error: --out {link / 'run'}: {link} is a link to {tmp_path / 'gone'}, which is not "
                   "there; create that folder or choose another --out\n")
    monkeypatch.undo()
    (tmp_path / "gone").mkdir()
    rc, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--out", link / "run")
    assert rc == 0, err
    assert len(list((tmp_path / "gone" / "run").glob("*.npy"))) == 1
