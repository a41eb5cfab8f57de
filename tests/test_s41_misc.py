"""Session 41 leftovers. (1) Text chunks after a 16-bit PNG's image data (an XMP packet, a raw EXIF profile) are
read as Pillow reads an 8-bit PNG's, so 8-bit and 16-bit files turn alike; the PNGs are built here by hand (struct,
zlib, CRCs). (2) 16-bit PNGs whose rows use Average / Paeth decode whatever their shape, checked against a
byte-by-byte reading of the specification's filters and against Pillow's own ``I;16`` decoding. (3) The
architecture rule on another room's private names sees ``importlib.import_module("salience.x")._name`` and
``__import__``. (4) AVX512-BF16 without AMX is no native bf16. (5) A file and a pipe that cannot be read say which
they are and what to do."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from salience.loading import load_image

RNG = np.random.default_rng(41)
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png(v: np.ndarray, depth: int, after: bytes = b"", before: bytes = b"") -> bytes:
    """An RGB PNG of ``v`` (H, W, 3) at ``depth`` 8 or 16, every row filter None; ``before`` / ``after``: chunks put
    before / after the IDAT chunk."""
    h, w, _ = v.shape
    rows = v.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], 1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", ihdr) + before + _chunk(b"IDAT", zlib.compress(raw)) + after
            + _chunk(b"IEND", b""))


def _xmp(orientation: int) -> bytes:
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
            '</rdf:RDF></x:xmpmeta>').encode()


def _exif(orientation: int) -> bytes:
    """A TIFF-structured EXIF block (no ``Exif\\0\\0``) holding one orientation tag, written from the TIFF layout."""
    return b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)


def _meta(kind: str, orientation: int) -> bytes:
    if kind == "xmp":  # iTXt: keyword, 0, compression flag 0, method 0, language "", 0, translated keyword "", 0, text
        return _chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + _xmp(orientation))
    if kind == "xmp-compressed":
        return _chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00en\x00\x00" + zlib.compress(_xmp(orientation)))
    if kind == "raw-profile":  # ImageMagick's: "\nexif\n   length\n" then hex lines, zTXt
        hexed = (b"Exif\x00\x00" + _exif(orientation)).hex()
        text = f"\nexif\n{len(hexed) // 2:8d}\n" + "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72))
        return _chunk(b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(text.encode()))
    return _chunk(b"eXIf", _exif(orientation))


@pytest.mark.parametrize("kind", ["xmp", "xmp-compressed", "raw-profile", "exif"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_after_the_image_data_turns_16_bit_pngs_as_8_bit_ones(tmp_path, kind, orientation):
    """The chunk after IDAT: Pillow reads it as it decodes the 8-bit file (and turns it); the 16-bit file (samples v
    x 257) was left as stored for the text chunks (an eXIf there was read already)."""
    v = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    eight, sixteen = tmp_path / "a8.png", tmp_path / "a16.png"
    eight.write_bytes(_png(v, 8, after=_meta(kind, orientation)))
    sixteen.write_bytes(_png(v.astype(np.uint16) * 257, 16, after=_meta(kind, orientation)))
    want = load_image(eight)
    turned = np.asarray(Image.fromarray(v).transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
                                                      8: Image.Transpose.ROTATE_90}[orientation]))
    torch.testing.assert_close(want, torch.from_numpy(turned / 255).float().permute(2, 0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(load_image(sixteen), want, rtol=0, atol=1e-6)


def test_the_last_exif_chunk_counts_as_for_pillow(tmp_path):
    """An eXIf before the image data and another after it: Pillow's 8-bit reading keeps the last (the first was
    kept for 16-bit files)."""
    v = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    before, after = _chunk(b"eXIf", _exif(3)), _chunk(b"eXIf", _exif(6))
    eight, sixteen = tmp_path / "b8.png", tmp_path / "b16.png"
    eight.write_bytes(_png(v, 8, after, before))
    sixteen.write_bytes(_png(v.astype(np.uint16) * 257, 16, after, before))
    want = load_image(eight)
    assert want.shape == (3, 5, 3)
    torch.testing.assert_close(load_image(sixteen), want, rtol=0, atol=1e-6)


_DYNAMIC = ("import importlib\n"
            "from importlib import import_module as im\n"
            "def f():\n"
            "    a = importlib.import_module('salience._core.perf')._fast\n"
            "    b = __import__('salience.rules')._x, __import__('salience.rules').rules._classify\n"
            "    c = __import__('salience.rules', None, None, ['x'])._classify, im('.reduce', 'salience')._y\n"
            "    m = importlib.import_module('salience.attention')\n"
            "    return a, b, c, m._NativeMHA, getattr(im('salience.rules'), '_z'), importlib.import_module('os')._x\n"
            "def g():\n"
            "    return importlib.import_module('salience.rules').ACTIVATIONS._w, im('salience._core.perf').current\n")


def test_the_private_names_rule_sees_import_module_and_dunder_import(tmp_path):
    """Read as ``salience.methods.probe``: ``importlib.import_module("salience.x")._name`` (bound ``importlib`` or
    ``import_module``, relative with a package, assigned to a name) and ``__import__`` (the package ``salience``
    without a fromlist, the module with one) are found; ``os``'s private names, an object's and public names are
    not. Before, none of them was found."""
    from test_architecture import _other_rooms_privates

    probe = tmp_path / "probe.py"
    probe.write_text(_DYNAMIC)
    assert _other_rooms_privates(probe, "salience.methods.probe") == [
        "line 4: salience._core.perf._fast", "line 5: salience._x", "line 5: salience.rules._classify",
        "line 6: salience.reduce._y", "line 6: salience.rules._classify", "line 8: salience.attention._NativeMHA",
        "line 8: salience.rules._z"]


def test_the_private_names_rule_reads_a_source_string():
    """The rule is a function of a source and a module name; a room's own private names are not flagged."""
    from test_architecture import _private_uses

    assert _private_uses(_DYNAMIC, "salience.rules") == [
        "line 4: salience._core.perf._fast", "line 5: salience._x", "line 6: salience.reduce._y",
        "line 8: salience.attention._NativeMHA"]


