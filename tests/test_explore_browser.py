"""The explorer in a real browser: Debian's headless Chromium driven by Playwright, against a real
uvicorn server on 127.0.0.1 and a free port. As a person uses it: open the page, upload a demo
shapes image, click its class, add Grad-CAM, wait for the map, change the sliders, download the
figure. The map drawn on the page is read back from a screenshot and must be bright where the
shape is (the mask is known exactly) and dark elsewhere. And a dataset run's gallery: sorted,
filtered, a row opened in the explorer, with a second model whose own layers its row offers."""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest

import salience
from explore_helpers import browser_api, browser_context, browser_page, hand_run, shapes_files, shown
from nets import RenamedLayersNet, TanhSpike, WarnsNet

INSIDE_OVER_OUTSIDE = 2.0
"""Least ratio of the map's mean brightness on the shape to off it. Grad-CAM's raw map on this
image (demo:shapes, seed 4242, image 0, a cross) is 5.0x stronger on the mask than off it
(measured with salience.gradcam); the page's percentile clip and the screenshot blur it a little."""


def _luminance(png: bytes, size=None) -> np.ndarray:
    """A PNG's brightness; ``size`` (w, h): resized to it (an element's screenshot may be a pixel
    larger than its CSS size, by the layout's rounding)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    return np.asarray(img if size is None else img.resize(size, Image.BILINEAR), dtype=np.float64)


def _vanilla_cell(page: Any, label: int, cell: str) -> None:
    """Pick image f0, its class ``label``, add a vanilla map, and wait for ``cell`` to show it."""
    page.click("#images img[data-id='f0']")
    page.locator(f"#classes button.class[data-index='{label}']").click()
    page.select_option("#method", "vanilla")
    page.click("#add")
    page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('vanilla')")


def _shapes_explorer(tmp_path: Any, n: int = 1) -> tuple[Any, int, str, list[str]]:
    """A real explorer of demo:shapes on ``n`` held-out images: ``(explorer, the first one's label, the
    grid cell of that class, a list for the page's errors)``; skips without Playwright, Chromium or
    starlette."""
    browser_api()
    pytest.importorskip("starlette")
    paths, labels, _ = shapes_files(tmp_path, n=n)
    label = int(labels[0])
    return salience.explore("demo:shapes", paths, show=False), label, f"td.cell[data-target='a:{label}']", []


def test_a_person_uses_the_page(tmp_path):
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, labels, masks = shapes_files(tmp_path, n=1)
    label = int(labels[0])
    explorer = salience.explore("demo:shapes", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, accept_downloads=True) as page:

            page.set_input_files("#file", str(paths[0]))
            button = page.locator(f"#classes button.class[data-index='{label}']")
            button.wait_for()
            assert salience.data.CLASSES[label] in button.inner_text()
            # The top class is the true one, with its probability shown.
            assert page.locator("#classes button.class").first.get_attribute("data-index") == str(label)

            button.click()
            page.select_option("#method", "gradcam")
            page.click("#add")
            cell = page.locator(f"td.cell[data-target='a:{label}']")
            page.wait_for_function(
                "() => { const s = document.querySelector('td.cell .state'); "
                "return s && s.textContent.startsWith('gradcam'); }")
            page.select_option("#cmap", "gray")
            page.fill("#opacity", "0.3")
            faint = cell.locator("canvas").screenshot()
            page.fill("#opacity", "1")  # a slider: the map is redrawn in the page, nothing recomputed
            assert page.locator("#opacity-out").inner_text() == "1"
            shot = cell.locator("canvas").screenshot()
            assert shot != faint

            with page.expect_download() as download:
                page.click("#download-figure")
            figure = download.value.path().read_bytes()
    finally:
        explorer.stop()
    assert not errors, errors

    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and _luminance(figure).shape[1] > 3 * 160
    lum = _luminance(shot, (192, 192))  # the map alone (opacity 1), gray colormap: brightness rises with |value|
    mask = np.kron(masks[0].numpy(), np.ones((3, 3), dtype=bool))  # 64 -> 192 pixels, as drawn
    inside, outside = lum[mask].mean(), lum[~mask].mean()
    assert lum.max() > 200, "the map is empty"
    assert inside > INSIDE_OVER_OUTSIDE * outside, (inside, outside)


def _rows_shown(page) -> list[int]:
    """The gallery's row indexes as the page shows them, once the table has settled."""
    return [int(i) for i in page.eval_on_selector_all("#run-body tr", "trs => trs.map(t => t.dataset.id.split('-')[1])")]


def _wait_rows(page, want: list[int]) -> None:
    """Wait until the gallery shows exactly these rows in this order. Waiting for a row count alone
    is a race: the previous filter's answer can have the same count (CI read a stale table)."""
    ids = ",".join(f"r0-{i}" for i in want)
    page.wait_for_function(f"[...document.querySelectorAll('#run-body tr')].map(t => t.dataset.id).join() === {ids!r}")


def test_a_person_browses_a_dataset_run_and_compares_two_models(tmp_path):
    """The gallery of a dataset run (made here with salience.explain_dataset on the demo model):
    sorted and filtered as the run's table says; a row opened in the explorer shows its map where
    the shape is. With a second model (--compare), each model's row offers its own layers."""
    import dataclasses

    from salience._core.info import attach_info

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, labels, masks = shapes_files(tmp_path / "imgs", n=4)
    given = labels.clone()
    given[1] = (given[1] + 1) % 5  # one label the model gets wrong
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{p.name},{int(g)}\n" for p, g in zip(paths, given)))
    run = salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", labels=tmp_path / "labels.csv",
                                   shard_size=4, batch_size=4, workers=0)
    table = run.table.to_pylist()
    by_p = [t["index"] for t in sorted(table, key=lambda t: (t["probability"], t["index"]), reverse=True)]
    wrong = [t["index"] for t in table if not t["correct"]]
    assert 1 in wrong

    a = salience.load_model("demo:shapes")
    b = attach_info(RenamedLayersNet(), dataclasses.replace(a.salience_info, name="other", default_layer=None))
    explorer = salience.explore(a, run=tmp_path / "run", compare=b, show=False)
    errors: list[str] = []
    row = 3
    label = int(labels[row])
    try:
        with browser_page(explorer.url, errors, viewport={"width": 1400, "height": 1000}) as page:
            assert _rows_shown(page) == [t["index"] for t in table]

            page.select_option("#run-sort", "probability")
            page.select_option("#run-order", "desc")
            _wait_rows(page, by_p)
            page.select_option("#run-correct", "false")
            _wait_rows(page, sorted(wrong, key=by_p.index))
            page.select_option("#run-correct", "")
            _wait_rows(page, by_p)
            # a slow answer to an older request must not replace the newer one's table
            page.evaluate("""() => { const f = window.fetch; window.fetch = (u, o) => String(u).includes('correct=false')
                ? new Promise((ok) => setTimeout(() => ok(f(u, o)), 800)) : f(u, o); }""")
            page.select_option("#run-correct", "false")
            page.select_option("#run-correct", "")
            page.wait_for_timeout(1500)
            assert _rows_shown(page) == by_p
            name = table[row]["predicted_name"]
            page.select_option("#run-class", name)
            want = [i for i in by_p if table[i]["predicted_name"] == name]
            _wait_rows(page, want)
            page.wait_for_timeout(300)  # no later answer replaces it
            assert _rows_shown(page) == want

            page.click(f"#run-body tr[data-id='r0-{row}']")  # open the row in the explorer
            button = page.locator(f"#classes button.class[data-model='a'][data-index='{label}']")
            button.click()
            page.locator("#classes button.class[data-model='b']").first.click()
            page.select_option("#method", "gradcam")
            page.click("#add")
            # each model's layer menu is filled when its layer tree arrives (a request of its own)
            page.wait_for_function("['a', 'b'].every(m => document.querySelectorAll("
                                   "`select[data-layer-model='${m}'] option`).length > 1)")
            layers_a = page.eval_on_selector_all("select[data-layer-model='a'] option", "os => os.map(o => o.value)")
            layers_b = page.eval_on_selector_all("select[data-layer-model='b'] option", "os => os.map(o => o.value)")
            assert "features.6" in layers_a and "body.0" not in layers_a
            assert layers_b == ["", "body", "body.0", "body.1", "top"]
            page.select_option("select[data-layer-model='b']", "body.0")
            page.select_option("#cmap", "gray")
            page.fill("#opacity", "1")
            for slot in ("a", "b"):
                page.wait_for_function(
                    f"() => {{ const s = document.querySelector(\"td.cell[data-target^='{slot}:'] .state\"); "
                    "return s && s.textContent.startsWith('gradcam'); }")
            shot = page.locator(f"td.cell[data-target='a:{label}'] canvas").screenshot()
    finally:
        explorer.stop()
    assert not errors, errors
    lum = _luminance(shot, (192, 192))
    mask = np.kron(masks[row].numpy(), np.ones((3, 3), dtype=bool))
    assert lum.max() > 200, "the map is empty"
    assert lum[mask].mean() > INSIDE_OVER_OUTSIDE * lum[~mask].mean()


