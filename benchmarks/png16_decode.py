"""salience.loading.png.decode_png16 on 16-bit PNGs whose rows are all Paeth (4) or Average (3): seconds per call.

    PYTHONPATH=src flock /tmp/bench.lock taskset -c 1 python benchmarks/png16_decode.py

Random filtered bytes (seed 0), zlib level 1; 3 calls of each image, min / median / max. The square image goes the
numpy anti-diagonal way; the thin ones past ``MAX_NUMPY_STEPS`` go to Pillow's C decoder (session 41; refused
before). Results: benchmarks/png16-decode-s41.md, docs/models.md."""
from __future__ import annotations

import struct
import time
import zlib

import numpy as np

from salience.loading import png

CASES = [(4000, 4000, 4, 3), (16_000_000, 1, 4, 3), (1, 16_000_000, 4, 3), (16_000_000, 1, 3, 1), (200_000, 1, 4, 3)]
"""(width, height, filter type of every row, channels: 3 RGB, 1 gray)."""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def make(w: int, h: int, kind: int, c: int = 3, seed: int = 0) -> bytes:
    """A 16-bit PNG of ``c`` channels, every row of filter ``kind``, random filtered bytes."""
    lines = np.random.default_rng(seed).integers(0, 256, (h, 1 + w * 2 * c), dtype=np.uint8)
    lines[:, 0] = kind
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6, 2: 4}[c], 0, 0, 0)
    return (png.SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(lines.tobytes(), 1))
            + _chunk(b"IEND", b""))


def main() -> None:
    for w, h, kind, c in CASES:
        data = make(w, h, kind, c)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            png.decode_png16(data)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"{w} x {h} c{c} kind {kind}: min {times[0]:.2f} median {times[1]:.2f} max {times[2]:.2f} s", flush=True)


if __name__ == "__main__":
    main()
