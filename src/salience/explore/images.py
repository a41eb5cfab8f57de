"""The images the explorer shows: from the files and folders the user named, and uploads.

The page refers to an image by its id only, never by a path: the files that can be read are
exactly those listed when the server started (the files named, and the image files directly
inside the folders named) and the uploads, so no request can reach another file. Each source is
a :class:`Source` (``name`` and ``entries()``, the images listed); a source may also answer ids it
does not list with ``find(id)``: a dataset run (:mod:`salience.explore.runs`) reaches its rows'
images that way.
Every image is read with :func:`salience.loading.load_image`, so the explorer refuses what the
command line refuses (not an image, truncated, over ``max_pixels``), with the same messages. An
entry with a ``url`` (a run's row in object storage, ``s3://...``) is read through
:mod:`salience.loading.remote`, with the environment of dataset runs (``AWS_ENDPOINT_URL`` ...).
An image listed whose file or object is gone since (deleted or moved) is an :class:`ImageGone`,
whatever the source: the server answers it with 404 and that message.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

from torch import Tensor

from salience._core.errors import SalienceError
from salience.loading import remote
from salience.loading.images import DEFAULT_MAX_PIXELS, load_image

__all__ = ["ImageEntry", "Source", "FileSource", "image_files", "folder_images", "unreadable", "ImageStore", "ImageGone",
           "IMAGE_SUFFIXES", "MAX_UPLOAD_BYTES", "DECODED_BYTES", "UPLOADS_BYTES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_UPLOAD_BYTES = 64 * 2**20
"""Largest upload accepted (bytes); larger bodies get 413 before they are read whole."""
UPLOADS_BYTES = 2 * 2**30
"""Budget of the uploads' files on disk (the temporary folder): the oldest are removed past it, or
past ``max_uploads`` (256 uploads of up to 64 MB each were 16 GB)."""
DECODED_BYTES = 2**30
"""Budget of the decoded images kept (float32 pixels): the last used, at most 16 of them, within it
(always the last one). By count alone, 16 images at the pixel limit (600 MB each) held 9.6 GB."""
_BYTES_PER_PIXEL = 16
"""Bytes per pixel of the largest uncompressed image file (RGBA float32 TIFF): an object larger than
``max_pixels * 16`` + 1 MB of metadata cannot be an image within the pixel limit, so it is not read."""


class ImageGone(SalienceError):
    """The image was listed, but its file or object is there no longer (deleted or moved): a 404."""


@dataclass
class ImageEntry:
    """One image: its ``id`` (what the page uses), a display ``name``, the ``source`` it comes
    from, the file it is read from (``path``) or the object (``url``, then ``path`` is ``None``),
    and any ``fields`` its source knows (a run's class, metrics)."""

    id: str
    name: str
    source: str
    path: Optional[Path]
    fields: dict[str, Any] = field(default_factory=dict)
    url: Optional[str] = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "source": self.source, **self.fields}


class Source(Protocol):
    """Where images come from: a name and its entries (ids unique across sources)."""

    name: str

    def entries(self) -> list[ImageEntry]: ...


def image_files(folder: Path) -> Iterator[Path]:
    """The image files directly inside ``folder`` (by suffix, :data:`IMAGE_SUFFIXES`), in the folder's own order,
    read as they are asked for: whether a folder holds one, or a readable one, costs no listing of all of it. The
    suffix is looked at before the file's kind, which the folder's entry says (no ``stat`` of each file where the
    file system says it: a round trip each on a network folder)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                yield Path(folder) / entry.name


def folder_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder`` (:func:`image_files`), sorted by name: what the page lists."""
    return [Path(folder) / name for name in sorted(f.name for f in image_files(folder))]


_WORDS_READ_BYTES = 64 * 2**20
"""A file the folder check cannot decode is read whole, once, for :func:`load_image`'s words when it is at most this
large; a larger one is opened by ``load_image`` itself (again, up to three times: such files are few)."""


