"""glibc's malloc, asked to keep the activations a CPU pass frees for the next pass (``allocator="reuse"``).

glibc serves a block of at least its *mmap threshold* with a fresh ``mmap`` (given back to the system when
freed), and gives the free memory at the top of its heap back when it passes the *trim threshold*. Both move:
the threshold starts at 128 KiB and rises to the size of each mmapped block freed, up to
``DEFAULT_MMAP_THRESHOLD_MAX`` (32 MiB on 64-bit), the trim threshold with it (twice). A CPU gradient pass
frees hundreds of MB of activations; where the threshold sits below the pass's buffers (the largest a pass has
freed so far), the next pass maps them again or grows the trimmed heap again, and the kernel zeroes every page
it touches (a minor page fault each): resnet50 at 224 px, 8 images a pass, 400,000 to 480,000 faults per
SmoothGrad call of 4 images (docs/performance.md, session 38).

:func:`raise_mmap_threshold` allocates and frees one block just under 32 MiB, once per process: glibc then
moves its thresholds to their highest (32 MiB, 64 MiB), as it would after any program freed such a block.
It sets nothing (no ``mallopt``: glibc keeps adjusting, and an environment's ``MALLOC_MMAP_THRESHOLD_`` or
a ``mallopt`` made earlier win), and there is no way back short of a ``mallopt``, which would fix the
thresholds for the process: so salience does it only when asked (``salience.set_performance(allocator="reuse")``).
Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from typing import Optional

__all__ = ["raise_mmap_threshold", "BLOCK"]

# glibc raises its threshold to a freed mmapped block's size when that size, with its flag bits, is at most
# DEFAULT_MMAP_THRESHOLD_MAX (32 MiB): the largest such block is 32 MiB less a page, asked as 32 MiB less
# two pages (a block's header and the page rounding).
BLOCK = (32 << 20) - 8192

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
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def raise_mmap_threshold() -> bool:
    """Move glibc's dynamic mmap threshold to its highest (once per process); ``True`` when it was done now."""
    global _done
    with _lock:
        if _done:
            return False
        _done = True
        libc = _glibc()
        if libc is None:
            return False
        block = libc.malloc(BLOCK)  # mmapped (the threshold is below it), never touched: no page is faulted in
        if not block:
            return False
        libc.free(block)
        return True
