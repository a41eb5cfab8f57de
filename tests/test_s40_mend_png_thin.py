"""A thin 16-bit PNG whose rows use Average / Paeth (one numpy step a diagonal: a 1 x 100,000 image took 3.3 s, a
1 x 50,000,000 one, within the pixel limit, about 27 minutes) was refused in session 40, saying what to do; since
session 41 it is decoded by Pillow's C decoder on 8-bit PNGs of its filtered bytes (salience.loading.png
._unfilter_by_pillow). Timing-free: a SIGALRM at 5 s fails the test where the decode ran diagonal by diagonal."""
from __future__ import annotations

import signal
import struct
import zlib

import numpy as np
import pytest

from salience.loading import load_image
from salience.loading import png
from test_s39_loading_png16 import _chunk


def _thin_png(w: int, h: int, kind: int) -> bytes:
    """A 16-bit gray PNG, every scanline of filter ``kind`` with zero bytes (decodes to a black image)."""
    raw = (bytes([kind]) + bytes(2 * w)) * h
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return png.SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _alarm(signum, frame):
    raise AssertionError("the thin PNG was decoded diagonal by diagonal (over 5 s)")


@pytest.mark.parametrize("w, h", [(200_000, 1), (1, 200_000)])
def test_a_thin_paeth_png_is_decoded_quickly(tmp_path, w, h):
    path = tmp_path / "thin.png"
    path.write_bytes(_thin_png(w, h, 4))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        x = load_image(path, max_pixels=None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert x.shape == (3, h, w) and float(x.abs().max()) == 0.0


def test_the_step_count_picks_numpy_or_pillow(monkeypatch):
    """A square 50-megapixel image takes 7071 + 7 x 7071 = 56,568 diagonal steps: numpy; 1 x 100,000 takes 100,001:
    Pillow. None / Sub / Up rows count one step a row."""
    used = []
    monkeypatch.setattr(png, "_unfilter_by_pillow", lambda f, kinds, bpp: used.append((f.shape, bpp)) or f)
    png.unfilter(np.full((100, 1 + 2 * 7071), 4, np.uint8), 2)  # 100 rows: 100 + 7071 steps
    png.unfilter(np.full((100_001, 3), 2, np.uint8), 2)  # 100,001 Up rows
    png.unfilter(np.full((1, 1 + 2 * 100_000), 4, np.uint8), 2)  # 1 + 100,000 diagonals
    assert used == [((100_001, 2), 2), ((1, 200_000), 2)]


def test_a_thin_sub_png_still_decodes(tmp_path):
    path = tmp_path / "thin.png"
    path.write_bytes(_thin_png(200_000, 1, 1))
    assert float(load_image(path, max_pixels=None).abs().max()) == 0.0
