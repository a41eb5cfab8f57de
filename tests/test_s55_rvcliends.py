"""Session 55, review of the command line's open ends (merge 153bf36a): the defects found, each pinned.

1. The explorer took for a dataset run every folder that :func:`salience.runs.store.is_run_folder` knows by a table's
   name: a folder of the user's own images that also holds a file named ``index.parquet`` (or ``inputs.parquet``) of
   theirs was left out by ``salience explore`` ("a dataset run's folder without its run.json": wrong, and wrong
   advice), and ``salience.explore`` refused it; until the merge the page showed its images. A run's folder never
   holds image files of its own (its images are in ``thumbs/`` and ``overlays/``), so a folder without a
   ``run.json`` that holds image files is a folder of images to the explorer.
2. The explorer's check of a folder listed the whole folder first (a ``stat`` of each entry, then a sort): a folder
   of 100,000 images paid a round trip per file on a network folder before its first image was opened (the code
   before stopped at the first image file). Now the folder is read in its own order up to the first readable image.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

import test_s53_cliaudit
import test_s54_clidecide
import test_s55_cliends
from salience import SalienceError

files = test_s54_clidecide.files  # the fixture: two 32 x 32 PNGs, a truncated PNG, nets of one and three outputs
_run = test_s53_cliaudit._run
started = test_s55_cliends.started  # the fixture: the explorer's server replaced by a recorder of its inputs


def _images_with(tmp_path: Path, files, name: str) -> Path:
    folder = tmp_path / f"photos-{name}"
    folder.mkdir()
    shutil.copy(files.a, folder / "a.png")
    shutil.copy(files.b, folder / "b.png")
    (folder / name).write_bytes(b"PAR1 the user's own catalogue")
    return folder


@pytest.mark.parametrize("name", ["index.parquet", "inputs.parquet"])
def test_explore_shows_a_folder_of_images_that_holds_a_table_of_its_own(files, tmp_path, capsys, started, name):
    """The folder is shown (no line on stderr), and the page's own source lists its two images."""
    from salience.explore.runs import is_run
    from salience.explore.server import build_hub

    folder = _images_with(tmp_path, files, name)
    assert not is_run(folder)
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", folder)
    assert (rc, err, started) == (0, "", [[str(folder)]])
    hub = build_hub("demo:shapes", [folder])
    try:
        assert [Path(e.path).name for e in hub.images.entries()] == ["a.png", "b.png"]
    finally:
        hub.close()


def test_a_run_folder_without_images_is_still_a_run_to_the_explorer(tmp_path):
    """What the fix keeps: the lock alone, or a table of the store's columns alone, without image files: a run (no
    rows to show yet). Session 56: a table is a run's by its columns (``runs.store.is_store_table``), not its name:
    an empty file named ``inputs.parquet`` is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.explore.runs import is_run
    from salience.runs.lock import LOCK_NAME
    from salience.runs.store import TABLE_MARK

    for name in (LOCK_NAME, "inputs.parquet"):
        folder = tmp_path / name.strip(".")
        folder.mkdir()
        (folder / name).write_bytes(b"")
        (folder / "thumbs").mkdir()
        assert is_run(folder) == (name == LOCK_NAME)
        if name == "inputs.parquet":
            table = pa.table({"index": pa.array([0], pa.int64()), "path": ["a.png"]})
            pq.write_table(table, folder / name)
            assert not is_run(folder)  # session 57: a user's table of those columns; the store marks its own
            pq.write_table(table.replace_schema_metadata({TABLE_MARK: b"inputs"}), folder / name)
            assert is_run(folder)


def test_the_folder_check_reads_the_folder_only_up_to_its_first_readable_image(files, tmp_path, monkeypatch):
    """A folder of 300 sound images (and 300 other files): no ``stat`` of each entry and one image opened; the page's
    order still names the first unreadable one when none can be read."""
    from salience.cli.explore_cmd import _left_out

    images = importlib.import_module("salience.explore.images")
    sound = tmp_path / "sound"
    sound.mkdir()
    for i in range(300):
        shutil.copy(files.a, sound / f"{i:03d}.png")
        (sound / f"{i:03d}.txt").write_text("notes")
    stats, opened = [], []
    real_stat, real_unreadable = os.stat, images.unreadable
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(images, "unreadable", lambda p, *a, **k: opened.append(p) or real_unreadable(p, *a, **k))
    assert _left_out(str(sound), 10**6) is None
    monkeypatch.setattr(os, "stat", real_stat)
    assert len(opened) == 1 and len(stats) < 10, (len(opened), len(stats))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("c.png", "a.png", "b.jpg"):
        shutil.copy(files.trunc, bad / name)
    why = _left_out(str(bad), 10**6)
    assert why.startswith(f"none of its 3 image file(s) can be read; the first: {bad / 'a.png'}: "), why


def test_build_hub_of_a_lock_only_folder_is_a_salience_error(tmp_path):
    """The Python API takes a folder with the lock alone for a run, as the command does: refused with a
    :class:`SalienceError` (the command leaves it out, saying why), not a raw error."""
    from salience.explore.server import build_hub
    from salience.runs.lock import run_lock

    begun = tmp_path / "begun"
    with run_lock(begun):
        pass
    with pytest.raises(SalienceError):
        build_hub("demo:shapes", [begun])