def unreadable(path: Path, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Why the page cannot show the image file ``path`` (:func:`salience.loading.load_image`'s one line), or ``None``.
    The file is opened once (:func:`_decodes`; one over 64 MiB that fails is opened again by ``load_image``): its
    header read and its size checked, then a PNG's structure verified (``PIL.Image.verify``: its chunks and their
    checksums, which a cut or damaged file fails; no pixel inflated), and any other format decoded by Pillow (a JPEG
    at 1/8 of its size, the decoder's DCT scaling: every coefficient is still read, so a cut data stream fails as in
    a full decode, at less than its cost). A file that fails that is read by ``load_image`` from the bytes read here
    (the page's verdict and its words: a PNG whose image-data checksum alone is wrong still decodes). An
    image Pillow decodes that ``load_image`` then refuses (a float TIFF outside ``[0, 1]``, signed samples below 0)
    passes: the page says so, naming the file, when it is shown."""
    try:
        with open(path, "rb") as f:  # the one open of the file (load_image reads the bytes read here)
            if _decodes(f, max_pixels):
                return None
            f.seek(0)
            data: Optional[bytes] = f.read() if os.fstat(f.fileno()).st_size <= _WORDS_READ_BYTES else None
    except OSError:
        data = None  # it cannot be opened or read: load_image says why
    try:
        load_image(path, max_pixels=max_pixels, data=data)
    except SalienceError as e:
        return str(e)
    return None


def _decodes(f: Any, max_pixels: Optional[int]) -> bool:
    """Whether the image file open as ``f`` is sound as far as the folder check looks (:func:`unreadable`): its
    sides within ``max_pixels``, a PNG's chunks and checksums verified, any other format decoded (a JPEG at 1/8)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: the size is checked here
            warnings.simplefilter("ignore")
            with Image.open(f) as img:
                w, h = img.size
                if w <= 0 or h <= 0 or (max_pixels is not None and w * h > max_pixels):
                    return False
                if img.format == "PNG":
                    img.verify()
                    return True
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))  # JPEG (and MPO) only: the others ignore it
                img.load()
                return True
    except Exception:  # noqa: BLE001 - PIL's plugins raise many types on a foreign or damaged file
        return False


class FileSource:
    """The image files named, and the image files directly inside the folders named, in order."""

    name = "files"

    def __init__(self, paths: Sequence[Union[str, "os.PathLike[str]"]]) -> None:
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += folder_images(p)
            elif p.exists():
                files.append(p)
            else:
                raise SalienceError(f"{p}: no such file or folder; check the path")
        self._entries = [ImageEntry(f"f{i}", f.name, self.name, f.resolve()) for i, f in enumerate(files)]

    def entries(self) -> list[ImageEntry]:
        return list(self._entries)


