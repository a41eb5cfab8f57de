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
asked (``salience.set_performance(allocator="reuse")``), and a setter that turns it back to ``"default"``
afterwards warns that the process keeps it (:func:`thresholds_fixed`). A process that then forks (a dataset run's
decoding workers) shares that kept heap copy-on-write with the child, and every page of it the parent's next passes
write is copied at a fault: the child gives the free pages back (:func:`release_shared_heap`), and a dataset run
whose process keeps much of it (:func:`kept_free_bytes`) starts its workers from a forkserver instead of forking. Elsewhere (macOS, Windows, musl, a C library without
``mallopt``) it sets nothing and warns once; it never raises.

Under the default (``allocator="default"``), :func:`raise_dynamic_threshold` puts the *dynamic* thresholds, once per
process before its first CPU pass, where glibc itself puts them at the free of a mapped block just under 32 MiB: the
mmap threshold at that size, the trim threshold at twice it (64 MiB), by mapping and freeing one such block (no
``mallopt``; the thresholds still adjust, larger blocks are still mapped and given back, a free heap top over 64 MiB
is still trimmed). Without it, where those thresholds stand depends on the largest block the process happened to free
before, and a pass's freed activations were given back and faulted in again in some processes and not in others (0 to
8,700 minor faults a warm call of resnet18 at 64 px, SmoothGrad 16 or integrated gradients 32 of one image, in fresh
processes of the same code: docs/performance.md, session 48). Elsewhere than glibc it does nothing, silently. Nor
where the process started with one of glibc's settings that fix those thresholds in its environment
(:data:`TUNING_VARIABLES`, :data:`TUNING_TUNABLES`: :func:`user_tuned`): the user's settings are heeded, and the lever
says it did nothing.

Under ``allocator="system"`` salience does nothing to the C allocator at all: no block mapped and freed, no
``mallopt``, no look-up of glibc (the off switch, for a server embedding salience, a memory profiler, a process tuned
with ``mallopt`` in its own code, which no environment shows: glibc has no way to read its thresholds back).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
import warnings
from typing import Any, Mapping, Optional

__all__ = ["keep_freed_memory", "thresholds_fixed", "raise_dynamic_threshold", "dynamic_threshold_raised", "user_tuned",
           "release_shared_heap", "kept_free_bytes", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "RAISING_BLOCK",
           "HEAP_BLOCK_MAX", "TUNING_VARIABLES", "TUNING_TUNABLES"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 32 << 20  # the highest glibc takes (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
# raise_dynamic_threshold's block: just under DEFAULT_MMAP_THRESHOLD_MAX, so its chunk (the request, a header, rounded
# up to pages) is at most 32 MiB, the largest size whose free still raises glibc's dynamic thresholds
RAISING_BLOCK = MMAP_THRESHOLD - (64 << 10)
# the largest block a CPU pass may ask for and still get from the heap (engine.mmap_chunk_cap), under the default
# (the threshold raise_dynamic_threshold leaves: RAISING_BLOCK's chunk, a page over it) and under allocator="reuse"
# (MMAP_THRESHOLD) alike; posix_memalign's padding and glibc's header (about 120 bytes) fit in that page. One bound:
# the engine's was 32 MiB - 4096, and a block between the two was mapped afresh (and then faulted in on the heap) in
# a process under the default (session 48's review)
HEAP_BLOCK_MAX = RAISING_BLOCK
# glibc's settings that fix its thresholds for the process: setting any of M_MMAP_THRESHOLD, M_TRIM_THRESHOLD,
# M_TOP_PAD, M_MMAP_MAX turns the dynamic adjustment off (malloc.c's do_set_* set mp_.no_dyn_threshold; the manual's
# "Malloc Tunable Parameters": "If the parameter is set, the dynamic adjustment is disabled"), and glibc reads them
# at the process's start from these environment variables (aliases of the tunables below) or GLIBC_TUNABLES
TUNING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
TUNING_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                   "glibc.malloc.mmap_max")

