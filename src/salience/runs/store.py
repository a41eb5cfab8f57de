"""The store of a dataset run (``RUN/``): a layout numpy and pyarrow read without salience.

::

    RUN/run.json                      the manifest: format, the command (what refuses a different one), K, dtype
    RUN/inputs.parquet                the planned inputs: index, path, label (written once, before any shard)
    RUN/maps/<method>/<shard>.npy     maps of a shard's images, (n, K, H, W) (or (n, K, C, H, W)), float16
    RUN/thumbs/<shard>.jpg            a sprite of the shard's thumbnails (the gallery's)
    RUN/shards/<shard>.parquet        the shard's rows: written LAST, it is the shard's commit mark
    RUN/index.parquet                 every row, by index (merged when the run ends)
    RUN/index.html                    the gallery
    RUN/overlays/<index>_<method>.png with --png
    RUN/.salience-run.lock            locked by the process writing the run (:mod:`salience.runs.lock`)

A row says where its maps are: ``shard`` and ``offset``, so that
``np.load(f"RUN/maps/{m}/{row.shard}.npy", mmap_mode="r")[row.offset, k]`` is the map of image
``row.index``, method ``m``, target ``k``. Every file is written atomically
(:mod:`salience._core.files`): a crash leaves either the whole file or none, and a shard counts
only once its rows file exists, which is written after its maps and thumbnails. A map file
without its rows file (a crash between the two) is written again on resume; a committed shard
never is (:meth:`Store.shard_name`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence, Union

import numpy as np

from salience._core.errors import SalienceError
from salience._core.files import (atomic_path, atomic_write, check_regular, make_folder, not_regular, one_name,
                                  open_regular)
from salience._core.tensors import check_int
from salience.runs.lock import LOCK_NAME, commit_holder, lock_holder

FORMAT = "salience-run/2"
"""What this salience writes: each method's refusal of an image in a column of its own (``METHOD.error``,
``METHOD.metrics_error``), ``error`` the image's own."""
JOINED_ERRORS = "salience-run/1"
"""What salience wrote before: every error of a row joined in its ``error`` (``method M failed: ...``,
``method M's metrics failed: ...``, by ``; ``). Read (:func:`joined_errors`), never continued."""
PathLike = Union[str, "os.PathLike[str]"]

ITEM_LABELS = "read with each item"
"""The command's ``labels`` when a user's dataset carries them in its items and does not say them
without reading those (:func:`salience.runs.sources.dataset_labels`): each label is read with its
image, so no digest of them is known before the run."""

GIVEN_LABELS_ADVICE = ("leave the labels out (or give the ones its items carry) to continue it, choose another out=, "
                      "or add overwrite=True to start again")
"""The end of the refusal of labels given up front to a run begun reading its labels with each item
that differ from the items' (:func:`given_label_difference`)."""


def given_label_difference(index: int, path: str, was: Optional[int], now: Optional[int],
                           where: str = "row holds") -> str:
    """``labels: image I (PATH): label WAS -> NOW, ...``: image ``index``'s label ``now`` given up front
    to a run begun reading its labels with each item, whose item carries (``where="item carries"``),
    or whose committed row holds, ``was``; a ``None`` label is written ``none`` (:func:`label_text`) and said as no label."""
    return (f"labels: image {index} ({path}): label {label_text(was)} -> {label_text(now)}, given up front (labels=); "
            f"the run was begun reading the labels with each item, and its {where} "
            f"{'no label' if was is None else was}")


def label_text(label: Optional[int]) -> str:
    """``3``, or ``none`` for ``None`` (an image without a label): how a refusal writes a label."""
    return "none" if label is None else str(label)


TABLE_MARK = b"salience"
"""The key of salience's mark in the key-value metadata of each table a run's store writes (the parquet schema's):
its value is the table's kind, ``inputs`` (``inputs.parquet``), ``shard`` (``shards/*.parquet``) or ``index``
(``index.parquet``). What tells a run's table from a user's of the same columns (:func:`is_store_table`). The tables
of runs written before session 57 carry none: their folders are known by their ``run.json`` or their lock."""
FOOTER_CAP = 4 << 20
"""The most bytes of a parquet footer's metadata :func:`is_store_table` reads (4 MiB): a run's own tables' footers
are a few KiB (a row group's column statistics and pyarrow's schema, per column); a file whose footer claims more is
no run's table, and is not read (a crafted footer claiming 1 GiB made pyarrow read 1 GiB)."""
MANIFEST_CAP = 1 << 20
"""The most bytes of a ``run.json`` read whole to find its ``format`` (:func:`manifest_format`) when its first key is
not ``format`` (salience writes it first: there its first 4 KiB are read)."""
MANIFEST_READ_CAP = 16 << 20
"""The most bytes of a ``run.json`` its readers read (:func:`read_manifest`, 16 MiB): a run's manifest is a few KiB
(1.1 KiB for a run of one method, 19 KiB with ImageNet's 1000 class names, 0.4 MiB with 21843; its size grows with
its class names only). A larger file is refused unread past the cap, not read whole into memory."""
_MANIFEST_HEAD = 4096
_FORMAT_FIRST = re.compile(rb'\A\s*\{\s*"format"\s*:\s*"(salience-run/[0-9A-Za-z._-]{1,32})"')

_RUN_FILES = ("run.json", "inputs.parquet", "index.parquet", "index.html")
_RUN_FOLDERS = ("maps", "shards", "thumbs", "overlays")


def pyarrow():
    """pyarrow, or a :class:`SalienceError` saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 - the submodule is used as pa.parquet
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the runs
        raise SalienceError("dataset runs need pyarrow: pip install 'salience[runs]' (or pip install pyarrow)") from None
    return pa


def error_column(method: str) -> str:
    """The column of ``method``'s refusal of a row's image (its maps not made)."""
    return f"{method}.error"


def metrics_error_column(method: str) -> str:
    """The column of ``method``'s metrics' refusal of a row's image (its maps made, not scored)."""
    return f"{method}.metrics_error"


def row_schema(methods: Sequence[str], *, labels: bool, metrics: Sequence[str], regression: bool = False,
               errors: bool = True):
    """The rows' schema: the same in every shard, so the shards concatenate into one table. A
    regression run's rows hold the explained output and its value instead of a class. ``errors``: each
    method's ``METHOD.error`` (and with metrics ``METHOD.metrics_error``) columns, which a run of the
    older layout (:data:`JOINED_ERRORS`) lacks."""
    pa = pyarrow()
    fields = [("index", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32())]
    if regression:
        fields += [("output", pa.int64()), ("output_name", pa.string()), ("value", pa.float64()),
                   ("values", pa.list_(pa.float64()))]
    else:
        fields += [("predicted", pa.int64()), ("predicted_name", pa.string()), ("probability", pa.float64())]
    fields += [("targets", pa.list_(pa.int64())), ("error", pa.string())]
    if labels:
        fields += [("label", pa.int64()), ("correct", pa.bool_())]
    for m in methods:
        fields += [(f"{m}.{s}", pa.float64()) for s in ("min", "max", "mean")]
        fields += [(f"{m}.constant", pa.list_(pa.float64()))]
        fields += [(error_column(m), pa.string())] if errors else []
        fields += [(f"{m}.{s}", pa.float64()) for s in metrics]
        fields += [(metrics_error_column(m), pa.string())] if errors and metrics else []
    fields += [("shard", pa.string()), ("offset", pa.int32())]
    return pa.schema(fields)


