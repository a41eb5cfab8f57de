"""Review of the branch that reads inputs through one checked handle (``load_image``'s one open, ``read_text``).
Each test marked "fails on the branch" failed on its head (4a46f37a) and passes with the review's fixes:

1. A device named as an image (``/dev/null``; ``/dev/stdin`` on a terminal or ``< /dev/null``) was refused with
   "... is not a regular file ...; remove it": advice to remove ``/dev/null`` or ``/dev/stdin``. A device or a
   socket is now said as what it is, never "remove it" (``_core.files.not_image_file``); a FIFO keeps its words.
2. A socket named as an image (or as a list, a labels CSV) said "cannot be read (No such device or address); check
   the path and its permissions": now "is a socket, not an image file" ("a FIFO, a device or a socket, not a
   regular file" of a text).
3. A labels CSV over ``TEXT_FILE_CAP`` said "split it in smaller files", which ``labels=`` (one file) cannot take:
   each caller says what it can take (several lists; one CSV of this run's images).
4. A list saved as UTF-16 (Windows' "Unicode") said "not UTF-8 text (byte 0: invalid start byte)": now it says
   UTF-16.
5. ``read_labels`` (``--labels``, the class names' file) still opened its file by path: a FIFO waited for ever
   (run in a thread joined with a timeout: a regression fails, it never hangs the suite).
6. ``Store._restore_labels`` read the whole ``inputs.parquet`` (paths and all) on every resume with labels, where the
   base read its schema and labels alone: now one handle, its schema and labels, the whole table only to write it.
The others guard what the branch keeps: no descriptor left open on any path (counted in ``/proc/self/fd``), every
format read as on the base, a BOM and CRLF lines in a list and a CSV.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience._core import files
from salience.loading import load_image
from salience.loading.models import read_labels
from salience.runs import sources

fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")
procfd = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="/proc/self/fd")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _within(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """``fn()`` in a thread joined with a timeout: what it returned or raised; a hang fails the test."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still waiting after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------------------- 1, 2. devices and sockets as images


@pytest.mark.skipif(os.name == "nt" or not os.path.exists("/dev/null"), reason="/dev/null")
@pytest.mark.parametrize("check", ["load_image", "check_image_file"])
def test_a_device_as_an_image_is_said_a_device_never_to_remove(check):
    """Fails on the branch ("/dev/null is not a regular file (...); remove it, then ..."): telling a user to remove
    /dev/null (or /dev/stdin) is wrong, and as root harmful."""
    call = load_image if check == "load_image" else files.check_image_file
    with pytest.raises(SalienceError) as e:
        call("/dev/null")
    assert str(e.value) == ("/dev/null is a device, not an image file; give the image as a file (a pipe from the "
                            "shell, <(...), is read)")
    assert "remove" not in str(e.value)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="AF_UNIX")
def test_a_socket_as_an_image_is_said_a_socket(tmp_path):
    """Fails on the branch ("cannot be read (No such device or address); check the path and its permissions")."""
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        for call in (load_image, files.check_image_file):
            with pytest.raises(SalienceError, match=r"s\.png is a socket, not an image file; give the image as a file"):
                call(path)


@fifo
def test_a_fifo_named_as_an_image_keeps_its_words(tmp_path):
    """Guard: a FIFO (a user's, to be removed) is still said so, with "remove it"."""
    path = tmp_path / "f.png"
    os.mkfifo(path)
    with pytest.raises(SalienceError, match=r"f\.png is not a regular file \(a FIFO, a device or a socket of an "
                                            r"image's name\); remove it, then give the image as a file"):
        files.check_image_file(path)


# ------------------------------------------------------------------------------------------------- 3, 4. texts


def test_a_labels_csv_over_the_cap_says_what_labels_can_take(tmp_path, monkeypatch):
    """Fails on the branch ("(split it in smaller files)": ``labels=`` takes one file). A list over it says to split
    it into lists, which a run takes several of."""
    monkeypatch.setattr(files, "TEXT_FILE_CAP", 8)
    csv = tmp_path / "labels.csv"
    csv.write_text("x.png,1\ny.png,2\n")
    with pytest.raises(SalienceError) as e:
        sources.read_labels_csv(csv, ["x.png"], None)
    assert str(e.value).endswith("(keep the lines of this run's images alone: one labels file is read)")
    lst = tmp_path / "list.txt"
    lst.write_text("x.png\ny.png\n")
    with pytest.raises(SalienceError, match=r"\(split it into smaller lists and give them all\)$"):
        sources.expand([lst])


