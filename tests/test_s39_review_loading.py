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


# --------------------------------------------------------------- tRNS: a key colour of a gray or RGB PNG is transparent

def _with_trns(png: bytes, key: bytes) -> bytes:
    """``png`` with a tRNS chunk (before its first IDAT): the key colour, 2 bytes a sample, big-endian."""
    from test_s39_loading_png16 import _chunk

    at = png.index(b"IDAT") - 4
    return png[:at] + _chunk(b"tRNS", key) + png[at:]


def test_an_8_bit_rgb_or_gray_png_with_a_key_colour_is_white_where_the_key_is():
    """A tRNS chunk makes every pixel of its colour transparent (PNG spec 11.3.2.1; Pillow's ``convert("RGBA")``
    gives them alpha 0): composited on white as alpha and palette transparency are. They kept the key colour."""
    import io

    from PIL import Image

    rgb = np.array([[[10, 20, 30], [10, 20, 31], [200, 100, 0]]], np.uint8)
    for arr, key in ((rgb, (10, 20, 30)), (rgb[..., 0], 10)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG", transparency=key)
        x = load_image("k.png", data=buf.getvalue())
        want = np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr.copy()
        want = np.where((arr == key if arr.ndim == 2 else (arr == key).all(-1))[..., None], 255, want)
        assert torch.equal(x, torch.from_numpy(want).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3)])
def test_a_16_bit_png_with_a_key_colour_is_white_where_all_16_bits_match(colour_type, channels):
    """The key of a 16-bit PNG is 16 bits a sample: the pixel equal to it is white, one equal in its high bytes alone
    (what an 8-bit reading compares) keeps its value. Both kept the key colour."""
    from test_s39_loading_png16 import _on_white, _png

    a = np.array([[[1000, 2000, 3000], [1001, 2000, 3000], [40000, 5, 65534]]], np.uint16)[..., :channels]
    key = a[0, 0]
    png = _with_trns(_png(a, colour_type), key.astype(">u2").tobytes())
    want = _on_white(a[..., 0] if channels == 1 else a)
    want[:, 0, 0] = 1.0
    assert torch.equal(load_image("k.png", data=png), want)
