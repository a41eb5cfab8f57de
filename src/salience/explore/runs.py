"""Dataset runs as a source of images: the rows of a run folder (``salience explain DIR --out RUN``).

A :class:`RunSource` wraps :func:`salience.open_run`: its rows are listed, sorted and filtered by
:meth:`RunSource.rows` (the page's gallery), and each row's image is reached by the id
``r<run>-<index>`` (``r0-17``) only, never by its path: the files that can be read are the
image paths the run's table names, nothing else. The run's thumbnails (its sprite files) and its
stored maps are read from the run folder by row. A row whose path is a URL (a run over
``s3://...``) is read from object storage when it is opened: only the URLs of the table, never
one from the page. Rows are not listed by ``api/images`` (a run may hold a million):
:meth:`RunSource.entries` is empty and :meth:`RunSource.find` answers by id.
"""
from __future__ import annotations

import collections
import io
import logging
import math
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from salience._core.errors import SalienceError
from salience._core.files import not_regular, open_regular
from salience.explore.images import ImageEntry, image_files
from salience.loading import remote
from salience.runs.job import constant_notes, flat_maps
from salience.runs.store import BadIndex, Run, is_run_folder, number_columns, open_run, pyarrow

__all__ = ["RunSource", "NotStored", "is_run", "SORTABLE"]

_log = logging.getLogger("salience.explore")

SORTABLE = ("index", "predicted", "predicted_name", "probability", "label", "correct", "path")
"""Columns the gallery sorts by, besides every ``method.statistic`` column."""
_DATASET_ITEM = re.compile(r"^[A-Za-z_][\w.]*\[\d+\]$")
"""The path a run gives the rows of a ``Dataset`` (``ImageFolder[17]``): an item, not a file."""
_SHOWN = ("index", "path", "predicted", "predicted_name", "probability", "label", "correct", "error", "width",
          "height")


class NotStored(SalienceError):
    """What a row's thumbnail or stored map would be read from is not in the run folder: its table
    has no ``shard`` / ``offset`` columns (a table not written by ``salience explain``), or the
    sprite or map file is missing or damaged. The server answers 404 with this message."""


def row_index(text: str) -> Optional[int]:
    """The row index written canonically (``0``, ``17``; not ``017``, ``+17`` or other scripts'
    digits, which ``int`` takes too), else ``None``: one row, one id, one URL."""
    return int(text) if re.fullmatch(r"0|[1-9][0-9]*", text) else None


