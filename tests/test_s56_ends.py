"""Session 56: the command line's last open ends, each pinned through :func:`salience.cli.main` in this process (the
explorer's server replaced by a recorder of its inputs, as in session 55). Every test here fails on the code before.

1. ``salience explain IMAGE --out DIR`` refused a user's own folder that holds an ``index.parquet`` (or
   ``inputs.parquet``) of theirs as "a dataset run's folder": ``runs.store.is_run_folder`` went by the tables' names.
   Now a run is known by salience's own marks: its ``run.json``, its lock (written first, kept for good, after a
   clean end and after ``kill -9`` alike), or a table of the store's columns; the user's folder takes the figures.
2. ``salience explore RUN`` of a run that is starting (its lock held, no ``run.json`` yet) said "run its command
   again": now it says the run is being written (who holds the lock, asked of the system without taking it) and to
   open it again in a moment; a dead run keeps the old advice.
3. The folder check opened an unreadable file several times (its own look, then ``load_image``'s): now once.
4. A JPEG whose header is sound and whose data is cut passed the folder check (its ``verify`` reads the header only):
   now the check decodes it (at 1/8 of its size), and agrees with ``load_image`` on every cut of a real photo.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from PIL import Image

import test_s53_cliaudit
import test_s54_clidecide
import test_s55_cliends
from salience import SalienceError
from salience.cli import explain_cmd
from salience.loading import load_image
from salience.runs.lock import LOCK_NAME

files = test_s54_clidecide.files  # the fixture: two 32 x 32 PNGs, a truncated PNG, nets of one and three outputs
started = test_s55_cliends.started  # the fixture: the explorer's server replaced by a recorder of its inputs
_run = test_s53_cliaudit._run  # main(argv) in this process: (exit code, stdout, stderr), no traceback
_never = test_s53_cliaudit._never

_opened: list[str] = []
_watching: list[bool] = []
_hooked: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    """Every file this process opens (``open`` audit events: ``open()``, ``io.open``, ``os.open``), while watched."""
    if _watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.basename(os.fsdecode(args[0])))


def _opens(call) -> tuple[object, list[str]]:
    """``call()``'s result and the names of the files it opened (the audit hook, added at the first call: it stays
    for the process's life, a test of this file's own)."""
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked.append(True)
    _opened.clear()
    _watching.append(True)
    try:
        return call(), list(_opened)
    finally:
        _watching.clear()


def _store_table(path: Path) -> None:
    """A table of the store's ``inputs.parquet`` columns (index, path), marked as the store marks it (session 57:
    ``runs.store.TABLE_MARK``; an unmarked one is a user's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import TABLE_MARK

    table = pa.table({"index": pa.array([0, 1], pa.int64()), "path": ["a.png", "b.png"]})
    pq.write_table(table.replace_schema_metadata({TABLE_MARK: b"inputs"}), path)


# --------------------------------------------------------------------------------- 1. a run by salience's own marks


