"""16-bit PNGs are read at their full depth. Pillow cuts 16-bit RGB, RGBA and gray + alpha PNGs to their high bytes
(a sample of 1000 read as 3 / 255 = 771 / 65535); salience read them so, and lost the low 8 bits in silence. Each
test here failed before the fix. The references are independent of salience and of Pillow: OpenCV's reader
(``cv2.imread(..., IMREAD_UNCHANGED)``, libpng) on files OpenCV wrote, and the arrays written by a small PNG encoder
made here from the PNG specification (every scanline filter, Adam7 interlacing, gray + alpha, which OpenCV does not
write)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from salience.loading import load_image, load_images
from salience._core.info import ModelInfo

cv2 = pytest.importorskip("cv2")

RNG = np.random.default_rng(39)


def _odd_samples(shape) -> np.ndarray:
    """16-bit samples none of which is a multiple of 257 (an 8-bit value widened): the low byte carries news."""
    a = RNG.integers(0, 65536, shape, dtype=np.uint16)
    a[a % 257 == 0] += 1
    a.flat[:2] = 65534, 1  # the two ends, not multiples of 257 either
    return a


def _cv2_file(tmp_path, a: np.ndarray, name: str):
    """``a`` (H, W, C), RGB(A) order, written by OpenCV (BGR(A) order in its arrays) and read back by it."""
    p = tmp_path / name
    bgr = a[..., [2, 1, 0, 3][:a.shape[-1]]] if a.ndim == 3 else a
    assert cv2.imwrite(str(p), np.ascontiguousarray(bgr))
    back = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16
    return p, back[..., [2, 1, 0, 3][:a.shape[-1]]] if a.ndim == 3 else back


def _on_white(a: np.ndarray) -> torch.Tensor:
    """The reference of load_image: samples / 65535, alpha (last channel of 2 or 4) composited on white."""
    f = a.astype(np.float64) / 65535
    if f.ndim == 2:
        f = np.repeat(f[..., None], 3, -1)
    elif f.shape[-1] in (2, 4):
        alpha = f[..., -1:]
        colour = f[..., :-1] if f.shape[-1] == 4 else np.repeat(f[..., :1], 3, -1)
        f = colour * alpha + (1 - alpha)
    return torch.from_numpy(f.astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_colour_pngs_keep_their_low_bytes(tmp_path, channels):
    a = _odd_samples((11, 13, channels))
    p, ref = _cv2_file(tmp_path, a, f"c{channels}.png")
    assert np.array_equal(ref, a)
    x = load_image(p)
    assert x.dtype == torch.float32 and x.shape == (3, 11, 13)
    if channels == 3:  # opaque: exactly the samples / 65535, as the 16-bit gray path scales them
        assert torch.equal(x, torch.from_numpy((ref.astype(np.float64) / 65535).astype(np.float32)).permute(2, 0, 1))
    torch.testing.assert_close(x, _on_white(ref), rtol=0, atol=1e-6)
    eight = torch.from_numpy((ref >> 8).astype(np.float32) / 255).permute(2, 0, 1)
    if channels == 3:
        assert (x - eight).abs().max() > 1e-3  # what the 8-bit reading gave differs: the test can tell


def test_16_bit_gray_png_as_opencv_reads_it(tmp_path):
    a = _odd_samples((9, 10))
    p, ref = _cv2_file(tmp_path, a, "g.png")
    assert torch.equal(load_image(p), _on_white(ref))


def test_opaque_16_bit_rgba_is_its_rgb_and_values_map_to_0_1_as_8_bit_ones(tmp_path):
    """Alpha 65535 everywhere: the RGB samples / 65535; a 16-bit file of 8-bit values widened (v * 257) reads as the
    8-bit file does."""
    a = _odd_samples((6, 7, 4))
    a[..., 3] = 65535
    p, ref = _cv2_file(tmp_path, a, "opaque.png")
    assert torch.equal(load_image(p), torch.from_numpy((ref[..., :3] / 65535).astype(np.float32)).permute(2, 0, 1))
    eight = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    p16, _ = _cv2_file(tmp_path, eight.astype(np.uint16) * 257, "wide.png")
    torch.testing.assert_close(load_image(p16), load_image(tmp_path / "eight.png"), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------ a PNG encoder from the specification

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filtered(rows: list, bpp: int) -> bytes:
    """Scanlines each filtered by its own type, 0..4 in turn (PNG spec, section 9)."""
    out, prior = bytearray(), bytes(len(rows[0]))
    for i, row in enumerate(rows):
        kind = i % 5
        line = bytearray([kind])
        for j, x in enumerate(row):
            a = row[j - bpp] if j >= bpp else 0
            b, c = prior[j], prior[j - bpp] if j >= bpp else 0
            pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            line.append((x - pred) % 256)
        out += line
        prior = row
    return bytes(out)


_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _png(a: np.ndarray, colour_type: int, interlace: bool = False) -> bytes:
    """``a`` (H, W, C) uint16 as a 16-bit PNG of ``colour_type`` (0 gray, 2 RGB, 4 gray + alpha, 6 RGBA)."""
    h, w, c = a.shape
    big = a.astype(">u2")
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    data = b""
    for y0, x0, dy, dx in passes:
        part = big[y0::dy, x0::dx]
        if part.size:
            data += _filtered([part[r].tobytes() for r in range(part.shape[0])], 2 * c)
    head = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
@pytest.mark.parametrize("interlace", [False, True])
def test_16_bit_pngs_of_every_colour_type_filter_and_interlacing(tmp_path, colour_type, channels, interlace):
    a = _odd_samples((13, 11, channels))
    p = tmp_path / "s.png"
    p.write_bytes(_png(a, colour_type, interlace))
    if colour_type in (2, 6):  # OpenCV (libpng) reads the file as written: the encoder is right
        assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3][:channels]], a)
    ref = _on_white(a[..., 0] if channels == 1 else a)
    torch.testing.assert_close(load_image(p), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_image("named.png", data=p.read_bytes()), ref, rtol=0, atol=1e-6)


def test_exif_orientation_of_a_16_bit_png(tmp_path):
    """An eXIf chunk's orientation turns the 16-bit samples as it turns 8-bit ones."""
    a = _odd_samples((5, 8, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    body = _png(a, 2)
    end = body.rindex(b"IEND") - 4
    p = tmp_path / "turned.png"
    p.write_bytes(body[:end] + _chunk(b"eXIf", exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else
                                      exif.tobytes()) + body[end:])
    x = load_image(p)
    assert x.shape == (3, 8, 5)
    torch.testing.assert_close(x, torch.rot90(_on_white(a), -1, (1, 2)), rtol=0, atol=1e-6)


def test_load_images_reads_16_bit_pngs_at_full_depth(tmp_path):
    a = _odd_samples((4, 4, 3))
    p, ref = _cv2_file(tmp_path, a, "b.png")
    batch, ok, errors = load_images([p], ModelInfo(name="m"))
    assert errors == [] and torch.equal(batch[0], _on_white(ref))
