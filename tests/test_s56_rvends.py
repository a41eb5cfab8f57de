"""Session 56, the review of helper ends56's merge (173cb3b1): the defects found, each pinned.

1. ``runs.lock.lock_holder`` in the process that holds a run's lock knew it only by the folder's real path: the
   folder reached by another path (moved while the run goes on, or a bind mount) was opened and closed, and closing
   a descriptor of the file released the run's lock (another process could then take the folder). Likewise a
   thread of the process locking the folder between the look and the close. Now the lock files held are known by
   device and inode, and the look is made under the record's lock.
2. A second run of the same process on that folder, by the other path, was let in (a record lock is the
   process's), and its end released the first run's lock: now refused, the file not opened.
3. ``runs.store.is_store_table`` of a ``str`` path raised ``AttributeError``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from salience import SalienceError
from salience.runs import lock
from salience.runs.lock import LOCK_NAME, lock_holder, run_lock

pytestmark = pytest.mark.skipif(lock.fcntl is None, reason="POSIX record locks")

_TAKE = ("import fcntl, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "try:\n"
         "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)\n"
         "except OSError:\n"
         "    print('refused')\n"
         "else:\n"
         "    print('taken')\n")


def _another_process_takes(path: Path) -> bool:
    """Whether a fresh process can lock byte 0 (the run's) of the lock file ``path`` now (it lets it go as it ends)."""
    out = subprocess.run([sys.executable, "-c", _TAKE, str(path)], capture_output=True, text=True, check=True).stdout
    return out.strip() == "taken"


def test_lock_holder_in_the_holding_process_never_releases_a_moved_folders_lock(tmp_path):
    """A run's folder moved while the run holds it: ``lock_holder`` of its new path in that process said ``None``
    and released the lock (another process took it); now it says this process holds it, and the lock stays."""
    first, moved = tmp_path / "run", tmp_path / "moved"
    with run_lock(first):
        assert not _another_process_takes(first / LOCK_NAME)
        os.rename(first, moved)
        assert lock_holder(moved) == f"this process (pid {os.getpid()})"
        assert not _another_process_takes(moved / LOCK_NAME)
    assert lock_holder(moved) is None and _another_process_takes(moved / LOCK_NAME)


def test_a_second_run_of_the_process_by_another_path_is_refused_and_the_first_keeps_its_lock(tmp_path):
    """``run_lock`` of the moved folder in the process that holds it was let in, and its end released the first
    run's lock; now it is refused at once (the file not opened), and the first run still holds the folder."""
    first, moved = tmp_path / "run", tmp_path / "moved"
    with run_lock(first):
        os.rename(first, moved)
        with pytest.raises(SalienceError, match="being written by another run of this process"):
            with run_lock(moved):
                pass
        assert not _another_process_takes(moved / LOCK_NAME)
    with run_lock(moved):  # once the first has ended, the folder is free (the record of its file dropped)
        assert not _another_process_takes(moved / LOCK_NAME)


def test_a_run_started_by_a_thread_during_the_look_keeps_its_lock(tmp_path, monkeypatch):
    """A thread of the process locks the folder while ``lock_holder`` has the file open (here: made to happen
    then): the look's close released the thread's lock. Now the thread's run waits for the look to end, then holds
    its lock (no other process can take it)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("")
    holding, done = threading.Event(), threading.Event()

    def run() -> None:
        with run_lock(folder):
            holding.set()
            done.wait(30)

    thread = threading.Thread(target=run)
    real = lock._locked_elsewhere

    def look(fd: int) -> bool:
        thread.start()
        holding.wait(0.5)  # the thread locks the file now where it can (it could before the fix)
        return real(fd)

    monkeypatch.setattr(lock, "_locked_elsewhere", look)
    try:
        assert lock_holder(folder) is None
        assert holding.wait(30)
        assert not _another_process_takes(folder / LOCK_NAME)
    finally:
        done.set()
        thread.join(30)


def test_is_store_table_takes_a_str_path(tmp_path):
    """``is_store_table`` of a ``str`` (as ``is_run_folder`` takes): it raised ``AttributeError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import TABLE_MARK, is_store_table

    table = tmp_path / "inputs.parquet"  # marked as the store marks it (session 57)
    pq.write_table(pa.table({"index": pa.array([0], pa.int64()), "path": ["a.png"]}).replace_schema_metadata(
        {TABLE_MARK: b"inputs"}), table)
    assert is_store_table(str(table)) and not is_store_table(str(tmp_path / "index.parquet"))
