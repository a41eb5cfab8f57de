"""What the explorer's tests share: demo shapes images on disk (with their masks), polling, and
the real browser (Debian's headless Chromium driven by Playwright)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

SEED = 4242
CHROMIUM = os.environ.get("SALIENCE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def browser_api() -> Any:
    """Playwright's sync API, or a skip naming what to install (the README's test command installs both)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)")
    return sync_api


def shapes_files(folder: Path, n: int = 4, seed: int = SEED) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """``n`` demo shapes images saved as PNG in ``folder``; their labels ``(n,)`` and masks ``(n, 64, 64)``."""
    from PIL import Image

    from salience.demo import data

    images, labels, masks = data.shapes(n, seed)
    paths = []
    for i in range(n):
        p = folder / f"shape{i}.png"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(p)
        paths.append(p)
    return paths, labels, masks


def hand_run(folder: Path, labels: bool = False, **columns: Any) -> Path:
    """A run folder written by hand, not by ``salience explain`` (as tests/test_explore_gallery.py
    writes them): ``run.json`` (demo:shapes, method vanilla) and ``index.parquet`` with the column
    ``index`` (0, 1, ...: as many as the first column given, else 2) and the ``columns`` given (no
    thumbnails, no maps, no ``shard`` / ``offset`` unless given)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import FORMAT

    n = len(next(iter(columns.values()))) if columns else 2
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"format": FORMAT, "methods": ["vanilla"], "labels": labels,
                                                 "metrics": [], "command": {"model": "demo:shapes",
                                                                            "inputs": {"count": n}}}))
    pq.write_table(pa.table({"index": pa.array(range(n), pa.int64()), **columns}), folder / "index.parquet")
    return folder


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def wait_job(get, answer: dict, timeout: float = 60.0) -> dict:
    """Poll ``api/jobs/ID`` with ``get(url) -> dict`` until the job has ended."""
    end = time.monotonic() + timeout
    while answer.get("state") in ("queued", "running"):
        assert time.monotonic() < end, f"job did not end in {timeout} s: {answer}"
        time.sleep(0.02)
        answer = get(f"api/jobs/{answer['job']}")
    return answer


def npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def forget(hub) -> None:
    """Drop every result and decoded image the server keeps, as its least-recently-used caches do
    in a long session (the maps and images of other pictures push them out)."""
    with hub.cache._lock:
        hub.cache._items.clear()
        hub.cache.bytes = 0
    with hub.images._lock:
        hub.images._decoded.clear()


def image_endpoints(client, image_id: str, key: str) -> dict:
    """Every endpoint that reads image ``image_id``, by name -> its response; ``key``: a map of that
    image (the maps' endpoints read the image again when the map is no longer cached)."""
    return {"picture": client.get(f"api/images/{image_id}/picture.png"),
            "top": client.get("api/models/a/top", params={"image": image_id}),
            "explain": client.post("api/explain", json={"model": "a", "image": image_id, "method": "vanilla",
                                                        "target": 0}),
            "curves": client.post(f"api/maps/{key}/curves"), "sanity": client.post(f"api/maps/{key}/sanity"),
            "figure": client.get("api/figure.png", params={"keys": key})}


def block_worker(hub, slot: str = "a"):
    """A job that holds ``slot``'s worker until the returned event is set (later jobs wait in line)."""
    import threading

    release = threading.Event()
    hub.submit(hub.slots[slot], "hold", lambda t: release.wait(60))
    return release


_SHARED: dict[str, Any] = {}


def _shared_browser() -> Any:
    """One headless Chromium for the tests of a module (launching one costs ~3 s a test; each page gets its
    own context, as isolated as a fresh browser: cookies, storage, cache); tests/conftest.py closes it after
    the module's last test (while it runs, ``asyncio.run`` is refused in this thread)."""
    browser = _SHARED.get("browser")
    if browser is not None and browser.is_connected():
        return browser
    close_shared_browser()
    playwright = browser_api().sync_playwright().start()
    try:
        _SHARED["browser"] = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except BaseException:
        playwright.stop()
        raise
    _SHARED["playwright"] = playwright
    return _SHARED["browser"]


def close_shared_browser() -> None:
    """Close the Chromium of :func:`browser_page` and its Playwright, if started."""
    browser, playwright = _SHARED.pop("browser", None), _SHARED.pop("playwright", None)
    try:
        if browser is not None:
            browser.close()
    finally:
        if playwright is not None:
            playwright.stop()


@contextlib.contextmanager
def browser_context(**options: Any) -> Iterator[Any]:
    """A fresh context (``browser.new_context(**options)``: its own cookies, storage and cache, as a new browser's)
    of the module's shared headless Chromium, closed after. Skips when Playwright or Chromium is missing."""
    context = _shared_browser().new_context(**options)
    try:
        yield context
    finally:
        context.close()


@contextlib.contextmanager
def browser_page(url: str, errors: list[str], *, allow_404: bool = False, **page_options: Any) -> Iterator[Any]:
    """A page of the explorer at ``url`` in headless Chromium (in a fresh browser context), ready (the status
    bar says so), closed after; its script errors and console errors collected in ``errors`` (but "status of
    404" lines with ``allow_404``). Skips when Playwright or Chromium is missing."""
    with browser_context(**{"viewport": {"width": 1200, "height": 900}, **page_options}) as context:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and not (allow_404 and "status of 404" in m.text) else None)
        page.set_default_timeout(30_000)
        page.goto(url)
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        yield page


def shown(page: Any, cell: str, start: str) -> None:
    """Wait until the map cell ``cell`` (a selector) says something starting with ``start``."""
    page.wait_for_function(f"document.querySelector(\"{cell} .state\")?.textContent.startsWith({start!r})")
