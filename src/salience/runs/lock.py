"""One writer per run folder: ``RUN/.salience-run.lock``, locked by the process that writes the run.

Two runs writing one folder at once removed each other's temporary files, and an ``--overwrite``
in one cleared the shards the other was writing (a store mixing two commands). The lock is an
operating-system lock on the file (a POSIX record lock, ``fcntl.lockf``, on Linux and macOS;
``msvcrt.locking`` on Windows): the system releases it when the process ends, however it ends
(``kill -9`` included), so a crashed run never leaves a lock that blocks its resume. A record lock
belongs to the process, so the DataLoader workers it forks do not hold it (an ``flock`` is shared
with forked children: a worker that outlived its killed parent for a few seconds kept the folder
locked). Within one process a set of the folders locked refuses a second run too (a record lock
does not: it is the process's), and that run never opens the file (closing any descriptor of a
file drops the process's record locks on it). The file itself stays (removing a locked file
would let a third process lock a new file of the same name while the second holds the old one);
it holds the pid and host of the process that locked it last, for the message of the process
that is refused.

Where the file system cannot lock (some FUSE mounts of buckets), the run goes on with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

from salience._core.errors import SalienceError

LOCK_NAME = ".salience-run.lock"
"""The lock file's name inside a run folder (never removed, never an input: a hidden file)."""

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None  # type: ignore[assignment]

_BUSY = {errno.EAGAIN, errno.EACCES, getattr(errno, "EWOULDBLOCK", errno.EAGAIN)}
_held: set[str] = set()  # the folders this process holds (their real paths)
_held_lock = threading.Lock()


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` without waiting: ``True`` when locked, ``False`` when another process holds it.
    Other errors (a file system without locks) raise ``OSError``."""
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file, this process's
        elif msvcrt is not None:  # pragma: no cover - Windows: a lock on the file's first byte
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:  # pragma: no cover - neither: no lock (documented)
            raise OSError(errno.ENOSYS, "this platform has neither fcntl nor msvcrt")
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def _holder(path: Path) -> str:
    """Who holds the lock, as the lock file says (``pid 123 on host h``)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" not in fields:
        return "another salience process"
    return f"another salience process (pid {fields['pid']} on host {fields.get('host', '?')})"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[Optional[int]]:
    """Hold the lock of the run folder ``folder`` (created if needed) while the block runs; a
    :class:`SalienceError` at once when another live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(folder)
    with _held_lock:
        if key in _held:
            raise SalienceError(f"{folder} is being written by another run of this process (pid {os.getpid()}); "
                                "wait for it to finish, or choose another --out")
        _held.add(key)
    try:
        with _locked_file(folder, path) as fd:
            yield fd
    finally:
        with _held_lock:
            _held.discard(key)


@contextlib.contextmanager
def _locked_file(folder: Path, path: Path) -> Iterator[Optional[int]]:
    """The lock file open and locked (``None``: the file system cannot lock; warned)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            locked = _try_lock(fd)
        except OSError as e:
            warnings.warn(f"{folder}: cannot lock the run folder ({e.strerror or e}); make sure no other salience "
                          "process writes it at the same time", stacklevel=5)
            yield None
            return
        if not locked:
            raise SalienceError(f"{folder} is being written by {_holder(path)}; wait for it to finish (or stop it), "
                                "or choose another --out")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # the text is for the process refused (the lock is the system's)
        os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode("utf-8"))
        yield fd
    finally:
        os.close(fd)  # closing the file releases the lock (as the process's end does)
