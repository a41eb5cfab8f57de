"""Images in: image files -> the tensors a model expects.

:func:`load_image` reads one file into a ``(3, H, W)`` float tensor in ``[0, 1]``,
refusing (before decoding) an image larger than ``max_pixels``, and converting every mode PIL
knows to RGB: grayscale is repeated over three channels, 16-bit images (``I;16``, and 16-bit PNGs, whose colour ones
PIL cuts to 8 bits: decoded by :mod:`salience.loading.png`) are scaled by
``1/65535`` (signed 16-bit TIFFs by ``1/32767``; 32-bit integer ones only when their values fit in 16 bits),
float images (``F``) taken as they are when in ``[0, 1]`` (else refused), CMYK / YCbCr / palette images go through PIL's conversion, and transparent images
(RGBA, LA, palette with transparency, a gray or RGB PNG's ``tRNS`` key colour) are **composited on white** (a
transparent background reads as paper, not as black; a mask file's alpha is its mask, :func:`mask_values`). :func:`preprocess` applies a model's
:class:`~salience._core.info.ModelInfo` (resize + centre crop, mean/std); :func:`load_images`
does both for a list of files and keeps going past bad ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from salience._core.errors import SalienceError, quiet_warnings
from salience._core.files import file_start, is_socket, not_image_file, open_no_wait, shell_pipe, wait_again
from salience._core.info import ModelInfo
from salience._core.tensors import MAX_INPUT_PIXELS as _MAX_INPUT_PIXELS, check_input_pixels
from salience.loading.png import SIGNATURE, decode_png16, is_png16

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_INPUT_PIXELS",
    "check_input_pixels",
    "load_image",
    "load_images",
    "preprocess",
    "resize_crop",
    "normalize_input",
    "unnormalize",
    "RESIZE_MODES",
    "resize_mode",
    "with_preprocessing",
    "preprocessing_record",
]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height) :func:`load_image` decodes by default: 50 megapixels
(about 600 MB as float32 RGB)."""
MAX_INPUT_PIXELS = _MAX_INPUT_PIXELS
"""The most pixels (H x W) of a model's input size, and of the square of a ``resize``'s shorter side (re-exported
from :data:`salience._core.tensors.MAX_INPUT_PIXELS`, where methods' own checks find it): the 50 megapixels an image
file may have by default (600 MB as float32 RGB)."""


_bomb_lock = threading.Lock()
_bomb_lifted = 0  # calls inside _without_pils_bomb_limit now
_bomb_saved: Any = None  # PIL's limit before the first of them


@contextlib.contextmanager
def _without_pils_bomb_limit() -> Iterator[None]:
    """PIL's decompression-bomb limit lifted while an image is opened and decoded (we check our own
    ``max_pixels``). Several threads may load images at once (the explorer, DataLoader threads), so
    the first one in saves PIL's limit and the last one out puts it back: a plain save / restore
    in each call left the limit lifted for good when two calls overlapped."""
    from PIL import Image

    global _bomb_lifted, _bomb_saved
    with _bomb_lock:
        if _bomb_lifted == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
        _bomb_lifted += 1
        Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_lifted -= 1
            if _bomb_lifted == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


def load_image(path: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               data: Optional[bytes] = None) -> Tensor:
    """Read an image file as an RGB float tensor ``(3, H, W)`` in ``[0, 1]``.

    The size is read from the file's header and checked against ``max_pixels`` (width x height;
    ``None``: no limit) before any pixel is decoded. EXIF orientation is applied. Alpha is
    composited on white; 16-bit images keep their precision, colour PNGs too (scaled by ``1/65535``; a TIFF of
    signed 16-bit samples by ``1/32767``, negative ones refused; a 32-bit integer image is read so when its values
    fit in 16 bits, else refused); a float image (PIL's ``F``, a 32-bit float TIFF) is taken as it is, in
    ``[0, 1]`` as torchvision and scikit-image take a float image; one outside it is refused (its range is its own).
    Raises :class:`SalienceError` with one line for a missing, unreadable, corrupt or truncated
    file, or an image over the limit. ``data``: the file's bytes, already read (an object from
    storage, :mod:`salience.loading.remote`); ``path`` then only names it in messages. A gray or RGB PNG's
    ``tRNS`` key colour is transparent (composited on white) like any other transparency.
    """
    return _load(path, max_pixels, data, alpha=False)


def mask_values(path: PathLike) -> Tensor:
    """A mask file as ``(1, H, W)`` float32 in ``[0, 1]``, which its reader thresholds at half its maximum: its
    alpha where the alpha itself makes a mask (some pixel's alpha below half its largest: an alpha channel, a PNG's
    ``tRNS`` key colour, a palette's transparent entries), so a transparent pixel is off and an opaque one on whatever
    its colour (a cut-out of the object, a coloured overlay); else its brightest channel (white-on-black masks, 0/1
    label images, coloured label images, an RGBA mask whose alpha is near opaque everywhere: one pixel of alpha 254
    read the whole image as the object). Composited on white, a transparent background read as the object."""
    x = _load(path, DEFAULT_MAX_PIXELS, None, alpha=True)
    if x.shape[0] == 4 and bool((x[3] < x[3].max() / 2).any()):
        return x[3:].contiguous()
    return x[:3].amax(0, keepdim=True)


def missing_file(p: Path) -> str:
    """Why ``p``, which ``Path.exists`` says is not there, is not: a symbolic link loop (``os.stat`` says
    ``ELOOP``; ``Path.exists`` reads it as missing, and it was said as "no such file"), a link to nothing, or
    nothing at all."""
    import errno

    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (f"{p}: a symbolic link loop (the link leads back to itself: {e.strerror}); point the link at the "
                    "image file, or give the file's own path")
    if p.is_symlink():
        return f"{p}: a link to {os.readlink(p)}, which is not there; check the link"
    return f"{p}: no such file; check the path"


