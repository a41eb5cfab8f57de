"""Dataset runs as a source of images: the rows of a run folder (``salience explain DIR --out RUN``).

A :class:`RunSource` wraps :func:`salience.open_run`: its rows are listed, sorted and filtered by
:meth:`RunSource.rows` (the page's gallery), and each row's image is reached by the id
``r<run>-<index>`` (``r0-17``) only, never by its path: the files that can be read are the
image paths the run's table names, nothing else. The run's thumbnails (its sprite files) and its
stored maps are read from the run folder by row. Rows are not listed by ``api/images`` (a run may
hold a million): :meth:`RunSource.entries` is empty and :meth:`RunSource.find` answers by id.
"""
from __future__ import annotations

import collections
import io
import math
import os
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from salience._core.errors import SalienceError
from salience.explore.images import ImageEntry
from salience.runs.store import Run, open_run

__all__ = ["RunSource", "is_run", "SORTABLE"]

SORTABLE = ("index", "predicted", "predicted_name", "probability", "label", "correct", "path")
"""Columns the gallery sorts by, besides every ``method.statistic`` column."""
_SHOWN = ("index", "path", "predicted", "predicted_name", "probability", "label", "correct", "error", "width",
          "height")


def is_run(path: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether ``path`` is a run folder (it holds ``run.json``)."""
    return Path(path).is_dir() and (Path(path) / "run.json").is_file()


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunSource:
    """The rows of one run, its images by id ``r<number>-<index>``, its thumbnails and stored maps."""

    def __init__(self, folder: Union[str, "os.PathLike[str]", Run], number: int = 0) -> None:
        self.run = folder if isinstance(folder, Run) else open_run(folder)
        self.id = f"r{number}"
        self.name = self.run.folder.name
        self._rows: Optional[list[dict[str, Any]]] = None
        self._by_index: dict[int, dict[str, Any]] = {}
        self._sprites: collections.OrderedDict[Path, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what the run holds

    def metric_columns(self) -> list[str]:
        return [c for c in self.run.table.column_names if "." in c]

    def describe(self) -> dict[str, Any]:
        """What the page needs to draw the gallery: name, model, methods, columns, classes."""
        rows = self.all_rows()
        classes = sorted({(r["predicted"], r["predicted_name"]) for r in rows if r.get("predicted") is not None})
        return {"id": self.id, "name": self.name, "folder": str(self.run.folder), "model": self.run.model,
                "methods": self.run.methods, "count": len(rows), "complete": self.run.complete,
                "labels": "correct" in self.run.table.column_names, "metrics": self.metric_columns(),
                "classes": [{"index": int(i), "name": n} for i, n in classes],
                "sortable": [c for c in SORTABLE if c in self.run.table.column_names] + self.metric_columns()}

    def all_rows(self) -> list[dict[str, Any]]:
        """Every row (the shown columns and the metric columns), read once."""
        with self._lock:
            if self._rows is None:
                t = self.run.table
                cols = [c for c in _SHOWN if c in t.column_names] + self.metric_columns()
                data = {c: t.column(c).to_pylist() for c in cols}
                self._rows = [{c: _clean(data[c][i]) for c in cols} for i in range(t.num_rows)]
                for r in self._rows:
                    r["id"] = f"{self.id}-{r['index']}"
                    r["image"] = self._file(r) is not None
                self._by_index = {int(r["index"]): r for r in self._rows}
            return self._rows

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index`` (``KeyError`` when the run has none)."""
        self.all_rows()
        return self._by_index[int(index)]

    def _file(self, row: dict[str, Any]) -> Optional[Path]:
        """The row's image file: its path as given (relative to where the run was started), else
        relative to the run folder's parent; ``None`` when neither is a file (a ``Dataset`` row)."""
        p = Path(row["path"])
        for candidate in ([p] if p.is_absolute() else [p, self.run.folder.parent / p]):
            if candidate.is_file():
                return candidate.resolve()
        return None

    # ------------------------------------------------------------------ as an image source

    def entries(self) -> list[ImageEntry]:
        return []  # listed by rows(), not with the files (a run may hold a million rows)

    def find(self, image_id: str) -> Optional[ImageEntry]:
        """The image of id ``r<number>-<index>``, or ``None`` (not this run's, no such row, no file)."""
        prefix = self.id + "-"
        if not image_id.startswith(prefix) or not image_id[len(prefix):].isdigit():
            return None
        try:
            r = self.row(int(image_id[len(prefix):]))
        except KeyError:
            return None
        path = self._file(r)
        if path is None:
            return None
        return ImageEntry(image_id, Path(r["path"]).name, self.id, path,
                          {k: r[k] for k in ("index", "predicted_name", "probability") if k in r})

    # ------------------------------------------------------------------ the gallery

    def rows(self, *, sort: str = "index", descending: bool = False, cls: Optional[str] = None,
             correct: Optional[bool] = None, min_probability: Optional[float] = None,
             max_probability: Optional[float] = None, metric: Optional[str] = None, low: Optional[float] = None,
             high: Optional[float] = None, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """The rows kept by the filters, sorted by ``sort``, ``limit`` of them from ``offset``, and the
        total kept. ``cls``: a predicted class (index or name); ``correct``: right / wrong (runs
        with labels); probability and ``metric`` (a ``method.statistic`` column) in ``[low, high]``.
        Rows without a value in the sort column come last; a bad column is a :class:`SalienceError`."""
        rows = self.all_rows()
        names = set(rows[0]) if rows else set(self.run.table.column_names)
        sortable = [c for c in SORTABLE if c in names] + self.metric_columns()
        if sort not in sortable:
            raise SalienceError(f"sort must be a column of the run ({', '.join(sortable)}), got {sort!r}")
        if metric is not None and metric not in self.metric_columns():
            raise SalienceError(f"metric must be a metric column of the run ({', '.join(self.metric_columns())}), "
                                f"got {metric!r}")
        if correct is not None and "correct" not in names:
            raise SalienceError("this run has no labels, so no right / wrong: run salience explain with --labels-csv")
        kept = [r for r in rows if _keep(r, cls, correct, min_probability, max_probability, metric, low, high)]
        present = [r for r in kept if r.get(sort) is not None]
        missing = [r for r in kept if r.get(sort) is None]
        present.sort(key=lambda r: (r[sort], r["index"]), reverse=descending)
        ordered = present + missing
        return {"run": self.id, "total": len(ordered), "offset": offset, "rows": ordered[offset:offset + limit]}

    def thumbnail(self, index: int, tile: int = 0) -> bytes:
        """Row ``index``'s thumbnail as JPEG: ``tile`` 0 the image, ``1 + m`` method ``m``'s stored
        overlay (first target), cut from the run's sprite."""
        from salience.runs.job import SPRITE_COLUMNS, THUMB

        self.row(index)
        if not 0 <= tile <= len(self.run.methods):
            raise SalienceError(f"tile must be 0 (the image) to {len(self.run.methods)} (one per method), got {tile}")
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
        if not path.is_file():
            raise SalienceError(f"the run has no thumbnails for this row ({path.name} is missing)")
        with Image.open(path) as im:
            im = im.convert("RGB")
        with self._lock:
            self._sprites[path] = im
            while len(self._sprites) > 8:
                self._sprites.popitem(last=False)
        return im

    def stored_map(self, index: int, method: str, k: int = 0) -> np.ndarray:
        """Row ``index``'s stored map of ``method`` for target ``k``, ``(H, W)`` float32."""
        self.row(index)
        return self.run.map(int(index), method, k)


def _keep(r: dict[str, Any], cls: Optional[str], correct: Optional[bool], pmin: Optional[float],
          pmax: Optional[float], metric: Optional[str], low: Optional[float], high: Optional[float]) -> bool:
    if cls is not None and cls != str(r.get("predicted")) and cls != r.get("predicted_name"):
        return False
    if correct is not None and r.get("correct") is not correct:
        return False
    p = r.get("probability")
    if (pmin is not None or pmax is not None) and p is None:
        return False
    if (pmin is not None and p < pmin) or (pmax is not None and p > pmax):
        return False
    if metric is not None and (low is not None or high is not None):
        v = r.get(metric)
        if v is None or (low is not None and v < low) or (high is not None and v > high):
            return False
    return True