def number_columns(table: Any) -> list[str]:
    """The ``method.statistic`` columns of ``table`` that hold one number a row (the summaries and
    metrics), in order: not the per-target lists (``method.constant``) nor the errors (``method.error``)."""
    pa = pyarrow()
    return [f.name for f in table.schema if "." in f.name
            and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def schema_of(manifest: dict[str, Any]) -> Any:
    """The rows' schema of the run a manifest describes."""
    return row_schema(manifest["methods"], labels=manifest["labels"], metrics=manifest["metrics"],
                      regression=manifest.get("task") == "regression",
                      errors=manifest.get("format") != JOINED_ERRORS)


def joined_errors(error: Optional[str], methods: Sequence[str]) -> tuple[dict[str, str], Optional[str]]:
    """A row's ``error`` of a run of the older layout (:data:`JOINED_ERRORS`), read back per method: the
    ``method M failed: ...`` of each of the run's ``methods`` that refused the image, ``method M's metrics
    failed: ...`` of one whose metrics did, joined by ``; ``: method -> what it said (``metrics failed: ...``
    for its metrics), and the rest, the image's own (not read, its mask not read; ``None``: none). Words of a
    method that hold ``; method M failed: `` themselves are split there: what that layout could not say,
    and why this salience writes a column per method (:meth:`Run.errors_of`)."""
    if not error or not methods:
        return {}, error or None
    names = "|".join(re.escape(m) for m in sorted(methods, key=len, reverse=True))
    heads = list(re.finditer(rf"(?:^|; )method ({names})('s metrics)? failed: ", error))
    said: dict[str, str] = {}
    for h, after in zip(heads, heads[1:] + [None]):
        text = error[h.end():after.start() if after is not None else len(error)]
        text = f"metrics failed: {text}" if h.group(2) else text
        said[h.group(1)] = f"{said[h.group(1)]}; {text}" if h.group(1) in said else text
    rest = error[:heads[0].start()] if heads else error
    return said, rest or None


START_AGAIN = ("use overwrite=True to start again (the run's command with it removes the run's own files and "
               "makes them anew), or remove the folder")
"""What a refusal of a salience manifest that cannot be read, or is damaged, says to do (:func:`read_manifest`):
``overwrite`` clears a folder whose ``run.json`` is salience's by its ``format`` (:func:`manifest_format`), never
another program's (:func:`check_folder` refuses that one, ``overwrite`` or not)."""


class _Repeated(ValueError):
    """A key an object of the manifest holds twice (JSON leaves such an object's meaning to the reader)."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of the manifest as a dict, a :class:`_Repeated` where it holds a key twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Repeated(key)
        out[key] = value
    return out


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as a dict, a key held twice by its first value: how :func:`manifest_format` reads ``format``
    whatever the key order, as its first 4 KiB (``"format"`` the first key) read it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _file_names(value: Any) -> bool:
    """A list of names each of which names one folder inside the run's (:func:`salience._core.files.one_name`): a
    method's maps are in ``maps/<method>/``, so ``"../../x"`` would read (and a continued run write) outside it."""
    return isinstance(value, list) and all(one_name(v) for v in value)


_MISSING = object()

READ, PAGE, WRITE = "read", "page", "write"
"""What a manifest is read for (:func:`manifest_problem`): its rows (:class:`Run`, the explorer; a run written by hand
holds what these need), its ``index.html`` (:func:`salience.runs.gallery.write`: the thumbnails' size and layout,
``k``), or writing the run (:class:`Store`: continuing it, the Ray actors' shards). Each needs the keys of those
before it too."""
_NEEDS = (READ, PAGE, WRITE)

# each key of a manifest of salience's formats that salience reads: (dotted key, the first use of _NEEDS that needs it
# (None: none, it may be missing or null), the formats it is needed in (None: both), the test of its value, what it
# must be). A key not needed is checked where it is there.
_KEYS: tuple[tuple[str, Optional[str], Optional[tuple[str, ...]], Any, str], ...] = (
    ("command", READ, None, lambda v: isinstance(v, dict), "an object"),
    ("command.model", READ, None, lambda v: isinstance(v, str), "a string"),
    ("command.inputs", READ, None, lambda v: isinstance(v, dict), "an object"),
    ("command.inputs.count", READ, None, lambda v: _whole(v, 0), "a whole number >= 0"),
    ("methods", READ, None, _file_names, "a list of method names, each a folder's name (no '/', NUL, or leading "
     "'.')"),
    ("labels", READ, None, lambda v: isinstance(v, bool), "true or false"),
    ("metrics", READ, None, _names, "a list of metric names"),
    ("k", PAGE, None, lambda v: _whole(v, 1), "a whole number >= 1"),
    ("thumb", PAGE, None, lambda v: _whole(v, 1), "a whole number >= 1"),
    ("sprite_columns", PAGE, None, lambda v: _whole(v, 1), "a whole number >= 1"),
    ("command.shard_size", WRITE, None, lambda v: _whole(v, 1), "a whole number >= 1"),
    ("map_dtype", WRITE, None, lambda v: v in ("float16", "float32"), '"float16" or "float32"'),
    ("seed", WRITE, (FORMAT,), lambda v: _whole(v, 0), "a whole number >= 0"),  # the older format's has none
    ("task", None, None, lambda v: v in ("classification", "regression"), '"classification" or "regression"'),
    ("class_names", None, None, lambda v: isinstance(v, list), "a list"),
    ("png", None, None, lambda v: isinstance(v, bool), "true or false"),
    ("cwd", None, None, lambda v: isinstance(v, str), "a string"),
    ("batch", None, None, lambda v: _whole(v, 1), "a whole number >= 1"),
)


def manifest_problem(manifest: Any, use: str = READ) -> Optional[str]:
    """What is wrong with the parsed manifest ``manifest`` of a run of salience's formats (:data:`FORMAT`,
    :data:`JOINED_ERRORS`) for ``use`` (:data:`READ`, :data:`PAGE`, :data:`WRITE`): a key it needs that is missing
    (``no "methods"``), or any key salience reads holding a value of another kind (``"k" is '2' (str), expected a
    whole number >= 1``); ``None`` when nothing is. A manifest of another format is not checked here (its keys are
    that format's: refused by its format, :func:`_format_refusal`)."""
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    form = manifest.get("format")
    if form not in (FORMAT, JOINED_ERRORS):
        return None
    level = _NEEDS.index(use)
    for key, first, forms, test, expected in _KEYS:
        *outer, last = key.split(".")
        holder: Any = manifest
        for part in outer:
            holder = holder[part]  # an object: needed for every use, checked above
        value = holder.get(last, _MISSING)
        required = first is not None and _NEEDS.index(first) <= level and (forms is None or form in forms)
        if value is _MISSING or (value is None and not required):
            if required:
                return f'no "{key}"'
            continue
        if not test(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f'"{key}" is {shown} ({type(value).__name__}), expected {expected}'
    return None


def read_manifest(path: Path, use: str = READ) -> dict[str, Any]:
    """The run manifest ``path`` (``RUN/run.json``) read and checked for ``use`` (:data:`READ`, :data:`PAGE`,
    :data:`WRITE`): every object's keys once, the keys ``use`` needs there, and each key salience reads of the kind it
    reads (:func:`manifest_problem`). A :class:`SalienceError` saying what to do
    (:data:`START_AGAIN`) when it cannot be read (not JSON, cut short, nested past Python's recursion limit, over
    :data:`MANIFEST_READ_CAP`: read no further, no regular file: a FIFO of its name, opened without waiting and never
    read) or is damaged (a key held twice: which
    one counts is left to the reader by JSON, and :func:`manifest_format` reads a ``format`` by its first; a key
    missing or of another kind). What every reader of a manifest reads it with (:class:`Run`, :class:`Store`, the
    Ray engine's actors)."""
    try:
        with _open_regular(path) as f:
            data = f.read(MANIFEST_READ_CAP + 1) if f is not None else None
        if data is None:
            raise OSError("it is not a regular file: a FIFO, a device or a socket of its name")
        if len(data) > MANIFEST_READ_CAP:
            raise ValueError(f"it is over {MANIFEST_READ_CAP >> 20} MiB, and a run's manifest is a few KiB: not one "
                             "salience wrote")
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=_unique)
    except _Repeated as e:
        newer = json.loads(data.decode("utf-8"), object_pairs_hook=_first_wins)
        if newer.get("format") not in (FORMAT, JOINED_ERRORS):  # a newer salience's: its readers refuse its format
            return newer  # (upgrade salience), never "start again", which would delete that run
        raise SalienceError(f"{path}: the run's manifest is damaged (the key \"{e.args[0]}\" is in it twice); "
                            f"{START_AGAIN}") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: arrays nested past Python's limit
        raise SalienceError(f"{path}: cannot read the run's manifest ({e}); {START_AGAIN}") from None
    return check_manifest(path, manifest, use)


def check_manifest(path: Path, manifest: Any, use: str) -> dict[str, Any]:
    """``manifest``, read from ``path``, when nothing is wrong with it for ``use`` (:func:`manifest_problem`), else a
    :class:`SalienceError`: the manifest is damaged, what is wrong, and what to do (:data:`START_AGAIN`)."""
    problem = manifest_problem(manifest, use)
    if problem is not None:
        raise SalienceError(f"{path}: the run's manifest is damaged ({problem}); {START_AGAIN}")
    return manifest


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key.sub: old -> new`` for each value that differs, nested dicts by their dotted keys."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, _MISSING), new.get(k, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        else:
            plain = prefix.startswith("method_options.")  # the record holds each value's repr already
            out.append(f"{prefix}{k}: {_shown(a, plain)} -> {_shown(b, plain)}")
    return out


def _shown(value: Any, plain: bool = False) -> str:
    return "(not given)" if value is _MISSING else str(value) if plain else repr(value)


@dataclass
class Planned:
    """A run's planned inputs: each image's path as given, its label and mask file (``None``: none);
    ``files``: the paths are files (a ``Dataset``'s items are named ``Class[i]``)."""

    paths: Sequence[str]
    labels: Optional[Sequence[Optional[int]]] = None
    masks: Optional[Sequence[Optional[str]]] = None
    files: bool = True

    def canonical(self, paths: Sequence[Optional[str]], base: Optional[str] = None) -> list[Optional[str]]:
        """``paths`` in the form the run's command is known by (absolute, normal; from ``base``, by
        default the working folder); a ``Dataset``'s names as they are."""
        if not self.files:
            return list(paths)
        at = base or os.getcwd()
        return [None if p is None else p if "://" in p else os.path.normpath(os.path.join(at, p)) for p in paths]


def _first(old: Sequence[Any], new: Sequence[Any]) -> Optional[int]:
    """The first position where two lists differ (``None``: equal)."""
    i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
    return i if i is not None or len(old) == len(new) else min(len(old), len(new))


def _input_differences(folder: Path, manifest: dict[str, Any], planned: Planned) -> dict[str, str]:
    """The ``inputs``, ``labels`` and ``masks`` that differ, said image by image (the first one),
    from the run's ``inputs.parquet``; ``{}`` when it cannot be read."""
    try:
        table = _read_table(folder / "inputs.parquet").to_pydict()
    except (OSError, ValueError, SalienceError):
        return {}
    base = manifest.get("cwd")
    out = {}
    old, new = planned.canonical(table["path"], base), planned.canonical(planned.paths)
    i = _first(old, new)
    if i is not None:
        out["inputs"] = (f"inputs: image {i} was {old[i]}, is now {new[i]}" if i < min(len(old), len(new)) else
                         f"inputs: {len(old)} images -> {len(new)} (image {i} "
                         + (f"is new: {new[i]})" if len(new) > len(old) else f"is gone: {old[i]})"))
    for key, column, given in (("labels", "label", planned.labels), ("masks", "mask", planned.masks)):
        if given is None or column not in table or "inputs" in out:
            continue
        was = table[column] if key == "labels" else planned.canonical(table[column], base)
        now = list(given) if key == "labels" else planned.canonical(given)
        j = _first(was, now)
        if j is not None:
            out[key] = f"{key}: image {j} ({planned.paths[j]}): {column} {was[j]} -> {now[j]}"
    return out


def _check_begun_labels(folder: Path, labels_digest: str) -> None:
    """Refuse to continue the run in ``folder``, begun with its labels given up front (their digest
    ``labels_digest`` in its command), with the labels read with each item when its ``inputs.parquet``
    does not hold those labels (no ``label`` column: a run cut short between its run.json and its
    inputs.parquet, or a file another program wrote; or other labels): each item's label could not be
    compared with the one the run was begun with (:attr:`job.Plan.begun_labels`)."""
    try:
        table = _read_table(folder / "inputs.parquet")
        held = table.column("label").to_pylist() if "label" in table.column_names else None
    except (OSError, ValueError):
        held = None
    if held is not None and _digest(held) == labels_digest:
        return
    raise SalienceError(f"{folder} holds a run begun with its labels given up front (labels: {labels_digest!r}), "
                        "and its inputs.parquet does not hold them; give the same labels= to continue it, choose "
                        "another out=, or add overwrite=True to start again")


def _stored_label_difference(folder: Path, labels: Sequence[Optional[int]], paths: Sequence[str]) -> Optional[str]:
    """A run begun reading its labels with each item (:data:`ITEM_LABELS`: its ``inputs.parquet`` holds
    none; each committed row holds its item's label), continued with ``labels`` given up front: the
    first committed image (by index) whose row's label differs from its given one, said as
    :func:`given_label_difference`; ``None`` when every committed row agrees. Read
    before any batch: the ``index`` and ``label`` columns of the committed shards only."""
    pa = pyarrow()
    held: dict[int, Optional[int]] = {}
    for p in sorted((folder / "shards").glob("*.parquet")):
        if p.name.startswith("."):
            continue
        with _table_source(p) as source:  # one open: the schema, then the columns it has
            names = _named(p, source, lambda: pa.parquet.read_schema(source).names)
            columns = [c for c in ("index", "label") if c in names]
            table = _named(p, source, lambda: pa.parquet.read_table(source, columns=columns))
        stored = table.column("label").to_pylist() if "label" in names else [None] * table.num_rows
        held.update(zip(table.column("index").to_pylist(), stored))
    for i in sorted(i for i in held if i is not None and 0 <= i < len(labels)):
        if held[i] != labels[i]:
            return given_label_difference(i, paths[i], held[i], labels[i])
    return None


def _digest(values: Sequence[Any]) -> str:
    from salience.runs.sources import digest

    return digest(values)


def clear_run(folder: Path) -> None:
    """Remove a run's own files and folders from ``folder`` (nothing else in it)."""
    for name in _RUN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)
    for name in _RUN_FILES:
        with_path = folder / name
        if with_path.exists():
            with_path.unlink()


