"""The explorer in a real browser: Debian's headless Chromium driven by Playwright, against a real
uvicorn server on 127.0.0.1 and a free port. As a person uses it: open the page, upload a demo
shapes image, click its class, add Grad-CAM, wait for the map, change the sliders, download the
figure. The map drawn on the page is read back from a screenshot and must be bright where the
shape is (the mask is known exactly) and dark elsewhere."""
from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

import salience
from explore_helpers import shapes_files

CHROMIUM = os.environ.get("SALIENCE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
INSIDE_OVER_OUTSIDE = 2.0
"""Least ratio of the map's mean brightness on the shape to off it. Grad-CAM's raw map on this
image (demo:shapes, seed 4242, image 0, a cross) is 5.0x stronger on the mask than off it
(measured with salience.gradcam); the page's percentile clip and the screenshot blur it a little."""


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)")
    return sync_api


def _luminance(png: bytes, size=None) -> np.ndarray:
    """A PNG's brightness; ``size`` (w, h): resized to it (an element's screenshot may be a pixel
    larger than its CSS size, by the layout's rounding)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    return np.asarray(img if size is None else img.resize(size, Image.BILINEAR), dtype=np.float64)


def test_a_person_uses_the_page(tmp_path):
    sync_api = _browser()
    pytest.importorskip("starlette")
    paths, labels, masks = shapes_files(tmp_path, n=1)
    label = int(labels[0])
    explorer = salience.explore("demo:shapes", show=False)
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(accept_downloads=True, viewport={"width": 1200, "height": 900})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.set_default_timeout(30_000)
                page.goto(explorer.url)
                page.wait_for_function("document.getElementById('status').textContent === 'ready'")

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
                browser.close()
    finally:
        explorer.stop()
    assert not errors, errors

    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and _luminance(figure).shape[1] > 3 * 160
    lum = _luminance(shot, (192, 192))  # the map alone (opacity 1), gray colormap: brightness rises with |value|
    mask = np.kron(masks[0].numpy(), np.ones((3, 3), dtype=bool))  # 64 -> 192 pixels, as drawn
    inside, outside = lum[mask].mean(), lum[~mask].mean()
    assert lum.max() > 200, "the map is empty"
    assert inside > INSIDE_OVER_OUTSIDE * outside, (inside, outside)
