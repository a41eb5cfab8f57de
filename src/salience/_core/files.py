"""Atomic file writes: a reader (or a crash) never sees half a file.

Everything salience writes (pictures, raw maps, reports, summaries) goes through
:func:`atomic_path` or :func:`atomic_write`: the bytes go to a temporary file in the target's own
folder, are flushed to disk, and the temporary file is renamed over the target in one step
(``os.replace``). If anything fails on the way, including ``KeyboardInterrupt``, the temporary
file is removed and an existing target is left exactly as it was. :func:`file_start` reads a file's first bytes
(what the loaders tell a file's kind by). :func:`open_regular` opens a file that may be no regular file (a FIFO of its
name) without waiting: what a run's store, lock and explorer read their own files with (the reader, pyarrow, numpy
or PIL, reads through that one checked handle; :func:`open_no_wait` opens and tells what it opened, the image loader's
one open, which reads a FIFO too); :func:`read_text` reads a dataset's list, its labels CSV or a class names' file
through it (a FIFO, a folder, a huge or a non-UTF-8 file refused, saying what was expected); :func:`check_regular`
refuses such a file by one ``stat`` (an image named to a run or a command, refused before the run:
:func:`check_image_file`, in the words of :func:`not_image_file`); :func:`one_name` tells a name read
from a file (a run's method) that names one file inside a folder from one that would lead out of it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Iterator, Optional, Union

from salience._core.errors import SalienceError

__all__ = ["NO_WAIT", "TEXT_FILE_CAP", "atomic_path", "atomic_write", "check_regular", "file_start", "folder_name",
           "make_folder", "check_image_file", "is_socket", "not_image_file", "not_regular", "one_name", "open_no_wait",
           "open_regular", "read_text", "shell_pipe", "wait_again"]

PathLike = Union[str, "os.PathLike[str]"]


def _target(path: PathLike) -> Path:
    """The target as a ``Path``, its folder created; a folder in its place is an error."""
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise SalienceError(f"expected a file path (str or os.PathLike), got {type(path).__name__}") from None
    if p.name in ("", ".", ".."):
        raise SalienceError(f"expected a file path, got {str(path)!r}, which names a folder")
    if p.is_dir():
        raise SalienceError(f"cannot write the file {p}: a folder of that name exists; choose another path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalienceError(f"cannot write the file {p}: cannot create its folder {p.parent} "
                            f"({e.strerror or e}); choose another path") from None
    return p


def _new_temp(p: Path) -> Path:
    """Create an empty, new temporary file next to ``p``; it keeps ``p``'s suffix (tools such as
    ``np.save`` or ``PIL.Image.save`` choose the format by it). Mode ``0o666`` minus the umask,
    like any newly created file."""
    while True:
        tmp = p.with_name(f".{p.stem}.{secrets.token_hex(4)}.tmp{p.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits colliding
            continue
        except OSError as e:  # a read-only or full disk, no permission: said, not a traceback
            raise SalienceError(f"cannot write the file {p} ({e.strerror or e}); choose another path") from None
        os.close(fd)
        return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (POSIX); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write the file there, in any way you like.

    When the ``with`` block ends normally the file is flushed to disk and renamed to ``path``
    (replacing an existing file in one step). When the block raises (any exception, also
    ``KeyboardInterrupt``) the temporary file is removed and ``path`` is untouched. Parent folders
    are created. The temporary name keeps ``path``'s suffix, so ``np.save`` / ``Image.save`` pick
    the right format and do not append one::

        with atomic_path("out/fig.png") as tmp:
            Image.fromarray(arr).save(tmp)
    """
    p = _target(path)
    tmp = _new_temp(p)
    try:
        yield tmp
        if not tmp.is_file():
            raise SalienceError(
                f"nothing was written to the temporary file {tmp.name} for {p}; write to the path that "
                "atomic_path yields (not a renamed or suffixed copy of it)"
            )
        _fsync_file(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SalienceError(
            f"atomic_write expects bytes, got {type(data).__name__}; encode text first (e.g. s.encode('utf-8'))"
        )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(os.fspath(path))


def folder_name(path: PathLike, given: str = "out=") -> Path:
    """``path`` as the output folder's :class:`~pathlib.Path`; a :class:`SalienceError` for an empty name
    (``Path("")`` is the current folder, where an unset ``--out "$DIR"`` would spill). ``given``: how the caller's
    user gives the folder, in the message (a keyword, ``out_dir=``; a flag, ``--out ``)."""
    if not str(os.fspath(path)).strip():
        raise SalienceError(f"the output folder's name is empty; give a folder (e.g. {given}results/)")
    return Path(path)


def make_folder(path: PathLike, given: str = "out=") -> Path:
    """The folder ``path`` (:func:`folder_name`), created with its parents; a :class:`SalienceError` saying why if
    it cannot be (an empty name, a file in its way)."""
    folder = folder_name(path, given)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SalienceError(f"cannot create the output folder {folder} ({e.strerror or e})") from None
    return folder


def file_start(path: Union[PathLike, BinaryIO], n: int) -> bytes:
    """The first ``n`` bytes of the file ``path``: fewer when it is shorter, ``b""`` when it is empty or cannot be
    read (missing, a folder, no permission). What a file holds, told by its first bytes (a zip archive, a pickle,
    a safetensors header, a TIFF). ``path`` may be a file already open for reading (binary, seekable: the handle
    :func:`load_image <salience.loading.images.load_image>` checked and reads through): read from its start, its
    position put back to the start."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        try:
            path.seek(0)
            head = path.read(n)
            path.seek(0)
            return head
        except OSError:
            return b""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


NO_WAIT = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
"""The flags added to ``os.open``'s of a file that may be no regular file: without waiting (an ``open`` of a FIFO for
reading waits for a writer, for ever where none comes), binary on Windows. The one place these flags are built
(:func:`open_regular`, and the run lock's own opens, :mod:`salience.runs.lock`)."""


def wait_again(fd: int) -> None:
    """The descriptor ``fd``, opened with :data:`NO_WAIT`, put back to blocking mode where ``NO_WAIT`` made it
    non-blocking (``O_NONBLOCK``, POSIX; ``os.set_blocking`` is POSIX's alone in Python 3.11): a shell's pipe read
    whole, a regular file (:func:`open_no_wait`)."""
    if NO_WAIT & getattr(os, "O_NONBLOCK", 0):
        os.set_blocking(fd, True)


def open_no_wait(path: PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> tuple[int, int]:
    """``path`` opened with ``flags | NO_WAIT`` (and ``mode``, where ``flags`` create it): its descriptor and what it
    is (``st_mode``, of ``fstat`` on the descriptor: no race between a look and the open). A regular file's
    descriptor is put back to blocking mode (``O_NONBLOCK`` changes nothing for its reads and writes, and its record
    locks are taken without waiting anyway); any other (a FIFO: read it without waiting, or close it) is left as it
    was opened. The descriptor is not inherited by child processes (Python's ``O_CLOEXEC``). ``OSError``: not there,
    not allowed."""
    fd = os.open(path, flags | NO_WAIT, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISREG(st_mode):
            wait_again(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st_mode


def open_regular(path: PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> Optional[int]:
    """``path`` opened with ``flags | NO_WAIT`` (and ``mode``, where ``flags`` create it), its descriptor, when it is a
    regular file (a link to one included); ``None`` when it is not (a FIFO, a device, a socket, a folder: closed
    again, nothing read or written). Opened without waiting, then checked on the open descriptor
    (:func:`open_no_wait`). ``OSError``: not there, not allowed."""
    fd, st_mode = open_no_wait(path, flags, mode)
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        return None
    return fd


TEXT_FILE_CAP = 256 << 20
"""The most bytes a text file that salience reads whole (a dataset's ``.txt`` list of images, its labels CSV, a class
names' file) may hold: 256 MiB (a million paths of 250 characters). A larger file is refused before it is read
(:func:`read_text`)."""


def read_text(path: PathLike, name: str, expected: str, limit: Optional[int] = None,
              too_big: str = "split it in smaller files") -> str:
    """The text of the UTF-8 file ``path`` (a byte order mark dropped; lines as they are, ``\r\n`` too), read
    through one handle opened without waiting and checked regular on it (:func:`open_regular`): a FIFO there,
    even one put there after a look, is never waited on. A :class:`SalienceError` that starts with ``name`` (how the
    user gave the file: ``labels=PATH``, ``PATH``) and says what was expected (``expected``: ``"a CSV file of
    path,label lines"``) for a file that cannot be opened (its system error), a folder, a FIFO, a device or a
    socket, a file over ``limit`` bytes (:data:`TEXT_FILE_CAP` by default; its size checked on the handle before a
    byte is read; ``too_big`` says what to do then, what the caller can take: several lists, one CSV of fewer
    lines), or one that is not UTF-8 (the offset of its first bad byte; UTF-16, told by its byte order mark, said
    so: what Windows' editors save as "Unicode")."""
    limit = TEXT_FILE_CAP if limit is None else limit
    try:
        fd, st_mode = open_no_wait(path)
    except OSError as e:
        if not is_socket(path):  # a socket's open fails (ENXIO): said as what it is, below
            raise SalienceError(f"{name}: cannot read it ({e.strerror or e}); check the path and its permissions") \
                from None
        fd, st_mode = None, stat.S_IFSOCK
    if not stat.S_ISREG(st_mode):  # told by the handle's fstat, not by a second look at the name
        if fd is not None:
            os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st_mode) else "a FIFO, a device or a socket"
        raise SalienceError(f"{name}: {kind}, not a regular file; expected {expected}")
    with os.fdopen(fd, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
        except OSError as e:
            raise SalienceError(f"{name}: cannot read it ({e.strerror or e}); check the file") from None
    if size > limit or len(data) > limit:
        raise SalienceError(f"{name}: {max(size, len(data)):,} bytes, over the {limit:,} a text file may hold; "
                            f"expected {expected} ({too_big})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")  # Windows' "Unicode"
        bad = ("UTF-16 text (its byte order mark), not UTF-8" if utf16
               else f"not UTF-8 text (byte {e.start}: {e.reason})")
        raise SalienceError(f"{name}: {bad}; expected {expected}, saved as UTF-8") from None


def is_socket(path: PathLike) -> bool:
    """Whether ``path`` is a socket (whose ``open`` fails with ``ENXIO``), by one ``stat``: what it is, said."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def not_regular(path: PathLike, what: str, then: str) -> str:
    """What to say of ``path`` that is no regular file (a FIFO, a device or a socket of ``what``, ``"a run file's
    name"``): remove it, then ``then``."""
    return f"{path} is not a regular file (a FIFO, a device or a socket of {what}); remove it, then {then}"


def check_regular(path: PathLike, what: str, then: str) -> None:
    """A :class:`SalienceError` (:func:`not_regular`) when ``path`` is there and is no regular file (a link to one is
    one): an early refusal (the images a run is given, before it starts: :func:`check_image_file`), where a FIFO's
    plain open waits for a writer, for ever where none comes. One ``stat``, so a file swapped after it is not seen: a
    reader that must never wait opens the file once with :func:`open_regular` and reads through its handle. A path
    not there, or that cannot be looked at, is left to the reader (its own error)."""
    mode = _irregular_mode(path)
    if mode is not None:
        raise SalienceError(not_regular(path, what, then))


def _irregular_mode(path: PathLike) -> Optional[int]:
    """The ``st_mode`` of ``path`` when it is there and is no regular file, by one ``stat``; ``None`` for a regular
    file and for a path not there or that cannot be looked at (not there, no permission, a NUL in it: left to the
    reader, which says so): :func:`check_regular`'s and :func:`check_image_file`'s look."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else mode


def _on_windows() -> bool:
    """Whether this system is Windows (its paths: NTFS, where ``name:stream`` names a file's data stream)."""
    return os.name == "nt"


def one_name(name: Any, flavour: type = PurePath) -> bool:
    """Whether ``name`` names one entry inside a folder, never a path outside it nor a hidden one: a non-empty
    string without NUL or ``/``, not starting with ``.`` (``.``, ``..``, the store's temporaries), that the system's
    paths (``flavour``: :class:`~pathlib.PurePath`, this system's; :class:`~pathlib.PureWindowsPath` also splits at
    ``\\`` and reads ``C:x`` as a drive) read as one part without a drive or root; on Windows (:func:`_on_windows`, the system's, whatever
    ``flavour``) no ``:`` either (``mine:v2`` names the data stream ``v2`` of the file ``mine`` on NTFS, not a folder).
    What a name read from a file (a run manifest's method, a table's shard) must be before it becomes part of a
    path."""
    if not isinstance(name, str) or not name or "\0" in name or "/" in name or name.startswith("."):
        return False
    if ":" in name and _on_windows():
        return False
    pure = flavour(name)
    return pure.parts == (name,) and not pure.anchor


def shell_pipe(path: PathLike) -> bool:
    """Whether ``path`` names a pipe the shell opened for the command (``/dev/stdin``, ``/dev/fd/N``,
    ``/proc/self/fd/N``: bash's ``<(curl ...)``), whose writer is there before the command starts: read like a file.
    Any other FIFO (``mkfifo``'s, named in a folder) may have no writer, and its open waits for ever."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    return text == "/dev/stdin" or text.startswith(("/dev/fd/", "/proc/self/fd/"))


IMAGE_AS_FILE = "give the image as a file (a pipe from the shell, <(...), is read)"
"""What to do with an image named by no regular file (:func:`not_image_file`)."""


def not_image_file(path: PathLike, st_mode: int) -> str:
    """What to say of the image ``path`` that is no regular file (``st_mode``): a FIFO, :func:`not_regular` (remove
    it); a device or a socket (``/dev/null``, a terminal as ``/dev/stdin``, a server's socket), never to be removed,
    said as what it is."""
    if stat.S_ISCHR(st_mode) or stat.S_ISBLK(st_mode) or stat.S_ISSOCK(st_mode):
        kind = "a socket" if stat.S_ISSOCK(st_mode) else "a device"
        return f"{path} is {kind}, not an image file; {IMAGE_AS_FILE}"
    return not_regular(path, "an image's name", IMAGE_AS_FILE)


def check_image_file(path: PathLike) -> None:
    """A :class:`SalienceError` when the local image ``path`` is there and is no regular file (a FIFO, a device, a
    socket: :func:`not_image_file`; a shell's pipe, :func:`shell_pipe`, is read): before an image is opened, which
    would wait for ever on a FIFO without a writer. One ``stat``, as :func:`check_regular`."""
    mode = None if shell_pipe(path) else _irregular_mode(path)
    if mode is not None:
        raise SalienceError(not_image_file(path, mode))
