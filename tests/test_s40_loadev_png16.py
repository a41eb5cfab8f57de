"""16-bit PNGs decoded by salience itself (salience.loading.png: chunks, zlib, the five scanline filters undone with
numpy, Adam7), not by swapping the raw mode in Pillow's ``img.tile``. References: the samples a PNG encoder written
here from the specification was given (each filter type chosen per image or per row), OpenCV's reader (libpng) on
the same files, and a byte-by-byte reading of the specification's filter rules."""
from __future__ import annotations

import struct
from pathlib import Path
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from salience import SalienceError
from salience.loading import load_image
from salience.loading.png import unfilter
from test_s39_loading_png16 import _chunk, _paeth  # the encoder's pieces, from the specification

RNG = np.random.default_rng(40)
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _predict(kind: int, row, prior, j: int, bpp: int) -> int:
    a = row[j - bpp] if j >= bpp else 0
    b, c = prior[j], prior[j - bpp] if j >= bpp else 0
    return (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]


def _filtered(rows: list, bpp: int, kinds) -> bytes:
    """Scanlines, row i filtered by ``kinds(i)`` (PNG spec, section 9)."""
    out, prior = bytearray(), bytes(len(rows[0]))
    for i, row in enumerate(rows):
        kind = kinds(i)
        out += bytes([kind]) + bytes((x - _predict(kind, row, prior, j, bpp)) % 256 for j, x in enumerate(row))
        prior = row
    return bytes(out)


