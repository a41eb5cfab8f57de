"""Take docs/images/explore.png: the explorer on demo:shapes in headless Chromium.

    python scripts/explore_screenshot.py [--out docs/images/explore.png] [--chromium /usr/bin/chromium]

Three demo shapes images are named; the page picks the first, adds its two top classes as
columns and vanilla, Grad-CAM and SmoothGrad as rows, then the insertion / deletion curves and
the sanity badge of the Grad-CAM map of the top class.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import salience  # noqa: E402
from explore_helpers import shapes_files  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def done(page, n: int) -> None:
    page.wait_for_function(f"[...document.querySelectorAll('td.cell .state')].filter(s => s.textContent.includes('·')).length >= {n}",
                           timeout=120_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/explore.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        shapes_files(Path(tmp), n=3)
        explorer = salience.explore("demo:shapes", [tmp], show=False)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(explorer.url)
                page.wait_for_function("document.getElementById('status').textContent === 'ready'")
                page.click("#images img[data-id='f0']")
                page.locator("#classes button.class").nth(1).wait_for()
                for k in range(2):
                    page.locator("#classes button.class").nth(k).click()
                for method in ("vanilla", "gradcam", "smoothgrad"):
                    page.select_option("#method", method)
                    page.click("#add")
                done(page, 6)
                cell = page.locator("tr[data-row='2'] td.cell").first
                cell.get_by_text("curves").click()
                cell.locator("canvas.curves").wait_for(timeout=60_000)
                cell.get_by_text("sanity").click()
                cell.locator(".badge").wait_for(timeout=120_000)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            explorer.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
