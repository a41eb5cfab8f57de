"""One writer per run folder: ``RUN/.salience-run.lock``, locked by the process that writes the run.

Two runs writing one folder at once removed each other's temporary files, and an ``--overwrite``
in one cleared the shards the other was writing (a store mixing two commands). The lock is an
operating-system lock on the file (a POSIX record lock, ``fcntl.lockf``, on Linux and macOS;
``msvcrt.locking`` on Windows): the system releases it when the process ends, however it ends
(``kill -9`` included), so a crashed run never leaves a lock that blocks its resume. A record lock
belongs to the process, so the DataLoader workers it forks do not hold it (an ``flock`` is shared
with forked children: a worker that outlived its killed parent for a few seconds kept the folder
locked). Within one process a set of the folders locked, and of their lock files by device and
inode (the folder moved, or reached by a bind mount), refuses a second run too (a record lock
does not: it is the process's), and that run never opens the file (closing any descriptor of a
file drops the process's record locks on it). The file itself stays (removing a locked file
would let a third process lock a new file of the same name while the second holds the old one);
it holds the pid and host of the process that locked it last, for the message of the process
that is refused.

Where the file system cannot lock (some FUSE mounts of buckets), the run goes on with a warning.

Other processes may write the run's shards while it holds the folder (the Ray actors); they must
stop writing when the run ends, even where they live on (a Ray actor finishes the batches it was
given after its driver raised: it committed shards into the folder seconds after the caller had
the error and the folder was free for another run). So the lock has two parts: byte 0, the
**run's**, held from start to end by the process that runs; byte 1, the **commits'**: a process
that writes a shard for the run holds it shared while it writes (:func:`commit_fence`), after
checking that the lock file still names its run (a random token the run writes there). A run
holds byte 1 exclusively while it writes its token (at its start: an earlier run's actor still
writing is waited for) and while it removes it (at its end, however it ends: its own actors'
writes are waited for). So once a run has ended, no commit of it begins, and no commit of an
earlier run is under way while a later run writes the folder. Where ``fcntl`` is missing (Windows)
the token alone is checked.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import secrets
import struct
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from salience._core.errors import SalienceError, user_stacklevel
from salience._core.files import make_folder, not_regular, open_regular

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

FENCE_WAIT = 60.0
"""Seconds a run waits for the shard commits under way in its folder (at its start and its end)."""

_BUSY = {errno.EAGAIN, errno.EACCES, getattr(errno, "EWOULDBLOCK", errno.EAGAIN)}
_held: set[str] = set()  # the folders this process holds (their real paths)
_held_files: set[tuple[int, int]] = set()  # the lock files this process holds open ((st_dev, st_ino)), by any path
_held_lock = threading.Lock()


@dataclass(frozen=True)
class Writer:
    """What a process that writes shards for a run (a Ray actor) needs to know that the run still
    holds its folder: the folder, the run's token, and the process and host that hold the lock."""

    folder: str
    token: str
    pid: int
    host: str


def run_going(writer: Writer) -> bool:
    """Whether the run ``writer`` still holds its folder: its lock file names the run's token. Read
    without locking (a file read while a run writes it may lack the token: ``False``, which costs a
    caller only a copy fetched again); an unreadable file, or one that is no regular file (a FIFO of its
    name: opened without waiting, :func:`salience._core.files.open_regular`, never read): ``False`` (what
    asks, a Ray worker's thread, lets go of what the run held; it raises nothing). Never opened in the
    process that holds the lock (closing it would release the lock): there, ``True``."""
    if writer.pid == os.getpid() and writer.host == socket.gethostname():
        return True
    text = _lock_text(Path(writer.folder) / LOCK_NAME)
    return text is not None and f"run={writer.token}" in text.split()