def test_a_row_whose_image_is_gone_shows_why_and_the_next_row_restores_the_page(tmp_path):
    """A run row whose file was deleted after the run (the page's path for a deleted object too:
    the server answers 404 with its message): the picture area shows the message, no broken
    image, no classes, and the map cells show the same message with no map and no tools. Picking a
    good row afterwards brings back its picture, its classes and its maps."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, labels, _ = shapes_files(tmp_path / "imgs", n=2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", workers=0)
    named = tmp_path / "named.png"  # a file named on the command line, deleted before the page loads
    named.write_bytes(paths[0].read_bytes())
    explorer = salience.explore("demo:shapes", [named], run=tmp_path / "run", show=False)
    named.unlink()
    errors: list[str] = []
    label = int(labels[0])
    cell = f"td.cell[data-target='a:{label}']"
    broken = """() => [...document.querySelectorAll('#side img, #grid img')]
                      .filter(i => i.getAttribute('src') && i.complete && i.naturalWidth === 0).length"""
    blank = f"""() => {{ const c = document.querySelector("{cell} canvas");
                         return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.every(v => v === 0); }}"""
    try:
        # the 404s are the answers this test asks for
        with browser_page(explorer.url, errors, allow_404=True) as page:
            # its thumbnail in the side list: a marked box, not the browser's broken-image icon
            page.wait_for_function("document.querySelectorAll('#images img.gone').length === 1")
            assert page.evaluate(broken) == 0
            page.click("#run-body tr[data-id='r0-0']")
            page.locator(f"#classes button.class[data-index='{label}']").click()
            page.select_option("#method", "gradcam")
            page.click("#add")
            page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('gradcam')")

            paths[1].unlink()  # after the gallery listed it as an image to open
            page.click("#run-body tr[data-id='r0-1']")
            gone = f"the image is gone from disk: {paths[1].resolve()}"
            page.locator("#picture-error").wait_for(state="visible")
            assert page.locator("#picture-error").inner_text().startswith(gone)
            assert not page.locator("#preview").is_visible()
            assert page.get_attribute("#preview", "src") is None
            assert page.locator("#classes button.class").count() == 0
            page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith({gone!r})")
            assert page.locator(f"{cell} .tools > *").count() == 0
            assert page.evaluate(blank)
            assert page.evaluate(broken) == 0
            assert page.get_attribute("#download-figure", "href") == "#"

            page.click("#run-body tr[data-id='r0-0']")  # a good row: everything as before
            page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('gradcam')")
            assert page.locator("#preview").is_visible() and not page.locator("#picture-error").is_visible()
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 64
            assert page.locator("#classes button.class").count() == 5
            assert page.locator(f"{cell} .tools > *").count() == 4
            assert not page.evaluate(blank)
            assert page.evaluate(broken) == 0
            assert page.get_attribute("#download-figure", "href").startswith("api/figure.png?")
    finally:
        explorer.stop()
    assert not errors, errors


def test_fast_clicks_between_images_show_the_last_images_classes_once(tmp_path):
    """Picking image A, then B, then A again while A's first top-classes answer is slow: the page
    shows A's five classes once (the first pick of A must not pass as the latest and add its own)."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, labels, _ = shapes_files(tmp_path, n=2)
    explorer = salience.explore("demo:shapes", paths, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            page.evaluate("""() => { const f = window.fetch; let n = 0;
                window.fetch = (u, o) => (String(u).includes('top?image=f0') && n++ === 0)
                  ? new Promise((ok) => setTimeout(() => ok(f(u, o)), 1200)) : f(u, o); }""")
            for image in ("f0", "f1", "f0"):
                page.click(f"#images img[data-id='{image}']")
            page.wait_for_function("document.getElementById('status').textContent === 'image f0'")
            page.wait_for_timeout(2000)  # the slow answer has come by now
            shown = page.eval_on_selector_all("#classes > *", "es => es.map(e => e.tagName)")
            first = page.locator("#classes button.class").first.get_attribute("data-index")
    finally:
        explorer.stop()
    assert not errors, errors
    assert shown == ["H3"] + ["BUTTON"] * 5
    assert first == str(int(labels[0]))


def test_a_late_answer_to_an_older_setting_does_not_become_the_cells_map(tmp_path):
    """A method's setting changed twice quickly (reduce max, then abs), the answer to the first
    arriving last: the cell's figure link and its curves are of the abs map, the one drawn."""
    explorer, label, cell, errors = _shapes_explorer(tmp_path)
    try:
        with browser_page(explorer.url, errors) as page:
            _vanilla_cell(page, label, cell)
            page.evaluate("""() => { const f = window.fetch;
                window.fetch = (u, o) => (o && String(o.body).includes('"reduce":"max"'))
                  ? new Promise((ok) => setTimeout(() => ok(f(u, o)), 1200)) : f(u, o); }""")
            page.select_option("tr[data-row='1'] [data-option='reduce']", "max")
            page.select_option("tr[data-row='1'] [data-option='reduce']", "abs")
            page.wait_for_timeout(2500)  # the late answer (reduce max) has come by now
            # the abs map drawn: its tools are back (a request clears them until its map is drawn)
            page.wait_for_function(f"document.querySelectorAll(\"{cell} .tools > *\").length === 4")
            want = page.evaluate(f"""async () => (await (await fetch('api/explain', {{method: 'POST',
                headers: {{'content-type': 'application/json'}}, body: JSON.stringify({{model: 'a', image: 'f0',
                method: 'vanilla', target: {label}, options: {{reduce: 'abs'}}}})}})).json()).key""")
            page.select_option("#cmap", "gray")  # the figure link is made again with the display
            figure = page.get_attribute("#download-figure", "href")
            with page.expect_request(lambda r: r.url.endswith("/curves")) as asked:
                page.click(f"{cell} .tools button:has-text('curves')")
            curves = asked.value.url
    finally:
        explorer.stop()
    assert not errors, errors
    assert figure.startswith(f"api/figure.png?keys={want}&"), (figure, want)
    assert curves.endswith(f"api/maps/{want}/curves"), (curves, want)


def _tab_to(page, selector: str, presses: int = 80) -> None:
    """Press Tab until the element ``selector`` has the keyboard focus (as a keyboard user does)."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate(f"document.activeElement === document.querySelector({selector!r})"):
            return
    raise AssertionError(f"{selector} is never reached with Tab")


def test_the_page_works_from_the_keyboard(tmp_path):
    """With the keyboard only: Tab reaches the file input ("choose a file": an upload),
    Tab to an image's thumbnail and Enter (or Space) picks it, Tab to a gallery row and Enter opens it."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, labels, _ = shapes_files(tmp_path / "imgs", n=2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", workers=0)
    explorer = salience.explore("demo:shapes", [paths[0]], run=tmp_path / "run", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _tab_to(page, "#images img[data-id='f0']")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('status').textContent === 'image f0'")
            assert page.locator("#classes button.class").first.get_attribute("data-index") == str(int(labels[0]))

            _tab_to(page, "#run-body tr[data-id='r0-1']")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('status').textContent === 'image r0-1'")
            assert page.locator("#classes button.class").first.get_attribute("data-index") == str(int(labels[1]))

            page.keyboard.press("Shift+Tab")  # r0-0's stored map button (.npy), then r0-0 itself
            page.keyboard.press("Shift+Tab")
            page.keyboard.press(" ")  # Space on the row above (r0-0)
            page.wait_for_function("document.getElementById('status').textContent === 'image r0-0'")

            # the file input itself is a Tab stop (the browser opens its chooser on Enter / Space), shown as
            # its "choose a file" label; a file chosen there is uploaded and picked
            _tab_to(page, "#file")
            page.set_input_files("#file", str(paths[1]))
            page.wait_for_function("document.querySelectorAll('#images img').length === 2")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('image u')")
    finally:
        explorer.stop()
    assert not errors, errors


def test_a_map_is_never_laid_on_another_images_picture(tmp_path):
    """Image A's map drawn, then image B picked while B's map is slow to come: the cell shows B's
    picture alone, also when a display setting redraws it (it drew A's map on B's picture)."""
    explorer, label, cell, errors = _shapes_explorer(tmp_path, n=2)
    same = f"""() => {{ const c = document.querySelector("{cell} canvas"), p = document.createElement('canvas');
        p.width = c.width; p.height = c.height; const x = p.getContext('2d'); x.imageSmoothingEnabled = false;
        x.drawImage(document.getElementById('preview'), 0, 0, 192, 192);
        const a = c.getContext('2d').getImageData(0, 0, 192, 192).data, b = x.getImageData(0, 0, 192, 192).data;
        return a.every((v, i) => v === b[i]); }}"""
    try:
        with browser_page(explorer.url, errors) as page:
            _vanilla_cell(page, label, cell)
            assert not page.evaluate(same)  # A's map is on A's picture
            page.evaluate("""() => { const f = window.fetch;
                window.fetch = (u, o) => (o && String(o.body).includes('"image":"f1"'))
                  ? new Promise((ok) => setTimeout(() => ok(f(u, o)), 5000)) : f(u, o); }""")
            page.click("#images img[data-id='f1']")
            page.wait_for_function("document.getElementById('status').textContent === 'image f1'")
            page.select_option("#cmap", "gray")
            page.fill("#opacity", "1")
            assert page.evaluate(same)  # B's picture, no map of A on it
            page.wait_for_function(f"!({same})()")  # B's own map, once it came
    finally:
        explorer.stop()
    assert not errors, errors


def test_a_new_server_on_the_same_port_shows_its_own_runs_thumbnails(tmp_path):
    """The gallery's thumbnails are kept by the browser for an hour. A server on a fixed port (as
    with SSH forwarding) stopped, and another started there with another run (its id r0 too): the
    page reloaded shows the new run's thumbnails, what the server serves now, not the old run's."""
    import socket

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=2)
    for n, path in enumerate(paths):  # two runs whose row 0 is another image
        salience.explain_dataset("demo:shapes", [path], ["vanilla"], tmp_path / f"run{n}", workers=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = """async () => { const i = document.querySelector('#run-body img');
        const pixels = async (src) => { const b = await createImageBitmap(src); const c = document.createElement('canvas');
          c.width = b.width; c.height = b.height; c.getContext('2d').drawImage(b, 0, 0);
          return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).join(); };
        const served = await (await fetch(i.dataset.src, { cache: 'no-store' })).blob();  // its URL (src: the blob drawn)
        return [await pixels(i), await pixels(served)]; }"""
    errors: list[str] = []
    shown = []
    with browser_context(viewport={"width": 1200, "height": 900}) as context:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        for n in range(2):
            explorer = salience.explore("demo:shapes", run=tmp_path / f"run{n}", port=port, show=False)
            try:
                page.goto(explorer.url)
                page.wait_for_function("document.getElementById('status').textContent === 'ready'")
                page.wait_for_function("(() => { const i = document.querySelector('#run-body img'); "
                                       "return i && i.complete && i.naturalWidth > 0; })()")
                shown.append(page.evaluate(first))
            finally:
                explorer.stop()
    assert not errors, errors
    for on_page, served in shown:
        assert on_page == served
    assert shown[0][0] != shown[1][0]


def test_a_failed_or_cancelled_cell_is_asked_again_when_its_image_is_picked_again(tmp_path, monkeypatch):
    """A map whose job fails once (a transient error in the model's worker: a 500) shows its message
    until asked again; picking the same image again, or the cell's retry button, asks the server
    again (it asked nothing and the cell stayed failed until a reload), and the cell that succeeded
    beside it is not asked again. A cancelled cell is asked again by a re-pick too."""
    from salience.explore import compute

    from explore_helpers import block_worker

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, labels, _ = shapes_files(tmp_path, n=1)
    label, other = int(labels[0]), (int(labels[0]) + 1) % 5
    fails = {"left": 0}
    real = compute.explain

    def flaky(slot, image, method, target, given, ticker):
        if target == label and fails["left"] > 0:
            fails["left"] -= 1
            raise RuntimeError("the backend hiccuped")
        return real(slot, image, method, target, given, ticker)
    monkeypatch.setattr(compute, "explain", flaky)
    explorer = salience.explore("demo:shapes", paths, show=False)
    errors: list[str] = []
    asked: list[dict] = []
    bad, good = f"td.cell[data-target='a:{label}']", f"td.cell[data-target='a:{other}']"
    message = "unexpected RuntimeError: the backend hiccuped"

    def state(cell: str) -> str:
        return page.inner_text(f"{cell} .state")

    def shown(cell: str, start: str) -> None:
        page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith({start!r})")

    try:
        # the 500 is the answer this test asks for (the page reads the job's error)
        with browser_page(explorer.url, errors) as page:
            page.on("request", lambda r: asked.append(json.loads(r.post_data))
                    if r.url.endswith("/api/explain") else None)
            page.click("#images img[data-id='f0']")
            for k in (label, other):
                page.locator(f"#classes button.class[data-index='{k}']").click()
            fails["left"] = 1
            page.select_option("#method", "vanilla")
            page.click("#add")
            shown(good, "vanilla")
            shown(bad, message)
            page.wait_for_timeout(500)  # the failure stays, with its message, until asked again
            assert state(bad) == message and "error" in page.get_attribute(f"{bad} .state", "class")
            assert [a["target"] for a in asked] == [label, other] or [a["target"] for a in asked] == [other, label]

            asked.clear()
            page.click("#images img[data-id='f0']")  # the same image again: the failed cell asks again
            shown(bad, "vanilla")
            page.wait_for_timeout(300)
            assert [a["target"] for a in asked] == [label]  # the map that came is not asked for again
            assert page.locator(f"{bad} .tools > *").count() == 4

            asked.clear()
            fails["left"] = 1
            page.select_option("#method", "gradcam")
            page.click("#add")
            cell = f"tr[data-row='2'] {bad}"
            shown(cell, message)
            page.locator(f"{cell} button.retry").click()  # the cell's own retry
            shown(cell, "gradcam")
            assert not page.locator(f"{cell} button.retry").is_visible()

            release = block_worker(explorer.hub)  # its curves waiting in line, cancelled: the map stays
            try:
                page.click(f"{cell} .tools button:has-text('curves')")
                shown(cell, "queued")
                page.locator(f"{cell} button:has-text('cancel')").click()
                shown(cell, "gradcam")
            finally:
                release.set()
            assert page.inner_text(f"{cell} .error") == "curves: cancelled"
            assert page.locator(f"{cell} .tools > *").count() == 4
            assert not page.locator(f"{cell} button.retry").is_visible()
            asked.clear()
            with page.expect_response(lambda r: "/top?image=f0" in r.url):
                page.click("#images img[data-id='f0']")
            page.wait_for_timeout(300)
            assert asked == []  # every map came: none is asked again

            release = block_worker(explorer.hub)  # a map waiting in line, cancelled
            try:
                page.select_option("tr[data-row='2'] [data-option='relu']", "false")
                shown(cell, "queued")
                page.locator(f"{cell} button:has-text('cancel')").click()
                shown(cell, "cancelled")
            finally:
                release.set()
            asked.clear()
            page.click("#images img[data-id='f0']")
            shown(cell, "gradcam")
            assert [(a["method"], a["target"]) for a in asked] == [("gradcam", label)]
    finally:
        explorer.stop()
    assert not errors, errors


def test_a_removed_column_asks_nothing_and_shows_the_rows_settings_when_added_again(tmp_path):
    """A column removed: a change of its row's settings asks nothing for it (its maps were computed
    unseen, one job each, the slow methods' too), and the job it waits for is cancelled; added again,
    it asks for the map of the row's settings now (not the one it showed before)."""
    from explore_helpers import block_worker

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, labels, _ = shapes_files(tmp_path, n=1)
    label, other = int(labels[0]), (int(labels[0]) + 1) % 5
    explorer = salience.explore("demo:shapes", paths, show=False)
    errors: list[str] = []
    asked: list[tuple[str, Any]] = []
    cell, gone = f"td.cell[data-target='a:{label}']", f"td.cell[data-target='a:{other}']"
    reduce = "tr[data-row='1'] [data-option='reduce']"

    def explained() -> list[tuple[int, dict]]:
        return [(a["target"], a.get("options")) for kind, a in asked if kind == "explain"]

    def shown(c: str, start: str) -> None:
        page.wait_for_function(f"document.querySelector(\"{c} .state\")?.textContent.startsWith({start!r})")

    try:
        with browser_page(explorer.url, errors) as page:
            page.on("request", lambda r: asked.append(("explain", json.loads(r.post_data)))
                    if r.url.endswith("/api/explain") else asked.append((r.method, r.url))
                    if r.method == "DELETE" else None)
            page.click("#images img[data-id='f0']")
            for k in (label, other):
                page.locator(f"#classes button.class[data-index='{k}']").click()
            page.select_option("#method", "vanilla")
            page.click("#add")
            shown(cell, "vanilla")
            shown(gone, "vanilla")

            page.click(f"#grid-head th:has-text(': {salience.data.CLASSES[other]}') button.remove")
            asked.clear()
            with page.expect_request(lambda r: r.url.endswith("/api/explain")):  # not a fixed wait: a loaded
                page.select_option(reduce, "max")                                # machine sends it later
            shown(cell, "vanilla")
            page.wait_for_timeout(300)  # a request for the removed column would be sent with it
            assert explained() == [(label, {"reduce": "max"})]

            asked.clear()
            page.locator(f"#classes button.class[data-index='{other}']").click()
            shown(gone, "vanilla")
            assert explained() == [(other, {"reduce": "max"})]

            release = block_worker(explorer.hub)
            try:
                asked.clear()
                page.select_option(reduce, "abs")
                shown(gone, "queued")
                asked.clear()  # (the setting's change may cancel a job of the setting before: another test's)
                with page.expect_request(lambda r: r.method == "DELETE"):
                    page.click(f"#grid-head th:has-text(': {salience.data.CLASSES[other]}') button.remove")
                page.wait_for_timeout(300)  # a second DELETE would be sent with it
                assert [m for m, _ in asked if m == "DELETE"] == ["DELETE"], asked
            finally:
                release.set()
            shown(cell, "vanilla")
    finally:
        explorer.stop()
    assert not errors, errors


def test_curves_and_sanity_asked_twice_are_shown_once(tmp_path):
    """A map's curves and sanity check clicked twice: one chart and one badge (each click added one
    more, the same again, under the map)."""
    explorer, label, cell, errors = _shapes_explorer(tmp_path)
    try:
        with browser_page(explorer.url, errors) as page:
            _vanilla_cell(page, label, cell)
            for what, drawn in (("curves", "canvas.curves"), ("sanity", ".badge")):
                for _ in range(2):
                    with page.expect_response(lambda r: r.url.endswith(f"/{what}")):
                        page.click(f"{cell} .tools button:has-text('{what}')")
                    page.locator(f"{cell} {drawn}").first.wait_for()
                page.wait_for_timeout(300)
                assert page.locator(f"{cell} {drawn}").count() == 1, what
    finally:
        explorer.stop()
    assert not errors, errors


def test_a_changed_setting_cancels_the_job_of_the_setting_before(tmp_path):
    """A row's setting changed while the map of the setting before waits in line: that job is cancelled
    (it went on, and the new setting's map waited behind a map nobody would see)."""
    from explore_helpers import block_worker

    explorer, label, cell, errors = _shapes_explorer(tmp_path)
    try:
        with browser_page(explorer.url, errors) as page:
            page.click("#images img[data-id='f0']")
            page.locator(f"#classes button.class[data-index='{label}']").click()
            release = block_worker(explorer.hub)
            try:
                page.select_option("#method", "vanilla")
                page.click("#add")
                page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('queued')")
                first = explorer.hub.inflight.copy()
                # both answered before the queue is read: the cell shows "queued" from the first job
                # already, so waiting for that text alone read the queue before the new job was in it
                with page.expect_response(lambda r: r.request.method == "DELETE"), \
                        page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("api/explain")):
                    page.select_option("tr[data-row='1'] [data-option='reduce']", "max")
                page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('queued')")
                waiting = explorer.hub.slots["a"].worker.waiting()
            finally:
                release.set()
            page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith('vanilla')")
    finally:
        explorer.stop()
    assert not errors, errors
    assert len(first) == 1 and [j.state for j in first.values()] == ["cancelled"]
    assert waiting == 1  # the new setting's job alone


def test_an_upload_that_is_not_an_image_is_named_once(tmp_path):
    """A file that is not an image, uploaded: the status says so, naming the file once (the server's
    message names it already; the page named it again)."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture")
    explorer = salience.explore("demo:shapes", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('status').className === 'error'")
            status = page.inner_text("#status")
    finally:
        explorer.stop()
    assert [e for e in errors if "400" not in e] == []  # the upload's 400 is the answer asked for
    assert status.startswith("notes.png: not an image file") and status.count("notes.png") == 1, status


def test_a_map_refused_as_bad_input_offers_no_retry(tmp_path):
    """A map refused for its settings (a 400: samples=abc, or a method the model cannot run) shows
    the message and no retry button (asking again gives the same answer: the setting must change);
    changing the setting asks again."""
    explorer, label, cell, errors = _shapes_explorer(tmp_path)
    cell = f"tr[data-row='1'] {cell}"
    try:
        with browser_page(explorer.url, errors) as page:
            page.click("#images img[data-id='f0']")
            page.locator(f"#classes button.class[data-index='{label}']").click()
            page.select_option("#method", "smoothgrad")
            page.click("#add")
            shown(page, cell, "smoothgrad")
            page.fill("tr[data-row='1'] [data-option='samples']", "abc")
            page.dispatch_event("tr[data-row='1'] [data-option='samples']", "change")
            shown(page, cell, "option samples")
            refused = page.locator(f"{cell} button.retry").is_visible()
            page.select_option("#method", "attention_rollout")  # fails in the model's worker: a job's 400
            page.click("#add")
            shown(page, "tr[data-row='2'] td.cell", "attention_rollout")
            failed = page.locator("tr[data-row='2'] td.cell button.retry").is_visible()
            said = page.inner_text("tr[data-row='2'] td.cell .state.error")
            page.fill("tr[data-row='1'] [data-option='samples']", "2")
            page.dispatch_event("tr[data-row='1'] [data-option='samples']", "change")
            shown(page, cell, "smoothgrad")
    finally:
        explorer.stop()
    assert [e for e in errors if "400" not in e] == []  # the 400 is the answer asked for
    assert not refused and not failed, said


def test_a_maps_warning_is_shown_under_it(tmp_path):
    """Integrated gradients on ``f = tanh(1e4 sum(x))`` from the black baseline warns that its map
    cannot be trusted (completeness gap): the cell shows the warning's text under its map (it went
    to the server's log only); the vanilla map of the same model shows only that it is constant
    (the gradient of ``tanh(b sum(x))`` is the same at every pixel)."""
    browser_api()
    pytest.importorskip("starlette")
    paths, _, _ = shapes_files(tmp_path, n=1)
    explorer = salience.explore(TanhSpike(1.0, 1e4), paths, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            page.click("#images img[data-id='f0']")
            page.locator("#classes button.class[data-index='0']").click()
            for method in ("integrated_gradients", "vanilla"):
                page.select_option("#method", method)
                page.click("#add")
            ig, vanilla = "tr[data-row='1'] td.cell[data-target='a:0']", "tr[data-row='2'] td.cell[data-target='a:0']"
            shown(page, ig, "integrated_gradients")
            shown(page, vanilla, "vanilla")
            note = page.locator(f"{ig} .warning")
            visible, said = note.is_visible(), note.inner_text()
            box = note.bounding_box()
            flat = page.locator(f"{vanilla} .warning").inner_text()
    finally:
        explorer.stop()
    assert not errors, errors
    assert visible and box and box["height"] > 10, box
    assert said.startswith("warning: integrated_gradients: the attributions do not sum to f(x) - f(x')"), said
    assert "cannot be trusted" in said and "--steps 256" in said
    # vanilla's gradient a b sech^2(b s) is one value at every pixel: its cell says the map is constant
    # (its picture a flat colour), not integrated gradients' gap
    assert flat.startswith("warning: the map is constant (") and "do not sum" not in flat, flat


MARKUP = '<img src=x onerror="window.pwned = 1"><b>bold</b> & co'
"""A warning holding markup: shown as these characters wherever warnings are shown, never run as HTML."""


@pytest.mark.filterwarnings("ignore::UserWarning")  # said on purpose at every forward pass
def test_warnings_are_shown_as_text_under_the_gallery_the_map_its_curves_and_sanity(tmp_path, monkeypatch):
    """A model that warns at each forward pass, and a run whose rows warn as they are read: the
    warning is shown as visible text under the gallery's table, under the map, with its curves and
    with its sanity badge (the gallery, the curves and the test said it in the server's log only),
    each time the characters as given: no element made of them, no script run."""
    import warnings

    from salience._core.info import ModelInfo, attach_info
    from salience.explore.runs import RunSource

    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=1)
    run = hand_run(tmp_path / "run", path=["one.png", "two.png"])
    rows = RunSource.rows
    monkeypatch.setattr(RunSource, "rows", lambda self, **k: warnings.warn(f"gallery {MARKUP}") or rows(self, **k))
    model = attach_info(WarnsNet(MARKUP), ModelInfo(name="warns", channels=3, input_size=(64, 64),
                                                    class_names=tuple(salience.data.CLASSES), default_layer="body.0"))
    explorer = salience.explore(model, paths, run=run, show=False)
    errors: list[str] = []
    cell = "td.cell[data-target='a:0']"
    places = {"gallery": "#run-warnings", "map": f"{cell} [data-what='warnings']",
              "curves": f"{cell} [data-what='curves'] .warning", "sanity": f"{cell} [data-what='sanity'] .warning"}
    try:
        with browser_page(explorer.url, errors, allow_404=True) as page:  # the hand-made run has no thumbnails
            page.wait_for_function("document.querySelectorAll('#run-body tr').length === 2")
            page.click("#images img[data-id='f0']")
            page.locator("#classes button.class[data-index='0']").click()
            page.select_option("#method", "vanilla")
            page.click("#add")
            shown(page, cell, "vanilla")
            for what in ("curves", "sanity"):
                page.locator(f"{cell} .tools button", has_text=what).click()
                page.locator(places[what]).wait_for()
            said = {k: page.locator(v).inner_text() for k, v in places.items()}
            visible = {k: page.locator(v).is_visible() for k, v in places.items()}
            made = {k: page.locator(f"{v} img, {v} b").count() for k, v in places.items()}
            pwned = page.evaluate("() => window.pwned")
    finally:
        explorer.stop()
    assert not errors, errors
    assert all(visible.values()), visible
    assert said == {"gallery": f"warning: gallery {MARKUP}", "map": f"warning: {MARKUP}",
                    "curves": f"curves warning: {MARKUP}", "sanity": f"sanity warning: {MARKUP}"}, said
    assert made == {k: 0 for k in places} and pwned is None


def test_a_warning_raised_while_a_thumbnail_is_read_is_shown_under_that_thumbnail(tmp_path, monkeypatch):
    """The server sends the warnings raised while it read a run's thumbnail in its
    ``X-Salience-Warnings`` header (an ``<img>`` cannot read it: the page showed nothing, they went to
    the server's log only). Row 0's method tile warns here as it is read: the page shows the text
    under that thumbnail, as characters (no element made of them, no script run), and nothing under
    the other thumbnails; every thumbnail is drawn."""
    import warnings

    from salience.explore.runs import RunSource

    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", workers=0)
    thumbnail = RunSource.thumbnail

    def read(self: Any, index: int, tile: int = 0) -> bytes:
        if (index, tile) == (0, 1):
            warnings.warn(f"thumbnail {MARKUP}")
        return thumbnail(self, index, tile)

    monkeypatch.setattr(RunSource, "thumbnail", read)
    explorer = salience.explore("demo:shapes", run=tmp_path / "run", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _wait_rows(page, [0, 1])
            page.wait_for_function("[...document.querySelectorAll('#run-body img')].every(i => i.complete && i.naturalWidth > 0)")
            said = {(row, t): page.locator(f"#run-body tr[data-id='r0-{row}'] td[data-tile='{t}'] .warning").all_inner_texts()
                    for row in (0, 1) for t in (0, 1)}
            note = page.locator("#run-body tr[data-id='r0-0'] td[data-tile='1'] .warning")
            visible, made = note.is_visible(), page.locator("#run-body .warning img, #run-body .warning b").count()
            widths = page.eval_on_selector_all("#run-body img", "imgs => imgs.map(i => i.naturalWidth)")
            pwned = page.evaluate("() => window.pwned")
    finally:
        explorer.stop()
    assert not errors, errors
    assert said == {(0, 0): [], (0, 1): [f"warning: thumbnail {MARKUP}"], (1, 0): [], (1, 1): []}, said
    assert visible and made == 0 and pwned is None
    assert len(widths) == 4 and all(w > 0 for w in widths), widths


@pytest.fixture(scope="module")
def two_row_run(tmp_path_factory) -> Any:
    """A run of 2 demo shapes explained with vanilla (``salience.explain_dataset``), made once for the
    tests that only read it; its folder. Skips without Playwright, Chromium, starlette or pyarrow."""
    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    folder = tmp_path_factory.mktemp("two_row_run")
    (folder / "imgs").mkdir()
    paths, _, _ = shapes_files(folder / "imgs", n=2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], folder / "run", workers=0)
    return folder / "run"


def test_a_stored_maps_warnings_are_shown_under_its_thumbnail(two_row_run, monkeypatch):
    """The server sends the warnings raised while it read a row's stored map in the ``.npy``'s
    ``X-Salience-Warnings`` header; the page never fetched a stored map, so they were shown nowhere.
    Each method thumbnail has a ``.npy`` button: row 0's stored map warns as it is read, and the page
    shows the text under that thumbnail, as characters (no element made, no script run), and saves
    the file (the run's float16 map as float32, the server's file name); row 1's says nothing. Clicked,
    or Enter from the keyboard, the button's action is its own: the row is not opened. A map the
    server cannot give (404) says why under its thumbnail, in place of what was said before."""
    import warnings

    from salience.explore.runs import NotStored, RunSource

    run = two_row_run
    stored_map = RunSource.stored_map
    missing: list[bool] = []

    def read(self: Any, index: int, method: str, k: int = 0) -> np.ndarray:
        if missing:
            raise NotStored("the stored map file is missing here")
        if index == 0:
            warnings.warn(f"stored {MARKUP}")
        return stored_map(self, index, method, k)

    monkeypatch.setattr(RunSource, "stored_map", read)
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    saved, said = {}, {}
    button = "#run-body tr[data-id='r0-{}'] td[data-tile='1'] button.npy"
    try:
        with browser_page(explorer.url, errors, accept_downloads=True, allow_404=True) as page:
            _wait_rows(page, [0, 1])
            for row in (0, 1):
                with page.expect_download() as download:
                    if row == 0:
                        page.click(button.format(row))
                    else:
                        page.focus(button.format(row))
                        page.keyboard.press("Enter")
                saved[row] = download.value.suggested_filename, download.value.path().read_bytes()
                said[row] = {t: page.locator(f"#run-body tr[data-id='r0-{row}'] td[data-tile='{t}'] .warning")
                             .all_inner_texts() for t in (0, 1)}
            visible = page.locator("#run-body tr[data-id='r0-0'] td[data-tile='1'] .warning").is_visible()
            made = page.locator("#run-body .warning img, #run-body .warning b").count()
            pwned, opened = page.evaluate("() => window.pwned"), page.evaluate("S.image")
            missing.append(True)
            page.click(button.format(0))
            refused = page.locator("#run-body tr[data-id='r0-0'] td[data-tile='1'] [data-what='npy']")
            page.wait_for_function("document.querySelector(\"#run-body tr[data-id='r0-0'] td[data-tile='1'] "
                                   "[data-what='npy'] .error\")")
            refused_texts = refused.all_inner_texts()
    finally:
        explorer.stop()
    assert [e for e in errors if "status of 404" not in e] == [], errors
    assert said == {0: {0: [], 1: [f"stored map warning: stored {MARKUP}"]}, 1: {0: [], 1: []}}, said
    assert visible and made == 0 and pwned is None and opened is None
    assert refused_texts == ["stored map: the stored map file is missing here"], refused_texts
    stored = salience.open_run(run)
    for row in (0, 1):
        name, data = saved[row]
        assert name == f"vanilla-row{row}-k0.npy"
        got = np.load(io.BytesIO(data), allow_pickle=False)
        assert got.dtype == np.float32 and np.array_equal(got, np.asarray(stored.map(row, "vanilla", 0), np.float32))


def test_an_old_pages_thumbnail_fetch_is_aborted_and_drawn_thumbnails_free_their_blobs(two_row_run, monkeypatch):
    """Row 0's image thumbnail is held by the server (a test hook) while the gallery is sorted the
    other way (a row a page: row 1 alone): its fetch, started for the page before, went on and drew into a tile no
    longer shown; now it is aborted (Chromium reports ``net::ERR_ABORTED``), its tile never drawn,
    and the new page's thumbnails are drawn. The thumbnails drawn before have their blob URLs
    revoked (fetching one fails) and their pictures still show (drawn on a canvas: not blank)."""
    import threading
    import warnings

    from salience.explore.runs import RunSource

    run = two_row_run
    thumbnail = RunSource.thumbnail
    started, release = threading.Event(), threading.Event()

    def read(self: Any, index: int, tile: int = 0) -> bytes:
        if (index, tile) == (0, 0) and not started.is_set():
            started.set()
            release.wait(30)
            warnings.warn("the old page's thumbnail")
        return thumbnail(self, index, tile)

    monkeypatch.setattr(RunSource, "thumbnail", read)
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    ended: dict[str, str] = {}
    held = "/rows/0/thumb.jpg?tile=0&"
    try:
        with browser_page(explorer.url, errors) as page:
            page.on("requestfailed", lambda r: ended.setdefault(r.url, r.failure or "failed") if held in r.url else None)
            page.on("requestfinished", lambda r: ended.setdefault(r.url, "finished") if held in r.url else None)
            _wait_rows(page, [0, 1])
            assert started.wait(30)
            page.wait_for_function("[...document.querySelectorAll('#run-body img')].filter(i => i.dataset.state === 'shown').length === 3")
            drawn = page.evaluate("""async () => {
                const out = [];
                for (const img of document.querySelectorAll('#run-body img[data-state="shown"]')) {
                    let fetched = true;
                    try { await fetch(img.src); } catch (e) { fetched = false; }
                    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
                    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
                    const px = ctx.getImageData(0, 0, c.width, c.height).data;
                    let lit = 0; for (let i = 0; i < px.length; i += 4) lit = Math.max(lit, px[i] + px[i + 1] + px[i + 2]);
                    out.push({ blob: img.src.startsWith('blob:'), fetched, width: img.naturalWidth, lit });
                }
                return out; }""")
            page.evaluate("window.old = document.querySelector(\"#run-body tr[data-id='r0-0'] td[data-tile='0'] img\"); R.limit = 1")
            page.select_option("#run-order", "desc")  # by index: row 1 alone
            _wait_rows(page, [1])
            page.wait_for_function("[...document.querySelectorAll('#run-body img')].every(i => i.dataset.state === 'shown')")
            release.set()
            for _ in range(100):  # the held answer comes now, unless its fetch was aborted
                if ended:
                    break
                page.wait_for_timeout(50)
            page.wait_for_timeout(200)
            old = page.evaluate("({ state: window.old.dataset.state, src: window.old.getAttribute('src'), "
                                "said: window.old.parentElement.querySelectorAll('.warning').length })")
            new = page.eval_on_selector_all("#run-body img", "imgs => imgs.map(i => [i.dataset.src, i.dataset.state])")
            text = page.inner_text("body")
    finally:
        release.set()
        explorer.stop()
    # the console's line for each revoked blob URL fetched above, and nothing else
    assert errors == ["Failed to load resource: net::ERR_FILE_NOT_FOUND"] * 3, errors
    assert len(drawn) == 3 and all(d["blob"] and not d["fetched"] and d["width"] > 0 and d["lit"] > 0 for d in drawn), drawn
    assert list(ended.values()) == ["net::ERR_ABORTED"], ended
    assert old == {"state": "aborted", "src": None, "said": 0}, old
    assert [s for _, s in new] == ["shown", "shown"] and all("/rows/1/" in u for u, _ in new), new
    assert "old page" not in text


def test_a_stored_map_is_saved_once_per_press_and_only_when_it_is_a_npy(two_row_run, monkeypatch):
    """The ``.npy`` button fetches and saves the stored map. Double-clicked while the server reads it
    (held by a test hook), it saved the file twice (two fetches, two downloads); now one. An answer
    that is not a ``.npy`` (a proxy's page sent with 200: here HTML, routed in the browser) was
    saved as ``vanilla-row1-k0.npy``; now nothing is saved and the tile says why, as text."""
    import threading

    from salience.explore.runs import RunSource

    stored_map = RunSource.stored_map
    started, release = threading.Event(), threading.Event()

    def read(self: Any, index: int, method: str, k: int = 0) -> np.ndarray:
        if index == 0 and not started.is_set():
            started.set()
            release.wait(30)
        return stored_map(self, index, method, k)

    monkeypatch.setattr(RunSource, "stored_map", read)
    explorer = salience.explore("demo:shapes", run=two_row_run, show=False)
    errors: list[str] = []
    downloads: list[Any] = []
    asked: list[str] = []
    button = "#run-body tr[data-id='r0-{}'] td[data-tile='1'] button.npy"
    try:
        with browser_page(explorer.url, errors, accept_downloads=True) as page:
            page.on("download", lambda d: downloads.append(d))
            page.on("request", lambda r: asked.append(r.url) if "/maps/" in r.url else None)
            _wait_rows(page, [0, 1])
            page.dblclick(button.format(0))
            assert started.wait(30)
            page.wait_for_timeout(300)  # a second fetch, if the second click made one, is answered now
            release.set()
            for _ in range(100):
                if downloads:
                    break
                page.wait_for_timeout(50)
            page.wait_for_timeout(500)
            twice = len(downloads), len(asked)
            page.route("**/rows/1/maps/*", lambda route: route.fulfill(
                status=200, content_type="text/html", body="<html><b>please log in</b></html>"))
            page.click(button.format(1))
            refused = "#run-body tr[data-id='r0-1'] td[data-tile='1'] [data-what='npy'] .error"
            for _ in range(200):  # said why, or saved
                if len(downloads) > twice[0] or page.locator(refused).count():
                    break
                page.wait_for_timeout(50)
            page.wait_for_timeout(300)
            said, saved_html = page.locator(refused).all_inner_texts(), len(downloads) - twice[0]
    finally:
        release.set()
        explorer.stop()
    assert not errors, errors
    # (downloads, fetches) of the double click; what the HTML answer said and the downloads it made
    assert (twice, said, saved_html) == ((1, 1), ["stored map: the answer is not a .npy file (text/html)"], 0), asked


def test_a_stored_map_of_a_method_named_with_a_quote_or_outside_latin1_is_saved_under_its_name(tmp_path):
    """A run's methods are named by its user (``methods={name: fn}``). The stored map of a method
    named with characters outside Latin-1 (``方法``) was a 500 (its ``Content-Disposition`` cannot be
    a header), and one named with a quote (``a"b``) was saved as ``a`` (the quoted name cut short):
    now each ``.npy`` button saves the map (equal to ``Run.map`` as float32) under the method's name
    (Chromium writes ``"`` in a file name as ``_``)."""
    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    from salience.methods import METHODS

    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=1)
    names = ['a"b', "方法"]
    salience.explain_dataset("demo:shapes", paths, {n: METHODS["vanilla"] for n in names}, tmp_path / "run", workers=0)
    explorer = salience.explore("demo:shapes", run=tmp_path / "run", show=False)
    errors: list[str] = []
    saved = {}
    try:
        with browser_page(explorer.url, errors, accept_downloads=True) as page:
            _wait_rows(page, [0])
            downloads: list[Any] = []
            page.on("download", lambda d: downloads.append(d))
            for tile, name in enumerate(names, start=1):
                page.click(f"#run-body tr[data-id='r0-0'] td[data-tile='{tile}'] button.npy")
                for _ in range(200):  # saved, or said why
                    if len(downloads) == tile or page.locator(f"td[data-tile='{tile}'] .error").count():
                        break
                    page.wait_for_timeout(50)
                if len(downloads) == tile:
                    saved[name] = downloads[-1].suggested_filename, downloads[-1].path().read_bytes()
                else:
                    downloads.append(None)
            said = page.locator("#run-body [data-what='npy']").all_inner_texts()
    finally:
        explorer.stop()
    assert said == ["", ""] and not errors, (said, errors, {n: v[0] for n, v in saved.items()})
    stored = salience.open_run(tmp_path / "run")
    assert saved['a"b'][0] in ('a"b-row0-k0.npy', "a_b-row0-k0.npy") and saved["方法"][0] == "方法-row0-k0.npy", saved
    for name in names:
        got = np.load(io.BytesIO(saved[name][1]), allow_pickle=False)
        assert got.dtype == np.float32 and np.array_equal(got, np.asarray(stored.map(0, name, 0), np.float32))


def test_a_failed_gallery_page_keeps_the_runs_own_warnings(tmp_path, monkeypatch):
    """The warnings said when the run was described (``api/runs``) stay under the gallery's table
    when a page of rows cannot be shown (a min above its max): they are still true; the failed page
    cleared them until the next page that succeeded."""
    import warnings

    from salience.explore.runs import RunSource

    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    run = hand_run(tmp_path / "run", path=["one.png", "two.png"], probability=[0.2, 0.7])
    describe = RunSource.describe
    monkeypatch.setattr(RunSource, "describe", lambda self: warnings.warn("described with a caveat") or describe(self))
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, allow_404=True) as page:  # the hand-made run has no thumbnails
            _wait_rows(page, [0, 1])
            before = page.inner_text("#run-warnings")
            _enter(page, "#run-pmin", "0.9")
            _enter(page, "#run-pmax", "0.1")
            page.wait_for_function("document.getElementById('run-page').textContent.startsWith('no rows shown')")
            after, visible = page.inner_text("#run-warnings"), page.locator("#run-warnings").is_visible()
    finally:
        explorer.stop()
    assert [e for e in errors if "404" not in e] == []
    assert before == after == "warning: described with a caveat" and visible, (before, after, visible)


def test_a_failed_gallery_page_clears_the_rows_until_the_next_answer(tmp_path):
    """A gallery request that fails (here the server's 503 for the descending order) leaves no rows
    of the settings before in the table, looking current: the rows are cleared and the table says why;
    the next request that succeeds shows its rows. Paging (a row a page): each end's button is off. A
    bound that is not a number (typed "1e") says so (the rows were shown as if no bound were set)."""
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    paths, _, _ = shapes_files(tmp_path, n=2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", shard_size=2, batch_size=2,
                             workers=0)
    explorer = salience.explore("demo:shapes", run=tmp_path / "run", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _wait_rows(page, [0, 1])
            page.route("**/rows?*order=desc*", lambda route: route.fulfill(
                status=503, content_type="application/json", body=json.dumps({"error": "the run cannot be read now"})))
            page.select_option("#run-order", "desc")
            page.wait_for_function("document.getElementById('status').className === 'error'")
            after_failure = _rows_shown(page), page.inner_text("#run-page")
            page.evaluate("R.limit = 1")
            page.select_option("#run-order", "asc")
            _wait_rows(page, [0])
            restored = page.inner_text("#run-page"), page.inner_text("#status")
            ends = [page.is_disabled(f"#run-{b}") for b in ("prev", "next")]
            page.click("#run-next")
            _wait_rows(page, [1])
            ends += [page.is_disabled(f"#run-{b}") for b in ("prev", "next")]
            page.focus("#run-pmin")
            page.keyboard.type("1e")  # not a number: the field's value is "" and no change fires
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('run-page').className === 'error'")
            bad_number = _rows_shown(page), page.inner_text("#run-page")
    finally:
        explorer.stop()
    assert [e for e in errors if "503" not in e] == []  # the 503 is the answer asked for
    assert after_failure == ([], "no rows shown: the run cannot be read now")
    assert restored == ("1–1 of 2", "ready")
    assert ends == [True, False, False, True]
    assert bad_number == ([], "no rows shown: probability min: not a number")



def _edited_run(tmp_path, edit):
    """A dataset run of 3 demo shapes whose ``index.parquet`` is rewritten as ``edit(table)`` returns
    it (another program's table); its folder. Skips without Playwright, Chromium or pyarrow."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    pq = pytest.importorskip("pyarrow.parquet")
    paths, _, _ = shapes_files(tmp_path, n=3)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", shard_size=3, batch_size=3,
                             workers=0)
    pq.write_table(edit(pq.read_table(tmp_path / "run" / "index.parquet")), tmp_path / "run" / "index.parquet")
    return tmp_path / "run"


def test_the_gallery_leaves_out_a_repeated_index_and_says_which_and_what_to_do(tmp_path):
    """A run's ``index.parquet`` with index 1 in two rows (a bad merge): the page listed both rows as
    ``r0-1``, which opened nothing but a 409; now it shows the rows that open, and says under the
    table which index is repeated and what to do."""
    pa = pytest.importorskip("pyarrow")
    run = _edited_run(tmp_path, lambda table: pa.concat_tables(
        [table, table.slice(2, 1).set_column(0, "index", pa.array([1], pa.int64()))]))
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _wait_rows(page, [0, 2])
            page.wait_for_timeout(300)  # no later answer adds rows
            shown_rows, said, cls = _rows_shown(page), page.inner_text("#run-page"), page.get_attribute("#run-page",
                                                                                                          "class")
    finally:
        explorer.stop()
    assert not errors, errors
    assert shown_rows == [0, 2]
    assert said.startswith("1–2 of 2; 2 row(s) left out: ") and cls == "error", said
    assert "1 index value(s) to more than one row (2 rows; index 1)" in said, said
    assert "df.drop_duplicates('index')" in said and "delete index.parquet" in said, said


def test_the_gallery_of_a_table_without_paths_shows_its_rows(tmp_path):
    """A run's ``index.parquet`` without a ``path`` column (written by another program): the page
    read ``row.path.split`` of every row, stopped at the first with a script error and never got
    ready; now every row is listed, its file name cell empty, and the page is ready without an error."""
    run = _edited_run(tmp_path, lambda table: table.drop_columns(["path"]))
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _wait_rows(page, [0, 1, 2])
            names = page.eval_on_selector_all("#run-body tr", "trs => trs.map(t => t.children[3].textContent)")
    finally:
        explorer.stop()
    assert not errors, errors
    assert names == ["", "", ""], names


def test_a_row_beside_one_without_an_index_opens_and_the_empty_one_is_named(tmp_path):
    """A run's ``index.parquet`` whose row 1 has an empty (null) index: the page listed rows 0 and 2
    whose every link (thumbnails, picture, classes) answered 409; now they open (row 2's picture,
    its five classes, its thumbnails), and the table says which row it left out and why."""
    pa = pytest.importorskip("pyarrow")
    run = _edited_run(tmp_path, lambda table: table.set_column(0, "index", pa.array([0, None, 2], pa.int64())))
    explorer = salience.explore("demo:shapes", run=run, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            _wait_rows(page, [0, 2])
            # each thumbnail fetched and drawn, or not ("gone"): an <img> before its fetch has no src and is complete
            page.wait_for_function("[...document.querySelectorAll('#run-body img')].every(i => ['shown', 'gone'].includes(i.dataset.state))")
            thumbs = page.eval_on_selector_all("#run-body img", "imgs => imgs.map(i => i.naturalWidth)")
            said = page.inner_text("#run-page")
            page.click("#run-body tr[data-id='r0-2']")
            page.wait_for_function("document.querySelectorAll('#classes button.class').length === 5")
            opened = (page.locator("#preview").is_visible(), page.locator("#picture-error").is_visible(),
                      page.evaluate("document.getElementById('preview').naturalWidth"))
    finally:
        explorer.stop()
    assert not errors, errors
    assert thumbs and all(w > 0 for w in thumbs), thumbs
    assert opened == (True, False, 64), opened
    assert said.startswith("1–2 of 2; 1 row(s) left out: "), said
    assert "1 row(s) without an index (the first: row 1)" in said, said


def _rows_asked(page) -> list[dict]:
    """Every gallery request the page makes from now on, as its query (a list it appends to)."""
    from urllib.parse import parse_qsl, urlsplit

    asked: list[dict] = []
    page.on("request", lambda r: asked.append(dict(parse_qsl(urlsplit(r.url).query)))
            if urlsplit(r.url).path.endswith("/rows") else None)
    return asked


def _enter(page, field: str, value: str) -> None:
    """Type ``value`` into the number field and leave it (fill alone fires no change)."""
    page.fill(field, value)
    page.dispatch_event(field, "change")


def test_the_gallery_sends_only_the_bounds_it_shows(tmp_path):
    """What the gallery's number fields show is what is applied: set back to "—", the metric's
    min / max are emptied and off (they kept their numbers, ignored); a probability outside 0..1
    (-1, 2) is not sent, the table says so (it was sent, and every row shown); a min above its max
    is said too (an empty table without a word)."""
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    hand_run(tmp_path / "run", path=["a.png", "b.png", "c.png"], probability=[0.1, 0.5, 0.9],
             **{"vanilla.deletion": [0.2, 0.4, 0.6]})
    explorer = salience.explore("demo:shapes", run=tmp_path / "run", show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, allow_404=True) as page:  # no thumbnails in this run: 404
            _wait_rows(page, [0, 1, 2])
            page.select_option("#run-metric", "vanilla.deletion")
            _enter(page, "#run-min", "0.5")
            _wait_rows(page, [2])
            page.select_option("#run-metric", "")
            _wait_rows(page, [0, 1, 2])
            metric_off = [(page.input_value(f), page.is_disabled(f)) for f in ("#run-min", "#run-max")]
            said = []
            for field, value in (("#run-pmin", "-1"), ("#run-pmax", "2")):
                _enter(page, field, value)
                page.wait_for_function("document.getElementById('run-page').className === 'error'")
                said.append((_rows_shown(page), page.inner_text("#run-page")))
                _enter(page, field, "")
                _wait_rows(page, [0, 1, 2])
            # a min above its max selects nothing: said (the table was empty without a word)
            _enter(page, "#run-pmin", "0.9")
            _wait_rows(page, [2])
            _enter(page, "#run-pmax", "0.1")
            page.wait_for_function("document.getElementById('run-page').className === 'error'")
            said.append((_rows_shown(page), page.inner_text("#run-page")))
    finally:
        explorer.stop()
    assert [e for e in errors if "404" not in e] == []
    assert metric_off == [("", True), ("", True)]
    assert said == [([], "no rows shown: probability min: must be from 0 to 1"),
                    ([], "no rows shown: probability max: must be from 0 to 1"),
                    ([], "no rows shown: probability min 0.9 is above max 0.1")]


def test_another_run_keeps_the_settings_that_apply_and_sends_no_disabled_filter(tmp_path):
    """Switching from a run with labels to one without: right / wrong is reset and off and not sent
    (it was sent, and the server refused the page: "this run has no labels"); the sort column,
    order and probability bounds, which the other run has too, are kept; the class and the metric
    it lacks are reset (the metric's bounds emptied and off)."""
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    hand_run(tmp_path / "a", labels=True, path=["a.png", "b.png", "c.png"], probability=[0.1, 0.5, 0.9],
             predicted=[1, 0, 1],
             predicted_name=["square", "circle", "square"], label=[1, 0, 0], correct=[True, True, False],
             **{"vanilla.deletion": [0.2, 0.4, 0.6]})
    hand_run(tmp_path / "b", path=["d.png", "e.png", "f.png"], probability=[0.3, 0.6, 0.8],
             predicted=[4, 4, 3],
             predicted_name=["ring", "ring", "cross"])
    explorer = salience.explore("demo:shapes", run=[tmp_path / "a", tmp_path / "b"], show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, allow_404=True) as page:  # no thumbnails in these runs: 404
            _wait_rows(page, [0, 1, 2])
            for sel, value in (("#run-sort", "probability"), ("#run-order", "desc"), ("#run-correct", "true"),
                               ("#run-class", "square"), ("#run-metric", "vanilla.deletion")):
                page.select_option(sel, value)
            _enter(page, "#run-pmin", "0.05")
            _enter(page, "#run-min", "0.1")
            _wait_rows(page, [0])
            asked = _rows_asked(page)
            page.select_option("#run", "r1")
            page.wait_for_function("document.querySelector('#run-body tr')?.dataset.id.startsWith('r1-')")
            shown_rows = [int(i) for i in page.eval_on_selector_all(
                "#run-body tr", "trs => trs.map(t => t.dataset.id.split('-')[1])")]
            fields = {f: (page.input_value(f), page.is_disabled(f))
                      for f in ("#run-sort", "#run-order", "#run-correct", "#run-class", "#run-pmin", "#run-metric",
                                "#run-min")}
    finally:
        explorer.stop()
    assert [e for e in errors if "404" not in e] == []
    assert asked[-1] == {"sort": "probability", "order": "desc", "min_probability": "0.05", "offset": "0",
                         "limit": "50"}, asked
    assert shown_rows == [2, 1, 0]
    assert fields == {"#run-sort": ("probability", False), "#run-order": ("desc", False),
                      "#run-correct": ("", True), "#run-class": ("", False), "#run-pmin": ("0.05", False),
                      "#run-metric": ("", False), "#run-min": ("", True)}

def test_images_dropped_anywhere_on_the_page_are_all_uploaded(tmp_path):
    """Two image files dropped on the page (beside the drop box, on the grid): both are uploaded and
    the first is opened (only the first was; a drop outside the box was left to the browser, which
    replaces the page by the file, losing everything on it)."""
    import base64

    pytest.importorskip("starlette")
    paths, labels, _ = shapes_files(tmp_path, n=2)
    explorer = salience.explore("demo:shapes", show=False)
    errors: list[str] = []
    files = [(p.name, base64.b64encode(p.read_bytes()).decode()) for p in paths]
    try:
        with browser_page(explorer.url, errors) as page:
            dropped = page.evaluate_handle("""(files) => { const dt = new DataTransfer();
                for (const [name, b64] of files) dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))],
                                                                     name, { type: "image/png" }));
                return dt; }""", files)
            over = page.evaluate("""(dt) => { const e = new DragEvent("dragover", { dataTransfer: dt, bubbles: true,
                cancelable: true }); document.getElementById("grid").dispatchEvent(e); return e.defaultPrevented; }""",
                                 dropped)
            page.dispatch_event("#grid", "drop", {"dataTransfer": dropped})
            page.wait_for_function("document.querySelectorAll('#images img').length === 2")
            names = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => i.title)")
            page.locator(f"#classes button.class[data-index='{int(labels[0])}']").wait_for()
            current = page.get_attribute("#images img.current", "title")
    finally:
        explorer.stop()
    assert not errors, errors
    assert over  # the page takes the drop (else the browser opens the file in its place)
    assert sorted(names) == ["shape0.png", "shape1.png"] and current == "shape0.png"


def test_the_drop_box_is_lit_only_while_files_are_dragged_over_the_page(tmp_path):
    """The drop box's highlight while files are dragged: kept over the box's own children, put out
    when the drag leaves the window, and after a drag cancelled over the page (Escape) within a
    second with no mouse move (it stayed lit until the next one: Chromium sends nothing to the page
    for a cancelled drag, no dragleave, no dragend), or at once on a mouse move. A pointer resting
    without a dragover: out too, lit again by the next dragover. Dispatched DragEvents, then
    Chromium's own drag of a file (DevTools' Input.dispatchDragEvent: its dragenter / dragleave
    sequence; Chromium fires only a dragenter when the pointer reaches another element, a dragover
    after)."""
    import base64
    import time

    sync_api = browser_api()
    pytest.importorskip("starlette")
    (path,), _, _ = shapes_files(tmp_path, n=1)
    explorer = salience.explore("demo:shapes", show=False)
    errors: list[str] = []
    lit = "document.getElementById('drop').classList.contains('over')"
    try:
        with browser_page(explorer.url, errors) as page:
            seen = page.evaluate("""(b64) => {
                const dt = new DataTransfer();
                dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "a.png", { type: "image/png" }));
                const box = document.getElementById("drop"), child = document.getElementById("choose"), seen = [];
                const send = (type, at, related) => at.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true,
                    cancelable: true, relatedTarget: related }));
                const lit = () => seen.push(box.classList.contains("over"));
                send("dragenter", box, null); send("dragover", box, null); lit();
                send("dragenter", child, box); send("dragleave", box, child); lit();
                send("dragenter", box, child); send("dragleave", child, box); lit();
                send("dragleave", box, null); lit();
                send("dragenter", box, null); send("dragover", box, null); send("dragend", box, null); lit();
                return seen; }""", base64.b64encode(path.read_bytes()).decode())
            cdp = page.context.new_cdp_session(page)
            data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}

            def drag(kind: str, x: float, y: float) -> bool:
                cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
                return page.evaluate(lit)

            box, child, grid = (page.locator(s).bounding_box() for s in ("#drop", "#choose", "#grid"))
            inside = [drag("dragEnter", box["x"] + 4, box["y"] + 4), drag("dragOver", box["x"] + 4, box["y"] + 4),
                      drag("dragOver", child["x"] + 3, child["y"] + 3), drag("dragOver", box["x"] + 4, box["y"] + 4),
                      drag("dragOver", grid["x"] + 4, grid["y"] + 4)]
            left = drag("dragOver", 1300, 950)  # past the 1200 x 900 window
            back = [drag("dragOver", grid["x"] + 4, grid["y"] + 4), drag("dragOver", grid["x"] + 6, grid["y"] + 6)]
            page.evaluate("window.moves = 0; window.addEventListener('mousemove', () => { window.moves += 1; })")

            def goes_out() -> float:
                """Seconds until the box is out with no input at all (inf: still lit after 4 s)."""
                start = time.monotonic()
                try:
                    page.wait_for_function(f"!{lit}", timeout=4000, polling=20)
                except sync_api.TimeoutError:
                    return float("inf")
                return time.monotonic() - start

            resting = goes_out()  # the pointer rests over the grid: no dragover comes
            relit = drag("dragOver", grid["x"] + 6, grid["y"] + 6)
            drag("dragCancel", grid["x"] + 6, grid["y"] + 6)  # Escape: nothing reaches the page
            cancelled = goes_out()
            moves = page.evaluate("window.moves")
            drag("dragEnter", grid["x"] + 4, grid["y"] + 4)
            relit2 = drag("dragOver", grid["x"] + 4, grid["y"] + 4)
            drag("dragCancel", grid["x"] + 4, grid["y"] + 4)
            page.mouse.move(grid["x"] + 40, grid["y"] + 40)
            moved = page.evaluate(lit)
    finally:
        explorer.stop()
    assert not errors, errors
    assert seen == [True, True, True, False, False]
    assert inside == [True] * 5 and not left and back == [True, True]
    assert resting < 2.0 and relit, (resting, relit)
    assert cancelled < 2.0 and moves == 0, (cancelled, moves)
    assert relit2 and not moved


PIXELS = """sel => [...document.querySelectorAll(sel)].map(c =>
    Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).join())"""
"""The RGBA bytes of each canvas matched by a selector, each as one comma-joined string: Playwright checks a returned
array element by element in Python (a list of 1.2 M numbers took most of a test's 30 s), a string at once."""


def _ints(joined: str) -> np.ndarray:
    """The numbers of a comma-joined string (:data:`PIXELS`, the preview's pixels), as int32 (n,)."""
    return np.array(joined.split(","), dtype=np.int32) if joined else np.zeros(0, np.int32)


def _gray_net() -> Any:
    """A 1-channel model (no demo model is gray): conv, ReLU, pooling, 5 classes, its layer
    ``features.0`` for Grad-CAM; random weights (seeded), as a map's shape is not checked here."""
    import torch
    from torch import nn

    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("head", nn.Linear(6, 5))
    return attach_info(net.eval(), ModelInfo(name="gray", channels=1, input_size=(64, 64),
                                             class_names=tuple(salience.data.CLASSES), default_layer="features.0"))


@pytest.mark.parametrize("gray_slot", ["a", "b"])
def test_two_models_of_different_channels_side_by_side(tmp_path, gray_slot):
    """--compare with a gray (1-channel) model and an RGB one, either way round: each model's row of
    cells shows its own vanilla and Grad-CAM maps on its own picture (the gray model's R == G == B,
    the RGB model's in colour; the image panel is model a's), with no error shown and none in the
    console."""
    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, _, _ = shapes_files(tmp_path, n=1)
    rgb, gray = salience.load_model("demo:shapes"), _gray_net()
    a, b = (gray, rgb) if gray_slot == "a" else (rgb, gray)
    explorer = salience.explore(a, paths, compare=b, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, viewport={"width": 1400, "height": 1000}) as page:
            page.click("#images img[data-id='f0']")
            for slot in ("a", "b"):
                page.locator(f"#classes button.class[data-model='{slot}']").first.click()
            cells = {s: f"td.cell[data-target^='{s}:']" for s in ("a", "b")}
            page.select_option("#method", "vanilla")
            page.click("#add")
            page.select_option("#method", "gradcam")
            page.click("#add")
            for slot in ("a", "b"):
                for method in ("vanilla", "gradcam"):
                    page.wait_for_function(
                        f"[...document.querySelectorAll(\"{cells[slot]} .state\")]"
                        f".some(s => s.textContent.startsWith('{method}'))")
            states = page.eval_on_selector_all("td.cell .state", "ss => ss.map(s => [s.className, s.textContent])")
            page.fill("#opacity", "0")  # the pictures alone
            pictures = {s: np.concatenate([_ints(c) for c in page.evaluate(PIXELS, f"{cells[s]} canvas")])
                        .reshape(-1, 4) for s in ("a", "b")}  # both cells of each model
            page.select_option("#cmap", "gray")
            page.fill("#opacity", "1")  # the maps alone
            maps = [_ints(m) for s in ("a", "b") for m in page.evaluate(PIXELS, f"{cells[s]} canvas")]
            preview = page.evaluate("""() => { const i = document.getElementById('preview'), c =
                document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
                const x = c.getContext('2d'); x.drawImage(i, 0, 0);
                return Array.from(x.getImageData(0, 0, c.width, c.height).data).join(); }""")
            shown_error = page.evaluate("""() => [document.getElementById('picture-error').hidden,
                document.getElementById('status').className]""")
    finally:
        explorer.stop()
    assert not errors, errors
    assert len(states) == 4 and all(cls == "state" and text.split(" ")[0] in ("vanilla", "gradcam")
                                    for cls, text in states), states
    assert shown_error[0] and "error" not in shown_error[1], shown_error
    gray_px, rgb_px = pictures[gray_slot][:, :3], pictures["b" if gray_slot == "a" else "a"][:, :3]
    assert (gray_px[:, 0] == gray_px[:, 1]).all() and (gray_px[:, 1] == gray_px[:, 2]).all()
    assert np.abs(rgb_px[:, 0] - rgb_px[:, 1]).max() > 50  # the colour image
    assert gray_px.max() > gray_px.min() + 50  # a picture, not a blank
    assert len(maps) == 4
    for m in maps:  # each cell a map: the gray colormap over the whole range
        m = m.reshape(-1, 4)[:, :3]
        assert m.max() > 200 and m.min() < 60, (m.min(), m.max())
    preview = _ints(preview).reshape(-1, 4)[:, :3]
    assert ((preview[:, 0] == preview[:, 2]).all()) == (gray_slot == "a")  # the image panel is model a's picture


def test_three_models_side_by_side(tmp_path):
    """--compare given twice: three models, each its own column of classes and cells, each cell's
    vanilla map drawn (a map over the whole gray range), no error shown and none in the console."""
    import dataclasses

    from salience._core.info import attach_info

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("starlette")
    paths, _, _ = shapes_files(tmp_path, n=1)
    a, b = salience.load_model("demo:shapes"), salience.load_model("demo:shapes-cue")
    c = attach_info(RenamedLayersNet(), dataclasses.replace(a.salience_info, name="other", default_layer=None))
    explorer = salience.explore(a, paths, compare=[b, c], show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors, viewport={"width": 1600, "height": 1000}) as page:
            models = page.evaluate("document.getElementById('models').textContent")
            page.click("#images img[data-id='f0']")
            for slot in "abc":
                page.locator(f"#classes button.class[data-model='{slot}']").first.click()
            page.select_option("#method", "vanilla")
            page.click("#add")
            for slot in "abc":
                shown(page, f"td.cell[data-target^='{slot}:']", "vanilla")
            heads = page.eval_on_selector_all("#grid-head th", "ths => ths.map(t => t.firstChild.textContent)")
            states = page.eval_on_selector_all("td.cell .state", "ss => ss.map(s => [s.className, s.textContent])")
            page.select_option("#cmap", "gray")
            page.fill("#opacity", "1")  # the maps alone
            maps = {s: _ints(page.evaluate(PIXELS, f"td.cell[data-target^='{s}:'] canvas")[0]) for s in "abc"}
            status = page.get_attribute("#status", "class")
    finally:
        explorer.stop()
    assert not errors, errors
    assert models == "a: demo:shapes  vs  b: demo:shapes-cue  vs  c: other", models
    assert [h.split(":")[0] for h in heads[1:]] == ["a", "b", "c"], heads
    assert len(states) == 3 and all(cls == "state" and text.startswith("vanilla") for cls, text in states), states
    assert "error" not in (status or "")
    for slot, m in maps.items():  # each cell a map: the gray colormap over the whole range
        m = m.reshape(-1, 4)[:, :3]
        assert m.max() > 200 and m.min() < 60, (slot, m.min(), m.max())


def test_the_gallery_says_a_runs_constant_maps_under_their_thumbnails_and_under_the_table(tmp_path):
    """Two runs of demo:shapes with --top 2: r0 with its head's row of class 1 zero (the maps of class
    1 are zero, those of class 0 see), r1 with the whole head zero (every map zero). A thumbnail is an
    ``<img>``: it cannot read the ``X-Salience-Warnings`` header, and a flat picture says nothing of
    why. The page says it as text under the method's thumbnail, from the run's ``METHOD.constant``
    column (the whole note on hover), and the run-level note (the command line's end-of-run text)
    under the table; a map that sees has no such text."""
    import torch

    from salience.render import viz

    browser_api()
    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=2)
    model = salience.load_model("demo:shapes")
    names = model.salience_info.class_names
    with torch.no_grad():
        model.head.weight[1] = 0
        model.head.bias.copy_(torch.tensor([100.0, 50.0, -100.0, -100.0, -100.0]))  # top 2: classes 0, 1
    salience.explain_dataset(model, paths, ["vanilla"], tmp_path / "run0", top=2, workers=0)
    with torch.no_grad():
        model.head.weight.zero_()
    salience.explain_dataset(model, paths, ["vanilla"], tmp_path / "run1", top=2, workers=0)
    note = viz.constant_map_note(np.zeros(2))
    explorer = salience.explore(model, run=[tmp_path / "run0", tmp_path / "run1"], show=False)
    errors: list[str] = []
    shown_runs = {}
    try:
        with browser_page(explorer.url, errors) as page:
            for run in ("r0", "r1"):
                if run != "r0":
                    page.select_option("#run", run)
                page.wait_for_function(f"[...document.querySelectorAll('#run-body tr')].map(t => t.dataset.id).join() "
                                       f"=== '{run}-0,{run}-1'")
                page.wait_for_function("!document.getElementById('run-warnings').hidden")
                cells = {}
                for row in (0, 1):
                    base = f"#run-body tr[data-id='{run}-{row}']"
                    flat = page.locator(f"{base} td[data-tile='1'] .flat")
                    cells[row] = {"texts": flat.all_inner_texts(), "titles": [flat.nth(i).get_attribute("title")
                                                                              for i in range(flat.count())],
                                  "visible": all(flat.nth(i).is_visible() for i in range(flat.count())),
                                  "image": page.locator(f"{base} td[data-tile='0'] .flat").count()}
                shown_runs[run] = {"cells": cells, "warnings": page.inner_text("#run-warnings"),
                                   "visible": page.locator("#run-warnings").is_visible()}
    finally:
        explorer.stop()
    assert not errors, errors
    r0, r1 = shown_runs["r0"], shown_runs["r1"]
    for row in (0, 1):  # r0: class 1's map flat (said with its name), class 0's (the thumbnail's) sees: not said
        assert r0["cells"][row] == {"texts": [f"class {names[1]}: constant map (0)"], "titles": [note], "visible": True,
                                    "image": 0}, r0
        # r1: both targets' maps flat, the thumbnail's first
        assert r1["cells"][row] == {"texts": ["constant map (0)", f"class {names[1]}: constant map (0)"],
                                    "titles": [note, note], "visible": True, "image": 0}, r1
    assert r0["visible"] and r1["visible"]
    assert r0["warnings"].startswith("warning: vanilla, 2 of 2 image(s) (") and "(class 1)" in r0["warnings"]
    assert note in r0["warnings"] and "2 map(s)" in r0["warnings"]
    assert r1["warnings"].startswith("warning: vanilla, 2 of 2 image(s) (") and "4 map(s)" in r1["warnings"]
    assert note in r1["warnings"]
