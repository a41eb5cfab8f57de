// salience explore: the page. Plain JS, no build step; every URL is relative (works behind proxies).
"use strict";

const S = {
  info: null, image: null, broken: null, pictures: {}, picturesOf: null, targets: [], rows: [], cells: new Map(), luts: {}, layers: {},
  display: { opacity: 0.6, cmap: "fire", mode: "abs", clip: 99 }, nextRow: 1, picks: 0,
};
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
};

// A keyboard handler for an element that acts on click: Enter or Space does the same (with tabindex="0"
// and role="button", so the thumbnails and the gallery's rows are reached and opened with the keyboard).
const pressed = (fn) => (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fn(); } };

function status(text, error = false) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function api(path, options = {}) {
  const r = await fetch(path, options);
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.arrayBuffer();
  if (!r.ok) throw Object.assign(new Error((body && body.error) || `${r.status} ${r.statusText}`), { status: r.status });
  return body;
}

// ------------------------------------------------------------------ start

async function start() {
  S.info = await api("api/info");
  $("models").textContent = S.info.models.map((m) => `${m.slot}: ${m.name}`).join("  vs  ");
  for (const name of S.info.colormaps) $("cmap").append(el("option", { value: name }, name));
  $("cmap").value = S.display.cmap;
  for (const name of Object.keys(S.info.methods)) $("method").append(el("option", { value: name }, name));
  $("method").value = Object.keys(S.info.methods).includes("gradcam") ? "gradcam" : $("method").value;
  await Promise.all(S.info.colormaps.map(async (n) => { S.luts[n] = (await api(`api/colormaps/${n}`)).lut; }));
  bindControls();
  await listImages();
  if (S.info.runs && S.info.runs.length) await startRuns();
  status("ready");
}

function bindControls() {
  // files are taken when dropped anywhere on the page (a drop beside the box was the browser's: it
  // replaced the page by the file, losing everything on it), every file dropped or chosen
  const drop = $("drop");
  const files = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  // the box is lit while files are dragged over the page. A count of the elements entered and not
  // yet left (dragenter +1, dragleave -1; entering a child comes before leaving its parent) keeps it
  // lit over the box's own children; it goes out when the count is back to 0, when the drag leaves
  // the window (a dragleave with no relatedTarget), on a drop or a dragend, at the first mouse move
  // after the drag, and QUIET ms after the last dragenter / dragover: a drag cancelled over the page
  // (Escape) may send nothing at all (Chromium: no dragleave, no dragend; no mouse event until the
  // pointer moves), so without that timer the box stayed lit. A pointer resting without a move may
  // get no dragover either (X11, Wayland): the box goes out then too and is lit again by the next one
  // (the timer keeps the count, which the next mouse move or a dragleave from the window resets).
  const QUIET = 1000;
  let depth = 0, quiet = 0;
  const unlit = () => { depth = 0; clearTimeout(quiet); drop.classList.remove("over"); };
  const lit = () => {
    clearTimeout(quiet);
    quiet = setTimeout(() => drop.classList.remove("over"), QUIET);
    drop.classList.add("over");
  };
  document.addEventListener("dragenter", (e) => { if (files(e)) { depth += 1; lit(); } });
  document.addEventListener("dragover", (e) => { if (files(e)) { e.preventDefault(); lit(); } });
  document.addEventListener("dragleave", (e) => {
    depth = Math.max(0, depth - 1);
    if (!depth || !e.relatedTarget) unlit();
  });
  document.addEventListener("dragend", unlit);
  window.addEventListener("mousemove", () => { if (depth || drop.classList.contains("over")) unlit(); });
  document.addEventListener("drop", (e) => {
    unlit();
    if (!files(e)) return;
    e.preventDefault();
    uploadAll([...e.dataTransfer.files]);
  });
  $("file").addEventListener("change", (e) => { uploadAll([...e.target.files]); e.target.value = ""; });
  $("add").addEventListener("click", () => addRow($("method").value));
  const redraw = () => {
    S.display = { opacity: +$("opacity").value, cmap: $("cmap").value, mode: $("mode").value, clip: +$("clip").value };
    $("opacity-out").textContent = S.display.opacity; $("clip-out").textContent = S.display.clip;
    for (const c of S.cells.values()) draw(c);
    figureLink();
  };
  for (const id of ["opacity", "cmap", "mode", "clip"]) $(id).addEventListener("input", redraw);
}

// ------------------------------------------------------------------ images

// A thumbnail that cannot be read (the file deleted, a 404) is drawn as a marked empty box, never
// the browser's broken-image icon; clicking it still picks the image, whose error the page then shows.
function gone(ev) {
  const img = ev.target;
  img.removeAttribute("src");
  img.classList.add("gone");
  img.title = `${img.title ? img.title + ": " : ""}cannot be read (gone from disk or storage?)`;
}

async function listImages() {
  const { images } = await api("api/images");
  const box = $("images"); box.textContent = "";
  for (const im of images) {
    box.append(el("img", { src: `api/images/${im.id}/picture.png?slot=a`, title: im.name, "data-id": im.id,
                           class: S.image === im.id ? "current" : "", onclick: () => pick(im.id),
                           onerror: gone, tabindex: "0", role: "button", alt: im.name,
                           onkeydown: pressed(() => pick(im.id)) }));
  }
}

