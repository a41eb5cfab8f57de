"""Atomic writes: the target is either the old file or the complete new one, never a part."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from salience import SalienceError
from salience._core.files import atomic_path, atomic_write


def test_write_creates_parents_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    assert atomic_write(target, b"hello") == target
    assert target.read_bytes() == b"hello"
    assert os.listdir(target.parent) == ["f.bin"]


def test_overwrite_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, b"a much longer old content")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_exception_midway_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of it")
            assert tmp.parent == tmp_path and tmp.read_bytes() == b"half of it"
            raise RuntimeError("midway")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_old_file_survives_failed_overwrite(tmp_path, exc):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new but broken")
            raise exc()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_temp_path_keeps_suffix_for_format_sniffing_writers(tmp_path):
    """np.save appends '.npy' to a path without it; the temp name must end in the target's suffix."""
    target = tmp_path / "m.npy"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.name.startswith(".")
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert os.listdir(tmp_path) == ["m.npy"]


def test_nothing_written_is_an_error(tmp_path):
    target = tmp_path / "m.npy"
    with pytest.raises(SalienceError, match="nothing was written"):
        with atomic_path(target) as tmp:
            os.unlink(tmp)
    assert os.listdir(tmp_path) == []


def test_mode_is_an_ordinary_new_files(tmp_path):
    """Not mkstemp's 0600: the final file has 0666 minus the umask, like open() gives."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


def test_bad_arguments(tmp_path):
    with pytest.raises(SalienceError, match="folder of that name"):
        atomic_write(tmp_path, b"x")
    with pytest.raises(SalienceError, match="expects bytes"):
        atomic_write(tmp_path / "t.txt", "text")
    with pytest.raises(SalienceError, match="file path"):
        atomic_write(3.5, b"x")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