# ------------------------------------------------------------------------------------------- (4) bf16 without AMX


def _cpu_with(monkeypatch, tmp_path, machine: str, flags_line: str) -> None:
    """A made-up CPU: ``platform.machine()`` and /proc/cpuinfo's flags, PyTorch's own probes taken away."""
    from salience._core import cpu as _cpu

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\n{flags_line}\n")
    monkeypatch.setattr(_cpu, "_CPUINFO", str(info))
    monkeypatch.setattr(_cpu.platform, "machine", lambda: machine)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, None, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(_cpu, "_warned", False)
    _cpu._cpu_flags.cache_clear()
    _cpu._cpu_bf16.cache_clear() if hasattr(_cpu, "_cpu_bf16") else _cpu._cpu_has_bf16.cache_clear()


def _bf16_warning() -> list:
    import warnings

    import salience

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        salience.smoothgrad(model, torch.rand(1, 3, 8, 8), 0, samples=2, precision="bf16")
    return [str(w.message) for w in got if "precision='bf16'" in str(w.message)]


@pytest.fixture
def fresh_cpu_cache():
    from salience._core import cpu as _cpu

    yield
    _cpu._cpu_flags.cache_clear()
    _cpu._cpu_bf16.cache_clear() if hasattr(_cpu, "_cpu_bf16") else _cpu._cpu_has_bf16.cache_clear()


def test_avx512_bf16_without_amx_is_not_native_and_warns(monkeypatch, tmp_path, fresh_cpu_cache):
    """Cooper Lake / Zen 4 (AVX512-BF16, no AMX): bf16 + channels-last took 1.00-1.06x fp32's time where measured
    (benchmarks/cpu-bf16-s40-quiet.md), so bf16 warns, saying so and what to use. Before, no warning."""
    from salience._core import cpu as _cpu

    _cpu_with(monkeypatch, tmp_path, "x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16")
    assert _cpu.native_bf16() is False
    (message,) = _bf16_warning()
    assert "AVX512-BF16 but no AMX-BF16" in message and "1.00-1.06x" in message
    assert "precision='fp32'" in message and "a CPU with AMX-BF16" in message


def test_an_amx_cpu_capped_below_amx_warns_and_one_that_is_not_does_not(monkeypatch, tmp_path, fresh_cpu_cache):
    from salience._core import cpu as _cpu

    _cpu_with(monkeypatch, tmp_path, "x86_64", "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile")
    assert _cpu.native_bf16() is True and _bf16_warning() == []
    for cap in ("AVX512_CORE_BF16", "avx10_1_512", "AVX10_2_512"):  # below AMX, AVX512-BF16 kept
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        monkeypatch.setattr(_cpu, "_warned", False)
        assert _cpu.native_bf16() is False, cap
        (message,) = _bf16_warning()
        assert "ONEDNN_MAX_CPU_ISA caps it below AMX" in message and "1.00-1.06x" in message
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # below bf16: the older warning, slower than fp32
    monkeypatch.setattr(_cpu, "_warned", False)
    (message,) = _bf16_warning()
    assert "no bf16 instructions" in message and "slower than fp32" in message
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert _cpu.native_bf16() is True


def test_arm_bf16_is_unchanged(monkeypatch, tmp_path, fresh_cpu_cache):
    from salience._core import cpu as _cpu

    _cpu_with(monkeypatch, tmp_path, "aarch64", "Features\t: fp asimd sve bf16")
    assert _cpu.native_bf16() is True and _bf16_warning() == []
    _cpu_with(monkeypatch, tmp_path, "aarch64", "Features\t: fp asimd")
    assert _cpu.native_bf16() is False


# ------------------------------------------------------------------------------------------- (5) which source


def _failing_read(monkeypatch):
    """Every ``os.read`` fails (EIO): what ``load_image`` reads a file or a pipe whole by, through the handle it
    opened once (``images._read_to_end``; its first bytes and PIL's reads go through the buffered file, unaffected).
    Since session 60; before, ``Path.read_bytes`` (an open of the file by its name again) was patched."""
    import errno
    import os

    def read(fd, n):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "read", read)