def _png(a: np.ndarray, colour_type: int, kinds=lambda i: i % 5, interlace: bool = False, extra: bytes = b"") -> bytes:
    h, w, c = a.shape
    big, data = a.astype(">u2"), b""
    for y0, x0, dy, dx in _ADAM7 if interlace else ((0, 0, 1, 1),):
        part = big[y0::dy, x0::dx]
        if part.size:
            data += _filtered([part[r].tobytes() for r in range(part.shape[0])], 2 * c, kinds)
    head = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + extra + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def _expected(a: np.ndarray) -> torch.Tensor:
    f = a.astype(np.float64) / 65535
    if f.shape[-1] in (2, 4):
        alpha = f[..., -1:]
        f = (f[..., :-1] if f.shape[-1] == 4 else f[..., :1]) * alpha + (1 - alpha)
    return torch.from_numpy(np.broadcast_to(f, f.shape[:2] + (3,)).astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("colour_type, channels", [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_every_filter_type_alone_on_every_colour_type(tmp_path, kind, colour_type, channels):
    a = RNG.integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    p = tmp_path / "f.png"
    p.write_bytes(_png(a, colour_type, lambda i: kind))
    if channels in (1, 3, 4):  # libpng reads the file as written: the encoder is right
        cv2 = pytest.importorskip("cv2")  # OpenCV only here: the rest of this module runs without it
        back = cv2.imread(str(p), cv2.IMREAD_UNCHANGED).reshape(6, 7, channels)
        assert np.array_equal(back[..., [2, 1, 0, 3][:channels]] if channels > 1 else back, a)
    torch.testing.assert_close(load_image(p), _expected(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (9, 1), (2, 3), (5, 17), (17, 5), (8, 8), (9, 10)])
@pytest.mark.parametrize("interlace", [False, True])
def test_odd_sides_mixed_filters_and_adam7(tmp_path, h, w, interlace):
    a = RNG.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    p = tmp_path / "o.png"
    p.write_bytes(_png(a, 2, lambda i: (3 * i + 1) % 5, interlace))
    cv2 = pytest.importorskip("cv2")
    assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).reshape(h, w, 3)[..., ::-1], a)
    torch.testing.assert_close(load_image(p), _expected(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bpp", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("h, w", [(7, 5), (50, 2), (3, 40), (40, 17)])
def test_unfilter_is_the_specifications_byte_rule(bpp, h, w):
    """Random filtered bytes and filter types: each byte is the filtered byte plus its predictor, mod 256, from the
    decoded bytes to its left and above (the rule, byte by byte). Tall images are decoded in bands of rows, each
    band's first row predicted from the last of the band before."""
    lines = RNG.integers(0, 256, (h, 1 + w * bpp), dtype=np.uint8)
    lines[:, 0] = RNG.integers(0, 5, h)
    out, prior = [], bytes(w * bpp)
    for line in lines.tolist():
        row: list = []
        for j, x in enumerate(line[1:]):
            row.append((x + _predict(line[0], row, prior, j, bpp)) % 256)
        out.append(row)
        prior = row
    assert np.array_equal(unfilter(lines, bpp), np.array(out, np.uint8))
    lines[:, 0] = RNG.integers(0, 3, h)  # no Average / Paeth: the row-by-row path
    out, prior = [], bytes(w * bpp)
    for line in lines.tolist():
        row = []
        for j, x in enumerate(line[1:]):
            row.append((x + _predict(line[0], row, prior, j, bpp)) % 256)
        out.append(row)
        prior = row
    assert np.array_equal(unfilter(lines, bpp), np.array(out, np.uint8))


def test_no_pillow_internals(tmp_path, monkeypatch):
    """A Pillow whose opened PNG shows no ``tile`` (its decoding plan, internal and changing between versions): the
    16-bit samples are read all the same. Before, salience swapped the raw mode in ``img.tile`` and so read only the
    high bytes (or nothing) here."""
    a = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    a[a % 257 == 0] += 1
    p = tmp_path / "t.png"
    p.write_bytes(_png(a, 2))
    opened = Image.open

    def no_tile(fp, *args, **kwargs):
        im = opened(fp, *args, **kwargs)
        head = fp.getvalue()[:25] if hasattr(fp, "getvalue") else Path(fp).read_bytes()[:25]
        if head[24] == 16:  # the 16-bit file; since session 41 salience hands Pillow 8-bit PNGs of the filtered
            im.tile = []  # bytes to unfilter (png.unfilter), which Pillow decodes by its own plan
        return im

    monkeypatch.setattr(Image, "open", no_tile)
    torch.testing.assert_close(load_image(p), _expected(a), rtol=0, atol=1e-6)


def _with_data(data: bytes, h: int = 3, w: int = 3) -> bytes:
    """A 16-bit RGB PNG of side ``w`` x ``h`` whose image data, before compression, is ``data`` as it is."""
    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def _broken(body: bytes) -> dict:
    at = body.index(b"IDAT")
    n = struct.unpack(">I", body[at - 4:at])[0]
    flipped, wrong_crc = bytearray(body), bytearray(body)
    flipped[at + 4 + n // 2] ^= 0xFF
    wrong_crc[at + 4 + n] ^= 1
    line = bytes(1 + 3 * 6)
    return {"cut in IDAT": body[:at + 4 + n // 2], "cut in its CRC": body[:at + 4 + n + 2], "bit flipped": bytes(flipped),
            "CRC": bytes(wrong_crc), "filter type 5": _with_data(line + b"\x05" + line[1:] + line),
            "short data": _with_data(line * 2)}


@pytest.mark.parametrize("case", ["cut in IDAT", "cut in its CRC", "bit flipped", "filter type 5", "CRC", "short data"])
def test_corrupt_or_truncated_16_bit_pngs_are_a_salience_error(tmp_path, case):
    body = _png(RNG.integers(0, 65536, (4, 5, 3), dtype=np.uint16), 2, lambda i: 4)
    p = tmp_path / "bad.png"
    p.write_bytes(_broken(body)[case])
    with pytest.raises(SalienceError, match=r"bad.png: corrupt or truncated PNG file .*re-export or re-download it"):
        load_image(p)
    with pytest.raises(SalienceError, match=r"named.png: corrupt or truncated PNG file"):
        load_image("named.png", data=p.read_bytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_16_bit_samples_as_pillow_turns_8_bit_ones(tmp_path, orientation):
    """The same picture at 8 bits (Pillow's own decoding and turn) and at 16 (samples v * 257): equal after the
    turn each eXIf orientation asks for."""
    v = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()
    eight = tmp_path / "e8.png"
    Image.fromarray(v).save(eight, exif=raw)
    sixteen = tmp_path / "e16.png"
    body = _png(v.astype(np.uint16) * 257, 2)
    end = body.rindex(b"IEND") - 4
    sixteen.write_bytes(body[:end] + _chunk(b"eXIf", raw[6:] if raw.startswith(b"Exif") else raw) + body[end:])
    want = load_image(eight)
    assert want.shape[1:] == ((5, 3) if orientation >= 5 else (3, 5))
    torch.testing.assert_close(load_image(sixteen), want, rtol=0, atol=1e-6)


def test_a_16_bit_png_from_a_pipe(tmp_path):
    from test_s39_review_loading import _through_pipe, needs_fifo

    if needs_fifo.args[0]:
        pytest.skip("named pipes are POSIX")
    a = RNG.integers(0, 65536, (5, 3, 4), dtype=np.uint16)
    x = _through_pipe(tmp_path, _png(a, 6))
    assert isinstance(x, torch.Tensor), x
    torch.testing.assert_close(x, _expected(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", [b"tEXt", b"eXIf", b"gAMA"])
def test_an_ancillary_chunk_failing_its_crc_is_dropped_as_libpng_drops_it(tmp_path, kind):
    """A bad CRC in an ancillary chunk after the image data (a damaged comment, EXIF block, gamma) costs that chunk,
    not the image: libpng warns and drops it, Pillow reads an 8-bit PNG so, and salience read 16-bit ones so before
    session 40 (they were then refused as corrupt). A critical chunk's bad CRC stays an error (the "CRC" case
    above)."""
    a = RNG.integers(0, 65536, (3, 4, 3), dtype=np.uint16)
    body = _png(a, 2)
    end = body.rindex(b"IEND") - 4
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = {b"tEXt": b"k\x00v", b"eXIf": exif.tobytes()[6:], b"gAMA": struct.pack(">I", 45455)}[kind]
    bad = bytearray(_chunk(kind, payload))
    bad[-1] ^= 1
    p = tmp_path / "c.png"
    p.write_bytes(body[:end] + bytes(bad) + body[end:])
    cv2 = pytest.importorskip("cv2")
    assert np.array_equal(cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[..., ::-1], a)
    torch.testing.assert_close(load_image(p), _expected(a), rtol=0, atol=1e-6)  # the damaged eXIf: no turn


@pytest.mark.parametrize("orientation", [3, 6])
def test_xmp_orientation_turns_16_bit_samples_as_pillow_turns_8_bit_ones(tmp_path, orientation):
    """An XMP packet's ``tiff:Orientation`` (an iTXt chunk, no eXIf): Pillow's ``getexif`` reads it, so an 8-bit PNG
    is turned, and so was a 16-bit one before session 40 (read through Pillow); the decoder of 67c6dcb read only
    eXIf and left it as stored."""
    from PIL import PngImagePlugin

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
           '</rdf:RDF></x:xmpmeta>')
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp)
    v = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    eight = tmp_path / "x8.png"
    Image.fromarray(v).save(eight, pnginfo=info)
    raw = eight.read_bytes()
    at = raw.index(b"iTXt") - 4
    itxt = raw[at:at + 12 + struct.unpack(">I", raw[at:at + 4])[0]]
    body = _png(v.astype(np.uint16) * 257, 2)
    sixteen = tmp_path / "x16.png"
    sixteen.write_bytes(body[:33] + itxt + body[33:])  # after IHDR, before IDAT (where Pillow reads it)
    want = load_image(eight)
    assert want.shape[1:] == ((5, 3) if orientation == 6 else (3, 5))
    torch.testing.assert_close(load_image(sixteen), want, rtol=0, atol=1e-6)