def test_explain_out_writes_into_a_users_folder_that_holds_tables_of_its_own(files, tmp_path, capsys):
    """A folder of the user's with their own ``index.parquet`` (a real parquet table of their columns) and a file
    named ``inputs.parquet`` (not parquet at all): ``explain IMAGE --out`` was refused (exit 2); now it writes its
    map and ``summary.json`` there, and the user's files are left as they were."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import is_run_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    pq.write_table(pa.table({"file": ["x.png"], "score": [0.5]}), mine / "index.parquet")
    (mine / "inputs.parquet").write_bytes(b"PAR1 my notes")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    rc, _, err = _run(capsys, "explain", files.a, "--model", files.one_output, "--size", "32", "--top", "1",
                      "--out", mine)
    assert rc == 0, err
    assert {p.name for p in mine.iterdir()} >= {"a_vanilla_0-increase.npy", "summary.json", *before}
    assert {name: (mine / name).read_bytes() for name in before} == before
    assert not is_run_folder(mine)


def test_a_run_stopped_at_any_point_is_still_refused_as_out(files, tmp_path, capsys, monkeypatch):
    """What the narrowing keeps: a run stopped before its ``run.json`` (its lock alone), one whose ``overwrite``
    cleared its files (its lock alone again), and a run's tables without its manifest or lock (copied without the
    hidden file) are each refused as ``--out``, the folder untouched."""
    import salience
    import torch

    from salience.runs import store

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(2, 3))
    data = torch.utils.data.TensorDataset(torch.rand(2, 3, 8, 8))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(store.Store, "_open", stop)  # stopped before its run.json
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "begun", workers=0)
    salience.explain_dataset(model, data, ["vanilla"], tmp_path / "done", workers=0)
    real_clear = store.clear_run
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(store, "clear_run", lambda folder: real_clear(folder) or stop())
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "done", workers=0, overwrite=True)
    tables = tmp_path / "tables"
    tables.mkdir()
    _store_table(tables / "inputs.parquet")
    assert [p.name for p in (tmp_path / "begun").iterdir()] == [LOCK_NAME]
    assert [p.name for p in (tmp_path / "done").iterdir()] == [LOCK_NAME]
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    for folder in (tmp_path / "begun", tmp_path / "done", tables):
        before = sorted(p.name for p in folder.iterdir())
        rc, _, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--out", folder)
        assert rc == 2 and err.startswith(f"salience: error: --out {folder} is a dataset run's folder"), err
        assert sorted(p.name for p in folder.iterdir()) == before


# --------------------------------------------------------------------------------- 2. a live run's advice


def _hold_lock_in_a_child(folder: Path) -> int:
    """A forked child that takes the run's lock of ``folder`` (:func:`salience.runs.lock.run_lock`, what a run does
    first) and waits to be killed; its pid once it holds the lock."""
    from salience.runs.lock import run_lock

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            with run_lock(folder):
                os.write(write, b"held")
                signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 4) == b"held"
    os.close(read)
    return pid


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_explore_says_a_starting_run_is_being_written_and_a_killed_one_to_run_again(files, tmp_path, capsys,
                                                                                   started, monkeypatch):
    """A run holding its lock before its ``run.json``: ``explore`` said "run its command again" (a second run would
    be refused); now it names the process writing it and says to open it again in a moment. The same run after
    ``kill -9``: its lock file is still there (with its pid and token), nobody holds it, the old advice is given;
    ``explain --out`` refuses the folder in both states."""
    import socket

    folder = tmp_path / "starting"
    pid = _hold_lock_in_a_child(folder)
    try:
        rc, out, err = _run(capsys, "explore", "--model", "demo:shapes", folder)
        assert (rc, out, started) == (2, "", [])
        assert err.splitlines()[0] == (
            f"salience: left out {folder}: a dataset run that is starting (another salience process (pid {pid} on "
            f"host {socket.gethostname()}) is writing it and has not written its run.json yet): nothing to show "
            "yet; open it again in a moment")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert (folder / LOCK_NAME).read_text().split()[:1] == [f"pid={pid}"]  # left as the killed run wrote it
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", folder, files.a)
    assert rc == 0 and started == [[str(files.a)]]
    assert err == (f"salience: left out {folder}: a dataset run's folder without its run.json (a run stopped before "
                   "it wrote it, or while --overwrite cleared it): nothing to show yet; run its command again\n")
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    rc, _, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--out", folder)
    assert rc == 2 and "is a dataset run's folder" in err


def test_the_process_that_holds_the_lock_is_told_so_without_opening_the_file(tmp_path):
    """In the process that holds a run's lock the check never opens the lock file (closing a descriptor of it would
    release the lock): it says this process holds it; after the run, nobody does."""
    from salience.runs.lock import lock_holder, run_lock

    folder = tmp_path / "mine"
    with run_lock(folder):
        said, opened = _opens(lambda: lock_holder(folder))
        assert said == f"this process (pid {os.getpid()})" and LOCK_NAME not in opened
    assert lock_holder(folder) is None and (folder / LOCK_NAME).is_file()


# --------------------------------------------------------------------------------- 3. and 4. the folder check


def _photo_jpeg(progressive: bool = False) -> bytes:
    """A real photo (scikit-image's ``chelsea``, 300 x 451) as JPEG bytes."""
    data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def test_an_unreadable_file_is_opened_once_and_said_in_load_images_words(files, tmp_path):
    """A ``.jpg`` of text, a cut PNG and a cut JPEG: each opened once by the check (it was opened by the quick look,
    then by ``load_image`` two or three times more), and said in ``load_image``'s very words."""
    from salience.explore.images import unreadable

    (tmp_path / "notes.jpg").write_text("not an image")
    shutil.copy(files.trunc, tmp_path / "cut.png")
    (tmp_path / "cut.jpg").write_bytes(_photo_jpeg()[:5000])
    for name in ("notes.jpg", "cut.png", "cut.jpg"):
        path = tmp_path / name
        with pytest.raises(SalienceError) as refused:
            load_image(path)
        said, opened = _opens(lambda: unreadable(path))
        assert said == str(refused.value) and opened.count(name) == 1, (name, opened)


def test_a_cut_jpeg_with_a_sound_header_fails_the_folder_check_as_load_image_does(tmp_path, capsys, started):
    """A folder whose one JPEG is a real photo cut short (its header sound, its data not): the check passed it and
    the page showed its error later; now the folder is left out naming the file and what to do. The check's verdict
    equals ``load_image``'s on every cut of a baseline and a progressive JPEG (a cut anywhere in the data, the end
    marker alone missing, the whole file), and a sound one after a cut one keeps the folder."""
    from salience.explore.images import unreadable

    for progressive in (False, True):
        whole = _photo_jpeg(progressive)
        for end in (len(whole) // 3, len(whole) * 2 // 3, len(whole) - 40, len(whole) - 2, len(whole)):
            path = tmp_path / f"p{int(progressive)}-{end}.jpg"
            path.write_bytes(whole[:end])
            try:
                load_image(path)
                want = None
            except SalienceError as e:
                want = str(e)
            assert unreadable(path) == want and (want is None) == (end == len(whole)), (progressive, end)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "a.jpg").write_bytes(_photo_jpeg()[:8000])
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", cut)
    assert rc == 2 and started == []
    assert err.splitlines()[0].startswith(f"salience: left out {cut}: none of its 1 image file(s) can be read; the "
                                          f"first: {cut / 'a.jpg'}: corrupt or truncated JPEG file (image file is "
                                          "truncated"), err
    assert err.splitlines()[0].endswith("re-export or re-download it")
    (cut / "b.jpg").write_bytes(_photo_jpeg())
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", cut)
    assert (rc, err, started) == (0, "", [[str(cut)]])
