"""load_image reads a file through one handle: opens by name per call (a count, which load does not change) and
Pillow's decoding of a path against that of an open handle (wall time, alternating rounds, min / median / max).

    PYTHONPATH=src python benchmarks/load_handle_s60.py > benchmarks/load-handle-s60.md

Images: 1024 x 1024 random RGB, an 8-bit PNG, a 16-bit PNG and a JPEG (OpenCV), in a temporary folder. The machine's
load (``/proc/loadavg``) is printed with the table: the times are noisy on a loaded machine, the counts are not.
"""
from __future__ import annotations

import builtins
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from salience.loading import load_image

ROUNDS = 30


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for name, arr in (("rgb8.png", rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)),
                      ("rgb16.png", rng.integers(0, 65536, (1024, 1024, 3), dtype=np.uint16)),
                      ("rgb8.jpg", rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))):
        assert cv2.imwrite(str(folder / name), arr)
        out.append(folder / name)
    return out


def _opens(path: Path) -> int:
    """Opens of ``path`` by name in one ``load_image`` (``os.open``, ``open``, ``io.open``)."""
    count = [0]
    real = os.open, builtins.open, io.open

    def counting(fn):
        def wrapped(p, *args, **kwargs):
            if isinstance(p, (str, os.PathLike)) and os.fspath(p) == os.fspath(path):
                count[0] += 1
            return fn(p, *args, **kwargs)
        return wrapped

    os.open, builtins.open, io.open = (counting(fn) for fn in real)
    try:
        load_image(path)
    finally:
        os.open, builtins.open, io.open = real
    return count[0]


def _by_path(p: Path) -> None:
    with Image.open(p) as im:
        im.load()


def _by_handle(p: Path) -> None:
    with open(p, "rb") as f, Image.open(f) as im:
        im.load()


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        paths = _images(Path(d))
        print("| image | opens by name per load_image | Pillow of the path, s (min / median / max) "
              "| Pillow of an open handle, s (min / median / max) |")
        print("|---|---|---|---|")
        for p in paths:
            times: dict = {"path": [], "handle": []}
            for r in range(ROUNDS):  # alternating which goes first
                order = (("path", _by_path), ("handle", _by_handle))
                for name, fn in (order if r % 2 else order[::-1]):
                    start = time.perf_counter()
                    fn(p)
                    times[name].append(time.perf_counter() - start)
            cells = [" / ".join(f"{f(v):.4f}" for f in (min, statistics.median, max))
                     for v in (times["path"], times["handle"])]
            print(f"| {p.name} | {_opens(p)} | {cells[0]} | {cells[1]} |")
    print(f"\n{ROUNDS} rounds; load average (/proc/loadavg): {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
