"""What a dataset run reads: image paths from folders, globs and list files; labels from a CSV;
a :class:`torch.utils.data.Dataset` that decodes and resizes each image in a DataLoader worker
(a bad file becomes an item with its error, never an exception that stops the run).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import pickle
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from salience._core.errors import SalienceError, user_stacklevel
from salience._core.files import check_image_file, read_text
from salience._core.info import ModelInfo
from salience.loading import remote
from salience.loading.images import DEFAULT_MAX_PIXELS, load_image, mask_values, normalize_input, resize_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PathLike = Union[str, "os.PathLike[str]"]


def is_dataset_spec(text: str) -> bool:
    """Whether a command-line input names many images: a folder, a glob or a ``.txt`` list, or any
    object storage URL (``s3://bucket/prefix/``)."""
    if remote.is_remote(text):
        return True
    p = Path(text)
    return (p.is_dir() or p.suffix.lower() == ".txt" or (not p.exists() and glob.has_magic(text))
            or text.endswith(("/", os.sep)))  # written as a folder, also when there is none


def expand(specs: Sequence[PathLike]) -> list[str]:
    """Image paths, in a stable order: a folder's images (recursively, sorted), a glob's matches
    (sorted), a ``.txt`` file's lines (as listed; blank lines and ``#`` comments skipped; relative
    paths from the list's folder), a file as it is. Each may be an object storage URL
    (``s3://bucket/prefix/``, :mod:`salience.loading.remote`): a prefix is listed like a folder, a
    URL glob and a list file in storage work the same, and a list's lines may name URLs."""
    paths: list[str] = []
    for spec in specs:
        text = os.fspath(spec)
        if remote.is_remote(text):
            paths += _remote(text)
            continue
        p = Path(text)
        if p.is_dir():
            found = _outside_runs(_folder_images(p), p)
            if not found:
                raise SalienceError(f"{p}: no image files in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.suffix.lower() == ".txt" and p.exists():  # a FIFO of its name too: refused as a list, not waited on
            paths += _list_file(p)
        elif text.endswith(("/", os.sep)):  # written as a folder: not a missing image of that name
            raise SalienceError(f"{text}: no such folder; check the path")
        elif p.suffix.lower() == ".txt" and not p.exists():  # a list: not a missing image of that name
            raise SalienceError(f"{text}: no such list file; check the path")
        elif not p.exists() and glob.has_magic(text):
            found = _outside_runs(sorted(f for f in glob.glob(text, recursive=True) if Path(f).is_file()),
                                  Path(_glob_base(text)))
            if not found:
                raise SalienceError(f"{text}: the pattern matches no file; check it (quote it so the shell leaves it)")
            paths += found
        else:
            check_image_file(p)  # a FIFO named as an image: refused before the run (its open would wait for ever)
            paths.append(text)  # a missing file becomes a row with its error
    if not paths:
        raise SalienceError("no images given; name a folder, a glob, a .txt list or image files")
    return paths


def _folder_images(folder: Path) -> list[str]:
    """A folder's image files, recursively, sorted by path: linked subfolders are followed (as
    torchvision's ``ImageFolder`` does), each real folder once (a link back up is no loop); hidden
    files and folders (``._x.jpg``, ``.ipynb_checkpoints/``) are left out, as a glob leaves them."""
    seen: set[str] = set()
    found = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")  # a stable order
                         and os.path.realpath(os.path.join(top, d)) not in seen)
        found += [os.path.join(top, f) for f in files if not f.startswith(".")
                  and Path(f).suffix.lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(top, f))]
    return sorted(found)