// Each file uploaded in turn; the first that the server takes is opened. A file refused is named in the
// status (the others still go up).
async function uploadAll(list) {
  let first = null;
  const refused = [];
  for (const file of list) {
    status(`uploading ${file.name}…`);
    try {
      const im = await api(`api/images?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
      first = first || im.id;
    } catch (e) { refused.push(e.message.startsWith(`${file.name}:`) ? e.message : `${file.name}: ${e.message}`); }
  }
  if (first) { await listImages(); await pick(first); }
  if (refused.length) status(refused.join("; "), true);
}

// The picture of image `id` as model `slot` sees it, loaded; an Error with the server's message
// when there is none (e.g. 404: the image is gone from disk or storage), never a broken <img>.
async function loadPicture(id, slot) {
  const blob = new Blob([await api(`api/images/${id}/picture.png?slot=${slot}`)], { type: "image/png" });
  const img = new Image();
  await new Promise((ok, fail) => {
    img.onload = ok; img.onerror = () => fail(new Error(`image ${id}: the picture cannot be shown`));
    img.src = URL.createObjectURL(blob);
  });
  return img;
}

// Each pick has its own ticket: only the latest pick draws. Comparing image ids is not enough: after
// picking A, B, then A again, the first pick of A would pass as the latest and fill the classes twice.
async function pick(id) {
  const ticket = ++S.picks;
  const stale = () => ticket !== S.picks;
  S.image = id;
  for (const img of $("images").children) img.classList.toggle("current", img.dataset.id === id);
  for (const tr of $("run-body").children) tr.classList.toggle("current", tr.dataset.id === id);
  const pictures = {}, failed = [];
  await Promise.all(S.info.models.map(async (m) => {
    try { pictures[m.slot] = await loadPicture(id, m.slot); } catch (e) { failed.push(e.message); }
  }));
  const free = (pics) => { for (const img of Object.values(pics)) URL.revokeObjectURL(img.src); };
  if (stale()) { free(pictures); return; } // another image was picked meanwhile: its own pick draws
  free(S.pictures);
  S.pictures = pictures; S.picturesOf = id; S.broken = failed.length ? failed[0] : null;
  for (const c of S.cells.values()) draw(c); // the new picture; a map of the image before is not laid on it
  $("picked").hidden = false;
  $("preview").hidden = !!S.broken; $("picture-error").hidden = !S.broken;
  $("picture-error").textContent = S.broken || "";
  if (S.broken) $("preview").removeAttribute("src"); else $("preview").src = S.pictures.a.src;
  const box = $("classes"); box.textContent = "";
  if (S.broken) { // no picture: no classes, and every map cell says why instead of computing
    status(`image ${id}: ${S.broken}`, true);
    for (const c of S.cells.values()) request(c);
    figureLink();
    return;
  }
  for (const m of S.info.models) {
    box.append(el("h3", {}, `${m.slot}: ${m.name}`));
    try {
      const { classes } = await api(`api/models/${m.slot}/top?image=${id}&k=5`);
      if (stale()) return;
      for (const c of classes) {
        const p = c.probability === null ? c.score.toFixed(3) : `${(100 * c.probability).toFixed(1)}%`;
        box.append(el("button", { class: "class", "data-model": m.slot, "data-index": c.index,
                                  onclick: () => addTarget(m.slot, c.index, c.name) }, el("span", {}, c.name), el("span", {}, p)));
      }
    } catch (e) { if (stale()) return; box.append(el("div", { class: "error" }, e.message)); }
  }
  status(`image ${id}`);
  refreshAll();
}

// ------------------------------------------------------------------ dataset runs (the gallery)

const NUMBERS = { "run-pmin": "probability min", "run-pmax": "probability max", "run-min": "metric min", "run-max": "metric max" };
const R = { runs: [], run: null, offset: 0, limit: 50, total: 0, asked: 0, failed: null, page: new AbortController() };

async function startRuns() {
  R.runs = (await api("api/runs")).runs;
  $("gallery").hidden = false;
  for (const r of R.runs) $("run").append(el("option", { value: r.id }, `${r.name} (${r.count})`));
  $("run").addEventListener("change", () => chooseRun($("run").value));
  for (const id of ["run-sort", "run-order", "run-class", "run-correct", "run-pmin", "run-pmax", "run-metric", "run-min", "run-max"])
    $(id).addEventListener("change", () => { R.offset = 0; if (id === "run-metric") metricBounds(); listRows(); });
  // a number field holding what is not a number ("1e") has the value "" and fires no change: the
  // table would go on showing rows as if no bound were set; left or entered, the table says so
  for (const id of Object.keys(NUMBERS)) {
    const check = () => { if ($(id).validity.badInput) listRows(); };
    $(id).addEventListener("blur", check);
    $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") check(); });
  }
  $("run-prev").addEventListener("click", () => { R.offset = Math.max(0, R.offset - R.limit); listRows(); });
  $("run-next").addEventListener("click", () => { if (R.offset + R.limit < R.total) { R.offset += R.limit; listRows(); } });
  await chooseRun(R.runs[0].id);
}

// the metric's min / max apply to the metric chosen: with none ("—") they are emptied and off (they
// kept their numbers, shown but not applied)
function metricBounds() {
  const on = $("run-metric").value !== "";
  for (const id of ["run-min", "run-max"]) { $(id).disabled = !on; if (!on) $(id).value = ""; }
}

// Another run keeps the gallery's settings that apply to it (sort column, class, metric and their
// bounds when it has them; order; probability when it has the column; right / wrong when it has
// labels); what does not apply is reset and, for a filter, off (an off filter is never sent).
async function chooseRun(id) {
  const before = { sort: $("run-sort").value, cls: $("run-class").value, metric: $("run-metric").value };
  R.run = R.runs.find((r) => r.id === id); R.offset = 0;
  const r = R.run;
  $("run-about").textContent = `${r.folder}: ${r.count} images, model ${r.model}, methods ${r.methods.join(", ")}${r.complete ? "" : " (not finished)"}`;
  const fill = (sel, first, values) => { sel.textContent = ""; if (first) sel.append(el("option", { value: "" }, first));
    for (const [v, label] of values) sel.append(el("option", { value: v }, label)); };
  fill($("run-sort"), null, r.sortable.map((c) => [c, c]));
  fill($("run-class"), "any", r.classes.map((c) => [c.name, c.name]));
  fill($("run-metric"), "—", r.metrics.map((c) => [c, c]));
  const keep = (sel, v) => { if ([...sel.options].some((o) => o.value === v)) sel.value = v; };
  keep($("run-sort"), before.sort); keep($("run-class"), before.cls); keep($("run-metric"), before.metric);
  metricBounds();
  $("run-correct").disabled = !r.labels;
  if (!r.labels) $("run-correct").value = "";
  for (const f of ["run-pmin", "run-pmax"]) {
    $(f).disabled = !r.sortable.includes("probability");
    if ($(f).disabled) $(f).value = "";
  }
  const head = ["image", ...r.methods.map((m) => `${m} (stored)`), "#", "file", "class", "probability",
                ...(r.labels ? ["label", "right"] : []), ...r.metrics];
  $("run-head").textContent = "";
  $("run-head").append(el("tr", {}, ...head.map((h) => el("th", {}, h))));
  await listRows();
}

async function listRows() {
  const r = R.run, q = new URLSearchParams({ sort: $("run-sort").value || "index", order: $("run-order").value,
                                            offset: R.offset, limit: R.limit });
  const add = (k, id) => { if (!$(id).disabled && $(id).value !== "") q.set(k, $(id).value); };
  add("class", "run-class"); add("correct", "run-correct"); add("min_probability", "run-pmin");
  add("max_probability", "run-pmax");
  if ($("run-metric").value) { q.set("metric", $("run-metric").value); add("min", "run-min"); add("max", "run-max"); }
  // answers can arrive out of order when filters change quickly: only the latest request draws
  const asked = ++R.asked;
  let found;
  const body = $("run-body");
  // a bound that is not a number, or outside its field's range (probability -1), is not sent: the table says so
  const wrong = (f) => f.disabled ? null : f.validity.badInput ? "not a number"
    : !(f.validity.rangeUnderflow || f.validity.rangeOverflow) ? null
    : f.min !== "" && f.max !== "" ? `must be from ${f.min} to ${f.max}` : f.min !== "" ? `must be at least ${f.min}` : `must be at most ${f.max}`;
  const bad = Object.keys(NUMBERS).filter((id) => wrong($(id))).map((id) => `${NUMBERS[id]}: ${wrong($(id))}`);
  // a min above its max selects nothing: said, not an empty table without a word
  for (const [lo, hi] of [["run-pmin", "run-pmax"], ["run-min", "run-max"]]) {
    const a = $(lo), b = $(hi);
    if (!a.disabled && !b.disabled && a.value !== "" && b.value !== "" && !wrong(a) && !wrong(b) && +a.value > +b.value)
      bad.push(`${NUMBERS[lo]} ${a.value} is above ${NUMBERS[hi].split(" ").pop()} ${b.value}`);
  }
  try {
    if (bad.length) throw new Error(bad.join("; "));
    found = await api(`api/runs/${r.id}/rows?${q}`);
  } catch (e) {
    // the rows of the settings before are not these settings' rows: cleared, the table says why (the
    // next request that succeeds shows its rows)
    if (asked !== R.asked) return;
    status(e.message, true); R.failed = e.message;
    clearPage(); R.total = 0; galleryWarnings(r.warnings || []); // the run's own stay true
    $("run-page").textContent = `no rows shown: ${e.message}`; $("run-page").className = "error";
    $("run-prev").disabled = R.offset === 0; $("run-next").disabled = true;
    return;
  }
  if (asked !== R.asked) return;
  R.total = found.total;
  clearPage(); $("run-page").className = "";
  if (R.failed !== null && $("status").textContent === R.failed) status("ready"); // its error is over
  R.failed = null;
  const num = (v) => (v === null || v === undefined ? "" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v)));
  const names = Object.fromEntries(r.classes.map((c) => [c.index, c.name]));
  for (const row of found.rows) {
    // a method's maps that are one value everywhere (the run's METHOD.constant: its thumbnail, an <img>,
    // is a flat colour and cannot say why) are said under its thumbnail, as text; the whole note on hover
    const flat = (t) => (t === 0 ? [] : (row.constant || {})[r.methods[t - 1]] || []).map((f) =>
      el("div", { class: "flat", title: f.note }, `${f.k === 0 ? "" : `class ${f.name ?? names[f.class] ?? f.class ?? "?"}: `}constant map (${f.value})`));
    // a method that refused the image (the row's error, read per method by the server: method_errors): said
    // under that method's thumbnail (a blank tile); the image was read and predicted all the same
    const refused = (t) => { const said = t === 0 ? undefined : (row.method_errors || {})[r.methods[t - 1]];
      return said === undefined ? [] : [el("div", { class: "error", "data-what": "refused", title: said }, `failed: ${said}`)]; };
    const thumbs = [0, ...r.methods.map((_, i) => i + 1)].map((t) =>
      el("td", { "data-tile": t }, runThumb(`api/runs/${r.id}/rows/${row.index}/thumb.jpg?tile=${t}&v=${r.version}`, R.page.signal),
         ...flat(t), ...refused(t), ...(t === 0 ? [] : [storedMapButton(r, row, r.methods[t - 1])])));
    // the class: the prediction whenever the row has one (only a method, or the mask, failed), else why it failed
    const predicted = row.predicted_name !== null && row.predicted_name !== undefined;
    const other = predicted && row.other_error ? [el("div", { class: "error" }, row.other_error)] : [];
    const cls = el("td", { "data-what": "class" }, row.error && !predicted ? `failed: ${row.error}` : (row.predicted_name ?? ""), ...other);
    const cells = [...thumbs, el("td", {}, String(row.index)), el("td", { title: row.path ?? "" }, (row.path ?? "").split(/[\\/]/).pop()),  // a table without paths: none
      cls, el("td", {}, num(row.probability))];
    if (r.labels) cells.push(el("td", {}, row.label === null ? "" : (names[row.label] ?? String(row.label))),
      el("td", { class: row.correct ? "right" : "wrong" }, row.correct === null ? "" : (row.correct ? "right" : "wrong")));
    for (const m of r.metrics) cells.push(el("td", {}, num(row[m])));
    const tr = el("tr", { "data-id": row.id, class: (row.image ? "" : "noimage") + (S.image === row.id ? " current" : ""),
                          title: row.image ? "open in the explorer" : "no image file to open" }, ...cells);
    if (row.image) {
      tr.addEventListener("click", () => pick(row.id));
      tr.addEventListener("keydown", pressed(() => pick(row.id)));
      tr.tabIndex = 0;
    }
    body.append(tr);
  }
  $("run-page").textContent = (found.total ? `${R.offset + 1}–${R.offset + found.rows.length} of ${found.total}` : "no rows")
    + (found.left_out ? `; ${found.left_out.rows} row(s) left out: ${found.left_out.reason}` : "");
  if (found.left_out) $("run-page").className = "error";
  galleryWarnings([...(r.warnings || []), ...(found.warnings || [])]);
  // at either end its button is off (it did nothing, looking as if it would)
  $("run-prev").disabled = R.offset === 0; $("run-next").disabled = R.offset + found.rows.length >= found.total;
}

// The rows of the page shown are taken away (another page, filter, sort or run, or a page that cannot be
// had): the thumbnails not yet near the view are no longer watched, and the fetches still going for them
// are cancelled (R.page, one AbortController per page shown: they went on, their answers drawn into tiles
// no longer on the page, the connections held while the new page's thumbnails waited).
function clearPage() {
  $("run-body").textContent = ""; thumbsNear.disconnect();
  R.page.abort(); R.page = new AbortController();
}

// A row's thumbnail. It is fetched with fetch(), not by the <img> itself, so that the warnings raised
// while the server read it (its X-Salience-Warnings header, a JSON list: e.g. PIL's
// DecompressionBombWarning on a sprite over its pixel limit) are shown as text under it, from the same
// answer that drew it (an <img> cannot read a header: they went to the server's log only). Fetched when
// it comes near the view, as loading="lazy" did; one that cannot be read is drawn as gone. While it
// loads its data-state is "loading", then "shown" or "gone", or "aborted" when its page was taken away
// first (`signal`: the page's; nothing drawn, nothing said). The blob URL that drew it is revoked once
// the picture has loaded or failed, or its page is gone (the picture stays).
const pageOf = new WeakMap();
const thumbsNear = new IntersectionObserver((seen) => {
  for (const e of seen) if (e.isIntersecting) { thumbsNear.unobserve(e.target); loadThumb(e.target, pageOf.get(e.target)); }
}, { rootMargin: "200px" });

function runThumb(url, signal) {
  const img = el("img", { alt: "", "data-src": url, "data-state": "loading" });
  pageOf.set(img, signal);
  thumbsNear.observe(img);
  return img;
}

async function loadThumb(img, signal) {
  let said = [], url = null;
  try {
    signal.throwIfAborted();
    const r = await fetch(img.dataset.src, { signal });
    if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
    said = headerWarnings(r);
    const blob = await r.blob();
    signal.throwIfAborted();
    url = URL.createObjectURL(blob);
    await new Promise((ok, fail) => { img.onload = ok; img.onerror = fail; img.src = url; });
    signal.throwIfAborted();
    img.dataset.state = "shown";
  } catch (e) {
    if (signal.aborted) { img.removeAttribute("src"); img.dataset.state = "aborted"; return; }
    gone({ target: img }); img.dataset.state = "gone";
  } finally {
    if (url) URL.revokeObjectURL(url);  // drawn (or not): the picture stays, the blob goes
  }
  if (said.length) img.after(warningBox(said));
}

// A method's stored map of the row (its thumbnail's target, k=0: the float32 .npy of the stored float16),
// as a button under that method's thumbnail. The map is fetched with fetch() so that its
// X-Salience-Warnings header (what the run's METHOD.constant column says of a flat map, the float16
// storage's loss, a damaged file's warnings) is shown as text under that thumbnail, "stored map warning:
// ..." (a plain link downloaded it and the page never saw them); the file is then saved under the server's
// name. A map that cannot be had says why there instead. Asked again, it replaces what it said before. Its
// click and keys are its own, not the row's (which opens the image).
function storedMapButton(r, row, method) {
  const url = `api/runs/${r.id}/rows/${row.index}/maps/${encodeURIComponent(method)}.npy?k=0`;
  const button = el("button", { class: "button npy", title: `save the stored ${method} map (float32 .npy)` }, ".npy");
  button.addEventListener("click", (e) => { e.stopPropagation(); storedMap(button, url, `${method}-row${row.index}-k0.npy`); });
  button.addEventListener("keydown", (e) => e.stopPropagation());
  return button;
}

async function storedMap(button, url, name) {
  // one at a time: a double click saved the file twice ("NAME (1).npy"), the later answer's download last
  if (button.getAttribute("aria-busy") === "true") return;
  button.setAttribute("aria-busy", "true");
  const said = el("div", { "data-what": "npy" });
  for (const old of button.parentElement.querySelectorAll("[data-what='npy']")) old.remove();
  button.after(said);
  try {
    const r = await fetch(url);
    const texts = headerWarnings(r);
    if (texts.length) said.append(warningBox(texts, "stored map"));
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    }
    const blob = await r.blob();
    // an answer that is not a .npy (a proxy's login or error page, sent as 200) is not saved as one
    const magic = new Uint8Array(await blob.slice(0, 6).arrayBuffer());
    if (String.fromCharCode(...magic) !== "\x93NUMPY") throw new Error(`the answer is not a .npy file (${r.headers.get("content-type") || "no type"})`);
    const href = URL.createObjectURL(blob);
    el("a", { href, download: savedName(r.headers.get("content-disposition") || "", name) }).click();
    setTimeout(() => URL.revokeObjectURL(href), 1000);  // the download has its blob by then
  } catch (e) { said.append(el("div", { class: "error" }, `stored map: ${e.message}`)); }
  finally { button.removeAttribute("aria-busy"); }
}

// The file name a Content-Disposition gives: its filename* (RFC 6266: UTF-8, %-encoded; a method named
// with characters outside ASCII or with a quote), else its quoted filename, else `name`
function savedName(disposition, name) {
  const utf8 = /filename\*=UTF-8''([^;\s]+)/i.exec(disposition);
  if (utf8) try { return decodeURIComponent(utf8[1]); } catch (e) { /* not %-encoded UTF-8: the plain name */ }
  const plain = /filename="([^"]+)"/.exec(disposition);
  return plain ? plain[1] : name;
}

// The texts of an answer's X-Salience-Warnings header (none: []); a header that is not a JSON list of
// texts is shown as it came
function headerWarnings(r) {
  const h = r.headers.get("X-Salience-Warnings");
  if (!h) return [];
  try {
    const texts = JSON.parse(h);
    return Array.isArray(texts) ? texts.map(String) : [h];
  } catch (e) { return [h]; }
}

// The warnings raised while the run was described and this page of rows was read, as text under the
// table (in place of those before); none: the box is empty and hidden
function galleryWarnings(texts) {
  const box = $("run-warnings"); box.textContent = "";
  box.hidden = !texts.length;
  for (const t of [...new Set(texts)]) box.append(el("div", {}, `warning: ${t}`));
}

// ------------------------------------------------------------------ grid

function addTarget(model, index, name) {
  if (!S.targets.some((t) => t.model === model && t.index === index)) S.targets.push({ model, index, name });
  renderGrid();
}

// A row's options are shared by its cells, but for the layer: each model has its own layer tree, so
// row.layers[slot] is the layer picked for that model's cells (empty: the model's default layer).
async function addRow(method) {
  const row = { id: S.nextRow++, method, options: {}, layers: {} };
  if (S.info.methods[method].some((o) => o.keyword === "layer")) {
    await Promise.all(S.info.models.filter((m) => !S.layers[m.slot]).map(async (m) => {
      try { S.layers[m.slot] = await api(`api/models/${m.slot}/layers`); } catch (e) { status(e.message, true); }
    }));
  }
  S.rows.push(row);
  renderGrid();
}

function layerControls(row) {
  return S.info.models.filter((m) => S.layers[m.slot]).map((m) => {
    const tree = S.layers[m.slot];
    const input = el("select", { "data-layer-model": m.slot },
      el("option", { value: "" }, tree.default ? `default (${tree.default})`
        : tree.default_error ? "default: none, pick a layer" : "default (auto)"));
    if (!tree.default && tree.default_error) input.title = tree.default_error; // why (CrossViT: two branches)
    for (const l of tree.layers) input.append(el("option", { value: l.name }, `${"  ".repeat(l.depth)}${l.name} ${l.type}`));
    input.addEventListener("change", () => {
      if (input.value === "") delete row.layers[m.slot]; else row.layers[m.slot] = input.value;
      refreshAll(); // the cells of this row and model
    });
    const label = S.info.models.length > 1 ? `layer (${m.slot}: ${m.name})` : "layer";
    return el("label", {}, label, input);
  });
}

function optionControl(row, o) {
  const set = (v) => { if (v === "") delete row.options[o.keyword]; else row.options[o.keyword] = v; refreshRow(row); };
  let input;
  if (o.keyword === "layer" && S.info.models.some((m) => S.layers[m.slot])) {
    return layerControls(row);
  } else if (o.choices.length || o.kind === "bool") {
    const choices = o.kind === "bool" ? ["true", "false"] : o.choices;
    input = el("select", {}, el("option", { value: "" }, `default (${o.default})`));
    for (const c of choices) input.append(el("option", { value: c }, c));
  } else {
    input = el("input", { type: "text", placeholder: o.default, inputmode: o.kind === "name" ? "text" : "decimal" });
  }
  input.dataset.option = o.keyword;
  input.addEventListener("change", () => set(input.value.trim()));
  return el("label", {}, o.keyword, input);
}

function renderGrid() {
  const head = $("grid-head"); head.textContent = "";
  head.append(el("th", {}, "method"));
  for (const t of S.targets) {
    head.append(el("th", {}, `${t.model}: ${t.name}`,
      el("button", { class: "remove", title: "remove", onclick: () => { S.targets = S.targets.filter((x) => x !== t); renderGrid(); } }, "×")));
  }
  const body = $("grid-body"); body.textContent = "";
  for (const row of S.rows) {
    const opts = el("div", { class: "options" });
    for (const o of S.info.methods[row.method]) { const c = optionControl(row, o); opts.append(...(Array.isArray(c) ? c : [c])); }
    const tr = el("tr", { "data-row": row.id }, el("td", { class: "row-head" }, el("strong", {}, row.method),
      el("button", { class: "remove", title: "remove", onclick: () => { S.rows = S.rows.filter((x) => x !== row); renderGrid(); } }, "×"), opts));
    for (const t of S.targets) tr.append(cellFor(row, t).td);
    body.append(tr);
  }
  for (const row of S.rows) {
    for (const [k, v] of Object.entries(row.options)) {
      const input = body.querySelector(`tr[data-row="${row.id}"] [data-option="${k}"]`); if (input) input.value = v;
    }
    for (const [slot, v] of Object.entries(row.layers)) {
      const input = body.querySelector(`tr[data-row="${row.id}"] [data-layer-model="${slot}"]`); if (input) input.value = v;
    }
  }
  refreshAll();
}

function cellFor(row, t) {
  const id = `${row.id}|${t.model}|${t.index}`;
  if (S.cells.has(id)) return S.cells.get(id);
  const canvas = el("canvas", { width: 192, height: 192 });
  const state = el("div", { class: "state" });
  const bar = el("progress", { max: 1, hidden: "" });
  // cancel: this cell stops waiting at once; the server stops the job unless another request (another
  // tab's) joined it and still waits
  const cancel = el("button", { hidden: "", onclick: () => cancelJob(cell) }, "cancel");
  // retry: a failed or cancelled map is asked for again (so is it when its image is picked again); an
  // unreadable image is read again by picking it again
  const retry = el("button", { class: "retry", hidden: "", onclick: () => (S.broken ? pick(S.image) : request(cell)) }, "retry");
  const tools = el("div", { class: "tools" });
  const extra = el("div", {});
  const td = el("td", { class: "cell", "data-target": `${t.model}:${t.index}` }, canvas, bar, state, cancel, retry, tools, extra);
  const cell = { id, row, t, td, canvas, state, bar, cancel, retry, tools, extra, key: null, map: null, job: null, serial: 0 };
  S.cells.set(id, cell);
  return cell;
}

// The cancel button: this cell stops waiting at once; the server stops the job unless another request
// (another tab's) joined it and still waits
function cancelJob(cell) {
  if (!cell.job) return;
  api(`api/jobs/${cell.job}`, { method: "DELETE" }).catch(() => {});
  const tool = cell.jobTool;
  cell.serial++; cell.job = null;
  if (tool) toolNote(cell, tool, "cancelled"); // the map stays: only its curves or sanity check stopped
  else { failed(cell); showJob(cell, { state: "cancelled" }); }
}

// The options a cell's map is asked with: its row's, and for the layer its own model's layer menu
// (else the text field, if any, holds the layer)
function optionsOf(cell) {
  const options = { ...cell.row.options };
  if (S.layers[cell.t.model]) {
    delete options.layer;
    if (cell.row.layers[cell.t.model]) options.layer = cell.row.layers[cell.t.model];
  }
  return options;
}

// What a cell's map must be of: the image picked and its row's settings (a cell showing, or asking
// for, anything else is asked again)
function wantOf(cell) {
  const options = optionsOf(cell);
  return JSON.stringify([S.image, cell.row.method, Object.keys(options).sort().map((k) => [k, options[k]])]);
}

function refreshRow(row) { refreshAll(); }
// The cells shown whose map is not of the current image and settings (new cells, all after another image
// is picked, a row's after its settings change, a column removed and added again after a change). A
// removed row's or column's cells ask nothing, and stop waiting for the map they asked for.
function refreshAll() {
  for (const c of S.cells.values()) {
    if (!c.td.isConnected) { if (c.job && !c.cancel.hidden) cancelJob(c); }
    else if (c.want !== wantOf(c)) request(c);
  }
}

// ------------------------------------------------------------------ computing a map

function sleep(ms) { return new Promise((ok) => setTimeout(ok, ms)); }

// A request refused for what it asks (400: a bad setting, a method the model cannot run; 413, 422):
// asking again gives the same answer, so no retry is offered (the setting changed asks again). A 404
// (an image gone, maybe back), a 5xx, 507 (memory), 502 (storage) or a cancel may go otherwise next time.
const refused = (code) => code === 400 || code === 413 || code === 422;

function showJob(cell, j) {
  const running = j.state === "queued" || j.state === "running";
  cell.bar.hidden = !running; cell.cancel.hidden = !running;
  cell.retry.hidden = !(j.state === "cancelled" || (j.state === "error" && !refused(j.code)));
  if (j.progress === null || j.progress === undefined) cell.bar.removeAttribute("value"); else cell.bar.value = j.progress;
  cell.state.className = "state" + (j.state === "error" ? " error" : "");
  cell.state.title = j.note ? `progress not known ahead: ${j.note}` : "";
  cell.state.textContent = j.state === "queued" ? `queued (${j.position || "…"} in line)`
    : j.state === "running" ? (j.progress ? `running ${Math.round(100 * j.progress)}%`
      : `running… ${j.done ? `${j.done} images` : ""}`)
    : j.state === "error" ? j.error : j.state === "cancelled" ? "cancelled" : "";
}

// Wait for job `j` of the cell (its map, or `tool`: its curves or sanity check), showing its progress;
// the ended job (the caller shows how it ended).
async function poll(cell, j, serial, tool = null) {
  cell.job = j.job; cell.jobTool = tool;
  while ((j.state === "queued" || j.state === "running") && serial === cell.serial) {
    if (!cell.td.isConnected) { cancelJob(cell); break; } // its row or column was removed meanwhile
    showJob(cell, j);
    await sleep(250);
    j = await api(`api/jobs/${j.job}`);
  }
  return j;
}

// The cell shows its map's name (its map is drawn)
function mapShown(cell) {
  showJob(cell, { state: "done" });
  cell.state.textContent = `${cell.row.method} · ${cell.t.name}`;
}

async function request(cell) {
  if (!S.image) return;
  // the map asked for before (another setting's, another image's) is no longer wanted: its job is
  // cancelled (unless another tab's request joined it), else the new one waits behind it
  if (cell.job && !cell.cancel.hidden) api(`api/jobs/${cell.job}`, { method: "DELETE" }).catch(() => {});
  cell.job = null;
  const serial = ++cell.serial, image = S.image;
  cell.want = wantOf(cell);
  const options = optionsOf(cell);
  cell.extra.textContent = ""; cell.tools.textContent = "";
  if (S.broken) { // the image cannot be read: the cell shows why, with no map and no tools
    cell.map = null; cell.key = null; cell.want = null; draw(cell); // want: asked again once the image reads
    showJob(cell, { state: "error", error: S.broken });
    return;
  }
  try {
    let j = await api("api/explain", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: cell.t.model, image, method: cell.row.method, target: cell.t.index, options }) });
    // a newer request of this cell may have been answered first: a late answer is dropped, and the cell's
    // key changes with its map only (the figure, curves and sanity use the key: never an older setting's map)
    if (serial !== cell.serial) return;
    if (j.state !== "done") j = await poll(cell, j, serial);
    if (serial !== cell.serial) return;
    if (j.state !== "done") { failed(cell); showJob(cell, j); return; } // its error, or cancelled
    const map = parseNpy(await api(`api/maps/${j.key}/display.npy`));
    if (serial !== cell.serial) return;
    cell.map = map; cell.key = j.key; cell.image = image;
    mapShown(cell);
    draw(cell); tools(cell); figureLink();
    warned(cell, j.warnings || []);
  } catch (e) {
    if (serial !== cell.serial) return;
    failed(cell);
    showJob(cell, { state: "error", error: e.message, code: e.status });
  }
}

// The warnings raised while the cell's map was computed (e.g. integrated gradients' completeness gap: the
// map cannot be trusted), as text under it (the server's log alone was never seen)
function warned(cell, texts) {
  if (!texts.length) return;
  under(cell, "warnings", warningBox(texts));
}

// Warnings as text (never markup: a warning may quote what it was given), one line each
const warningBox = (texts, what = "") =>
  el("div", { class: "warning" }, ...texts.map((t) => el("div", {}, `${what ? what + " " : ""}warning: ${t}`)));

// A cell whose map did not come: no map (not an older setting's), and `want` cleared so that picking
// its image again asks again (the failure stays shown until then, or until its retry button)
function failed(cell) {
  cell.map = null; cell.key = null; cell.want = null; draw(cell); figureLink();
}

function parseNpy(buf) {
  const bytes = new Uint8Array(buf);
  const major = bytes[6];
  const view = new DataView(buf);
  const hlen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + hlen));
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  const data = new Float32Array(buf.slice(start + hlen));
  return { h: shape[shape.length - 2], w: shape[shape.length - 1], data };
}

// ------------------------------------------------------------------ drawing (display settings, no recomputing)

function quantile(values, q) {
  const a = Float32Array.from(values).sort();
  return a[Math.min(a.length - 1, Math.max(0, Math.floor(q * (a.length - 1))))];
}

function draw(cell) {
  const ctx = cell.canvas.getContext("2d");
  ctx.clearRect(0, 0, cell.canvas.width, cell.canvas.height);
  const pic = S.pictures[cell.t.model];
  ctx.imageSmoothingEnabled = false;
  // a map is laid only on the picture of its own image (while another image's map is computed, the
  // cell shows the new picture alone, also when a display setting redraws it)
  if (!cell.map || !pic || cell.image !== S.picturesOf) { if (pic && pic.complete) ctx.drawImage(pic, 0, 0, 192, 192); return; }
  const { h, w, data } = cell.map;
  const d = S.display, lut = S.luts[d.cmap], signed = d.mode === "signed";
  const mags = data.map(Math.abs);
  let top = 0; for (const v of mags) if (v > top) top = v;
  const hi = quantile(mags, d.clip / 100) || top || 1;
  const base = document.createElement("canvas"); base.width = w; base.height = h;
  const bctx = base.getContext("2d");
  bctx.drawImage(pic, 0, 0, w, h);
  const img = bctx.getImageData(0, 0, w, h), px = img.data, a = d.opacity;
  for (let i = 0; i < h * w; i++) {
    const t = signed ? 0.5 + 0.5 * Math.max(-1, Math.min(1, data[i] / hi)) : Math.min(1, mags[i] / hi);
    const c = lut[Math.round(t * 255)];
    for (let k = 0; k < 3; k++) px[4 * i + k] = (1 - a) * px[4 * i + k] + a * c[k];
  }
  bctx.putImageData(img, 0, 0);
  ctx.drawImage(base, 0, 0, 192, 192);
}

// ------------------------------------------------------------------ per-map tools

function tools(cell) {
  const key = cell.key;
  cell.tools.append(
    el("a", { class: "button", href: `api/maps/${key}.npy`, download: "" }, ".npy"),
    el("a", { class: "button", href: `api/maps/${key}.png`, target: "_blank" }, "PNG"),
    el("button", { class: "button", onclick: () => onMap(cell, "curves") }, "curves"),
    el("button", { class: "button", onclick: () => onMap(cell, "sanity") }, "sanity"));
}

// A map's curves or sanity check. When it fails or is cancelled, the map stays (with its name) and the
// message is shown under it; its button asks again.
async function onMap(cell, what) {
  const serial = cell.serial;
  try {
    let j = await api(`api/maps/${cell.key}/${what}`, { method: "POST" });
    if (j.state !== "done") j = await poll(cell, j, serial, what);
    if (serial !== cell.serial) return;
    if (j.state !== "done") { toolNote(cell, what, j.error || j.state); return; }
    mapShown(cell);
    // the warnings raised while they were computed (and the map, when computed again), under them
    const said = j.result.warnings || [];
    const shown = what === "curves" ? curvesChart(j.result) : badge(j.result);
    under(cell, what, said.length ? el("div", {}, shown, warningBox(said, what)) : shown);
  } catch (e) { if (serial === cell.serial) toolNote(cell, what, e.message); }
}

function toolNote(cell, what, text) {
  mapShown(cell);
  under(cell, what, el("div", { class: "error" }, `${what}: ${text}`));
}

// Under the map: the curves, or the sanity badge, or why they are not there, in place of the one before
// (clicked twice, it was shown twice)
function under(cell, what, e) {
  for (const old of cell.extra.querySelectorAll(`[data-what="${what}"]`)) old.remove();
  e.dataset.what = what;
  cell.extra.append(e);
}

function badge(r) {
  return el("div", {}, el("span", { class: `badge ${r.passed ? "pass" : "fail"}`,
    title: `rank correlation with the map after re-initializing the top layer: ${r.spearman_top.toFixed(2)}, all ${r.layers} layers: ${r.spearman_all.toFixed(2)}` },
  `sanity: ${r.badge} (r ${r.spearman_all.toFixed(2)})`));
}

function curvesChart(r) {
  const c = el("canvas", { class: "curves", width: 192, height: 96 });
  const ctx = c.getContext("2d");
  const line = (ys, color) => {
    ctx.strokeStyle = color; ctx.beginPath();
    ys.forEach((y, i) => { const X = 4 + 184 * i / (ys.length - 1), Y = 80 - 72 * y; i ? ctx.lineTo(X, Y) : ctx.moveTo(X, Y); });
    ctx.stroke();
  };
  line(r.insertion, "#2e7d32"); line(r.deletion, "#b3261e");
  ctx.fillStyle = "#1d2330"; ctx.font = "11px sans-serif";
  ctx.fillText(`insertion AUC ${r.insertion_auc.toFixed(3)}`, 4, 92);
  ctx.fillText(`deletion ${r.deletion_auc.toFixed(3)}`, 118, 92);
  return c;
}

function figureLink() {
  const keys = [...S.cells.values()].filter((c) => c.td.isConnected && c.key && c.map && c.image === S.image).map((c) => c.key);
  const d = S.display;
  const q = new URLSearchParams({ keys: keys.join(","), cmap: d.cmap, percentile: d.clip, alpha: d.opacity,
                                  signed: d.mode === "signed" ? "signed" : "abs" });
  $("download-figure").href = keys.length ? `api/figure.png?${q}` : "#";
}

start().catch((e) => status(e.message, true));