def test_a_list_or_csv_in_utf16_says_utf16(tmp_path):
    """Fails on the branch ("not UTF-8 text (byte 0: invalid start byte)", which does not tell the user why)."""
    lst = tmp_path / "list.txt"
    lst.write_bytes("x.png\r\n".encode("utf-16"))
    with pytest.raises(SalienceError) as e:
        sources.expand([lst])
    assert str(e.value) == (f"{lst}: UTF-16 text (its byte order mark), not UTF-8; expected a text file of image "
                            "paths, one a line (UTF-8), saved as UTF-8")
    csv = tmp_path / "l.csv"
    csv.write_bytes("x.png,1\n".encode("utf-16-be").join([b"\xfe\xff", b""]))
    with pytest.raises(SalienceError, match=r"^labels=\S+l\.csv: UTF-16 text \(its byte order mark\), not UTF-8; "):
        sources.read_labels_csv(csv, ["x.png"], None)


def test_a_bom_and_crlf_lines_in_a_list_and_a_csv_read_as_before(tmp_path):
    """Guard (passes on the base and the branch): ``utf-8-sig``'s BOM dropped, ``\\r\\n`` lines, comments."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfx.png\r\n# a comment\r\n\r\n")
    assert sources.expand([lst]) == [str(tmp_path / "x.png")]
    csv = tmp_path / "l.csv"
    csv.write_bytes(b"\xef\xbb\xbfpath,label\r\nx.png,1\r\n")
    assert sources.read_labels_csv(csv, [str(tmp_path / "x.png")], None) == [1]


def test_a_300k_path_list_is_far_under_the_cap():
    """Guard: a list of 300 000 ImageNet-like absolute paths is ~15 MiB, a sixteenth of ``TEXT_FILE_CAP``."""
    size = sum(len(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG\n") for i in range(300_000))
    assert size < files.TEXT_FILE_CAP / 16


# ------------------------------------------------------------------------------------- 5. the class names' file


@fifo
def test_a_class_names_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    """Fails on the branch (read by path: the open waited for a writer for ever; here the thread's timeout)."""
    path = tmp_path / "names.txt"
    os.mkfifo(path)
    with pytest.raises(SalienceError, match=r"^labels file \S+names\.txt: a FIFO, a device or a socket, not a "
                                            r"regular file; expected class names"):
        _within(lambda: read_labels(path))


def test_a_class_names_file_reads_as_before(tmp_path):
    """A BOM, CRLF lines, a JSON list read as before (a guard); a non-UTF-8 file is one line naming the file and
    saying what was expected (fails on the branch: "cannot be read ('utf-8' codec can't decode ...)")."""
    p = tmp_path / "names.txt"
    p.write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n")
    assert read_labels(p) == ("cat", "dog")
    p.write_text('["a", "b"]')
    assert read_labels(p) == ("a", "b")
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(SalienceError, match=r"^labels file \S+names\.txt: not UTF-8 text \(byte 3: "):
        read_labels(p)


# -------------------------------------------------------------------------------------- descriptors, formats


def _images(d: Path) -> list[Path]:
    from PIL import Image

    arr = (np.arange(30 * 40 * 3) % 251).astype(np.uint8).reshape(30, 40, 3)
    im = Image.fromarray(arr)
    out = []
    for name, kw in [("a.png", {}), ("a.jpg", {}), ("a.bmp", {}), ("lzw.tif", {"compression": "tiff_lzw"}),
                     ("d.tif", {"compression": "tiff_adobe_deflate"})]:
        im.save(d / name, **kw)
        out.append(d / name)
    Image.fromarray(arr[..., 0] > 100).save(d / "g4.tif", compression="group4")
    Image.fromarray((arr[..., 0] / 255).astype(np.float32)).save(d / "f.tif")
    im.save(d / "anim.gif", save_all=True, append_images=[Image.fromarray(255 - arr)])
    im.save(d / "multi.tif", save_all=True, append_images=[Image.fromarray(255 - arr)], compression="tiff_lzw")
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "rot.jpg", exif=exif)
    out += [d / n for n in ("g4.tif", "f.tif", "anim.gif", "multi.tif", "rot.jpg")]
    try:
        import cv2

        cv2.imwrite(str(d / "p16.png"), np.full((4, 5, 3), 1000, np.uint16))
        out.append(d / "p16.png")
    except ImportError:
        pass
    return out


