"""Session 60: the last three places that opened an input or a run file by path. Every test marked "fails on the
base" fails on the code before (the base commit 11f8b705), as its docstring says; the others guard what the change
must keep.

1. ``load_image`` looked at a file's name (``stat``: a pipe or not), then opened a regular file by path (its first
   bytes, then PIL's own open): a file swapped for a FIFO between the two was opened plainly, and the open waited for
   a writer for ever. Now the file is opened once without waiting (``_core.files.open_no_wait``), told by its handle
   (``fstat``) and read through it alone; a FIFO found there is a named pipe (waited on ``PIPE_WAIT_S`` at most). The
   swap is stood in for by an ``os.stat`` that says "regular" of the FIFO; the read runs in a thread joined with a
   timeout (a regression fails, it never hangs the suite).
2. A dataset's ``.txt`` list and its labels CSV were opened by path unchecked: a FIFO waited for ever (a labels CSV;
   a list swapped after its look), a non-UTF-8 file raised ``UnicodeDecodeError`` (a traceback, exit 3), a huge one
   was read whole. Now both are read by ``_core.files.read_text``: a ``SalienceError`` saying what was expected.
3. ``Store._restore_labels`` opened ``inputs.parquet`` three times (schema, labels, whole table). Now once.
"""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import salience
import test_s57_ends2
from salience import SalienceError
from salience.cli import main
from salience.loading import images, load_image

fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")
SRC = Path(salience.__file__).resolve().parents[1]


def _png(path: Path, bits: int = 8) -> Path:
    from PIL import Image

    if bits == 8:
        Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)).save(path)
    else:
        import cv2

        assert cv2.imwrite(str(path), np.full((4, 5, 3), 1000, np.uint16))
    return path


def _stat_says_regular(monkeypatch, path: Path, like: Path) -> None:
    """``os.stat`` of ``path`` (a FIFO) says what it says of the regular file ``like``: a swap of the file for the FIFO
    just after each look at its name."""
    real, seen = os.stat, os.stat(like)

    def stat(p, *args, **kwargs):
        if not isinstance(p, int) and os.fspath(p) == os.fspath(path):
            return seen
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)


def _bounded(read: Callable[[], Any], fifo_path: Path, within: float = 20) -> dict:
    """``read()`` in a thread joined after ``within`` s: ``{"value": ...}`` or ``{"error": ...}``; a read still
    waiting on the FIFO then fails the test (after a writer that closes at once has let it go)."""
    got: dict = {}

    def run() -> None:
        try:
            got["value"] = read()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            got["error"] = e

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(within)
    if reader.is_alive():
        for _ in range(20):  # each plain open of the FIFO waits again: let each go
            try:
                os.close(os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            reader.join(0.25)
            if not reader.is_alive():
                break
        pytest.fail(f"waited on the FIFO {fifo_path}")
    return got


# ------------------------------------------------------------------------------------------- 1. load_image


@fifo
def test_an_image_swapped_for_a_fifo_after_its_stat_is_not_waited_on(tmp_path, monkeypatch):
    """Fails on the base (the thread still waits after 20 s): the image's name looked at (regular), then opened by
    path, a FIFO by then. Now its one open does not wait and its handle says FIFO: a named pipe without a writer,
    refused after ``PIPE_WAIT_S``."""
    real = _png(tmp_path / "real.png")
    path = tmp_path / "a.png"
    os.mkfifo(path)
    monkeypatch.setattr(images, "PIPE_WAIT_S", 0.2)
    _stat_says_regular(monkeypatch, path, real)
    got = _bounded(lambda: load_image(path), path)
    assert isinstance(got.get("error"), SalienceError), got
    assert str(got["error"]).startswith(f"{path}: a named pipe that no program opened for writing in 0.2 s")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="/proc/self/fd")
def test_an_image_swapped_for_a_folder_after_its_stat_says_so_and_leaves_no_descriptor(tmp_path, monkeypatch):
    """Fails on the base ("cannot be read as an image (IsADirectoryError ...)": PIL's open of the name). Now the
    handle says folder: the message of a folder named as an image, and the handle closed."""
    path = tmp_path / "a.png"
    path.mkdir()
    _stat_says_regular(monkeypatch, path, _png(tmp_path / "real.png"))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SalienceError) as e:
        load_image(path)
    assert str(e.value) == f"{path}: is a directory, expected an image file (PNG, JPEG, ...)"
    assert len(os.listdir("/proc/self/fd")) == before


def _opens_of(monkeypatch, path: Path) -> list:
    """Every open of ``path`` by name from now on (``os.open``; ``open`` and ``io.open``: PIL's, ``file_start``'s,
    ``Path.read_bytes``')."""
    import io

    opened: list = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(p, *args, **kwargs):
        if not isinstance(p, int) and os.fspath(p) == os.fspath(path):
            opened.append("os.open")
        return real_os_open(p, *args, **kwargs)

    def open_(p, *args, **kwargs):
        if not isinstance(p, int) and isinstance(p, (str, os.PathLike)) and os.fspath(p) == os.fspath(path):
            opened.append("open")
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # Path.open's (Path.read_bytes')
    return opened