_done = False
_fixed = False  # a mallopt of keep_freed_memory took: glibc's thresholds are this process's for good
_libc: Optional[Any] = None  # the glibc keep_freed_memory set them in: a forked worker's release looks nothing up
_raise_tried = False  # raise_dynamic_threshold ran (once per process, whatever it found)
_raised = False  # ... and its block's free raised glibc's dynamic thresholds
_own_trim: Optional[Any] = None  # glibc's malloc_trim where raise_dynamic_threshold found glibc's malloc (typed)
_lock = threading.Lock()
_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


def _new_lock() -> None:
    """A forked child's own lock: a fork while another thread held it (inside :func:`raise_dynamic_threshold`'s
    block, before any process's first CPU pass, or :func:`keep_freed_memory`) left the child's copy held for good,
    and its first CPU pass waited on it forever (session 48's review)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


class _Mallinfo(ctypes.Structure):
    """glibc's ``struct mallinfo`` (before 2.33): every field an ``int``."""

    _fields_ = [(name, ctypes.c_int) for name in _FIELDS]


def _not_glibc() -> Optional[str]:
    """What the C library is where it is not glibc on Linux (for the warning), ``None`` where it is. Never raises:
    ``platform.libc_ver`` reads the interpreter's file where ``confstr`` does not say (musl), and can fail (an
    unreadable ``sys.executable``)."""
    system = platform.system()
    kind = platform.libc_ver()[0] if system == "Linux" else ""
    return None if system == "Linux" and kind == "glibc" else f"{system or 'this system'} with " \
        f"{kind or 'a C library other than glibc'}"


