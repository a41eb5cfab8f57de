"""A gray or RGB PNG's ``tRNS`` chunk names a key colour: pixels of that colour are transparent (PNG spec, 11.3.2.1),
composited on white like any other transparency; a mask file's transparent pixels are off (its alpha is the mask).
The files are made here by hand, chunk by chunk; each test failed before (the key colour read as itself, a
transparent mask background read as the object)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from salience._core.info import ModelInfo
from salience.evidence.evaluate import _mask
from salience.loading import load_image
from salience.loading.images import mask_values
from test_s39_loading_png16 import _chunk  # a chunk with its CRC, from the specification


def _png(rows: list, w: int, depth: int, colour: int, trns: bytes = b"", extra: bytes = b"") -> bytes:
    """A PNG of packed scanlines ``rows`` (filter None), ``w`` pixels wide, with a tRNS chunk when ``trns``."""
    head = struct.pack(">IIBBBBB", w, len(rows), depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + (_chunk(b"tRNS", trns) if trns else b"") + extra
            + _chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r for r in rows))) + _chunk(b"IEND", b""))


def _read(tmp_path, body: bytes) -> torch.Tensor:
    p = tmp_path / "k.png"
    p.write_bytes(body)
    x = load_image(p)
    assert torch.equal(x, load_image("named.png", data=body))
    return x


def test_8_bit_gray_key_is_transparent(tmp_path):
    x = _read(tmp_path, _png([bytes([0, 7, 200])], 3, 8, 0, struct.pack(">H", 7)))
    assert torch.equal(x, torch.tensor([0.0, 1.0, 200 / 255]).expand(3, 1, 3))


def test_8_bit_rgb_key_is_transparent(tmp_path):
    x = _read(tmp_path, _png([bytes([1, 2, 3, 4, 5, 6, 4, 5, 7])], 3, 8, 2, struct.pack(">HHH", 4, 5, 6)))
    assert torch.equal(x[:, 0, 1], torch.ones(3))  # (4, 5, 6): white; (4, 5, 7) differs in blue: itself
    assert torch.equal(x[:, 0, 0], torch.tensor([1.0, 2.0, 3.0]) / 255)
    assert torch.equal(x[:, 0, 2], torch.tensor([4.0, 5.0, 7.0]) / 255)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_depth_gray_key_is_the_files_number(tmp_path, depth):
    """Key 1 of a 1-, 2- or 4-bit image is the samples of value 1 (read as 255, 85, 17): Pillow kept the number 1
    itself, which no 2- or 4-bit sample read as 8 bits equals."""
    top = 2 ** depth - 1
    values = [0, 1, top, 1, 0, top, 1, 0]
    bits = "".join(format(v, f"0{depth}b") for v in values)
    row = int(bits.ljust(-(-len(bits) // 8) * 8, "0"), 2).to_bytes(-(-len(bits) // 8), "big")
    x = _read(tmp_path, _png([row], 8, depth, 0, struct.pack(">H", 1)))
    want = torch.tensor([1.0 if v == 1 else v / top for v in values])
    torch.testing.assert_close(x, want.expand(3, 1, 8), rtol=0, atol=1e-6)
    x = _read(tmp_path, _png([row], 8, depth, 0, struct.pack(">H", top + 1)))  # no sample has it: nothing transparent
    torch.testing.assert_close(x, torch.tensor([v / top for v in values]).expand(3, 1, 8), rtol=0, atol=1e-6)


def test_16_bit_gray_and_rgb_keys_are_transparent(tmp_path):
    x = _read(tmp_path, _png([struct.pack(">HHH", 1000, 1001, 65535)], 3, 16, 0, struct.pack(">H", 1000)))
    torch.testing.assert_close(x, torch.tensor([1.0, 1001 / 65535, 1.0]).expand(3, 1, 3), rtol=0, atol=1e-7)
    rgb = struct.pack(">6H", 1000, 2000, 3000, 1000, 2000, 3001)
    x = _read(tmp_path, _png([rgb], 2, 16, 2, struct.pack(">HHH", 1000, 2000, 3000)))
    assert torch.equal(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([1000, 2000, 3001]) / 65535, rtol=0, atol=1e-7)


def test_key_and_exif_orientation_together(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    raw = exif.tobytes()
    body = _png([bytes([9, 50]), bytes([60, 9])], 2, 8, 0, struct.pack(">H", 9),
                _chunk(b"eXIf", raw[6:] if raw.startswith(b"Exif") else raw))
    x = _read(tmp_path, body)
    assert torch.equal(x[0], torch.tensor([[1.0, 60 / 255], [50 / 255, 1.0]]))


def test_a_masks_transparent_pixels_are_off_and_opaque_ones_on(tmp_path):
    """A cut-out mask: the object opaque (white and dark parts), the background transparent white. Composited on
    white and thresholded at half the brightest channel, the background was the object and the dark part not."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (255, 255, 255, 0)
    rgba[1:3, 1:3] = (20, 20, 20, 255)
    rgba[1, 1] = (255, 255, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1:3, 1:3] = True
    assert torch.equal(mask_values(tmp_path / "cut.png")[0] >= 0.5, want)
    assert torch.equal(_mask(tmp_path / "cut.png", ModelInfo(name="m", input_size=(4, 4)), (4, 4)), want)
    # the same through a tRNS key: a white background marked transparent, a dark gray object: the object
    (tmp_path / "key.png").write_bytes(_png([bytes([255, 30, 30, 255])] * 2, 4, 8, 0, struct.pack(">H", 255)))
    got = _mask(tmp_path / "key.png", ModelInfo(name="m", input_size=(2, 4)), (2, 4))
    assert torch.equal(got, torch.tensor([[False, True, True, False]] * 2))


def test_an_opaque_mask_keeps_the_brightest_channel_rule(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[0, 1, 0] = 200  # a red label: on
    Image.fromarray(rgba, "RGBA").save(tmp_path / "o.png")
    assert torch.equal(mask_values(tmp_path / "o.png"), torch.tensor([[[0, 200 / 255, 0], [0, 0, 0]]]))
