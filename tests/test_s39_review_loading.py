"""Review of the merge 08c218c (16-bit colour PNGs read twice, _extra_state, whole-float sizes): each test here
failed against the merge."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from salience.loading import load_image

cv2 = pytest.importorskip("cv2")


def _through_pipe(tmp_path, body: bytes):
    """``load_image`` of a named pipe a thread writes ``body`` to: its tensor or error, or ``None`` if it waited
    10 s (the reader is then let go with an empty write)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(body)

    got: dict = {}

    def read() -> None:
        try:
            got["x"] = load_image(fifo)
        except Exception as e:  # noqa: BLE001 - returned to the test
            got["x"] = e

    threads = [threading.Thread(target=write, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    threads[1].join(10)
    if not threads[1].is_alive():
        return got["x"]
    try:  # let the reader waiting on the pipe go: a writer that closes at once (EOF)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
    threads[1].join(5)
    return None


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


@needs_fifo
def test_a_16_bit_png_from_a_pipe_is_read_once_not_waited_for(tmp_path):
    """A pipe (bash's ``<(curl ...)``, a named pipe) gives its bytes once: the merge opened a 16-bit colour PNG a
    second time for its low bytes and waited for ever on the pipe (an 8-bit one, or any before the merge, loaded)."""
    a = np.random.default_rng(3).integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    a[a % 257 == 0] += 1
    assert cv2.imwrite(str(tmp_path / "s.png"), a[..., ::-1].copy())
    x = _through_pipe(tmp_path, (tmp_path / "s.png").read_bytes())
    assert x is not None, "load_image waited on the pipe for a second reading"
    assert isinstance(x, torch.Tensor), x
    assert torch.equal(x, torch.from_numpy((a.astype(np.float64) / 65535).astype(np.float32)).permute(2, 0, 1))


@needs_fifo
def test_no_image_from_a_pipe_is_said_at_once(tmp_path):
    """Bytes PIL cannot identify: the message looks at the file's first bytes (a TIFF?), which read the pipe a
    second time and waited for ever."""
    from salience import SalienceError

    x = _through_pipe(tmp_path, b"no image, some text\n")
    assert x is not None, "load_image waited on the pipe for its first bytes"
    assert isinstance(x, SalienceError) and "not an image file" in str(x), x


def test_a_meta_tensor_size_or_mean_is_refused_as_bad_input():
    """The merge read a tensor ``size`` with ``.tolist()``, which a meta tensor answers with NotImplementedError
    (before it, any tensor size was refused with a SalienceError); means and the ModelInfo's own numbers likewise."""
    from salience import SalienceError
    from salience._core.info import ModelInfo
    from salience.loading import normalize_input, with_preprocessing

    info = ModelInfo(name="m", input_size=(8, 8))
    meta = torch.tensor([8.0, 8.0], device="meta")
    for kwargs in ({"size": torch.tensor(8, device="meta")}, {"size": meta}, {"mean": meta[:1]}, {"std": meta[:1]}):
        with pytest.raises(SalienceError, match=rf"{next(iter(kwargs))} must be"):
            with_preprocessing(info, **kwargs)
    for bad in (ModelInfo(name="m", input_size=meta), ModelInfo(name="m", mean=meta[:1])):
        with pytest.raises(SalienceError, match=r"normalize_input: the ModelInfo's"):
            normalize_input(torch.rand(3, 4, 4), bad)


def test_a_16_bit_png_replaced_while_it_is_read_is_read_whole(tmp_path, monkeypatch):
    """The low bytes came from a second opening of the file: one replaced in between by an image of another size
    (a folder being re-exported) raised numpy's ValueError (broadcasting), which load_images does not catch. Since
    session 40 a 16-bit PNG is read once and decoded from those bytes (salience.loading.png): what comes back is the
    one image whose header was read, whole, never one image's bytes joined to another's."""
    from PIL import Image

    from salience._core.info import ModelInfo
    from salience.loading import load_images

    p = tmp_path / "a.png"
    assert cv2.imwrite(str(p), np.full((4, 5, 3), 1000, np.uint16))
    opened = Image.open

    def open_then_replace(fp, *args, **kwargs):
        im = opened(fp, *args, **kwargs)
        w, h = im.size  # replaced after each opening by one of another size and value
        assert cv2.imwrite(str(p), np.full((h + 2, w + 2, 3), 3000, np.uint16))
        return im

    monkeypatch.setattr(Image, "open", open_then_replace)
    x = load_image(p)
    assert torch.equal(x, torch.full((3, 4, 5), 1000 / 65535))
    batch, ok, errors = load_images([p], ModelInfo(name="m"))
    assert errors == [] and torch.equal(batch[0], torch.full((3, 6, 7), 3000 / 65535))
