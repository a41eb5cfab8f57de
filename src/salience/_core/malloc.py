"""glibc's malloc, asked to keep the activations a CPU pass frees for the next pass (``allocator="reuse"``).

glibc serves a block of at least its *mmap threshold* with a fresh ``mmap`` (given back to the system when
freed), and gives the free memory at the top of its heap back when it passes the *trim threshold*. Both move:
the threshold starts at 128 KiB and rises to the size of each mmapped block freed, up to
``DEFAULT_MMAP_THRESHOLD_MAX`` (32 MiB on 64-bit), the trim threshold with it (twice). A CPU gradient pass
frees hundreds of MB of activations at once: they go back to the system, and the next pass gets fresh pages,
which the kernel zeroes as it touches each (a minor page fault each): resnet50 at 224 px, 8 images a pass,
400,000 to 480,000 faults per SmoothGrad call of 4 images, 1.3 million per integrated-gradients call of 8
(docs/performance.md, session 38).

:func:`keep_freed_memory` sets, once per process, ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (a block under 32 MiB
comes from the heap) and ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` (the heap's free top is kept, up to 2 GiB):
what the environment variables ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` set at a
process's start. Both fix glibc's thresholds for the whole process (it stops adjusting them), the process keeps
the memory it has freed (its peak stays resident), and there is no way back: so salience does it only when
asked (``salience.set_performance(allocator="reuse")``). Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from typing import Optional

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 32 << 20  # the highest glibc takes (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int

_done = False
_lock = threading.Lock()


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc, else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    libc.mallopt.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds so freed activations are kept for reuse (once per process);
    ``True`` when both were set now."""
    global _done
    with _lock:
        if _done:
            return False
        _done = True
        libc = _glibc()
        if libc is None:
            return False
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