def _load(path: PathLike, max_pixels: Any, data: Any, alpha: bool) -> Tensor:
    """:func:`load_image`; ``alpha``: a transparent image as RGBA ``(4, H, W)``, not composited. A file is opened
    once (:func:`_image_file`) and read through that handle alone: its first bytes, its whole bytes (a 16-bit PNG),
    PIL's reads."""
    max_pixels = check_max_pixels(max_pixels)
    if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        raise SalienceError(f"load_image: data must be the file's bytes, got {type(data).__name__}")
    if data is not None:
        return _decode(str(path), None, data, max_pixels, alpha)
    p = _image_path(path)
    if not p.exists():
        raise SalienceError(missing_file(p))
    if p.is_dir():
        raise SalienceError(f"{p}: is a directory, expected an image file (PNG, JPEG, ...)")
    with _image_file(p) as (f, piped):  # a pipe gives its bytes once
        return _decode(p, f, piped, max_pixels, alpha)


def _decode(p: Any, f: Optional[BinaryIO], data: Any, max_pixels: Optional[int], alpha: bool) -> Tensor:
    """The image ``p`` (named in messages) decoded from its open file ``f`` or, when ``f`` is ``None``, from its bytes
    ``data``: :func:`_load`'s reading."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    head = bytes(data[:26]) if data is not None else file_start(f, 26)
    png16 = is_png16(head)
    if png16 and data is None:  # decoded here (salience.loading.png) from the bytes Pillow read the header from
        data = _file_bytes(p, f)
    try:
        # We check the size ourselves (below) against max_pixels; PIL's own bomb check would
        # otherwise refuse or warn on its own, different limit.
        with _without_pils_bomb_limit(), quiet_warnings():  # PIL's notes on odd metadata; errors are raised below
            img = Image.open(f if data is None else io.BytesIO(data))
    except UnidentifiedImageError:
        raise _unidentified(p, head) from None
    except Image.DecompressionBombError as e:  # pragma: no cover - the limit is lifted above
        raise SalienceError(f"{p}: refused as too large to decode ({e}); raise the pixel limit if you trust it") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many types on a foreign file
        raise SalienceError(f"{p}: cannot be read as an image ({type(e).__name__}: {e})") from None
    with img:
        _check_sides(p, img.size, max_pixels)
        try:
            with _without_pils_bomb_limit(), quiet_warnings():
                if png16:
                    samples = _png16_samples(data, img.info)
                else:
                    img.load()
                    top = _integer_top(img)  # before exif_transpose, whose copy has no TIFF tags
                    _scale_gray_key(img, head)
                    img = ImageOps.exif_transpose(img) or img
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error ...
            raise SalienceError(
                f"{p}: corrupt or truncated {img.format or 'image'} file ({e}); re-export or re-download it"
            ) from None
        try:
            return _png16_tensor(samples, alpha) if png16 else _to_rgb_tensor(img, top, alpha)
        except SalienceError as e:
            raise SalienceError(f"{p}: {e}") from None


def _check_sides(p: Any, sides: tuple[int, int], max_pixels: Optional[int]) -> None:
    """An image of ``sides`` (width, height, from its header) over ``max_pixels`` or empty is refused."""
    w, h = sides
    if max_pixels is not None and w * h > max_pixels:
        size = f"{w * h / 1e6:.1f} megapixels" if w * h >= 50_000 else f"{w * h} pixels"  # not "0.0 megapixels"
        small = f" ({max_pixels} pixels)" if max_pixels < 50_000 else ""
        raise SalienceError(
            f"{p}: {w}x{h} = {size} is over the limit of {max_pixels / 1e6:g} megapixels{small}; shrink the "
            "image, or raise the limit (--max-pixels / max_pixels=) if you have the memory"
        )
    if w == 0 or h == 0:
        raise SalienceError(f"{p}: the image is empty ({w}x{h})")


PIPE_WAIT_S = 5.0
"""How long :func:`load_image` waits for a program to open a named pipe (``mkfifo``'s, a FIFO named in a folder) for
writing, in seconds: such a pipe may have no writer, and a plain open of it for reading waits for one for ever. A
writer that comes in time is read whole, however long it takes to send its bytes (:func:`_named_pipe_bytes`); a pipe the shell opened for the command (``/dev/stdin``, ``/dev/fd/N``, bash's
``<(curl ...)``: :func:`salience._core.files.shell_pipe`), whose writer is there before the command starts, is read
without this limit."""


@contextlib.contextmanager
def _image_file(p: Path) -> Iterator[tuple[Optional[BinaryIO], Optional[bytes]]]:
    """The image file ``p`` opened once, without waiting, and told by its handle (``fstat``:
    :func:`salience._core.files.open_no_wait`), so that a file swapped for a FIFO after a look at its name is never
    opened plainly (which waits for a writer, for ever where none comes): ``(f, None)``, ``f`` the open regular file
    (binary, buffered, seekable) that everything is read through; ``(None, data)`` for a pipe, its bytes read whole
    (:func:`_pipe_bytes`). A :class:`SalienceError` for a file that cannot be opened (its system error), a folder, a
    device or a socket (refused as :func:`salience._core.files.check_image_file` refuses it before a run)."""
    try:
        fd, mode = open_no_wait(p)
    except OSError as e:
        if is_socket(p):  # a socket cannot be opened (ENXIO): said as what it is
            raise SalienceError(not_image_file(p, stat.S_IFSOCK)) from None
        raise SalienceError(f"{p}: cannot be read ({e.strerror or e}); check the path and its permissions") from None
    if stat.S_ISREG(mode):
        with os.fdopen(fd, "rb") as f:
            yield f, None
        return
    try:
        if stat.S_ISDIR(mode):  # a folder put there after the look (Linux opens one for reading)
            raise SalienceError(f"{p}: is a directory, expected an image file (PNG, JPEG, ...)")
        if not stat.S_ISFIFO(mode):  # a device (/dev/null, a terminal as /dev/stdin): never "remove it"
            raise SalienceError(not_image_file(p, mode))
        data = _pipe_bytes(p, fd)
    finally:
        os.close(fd)
    yield None, data


def _pipe_bytes(p: Path, fd: int) -> bytes:
    """The bytes of the pipe ``p`` (bash's ``<(curl ...)``, a named pipe), open without waiting as ``fd``, read whole,
    as PIL reads a stream it cannot seek (a second look at its first bytes would wait for ever). A named pipe no
    program opens for writing in :data:`PIPE_WAIT_S` is a :class:`SalienceError` saying so
    (:func:`_named_pipe_bytes`). A pipe that cannot be read says it is a pipe (its writer is gone or failed)."""
    try:
        if shell_pipe(p) or not hasattr(os, "mkfifo"):  # the shell's pipe; a system without named pipes (Windows)
            wait_again(fd)  # opened without waiting (POSIX): read it waiting for its bytes
            return _read_to_end(fd)
        return _named_pipe_bytes(p, fd, PIPE_WAIT_S)
    except OSError as e:
        raise SalienceError(f"{p}: a pipe (/dev/stdin, a named pipe, <(...)) that cannot be read ({e.strerror or e}); "
                            "run the command that writes to it again, or save the image to a file and give its "
                            "path") from None


def _read_to_end(fd: int, first: bytes = b"") -> bytes:
    """``first`` and then the bytes of the open descriptor ``fd`` (blocking) from where it stands to its end, read by
    ``os.read``: the whole reads of :func:`load_image` (a pipe, a 16-bit PNG). ``OSError``: a read failed."""
    parts = [first]
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


PIPE_POLL_S = 0.05
"""How often :func:`_named_pipe_bytes` looks whether a named pipe has a writer yet, in seconds (a writer's open
wakes no ``select``; its first bytes or its close do)."""


def _named_pipe_bytes(p: Path, fd: int, wait: float) -> bytes:
    """The bytes of the named pipe ``p``, open as ``fd``, read whole once a program has it open for writing, if one
    opens it within ``wait`` seconds. Opened without waiting (:data:`salience._core.files.NO_WAIT`: the open of a FIFO
    for reading returns at once, writer or not: :func:`_image_file`), then looked at every :data:`PIPE_POLL_S` by a
    read that does not wait: bytes or ``EAGAIN`` (a writer has it open, nothing sent yet) say a writer is there, and
    the pipe is then read in blocking mode to its end (the writer's close) with no time limit, however slow the
    writer (``curl URL > p &``); ``b""``
    (end of file) says no writer has it open. On Linux ``select`` tells a writer that came and closed it (its end of
    file is ready) from none yet (not ready): an empty pipe so closed is ``b""`` (an empty image file). Elsewhere the
    two are not told apart, and a writer that opened and closed it between two looks is waited for until ``wait``
    ends. A :class:`SalienceError` when no writer comes in ``wait`` seconds; ``OSError``: the open or a read failed."""
    import selectors
    import time

    closed_is_seen = sys.platform.startswith("linux")  # a writer's close wakes select, a reader alone does not
    deadline = time.monotonic() + wait
    with selectors.DefaultSelector() as looks:
        looks.register(fd, selectors.EVENT_READ)
        while True:
            ready = bool(looks.select(0))
            try:
                first = os.read(fd, 1 << 16)
            except BlockingIOError:  # EAGAIN: a writer has it open and has sent nothing yet
                first = None
                break
            if first or (ready and closed_is_seen):  # its first bytes; or a writer came and closed it, empty
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise SalienceError(
                    f"{p}: a named pipe that no program opened for writing in {wait:g} s; start the program "
                    "that writes the image to it first, or save the image to a file and give its path")
            if ready:  # (not Linux) an end of file ready wakes select at once: slept instead
                time.sleep(min(left, PIPE_POLL_S))
            else:
                looks.select(min(left, PIPE_POLL_S))  # wakes early for bytes or a close
    if first == b"":
        return b""
    wait_again(fd)
    return _read_to_end(fd, first or b"")


def _file_bytes(p: Path, f: BinaryIO) -> bytes:
    """The bytes of the open file ``f`` of ``p`` (a 16-bit PNG, decoded from them; its header was read just before
    through the same handle), read from its start by its descriptor (:func:`_read_to_end`; ``f``'s buffer is not read
    again); one that cannot be read says it is the file."""
    try:
        os.lseek(f.fileno(), 0, os.SEEK_SET)
        return _read_to_end(f.fileno())
    except OSError as e:
        raise SalienceError(f"{p}: the file's header was read but not the whole file ({e.strerror or e}); check that "
                            "it is still there and readable (permissions, a network or removable disk), or copy it "
                            "to a local disk") from None


def _unidentified(p: Any, head: bytes) -> SalienceError:
    """A file PIL cannot identify (``head``: its first bytes): a TIFF whose samples PIL cannot decode says so, anything
    else is no image."""
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return SalienceError(f"{p}: a TIFF file whose samples PIL cannot decode (16- or 64-bit floats, float RGB, ...); "
                             "save it with 8- or 16-bit integers, or as a one-channel 32-bit float image in [0, 1]")
    return SalienceError(f"{p}: not an image file PIL can read (expected PNG, JPEG, BMP, TIFF, WebP, GIF ...); "
                         "check that the file is an image and not empty or truncated")


_ORIENTED = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
             8: lambda a: np.rot90(a, 1)}
"""EXIF orientation -> the turn of an ``(H, W, C)`` array that shows it upright, as ``PIL.ImageOps.exif_transpose``
turns an image (6: 90 degrees clockwise; 5 and 7: the transposes)."""


def _png16_samples(data: bytes, info: dict) -> np.ndarray:
    """A 16-bit PNG's samples, ``(H, W, C)`` uint16 (:func:`salience.loading.png.decode_png16`: Pillow cuts colour
    ones to 8 bits), turned upright as Pillow's ``getexif`` reads the orientation of an 8-bit PNG: its ``eXIf``
    chunk (before or after the image data), else ImageMagick's raw EXIF profile or XMP's ``tiff:Orientation`` in
    a text chunk (``info``: those before the image data, read by ``Image.open``; those after it, which Pillow reads
    only as it decodes the samples, from :func:`~salience.loading.png.decode_png16`)."""
    from PIL import Image

    samples, after = decode_png16(bytes(data))
    shown = Image.new("L", (1, 1))  # Pillow's own reading of the orientation, without decoding the file again
    shown.info = {**info, **after}  # what Pillow reads after the image data when it decodes an 8-bit PNG
    turn = _ORIENTED.get(shown.getexif().get(0x0112, 1))
    return samples if turn is None else turn(samples)


def _scale_gray_key(img, head: bytes) -> None:
    """A 2- or 4-bit gray PNG's ``tRNS`` key in ``img.info`` scaled as Pillow scales its samples to 8 bits (x 85,
    x 17): Pillow keeps the file's number (key 1 of a 2-bit image: no pixel of value 85 made transparent). A key
    no sample can have is dropped."""
    key = img.info.get("transparency")
    if head[:8] != SIGNATURE or len(head) < 26 or head[25] != 0 or head[24] not in (2, 4) or not isinstance(key, int):
        return
    top = 2 ** head[24] - 1
    if 0 <= key <= top:
        img.info["transparency"] = key * (255 // top)
    else:
        del img.info["transparency"]


def _png16_tensor(samples: np.ndarray, alpha: bool = False) -> Tensor:
    """A 16-bit PNG's samples ``(H, W, C)`` as ``(3, H, W)`` float32 in ``[0, 1]``: ``/ 65535``, gray repeated over
    three channels, alpha (the last of 2 or 4) composited on white, as 8-bit images are (``alpha``: kept, RGBA)."""
    c = samples.shape[-1]
    v = samples[..., [0, 0, 0, 1][:4 if c == 2 else 3] if c < 3 else slice(None)]
    a = torch.from_numpy(np.ascontiguousarray(v).astype(np.float32)).permute(2, 0, 1).div_(65535.0)
    if a.shape[0] == 4 and not alpha:  # (correctly rounded: as in float64)
        a = a[:3].mul_(a[3:]).add_(1.0 - a[3:])
    return a.contiguous()


def check_max_pixels(max_pixels: Any) -> Optional[int]:
    """``max_pixels`` checked: ``None`` (no limit) or an int >= 1 (a whole float too: ``5e7``)."""
    if max_pixels is not None and not _pixels(_whole(max_pixels)):
        raise SalienceError(f"max_pixels must be an int >= 1 (width x height) or None for no limit, got {max_pixels!r}")
    return None if max_pixels is None else int(max_pixels)


def _image_path(path: Any) -> Path:
    """``load_image``'s ``path`` as a ``Path``; an image already in memory says what to do instead."""
    if not isinstance(path, (str, os.PathLike)) and (isinstance(path, Tensor) or type(path).__module__.startswith(
            ("numpy", "PIL"))):  # numpy's str_ (a DataFrame column's path) is a str
        raise SalienceError(f"load_image reads an image file and takes its path, got a {type(path).__name__}: an image "
                            "already in memory goes to preprocess(...) as a float tensor (C, H, W) in [0, 1]")
    if isinstance(path, (bytes, bytearray)) and not isinstance(path, str):
        raise SalienceError("load_image takes the image's path; its bytes go as data=, with a name as path")
    from salience.loading.models import path_arg

    return path_arg(path, "load_image's path")


def _integer_top(img) -> int:
    """The value of white in ``img``'s integer samples of PIL's modes ``I;16`` / ``I``: 32767 for a TIFF of signed
    16-bit samples (their largest, as scikit-image and torchvision scale ``int16``), else 65535 (16-bit samples;
    PIL's ``I`` holds 16-bit PGM / TIFF files, and 32-bit ones whose values :func:`_scaled_integers` checks)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return 65535
    bits, fmt = tags.get(258), tags.get(339)
    first = (lambda v: v[0] if isinstance(v, tuple) and v else v)
    return 32767 if first(bits) == 16 and first(fmt) == 2 else 65535


def _scaled_integers(a: np.ndarray, top: int) -> np.ndarray:
    """Integer samples as float32 in ``[0, 1]`` (``/ top``); samples outside ``0..top`` (32-bit ones beyond 16
    bits, negative ones) are refused: clipped, they made a white (or black) image."""
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > top:
        read = ("signed 16-bit samples from {} to {}: salience reads them as 0..32767 (white) and cannot tell what a "
                "negative one is") if top == 32767 else ("integer samples from {} to {}: salience reads 16-bit samples, "
                                                          "and 32-bit ones that fit in 16 bits, as 0..65535 (white)")
        raise SalienceError(read.format(lo, hi) + "; save the image with 8- or 16-bit unsigned samples, or as 32-bit "
                            "floats in [0, 1]")
    return (a.astype(np.float64) / top).astype(np.float32)


_FLOAT_SLACK = 1e-3
"""How far a floating-point image's samples may lie outside ``[0, 1]`` (rounding) before it is refused."""


def _unit_floats(a: np.ndarray) -> np.ndarray:
    """Floating-point samples (PIL's mode ``F``) as they are: in ``[0, 1]``, as torchvision and scikit-image take a
    float image. Anything else is refused: its range is the file's own (0..255, 0..4095, kelvins, metres ...)."""
    if not np.isfinite(a).all():
        raise SalienceError("the image has NaN or infinite samples; save it with finite values in [0, 1]")
    lo, hi = float(a.min()), float(a.max())
    if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
        raise SalienceError(f"floating-point samples from {lo:g} to {hi:g}: salience reads a float image as values in "
                            "[0, 1]; rescale it to [0, 1] (one of 0..255: divide by 255) and save it again, or give "
                            "preprocess(...) a tensor in [0, 1] yourself")
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def _to_rgb_tensor(img, top: int = 65535, alpha: bool = False) -> Tensor:
    """A PIL image of any mode -> ``(3, H, W)`` float32 in ``[0, 1]`` (``top``: white in ``I`` / ``I;16`` samples,
    :func:`_integer_top`); a transparent one composited on white (``alpha``: ``(4, H, W)`` RGBA, not composited).
    A palette's transparent entries and a gray or RGB image's key colour (a PNG's ``tRNS``) are transparency."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = _unit_floats(np.asarray(img, dtype=np.float32)) if mode == "F" else _scaled_integers(np.asarray(img), top)
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0).repeat(3, 1, 1)
    if mode in ("P", "1", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if alpha:
            return torch.from_numpy(np.array(rgba, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    rgb = img.convert("RGB")
    a = np.array(rgb, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def check_info(info: Any, fn: str, *, pixels: bool = True) -> ModelInfo:
    """``info`` as a :class:`ModelInfo` whose preprocessing can be applied: an input size of two whole numbers
    >= 1 (or none), a resize >= 1 (or none), finite means, stds > 0, one or one per channel; else a
    :class:`SalienceError`. numpy / torch values (an array of means, ``np.int64`` sides, ``224 / 0.875 = 256.0``)
    come back as plain ``int`` / ``float`` tuples."""
    if not isinstance(info, ModelInfo):
        raise SalienceError(f"{fn} needs a ModelInfo (model.salience_info, or salience.loading.models.ModelInfo(...)), "
                            f"got {type(info).__name__}")
    fixed: dict[str, Any] = {}
    if info.input_size is not None:
        sides = _plain(info.input_size)
        if sides is None or len(sides) != 2 or not all(_pixels(v) for v in sides):
            raise SalienceError(f"{fn}: the ModelInfo's input_size must be (H, W), two ints >= 1, or None; "
                                f"got {info.input_size!r}")
        fixed["input_size"] = tuple(int(v) for v in sides)
    if info.resize is not None:
        if not _pixels(_whole(info.resize)):
            raise SalienceError(f"{fn}: the ModelInfo's resize must be an int >= 1 (the shorter side) or None; "
                                f"got {info.resize!r}")
        fixed["resize"] = int(info.resize)
    if pixels:  # with_preprocessing checks the sizes it ends with (the user's size overrides the model's)
        _check_info_pixels(fixed, fn)
    for name in ("mean", "std"):
        values = getattr(info, name)
        if values is None:
            continue
        vals = _stat_floats(values, loose=False)
        if not vals or not _stats_ok(vals, name):
            raise SalienceError(f"{fn}: the ModelInfo's {name} must be finite numbers"
                                f"{' > 0' if name == 'std' else ''}, one or one per channel; got {values!r}")
        fixed[name] = vals
    if all(type(v) is type(getattr(info, k)) and v == getattr(info, k) for k, v in fixed.items()):
        return info
    return dataclasses.replace(info, **fixed)


def _check_info_pixels(fixed: dict[str, Any], fn: str) -> None:
    """:func:`check_input_pixels` of a ModelInfo's input size and resize, said as the ModelInfo's."""
    try:
        if "input_size" in fixed:
            check_input_pixels(fixed["input_size"], "input_size")
        if "resize" in fixed:
            check_input_pixels([fixed["resize"]], "resize", resize=True)
    except SalienceError as e:
        raise SalienceError(f"{fn}: the ModelInfo's {e}") from None


def _plain(values: Any) -> Optional[list]:
    """A tuple / list / 1-D array or tensor as a list of its (Python) values; anything else ``None``."""
    if isinstance(values, (Tensor, np.ndarray)):
        return values.reshape(-1).tolist() if values.ndim == 1 and _has_values(values) else None
    return [_whole(v) if isinstance(v, float) else v for v in values] if isinstance(values, (tuple, list)) else None


def _stat_floats(values: Any, loose: bool) -> Optional[tuple[float, ...]]:
    """Means or stds as floats: a tuple / list / 1-D array or tensor of real numbers (no bools), or ``None``.
    ``loose`` (what ``with_preprocessing`` takes): also one number alone, any iterable, an array of any shape."""
    if isinstance(values, (Tensor, np.ndarray)):
        items = values.reshape(-1).tolist() if (loose or values.ndim == 1) and _has_values(values) else None
    elif loose and isinstance(values, numbers.Real):
        items = [values]
    elif isinstance(values, (tuple, list)) or (loose and isinstance(values, Iterable)
                                               and not isinstance(values, (str, bytes, Mapping))):
        items = list(values)
    else:
        items = None
    if items is None or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
        return None
    return tuple(float(v) for v in items)


def _has_values(x: Any) -> bool:
    """``x`` (an array or tensor) holds values to read: not a tensor on the meta device (``.tolist()`` raises)."""
    return not (isinstance(x, Tensor) and x.is_meta)


def _stats_ok(vals: tuple[float, ...], name: str) -> bool:
    """Means are finite; stds finite and > 0 (a zero std makes every pixel ``inf``)."""
    return all(math.isfinite(v) for v in vals) and (name != "std" or min(vals) > 0)


def _whole(v: Any) -> Any:
    """``v`` as an ``int`` when it is a float with a whole value (``256.0``), else ``v``."""
    return int(v) if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)) and \
        math.isfinite(v) and float(v) == int(v) else v


def _pixels(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def check_image(x: Any, info: ModelInfo, fn: str, any_channels: bool = False) -> Tensor:
    """``x`` is a float image tensor ``(C, H, W)`` or ``(B, C, H, W)`` with pixels, whose ``C`` suits ``info``
    (its channels, 1 or 3; ``any_channels``: any ``C`` but that of an ``(H, W, C)`` image, ``C`` > 4 with 1, 3 or 4
    last); else a :class:`SalienceError` saying how to make one."""
    if not isinstance(x, Tensor):
        hint = " (a numpy array: torch.from_numpy(a))" if type(x).__module__.startswith("numpy") else \
            " (a PIL image, a file: salience.loading.load_image(path))" if type(x).__module__.startswith("PIL") else ""
        raise SalienceError(f"{fn} takes an image tensor (C, H, W) or (B, C, H, W), got {type(x).__name__}{hint}")
    if x.dim() not in (3, 4):
        raise SalienceError(f"{fn} takes an image tensor (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():  # uint8 is 0..255 (torchvision's convention); other integers say their bits
        raise SalienceError(f"{fn} takes a floating-point image in [0, 1], got {x.dtype}: " + (
            "x.float()" if x.dtype == torch.bool else "x.float() / 255" if x.dtype == torch.uint8 else
            "x.float() / 255 for 8-bit values, x.float() / 65535 for 16-bit ones"))
    if x.is_meta:
        raise SalienceError(f"{fn}: the image is on the meta device, which holds no values")
    c, h, w = x.shape[-3:]
    if h == 0 or w == 0 or x.numel() == 0:
        raise SalienceError(f"{fn}: the image has no pixels (shape {tuple(x.shape)})")
    hwc = x.shape[-1] in (1, 3, 4, info.channels)
    if c not in (1, 3, info.channels) and not (any_channels and (c <= 4 or not hwc)):
        hint = ": an (H, W, C) image is x.permute(2, 0, 1)" if hwc and c > 4 else \
            ": an RGBA image's RGB is x[..., :3, :, :] (load_image composites the alpha on white)" if c == 4 else ""
        raise SalienceError(f"{fn}: the image has {c} channels (shape {tuple(x.shape)}); expected (C, H, W) with "
                            f"C = {info.channels}{hint}")
    return x


def _check_stats(x: Tensor, info: ModelInfo, fn: str) -> None:
    """``info``'s mean / std fit the channels of ``x`` (one value, or one per channel)."""
    c = x.shape[-3]
    for name, values in (("mean", info.mean), ("std", info.std)):
        if values is not None and len(values) not in (1, c) and not (c == 1 and len(values) == info.channels):
            raise SalienceError(f"{fn}: the ModelInfo's {name} has {len(values)} values for an image of {c} "
                                f"channels; give one value or one per channel")


def resize_crop(image: Tensor, info: ModelInfo) -> Tensor:
    """Resize (and centre-crop) ``image`` ``(C, H, W)`` or ``(B, C, H, W)`` as ``info`` says.

    ``info.resize`` set: the shorter side goes to ``resize`` then a centre crop of
    ``info.input_size`` (torchvision's ``Resize + CenterCrop``); otherwise a plain resize to
    ``info.input_size``; with no ``input_size`` the image itself is returned (no copy, as torchvision's
    ``Resize`` returns its input when the size is already right: ``.clone()`` it before changing it in place).
    ``info.interpolation`` (bilinear or bicubic), antialiased, values clamped to ``[0, 1]``. Any number of channels
    (RGBA, a mask, a stack), but not an ``(H, W, C)`` image: ``C`` > 4 with 1, 3 or 4 last is refused.
    """
    info = check_info(info, "resize_crop")
    check_image(image, info, "resize_crop", any_channels=True)
    return _resize_crop(image, info)


def _resize_crop(image: Tensor, info: ModelInfo) -> Tensor:
    """:func:`resize_crop` of an image and an info already checked (``check_image``, :func:`check_info`)."""
    if info.input_size is None:
        return image
    if image.dtype in (torch.float16, torch.bfloat16) and image.device.type == "cpu":  # no CPU kernel: float32
        return _resize_crop(image.float(), info).to(image.dtype)
    x = image.unsqueeze(0) if image.dim() == 3 else image
    source = x
    th, tw = (int(s) for s in info.input_size)
    h, w = x.shape[-2:]
    mode = info.interpolation if info.interpolation in ("bilinear", "bicubic") else "bilinear"
    if info.resize:
        s = int(info.resize)
        nh, nw = (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)
        if nh * nw > LARGEST_RESIZE:  # an extreme aspect: the crop's part alone, not the whole resized image
            x = keep_flat(source, _cropped_resize(x, (nh, nw), (th, tw), mode)).clamp(0.0, 1.0)
            return x[0] if image.dim() == 3 else x
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
        if nh < th or nw < tw:
            x = F.interpolate(x, size=(max(nh, th), max(nw, tw)), mode=mode, align_corners=False)
            nh, nw = x.shape[-2:]
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    elif (h, w) != (th, tw):
        x = F.interpolate(x, size=(th, tw), mode=mode, align_corners=False, antialias=True)
    x = keep_flat(source, x).clamp(0.0, 1.0)
    return x[0] if image.dim() == 3 else x


def keep_flat(source: Tensor, resized: Tensor) -> Tensor:
    """``resized`` (a resize of ``source``, both ``(B, C, H, W)``) with every channel that is one value
    everywhere in ``source`` exactly that value. The interpolation of a constant is the constant, but
    the sums of its weights leave rounding noise (a spread of 2e-7 on a flat grey image brought to
    224 x 224): the image was no longer flat, and what checks for a flat image or a constant map
    (``salience evaluate``'s baselines: a spectral residual of that noise scaled to ``[0, 1]``) missed it."""
    some = source[..., ::61, ::67]  # a sparse sample first: a picture's channels differ there (a tenth of the cost)
    if not bool((some.amin((-2, -1)) == some.amax((-2, -1))).any()):
        return resized
    lo, hi = source.amin((-2, -1)), source.amax((-2, -1))
    flat = lo == hi
    if not bool(flat.any()):
        return resized
    return torch.where(flat[..., None, None], lo[..., None, None].to(resized.dtype), resized)


LARGEST_RESIZE = 2 ** 22
"""Pixels of the resized image (per channel) over which ``crop`` preprocessing computes only the
centre crop's part of it (:func:`_cropped_resize`): a 1x60000 image resized to a shorter side of 256
was 256 x 15,360,000 (47 GB as float32 RGB). Up to it, the whole image is resized then cropped, as
torchvision does (the same numbers as before)."""


def _aa_filter(x: Tensor, mode: str) -> Tensor:
    """The antialiasing kernels of ``F.interpolate(..., antialias=True)`` (PIL's): triangle, or Keys'
    cubic with ``a = -0.5``."""
    x = x.abs()
    if mode == "bilinear":
        return (1 - x).clamp_min(0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _aa_weights(size: int, out: int, start: int, count: int, mode: str) -> tuple[int, Tensor]:
    """Outputs ``start .. start + count`` of an antialiased resize of ``size`` samples to ``out``, as
    ``F.interpolate`` computes them: the first input sample used and the ``(count, span)`` weights."""
    scale = size / out
    support = (2.0 if mode == "bilinear" else 4.0) * 0.5 * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (torch.arange(start, start + count, dtype=torch.float64) + 0.5)
    lo = (centers - support + 0.5).trunc().clamp_min(0).long()
    hi = (centers + support + 0.5).trunc().clamp_max(size).long()
    first, span = int(lo.min()), int((hi - lo.min()).max())
    j = first + torch.arange(span, dtype=torch.float64)
    w = _aa_filter((j[None, :] - centers[:, None] + 0.5) * inv, mode)
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    w = w * inside
    total = w.sum(1, keepdim=True)
    return first, torch.where(total != 0, w / total.where(total != 0, torch.ones_like(total)), w)


def _cropped_resize(x: Tensor, resized: tuple[int, int], crop: tuple[int, int], mode: str) -> Tensor:
    """``resize_crop``'s result (before the clamp) for ``x`` ``(B, C, H, W)`` resized to ``resized``
    then centre-cropped to ``crop``, computed without the resized image: each axis the crop cuts is
    resampled for the crop's outputs only (the weights of ``F.interpolate``'s antialiased resize,
    from the input samples they need); an axis shorter than the crop is resized as before (to its
    resized length, then stretched to the crop's without antialiasing)."""
    for axis, n, t in ((-1, resized[1], crop[1]), (-2, resized[0], crop[0])):
        if n <= t:
            continue
        first, w = _aa_weights(x.shape[axis], n, int(round((n - t) / 2.0)), t, mode)
        part = x.narrow(axis, first, w.shape[1]).movedim(axis, -1)
        x = (part @ w.T.to(part.dtype)).movedim(-1, axis)
    short = tuple(t if n > t else n for n, t in zip(resized, crop))  # the axes not cropped: resized alone
    if short != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=short, mode=mode, align_corners=False, antialias=True)
    if tuple(x.shape[-2:]) != tuple(crop):
        x = F.interpolate(x, size=crop, mode=mode, align_corners=False)
    return x


def _stats(values: Optional[Sequence[float]], c: int, like: Tensor) -> Optional[Tensor]:
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return t.view(-1, 1, 1) if like.dim() == 3 else t.view(1, -1, 1, 1)


def luma(image: Tensor) -> Tensor:
    """The gray image a 1-channel model takes of an RGB image ``(3, H, W)``/``(B, 3, H, W)``: its
    ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``, one channel (kept)."""
    cdim = 0 if image.dim() == 3 else 1
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
    return (image * (w.view(-1, 1, 1) if cdim == 0 else w.view(1, -1, 1, 1))).sum(cdim, keepdim=True)


def normalize_input(image: Tensor, info: ModelInfo) -> Tensor:
    """A ``[0, 1]`` image ``(C, H, W)``/``(B, C, H, W)`` -> the tensor the model takes.

    Converts RGB to one channel (ITU-R 601 luma) when ``info.channels == 1``, then applies
    ``(x - mean) / std`` when ``info`` has them.
    """
    info = check_info(info, "normalize_input")
    return _normalize(check_image(image, info, "normalize_input"), info)


def _normalize(x: Tensor, info: ModelInfo, fn: str = "normalize_input") -> Tensor:
    """:func:`normalize_input` of an image and an info already checked (``check_image``, :func:`check_info`); the
    means and stds are checked against the image's channels here (after the luma of a gray model)."""
    cdim = 0 if x.dim() == 3 else 1
    if info.channels == 1 and x.shape[cdim] == 3:
        x = luma(x)
    _check_stats(x, info, fn)
    mean, std = _stats(info.mean, x.shape[cdim], x), _stats(info.std, x.shape[cdim], x)
    if mean is not None:
        x = x - mean
    if std is not None:
        x = x / std
    return x


def unnormalize(x: Tensor, info: ModelInfo) -> Tensor:
    """Undo :func:`normalize_input`'s mean/std: the model's input back to a ``[0, 1]`` picture."""
    info = check_info(info, "unnormalize")
    check_image(x, info, "unnormalize")
    _check_stats(x, info, "unnormalize")
    std, mean = _stats(info.std, 0, x), _stats(info.mean, 0, x)
    if std is None and mean is None:
        return x.clamp(0.0, 1.0)
    out = x * std if std is not None else x + mean  # a new tensor: the rest in place (x is the caller's)
    if std is not None and mean is not None:
        out.add_(mean)
    return out.clamp_(0.0, 1.0)


def preprocess(image: Tensor, info: ModelInfo) -> Tensor:
    """``image`` ``(3, H, W)`` in ``[0, 1]`` -> the model's input ``(C, h, w)``: resize, crop, normalize. With
    nothing to do (no input size, mean or std, the model's channels) that is ``image`` itself, not a copy."""
    return normalize_input(resize_crop(image, info), info)


RESIZE_MODES = ("crop", "stretch", "none")
"""How :func:`resize_crop` brings an image to the model's input size: ``crop`` (shorter side to
``resize``, then a centre crop of ``input_size``), ``stretch`` (straight to ``input_size``),
``none`` (the image as it is)."""


def resize_mode(info: ModelInfo) -> str:
    """``info``'s resizing as one of :data:`RESIZE_MODES`."""
    info = check_info(info, "resize_mode", pixels=False)  # the mode: sizes are checked where they are used
    if info.input_size is None:
        return "none"
    return "crop" if info.resize else "stretch"


def with_preprocessing(info: ModelInfo, *, size: Union[None, int, Sequence[int]] = None, resize: Optional[int] = None,
                       resize_mode: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None, channels: Optional[int] = None) -> ModelInfo:
    """``info`` with the given preprocessing in place of its own (``None`` keeps the model's).

    ``size``: the model's input ``(H, W)`` (or one side for a square). ``resize``: the shorter
    side before the centre crop of ``size`` (so ``resize_mode="crop"``). ``resize_mode``: one of
    :data:`RESIZE_MODES`; default: ``"crop"`` when ``resize`` is given, else the model's own, or
    ``"stretch"`` when ``size`` is given to a model without one. In ``crop`` mode without a
    ``resize``, a model's own resize keeps its ratio to the crop (torchvision's 256 / 224) when
    ``size`` changes; a model without one resizes its shorter side to ``max(size)``.
    ``mean`` / ``std``: per-channel normalization, one value or one per channel. ``channels``: the
    model's input channels, 1 (gray: RGB images become their ITU-R 601 luma) or 3 (RGB), for a model
    whose info does not say (a ``python:`` or ``.pt2`` model with a one-channel stem).
    """
    info = check_info(info, "with_preprocessing", pixels=False)
    if channels is not None:
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels not in (1, 3):
            raise SalienceError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
        info = dataclasses.replace(info, channels=int(channels))
    size_t = _check_size(size)
    if resize is not None:
        resize = _positive_int(resize, "resize")
        check_input_pixels([resize], "resize", resize=True)
    mode = _choose_mode(info, size_t, resize, resize_mode)
    stats = {"mean": _stats_arg(info, mean, "mean", info.mean), "std": _stats_arg(info, std, "std", info.std)}
    if mode == "none":
        if size_t is not None or resize is not None:
            raise SalienceError("resize_mode 'none' keeps each image as it is; it takes no size or resize")
        return dataclasses.replace(info, input_size=None, resize=None, **stats)
    target = size_t or info.input_size
    if target is None:
        raise SalienceError(f"resize_mode {mode!r} needs the input size (size), which {info.name} does not say")
    if mode == "stretch" and resize is not None:
        raise SalienceError("resize (the shorter side before a centre crop) goes with resize_mode 'crop', not 'stretch'")
    new_resize = _crop_resize(info, target, resize) if mode == "crop" else None
    _check_info_pixels({"input_size": target, **({} if new_resize is None else {"resize": new_resize})},
                       "with_preprocessing")  # the sizes it ends with: a model's 8192 x 8192 is overridden by size=224
    return dataclasses.replace(info, input_size=tuple(int(v) for v in target), resize=new_resize, **stats)


def _choose_mode(info: ModelInfo, size: Optional[tuple[int, int]], resize: Optional[int],
                 mode: Optional[str]) -> str:
    if mode is not None:
        if mode not in RESIZE_MODES:
            raise SalienceError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        return mode
    if resize is not None:
        return "crop"
    own = resize_mode(info)
    return "stretch" if own == "none" and size is not None else own


def _crop_resize(info: ModelInfo, target: tuple[int, int], resize: Optional[int]) -> int:
    """The shorter side before the centre crop of ``target``."""
    if resize is not None:
        return int(resize)
    if info.resize and info.input_size:
        if tuple(target) == tuple(info.input_size):
            return int(info.resize)
        return max(1, round(int(info.resize) * min(target) / min(info.input_size)))
    return max(target)


def _positive_int(v: Any, name: str) -> int:
    """``v`` as an int >= 1: an int (numpy's too) or a float with a whole value (``8.0``); else a SalienceError."""
    if not _pixels(_whole(v)):
        raise SalienceError(f"{name} must be a positive int (pixels), got {v!r}")
    return int(v)


def _check_size(size: Union[None, int, Sequence[int]]) -> Optional[tuple[int, int]]:
    """``with_preprocessing``'s ``size`` (one side, two, a 0-d or 1-D array or tensor of them) as ``(H, W)``."""
    if size is None:
        return None
    if isinstance(size, (Tensor, np.ndarray)):
        values = size.reshape(-1).tolist() if size.ndim <= 1 and _has_values(size) else []
    elif isinstance(size, numbers.Number) or isinstance(size, (str, bytes)) or not isinstance(size, Sequence):
        values = [size]
    else:
        values = list(size)
    if len(values) not in (1, 2):
        raise SalienceError(f"size must be one side or (H, W), got {size!r}")
    values = [_positive_int(v, "size") for v in values]
    check_input_pixels(values, "size")
    return (values[0], values[-1])


def _stats_arg(info: ModelInfo, values: Optional[Sequence[float]], name: str,
               own: Optional[tuple[float, ...]]) -> Optional[tuple[float, ...]]:
    """``mean`` / ``std`` checked: one value or one per channel, finite (``std`` > 0)."""
    if values is None:
        return own
    vals = _stat_floats(values, loose=True)
    if vals is None:
        raise SalienceError(f"{name} must be a number or one number per channel, got {values!r}")
    if len(vals) not in (1, info.channels):
        raise SalienceError(f"{name} needs 1 or {info.channels} values (one per channel), got {len(vals)}")
    if not _stats_ok(vals, name):
        raise SalienceError(f"{name} values must be finite{' and > 0' if name == 'std' else ''}, got {vals}")
    return vals if len(vals) == info.channels else vals * info.channels


def preprocessing_record(info: ModelInfo) -> dict[str, Any]:
    """What :func:`preprocess` does with ``info``, as plain JSON values: the resize mode, the input
    size, the shorter side resized to and the crop (``crop`` mode), mean, std and channels."""
    info = check_info(info, "preprocessing_record")
    mode = resize_mode(info)
    size = list(info.input_size) if info.input_size is not None else None
    return {"mode": mode, "input_size": size, "resize": int(info.resize) if mode == "crop" else None,
            "crop": size if mode == "crop" else None,
            "mean": list(info.mean) if info.mean is not None else None,
            "std": list(info.std) if info.std is not None else None, "channels": info.channels}


def load_images(
    paths: Sequence[PathLike],
    info: ModelInfo,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> tuple[Optional[Tensor], list[str], list[tuple[str, str]]]:
    """Load and preprocess several image files into one batch, skipping the bad ones.

    Returns ``(batch, ok_paths, errors)``: ``batch`` ``(N, C, h, w)`` is the model's input for
    the ``N`` files in ``ok_paths`` (``None`` if no file could be read); ``errors`` lists
    ``(path, message)`` for each file that failed. When the model accepts any size
    (``info.input_size`` is ``None``), images are resized to the first good image's size so
    that they form one batch.
    """
    paths = _path_list(paths)
    info = check_info(info, "load_images")
    max_pixels = check_max_pixels(max_pixels)
    tensors: list[Tensor] = []
    ok: list[str] = []
    errors: list[tuple[str, str]] = []
    size: Optional[tuple[int, int]] = None
    for path in paths:  # info and max_pixels checked once, above; load_image's tensors need no check_image
        try:
            img = _resize_crop(load_image(path, max_pixels=max_pixels), info)
        except SalienceError as e:
            errors.append((str(path), str(e)))
            continue
        except MemoryError:
            errors.append((str(path), f"{path}: out of memory while decoding; lower the limit (--max-pixels / max_pixels=)"))
            continue
        if size is None:
            size = (int(img.shape[-2]), int(img.shape[-1]))
        elif tuple(img.shape[-2:]) != size:
            img = F.interpolate(img.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                                antialias=True)[0].clamp(0, 1)
        tensors.append(_normalize(img, info, "load_images"))
        ok.append(str(path))
    batch = torch.stack(tensors) if tensors else None
    return batch, ok, errors


def _path_list(paths: Any) -> list:
    """``load_images``' ``paths``: a list (any iterable) of file paths; one path alone is refused, not read as its
    letters."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise SalienceError(f"load_images takes a list of image paths, got one path {os.fsdecode(paths)!r}: "
                            "pass [path] (a folder: sorted(Path(folder).glob('*.png')), or salience.runs for a dataset)")
    if not isinstance(paths, Iterable):
        raise SalienceError(f"load_images takes a list of image paths, got {type(paths).__name__}")
    items = list(paths)
    bad = next((p for p in items if not isinstance(p, (str, os.PathLike))), None)
    if bad is not None:
        raise SalienceError(f"load_images takes image paths (str or pathlib.Path), got a {type(bad).__name__} among them")
    return items