def is_run(path: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether the explorer takes ``path`` for a run folder: :func:`salience.runs.store.is_run_folder`, the one test
    (a run stopped before it wrote its ``run.json`` is one, which :class:`RunSource` refuses as it opens it: no rows
    to show yet), less a folder without a ``run.json`` that holds image files: a run's folder holds none of its own
    (they are in ``thumbs/`` and ``overlays/``), so that is the user's folder of images with a table of theirs
    (``index.parquet``), whose images the page shows (it left the folder out, session 55's merge)."""
    folder = Path(path)
    if not is_run_folder(folder):
        return False
    return (folder / "run.json").is_file() or next(image_files(folder), None) is None


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunSource:
    """The rows of one run, its images by id ``r<number>-<index>``, its thumbnails and stored maps.

    The gallery is computed on the run's Arrow table (filter, sort, slice with ``pyarrow.compute``):
    only the rows of the page asked for become Python objects, so a run of a million rows answers a
    page in the time of one sort, without a copy of its rows in Python."""

    def __init__(self, folder: Union[str, "os.PathLike[str]", Run], number: int = 0) -> None:
        self.run = folder if isinstance(folder, Run) else open_run(folder)
        self.id = f"r{number}"
        self.name = self.run.folder.name
        self._classes: Optional[list[dict[str, Any]]] = None
        self._notes: Optional[list[str]] = None
        self._sprites: collections.OrderedDict[Path, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        # the thumbnails' URLs carry this (the page adds it): the browser keeps them an hour, and the
        # next server on the same port (--port 8000) numbers another run r0, whose rows must not show these
        self.version = secrets.token_hex(6)

    # ------------------------------------------------------------------ what the run holds

    def metric_columns(self) -> list[str]:
        """The ``method.statistic`` columns of numbers (not ``method.constant``'s lists: what the page
        says of them comes in the rows' ``warnings``)."""
        return number_columns(self.run.table)

    def count(self) -> int:
        """How many images the run has rows for (``len(run)``: a repeated index counted once, a row
        without an index not at all; a method, not ``len``: an empty run is still a source)."""
        return len(self.run)

    def _columns(self) -> list[str]:
        """The columns a row shows: the fixed ones the run has, then the metric columns."""
        names = self.run.table.column_names
        return [c for c in _SHOWN if c in names] + self.metric_columns()

    def sortable(self) -> list[str]:
        return [c for c in SORTABLE if c in self.run.table.column_names] + self.metric_columns()

    def classes(self) -> list[dict[str, Any]]:
        """The predicted classes of the run, ``{"index", "name"}`` by index (one group-by, read once)."""
        _, pc = _arrow()
        with self._lock:
            if self._classes is None:
                t = self.run.table
                if "predicted" not in t.column_names or t.num_rows == 0:
                    self._classes = []
                else:
                    cols = ["predicted"] + (["predicted_name"] if "predicted_name" in t.column_names else [])
                    pairs = t.select(cols).filter(pc.is_valid(t.column("predicted"))).group_by(cols).aggregate([])
                    names = pairs.column("predicted_name").to_pylist() if len(cols) == 2 else [None] * pairs.num_rows
                    self._classes = sorted(({"index": int(i), "name": n if n is not None else str(i)}
                                            for i, n in zip(pairs.column("predicted").to_pylist(), names)),
                                           key=lambda c: (c["index"], c["name"]))
            return self._classes

    def constant_notes(self) -> list[str]:
        """What the run's maps that are one value everywhere are (their thumbnails and stored maps
        flat pictures): the command line's end-of-run texts, :func:`salience.runs.job.constant_notes`
        (read once: a run's table does not change while it is served)."""
        with self._lock:
            if self._notes is None:
                self._notes = constant_notes(self.run.table, self.run.methods)
            return self._notes

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw the gallery: name, model, methods, columns, classes."""
        return {"id": self.id, "name": self.name, "folder": str(self.run.folder), "model": self.run.model,
                "methods": self.run.methods, "count": self.count(), "complete": self.run.complete,
                "labels": "correct" in self.run.table.column_names, "metrics": self.metric_columns(),
                "classes": self.classes(), "sortable": self.sortable(), "version": self.version}

    def _dicts(self, table: Any) -> list[dict[str, Any]]:
        """The rows of ``table`` (a few: a page) as the page's dicts, with ``id``, ``image``,
        ``constant`` (:meth:`_flat`), and the row's errors: ``method_errors`` (method -> what it said, for
        each method that refused the image or whose metrics did: its ``METHOD.error`` and
        ``METHOD.metrics_error`` columns) and ``other_error`` (the image's own, ``error``: the image or its
        mask not read; null), :meth:`~salience.runs.store.Run.errors_of` (a run of the older layout: its
        joined ``error`` read back); ``error`` is the image's own too."""
        flat = self._flat(table)
        out = []
        for r, f, (said, own) in zip(table.select(self._columns()).to_pylist(), flat, self.run.errors_of(table)):
            r = {c: _clean(v) for c, v in r.items()}
            r["id"] = f"{self.id}-{r['index']}"
            r["image"] = self._file(r) is not None
            r["constant"] = f
            r["method_errors"], r["other_error"] = said, own
            if "error" in r:
                r["error"] = own
            out.append(r)
        return out

    def _flat(self, table: Any) -> list[dict[str, list[dict[str, Any]]]]:
        """Per row of ``table``, its maps that are one value everywhere (flat pictures; a thumbnail, an
        ``<img>``, cannot say so itself): :func:`~salience.runs.job.flat_maps` (method -> ``[{"k", "class",
        "name", "value", "note"}]``), the run's class names for ``name``; ``index.html`` says the same."""
        return flat_maps(table, self.run.methods, self.run.manifest.get("class_names") or [])

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index`` (``KeyError`` when the run has none: rows without an index are no image's),
        found by :meth:`Run.position`; :class:`~salience.runs.store.BadIndex` when its table has several."""
        try:
            pos = self.run.position(int(index))
        except BadIndex:
            raise
        except SalienceError:
            raise KeyError(index) from None
        return self._dicts(self.run.table.slice(pos, 1))[0]

    def _file(self, row: dict[str, Any]) -> Optional[Union[Path, str]]:
        """The row's image: its URL when it is in object storage (``s3://...``, not looked up here:
        a page of rows would cost a request each; a missing object is an error when opened), else
        its file, the path as given (relative to where the run was started), else relative to the
        run folder's parent; ``None`` when neither is a file (a ``Dataset`` row)."""
        if row.get("path") is None:  # a table without paths (not written by salience explain)
            return None
        if remote.is_remote(row["path"]):
            return str(row["path"])
        p = Path(row["path"])
        for candidate in ([p] if p.is_absolute() else [p, self.run.folder.parent / p]):
            if candidate.is_file():
                return candidate.resolve()
        return None

    # ------------------------------------------------------------------ as an image source

    def entries(self) -> list[ImageEntry]:
        return []  # listed by rows(), not with the files (a run may hold a million rows)

    def find(self, image_id: str) -> Optional[ImageEntry]:
        """The image of id ``r<number>-<index>``, or ``None`` (not this run's, no such row, a
        ``Dataset`` row). A row whose file is gone is found: reading it is the error that says so."""
        prefix = self.id + "-"
        index = row_index(image_id[len(prefix):]) if image_id.startswith(prefix) else None
        if index is None:
            return None
        try:
            r = self.row(index)
        except KeyError:
            return None
        path = self._file(r)
        if path is None and (r.get("path") is None or _DATASET_ITEM.match(str(r["path"]))):
            return None  # a Dataset's item (``Class[i]``), or no path at all: no file to open
        if path is None:  # a file gone since the run (deleted or moved): reading it says so (ImageGone, 404)
            given = Path(r["path"])
            path = given if given.is_absolute() else self.run.folder.parent / given
        fields = {k: r[k] for k in ("index", "predicted_name", "probability") if k in r}
        if isinstance(path, str):  # an object: read through salience.loading.remote
            return ImageEntry(image_id, path.rstrip("/").rsplit("/", 1)[-1], self.id, None, fields, url=path)
        return ImageEntry(image_id, Path(r["path"]).name, self.id, path, fields)

    def missing(self, image_id: str) -> Optional[str]:
        """Why the id ``r<number>-<index>`` of this run opens no image (:meth:`find` gave ``None``),
        and what to do: no such row (the table's rows without an index may hold it: they are no
        image's, and the message says how to mend the table), a row of a ``Dataset`` (an item, no
        file: its stored thumbnail and maps are there), a row without a path; ``None`` when the id
        is not this run's."""
        prefix = self.id + "-"
        if not image_id.startswith(prefix):
            return None
        text = image_id[len(prefix):]
        index = row_index(text)
        if index is None:
            return (f"no image {image_id!r}: run {self.id!r}'s images are {self.id}-INDEX, INDEX a row's index "
                    f"written as a plain number ({text!r} is not); the rows are GET api/runs/{self.id}/rows")
        try:
            self.run.position(index)
        except BadIndex:
            raise
        except SalienceError as e:  # not in the run: it may be one of the rows without an index
            return f"no image {image_id!r}: {e}"
        r = self.run.row(index)
        stored = (f"its stored thumbnail and maps are GET api/runs/{self.id}/rows/{index}/thumb.jpg and "
                  f"api/runs/{self.id}/rows/{index}/maps/METHOD.npy")
        if r.get("path") is None:
            return (f"no image {image_id!r}: row {index} of run {self.id!r} names no image file (its table has no "
                    f"path); {stored}")
        return (f"no image {image_id!r}: row {index} of run {self.id!r} is the item {r['path']} of a Dataset, not an "
                f"image file, so there is no picture to open or explain live; {stored}")

    # ------------------------------------------------------------------ the gallery

    def rows(self, *, sort: str = "index", descending: bool = False, cls: Optional[str] = None,
             correct: Optional[bool] = None, min_probability: Optional[float] = None,
             max_probability: Optional[float] = None, metric: Optional[str] = None, low: Optional[float] = None,
             high: Optional[float] = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """The rows kept by the filters, sorted by ``sort``, ``limit`` of them from ``offset``, and the
        total kept. ``cls``: a predicted class (index or name); ``correct``: right / wrong (runs
        with labels); probability and ``metric`` (a ``method.statistic`` column) in ``[low, high]``.
        Rows without a value in the sort column (null, NaN, infinite) come last, by index; ties are
        broken by index (in the sort's direction). A bad column is a :class:`SalienceError`.

        Rows without an index, and the rows of an index that several rows share (a table written by
        hand or by another program: :meth:`_openable`), are left out: they cannot be opened;
        ``left_out`` then says how many rows, how many images (repeated index values) and why.

        Filter, sort and slice run on the Arrow table; only the page's rows become dicts."""
        t, left_out = self._openable()
        _, pc = _arrow()
        names = t.column_names
        sortable = self.sortable()
        if sort not in sortable:
            raise SalienceError(f"sort must be a column of the run ({', '.join(sortable)}), got {sort!r}")
        if metric is not None and metric not in self.metric_columns():
            raise SalienceError(f"metric must be a metric column of the run ({', '.join(self.metric_columns())}), "
                                f"got {metric!r}")
        if correct is not None and "correct" not in names:
            raise SalienceError("this run has no labels, so no right / wrong: run salience explain with --labels-csv")
        mask = _filter_mask(t, cls, correct, min_probability, max_probability, metric, low, high)
        kept = t if mask is None else t.filter(mask)
        has = _present(kept.column(sort))
        present, missing = kept.filter(has), kept.filter(pc.invert(has))
        total = present.num_rows + missing.num_rows
        end = max(min(offset + limit, total), offset)  # past the end: an empty page
        parts = []
        if offset < present.num_rows:  # the sorted rows: sort only their keys, take the page's positions
            way = "descending" if descending else "ascending"
            keys = [sort] + (["index"] if sort != "index" else [])
            order = pc.sort_indices(present.select(keys), sort_keys=[(k, way) for k in keys])
            stop = min(end, present.num_rows)
            parts.append(present.take(order.slice(offset, stop - offset)))
        if end > max(offset, present.num_rows):  # then the rows without a value, by index
            first = max(offset - present.num_rows, 0)
            order = pc.sort_indices(missing.select(["index"]), sort_keys=[("index", "ascending")])
            parts.append(missing.take(order.slice(first, end - present.num_rows - first)))
        rows = [r for part in parts for r in self._dicts(part)]
        out = {"run": self.id, "total": total, "offset": offset, "rows": rows}
        if left_out is not None:
            out["left_out"] = left_out
        return out

    def _openable(self) -> tuple[Any, Optional[dict[str, Any]]]:
        """The table less the rows the gallery cannot offer, and what was left out (``None``: nothing).

        A row without an index has no id (the other rows open as ever); the rows of an index that
        several rows share are each refused when opened (:class:`~salience.runs.store.BadIndex`:
        which one is the image cannot be known). ``left_out``: ``rows``, ``images`` (the repeated index values, which
        :meth:`count` counts and the gallery does not show; rows without an index are no image
        counted) and ``reason``: the table's refusals, which name the repeated values (the first
        ten) and what to do."""
        pa, pc = _arrow()
        t = self.run.table
        reasons, rows = [], 0
        unindexed = self.run.index_error()
        if unindexed is not None:
            rows += t.column("index").null_count
            t = t.filter(pc.is_valid(t.column("index")))
            reasons.append(str(unindexed))
        repeated = self.run.repeated()
        if len(repeated):
            keep = pc.invert(pc.is_in(t.column("index"), value_set=pa.array(repeated, pa.int64())))
            rows += t.num_rows
            t = t.filter(keep)
            rows -= t.num_rows
            reasons.append(str(self.run.repeat_error()))
        if not reasons:
            return t, None
        return t, {"rows": rows, "images": len(repeated), "reason": "; and ".join(reasons)}

    def thumbnail(self, index: int, tile: int = 0) -> bytes:
        """Row ``index``'s thumbnail as JPEG: ``tile`` 0 the image, ``1 + m`` method ``m``'s stored
        overlay (first target), cut from the run's sprite."""
        from salience.runs.job import SPRITE_COLUMNS, THUMB

        self.row(index)
        if not 0 <= tile <= len(self.run.methods):
            raise SalienceError(f"tile must be 0 (the image) to {len(self.run.methods)} (one per method), got {tile}")
        self._stored("thumbnails")
        path, pos = self.run.thumbnail(int(index))
        sprite = self._sprite(path)
        r, col = divmod(pos, SPRITE_COLUMNS)
        top = (r * (1 + len(self.run.methods)) + tile) * THUMB
        buf = io.BytesIO()
        sprite.crop((col * THUMB, top, (col + 1) * THUMB, top + THUMB)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def _sprite(self, path: Path) -> Any:
        from PIL import Image

        with self._lock:
            if path in self._sprites:
                self._sprites.move_to_end(path)
                return self._sprites[path]
        try:  # one open, without waiting, checked on its handle: a FIFO of the sprite's name (even one put there
            fd = open_regular(path)  # after a look) would block the server's thread in a plain open
        except FileNotFoundError:  # a link to nothing too
            raise self._not_stored(f"the run has no thumbnails for this row: {path} is missing") from None
        except OSError as e:  # not allowed: said as a file that cannot be read
            raise self._not_stored(f"the run's thumbnails for this row are damaged: {path} is not a readable "
                                   f"image ({type(e).__name__})") from None
        if fd is None:
            said = not_regular(path, "the run's thumbnails", "run the run's command again to write them")
            raise self._not_stored(f"the run's thumbnails for this row cannot be read: {said}")
        try:
            with os.fdopen(fd, "rb") as f, Image.open(f) as im:
                im = im.convert("RGB")
        except OSError as e:  # not an image (PIL's UnidentifiedImageError), or cut short
            raise self._not_stored(f"the run's thumbnails for this row are damaged: {path} is not a readable "
                                   f"image ({type(e).__name__})") from None
        with self._lock:
            self._sprites[path] = im
            while len(self._sprites) > 8:
                self._sprites.popitem(last=False)
        return im

    def stored_map(self, index: int, method: str, k: int = 0) -> np.ndarray:
        """Row ``index``'s stored map of ``method`` for target ``k``, ``(H, W)`` float32."""
        self.row(index)
        self._stored("maps")
        if method in self.run.methods:
            shard, _ = self.run._row_of(int(index))
            path = self.run.folder / "maps" / method / f"{shard}.npy"
            if not path.is_file():
                raise self._not_stored(f"the run has no stored {method} map for this row: {path} is missing")
        try:
            return self.run.map(int(index), method, k)
        except SalienceError:
            raise
        except (OSError, EOFError, ValueError, IndexError) as e:  # not an .npy of maps (empty: EOFError), cut short
            raise self._not_stored(f"the run's stored {method} maps for this row are damaged: {path} is not a "
                                   f"readable array of maps ({type(e).__name__})") from None

    def stored_map_note(self, index: int, method: str, k: int, stored: np.ndarray) -> Optional[str]:
        """What to say of row ``index``'s ``stored`` map of ``method`` for target ``k`` when its picture
        is one flat colour, else ``None``. The run's ``METHOD.constant`` column (judged on the float32
        map, before storage) says whether the map is constant: then
        :func:`~salience.render.viz.constant_map_note` of its value. A map it records as not constant
        whose stored (float16) map is one value everywhere was lost by the storage:
        :func:`~salience.runs.store.float16_note` (never the constant-map note's causes). A row of a
        run begun before that column (null) is judged on the stored map."""
        from salience.render import viz
        from salience.runs.store import float16_note

        column = f"{method}.constant"
        values = self.run.row(int(index)).get(column) if column in self.run.table.column_names else None
        if values is None or not 0 <= k < len(values):
            return viz.constant_map_note(stored)
        if values[k] is not None:
            return viz.constant_map_note(np.array([values[k]]))
        lost = viz.constant_value(stored)
        return None if lost is None else float16_note(lost, command=True)

    def _stored(self, what: str) -> None:
        """:class:`NotStored` when the run's table cannot say where a row's ``what`` are (no
        ``shard`` / ``offset`` columns: a table written by hand, or by another program)."""
        missing = [c for c in ("shard", "offset") if c not in self.run.table.column_names]
        if missing:
            raise self._not_stored(
                f"run {self.name!r} has no stored {what}: its table ({self.run.folder}) lacks the column"
                f"{'s' if len(missing) > 1 else ''} {' and '.join(repr(c) for c in missing)} that say where each "
                "row's thumbnails and maps are (was it written by salience explain DIR --out RUN?)")

    def _not_stored(self, message: str) -> NotStored:
        """The error for ``message``, said once in the server's log as a one-line warning."""
        with self._lock:
            first = message not in self._warned
            self._warned.add(message)
        if first:
            _log.warning("salience explore: %s", message)
        return NotStored(message)


def _arrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.compute (imported when a run is read: pyarrow comes with ``salience[runs]``)."""
    pa = pyarrow()
    import pyarrow.compute as pc

    return pa, pc


def _present(column: Any) -> Any:
    """Where ``column`` has a value: not null, and for floats finite (as the page shows NaN / inf: empty)."""
    pa, pc = _arrow()
    valid = pc.is_valid(column)
    if pa.types.is_floating(column.type):
        valid = pc.and_(valid, pc.fill_null(pc.is_finite(column), False))
    return valid


def _filter_mask(t: Any, cls: Optional[str], correct: Optional[bool], pmin: Optional[float], pmax: Optional[float],
                 metric: Optional[str], low: Optional[float], high: Optional[float]) -> Any:
    """The boolean mask of the rows the gallery's filters keep (``None``: no filter); a row whose
    filtered column has no value is left out."""
    pa, pc = _arrow()
    masks = []
    names = t.column_names
    if cls is not None:
        by_class = []
        if "predicted" in names:  # the class's index, as text (as the page's menu gives it)
            by_class.append(pc.equal(pc.cast(t.column("predicted"), pa.string()), cls))
        if "predicted_name" in names:
            by_class.append(pc.equal(t.column("predicted_name"), cls))
        if not by_class:
            return pa.array(np.zeros(t.num_rows, dtype=bool))
        masks.append(by_class[0] if len(by_class) == 1 else pc.or_kleene(*by_class))
    if correct is not None:
        masks.append(pc.equal(t.column("correct"), correct))
    for column, lo, hi in (("probability", pmin, pmax), (metric, low, high)):
        if column is None or (lo is None and hi is None):
            continue
        if column not in names:
            return pa.array(np.zeros(t.num_rows, dtype=bool))
        values = t.column(column)
        masks.append(_present(values))
        if lo is not None:
            masks.append(pc.greater_equal(values, lo))
        if hi is not None:
            masks.append(pc.less_equal(values, hi))
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = pc.and_kleene(out, m)
    return pc.fill_null(out, False)
