"""``RUN/index.html``: a static gallery of a run, opened from disk with no server.

One page, plain JavaScript inline (no CDN, nothing fetched): the rows are embedded as JSON; the
table sorts by any column (click its header), filters by class, right / wrong / failed,
confidence and any numeric column (a metric or a summary) between two bounds, and shows a page
of rows at a time. Thumbnails are tiles of the shard sprites (``thumbs/<shard>.jpg``), set as a
row's background only when the row scrolls into view (``IntersectionObserver``), so a page of a
100,000-image run loads only what is seen.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from salience._core.files import atomic_write
from salience.runs.job import constant_maps, constant_notes, flat_maps
from salience.runs.store import PAGE, Run, check_manifest, number_columns

_COLUMNS = ("index", "path", "predicted", "predicted_name", "probability", "output_name", "value", "targets", "label",
            "label_name", "correct", "error", "constant", "shard", "offset")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


Flat = list[dict[str, list[dict[str, Any]]]]


def _flat(run: Run, flat: Optional[Flat]) -> Flat:
    return flat if flat is not None else flat_maps(run.table, run.methods, run.manifest.get("class_names") or [])


def predicted_names(run: Run) -> dict[int, str]:
    """Class index -> the name the run's rows give it as a prediction (``predicted_name``): what the explorer's
    gallery names a class by where the run has no ``class_names`` (its ``classes``, one name per predicted
    class; where rows gave one class several names, the last in order, as the explorer's page keeps)."""
    table = run.table
    if "predicted" not in table.column_names or "predicted_name" not in table.column_names:
        return {}
    out: dict[int, str] = {}
    for i, n in zip(table.column("predicted").to_pylist(), table.column("predicted_name").to_pylist()):
        if i is not None and n is not None and (i not in out or n > out[i]):
            out[int(i)] = n
    return out


def _class_name(f: dict[str, Any], predicted: dict[int, str]) -> Any:
    """A flat map's class as the explorer's gallery names it: the run's class name, else the name its rows
    predicted it by, else its index (else None: the row does not say)."""
    if f["name"] is not None:
        return f["name"]
    return predicted.get(f["class"], f["class"]) if f["class"] is not None else None


def _or(v: Any, default: Any) -> Any:
    return default if v is None else v


def constant_cells(run: Run, flat: Optional[Flat] = None) -> list[Optional[str]]:
    """Per row, the text of the page's ``constant`` column: the row's maps that are one value everywhere
    (the ``METHOD.constant`` columns, :func:`~salience.runs.job.flat_maps`), ``METHOD`` for the thumbnail's
    target and ``METHOD (class NAME)`` for a later one (named as :func:`flat_json` names it), joined by
    ``"; "``; None where no map is constant."""
    predicted = predicted_names(run)
    out: list[Optional[str]] = []
    for found in _flat(run, flat):
        said = [name if f["k"] == 0 else f"{name} (class {_or(_class_name(f, predicted), '?')})"
                for name in run.methods for f in found.get(name, [])]
        out.append("; ".join(said) or None)
    return out


def rows_json(run: Run, flat: Optional[Flat] = None) -> str:
    """The run's rows as a JSON list of lists (columns in :func:`columns`), safe inside ``<script>``
    (:func:`script_json`). ``flat``: the run's :func:`~salience.runs.job.flat_maps`, where already read."""
    table = run.table
    flat = _flat(run, flat)
    cols = columns(run, flat)
    data = {c: table.column(c).to_pylist() for c in cols if c in table.column_names}
    if "label_name" in cols:  # the page's own column: the class filter compares names
        names = run.manifest.get("class_names") or []
        data["label_name"] = [None if v is None else names[v] if 0 <= v < len(names) else str(v) for v in data["label"]]
    if "constant" in cols:  # the page's own column: which maps of the row are one value everywhere
        data["constant"] = constant_cells(run, flat)
    if "error" in data:  # the image's own (a run of the older layout joined the methods' there too)
        data["error"] = [own for _, own in run.errors_of()]
    rows = [[_clean(data[c][i]) if c in data else None for c in cols] for i in range(table.num_rows)]
    return script_json(rows)


def refused_json(run: Run) -> str:
    """The methods that refused a row's image (its ``METHOD.error`` and ``METHOD.metrics_error`` columns:
    :meth:`~salience.runs.store.Run.errors_of`), said under their (blank) thumbnails as the explorer's
    gallery says them, as JSON safe inside ``<script>``: ``{position: [[method, text], ...]}``, ``position``
    the row's in :func:`rows_json`, ``method`` an index in the run's methods."""
    rows: dict[str, list[list[Any]]] = {}
    for i, (said, _) in enumerate(run.errors_of()):
        if said:
            rows[str(i)] = [[m, said[name]] for m, name in enumerate(run.methods) if name in said]
    return script_json(rows)


def flat_json(run: Run, flat: Optional[Flat] = None) -> str:
    """The run's maps that are one value everywhere, said under their thumbnails as the explorer's
    gallery says them (:func:`salience.runs.job.flat_maps`), as JSON safe inside ``<script>``:
    ``{"notes": [...], "rows": {position: [[method, k, class name, value, note], ...]}}``, the class named
    as the explorer names it (the run's class names, else the name the rows predicted it by,
    :func:`predicted_names`, else its index, else null), ``position`` the row's in :func:`rows_json`,
    ``method`` an index in the run's methods, ``note`` an index in ``notes`` (one copy of each: a run of an
    untrained model has a flat map on every row)."""
    notes: dict[str, int] = {}
    rows: dict[str, list[list[Any]]] = {}
    predicted = predicted_names(run)
    for i, found in enumerate(_flat(run, flat)):
        said = [[m, f["k"], _class_name(f, predicted), f["value"], notes.setdefault(f["note"], len(notes))]
                for m, name in enumerate(run.methods) for f in found.get(name, [])]
        if said:
            rows[str(i)] = said
    return script_json({"notes": list(notes), "rows": rows})


def script_json(value: Any) -> str:
    """``value`` as JSON to embed in an inline ``<script>``: ``<``, ``>`` and ``&`` written as
    ``\\u003c`` ... (the same string to JSON and JavaScript), so that no file name can close the
    script (``</script>``) or put the HTML parser in its escaped states (``<!--``, ``<script``)."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def columns(run: Run, flat: Optional[Flat] = None) -> list[str]:
    """The page's columns: the table's, with ``label_name`` (the label's class name) after ``label``, and
    ``constant`` (:func:`constant_cells`) after ``error`` where a map of the run is one value everywhere."""
    names = run.table.column_names + (["label_name"] if "label" in run.table.column_names else [])
    if any(_flat(run, flat)):
        names = names + ["constant"]
    return [c for c in _COLUMNS if c in names] + number_columns(run.table)


def write(folder: Path) -> Path:
    """Write ``folder/index.html`` for the run in ``folder``; returns its path."""
    run = Run(folder)
    m = check_manifest(run.folder / "run.json", run.manifest, PAGE)  # the thumbnails' size and layout, k
    found = constant_maps(run.table, run.methods)  # one walk: said as text above the table and under each row
    flat = flat_maps(run.table, run.methods, m.get("class_names") or [], found)  # read once, for the three
    about = {"columns": columns(run, flat), "methods": run.methods, "thumb": m["thumb"], "per": m["sprite_columns"],
             "model": run.model, "k": m["k"]}
    title = html.escape(f"salience run: {run.model}, {len(run)} images")
    warned = "".join(f'<p class="warn">{html.escape("warning: " + t)}</p>\n'
                     for t in constant_notes(run.table, run.methods, found=found))  # the flat pictures said, as text
    parts = {"TITLE": title, "WARNINGS": warned, "ABOUT": script_json(about), "ROWS": rows_json(run, flat),
             "FLAT": flat_json(run, flat), "REFUSED": refused_json(run)}
    # one pass: a placeholder inside a part (a model or file named __ROWS__) stays as it is
    page = re.sub(r"__(TITLE|WARNINGS|ABOUT|ROWS|FLAT|REFUSED)__", lambda m: parts[m.group(1)], _PAGE)
    return atomic_write(folder / "index.html", page.encode("utf-8"))


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}th.sorted:after{content:" \25B4"}th.desc:after{content:" \25BE"}
.tile{display:inline-block;vertical-align:top;margin:0 2px 2px 0}.t{display:block;background-color:#eee;background-repeat:no-repeat}
.flat{color:#8a4b00;font-size:11px;overflow-wrap:anywhere}.refused{font-size:11px;overflow-wrap:anywhere}
.bad{color:#b00}.ok{color:#070}.err{color:#b00;font-size:12px}.warn{color:#8a4b00;max-width:60em}
#filters label{margin-right:1em}#nav{margin:.5em 0}
</style></head><body>
<h1>__TITLE__</h1>
__WARNINGS__<div id="filters">
<label>class <select id="cls"><option value="">all</option></select></label>
<label>prediction <select id="rw"><option value="">all</option><option value="right">right</option>
<option value="wrong">wrong</option><option value="error">failed</option></select></label>
<label>confidence <input id="pmin" type="number" step="0.01" min="0" max="1" placeholder="min" size="5">
- <input id="pmax" type="number" step="0.01" min="0" max="1" placeholder="max" size="5"></label>
<label>column <select id="mcol"></select> <input id="mmin" type="number" step="any" placeholder="min" size="7">
- <input id="mmax" type="number" step="any" placeholder="max" size="7"></label>
<label>path <input id="q" placeholder="contains" size="12"></label>
<label id="flatf">maps <select id="fl"><option value="">all</option><option value="constant">a constant one</option>
<option value="varying">none constant</option></select></label>
</div>
<div id="nav"></div>
<table><thead><tr id="head"></tr></thead><tbody id="body"></tbody></table>
<script>
"use strict";
const ABOUT = __ABOUT__;
const ROWS = __ROWS__;
const FLATS = __FLAT__, FLAT = new Map(Object.entries(FLATS.rows).map(([i, f]) => [ROWS[+i], f]));
const REFUSED = new Map(Object.entries(__REFUSED__).map(([i, f]) => [ROWS[+i], f]));
const C = {}; ABOUT.columns.forEach((c, i) => C[c] = i);
const PAGE = 100, T = ABOUT.thumb, tiles = 1 + ABOUT.methods.length;
let sortCol = "index", desc = false, page = 0, shown = [];
const $ = id => document.getElementById(id);
const numeric = ABOUT.columns.filter(c => c.includes(".") || c === "probability" || c === "value");
numeric.forEach(c => $("mcol").add(new Option(c, c)));
const classes = [...new Set((C.predicted_name !== undefined ? ROWS.map(r => r[C.predicted_name]) : []).concat(
  C.label_name !== undefined ? ROWS.map(r => r[C.label_name]) : []).filter(v => v !== null))].sort();
classes.forEach(c => $("cls").add(new Option(String(c), String(c))));
if (C.constant === undefined) $("flatf").hidden = true;  // no map of the run is constant
const headers = ["thumbnails"].concat(ABOUT.columns.filter(c => c !== "shard" && c !== "offset"));
headers.forEach(c => { const th = document.createElement("th"); th.textContent = c; th.dataset.col = c;
  if (c !== "thumbnails") th.onclick = () => { desc = sortCol === c ? !desc : false; sortCol = c; page = 0; render(); };
  $("head").appendChild(th); });
function num(v) { return v === "" || v === null ? null : Number(v); }
function keep(r) {
  const cls = $("cls").value, rw = $("rw").value, q = $("q").value;
  if (cls && String(r[C.predicted_name]) !== cls && (C.label_name === undefined || String(r[C.label_name]) !== cls))
    return false;
  if (rw === "error" && r[C.error] === null && !REFUSED.has(r)) return false;  // the image's error, or a method's
  if (rw === "right" && r[C.correct] !== true) return false;
  if (rw === "wrong" && (r[C.correct] !== false)) return false;
  const p = r[C.probability], pmin = num($("pmin").value), pmax = num($("pmax").value);
  if (pmin !== null && !(p >= pmin)) return false; if (pmax !== null && !(p <= pmax)) return false;
  const mc = $("mcol").value, v = r[C[mc]], mmin = num($("mmin").value), mmax = num($("mmax").value);
  if (mmin !== null && !(v >= mmin)) return false; if (mmax !== null && !(v <= mmax)) return false;
  if (q && !String(r[C.path]).includes(q)) return false;
  const fl = $("fl").value;
  if (fl === "constant" && r[C.constant] === null) return false;
  if (fl === "varying" && r[C.constant] !== null) return false;
  return true;
}
function cmp(a, b) {
  const i = C[sortCol], x = a[i], y = b[i];
  if (x === y) return a[C.index] - b[C.index];
  if (x === null) return 1; if (y === null) return -1;
  const r = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
  return desc ? -r : r;
}
const seen = new IntersectionObserver(es => es.forEach(e => { if (e.isIntersecting) {
  const d = e.target; d.style.backgroundImage = `url("thumbs/${d.dataset.shard}.jpg")`; seen.unobserve(d); } }));
function thumbs(r) {
  const o = r[C.offset], col = o % ABOUT.per, row = Math.floor(o / ABOUT.per), box = document.createElement("span");
  for (let j = 0; j < tiles; j++) { const tile = document.createElement("span"), d = document.createElement("span");
    tile.className = "tile"; tile.dataset.tile = j; tile.style.width = T + "px"; d.className = "t";
    d.style.width = d.style.height = T + "px"; d.dataset.shard = r[C.shard];
    d.title = j === 0 ? "image" : ABOUT.methods[j - 1];
    d.style.backgroundPosition = `-${col * T}px -${(row * tiles + j) * T}px`; tile.appendChild(d); seen.observe(d);
    // a method's maps that are one value everywhere (METHOD.constant; its tile is a flat colour and cannot
    // say why): said under its thumbnail as text, as the explorer's gallery says them; the whole note on hover
    for (const [m, k, name, value, note] of FLAT.get(r) || []) if (m === j - 1) { const f = document.createElement("div");
      f.className = "flat"; f.title = FLATS.notes[note];
      f.textContent = `${k === 0 ? "" : `class ${name ?? "?"}: `}constant map (${value})`; tile.appendChild(f); }
    // a method that refused the image: why, under its blank tile (its METHOD.error column says it too)
    for (const [m, text] of REFUSED.get(r) || []) if (m === j - 1) { const f = document.createElement("div");
      f.className = "err refused"; f.title = text; f.textContent = `failed: ${text}`; tile.appendChild(f); }
    box.appendChild(tile); }
  return box;
}
function cell(c, v) {
  const td = document.createElement("td");
  if (v === null || v === undefined) td.textContent = "";
  else if (typeof v === "number" && !Number.isInteger(v)) td.textContent = v.toPrecision(4);
  else td.textContent = Array.isArray(v) ? v.join(",") : String(v);
  if (c === "correct" && v !== null) td.className = v ? "ok" : "bad";
  if (c === "error") td.className = "err";
  if (c === "constant" && v !== null) {  // the row's maps that are one value everywhere (METHOD.constant): a marker
    td.className = "warn"; td.textContent = "\u26A0 " + td.textContent;
    td.title = "maps that are one value everywhere (a flat picture); the note under each thumbnail says why"; }
  return td;
}
function render() {
  shown = ROWS.filter(keep).sort(cmp);
  document.querySelectorAll("th").forEach(th => th.className = th.dataset.col === sortCol ? (desc ? "sorted desc" : "sorted") : "");
  const pages = Math.max(1, Math.ceil(shown.length / PAGE)); page = Math.min(page, pages - 1);
  const nav = $("nav"); nav.textContent = `${shown.length} of ${ROWS.length} images; page ${page + 1} of ${pages} `;
  [["previous", -1], ["next", 1]].forEach(([t, d]) => { const b = document.createElement("button"); b.textContent = t;
    b.onclick = () => { page = Math.min(pages - 1, Math.max(0, page + d)); render(); }; nav.appendChild(b); });
  const body = $("body"); body.textContent = "";
  for (const r of shown.slice(page * PAGE, (page + 1) * PAGE)) {
    const tr = document.createElement("tr"), td = document.createElement("td");
    // a method's refusal (its METHOD.error, said under its tile) leaves the image and the other methods' tiles
    // (its own a blank grey), and so does its mask not read (the row's error, its targets explained); an image that
    // could not be read (the row's own error, no targets) has none
    if (r[C.error] === null || (C.targets !== undefined && r[C.targets] !== null)) td.appendChild(thumbs(r));
    tr.appendChild(td);
    headers.slice(1).forEach(c => tr.appendChild(cell(c, r[C[c]]))); body.appendChild(tr);
  }
}
["cls", "rw", "pmin", "pmax", "mcol", "mmin", "mmax", "q", "fl"].forEach(id => $(id).oninput = () => { page = 0; render(); });
render();
</script></body></html>
"""