def _lock_text(path: Path) -> Optional[str]:
    """The text of the lock file ``path`` (its first 4 KiB: ``pid=... host=... run=...``), or ``None``: not there,
    unreadable, or no regular file (a FIFO of its name: opened without waiting, never read): :func:`_ask_file`."""
    return _ask_file(path, lambda fd: os.read(fd, 4096).decode("utf-8", "replace"))


def _try_lock(fd: int, shared: bool = False, start: int = 0) -> bool:
    """Lock byte ``start`` of ``fd`` without waiting: ``True`` when locked, ``False`` when another
    process holds it. Other errors (a file system without locks) raise ``OSError``."""
    try:
        if fcntl is not None:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB, 1, start)
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
    """Who holds the lock, as the lock file says (``pid 123 on host h``; read as :func:`_lock_text` reads it)."""
    text = (_lock_text(path) or "").strip()
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" not in fields:
        return "another salience process"
    return f"another salience process (pid {fields['pid']} on host {fields.get('host', '?')})"


def lock_holder(folder: Path) -> Optional[str]:
    """Who holds the run lock of ``folder`` now, as the lock file says (``another salience process (pid 123 on
    host h)``; ``this process (pid 123)``), or ``None``: no live process does (no lock file, a run that ended
    however it ended, a file system without locks). Checked without taking it (``F_GETLK`` asks the system who
    holds byte 0; where the layout of ``struct flock`` is not known, Windows included, the lock is taken shared
    for a moment, and a run starting that moment is refused): a run starting then is never refused for this look
    on Linux, macOS and the BSDs. In the process that holds it the file is not opened (closing any descriptor of it
    would release the process's lock): its folders and its lock files (by device and inode: a folder moved, or
    reached by a bind mount, while it is held) say; the look is made under the lock of that record, so no run of
    this process locks the file between the look and the close. The run's lock only: a process still writing a
    shard of a run that has ended holds the commits' byte, not this one (:func:`commit_holder`)."""
    path = Path(folder) / LOCK_NAME
    with _held_lock:
        if os.path.realpath(folder) in _held or _file_id(path) in _held_files:
            return f"this process (pid {os.getpid()})"
        held = _ask_file(path, _locked_elsewhere)
        return _holder(path) if held else None  # _holder opens the file too: still under the record's lock