def test_a_pipe_that_cannot_be_read_says_it_is_a_pipe(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from salience import SalienceError

    if not hasattr(os, "mkfifo") or not os.path.isdir("/dev/fd"):
        pytest.skip("pipes named /dev/fd/N are POSIX")
    read_end, write_end = os.pipe()  # the shell's pipe (read without a time limit, by os.read); a named
    fifo = Path(f"/dev/fd/{read_end}")  # pipe without a writer is refused before a read (test_s59_ends.py)
    _failing_read(monkeypatch)
    try:
        with pytest.raises(SalienceError) as e:
            load_image(fifo)
    finally:
        os.close(read_end)
        os.close(write_end)
    message = str(e.value)
    assert message.startswith(f"{fifo}: a pipe") and "Input/output error" in message
    assert "run the command that writes to it again" in message and "save the image to a file" in message


def test_a_16_bit_png_file_that_cannot_be_read_whole_says_it_is_the_file(tmp_path, monkeypatch):
    from salience import SalienceError

    p = tmp_path / "deep.png"
    p.write_bytes(_png(RNG.integers(0, 65536, (2, 3, 3), dtype=np.uint16), 16))
    _failing_read(monkeypatch)  # the header is read (file_start, through the handle); reading it whole fails
    with pytest.raises(SalienceError) as e:
        load_image(p)
    message = str(e.value)
    assert message.startswith(f"{p}: the file's header was read but not the whole file (Input/output error)")
    assert "pipe" not in message and "readable" in message


# ------------------------------------------------------------------------------------------- (2) thin Average / Paeth


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _spec_unfilter(lines: np.ndarray, bpp: int) -> np.ndarray:
    """The PNG specification's filters (section 9), byte by byte: each byte plus its predictor, mod 256."""
    out, prior = [], [0] * (lines.shape[1] - 1)
    for line in lines.tolist():
        row: list = []
        for j, x in enumerate(line[1:]):
            a, b, c = (row[j - bpp] if j >= bpp else 0), prior[j], (prior[j - bpp] if j >= bpp else 0)
            row.append((x + (0, a, b, (a + b) // 2, _paeth(a, b, c))[line[0]]) % 256)
        out.append(row)
        prior = row
    return np.array(out, np.uint8)


@pytest.mark.parametrize("bpp", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("h, w", [(7, 5), (40, 3), (3, 40), (1, 61)])
def test_pillows_unfiltering_is_the_specifications_byte_rule(monkeypatch, bpp, h, w):
    """The thin-image route (forced here: no numpy step allowed), in bands of 37 pixels (each band's first row
    predicted from the row above it), against the specification's rule on random bytes and filter types."""
    from salience.loading import png

    monkeypatch.setattr(png, "MAX_NUMPY_STEPS", 0)
    monkeypatch.setattr(png, "BAND_PIXELS", 37)
    lines = RNG.integers(0, 256, (h, 1 + w * bpp), dtype=np.uint8)
    lines[:, 0] = RNG.integers(0, 5, h)
    assert np.array_equal(png.unfilter(lines, bpp), _spec_unfilter(lines, bpp))


@pytest.mark.parametrize("bpp", [2, 6, 8])
def test_pillows_route_equals_the_numpy_diagonals(monkeypatch, bpp):
    """A 20 x 3000 image (3,020 diagonal steps: numpy) decoded both ways: equal."""
    from salience.loading import png

    lines = RNG.integers(0, 256, (20, 1 + 3000 * bpp), dtype=np.uint8)
    lines[:, 0] = RNG.choice([3, 4, 1, 2], 20)
    numpy_way = png.unfilter(lines, bpp)
    monkeypatch.setattr(png, "MAX_NUMPY_STEPS", 0)
    assert np.array_equal(png.unfilter(lines, bpp), numpy_way)


@pytest.mark.parametrize("w, h", [(150_000, 2), (3, 200_000)])
def test_a_thin_16_bit_gray_average_paeth_png_reads_as_pillows_i16(tmp_path, w, h):
    """Random filtered bytes, rows Average and Paeth: 150,002 and 237,500 diagonal steps (refused before), read as
    Pillow reads a 16-bit gray PNG (``I;16``, all 16 bits)."""
    lines = RNG.integers(0, 256, (h, 1 + 2 * w), dtype=np.uint8)
    lines[:, 0] = np.arange(h) % 2 + 3
    p = tmp_path / "thin.png"
    p.write_bytes(SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                  + _chunk(b"IDAT", zlib.compress(lines.tobytes())) + _chunk(b"IEND", b""))
    with Image.open(p) as img:
        assert img.mode == "I;16"
        want = np.asarray(img).astype(np.float64) / 65535
    x = load_image(p, max_pixels=None)
    torch.testing.assert_close(x, torch.from_numpy(want).float().expand(3, h, w), rtol=0, atol=1e-7)
