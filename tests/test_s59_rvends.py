"""Review of branch wt-ends59 (runs' files read through one checked handle, ``load_image`` of a named pipe, flags in
full). Each test marked "fails before" failed on the branch as its author left it (commit bbb0424d), as its docstring
says; the others guard what the fixes must keep.

1. ``load_image`` of a named pipe (``mkfifo``'s) refused a pipe whose writer had it open but sent nothing for
   ``PIPE_WAIT_S`` (5 s): ``mkfifo p; curl URL > p & salience explain p`` with a slow server. Now the wait is bounded
   only while no program has the pipe open for writing (a read that does not wait: ``EAGAIN`` says a writer is
   there); a writer that is there is read to its end with no time limit, and one that opens and closes it without
   writing gives an empty image (the error of an empty file).
2. Review of the rest. An empty map file (``maps/<method>/<shard>.npy`` of 0 bytes) raises numpy's ``EOFError``,
   which the explorer's stored map did not catch: a 500; now a damaged map, 404. Where neither ``/proc/self/fd`` nor
   ``/dev/fd`` is there (a container without ``/proc``), a run's table was handed to pyarrow by its name unchecked:
   a FIFO there made ``read_schema`` wait for ever; now looked at again, a ``SalienceError``. ``FullFlags`` named
   ``--help`` for ``--ep`` (an abbreviation of both ``--epochs`` and ``--epsilon``): now both; and ``--lr -1e-3``
   was "expected one argument" in the trainer's parser (the ``salience`` command's alone read it): now its value.
   Guards: no descriptor is left open by any refused read.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_s57_ends2
from salience import SalienceError
from salience.loading import images, load_image

fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")
linux = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="Linux FIFO semantics")


def _png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1


def _read_in_thread(path: Path, limit: float = 20) -> dict:
    """``load_image(path)`` in a thread: ``{"x": tensor}`` or ``{"error": e}``, and ``"took"``; a wait longer than
    ``limit`` lets the reader go with a writer that closes at once and fails the test."""
    got: dict = {}

    def read() -> None:
        start = time.monotonic()
        try:
            got["x"] = load_image(path)
        except Exception as e:  # noqa: BLE001 - returned to the test
            got["error"] = e
        got["took"] = time.monotonic() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(limit)
    if reader.is_alive():  # pragma: no cover - a regression: let the reader go (EOF)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail(f"load_image waited on {path} for more than {limit} s")
    return got


# ------------------------------------------------------------------------------ 1. a named pipe's slow writer

@fifo
def test_a_named_pipes_slow_writer_is_read_however_long_it_takes_to_send(tmp_path, monkeypatch):
    """Fails before: a writer that opens the pipe at once and sends its bytes 1.5 s later (PIPE_WAIT_S 0.5 s: a
    slow server behind ``curl URL > p &``) was refused ("nothing was written to in 0.5 s"). Now read whole: the
    image of the file."""
    monkeypatch.setattr(images, "PIPE_WAIT_S", 0.5)
    png = _png(tmp_path / "a.png")
    data = png.read_bytes()
    path = tmp_path / "in.png"
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as f:  # opens as soon as the reader has it open
            time.sleep(1.5)
            f.write(data[:30])
            f.flush()
            time.sleep(0.3)
            f.write(data[30:])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = _read_in_thread(path)
    writer.join(10)
    assert "error" not in got, got.get("error")
    assert got["took"] >= 1.5
    assert np.array_equal(got["x"].numpy(), load_image(png).numpy())


@fifo
def test_a_named_pipe_without_a_writer_is_refused_within_the_bound(tmp_path, monkeypatch):
    """Guard (and the message, which fails before: it said "nothing was written to", no longer the test): no program
    opens the pipe for writing: a SalienceError after PIPE_WAIT_S, not much later, no descriptor left open."""
    monkeypatch.setattr(images, "PIPE_WAIT_S", 0.3)
    path = tmp_path / "in.png"
    os.mkfifo(path)
    before = _open_fds()
    got = _read_in_thread(path)
    assert _open_fds() == before
    assert isinstance(got.get("error"), SalienceError), got
    assert 0.3 <= got["took"] < 3, got
    assert str(got["error"]) == (
        f"{path}: a named pipe that no program opened for writing in 0.3 s; start the program that writes the image "
        "to it first, or save the image to a file and give its path")


@fifo
@linux
def test_a_named_pipe_opened_and_closed_without_writing_is_an_empty_image(tmp_path, monkeypatch):
    """A writer that opens the pipe and closes it without writing: the error of an empty image file, at once (not
    after the wait: PIPE_WAIT_S is 10 s here). Guard: before, the close woke the wait and gave this same error; the
    poll must still tell "came and closed" (its end of file ready) from "none yet" (Linux)."""
    monkeypatch.setattr(images, "PIPE_WAIT_S", 10.0)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(SalienceError) as file_error:
        load_image(empty)
    path = tmp_path / "in.png"
    os.mkfifo(path)

    def write() -> None:
        time.sleep(0.3)
        os.close(os.open(path, os.O_WRONLY))  # waits for the reader, then closes: nothing sent

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = _read_in_thread(path)
    writer.join(10)
    assert isinstance(got.get("error"), SalienceError), got
    assert str(got["error"]) == str(file_error.value).replace(str(empty), str(path))
    assert got["took"] < 5, got


@fifo
@linux
def test_a_named_pipe_whose_writer_waits_then_closes_without_writing_is_an_empty_image(tmp_path, monkeypatch):
    """Fails before: a writer that holds the pipe open past PIPE_WAIT_S (0.3 s) and then closes it without writing was
    refused as writerless; now it is waited on (it is there) and its empty pipe is an empty image."""
    monkeypatch.setattr(images, "PIPE_WAIT_S", 0.3)
    path = tmp_path / "in.png"
    os.mkfifo(path)

    def write() -> None:
        fd = os.open(path, os.O_WRONLY)
        time.sleep(1.0)
        os.close(fd)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = _read_in_thread(path)
    writer.join(10)
    assert isinstance(got.get("error"), SalienceError), got
    assert "not an image file PIL can read" in str(got["error"]), got
    assert got["took"] >= 0.9, got


# ------------------------------------------------------------------------------ 2. review of the rest

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of 2 images (one shard), copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("s59rv") / "run"
    test_s57_ends2._a_run(folder)
    return folder


def _copy(finished: Path, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "box" / "run"
    shutil.copytree(finished, folder)
    return folder


def test_an_empty_map_file_is_a_damaged_map_in_the_explorer_not_a_500(finished, tmp_path):
    """Fails before: the explorer's stored map of an empty map file raised numpy's ``EOFError`` (no ``OSError``, not
    caught: the server's 500). Now ``NotStored`` (404) saying the maps are damaged."""
    from salience.explore.runs import NotStored, RunSource
    from salience.runs.store import open_run

    folder = _copy(finished, tmp_path)
    shard = open_run(folder).table.column("shard")[0].as_py()
    (folder / "maps" / "vanilla" / f"{shard}.npy").write_bytes(b"")
    with pytest.raises(NotStored, match="maps for this row are damaged: .* is not a readable array of maps "
                                        r"\(EOFError\)"):
        RunSource(folder).stored_map(0, "vanilla")


def _no_fd_folders(monkeypatch) -> None:
    real = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p in ("/proc/self/fd", "/dev/fd") else real(p))