def _glob_base(pattern: str) -> str:
    """The folder a glob starts from: its path up to the first part with a wildcard."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return str(Path(*parts[:fixed])) if fixed else "."


def _outside_runs(files: list[str], base: Path) -> list[str]:
    """``files`` less those inside a dataset run's folder below ``base`` (a folder with the
    ``run.json`` of a salience run: its thumbnails and overlays are not inputs), so that a run
    written into the folder it explains (``explain imgs/ --out imgs/run``) lists the same images
    when its command runs again."""
    from salience.runs.store import manifest_format  # the one test of a salience manifest (store imports this)

    is_run: dict[Path, bool] = {}

    def run_folder(d: Path) -> bool:
        if d not in is_run:
            is_run[d] = manifest_format(d / "run.json") is not None
        return is_run[d]

    base = base.absolute()
    kept = []
    for f in files:
        parents = Path(f).absolute().parents
        below = parents[:next((i for i, d in enumerate(parents) if d == base), len(parents))]
        if not any(run_folder(d) for d in below):
            kept.append(f)
    return kept


LIST_FILE = "a text file of image paths, one a line (UTF-8)"
"""What a dataset's ``.txt`` list is expected to be, in its errors (:func:`_list_file`)."""
LABELS_CSV = "a CSV file of path,label lines (UTF-8)"
"""What a labels CSV is expected to be, in its errors (:func:`read_labels_csv`)."""


def _list_file(p: Path) -> list[str]:
    """The image paths the ``.txt`` list ``p`` names (blank lines and ``#`` comments skipped; relative ones from its
    folder), read through one checked handle (:func:`salience._core.files.read_text`: a FIFO, a folder, a device, a
    huge or a non-UTF-8 file is a :class:`SalienceError` saying a list was expected, never waited on)."""
    text = read_text(p, str(p), LIST_FILE, too_big="split it into smaller lists and give them all")
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln if Path(ln).is_absolute() or remote.is_remote(ln) else str(p.parent / ln)
           for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise SalienceError(f"{p}: the list names no image; write one path per line")
    return out


def _remote(url: str) -> list[str]:
    """The image URLs an object storage URL names: a glob's matches, a list file's lines, a prefix's
    images (recursively, sorted), or the one object."""
    if glob.has_magic(url.split("://", 1)[1]):
        found = remote.glob(url)
        if not found:
            raise SalienceError(f"{url}: the pattern matches no object; check it (quote it so the shell leaves it)")
        return found
    if url.lower().endswith(".txt"):
        lines = [ln.strip() for ln in remote.read_bytes(url).decode("utf-8-sig").splitlines()]
        folder = url.rsplit("/", 1)[0]
        out = [ln if remote.is_remote(ln) or Path(ln).is_absolute() else remote.join(folder, ln)
               for ln in lines if ln and not ln.startswith("#")]
        if not out:
            raise SalienceError(f"{url}: the list names no image; write one path per line")
        return out
    if url.endswith("/") or remote.kind(url) == "folder":
        found = remote.list_files(url, IMAGE_SUFFIXES)
        if not found:
            raise SalienceError(f"{url}: no image objects under this prefix (looked for {', '.join(IMAGE_SUFFIXES)})")
        return found
    return [url]  # one object (a missing one becomes a row with its error)