def _remove_temporaries(folder: Path) -> None:
    """The temporary files of writes that a crash (``kill -9``) cut short: ``.NAME.XXXXXXXX.tmp.EXT``
    (:func:`salience._core.files.atomic_path`); never visible as results, removed on resume."""
    cut = [*folder.glob(".*.tmp*")]  # the run's own files (index.parquet, run.json, index.html)
    for sub in _RUN_FOLDERS:
        cut += (folder / sub).rglob(".*.tmp*")
    for p in cut:
        parts = p.name.split(".")
        if len(parts) >= 4 and "tmp" in parts and p.is_file():
            p.unlink(missing_ok=True)


def check_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a file, a folder whose ``run.json`` is not a salience run's manifest (:func:`manifest_format`: a
    user's folder, which ``overwrite`` would have cleared), or a folder that holds other files than a run's (the lock
    file aside), as ``--out``."""
    if folder.exists() and not folder.is_dir():
        raise SalienceError(f"{folder} is a file, not a run folder; choose another out=")
    if not folder.is_dir():
        return
    if (folder / "run.json").exists():
        if manifest_format(folder / "run.json") is None:
            _refuse_unreadable(folder / "run.json", "or choose another out=")
            raise SalienceError(f"{folder} holds a run.json that is not a salience run's manifest (no \"format\": "
                                "\"salience-run/N\" in it: another program's file, or a damaged one); choose another "
                                "out= (an empty or new folder), or move that run.json away")
        return
    names = [p.name for p in folder.iterdir() if p.name != LOCK_NAME]
    # overwrite= clears a run's files from a folder without run.json (a run stopped while overwrite= cleared it) only
    # where salience's marks say it is a run's (its lock, a marked table): never a user's files of the same names
    if names and (not overwrite or any(n not in _RUN_FILES + _RUN_FOLDERS for n in names)
                  or not is_run_folder(folder)):
        raise SalienceError(f"{folder} exists and is not a salience run; choose another out= (an empty or new "
                            "folder)")


def unwritten_run(folder: PathLike) -> str:
    """Why the run folder ``folder`` (:func:`is_run_folder`) without its ``run.json`` has nothing to read yet: a live
    run is starting (its lock is held, :func:`salience.runs.lock.lock_holder`: its ``run.json`` comes in a moment,
    once its inputs are planned), a process still writes a shard of a run that has ended
    (:func:`salience.runs.lock.commit_holder`: wait for it), or a run was stopped before it wrote it, or while
    ``overwrite`` cleared it (its command starts it there again). What :func:`open_run` (and so
    :func:`salience.explore`) raises and what ``salience explore`` says as it leaves the folder out, in the same
    words. A run that begins between the looks holds the commits' byte a moment (writing its token): the run's lock
    is asked again then, and such a run is said to be starting."""
    holder = lock_holder(Path(folder))
    writing = commit_holder(Path(folder)) if holder is None else None
    if writing is not None:  # a run that began since the first look holds the commits' byte while it writes its token
        holder = lock_holder(Path(folder))
    if holder is not None:
        return (f"a dataset run that is starting ({holder} is writing it and has not written its run.json yet): "
                "nothing to show yet; open it again in a moment")
    if writing is not None:  # a Ray actor of a run that has ended, its end done waiting for it (FENCE_WAIT)
        return (f"a dataset run's folder without its run.json, where {writing} is still writing a shard of a run "
                "that has ended: nothing to show yet; wait for it to finish (or stop it), then run its command again")
    return ("a dataset run's folder without its run.json (a run stopped before it wrote it, or while --overwrite "
            "cleared it): nothing to show yet; run its command again")


def is_run_folder(path: PathLike) -> bool:
    """Whether ``path`` is a dataset run's folder, known by salience's own marks: the run's manifest (a ``run.json``
    whose ``format`` is salience's, :func:`manifest_format`), its lock (:data:`salience.runs.lock.LOCK_NAME`), or a
    table the store wrote and marked (:func:`is_store_table`: ``inputs.parquet``, ``index.parquet``). The one test of
    a run folder: what another command checks before it writes its own files into a folder (``salience explain IMAGE
    --out``), which a run would then hold beside its own, and what the explorer takes for a run
    (:func:`salience.explore.runs.is_run`). A run writes its lock first (kept for good, :mod:`salience.runs.lock`),
    then ``run.json``, then ``inputs.parquet`` (before its first shard), and ``overwrite=`` removes ``run.json``
    before the tables: a run stopped before its ``run.json`` was written, or while ``overwrite=`` cleared it, is
    known by its lock; a marked table without either (a run folder copied without its hidden file) is one too. A
    user's own ``run.json`` (another program's manifest), or a table of the same name that salience did not mark (a
    user's ``inputs.parquet`` of columns ``index`` and ``path``), is not: the tables of runs written before the mark
    (session 57) are known only with their ``run.json`` or lock. Reads at most 4 KiB of ``run.json`` (1 MiB where its
    first key is not ``format``) and each table's footer (at most :data:`FOOTER_CAP`)."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    if manifest_format(folder / "run.json") is not None or (folder / LOCK_NAME).is_file():
        return True
    return any(is_store_table(folder / name) for name in ("inputs.parquet", "index.parquet"))


def manifest_format(path: PathLike) -> Optional[str]:
    """The ``format`` of the salience run manifest ``path`` (``salience-run/2``), or ``None``: no such file, or not a
    salience run's manifest (not JSON, not an object, no ``format`` of salience's ``salience-run/N``: another
    program's ``run.json``). Cheap whatever the file: salience writes ``format`` first, so its first 4 KiB say; a
    file whose first key is another is read whole only up to :data:`MANIFEST_CAP` (1 MiB; a larger one is not a
    manifest of salience's). A ``format`` held twice is read by its first, in either case (its readers refuse such a
    manifest as damaged, :func:`read_manifest`: a salience manifest, which ``overwrite`` clears)."""
    try:
        with _open_regular(Path(path)) as f:
            if f is None:  # not a regular file: a FIFO named run.json would block the open, and its reads
                return None
            head = f.read(_MANIFEST_HEAD)
            found = _FORMAT_FIRST.match(head)
            if found is not None:
                return found.group(1).decode("ascii")
            rest = f.read(MANIFEST_CAP + 1 - len(head)) if len(head) == _MANIFEST_HEAD else b""
    except OSError:  # not there, unreadable
        return None
    if len(head) + len(rest) > MANIFEST_CAP:
        return None
    try:
        manifest = json.loads(head + rest, object_pairs_hook=_first_wins)  # a "format" held twice: its first
    except (ValueError, RecursionError):  # not JSON, not UTF-8; arrays nested deeper than Python's recursion limit
        return None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    return found if isinstance(found, str) and found.startswith("salience-run/") else None


def _refuse_unreadable(path: Path, then: str) -> None:
    """A :class:`SalienceError` when the manifest ``path`` is there but cannot be opened (``Permission denied``):
    :func:`manifest_format` says no manifest of it, which is no reason to call it another program's file."""
    try:
        with _open_regular(path):
            return
    except FileNotFoundError:  # gone since: said as the caller says a folder without one
        return
    except OSError as e:
        raise SalienceError(f"{path}: cannot read the run's manifest ({e.strerror or e}); give this process read "
                            f"access to it, {then}") from None


def is_store_table(path: PathLike) -> bool:
    """Whether the file ``path`` is a table a run's store wrote: salience's mark in its parquet schema's key-value
    metadata (:data:`TABLE_MARK`) and the columns of its kind: kind ``inputs``, ``index`` (int64) and ``path``
    (string), then ``label`` (int64) and ``mask`` (string) where given (:meth:`Store.write_inputs`); kind ``index`` or
    ``shard``, ``index`` and ``path`` first and ``shard`` (string), ``offset`` (int32) last (:func:`row_schema`).
    Only the footer is read, by this function (the file's first 4 and last 8 bytes, then the metadata length those
    state, at most :data:`FOOTER_CAP`), and parsed from memory: a file whose footer claims more, or more than the file
    holds, is not a store table and costs those 12 bytes. A file that is not parquet, an unmarked table (a user's; or
    a run's written before the mark), or without pyarrow: ``False``."""
    try:
        footer = _parquet_footer(Path(path))
    except OSError:
        return False
    if footer is None:
        return False
    pa = pyarrow()
    try:  # pyarrow parses the footer from memory: it reads nothing more of the file
        schema = pa.parquet.read_schema(pa.BufferReader(footer))
    except Exception:  # noqa: BLE001 - pyarrow raises several types on a footer that is not parquet's
        return False
    kind = (schema.metadata or {}).get(TABLE_MARK)
    fields = [(f.name, str(f.type)) for f in schema]
    if fields[:2] != [("index", "int64"), ("path", "string")]:
        return False
    if kind == b"inputs":
        return set(fields[2:]) <= {("label", "int64"), ("mask", "string")}
    return kind in (b"shard", b"index") and fields[-2:] == [("shard", "string"), ("offset", "int32")]


def _parquet_footer(path: Path) -> Optional[bytes]:
    """The footer of the parquet file ``path`` as a parquet file of its own (``PAR1``, the metadata, its 4-byte
    little-endian length, ``PAR1``), for pyarrow to read the schema from memory; ``None``: not a file, no parquet
    magic at both ends, or a metadata length of 0, over :data:`FOOTER_CAP`, or over what the file holds (its
    metadata is then never read)."""
    with _open_regular(path) as f:
        if f is None:
            return None
        size = os.fstat(f.fileno()).st_size
        if size < 12 or f.read(4) != b"PAR1":
            return None
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or not 0 < length <= min(FOOTER_CAP, size - 12):
            return None
        f.seek(size - 8 - length)
        meta = f.read(length)
    return b"PAR1" + meta + tail if len(meta) == length else None


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[Optional[BinaryIO]]:
    """``path`` open for reading when it is a regular file (a link to one included), else ``None``, nothing read: a
    FIFO (or a device) of a run file's name is never opened for reading as a file, where ``open`` waits for a writer
    (a FIFO named ``run.json`` hung :func:`is_run_folder`). Opened without waiting, then checked
    (:func:`salience._core.files.open_regular`); ``OSError``: not there, unreadable."""
    fd = open_regular(path)
    if fd is None:
        yield None
        return
    with os.fdopen(fd, "rb") as f:
        yield f


RUN_FILE = ("a run file's name", "run the command again (or open the run again)")
"""What a run's table or map file that is no regular file is said to be, and what to do (:func:`_read_regular`)."""


@contextlib.contextmanager
def _read_regular(path: Path, what: str = RUN_FILE[0], then: str = RUN_FILE[1]) -> Iterator[BinaryIO]:
    """``path``, a run's table or map file, open for reading: the one open its reader (pyarrow, numpy) reads through,
    opened without waiting and checked on the open handle (:func:`_open_regular`), so a file swapped for a FIFO
    after a look is never waited on. A :class:`SalienceError` saying to remove it when it is no regular file (a FIFO,
    a device or a socket of its name: :func:`salience._core.files.not_regular` of ``what``, then ``then``);
    ``OSError``: not there, unreadable (what the reader's own open said)."""
    with _open_regular(path) as f:
        if f is None:
            raise SalienceError(not_regular(path, what, then))
        yield f


@contextlib.contextmanager
def _table_source(path: Path, what: str = RUN_FILE[0], then: str = RUN_FILE[1]) -> Iterator[str]:
    """The run's table ``path`` for pyarrow, as a path that names its one checked handle (:func:`_read_regular`):
    ``/proc/self/fd/N`` (Linux) or ``/dev/fd/N`` (macOS, the BSDs), which open the very file the handle holds, never
    what the name ``path`` leads to later (a FIFO put there after the check); the handle stays open while pyarrow
    reads. pyarrow reads that path as it read ``path`` (natively, only the parts it needs). Not a Python file object
    nor the bytes in a ``pyarrow.BufferReader``: a process that had imported salience then aborted as it ended,
    pyarrow's threads left running (``terminate called without an active exception``: 7 to 13 exits in 20; 0 in 30
    through the descriptor's path). Where neither folder is there (Windows, which has no FIFOs; a container without
    ``/proc``, whose ``/dev/fd`` links to it), ``path`` itself, looked at once more just before: a FIFO of its name
    then is a :class:`SalienceError` too (pyarrow's ``read_schema`` of a FIFO waits for a writer), a swap between
    that look and pyarrow's open is not seen."""
    with _read_regular(path, what, then) as f:
        for folder in ("/proc/self/fd", "/dev/fd"):
            if os.path.isdir(folder):
                yield f"{folder}/{f.fileno()}"
                return
        check_regular(path, what, then)  # gone since the open, or unreadable: left to pyarrow, which says so
        yield os.fspath(path)


def _read_table(path: Path, what: str = RUN_FILE[0], then: str = RUN_FILE[1], **options: Any) -> Any:
    """``pyarrow.parquet.read_table(path, **options)`` read through one checked handle (:func:`_table_source`): the
    same table, and the same error for a damaged file (the handle's path in pyarrow's words: ``path`` put back)."""
    with _table_source(path, what, then) as source:
        return _named(path, source, lambda: pyarrow().parquet.read_table(source, **options))


def _named(path: Path, source: str, read: Any) -> Any:
    """``read()`` of ``source``, the path of ``path``'s handle; a pyarrow error that names ``source`` names ``path``
    instead, as pyarrow's own open of ``path`` said it."""
    pa = pyarrow()
    try:
        return read()
    except pa.ArrowException as e:
        text = str(e)
        if source == os.fspath(path) or f"'{source}'" not in text:
            raise
        raise type(e)(text.replace(f"'{source}'", f"'{path}'")) from None


def _zip_or_pickle(magic: bytes) -> str:
    """What ``np.load`` says of a file that is no ``.npy`` (no :data:`numpy.lib.format.MAGIC_PREFIX`)."""
    if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # np.load gave an NpzFile, which no map indexes
        return "This file is a zip archive (.npz), not an .npy file of maps."
    return ("This file contains pickled (object) data. If you trust the file you can load it unsafely using the "
            "`allow_pickle=` keyword argument or `pickle.load()`.")


def _load_maps(path: Path) -> np.memmap:
    """The map file ``path`` (``RUN/maps/<method>/<shard>.npy``) memory-mapped read-only: what
    ``np.load(path, mmap_mode="r")`` gives (the same array, dtype, order, shape; ``.npy`` format versions 1, 2 and
    3), read through one handle opened without waiting and checked regular on it (:func:`_read_regular`: a FIFO of
    its name, even one put there after a look, is a :class:`SalienceError`, never waited on). ``np.load`` cannot map
    an open handle, so its steps are done here on it: the magic, the header, then ``np.memmap`` of the handle (which
    keeps its own mapping; the handle is closed). A damaged file raises what ``np.load`` raised: ``EOFError`` (empty),
    ``ValueError`` (not an ``.npy``: a pickle, a bad header or version, an object array, cut short); a zip archive
    (``.npz``, which ``np.load`` returned as an archive) a ``ValueError`` too."""
    fmt = np.lib.format
    with _read_regular(path) as f:
        magic = f.read(len(fmt.MAGIC_PREFIX))
        if not magic:
            raise EOFError("No data left in file")
        if magic != fmt.MAGIC_PREFIX:
            raise ValueError(_zip_or_pickle(magic))
        f.seek(0)
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        elif version == (3, 0):  # version 2's layout, its header UTF-8: numpy reads it with its private reader only
            shape, fortran, dtype = fmt.read_array_header_2_0.__globals__["_read_array_header"](f, version)
        else:
            raise ValueError(f"we only support format version (1,0), (2,0), and (3,0), not {version}")
        if dtype.hasobject:
            raise ValueError("Array can't be memory-mapped: Python objects in dtype.")
        arr = np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order="F" if fortran else "C")
    arr.filename = path.resolve()  # what np.memmap of the path records
    return arr


