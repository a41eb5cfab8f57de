"""Session 58, the lead's small fixes after the command-line audit's review.

- ``salience explain DIR --out s3://bucket/run``: the writability check of ``--out`` read the URL as the local path
  ``s3:/bucket/run`` and checked the working folder, so where that folder could not be written the user was told to
  choose another ``--out`` for a reason that had nothing to do with it, instead of the run's own refusal of object
  storage (failed before the fix: the message named the working folder).
"""
from __future__ import annotations

import tempfile

import pytest

from salience._core.errors import SalienceError
from salience.cli import common


def _unwritable(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_an_object_storage_out_is_not_checked_as_a_local_folder(monkeypatch):
    monkeypatch.setattr(tempfile, "TemporaryFile", _unwritable)  # every local folder unwritable
    common.writable_out("s3://bucket/run")  # nothing local to check: the run refuses the URL itself
    with pytest.raises(SalienceError, match="cannot write in the folder"):
        common.writable_out("local/run")  # the check still works for a local path


def test_the_command_line_says_the_runs_own_refusal_of_object_storage(monkeypatch, tmp_path, capsys):
    from PIL import Image

    from salience.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "a.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "TemporaryFile", _unwritable)
    code = main(["explain", str(images), "--model", "demo:shapes", "--out", "s3://bucket/run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "object storage" in err and "cannot write in the folder" not in err