@procfd
def test_every_format_reads_through_the_handle_and_leaves_no_descriptor(tmp_path):
    """Guard: libtiff's decoders (LZW, deflate, group 4) read through the handle's descriptor, a multi-frame GIF or
    TIFF, EXIF orientation, a 16-bit PNG: each read as Pillow reads the file by its name (its first frame,
    transposed), and no descriptor left open (nor one closed twice: a later open would fail)."""
    from PIL import Image, ImageOps

    for path in _images(tmp_path):
        before = _fds()
        x = load_image(path)
        assert _fds() == before, path
        if path.name == "p16.png":
            assert torch.allclose(x, torch.full_like(x, 1000 / 65535)), path
            continue
        with Image.open(path) as im:
            ref = ImageOps.exif_transpose(im)
            ref = np.asarray(ref.convert("F") if ref.mode == "F" else ref.convert("RGB"), np.float32)
        ref = ref if ref.ndim == 3 else np.repeat(ref[..., None], 3, 2)
        ref = ref if path.name == "f.tif" else ref / 255
        assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6), path


@procfd
@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError, ValueError])
def test_an_error_from_pillow_mid_decode_leaves_no_descriptor(tmp_path, monkeypatch, error):
    """Guard: Pillow raising in ``load()`` (Ctrl-C, out of memory, a decoder's error) closes the handle."""
    from PIL import ImageFile

    path = tmp_path / "a.png"
    _images(tmp_path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(error()))
    before = _fds()
    with pytest.raises((error, SalienceError)):
        load_image(path)
    assert _fds() == before


@procfd
@fifo
def test_pipes_and_refusals_leave_no_descriptor(tmp_path):
    """Guard: a named pipe with no writer (waited on a short while), one written and closed, a device, a folder
    list, a FIFO labels CSV: no descriptor left open."""
    from salience.loading import images

    path = tmp_path / "p.png"
    os.mkfifo(path)
    before = _fds()
    old = images.PIPE_WAIT_S
    images.PIPE_WAIT_S = 0.2
    try:
        with pytest.raises(SalienceError, match="no program opened for writing"):
            load_image(path)
    finally:
        images.PIPE_WAIT_S = old
    png = _images(tmp_path)[0].read_bytes()

    def write() -> None:
        with open(path, "wb") as w:
            w.write(png)

    t = threading.Thread(target=write)
    t.start()
    assert load_image(path).shape == (3, 30, 40)
    t.join()
    if os.path.exists("/dev/null"):
        with pytest.raises(SalienceError):
            load_image("/dev/null")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(SalienceError, match="a folder, not a regular file"):
        sources.read_labels_csv(tmp_path / "dir.csv", [], None)
    with pytest.raises(SalienceError, match="a FIFO, a device or a socket"):
        _within(lambda: sources.read_labels_csv(path, [], None))
    assert _fds() == before


# ----------------------------------------------------------------------------------------- 6. inputs.parquet


def test_a_resume_whose_inputs_hold_its_labels_reads_them_alone(tmp_path, monkeypatch):
    """Fails on the branch (its one read of ``inputs.parquet`` was the whole table, paths and all: 69 MiB for a
    million rows where its labels are 8 MiB, on every resume of a run with labels). Now its schema and its labels
    column, through the one handle; the whole table only when the labels are written back (test_s60_ends.py)."""
    import pyarrow.parquet as pq

    import test_s57_ends2
    from salience.runs import store

    run = tmp_path / "run"
    test_s57_ends2._a_run(run, labels=[1, 2])
    real, reads = pq.read_table, []

    def read_table(source, *args, **kwargs):
        reads.append(kwargs.get("columns"))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_table)
    restore, during = store.Store._restore_labels, []

    def counted(self, *args, **kwargs):
        start = len(reads)
        restore(self, *args, **kwargs)
        during.extend(reads[start:])

    monkeypatch.setattr(store.Store, "_restore_labels", counted)
    test_s57_ends2._a_run(run, labels=[1, 2])
    assert during == [["label"]]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="AF_UNIX")
def test_a_socket_as_a_list_or_labels_csv_is_said_not_a_regular_file(tmp_path):
    """Fails on the branch ("cannot read it (No such device or address); check the path and its permissions": a
    socket's open fails with ENXIO). Now said as the FIFO and the device are."""
    path = tmp_path / "s.csv"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(SalienceError, match=r"^labels=\S+s\.csv: a FIFO, a device or a socket, not a regular "
                                                r"file; expected a CSV file of path,label lines"):
            sources.read_labels_csv(path, [], None)