def test_without_proc_a_runs_tables_read_the_same(finished, monkeypatch):
    """Guard: without ``/proc/self/fd`` and ``/dev/fd`` the tables are read by their names, the same tables."""
    import pyarrow.parquet as pq

    from salience.runs import store

    _no_fd_folders(monkeypatch)
    assert store.read_shards(finished).equals(pq.read_table(next((finished / "shards").glob("*.parquet"))))
    assert store._read_table(finished / "inputs.parquet").equals(pq.read_table(finished / "inputs.parquet"))
    assert store.done_indices(finished) == {0, 1}


@fifo
def test_without_proc_a_table_swapped_for_a_fifo_is_refused_not_waited_on(finished, tmp_path, monkeypatch):
    """Fails before (killed here by a 20 s bound in a thread): without ``/proc``, a table checked regular on its
    handle and then swapped for a FIFO (the swap stood in for by an ``os.open`` that opens the real file once) was
    handed to pyarrow by name, and ``read_schema`` waited for a writer. Now a ``SalienceError`` saying so.
    (Read by ``_read_table`` since session 60, which removed ``_table_names``: the same ``_table_source``.)"""
    from salience.runs import store

    folder = _copy(finished, tmp_path)
    path = folder / "inputs.parquet"
    real_bytes = path.read_bytes()
    keep = tmp_path / "real.parquet"
    keep.write_bytes(real_bytes)
    path.unlink()
    os.mkfifo(path)
    real_open = os.open

    def open_real_once(p, *args, **kwargs):  # the handle's check sees the regular file it was
        if os.fspath(p) == os.fspath(path):
            return real_open(keep, *args, **kwargs)
        return real_open(p, *args, **kwargs)

    _no_fd_folders(monkeypatch)
    monkeypatch.setattr(os, "open", open_real_once)
    got: dict = {}

    def read() -> None:
        try:
            got["names"] = store._read_table(path).column_names
        except Exception as e:  # noqa: BLE001 - returned to the test
            got["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # let it go: a writer that closes at once
        os.close(real_open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("pyarrow waited on a FIFO of a table's name")
    assert isinstance(got.get("error"), SalienceError), got
    assert "is not a regular file (a FIFO, a device or a socket of a run file's name); remove it" in str(got["error"])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="/proc/self/fd")
def test_no_refused_read_leaves_a_descriptor_open(tmp_path):
    """Guard: a damaged map (empty, cut short, a pickle, an object array, an .npz), a FIFO under a map's or a table's
    name, a damaged table, a missing one: the same number of open descriptors after each refusal."""
    from salience.runs import store

    cases = {"empty": b"", "short": np.lib.format.MAGIC_PREFIX + b"\x01\x00\x20", "pickle": b"\x80\x04K\x01.",
             "table": b"PAR1 not a table PAR1"}
    for name, data in cases.items():
        (tmp_path / f"{name}.npy").write_bytes(data)
    np.save(tmp_path / "object.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "archive.npy", a=np.zeros(3))
    os.mkfifo(tmp_path / "fifo.npy")
    before = _open_fds()
    for name in ("empty", "short", "pickle", "table", "object", "archive.npy", "fifo", "missing"):
        p = tmp_path / (name if name.endswith(".npy") else f"{name}.npy")
        with pytest.raises((OSError, EOFError, ValueError, SalienceError)):
            store._load_maps(p)
        with pytest.raises(Exception):  # noqa: B017 - pyarrow's own errors, SalienceError for the FIFO
            store._read_table(p)
        assert _open_fds() == before, name


def test_full_flags_name_every_flag_an_abbreviation_stands_for():
    """Fails before: ``--ep`` (an abbreviation of ``--epochs`` and ``--epsilon``) was refused "did you mean
    '--help'?"; now both are named. One flag's abbreviation names it; a misspelling the closest (as before)."""
    import contextlib
    import io

    from salience._core.args import FullFlags

    p = FullFlags(prog="t")
    p.add_argument("--epochs", type=int)
    p.add_argument("--epsilon", type=float)
    p.add_argument("--lr", type=float)

    def refusal(argv: list) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
            p.parse_args(argv)
        return err.getvalue().strip().splitlines()[-1]

    assert refusal(["--ep", "3"]) == "t: error: unrecognized arguments: --ep 3; did you mean '--epochs' or '--epsilon'?"
    assert refusal(["--ep=3"]) == "t: error: unrecognized arguments: --ep=3; did you mean '--epochs' or '--epsilon'?"
    assert refusal(["--epo", "3"]) == "t: error: unrecognized arguments: --epo 3; did you mean '--epochs'?"
    assert refusal(["--lrr=0.1"]) == "t: error: unrecognized arguments: --lrr=0.1; did you mean '--lr'?"
    assert p.parse_args(["--epochs=3", "--lr", "-1"]).epochs == 3


def test_full_flags_read_a_negative_value_in_any_form():
    """Fails before: ``--lr -1e-3`` was argparse's "expected one argument" under ``FullFlags`` (only the
    ``salience`` command's parser read it); now its value, as ``--lr=-1e-3`` and ``--lr -0.5`` are."""
    from salience._core.args import FullFlags

    p = FullFlags(prog="t")
    p.add_argument("--lr", type=float)
    p.add_argument("name", nargs="?")
    assert p.parse_args(["--lr", "-1e-3"]).lr == -1e-3
    assert p.parse_args(["--lr", "-.5", "x"]).lr == -0.5
    assert p.parse_args(["--lr=-1e-3"]).lr == -1e-3
    assert p.parse_args(["--", "-1e-3"]).name == "-1e-3"
