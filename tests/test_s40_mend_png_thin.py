"""A thin 16-bit PNG whose rows use Average / Paeth is refused, with what to do, before its anti-diagonal decode
(one numpy step a diagonal: a 1 x 100,000 image took 3.3 s, a 1 x 50,000,000 one, within the pixel limit, about 27
minutes). Timing-free: a SIGALRM at 5 s fails the test where the decode ran; the step count is checked too."""
from __future__ import annotations

import signal
import struct
import zlib

import pytest

from salience import SalienceError
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
def test_a_thin_paeth_png_is_refused_quickly(tmp_path, w, h):
    path = tmp_path / "thin.png"
    path.write_bytes(_thin_png(w, h, 4))
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        with pytest.raises(SalienceError, match="None / Sub / Up") as e:
            load_image(path, max_pixels=None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert str(path) in str(e.value) and "200,00" in str(e.value)


def test_the_step_count_of_a_square_image_is_within_the_cap():
    png._check_steps(7071, 7071, 1024)  # a square 50-megapixel image: 7071 + 7 x 7071 = 56,568 steps
    with pytest.raises(SalienceError):
        png._check_steps(1, 100_000, 1024)  # 100,001 steps


def test_a_thin_sub_png_still_decodes(tmp_path):
    path = tmp_path / "thin.png"
    path.write_bytes(_thin_png(200_000, 1, 1))
    assert float(load_image(path, max_pixels=None).abs().max()) == 0.0
