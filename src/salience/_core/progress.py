"""A dependency-free progress bar for long runs (off by default in library calls).

``with progress(total, "smoothgrad", enabled=True) as bar: bar.update(n)`` draws
``smoothgrad  37%|#######        | 47/128 [00:03<00:05]`` on stderr, redrawn at most ten times
a second, and ends the line when the block exits. Disabled, it costs nothing.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Optional

__all__ = ["progress", "Progress"]


class Progress:
    """Counts work done out of ``total`` and draws it on ``stream`` when enabled."""

    def __init__(self, total: int, desc: str = "", *, enabled: bool = False, stream: Optional[IO[str]] = None,
                 unit: str = ""):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + n, self.total) if self.total else self.n + n
        if self.enabled:
            now = time.perf_counter()
            if now - self._last_draw >= 0.1 or self.n >= self.total:
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self._start
        if self.total:
            frac = self.n / self.total
            width = 24
            filled = int(round(frac * width))
            eta = elapsed / frac - elapsed if frac > 0 else 0.0
            line = (
                f"\r{self.desc} {frac:4.0%}|{'#' * filled}{' ' * (width - filled)}| {self.n}/{self.total} "
                f"[{_fmt(elapsed)}<{_fmt(eta)}{self._rate(elapsed)}]"
            )
        else:
            line = f"\r{self.desc} {self.n} [{_fmt(elapsed)}{self._rate(elapsed)}]"
        self.stream.write(line)
        self.stream.flush()

    def _rate(self, elapsed: float) -> str:
        """``, 12.3 img/s`` when a unit was given (the rate since the start)."""
        if not self.unit or elapsed <= 0:
            return ""
        return f", {self.n / elapsed:.1f} {self.unit}/s"

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str = "", *, enabled: bool = False, stream: Optional[IO[str]] = None,
             unit: str = "") -> Progress:
    """A :class:`Progress` bar over ``total`` units; draws nothing unless ``enabled``. With a
    ``unit`` (``"img"``) it also shows the rate (``12.3 img/s``); the ``<`` time is what is left."""
    return Progress(total, desc, enabled=enabled, stream=stream, unit=unit)


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