def _marked(table: Any, kind: bytes) -> Any:
    """``table`` with salience's mark of a run's table of ``kind`` in its schema's metadata (:data:`TABLE_MARK`)."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), TABLE_MARK: kind})


def done_indices(folder: PathLike) -> set[int]:
    """The indices of the images in the committed shards of the run in ``folder`` (none: empty)."""
    pyarrow()  # without it: how to install it, before any shard is looked at
    indices: set[int] = set()
    for p in sorted((Path(folder) / "shards").glob("*.parquet")):
        if p.name.startswith("."):
            continue
        indices.update(_read_table(p, columns=["index"]).column("index").to_pylist())
    return indices


def _format_refusal(folder: Path, found: Any) -> SalienceError:
    """Why the run in ``folder``, of format ``found`` (not :data:`FORMAT`), is not continued: a run of the older
    layout (:data:`JOINED_ERRORS`), read but not continued; any other format is unknown (a newer salience's):
    upgrade salience (starting again would delete it)."""
    if found == JOINED_ERRORS:
        return SalienceError(
            f"{folder} holds a run begun by an older salience (format {found}: each method's error joined in the "
            f"'error' column; this salience writes {FORMAT}, a column per method), which open_run and the explorer "
            "still read but no run continues; add overwrite=True to start again, or choose another out=")
    return SalienceError(
        f"{folder} holds a run of an unknown run format {found!r} (this salience reads {JOINED_ERRORS} and {FORMAT}, "
        "and continues a run of " + FORMAT + "); upgrade salience to continue it, or choose another out= "
        "(overwrite=True would delete it)")


def _old_manifest(path: Path, overwrite: bool) -> dict[str, Any]:
    """The manifest ``path`` of the run in the folder a run is written to. One that cannot be read (a salience
    manifest by its start, :func:`check_folder`, damaged: cut short) raises, saying to start again with
    ``overwrite``; with ``overwrite``: ``{}``, a command that differs from any, so the folder is cleared and the run
    starts again (it raised the same words, overwrite= or not)."""
    try:
        return read_manifest(path, WRITE)
    except SalienceError:
        if not overwrite:
            found = manifest_format(path)
            if found is not None and found != FORMAT:  # an older (or a newer) salience's run lacks keys this one
                raise _format_refusal(path.parent, found) from None  # writes: said as its format, not as damage
            raise
        return {}


class Store:
    """Writing side of ``RUN/``: the manifest, the shards, the merged index."""

    def __init__(self, folder: PathLike, manifest: dict[str, Any], *, overwrite: bool = False,
                 legacy: Optional[dict[str, Any]] = None, planned: Optional[Planned] = None):
        """``legacy``: the command as an older salience wrote it (a run it began is continued when
        that one is the same); ``planned``: the inputs, to say which image differs in a refusal."""
        self.folder = Path(folder)
        self.manifest = manifest
        self._open(overwrite, legacy, planned)
        self.schema = schema_of(self.manifest)

    @classmethod
    def existing(cls, folder: PathLike) -> "Store":
        """The store of an existing run, for writing shards (the Ray actors): no checks, no writes."""
        self = cls.__new__(cls)
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder / "run.json", WRITE)
        self.schema = schema_of(self.manifest)
        return self

    def _open(self, overwrite: bool, legacy: Optional[dict[str, Any]], planned: Optional[Planned]) -> None:
        """Create the run, or check that the existing one was made by the same command."""
        f = self.folder
        check_folder(f, overwrite)
        existing = f / "run.json"
        if existing.exists():
            old = _old_manifest(existing, overwrite)
            if old.get("format") != FORMAT and not overwrite:
                raise _format_refusal(f, old.get("format"))
            was, now = old.get("command", {}), self.manifest["command"]
            if "precision" in now and "precision" not in was:
                # begun before the command held it (session 40): its precision is not known (an older salience ran
                # `--precision bf16` runs too and recorded none), so it is continued in the one given, as it was then
                was = {**was, "precision": now["precision"]}
            if legacy is not None and "form" not in (was.get("inputs") or {}):
                now = legacy  # a run begun before the paths had one form: the command as it was written
            begun = was.get("labels")
            given_up_front = isinstance(begun, str) and begun != ITEM_LABELS
            given_now = isinstance(now.get("labels"), str) and now["labels"] != ITEM_LABELS
            stored_differ = None
            if begun == ITEM_LABELS and given_now and planned is not None and planned.labels is not None:
                # a run begun reading its labels with each item, continued with labels given up front: those
                # agreeing with the committed rows' continue it, a run of the items' labels still (each item
                # still to explain must carry its given label: job.Plan.labels_given)
                stored_differ = _stored_label_difference(f, planned.labels, planned.paths)
                if stored_differ is None:
                    now = {**now, "labels": ITEM_LABELS}
            if now.get("labels") == ITEM_LABELS and given_up_front:
                # a run of a user's dataset begun when its labels were all given or read up front (their
                # digest), now read with each item: each must be the one the run was begun with
                # (job.Plan.begun_labels, from inputs.parquet), checked when its image is read
                now = {**now, "labels": begun}
                if not overwrite and not _differences(was, now):
                    _check_begun_labels(f, begun)
            diff = _differences(was, now)
            if diff and not overwrite:
                detail = _input_differences(f, old, planned) if planned is not None else {}
                advice = ("run the same command to continue it, choose another out=, or add overwrite=True to "
                          "start again")
                if stored_differ is not None:  # true with other inputs too: image i's row and its given label
                    detail["labels"] = stored_differ
                    if len([d for d in diff if not d.startswith("labels:")]) == 0:
                        advice = GIVEN_LABELS_ADVICE
                elif begun == ITEM_LABELS and given_now and now.get("labels") != ITEM_LABELS:
                    detail.setdefault("labels", "labels: read with each item of the dataset when the run began, now "
                                                "given up front (labels=); leave them out (or give the "
                                                "ones its items carry) to continue it")
                diff = list(detail.values()) + [d for d in diff if d.split(".")[0].split(":")[0] not in detail]
                more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
                raise SalienceError(f"{f} holds a run of a different command ({'; '.join(diff[:3])}{more}); {advice}")
            if not diff and not overwrite:
                self.manifest = {**old, **{k: v for k, v in self.manifest.items() if k not in old and k != "cwd"}}
                _remove_temporaries(f)
                return
            clear_run(f)
        elif overwrite:  # a run stopped while overwrite= cleared it (check_folder: its lock, its files): its
            clear_run(f)  # inputs.parquet, kept, would stand for this run's planned images (write_inputs keeps one)
        make_folder(f)
        atomic_write(existing, json.dumps(self.manifest, indent=2).encode("utf-8"))

    # ----------------------------------------------------------------------------- inputs

    def write_inputs(self, paths: Sequence[str], labels: Optional[Sequence[Optional[int]]],
                     masks: Optional[Sequence[Optional[str]]] = None) -> None:
        """``inputs.parquet``: the planned inputs, their labels and mask files (kept from the first run
        of the command)."""
        target = self.folder / "inputs.parquet"
        pa = pyarrow()
        if target.exists():
            if labels is not None:
                self._restore_labels(target, labels)
            return
        cols = {"index": pa.array(np.arange(len(paths), dtype=np.int64)), "path": pa.array(list(paths), pa.string())}
        if labels is not None:
            cols["label"] = pa.array(list(labels), pa.int64())
        if masks is not None:
            cols["mask"] = pa.array(list(masks), pa.string())
        with atomic_path(target) as tmp:
            pa.parquet.write_table(_marked(pa.table(cols), b"inputs"), tmp)

    def _restore_labels(self, target: Path, labels: Sequence[Optional[int]]) -> None:
        """Write ``labels`` into the existing ``inputs.parquet`` when it does not hold them (no ``label``
        column, or other labels) and they are the labels of the run's command (its digest): a run whose
        inputs.parquet lost them is refused without ``labels=`` (:func:`_check_begun_labels`); continued
        once with them, it holds them again. The table is opened once (:func:`_table_source`, its one checked
        handle) and read through it as little as it needs: its schema, its labels (what a run that holds them reads,
        a resume's common case: 8 MiB of a million rows, not the 69 MiB of the table with its paths), the whole
        table only to write it back."""
        pa = pyarrow()
        digest = _digest(labels)
        if self.manifest.get("command", {}).get("labels") != digest:
            return
        with _table_source(target) as source:
            names = _named(target, source, lambda: pa.parquet.read_schema(source).names)
            if "label" in names and _digest(_named(target, source, lambda: pa.parquet.read_table(
                    source, columns=["label"])).column("label").to_pylist()) == digest:
                return
            table = _named(target, source, lambda: pa.parquet.read_table(source))
        column = pa.array(list(labels), pa.int64())
        if "label" in table.column_names:
            table = table.set_column(table.column_names.index("label"), "label", column)
        else:
            table = table.add_column(table.column_names.index("path") + 1, "label", column)
        with atomic_path(target) as tmp:
            pa.parquet.write_table(_marked(table, b"inputs"), tmp)

    def input_paths(self) -> list[str]:
        """Each image's path as the run's first command gave it (``inputs.parquet``): the rows' ``path``."""
        table = _read_table(self.folder / "inputs.parquet", columns=["path"])
        return table.column("path").to_pylist()

    def begun_labels(self) -> Optional[list[Optional[int]]]:
        """The labels a continued run of a dataset whose items carry them (:data:`ITEM_LABELS`) was
        begun with, when they were given (or read) up front: its command holds their digest, and its
        ``inputs.parquet`` their ``label`` column. ``None``: a run begun reading them with each item,
        or whose ``inputs.parquet`` holds no labels."""
        labels = self.manifest.get("command", {}).get("labels")
        if not isinstance(labels, str) or labels == ITEM_LABELS:
            return None
        table = _read_table(self.folder / "inputs.parquet")
        return table.column("label").to_pylist() if "label" in table.column_names else None

    def done(self) -> set[int]:
        """The indices of the images in committed shards."""
        return done_indices(self.folder)

    # ----------------------------------------------------------------------------- shards

    def shard_name(self, indices: Sequence[int]) -> str:
        """A new shard's name: its first image's index (``000000017``); when a committed shard has
        that name already (one holding only some of the images it was planned to hold: edited by
        hand, or written by another program), the first of ``000000017-1``, ``000000017-2`` ...
        that none has. A committed shard is never written again: its rows stay, and only the images
        no committed shard holds are computed, into a shard of their own. A name whose maps are
        there without its rows file (a crash before the commit) is free: written again."""
        base = f"{min(indices):09d}"
        name, n = base, 0
        while (self.folder / "shards" / f"{name}.parquet").is_file():
            n += 1
            name = f"{base}-{n}"
        return name

    def write_shard(self, shard: str, rows: list[dict[str, Any]], maps: dict[str, np.ndarray],
                    thumbs: Optional[bytes]) -> None:
        """A shard: its maps (one ``.npy`` per method), its thumbnail sprite, then its rows (the commit)."""
        dtype = np.dtype(self.manifest["map_dtype"])
        for m, arr in maps.items():
            with atomic_path(self.folder / "maps" / m / f"{shard}.npy") as tmp:
                np.save(tmp, _cast(arr, dtype))
        if thumbs is not None:
            atomic_write(self.folder / "thumbs" / f"{shard}.jpg", thumbs)
        pa = pyarrow()
        for offset, row in enumerate(rows):
            row["shard"], row["offset"] = shard, offset
        table = pa.Table.from_pylist(rows, schema=self.schema)
        with atomic_path(self.folder / "shards" / f"{shard}.parquet") as tmp:
            pa.parquet.write_table(_marked(table, b"shard"), tmp)

    def merge_index(self) -> Any:
        """``index.parquet``: every committed row, sorted by index (a repeated index kept once)."""
        table = read_shards(self.folder, self.schema)
        with atomic_path(self.folder / "index.parquet") as tmp:
            pyarrow().parquet.write_table(_marked(table, b"index"), tmp)
        return table


FLOAT16_SMALLEST = float(np.finfo(np.float16).smallest_subnormal)
"""float16's smallest positive value (5.96e-08): a map's values below half of it are stored as 0."""


def float16_note(stored: float, what: str = "map", command: bool = False) -> str:
    """What to tell a user whose ``what`` is not constant (judged on the float32 map, the run's
    ``METHOD.constant`` column) but whose map stored as float16 (a run's default ``map_dtype``) is one
    value everywhere, ``stored``: its values below float16's range (``stored`` 0) or closer together
    than its precision. The map was computed; the storage lost it, and ``map_dtype="float32"`` keeps it
    (the run's warning; ``salience explain`` prints it with ``--map-dtype float32``); with ``command``, both
    (the explorer's page, which shows runs made either way)."""
    if stored == 0.0:
        why = (f"its values are all below float16's range (its smallest value is {FLOAT16_SMALLEST:.2g}), so the "
               "map stored as float16 is zero everywhere")
    else:
        why = (f"its values differ by less than float16's precision, so the map stored as float16 is constant "
               f"({stored:.4g}) everywhere")
    return (f"the {what} is not constant, but {why} (its picture one flat colour): the storage lost it, not the "
            f"model. Run again with map_dtype=\"float32\"{_COMMAND if command else ''} to keep such maps")


_COMMAND = " (salience explain --dataset --map-dtype float32)"


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as ``dtype``; float16 clips to its finite range (NaN kept: the rows of failed images). The clip
    runs on the float16 copy, in place (a value past the range is +-inf there, clipped to +-65504, as the
    float32 clipped first casts to): the same bits, without a float32 copy of the maps."""
    if dtype == np.float16:
        big = np.finfo(np.float16).max
        with np.errstate(over="ignore"):  # past the range: inf, clipped next
            out = np.asarray(arr).astype(np.float16)
        return np.clip(out, -big, big, out=out)
    return arr.astype(dtype, copy=False)


def stored_constants(lo: np.ndarray, hi: np.ndarray, dtype: Union[str, np.dtype]) -> list[Optional[float]]:
    """For maps whose pictures' float32 values (a per-channel map's ``max_c |m|``) span ``lo`` ..
    ``hi`` (arrays of one shape, one entry per map), the one value each picture holds everywhere
    once its map is stored as ``dtype`` (as :meth:`Store.write_shard` casts it), else ``None``:
    :func:`salience.render.viz.constant_value` of the stored map's picture, without casting the
    map. Exact: the cast (clipped to float16's finite range, then rounded to the nearest) never
    reverses two values' order, and it commutes with ``|.|`` and ``max_c`` (both the clip and the
    rounding are odd functions), so the stored picture's extremes are the casts of ``lo`` and
    ``hi``, and it is one value where those are equal (and finite). In float16 a map whose values
    lie below its range or closer than its precision is one value once stored (:func:`float16_note`)."""
    dt = np.dtype(dtype)
    a = _cast(np.asarray(lo, dtype=np.float32), dt).astype(np.float64).ravel().tolist()
    b = _cast(np.asarray(hi, dtype=np.float32), dt).astype(np.float64).ravel().tolist()
    return [x + 0.0 if x == y and math.isfinite(x) else None for x, y in zip(a, b)]  # -0.0 -> 0.0


def read_shards(folder: Path, schema: Any = None) -> Any:
    """Every committed shard's rows as one table sorted by index."""
    pa = pyarrow()
    parts = [_read_table(p, schema=schema) for p in sorted((folder / "shards").glob("*.parquet"))
             if not p.name.startswith(".")]
    if not parts:
        return schema.empty_table() if schema is not None else pa.table({"index": pa.array([], pa.int64())})
    table = pa.concat_tables(parts)
    order = np.argsort(np.asarray(table.column("index")), kind="stable")
    table = table.take(pa.array(order))
    idx = np.asarray(table.column("index"))
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    return table.filter(pa.array(keep)) if not keep.all() else table


# --------------------------------------------------------------------------------- reading


ITER_ROWS = 65536
"""How many of a run's rows ``for row in run`` turns into dicts at a time."""


class BadIndex(SalienceError):
    """The run's table cannot say which row is an image: it has several rows with the index asked
    for (a table written by hand, or by another program); the explorer answers 409 with this. Also
    what :meth:`Run.index_error` and :meth:`Run.repeat_error` say of the table's rows that are no
    image's (rows without an index, the rows of a repeated one)."""


class Run:
    """A run read back lazily: the table on first use, each map file memory-mapped when asked for.

    ``run.table`` (pyarrow), ``run.methods``, ``run.model``, ``len(run)``, ``run.row(i)`` (a dict),
    ``for row in run`` (each image's :meth:`row`, by index), ``run.map(i, method, k)`` ``(H, W)``
    float32, ``run.image_path(i)``, ``run.options`` (the command's options).
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        manifest = self.folder / "run.json"
        if not manifest.is_file():
            if is_run_folder(self.folder):  # its lock or its tables: a run starting, or stopped before its run.json
                raise SalienceError(f"{self.folder}: {unwritten_run(self.folder)}")
            raise SalienceError(f"{self.folder} is not a salience run (no run.json); give the folder of a run (out= of "
                                "salience.explain_dataset, --out of 'salience explain DIR --out RUN')")
        if manifest_format(manifest) is None:
            _refuse_unreadable(manifest, "then open the run again")
            raise SalienceError(f"{self.folder} is not a salience run (its run.json is not a salience run's manifest: "
                                "no \"format\": \"salience-run/N\" in it); give the folder of a run (out= of "
                                "salience.explain_dataset, --out of 'salience explain DIR --out RUN')")
        self.manifest = read_manifest(manifest)
        if self.manifest.get("format") not in (FORMAT, JOINED_ERRORS):
            raise SalienceError(f"{self.folder}: unknown run format {self.manifest.get('format')!r} (this salience "
                                f"reads {JOINED_ERRORS} and {FORMAT}); upgrade salience")
        self._table: Any = None
        # the table's "index" values sorted, and each one's row (None: the table is sorted), built once
        self._lookup: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        self._images: Optional[int] = None  # len(run): the distinct index values, counted once
        self._repeated: Optional[np.ndarray] = None  # the index values of several rows

    @property
    def methods(self) -> list[str]:
        return list(self.manifest["methods"])

    @property
    def model(self) -> str:
        return str(self.manifest["command"]["model"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.manifest["command"])

    @property
    def complete(self) -> bool:
        """Whether every planned image (index ``0 .. count - 1``) has exactly one row (the run
        finished). A table with a repeated index, or rows without one (written by hand or by another
        program), is not complete even when it has as many rows as images: an image may be missing
        behind a repeated row, and those rows cannot be read (:class:`BadIndex`). Running the same
        command again recomputes the images its shards lack and writes ``index.parquet`` anew."""
        count = int(self.manifest["command"]["inputs"]["count"])
        column = self.table.column("index")
        if column.null_count or len(self) != self.table.num_rows:
            return False
        values = np.asarray(column)
        return int(np.count_nonzero((values >= 0) & (values < count))) == count

    def __len__(self) -> int:
        """How many images the run has rows for: the distinct values of the ``index`` column (a
        repeated index counted once, a row without one not at all)."""
        if self._images is None:
            import pyarrow.compute as pc

            self._images = int(pc.count_distinct(self.table.column("index"), mode="only_valid").as_py())
        return self._images

    @property
    def table(self) -> Any:
        """One row per image: ``index.parquet`` when the run finished (salience writes it sorted by
        index; one written otherwise is read in its own order, its rows found by their index
        value), else the committed shards merged, sorted by index (a run still going, or stopped).
        A table without an ``index`` column (written by hand or by another program) gets one: each
        row's position (0, 1, ...), so its rows are addressed by position everywhere
        (``run.row(i)``, the explorer's URLs)."""
        if self._table is None:
            index = self.folder / "index.parquet"
            schema = schema_of(self.manifest)
            try:  # a FIFO or a folder of that name: said, not skipped
                table = _read_table(index, "the run's index.parquet",
                                    "open the run again (its rows are read from its shards)")
            except FileNotFoundError:  # not there (a link to nothing too): a run still going, or stopped
                table = read_shards(self.folder, schema)
            if "index" not in table.column_names:
                table = table.add_column(0, "index", pyarrow().array(np.arange(table.num_rows, dtype=np.int64)))
            self._table = table
        return self._table

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The run's images in index order, each the dict :meth:`row` gives (so ``run.map(row["index"],
        method)`` reads its map): ``len(run)`` of them, whatever the table's order. Rows without an index
        are no image's and are left out (:meth:`index_error` says how many); a table that repeats an
        index raises :meth:`repeat_error` (a :class:`BadIndex`) before the first row, as :meth:`row`
        refuses that index. Read :data:`ITER_ROWS` rows at a time (a run may hold millions): the raw
        rows, in the table's own order, are ``run.table``'s."""
        error = self.repeat_error()
        if error is not None:
            raise error
        keys, order = self._index_lookup()
        table = self.table
        for start in range(0, len(keys), ITER_ROWS):
            part = (table.slice(start, ITER_ROWS) if order is None
                    else table.take(pyarrow().array(order[start:start + ITER_ROWS])))
            yield from part.to_pylist()

    def position(self, index: int) -> int:
        """The table position of image ``index``, found by its value in the ``index`` column (the
        table may be in any order, with gaps): a binary search on the sorted values, with no Python
        object per row (a run may have millions of rows). :class:`SalienceError` when the run has no
        such row (it says so when rows without an index may hide it); :class:`BadIndex` when it has
        several (a table written by hand or by another program: which one is meant cannot be known).
        Rows without an index are no image's: the others are found by their index all the same."""
        if getattr(index, "ndim", None) == 0 and hasattr(index, "item"):  # a 0-d tensor / array: scores.argmax()
            index = index.item()
        index = check_int(index, "index", minimum=None, what="an image's number in the run")  # "0" was "not in the run"
        keys, order = self._index_lookup()
        pos = int(np.searchsorted(keys, index))
        if pos >= len(keys) or keys[pos] != index:
            unindexed = self.index_error()
            raise SalienceError(f"image {index} is not in the run (it has rows for {len(self)} images"
                                f"{'' if self.complete else ', and is not finished'})"
                                + ("" if unindexed is None else f"; it may be one of the rows without an index: "
                                                                f"{unindexed}"))
        end = int(np.searchsorted(keys, index, side="right"))
        if end - pos > 1:
            rows = order[pos:end] if order is not None else np.arange(pos, end)
            shown = ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if end - pos > 5 else "")
            raise BadIndex(f"image {index} has {end - pos} rows in the run's table ({self.folder / 'index.parquet'}: "
                           f"rows {shown}), and a run has one row per image; {self._mend_repeats()}")
        return pos if order is None else int(order[pos])

    def _mend_repeats(self) -> str:
        """What to do about a repeated index: keep one row per index, or read the run's own shards."""
        shards = any(p.is_file() for p in (self.folder / "shards").glob("*.parquet"))
        return ("keep one row per index (pandas: df.drop_duplicates('index')) and write the table again"
                + (", or delete index.parquet to read the run's own shards" if shards else ""))

    def repeated(self) -> np.ndarray:
        """The index values that more than one row of the table holds, sorted, each once (int64; empty
        for a table salience wrote). Rows without an index are not counted (:meth:`index_error`)."""
        if self._repeated is None:
            keys = self._index_lookup()[0]  # sorted once for the lookups, rows without an index left out
            self._repeated = np.unique(keys[1:][keys[1:] == keys[:-1]]).astype(np.int64)
        return self._repeated

    def repeat_error(self) -> Optional[BadIndex]:
        """The :class:`BadIndex` of a table in which index values are repeated, naming them (the first
        ten) and what to do, else ``None``; those images cannot be looked up, the others can."""
        values = self.repeated()
        if not len(values):
            return None
        rows = int(np.count_nonzero(np.isin(self._index_lookup()[0], values)))
        shown = ", ".join(str(int(v)) for v in values[:10]) + (f" and {len(values) - 10} more" if len(values) > 10
                                                               else "")
        return BadIndex(f"the run's table ({self.folder / 'index.parquet'}) gives {len(values)} index value(s) to "
                        f"more than one row ({rows} rows; index {shown}), and a run has one row per image; "
                        f"{self._mend_repeats()}")

    def index_error(self) -> Optional[BadIndex]:
        """The :class:`BadIndex` of a table with rows without an index, naming how many, the first
        and what to do, else ``None``. Those rows are no image's (they cannot be looked up, ``len``
        does not count them, the run is not :attr:`complete`); the rows with an index are looked up
        as ever."""
        column = self.table.column("index")
        if not column.null_count:
            return None
        first = int(np.flatnonzero(np.asarray(column.is_null()))[0])
        return BadIndex(f"the run's table ({self.folder}) has {column.null_count} row(s) without an index "
                        f"(the first: row {first}); every row needs its image's index: fill them in, or "
                        "write the table without the index column to number the rows by position")

    def _index_lookup(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The ``index`` values sorted (rows without one left out), and the table position of each
        (``None`` when the table is already sorted and has no null, as salience writes it: no copy);
        built once per table load."""
        if self._lookup is None:
            column = self.table.column("index")
            if column.null_count:
                rows = np.flatnonzero(~np.asarray(column.is_null()))
                values = np.asarray(column.drop_null(), dtype=np.int64)
                order = np.argsort(values, kind="stable")
                self._lookup = (values[order], rows[order])
            else:
                values = np.asarray(column)
                if len(values) < 2 or bool(np.all(values[1:] > values[:-1])):
                    self._lookup = (values, None)
                else:
                    order = np.argsort(values, kind="stable")
                    self._lookup = (values[order], order)
        return self._lookup

    def _row_of(self, index: int) -> tuple[str, int]:
        """Image ``index``'s shard and offset; a :class:`SalienceError` when its ``shard`` is no file name inside the
        run's folders (``../../x``, a ``/`` or a NUL in it: a table written by hand, or damaged), which its maps'
        and thumbnails' paths (``maps/<method>/<shard>.npy``) would lead out of the run's folder."""
        pos = self.position(index)
        t = self.table
        shard = str(t.column("shard")[pos].as_py())
        if not one_name(shard):
            raise SalienceError(f"image {index}'s row in the run's table ({self.folder}) names the shard {shard!r}, "
                                "which is no file name in the run's folder (its maps are maps/<method>/<shard>.npy): "
                                "a table written by hand, or damaged; name its shard as the run's files are named, "
                                "or run the run's command again with overwrite=True")
        return shard, int(t.column("offset")[pos].as_py())

    def map(self, index: int, method: str, k: int = 0) -> np.ndarray:
        """Image ``index``'s map of ``method`` for its ``k``-th target, ``(H, W)`` float32 (a per-channel
        map is shown as ``max_c |m|``). Reads only that map from its memory-mapped shard file."""
        if method not in self.methods:
            raise SalienceError(f"unknown method {method!r} in this run (methods: {', '.join(self.methods)})")
        shard, offset = self._row_of(int(index))
        key = (method, shard)
        if key not in self._arrays:
            self._arrays[key] = _load_maps(self.folder / "maps" / method / f"{shard}.npy")
        arr = self._arrays[key]
        if not 0 <= k < arr.shape[1]:
            raise SalienceError(f"target k={k} out of range: the run explains {arr.shape[1]} target(s) per image")
        m = np.asarray(arr[offset, k], dtype=np.float32)
        if np.isnan(m).all():
            said, own = self.row_errors(int(index))
            raise SalienceError(f"image {index} has no {method} map: {said.get(method) or own or 'it failed'}")
        return np.abs(m).max(0) if m.ndim == 3 else m

    def errors_of(self, table: Any = None) -> list[tuple[dict[str, str], Optional[str]]]:
        """Per row of ``table`` (default the run's; a page of it), its errors: method -> what it said, for
        each method that refused the image (its ``METHOD.error``) or whose metrics did (``metrics failed:
        ...``, its ``METHOD.metrics_error``), and the image's own error (``error``: not read, its mask not
        read; ``None``). A run of the older layout (:data:`JOINED_ERRORS`): its joined ``error`` read back
        (:func:`joined_errors`)."""
        table = self.table if table is None else table
        names = table.column_names

        def column(c: str) -> list[Any]:
            return table.column(c).to_pylist() if c in names else [None] * table.num_rows

        own = column("error")
        if self.manifest.get("format") == JOINED_ERRORS:
            return [joined_errors(e, self.methods) for e in own]
        out: list[tuple[dict[str, str], Optional[str]]] = [({}, e) for e in own]
        for m in self.methods:
            for i, (e, me) in enumerate(zip(column(error_column(m)), column(metrics_error_column(m)))):
                if e is not None or me is not None:
                    out[i][0][m] = e if e is not None else f"metrics failed: {me}"
        return out

    def row_errors(self, index: int) -> tuple[dict[str, str], Optional[str]]:
        """Image ``index``'s errors, as :meth:`errors_of` says them: per method, and its own."""
        return self.errors_of(self.table.slice(self.position(index), 1))[0]

    def failed(self) -> int:
        """How many rows failed somewhere: the image (not read, its mask not read), or a method or its
        metrics on it (:meth:`errors_of`); what ``salience explain`` counts and exits 1 for."""
        return sum(1 for said, own in self.errors_of() if said or own is not None)

    def row(self, index: int) -> dict[str, Any]:
        """Image ``index``'s row as a dict."""
        return self.table.slice(self.position(index), 1).to_pylist()[0]

    def image_path(self, index: int) -> Union[Path, str]:
        """The image file of row ``index`` (relative paths are relative to where the run was started);
        an object storage URL (``s3://...``) stays a string."""
        path = self.row(index)["path"]
        return path if "://" in path else Path(path)

    def thumbnail(self, index: int) -> tuple[Path, int]:
        """The sprite file holding image ``index``'s thumbnail, and its position in the sprite."""
        shard, offset = self._row_of(int(index))
        return self.folder / "thumbs" / f"{shard}.jpg", offset


def open_run(path: PathLike) -> Run:
    """The run in ``path`` (the ``--out`` folder of ``salience explain DIR``), read lazily."""
    return Run(path)