class ImageStore:
    """The images of every source and the uploads (the last ``max_uploads`` kept, within
    ``uploads_bytes`` on disk, in a temporary folder removed by :meth:`close`); decoded images are
    kept for the last few used (at most 16, within ``decoded_bytes``)."""

    def __init__(self, sources: Sequence[Source] = (), *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 max_uploads: int = 256, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 decoded_bytes: int = DECODED_BYTES, uploads_bytes: int = UPLOADS_BYTES) -> None:
        self.sources = list(sources)
        self.uploads_bytes = uploads_bytes
        self.decoded_bytes = decoded_bytes
        self.max_pixels = max_pixels
        self.max_uploads = max_uploads
        self.max_upload_bytes = max_upload_bytes
        self._tmp = tempfile.TemporaryDirectory(prefix="salience-explore-")
        self._uploads: collections.OrderedDict[str, ImageEntry] = collections.OrderedDict()
        self._upload_sizes: dict[str, int] = {}
        self._decoded: collections.OrderedDict[str, tuple[Tensor, str]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._fixed = {e.id: e for s in self.sources for e in s.entries()}

    def entries(self) -> list[ImageEntry]:
        with self._lock:
            return list(self._fixed.values()) + list(self._uploads.values())

    def entry(self, image_id: str) -> ImageEntry:
        with self._lock:
            e = self._fixed.get(image_id) or self._uploads.get(image_id)
        for s in self.sources:
            if e is None and hasattr(s, "find"):
                e = s.find(image_id)
        if e is None:
            raise KeyError(image_id)
        return e

    def add_upload(self, data: bytes, filename: str) -> ImageEntry:
        """Store uploaded bytes; refuse (``SalienceError``) what :func:`load_image` refuses."""
        name = re.sub(r"[^A-Za-z0-9._ -]+", "_", os.path.basename(filename or "upload"))[:80] or "upload"
        if len(data) > self.max_upload_bytes:
            raise SalienceError(f"{name}: {len(data) / 2**20:.1f} MB is over the upload limit of "
                                f"{self.max_upload_bytes / 2**20:g} MB")
        digest = hashlib.sha256(data).hexdigest()
        image_id = "u" + digest[:16]
        path = Path(self._tmp.name) / image_id
        path.write_bytes(data)
        entry = ImageEntry(image_id, name, "upload", path)
        try:
            self._decode(entry)
        except SalienceError as e:
            path.unlink(missing_ok=True)
            raise SalienceError(str(e).replace(str(path), name)) from None
        with self._lock:
            self._uploads[image_id] = entry
            self._uploads.move_to_end(image_id)
            self._upload_sizes[image_id] = len(data)
            while len(self._uploads) > self.max_uploads or (
                    sum(self._upload_sizes.values()) > self.uploads_bytes and len(self._uploads) > 1):
                old, e_old = self._uploads.popitem(last=False)
                self._upload_sizes.pop(old, None)
                self._decoded.pop(old, None)
                if e_old.path is not None:
                    e_old.path.unlink(missing_ok=True)
        return entry

    def load(self, image_id: str) -> tuple[Tensor, str]:
        """Image ``image_id`` as ``(3, H, W)`` in ``[0, 1]`` and the digest of its file's bytes."""
        return self._decode(self.entry(image_id))

    def _decode(self, entry: ImageEntry) -> tuple[Tensor, str]:
        with self._lock:
            hit = self._decoded.get(entry.id)
            if hit is not None:
                self._decoded.move_to_end(entry.id)
                return hit
        if entry.url is not None:  # blocking network reads: the server calls this in a thread
            limit = None if self.max_pixels is None else self.max_pixels * _BYTES_PER_PIXEL + 2**20
            try:
                data = remote.read_bytes(entry.url, limit)
            except remote.NoSuchObject as e:
                raise ImageGone(f"the image is gone from storage: {e}") from None
            digest = hashlib.sha256(data).hexdigest()
            image = load_image(entry.url, max_pixels=self.max_pixels, data=data)
        else:
            assert entry.path is not None
            try:
                digest = hashlib.sha256(entry.path.read_bytes()).hexdigest() if entry.path.is_file() else ""
                if not entry.path.exists():
                    raise FileNotFoundError(entry.path)
            except FileNotFoundError:
                shown = entry.name if entry.source == "upload" else entry.path  # never the server's temporary folder
                raise ImageGone(f"the image is gone from disk: {shown}: no such file; check the path "
                                "(was it deleted or moved?)") from None
            image = load_image(entry.path, max_pixels=self.max_pixels)
        with self._lock:
            self._decoded[entry.id] = (image, digest)
            kept = sum(t.nbytes for t, _ in self._decoded.values())
            while len(self._decoded) > 16 or (kept > self.decoded_bytes and len(self._decoded) > 1):
                kept -= self._decoded.popitem(last=False)[1][0].nbytes
        return image, digest

    def close(self) -> None:
        self._tmp.cleanup()