@pytest.mark.parametrize("bits", [8, 16])
def test_an_image_file_is_opened_once_and_read_through_that_handle(tmp_path, monkeypatch, bits):
    """Fails on the base (2 opens of an 8-bit PNG, its first bytes and PIL's; 2 of a 16-bit one, its first bytes and
    the whole file): the file is opened once, and the image is the same as PIL's of the path."""
    from PIL import Image

    path = _png(tmp_path / f"i{bits}.png", bits)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"), np.float32) / 255 if bits == 8 else np.full((4, 5, 3), 1000 / 65535)
    opened = _opens_of(monkeypatch, path)
    x = load_image(path)
    assert opened == ["os.open"]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-7)


def test_a_device_named_as_an_image_is_refused_as_check_image_file_refuses_it():
    """Fails on the base ("not an image file PIL can read": PIL read the device): a device (``/dev/null``, the
    handle's third case, neither a file nor a pipe) is refused as a run refuses it before it starts."""
    if not os.path.exists("/dev/null") or os.name == "nt":
        pytest.skip("/dev/null")
    with pytest.raises(SalienceError, match=r"^/dev/null is a device, not an image file; give the image as a file"):
        load_image("/dev/null")  # never "remove it" (tests/test_s60_rvends.py)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="/proc/self/fd")