def _ask_file(path: Path, ask: Callable[[int], Any]) -> Any:
    """``ask(fd)`` of the lock file ``path`` opened without waiting (:func:`salience._core.files.open_regular`: a FIFO
    of its name never waits for a writer, where under ``_held_lock`` every run of this process would wait with it),
    closed after: ``None`` where it cannot be opened (not there: nobody holds it), is no regular file (no run locks
    it: a run refuses it, :func:`run_lock`) or where its file system cannot lock (``OSError`` from ``ask``)."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        return ask(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def commit_holder(folder: Path) -> Optional[str]:
    """Who writes a shard into the run folder ``folder`` now while no run holds it (``another salience process (pid
    123)``), or ``None``. A process that writes shards for a run (a Ray actor) holds the lock file's commits' byte
    while it writes one (:func:`commit_fence`); a run's end waits :data:`FENCE_WAIT` seconds for its commits, then
    ends with a warning, and a commit still under way goes on holding that byte while :func:`lock_holder` (the run's
    byte) says nobody holds the folder. Asked as :func:`lock_holder` asks (``F_GETLK``, nothing taken; elsewhere the
    byte taken shared for a moment, which a commit shares); in a process that holds the folder's run lock: ``None``
    without opening the file (that run's own commits are its own). Where ``fcntl`` is missing (Windows) there is no
    commits' byte: ``None``."""
    if fcntl is None:  # pragma: no cover - Windows: commits check the token alone
        return None
    path = Path(folder) / LOCK_NAME
    with _held_lock:
        if os.path.realpath(folder) in _held or _file_id(path) in _held_files:
            return None
        pid = _ask_file(path, lambda fd: _locker(fd, 1))
    if pid is None:
        return None
    return f"another salience process (pid {pid})" if pid > 0 else "another salience process"


def _file_id(path: Path) -> Optional[tuple[int, int]]:
    """The file ``path`` as the system knows it, whatever the path to it (device, inode); ``None``: not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# ``struct flock`` as ``F_GETLK`` reads it: Linux's (type, whence, start, length, pid), macOS's and the BSDs' (start,
# length, pid, type, whence); ``None`` elsewhere (Windows: the lock is taken for a moment there instead)
if sys.platform.startswith("linux"):
    _FLOCK: Optional[str] = "@hhqqi"
elif sys.platform == "darwin" or "bsd" in sys.platform:
    _FLOCK = "@qqihh"
else:
    _FLOCK = None


def _locked_elsewhere(fd: int) -> bool:
    """Whether another process holds byte 0 (the run's) of the lock file open as ``fd``: asked with ``F_GETLK``
    (nothing taken) where the layout of ``struct flock`` is known, else by taking it shared for a moment."""
    return _locker(fd, 0) is not None


def _locker(fd: int, start: int) -> Optional[int]:
    """The pid of a process other than this one that holds byte ``start`` of the lock file open as ``fd`` (0: one
    does, its pid not known), or ``None``: none. Asked with ``F_GETLK`` for an exclusive lock (any lock of another
    process is in its way; nothing taken) where the layout of ``struct flock`` is known, else by taking the byte
    shared for a moment."""
    if fcntl is not None and _FLOCK is not None:
        linux = _FLOCK == "@hhqqi"
        fields = (fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0) if linux else (start, 1, 0, fcntl.F_WRLCK, os.SEEK_SET)
        answer = struct.unpack_from(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK,
                                                        struct.pack(_FLOCK, *fields) + bytes(16)))  # room: padding
        kind, pid = (answer[0], answer[4]) if linux else (answer[3], answer[2])
        return None if kind == fcntl.F_UNLCK else max(int(pid), 0)
    if not _try_lock(fd, shared=True, start=start):  # pragma: no cover - Windows, or a POSIX system of another layout
        return 0
    if fcntl is not None:  # pragma: no cover
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, start)
    else:  # pragma: no cover - Windows
        os.lseek(fd, start, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    return None


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[Optional[Writer]]:
    """Hold the lock of the run folder ``folder`` (created if needed) while the block runs; a
    :class:`SalienceError` at once when another live process holds it. Yields what a process that
    writes shards for this run passes to :func:`commit_fence` (``None``: the file system cannot lock)."""
    make_folder(folder)  # a file in its way: said as such (it was an unexpected NotADirectoryError)
    path = folder / LOCK_NAME
    key = os.path.realpath(folder)
    with _held_lock:
        if key in _held:
            raise SalienceError(f"{folder} is being written by another run of this process (pid {os.getpid()}); "
                                "wait for it to finish, or choose another out=")
        _held.add(key)
    try:
        with _locked_file(folder, path) as fd:
            yield fd
    finally:
        with _held_lock:
            _held.discard(key)


@contextlib.contextmanager
def _locked_file(folder: Path, path: Path) -> Iterator[Optional[Writer]]:
    """The lock file open and locked (``None``: the file system cannot lock; warned), the run's
    token in it while the block runs."""
    fd, ident = _open_lock_file(folder, path)
    try:
        try:
            locked = _try_lock(fd)
        except OSError as e:
            warnings.warn(f"{folder}: cannot lock the run folder ({e.strerror or e}); make sure no other salience "
                          "process writes it at the same time", stacklevel=user_stacklevel())
            yield None
            return
        if not locked:
            raise SalienceError(f"{folder} is being written by {_holder(path)}; wait for it to finish (or stop it), "
                                "or choose another out=")
        writer = Writer(str(folder), secrets.token_hex(16), os.getpid(), socket.gethostname())
        _fence(fd, folder, writer.token, refuse=True)
        try:
            yield writer
        finally:
            _fence(fd, folder, None, refuse=False)  # from now on no commit of this run begins
    finally:
        os.close(fd)  # closing the file releases the lock (as the process's end does)
        with _held_lock:
            _held_files.discard(ident)


def _open_lock_file(folder: Path, path: Path) -> tuple[int, tuple[int, int]]:
    """The lock file of ``folder`` open for writing, and its (device, inode), recorded before it is locked
    (:func:`lock_holder` never opens a file recorded). A file this process holds already, reached by another path
    (the folder moved, a bind mount), is refused without being opened: closing it would release the other run's
    lock. Opened without waiting (:func:`salience._core.files.open_regular`): a path of its name that is no regular
    file (a FIFO) is refused with a :class:`SalienceError`, nothing written to it."""
    with _held_lock:
        if _file_id(path) in _held_files:
            raise SalienceError(f"{folder} is being written by another run of this process (pid {os.getpid()}); "
                                "wait for it to finish, or choose another out=")
        fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o666)
        if fd is None:
            raise SalienceError(_not_regular(path, "run again (salience makes its lock file there)"))
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        _held_files.add(ident)
    return fd, ident


def _fence(fd: int, folder: Path, token: Optional[str], *, refuse: bool) -> None:
    """Write the lock file (this process, and ``token`` as the run allowed to commit) while holding
    the commits' byte exclusively: the commits under way are waited for (:data:`FENCE_WAIT`
    seconds; then ``refuse``: a :class:`SalienceError`, else a warning and the file is written)."""
    held = fcntl is None  # without fcntl there is no commits' byte: the token alone is checked
    deadline = time.monotonic() + FENCE_WAIT
    while not held:
        held = _try_lock(fd, start=1)
        if not held and time.monotonic() > deadline:
            if refuse:
                raise SalienceError(f"{folder}: a process of an earlier run (a Ray actor) is still writing a shard "
                                    f"after {FENCE_WAIT:.0f} s; stop it (or its Ray job), then run again")
            warnings.warn(f"{folder}: a shard is still being written after {FENCE_WAIT:.0f} s; the run ends "
                          "without waiting for it", stacklevel=user_stacklevel())
            break
        if not held:
            time.sleep(0.01)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # the text is for the process refused (the lock is the system's)
        os.write(fd, (f"pid={os.getpid()} host={socket.gethostname()}"
                      + (f" run={token}" if token else "") + "\n").encode("utf-8"))
    finally:
        if held and fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, 1)


def _not_regular(path: Path, then: str) -> str:
    """What a run says of its lock file ``path`` that is no regular file (a FIFO, a device or a socket of its name)."""
    return not_regular(path, "the run lock's name", then)


@contextlib.contextmanager
def commit_fence(writer: Optional[Writer]) -> Iterator[None]:
    """Hold the commits' byte of the run's lock shared while the block writes a shard of the run
    ``writer`` (from :func:`run_lock`); a :class:`SalienceError`, nothing written, when that run has
    ended (the lock file names another run, or none), or when the lock file is no regular file (a
    FIFO of its name: opened without waiting, :func:`salience._core.files.open_regular`, never read).
    ``None`` (a folder that cannot lock), or the process that holds the run's lock itself: nothing to
    check."""
    if writer is None or (writer.pid == os.getpid() and writer.host == socket.gethostname()):
        yield  # never open the lock file in the process that holds it: closing it would release the lock
        return
    path = Path(writer.folder) / LOCK_NAME
    fd = open_regular(path)
    if fd is None:
        raise SalienceError(_not_regular(path, "run the command again") + "; the shard is not written")
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_SH, 1, 1)  # waits while a run writes its token (a moment)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        if f"run={writer.token}" not in text.split():
            raise SalienceError(f"{writer.folder}: the run this shard belongs to has ended (or another run holds "
                                "the folder); the shard is not written")
        yield
    finally:
        os.close(fd)  # releases the shared lock