def user_tuned(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The first of glibc's settings that fix its malloc thresholds (:data:`TUNING_VARIABLES`, or
    :data:`TUNING_TUNABLES` in ``GLIBC_TUNABLES``) in ``environ``, as ``NAME=VALUE``; ``None`` where there is none.
    By default the environment the process started with (``/proc/self/environ``: what glibc read) and ``os.environ``
    (Python's copy of it: the one left where a process title overwrote the first); a setting in either counts, so
    the lever errs towards doing nothing. A variable counts whatever its value (an empty or unparsable one is glibc's
    to read, and may still fix the threshold: glibc 2.36 takes both, and its thresholds stop adjusting). A tunable counts as glibc's
    ``parse_tunables`` matches it: its exact name, then ``=`` (glibc skips ``" glibc.malloc.mmap_threshold=1"`` and a
    name without ``=``, and its thresholds still adjust: session 49's review); never raises."""
    for env in (_start_environment(), os.environ) if environ is None else (environ,):
        for name in TUNING_VARIABLES:
            if name in env:
                return f"{name}={env[name]}"
        for item in env.get("GLIBC_TUNABLES", "").split(":"):
            name, eq, _ = item.partition("=")
            if eq and name in TUNING_TUNABLES:
                return f"GLIBC_TUNABLES={item}"
    return None


def _start_environment() -> Mapping[str, str]:
    """The environment the process started with (Linux's ``/proc/self/environ``); empty where it cannot be read."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    pairs = (item.decode("utf-8", "replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: v for k, v in pairs}


def _glibc() -> tuple[Optional[Any], str]:
    """The process's C library when it is glibc and has ``mallopt``, else ``None``; and what it is (for the
    warning). Never raises (:func:`_not_glibc`); a library without ``mallopt`` is not glibc's."""
    try:
        other = _not_glibc()
        if other is not None:
            return None, other
        version = platform.libc_ver()[1]
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError, ValueError) as e:
        return None, f"glibc's mallopt not found ({type(e).__name__}: {e})"
    mallopt.restype = ctypes.c_int
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc, f"glibc {version}"


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds so freed activations are kept for reuse (once per process);
    ``True`` when both were set now. Where the C library is not glibc (macOS, Windows, musl) nothing is
    set, and a warning says so, once."""
    global _done, _fixed, _libc
    with _lock:
        if _done:
            return False
        _done = True
        libc, what = _glibc()
        if libc is None:
            from salience._core.errors import user_stacklevel  # here: this module imports no torch (tests/test_malloc.py)

            warnings.warn(f"allocator='reuse' does nothing here: it sets glibc's malloc thresholds, and this process "
                          f"runs on {what}; the passes run with the C allocator as it is", stacklevel=user_stacklevel())
            return False
        mmap = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        trim = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        _fixed = mmap or trim
        _libc = libc if _fixed else None
        return mmap and trim


def raise_dynamic_threshold() -> bool:
    """Put glibc's *dynamic* mmap threshold where a process's first free of a large block would (once per process,
    before its first CPU pass: ``allocator="default"``, :func:`salience._core.perf._allocator`); ``True`` when it did.

    One block of :data:`RAISING_BLOCK` (just under 32 MiB) is allocated, which glibc serves by ``mmap`` (untouched:
    no page of it becomes resident), and freed: glibc raises its mmap threshold to the block's size and its trim
    threshold to twice that (64 MiB), as it does at the free of any mapped block up to 32 MiB. No ``mallopt``: the
    thresholds still adjust, a block over 32 MiB is still mapped and given back at its free, and the heap's free top
    is still given back past 64 MiB. Why: in a process that has not yet freed such a block (the threshold at 128 KiB,
    or at the size of the largest block it freed), more of the activations a pass frees are given back (unmapped, or
    trimmed off the heap's top past twice that size) and the next pass faults them in again; how many depends on the
    process's history (0 to 8,700 faults a warm call of the same code in fresh processes), and moved a SmoothGrad call
    of one image on resnet18 at 64 px by 3-10 % (docs/performance.md, session 48). Here the block stands for that
    history.

    Nothing where the C library is not glibc (no warning: nobody asked for it), where :func:`keep_freed_memory`
    already fixed the thresholds (they no longer adjust), where the process started with glibc's settings that fix
    them (:func:`user_tuned`: ``MALLOC_MMAP_THRESHOLD_`` and the like; their free would raise nothing, and the user's
    settings are heeded: no block, ``False``), or where glibc served the block from its heap (a process with that
    much free heap already: its free raises nothing); never raises. ``allocator="system"`` never calls it."""
    global _raise_tried, _raised, _own_trim
    if _raise_tried:  # each pass after the first: no lock taken (a flag that only ever turns on)
        return False
    with _lock:
        if _raise_tried:
            return False
        _raise_tried = True
        try:
            # the process's own symbols (dlopen of NULL): no look-up (find_library runs ldconfig as a process), and the
            # malloc the passes use, glibc's or a preloaded one's (whose blocks glibc's mallinfo does not count: then
            # nothing is done)
            libc = None if _fixed or _not_glibc() is not None or user_tuned() is not None else ctypes.CDLL(None)
            info = _info_function(libc)
            if info is None:
                return False
            _own_trim = _typed(libc, "malloc_trim", ctypes.c_int, [ctypes.c_size_t])  # for release_shared_heap:
            # looked up here, so a forked worker looks nothing up
            malloc, free = libc.malloc, libc.free
            malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            free.restype, free.argtypes = None, [ctypes.c_void_p]
            before = info().hblks
            block = malloc(RAISING_BLOCK)
            if not block:
                return False
            mapped = info().hblks > before  # served by mmap: only then does its free move the thresholds
            free(block)
        except (AttributeError, OSError, ValueError):
            return False
        _raised = mapped
        return mapped


def _info_function(libc: Optional[Any]) -> Optional[Any]:
    """``mallinfo2`` of ``libc`` (glibc 2.33 and later), or ``mallinfo`` before (its ``int`` fields count blocks
    right), typed; ``None`` where ``libc`` is ``None`` or has neither."""
    if libc is None:
        return None
    for name, struct in (("mallinfo2", _Mallinfo2), ("mallinfo", _Mallinfo)):
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = struct, []
            return fn
    return None


def available() -> bool:
    """Whether ``allocator="reuse"`` can act in this process (glibc with ``mallopt``): a default that picks it
    (the command line's, ``salience.cli.common``) picks it only here, so elsewhere no warning is said about an
    option nobody set."""
    return _glibc()[0] is not None


def dynamic_threshold_raised() -> bool:
    """Whether :func:`raise_dynamic_threshold` raised glibc's dynamic thresholds in this process (nothing undoes it:
    ``allocator="system"`` afterwards says so, ``salience._core.perf``)."""
    return _raised


def thresholds_fixed() -> bool:
    """Whether :func:`keep_freed_memory` set glibc's thresholds in this process (either of them): nothing undoes
    that, so ``allocator="default"`` afterwards says so (``salience._core.perf``)."""
    return _fixed


def release_shared_heap() -> bool:
    """In a process just forked from one where :func:`keep_freed_memory` fixed the thresholds, or where
    :func:`raise_dynamic_threshold` found glibc's malloc (the default, since session 48's review) (a dataset run's
    DataLoader worker), give back the free pages of the heap it shares with its parent (glibc's ``malloc_trim(0)``);
    ``True`` when it did. Under the default too the parent's heap holds much free memory (free chunks below live
    ones, which no trim threshold gives back, and up to 64 MiB of free top): resnet50 at 224 px, SmoothGrad 16 of one
    image, a forked child's private dirty memory after the parent's next 3 calls 734-814 MiB as glibc is, 828-892 with
    the raised threshold, 94 with this release (one process each; docs/performance.md, session 48).

    A fork shares every resident page copy-on-write: under ``allocator="reuse"`` the parent's heap keeps the
    activations its passes freed, its next passes write them again, and while the child maps a page each write copies
    it at a minor fault (about 255,000 a run of resnet50 in bf16, batch 16, in a process whose kept heap had grown:
    docs/performance.md, session 42). A page the child gave back is the parent's alone: its write still faults once
    (fork write-protects the parent's pages) but keeps the page, with no copy (nor the zeroing a page the parent gave
    back would take). The child frees nothing it uses (free pages only; it inherits the parent's thresholds, so
    ``_fixed``); the parent is not touched. It calls the C library :func:`keep_freed_memory` found in the parent
    (inherited too): no lookup in the worker (``ctypes.util.find_library`` runs ``ldconfig -p`` as a process, and a
    ``dlopen`` in a process forked from a threaded one can wait on a lock no thread will release). Elsewhere (no
    thresholds fixed nor glibc found by the default's first CPU pass, a C library without ``malloc_trim``) it does
    nothing and never raises."""
    trim = _fixed_libc_function("malloc_trim", ctypes.c_int, [ctypes.c_size_t])
    if trim is None:  # the default's (session 48's review): glibc found before the first CPU pass
        trim = _own_trim
    if trim is None:
        return False
    trim(0)
    return True


def _fixed_libc_function(name: str, restype: Any, argtypes: list) -> Optional[Any]:
    """The function ``name`` of the C library :func:`keep_freed_memory` fixed the thresholds in (typed), or ``None``
    where it fixed none or the library lacks it (an older glibc)."""
    return _typed(_libc, name, restype, argtypes) if _fixed else None


def _typed(libc: Optional[Any], name: str, restype: Any, argtypes: list) -> Optional[Any]:
    """The function ``name`` of ``libc``, typed; ``None`` where ``libc`` is ``None`` or lacks it."""
    fn = getattr(libc, name, None) if libc is not None else None
    if fn is not None:
        fn.restype, fn.argtypes = restype, argtypes
    return fn




def kept_free_bytes() -> int:
    """Bytes the process's heap holds free under the thresholds :func:`keep_freed_memory` fixed (glibc's
    ``mallinfo2().fordblks``, over all arenas): the freed activations a fork would share copy-on-write with its
    child (a dataset run's decoding worker, ``salience.runs.dataset.loader_context``). ``0`` where the thresholds
    were not fixed (the free top of the heap is given back, large blocks are unmapped when freed) or glibc has no
    ``mallinfo2`` (before 2.33); never raises."""
    info = _fixed_libc_function("mallinfo2", _Mallinfo2, [])
    return 0 if info is None else int(info().fordblks)