def test_no_load_leaves_a_descriptor_open(tmp_path):
    """Guard: an image read, a damaged one refused, a missing one: no descriptor left open."""
    good = _png(tmp_path / "g.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    before = len(os.listdir("/proc/self/fd"))
    load_image(good)
    for name in ("bad.png", "text.png", "missing.png"):
        with pytest.raises(SalienceError):
            load_image(tmp_path / name)
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------------------------------- 2. list and labels


@fifo
def test_a_list_swapped_for_a_fifo_after_its_look_is_refused_not_waited_on(tmp_path, monkeypatch):
    """Fails on the base (the thread still waits after 20 s): ``expand`` looked at the list (a file) and read it by
    path. Now a ``SalienceError`` saying a list was expected."""
    from salience.runs import sources

    real = tmp_path / "real.txt"
    real.write_text("a.png\n")
    path = tmp_path / "list.txt"
    os.mkfifo(path)
    _stat_says_regular(monkeypatch, path, real)
    got = _bounded(lambda: sources.expand([path]), path)
    assert isinstance(got.get("error"), SalienceError), got
    assert str(got["error"]) == (f"{path}: a FIFO, a device or a socket, not a regular file; expected a text file "
                                 "of image paths, one a line (UTF-8)")


@fifo
def test_a_labels_csv_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """Fails on the base (the thread still waits after 20 s: ``open`` of the FIFO)."""
    from salience.runs import sources

    path = tmp_path / "labels.csv"
    os.mkfifo(path)
    got = _bounded(lambda: sources.read_labels_csv(path, ["a.png"], None), path)
    assert isinstance(got.get("error"), SalienceError), got
    assert str(got["error"]) == (f"labels={path}: a FIFO, a device or a socket, not a regular file; expected a CSV "
                                 "file of path,label lines (UTF-8)")


@fifo
def test_the_cli_refuses_a_fifo_list_and_a_fifo_labels_csv_in_one_line(tmp_path):
    """Fails on the base: a FIFO ``.txt`` was refused as an image ("of an image's name"); a FIFO labels CSV waited
    for ever (the child killed after 120 s). Now exit 2 and one line saying what was expected."""
    png = _png(tmp_path / "a.png")
    fifo_list, fifo_csv = tmp_path / "list.txt", tmp_path / "labels.csv"
    os.mkfifo(fifo_list)
    os.mkfifo(fifo_csv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for args, said in (([str(fifo_list)], f"{fifo_list}: a FIFO, a device or a socket, not a regular file; expected "
                                          "a text file of image paths, one a line (UTF-8)"),
                       ([str(png), str(png), "--labels-csv", str(fifo_csv)],
                        f"--labels-csv {fifo_csv}: a FIFO, a device or a socket, not a regular file; expected a CSV "
                        "file of path,label lines (UTF-8)")):
        try:
            done = subprocess.run([sys.executable, "-m", "salience", "explain", *args, "--model", "demo:shapes",
                                   "--out", str(tmp_path / "run"), "--workers", "0"],
                                  capture_output=True, text=True, timeout=120, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args}: waited on a FIFO")
        assert done.returncode == 2 and done.stderr == f"salience: error: {said}\n", done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _cli_error(capsys, *args: str) -> str:
    capsys.readouterr()
    rc = main(["explain", *args, "--model", "demo:shapes", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, (rc, err)
    return err.removeprefix("salience: error: ").strip()


def test_a_list_or_labels_csv_not_in_utf8_is_one_line(tmp_path, capsys):
    """Fails on the base: ``UnicodeDecodeError`` (an internal error, exit 3, with a traceback). Now exit 2 naming the
    file, its first bad byte and what was expected."""
    png = _png(tmp_path / "a.png")
    latin = tmp_path / "list.txt"
    latin.write_bytes(b"a.png\n\xe9t\xe9.png\n")
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"a.png,caf\xe9\n")
    out = str(tmp_path / "run")
    assert _cli_error(capsys, str(latin), "--out", out) == (
        f"{latin}: not UTF-8 text (byte 6: invalid continuation byte); expected a text file of image paths, one a "
        "line (UTF-8), saved as UTF-8")
    assert _cli_error(capsys, str(png), "--out", out, "--labels-csv", str(csv)).startswith(
        f"--labels-csv {csv}: not UTF-8 text (byte 9: ")
    with pytest.raises(SalienceError, match=r"^labels=\S+labels\.csv: not UTF-8 text \(byte 9: "):
        salience.explain_dataset("demo:shapes", [png], ["vanilla"], out, labels=csv, workers=0)
    assert not Path(out).exists()


def test_a_labels_csv_that_is_a_folder_says_a_csv_was_expected(tmp_path, capsys):
    """Fails on the base ("cannot read it (Is a directory)"): now it says it is a folder and what was expected."""
    png = _png(tmp_path / "a.png")
    folder = tmp_path / "labels"
    folder.mkdir()
    assert _cli_error(capsys, str(png), "--out", str(tmp_path / "run"), "--labels-csv", str(folder)) == (
        f"--labels-csv {folder}: a folder, not a regular file; expected a CSV file of path,label lines (UTF-8)")


def test_a_list_or_labels_csv_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Fails on the base (no cap: read whole). The cap is lowered to 64 bytes here; a file of 64 is read (guard)."""
    from salience._core import files
    from salience.runs import sources

    monkeypatch.setattr(files, "TEXT_FILE_CAP", 64, raising=False)
    lst, csv = tmp_path / "list.txt", tmp_path / "labels.csv"
    lst.write_text("x.png\n" * 11)  # 66 bytes
    csv.write_text("x.png,1\n" * 9)  # 72 bytes
    with pytest.raises(SalienceError, match=r"list\.txt: 66 bytes, over the 64 a text file may hold; expected a text "
                                            r"file of image paths"):
        sources.expand([lst])
    with pytest.raises(SalienceError, match=r"^labels=\S+: 72 bytes, over the 64 a text file may hold; expected a CSV"):
        sources.read_labels_csv(csv, ["x.png"], None)
    lst.write_text("x.png\n" * 10 + "y.pn")  # 64 bytes
    assert sources.expand([lst]) == [str(tmp_path / "x.png")] * 10 + [str(tmp_path / "y.pn")]


def test_lists_and_labels_read_as_before(tmp_path):
    """Guard: a list (a byte order mark, CRLF, comments, blank lines, relative and absolute paths) and a labels CSV (a
    header, names and indices, a quoted path with a comma) read as the base read them."""
    from salience.runs import sources

    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfa.png\r\n# a comment\r\n\r\n  sub/b.png  \r\n/abs/c.png\r\n")
    assert sources.expand([lst]) == [str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.png"), "/abs/c.png"]
    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"\xef\xbb\xbfpath,label\r\na.png,1\r\n\"b,c.png\",dog\r\n")
    with pytest.warns(UserWarning, match=r"names 2 of the 3 images; 1 has no label \(e\.g\. z\.png\)"):
        assert sources.read_labels_csv(csv, ["x/a.png", "b,c.png", "z.png"], ["cat", "dog"]) == [1, 1, None]


# ------------------------------------------------------------------------------------------- 3. inputs.parquet once


@pytest.mark.parametrize("case", ["no label column", "other labels", "same labels"])
def test_restore_labels_opens_inputs_parquet_once(tmp_path, monkeypatch, case):
    """Fails on the base (2, 3 and 2 opens: its schema then the whole table; its schema, its labels, the whole table;
    its schema and its labels). Now one open, and the table is what it was (the labels written back, the other
    columns and the mark kept)."""
    import pyarrow.parquet as pq

    from salience.runs import store

    run = tmp_path / "run"
    test_s57_ends2._a_run(run, labels=[1, 2])
    target = run / "inputs.parquet"
    kept = pq.read_table(target)
    if case == "no label column":
        pq.write_table(kept.drop(["label"]).replace_schema_metadata(None), target)
    elif case == "other labels":
        pq.write_table(kept.set_column(kept.column_names.index("label"), "label",
                                       __import__("pyarrow").array([2, 0], "int64")), target)
    before = target.stat().st_mtime_ns
    opened = _opens_of(monkeypatch, target)
    real = store.Store._restore_labels
    counted: list = []

    def restore(self, *args, **kwargs):
        start = len(opened)
        real(self, *args, **kwargs)
        counted.append(len(opened) - start)

    monkeypatch.setattr(store.Store, "_restore_labels", restore)
    test_s57_ends2._a_run(run, labels=[1, 2])
    assert counted == [1]
    table = pq.read_table(target)
    assert table.column("label").to_pylist() == [1, 2]
    assert table.drop(["label"]).equals(kept.drop(["label"]))
    assert table.schema.metadata[store.TABLE_MARK] == b"inputs"
    if case == "same labels":
        assert target.stat().st_mtime_ns == before  # not written again