def digest(values: Sequence[Any]) -> str:
    """A short SHA-256 of ``values`` (the inputs and labels a run's command is known by)."""
    h = hashlib.sha256()
    for v in values:
        h.update(repr(v).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_labels_csv(path: PathLike, paths: Sequence[str], class_names: Optional[Sequence[str]],
                    n_classes: Optional[int] = None) -> list[Optional[int]]:
    """Each image's label from a CSV ``path,label`` (a header row is allowed): the label is a class
    index or name; an image is matched by its path as given, its absolute path, the longest line
    that ends its path (``a/x.png`` for ``data/a/x.png``), or its file name (refused when lines of
    that name give different labels)
    Images missing from the file get ``None``. ``n_classes``: a label outside ``0..n_classes-1`` is
    refused with its line. The file is read through one checked handle (:func:`salience._core.files.read_text`): a
    FIFO, a folder, a device, a huge or a non-UTF-8 file is a :class:`SalienceError` saying a CSV was expected."""
    p = Path(path)
    text = read_text(p, f"labels={p}", LABELS_CSV, too_big="keep the lines of this run's images alone: one labels "
                     "file is read")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = [(reader.line_num, r) for r in reader if r and not r[0].startswith("#")]
    except csv.Error as e:  # a field over csv's limit, a quote left open at the end
        raise SalienceError(f"labels={p}: line {reader.line_num}: {e}; expected {LABELS_CSV}") from None
    names = {n.lower(): i for i, n in enumerate(class_names or ())}
    table: dict[str, int] = {}
    lines: dict[str, int] = {}
    for n, (line, row) in enumerate(rows):
        if len(row) < 2:
            raise SalienceError(f"labels={p}: line {line} needs two columns, path,label")
        key, value = row[0].strip(), row[1].strip()
        if value.lstrip("-").isdigit():
            table[key] = int(value)
            if n_classes is not None and not 0 <= table[key] < n_classes:
                raise SalienceError(f"labels={p}: line {line}: label {value} is out of range for the model's "
                                    f"{n_classes} classes (0..{n_classes - 1}); fix the line")
        elif value.lower() in names:
            table[key] = names[value.lower()]
        elif n == 0 and Path(key).suffix.lower() not in IMAGE_SUFFIXES:
            continue  # a header (its first cell names no image file)
        else:
            raise SalienceError(f"labels={p}: line {line}: {value!r} is neither a class index nor a class name")
        lines[key] = line
    by_abs = {str(Path(k).resolve()): v for k, v in table.items()}
    by_parts = {Path(k).parts: v for k, v in table.items()}
    by_name: dict[str, dict[int, list[int]]] = {}  # file name -> label -> its lines
    for k, v in table.items():
        by_name.setdefault(Path(k).name, {}).setdefault(v, []).append(lines[k])

    def label(q: str) -> Optional[int]:
        if q in table:
            return table[q]
        if str(Path(q).resolve()) in by_abs:
            return by_abs[str(Path(q).resolve())]
        parts = Path(q).parts
        for n in range(len(parts), 0, -1):  # the longest line that ends the path (a/same.png of x/a/same.png)
            if parts[-n:] in by_parts:
                return by_parts[parts[-n:]]
        labels = by_name.get(Path(q).name, {})
        if len(labels) > 1:
            at = sorted(line for found in labels.values() for line in found)
            raise SalienceError(f"labels={p}: {q}: the file name {Path(q).name} is on lines "
                                f"{', '.join(map(str, at[:-1]))} and {at[-1]} with different labels; write the "
                                "image's path (or the end of it, with its folder) in the CSV")
        return next(iter(labels)) if labels else None

    out = [label(q) for q in paths]
    missing = [q for q, v in zip(paths, out) if v is None]
    if missing:
        warnings.warn(f"labels={p} names {len(paths) - len(missing)} of the {len(paths)} images; "
                      f"{len(missing)} {'has' if len(missing) == 1 else 'have'} no label (e.g. {missing[0]}) and explain their predicted class; "
                      "write their paths (or file names) in the CSV", stacklevel=user_stacklevel())
    return out


@dataclass
class Item:
    """One decoded image: its input ``(C, H, W)`` (zeros when it failed), original size and error;
    its mask, and why its mask file could not be read (the image is still explained)."""

    index: int
    x: Tensor
    width: int
    height: int
    error: Optional[str]
    mask: Optional[Tensor] = None
    mask_error: Optional[str] = None
    label: Optional[int] = None
    """The label the item came with (a user's dataset of ``(image, label)``), read with its image."""


def needs_one_size(name: str, how: str) -> SalienceError:
    """The refusal of a dataset run of image files for model ``name``, which takes any input size; ``how``: what
    to do, in the caller's words (Python's keyword here, the command's flag in :mod:`salience.cli.explain_many`)."""
    return SalienceError(f"{name} takes any input size, but a dataset run of image files needs one size; {how}")


class ImageFiles(Dataset):
    """Image files decoded, resized and normalized for ``info`` (in the DataLoader's workers)."""

    def __init__(self, paths: Sequence[str], info: ModelInfo, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 masks: Optional[Sequence[Optional[str]]] = None):
        if info.input_size is None:
            raise needs_one_size(info.name, "give the model one, size=(H, W) (model.salience_info = salience.loading."
                                 "with_preprocessing(info, size=(H, W)), info its ModelInfo: salience._core.info."
                                 "model_info(model)), or the images as a torch.utils.data.Dataset of (C, H, W) tensors "
                                 "of one size, e.g. a TensorDataset")
        self.paths = list(paths)
        self.info = info
        self.max_pixels = max_pixels
        self.masks = masks

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        return self.read(index, self.paths[index], self.masks[index] if self.masks is not None else None)

    def without_files(self) -> "ImageFiles":
        """This decoder without its paths and masks (one per image): what a Ray decoding task is sent,
        each row of its batch carrying its own image's path and mask (:meth:`read`)."""
        return ImageFiles([], self.info, self.max_pixels)

    def read(self, index: int, path: str, mask: Optional[str] = None) -> Item:
        """Image ``index`` decoded from ``path`` (its mask file ``mask``, ``None``: none)."""
        info = self.info
        h, w = info.input_size  # type: ignore[misc]
        try:
            data = remote.read_bytes(path) if remote.is_remote(path) else None
            if data is None:
                check_image_file(path)  # a FIFO listed (a .txt list's line): a failed row, never a wait for ever
            raw = load_image(path, max_pixels=self.max_pixels, data=data)
            x = normalize_input(resize_crop(raw, info), info)
        except SalienceError as e:
            return Item(index, torch.zeros(info.channels, h, w), -1, -1, str(e))
        except (MemoryError, OSError, ValueError) as e:
            return Item(index, torch.zeros(info.channels, h, w), -1, -1, f"{path}: {e}")
        try:  # a mask that cannot be read costs its image the mask's metrics, not the map
            return Item(index, x, int(raw.shape[-1]), int(raw.shape[-2]), None, self._mask(mask))
        except SalienceError as e:
            why = str(e)
        except (MemoryError, OSError, ValueError) as e:
            why = f"{mask}: {e}"
        return Item(index, x, int(raw.shape[-1]), int(raw.shape[-2]), None, None, f"mask not read: {why}")

    def _mask(self, path: Optional[str]) -> Optional[Tensor]:
        """The mask in file ``path``, resized and cropped like its image, bool ``(H, W)`` (``None``: no mask)."""
        if path is None:
            return None
        mk = resize_crop(mask_values(path), self.info)[0]
        top = float(mk.max())
        return mk >= 0.5 * top if top > 0 else torch.zeros_like(mk, dtype=torch.bool)


class Wrapped(Dataset):
    """A user's dataset whose items are an image ``(C, H, W)`` or ``(image, label)``: the images
    as they are (already the model's input), each item's label on its :class:`Item`, read with its
    image (in the DataLoader's workers, the Ray decoding tasks), never in a pass of its own."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self._probed: Optional[Item] = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_probed"] = None  # the run's process's one read item stays there (not shipped to workers)
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        item = self.dataset[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise SalienceError(f"the dataset's item {index} is not an image tensor (C, H, W) or (image, label); "
                                "add a transform that returns the model's input")
        label = _item_label(item[1], index) if isinstance(item, (tuple, list)) and len(item) > 1 else None
        return Item(index, x, int(x.shape[-1]), int(x.shape[-2]), None, label=label)

    def probe(self, index: int) -> Item:
        """Item ``index``, read once in this process however often it is asked for (the run reads
        one item before it starts: whether the items carry labels, the model's number of outputs,
        the batch size, the first image's shape). An error of the user's dataset is raised as it is,
        with a note naming the item (:func:`read_noted`)."""
        if self._probed is None or self._probed.index != index:
            self._probed = read_noted(self, index, f"{type(self.dataset).__name__}[{index}]")
        return self._probed

    def known_labels(self) -> Optional[list[int]]:
        """Every item's label where the dataset says them without reading its items
        (:func:`dataset_labels`), else ``None``."""
        return dataset_labels(self.dataset)


def class_index(value: Any) -> Optional[int]:
    """``value`` as a class index: an int (numpy's too), a float that is one (a label stored as 2.0), or a
    one-element tensor / array of one; ``None`` for anything else (a bool, 0.5, a string)."""
    if isinstance(value, Tensor) and value.numel() == 1 or isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


def _item_label(value: Any, index: int) -> int:
    """An item's label as a class index (:func:`class_index`)."""
    if (c := class_index(value)) is not None:
        return c
    shown = " ".join(repr(value).split())[:60]
    raise SalienceError(f"the dataset's item {index} is (image, {shown}): the second value must be the image's "
                        "label, a class index; return (image, label) or the image alone")


def dataset_labels(dataset: Any) -> Optional[list[int]]:
    """The labels of every item of ``dataset`` as it says them without decoding any item, else
    ``None`` (each item's label is then read with its image). Known: torchvision's ``DatasetFolder``
    / ``ImageFolder`` (``samples``, what its ``__getitem__`` reads), CIFAR and MNIST (``targets``),
    a ``TensorDataset`` whose second tensor holds one integer per item, and a ``Subset`` of any of
    those (``indices``), only with their own ``__getitem__`` and no ``target_transform``; the list
    must have one int per item, else ``None``."""
    try:
        found = _said_labels(dataset)
        if found is None or len(found) != len(dataset):
            return None
    except Exception:  # noqa: BLE001 - a dataset that looks like a known one but is not: read the items
        return None
    return found if all(isinstance(v, int) and not isinstance(v, bool) for v in found) else None


def _said_labels(dataset: Any) -> Optional[list]:
    from torch.utils.data import Subset, TensorDataset

    if type(dataset).__getitem__ is Subset.__getitem__:
        inner = _said_labels(dataset.dataset)
        if inner is None:
            return None
        out = []
        for i in dataset.indices:
            i = int(i)
            if not -len(inner) <= i < len(inner):
                return None
            out.append(inner[i])
        return out
    if type(dataset).__getitem__ is TensorDataset.__getitem__:
        if len(dataset.tensors) < 2:
            return None
        y = dataset.tensors[1]
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            return None
        return y.tolist()
    try:
        from torchvision import datasets as tv
    except ImportError:
        return None
    if getattr(dataset, "target_transform", None) is not None:
        return None
    getitem = type(dataset).__getitem__
    if getitem is tv.DatasetFolder.__getitem__:
        return [s[1] for s in dataset.samples]
    if getitem in (tv.CIFAR10.__getitem__, tv.MNIST.__getitem__):
        t = dataset.targets
        return t.tolist() if isinstance(t, (Tensor, np.ndarray)) else list(t)
    return None


def read_once(dataset: Dataset, index: int) -> Item:
    """Item ``index`` for the run's process: a user's dataset's :meth:`Wrapped.probe` (read once),
    an image file decoded."""
    return dataset.probe(index) if isinstance(dataset, Wrapped) else dataset[index]


def mask_files(paths: Sequence[str], folder: PathLike) -> list[Optional[str]]:
    """Each image's mask in ``folder``: the file of the same stem (any image suffix), or ``None``."""
    d = Path(folder)
    if not d.is_dir():
        raise SalienceError(f"masks={d}: no such folder; give the folder of the mask images")
    by_stem = {f.stem: str(f) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    return [by_stem.get(Path(p).stem) for p in paths]


class WorkerTraceback(Exception):
    """The traceback, as text, of an error raised in another process (a DataLoader worker, a Ray task or
    actor): the ``__cause__`` of the error the run raises for it (:class:`Raised`)."""


@dataclass
class Raised:
    """An error raised where the run cannot raise it as it is: in a DataLoader worker (torch re-raises
    it in its own wrapping, the worker's traceback as its message) or a Ray task or actor (Ray raises
    a ``RayTaskError`` whose message is the traceback). The process returns it in place of its result
    and the run raises the error itself (:meth:`reraise`): a :class:`SalienceError` with its one-line
    message unchanged, a user's dataset's own exception (a ``KeyError`` of a transform) as its own
    type and message, a note naming the image; the other process's traceback is its cause. An error
    that does not come back as it was (its class takes other arguments than it pickles, or is not
    importable here) is a :class:`SalienceError` naming its type, its message and the image.

    ``payload`` is the pickled error (``None`` when it did not pickle back in its process); it is
    unpickled only when raised, so that an error this process cannot rebuild never breaks the
    transport (the DataLoader's queue, Ray's column)."""

    payload: Optional[bytes]
    kind: str
    message: str
    trace: str
    where: str
    image: Optional[str] = None
    salience: bool = False
    by: str = "the dataset"

    @classmethod
    def of(cls, e: BaseException, where: str, index: Optional[int] = None, path: Optional[str] = None,
           by: str = "the dataset") -> "Raised":
        """``e`` caught in ``where`` (``"DataLoader worker"``, ``"Ray actor"``) reading image ``index``
        (``path``: its path or name) when known; ``by``: what raised it (the dataset, the model)."""
        try:
            payload: Optional[bytes] = pickle.dumps(e)
            back = pickle.loads(payload)  # type: ignore[arg-type]
            if type(back) is not type(e) or str(back) != str(e):
                raise TypeError
        except Exception:  # noqa: BLE001 - a class whose arguments do not pickle back
            payload = None
        kind = type(e).__qualname__ if type(e).__module__ == "builtins" else \
            f"{type(e).__module__}.{type(e).__qualname__}"
        image = None if index is None else f"image {index}" + (f" ({path})" if path is not None else "")
        return cls(payload, kind, str(e), "".join(traceback.format_exception(type(e), e, e.__traceback__)), where,
                   image, isinstance(e, SalienceError), by)

    def error(self) -> BaseException:
        """The error to raise: rebuilt from ``payload``, else a :class:`SalienceError` saying what it was."""
        try:
            error = pickle.loads(self.payload) if self.payload is not None else None  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - its class cannot be imported (or built) in this process
            error = None
        if isinstance(error, BaseException):
            if not isinstance(error, SalienceError) and self.image is not None and hasattr(error, "add_note"):
                error.add_note(f"raised reading {self.image} in a {self.where}; its traceback there is the cause")
            return error
        if self.salience:
            return SalienceError(self.message)
        words = " ".join(self.message.split())
        return SalienceError(f"{self.image or ('a batch' if self.by == 'the model' else 'an image')}: {self.by} raised {self.kind}: {words} (in a {self.where}; "
                             f"the {self.kind} cannot be rebuilt in this process); fix {self.by}, then run the "
                             "same call again to continue the run")

    def reraise(self) -> NoReturn:
        """Raise the error, its traceback in the other process as its cause."""
        raise self.error() from WorkerTraceback(f"raised in a {self.where}:\n{self.trace}")


class Guarded(Dataset):
    """``dataset`` read in DataLoader workers: an item whose reading raises comes as :class:`Raised`
    (the local engine raises its error, as it would with ``workers=0``). ``names``: each image's path
    or name, for the message of an error that cannot be rebuilt."""

    def __init__(self, dataset: Dataset, names: Optional[Sequence[str]] = None):
        self.dataset = dataset
        self.names = names

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Union[Item, Raised]:
        try:
            return self.dataset[index]
        except Exception as e:  # noqa: BLE001 - the user's dataset's own error: raised in the run's process
            name = self.names[index] if self.names is not None and 0 <= index < len(self.names) else None
            return Raised.of(e, "DataLoader worker", index, name)


def read_noted(dataset: Dataset, index: int, name: Optional[str] = None) -> Item:
    """``dataset[index]`` read in the run's process: an error of the user's dataset (a ``KeyError`` of a
    transform) is raised as it is, its own type and traceback, with a note (PEP 678, Python 3.11 on)
    naming the image, as one raised in a DataLoader worker has (:meth:`Raised.error`); a
    :class:`SalienceError` names the item itself."""
    try:
        return dataset[index]
    except Exception as e:
        if not isinstance(e, SalienceError) and hasattr(e, "add_note"):
            note = f"raised reading image {index}" + (f" ({name})" if name is not None else "") + \
                " in the run's process"
            if note not in getattr(e, "__notes__", ()):  # a dataset raising one error object again
                e.add_note(note)
        raise


class Noted(Dataset):
    """``dataset`` read in the run's process (``workers=0``): an item whose reading raises raises its
    error with a note naming the image (:func:`read_noted`); ``names``: each image's path or name."""

    def __init__(self, dataset: Dataset, names: Optional[Sequence[str]] = None):
        self.dataset = dataset
        self.names = names

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Item:
        name = self.names[index] if self.names is not None and 0 <= index < len(self.names) else None
        return read_noted(self.dataset, index, name)


def collate(items: list[Item]) -> list[Item]:
    """The DataLoader's batches stay lists of items (the run stacks the good ones itself)."""
    return items


def worker_init(_: int) -> None:
    """One thread per decoding worker: the cores are the model's."""
    torch.set_num_threads(1)
