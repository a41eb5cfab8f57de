"""A small, self-contained HTML page builder for saliency reports (``salience demo``).

``Report`` collects sections (headings, paragraphs, tables, figures, raw HTML fragments) and
writes one ``index.html`` with inline CSS and no scripts. Images are linked by paths relative
to the page, so the output folder can be moved or zipped as a whole. Every text is escaped;
only :meth:`Report.raw` inserts HTML as it is (for fragments made by other salience modules).
The page is written atomically: a reader never sees half a file.
"""
from __future__ import annotations

import html
import numbers
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from salience._core.errors import SalienceError
from salience._core.files import atomic_write  # re-exported: salience writes files one way

__all__ = ["Report", "atomic_write"]

PathLike = Union[str, "os.PathLike[str]"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
figure{display:inline-block;margin:.6em .8em .6em 0;vertical-align:top}
figure img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}
figcaption{font-size:.85em;color:#444;max-width:40em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f4f4f4}.ok{color:#176f2c}.bad{color:#b00020}.note{color:#666;font-size:.9em}
"""


def _text(value: object, what: str, *, optional: bool = False) -> str:
    """``value`` if it is a string (``None`` as ``""`` where ``optional``), else a SalienceError."""
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise SalienceError(f"{what} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _path(value: object, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes):
        raise SalienceError(f"{what} must be a path (str or pathlib.Path), got {type(value).__name__} {value!r:.60}")
    return Path(value)


def _cells(row: object, what: str) -> list[str]:
    """A header or row of a table: a sequence of cells (not a string, whose letters would be the cells)."""
    if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
        raise SalienceError(f"{what} must be a list of cells, got {type(row).__name__} {row!r:.60}")
    return [html.escape(str(c)) for c in row]


class Report:
    """An HTML page built section by section; ``write(path)`` saves it.

    Image paths given to :meth:`figure` are made relative to the folder of the page at write
    time, so pass the paths where the images are (absolute or relative to the working folder).
    """

    def __init__(self, title: str, subtitle: Optional[str] = None):
        self.title = _text(title, "title")
        subtitle = _text(subtitle, "subtitle", optional=True)
        self._parts: list[tuple[str, object]] = []
        if subtitle:
            self.paragraph(subtitle, css="note")

    def heading(self, text: str) -> "Report":
        """A section heading."""
        text = _text(text, "heading")
        self._parts.append(("html", f"<h2>{html.escape(text)}</h2>"))
        return self

    def paragraph(self, text: str, *, css: Optional[str] = None) -> "Report":
        """A paragraph of plain text (escaped)."""
        text, css = _text(text, "paragraph"), _text(css, "css", optional=True)
        cls = f' class="{html.escape(css)}"' if css else ""
        self._parts.append(("html", f"<p{cls}>{html.escape(text)}</p>"))
        return self

    def table(self, header: Sequence[str], rows: Iterable[Sequence[object]]) -> "Report":
        """A table of plain-text cells."""
        head = "".join(f"<th>{h}</th>" for h in _cells(header, "the table's header"))
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
            raise SalienceError(f"rows must be a list of rows (lists of cells), got {type(rows).__name__}")
        body = "".join(
            "<tr>" + "".join(f"<td>{c}</td>" for c in _cells(row, f"row {i}")) + "</tr>" for i, row in enumerate(rows)
        )
        self._parts.append(("html", f"<table><tr>{head}</tr>{body}</table>"))
        return self

    def figure(self, image: PathLike, caption: str = "", *, css: Optional[str] = None,
               width: Optional[int] = None) -> "Report":
        """An image (linked relative to the page) with a caption; ``width`` in pixels (an int > 0)."""
        caption, css = _text(caption, "caption", optional=True), _text(css, "css", optional=True)
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width <= 0):
            raise SalienceError(f"width must be a number of pixels (an int > 0) or None, got {width!r}")
        self._parts.append(("figure", (_path(image, "the figure's image"), caption, css, width)))
        return self

    def raw(self, fragment: str) -> "Report":
        """An HTML fragment inserted as it is (trusted: made by salience itself)."""
        fragment = _text(fragment, "fragment")
        self._parts.append(("html", fragment))
        return self

    def fragment(self, base: PathLike = ".") -> str:
        """The sections alone (no page, no title), for another page to insert with :meth:`raw`;
        image links relative to the folder ``base``."""
        base_path = _path(base, "base").resolve()
        out = []
        for kind, value in self._parts:
            if kind == "html":
                out.append(str(value))
                continue
            path, caption, css, width = value  # type: ignore[misc]
            rel = Path(os.path.relpath(Path(path).resolve(), base_path)).as_posix()
            src = html.escape(rel, quote=True)
            w = f' width="{int(width)}"' if width else ""
            cls = f' class="{html.escape(css)}"' if css else ""
            cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
            out.append(f'<figure{cls}><img src="{src}" alt="{html.escape(caption, quote=True)}"{w}>{cap}</figure>')
        return "\n".join(out)

    def render(self, base: PathLike = ".") -> str:
        """The page as a string; image links relative to the folder ``base``."""
        head = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        body = self.fragment(base)
        return "\n".join(head + ([body] if body else []) + ["</body></html>\n"])

    def write(self, path: PathLike) -> Path:
        """Write the page to ``path`` atomically; returns the path."""
        p = _path(path, "path")
        atomic_write(p, self.render(p.parent).encode("utf-8"))
        return p
