"""Review of 632bf6f (session 41's misc merge). (1) A 16-bit PNG's metadata after the image data is read in file
order as Pillow reads an 8-bit PNG's: an XMP packet whose text is not UTF-8 still turns the image (Pillow keeps its
bytes as ``info["xmp"]`` and ``getexif`` reads the orientation there), and a ``tEXt`` ``exif`` after the image data
outranks an ``eXIf`` before it (the later entry wins); the expected images are Pillow's own reading of the same file
at 8 bits. (2) The architecture rule sees ``import_module`` after ``import importlib.util`` and an annotated
assignment. (3) The thin-image route hands Pillow tiles no wider than ``BAND_PIXELS`` (a long row in pieces),
checked against the specification's byte rule."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from salience.loading import load_image

from test_s41_misc import _chunk, _exif, _png  # hand-built PNGs: struct, zlib, CRCs

RNG = np.random.default_rng(4141)


def _same_as_8_bit(before: bytes, after: bytes, want_shape: tuple) -> None:
    v = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    eight = load_image("a8.png", data=_png(v, 8, after=after, before=before))
    assert tuple(eight.shape) == want_shape  # Pillow's own reading turned (or not) the 8-bit file so
    sixteen = load_image("a16.png", data=_png(v.astype(np.uint16) * 257, 16, after=after, before=before))
    torch.testing.assert_close(sixteen, eight, rtol=0, atol=1e-6)


def test_an_xmp_packet_after_the_image_data_that_is_not_utf8_turns_16_bit_pngs_too():
    """XMP (iTXt) after IDAT with one Latin-1 byte in a comment, tiff:Orientation 6 (90 degrees): Pillow keeps the
    bytes (``info["xmp"]``) and turns the 8-bit file to 5 x 3; before the fix the 16-bit one stayed 3 x 5."""
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><!-- caf\xe9 --><rdf:RDF '
           b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
           b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    _same_as_8_bit(b"", _chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp), (3, 5, 3))


def test_of_an_exif_and_a_text_exif_the_later_one_counts():
    """eXIf (orientation 3, 180 degrees) before IDAT, a tEXt ``exif`` (orientation 6) after it: Pillow's info keeps
    the later, 6 (5 x 3); before the fix the 16-bit file took the eXIf's 3 (3 x 5). Both after IDAT, tEXt ``exif``
    (6) then eXIf (3): the eXIf, the later, counts for both depths (3 x 5)."""
    text = _chunk(b"tEXt", b"exif\x00Exif\x00\x00" + _exif(6))
    _same_as_8_bit(_chunk(b"eXIf", _exif(3)), text, (3, 5, 3))
    _same_as_8_bit(b"", text + _chunk(b"eXIf", _exif(3)), (3, 3, 5))


def test_the_private_names_rule_sees_import_module_after_import_importlib_util():
    """``import importlib.util`` binds ``importlib`` as ``import importlib`` does, and ``m: T = import_module(...)``
    binds ``m`` as ``m = ...`` does: both were missed before (no finding at all)."""
    from test_architecture import _private_uses

    source = ("import importlib.util\n"
              "x = importlib.import_module('salience._core.perf')._fast\n"
              "m: object = importlib.import_module('salience.rules')\n"
              "y = m._classify, importlib.util.find_spec('os')\n")
    assert _private_uses(source, "salience.methods.probe") == [
        "line 2: salience._core.perf._fast", "line 4: salience.rules._classify"]


@pytest.mark.parametrize("bpp", [2, 4, 6, 8])
@pytest.mark.parametrize("h, w", [(1, 61), (4, 23), (9, 10)])
def test_a_row_wider_than_a_band_goes_to_pillow_in_pieces(monkeypatch, bpp, h, w):
    """The thin-image route with 7-pixel tiles: no 8-bit PNG handed to Pillow is wider than 7 pixels and a column
    of context (before, a 61-pixel row went whole: 61 wide), and the bytes are the specification's, each piece's
    first column predicted from the decoded one left of it (every filter type, small bytes for Paeth's ties)."""
    from PIL import Image

    from test_s41_misc import _spec_unfilter  # the specification's byte rule

    from salience.loading import png

    monkeypatch.setattr(png, "MAX_NUMPY_STEPS", 0)
    monkeypatch.setattr(png, "BAND_PIXELS", 7)
    widths, opened = [], Image.open

    def spy(*args, **kwargs):
        img = opened(*args, **kwargs)
        widths.append(img.size[0])
        return img

    monkeypatch.setattr(Image, "open", spy)
    lines = RNG.integers(0, 256, (h, 1 + w * bpp), dtype=np.uint8)
    lines[:, 0] = np.arange(h) % 5
    lines[h // 2:, 1:] %= 3
    assert np.array_equal(png.unfilter(lines, bpp), _spec_unfilter(lines, bpp))
    assert widths and max(widths) <= 7 + 1
