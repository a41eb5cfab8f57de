"""Session 57: review of the change "ends2" (merge 0845b703: runs' tables marked, the footer read bounded, run.json
known by its format, ``unwritten_run``, ``lock.commit_holder``). Tests 1-5 fail on that merge (as each docstring
says); 6-8 pin answers of the review that held there already (old runs resumed with marked shards, the footer parsed
from memory equal to pyarrow's own read, the cap's boundary).

1. A FIFO named ``run.json`` (in a run folder, a user's folder, a folder of images listed for a run): the merge's
   ``manifest_format`` opened it to read its first 4 KiB, which waits for a writer: ``is_run_folder``, ``open_run``,
   ``explain_dataset`` and the listing of a folder of images (``salience explain DIR``) hung (the base's
   ``is_file()`` said no). Now a file that is not a regular file is no manifest, nothing read.
2. A FIFO named ``.salience-run.lock`` beside a marked table: ``lock_holder`` opened it, waiting for a writer while
   holding the lock of this process's runs: ``open_run`` hung (and every run of the process with it).
3. A ``run.json`` whose arrays nest past Python's recursion limit: ``manifest_format`` let ``RecursionError`` out of
   ``is_run_folder`` (and so of ``salience explain IMAGE --out``, the explorer, ``explain_dataset``); one whose
   ``format`` comes first read as salience's, then ``open_run`` raised ``RecursionError``. Now: no manifest, or the
   manifest "cannot be read", a ``SalienceError``.
4. A salience manifest cut short (its ``format`` first): ``explain_dataset`` said "cannot read the run's manifest
   ...; use overwrite=True to start again", and with ``overwrite=True`` raised the same words. Now it starts again.
5. A ``run.json`` this process may not open: said to be no salience run's manifest, "another program's file". Now
   said as unreadable, with what to do.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import test_s57_ends2
from salience import SalienceError
from salience.runs.lock import LOCK_NAME

_a_run = test_s57_ends2._a_run
files = test_s57_ends2.files  # the fixture: two 32 x 32 PNGs, nets of one and three outputs (test_s54_clidecide)

fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs: POSIX")


def _returns_soon(call: Callable[[], Any], fifo: Path, timeout: float = 15.0) -> dict[str, Any]:
    """``call()`` in a thread, given ``timeout`` seconds: ``{"value": ...}`` or ``{"error": ...}``. Where it is still
    running (blocked opening ``fifo`` for reading: the merge), a writer's open of the FIFO lets it go, and the test
    fails (the thread left blocked would hold the lock of this process's runs for the tests after)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as e:  # noqa: BLE001 - whatever it raised, said by the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    hung = thread.is_alive()
    while thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader waiting: its open returns
        except OSError:
            pass
        thread.join(0.1)
    assert not hung, f"blocked for {timeout} s opening the FIFO {fifo}"
    return out


# --------------------------------------------------------------------------------- 1. a FIFO named run.json


@fifos
def test_a_fifo_named_run_json_is_no_manifest_and_nothing_waits_for_it(tmp_path):
    """A FIFO ``run.json``: ``manifest_format`` ``None``, the folder no run's, ``open_run`` says there is no run, and
    ``explain_dataset`` into it refuses it as no salience manifest; each at once (the merge: each waited forever)."""
    from salience.runs.store import is_run_folder, manifest_format, open_run

    folder = tmp_path / "f"
    folder.mkdir()
    fifo = folder / "run.json"
    os.mkfifo(fifo)
    assert _returns_soon(lambda: manifest_format(fifo), fifo) == {"value": None}
    assert _returns_soon(lambda: is_run_folder(folder), fifo) == {"value": False}
    error = _returns_soon(lambda: open_run(folder), fifo)["error"]
    assert isinstance(error, SalienceError) and "is not a salience run (no run.json)" in str(error)
    error = _returns_soon(lambda: _a_run(folder), fifo)["error"]
    assert isinstance(error, SalienceError) and "holds a run.json that is not a salience run's manifest" in str(error)
    assert [p.name for p in folder.iterdir()] == ["run.json"]  # nothing written (refused before the lock)


@fifos
def test_a_fifo_named_run_json_among_images_does_not_stop_their_listing(tmp_path):
    """``salience explain DIR``'s listing asks each folder below ``DIR`` that holds images whether it is a run's (its
    thumbnails are no inputs): a FIFO ``run.json`` in ``DIR/cats`` hung it; now its images are listed."""
    from salience.runs import sources

    images = tmp_path / "imgs"
    (images / "cats").mkdir(parents=True)
    for name in ("a.png", "cats/b.png"):
        (images / name).write_bytes(b"listed, not read")
    fifo = images / "cats" / "run.json"
    os.mkfifo(fifo)
    found = _returns_soon(lambda: sources.expand([str(images)]), fifo)["value"]
    assert sorted(Path(p).name for p in found) == ["a.png", "b.png"]


# --------------------------------------------------------------------------------- 2. a FIFO named as the lock


@fifos
def test_a_fifo_named_as_the_lock_beside_a_marked_table_is_looked_at_without_waiting(tmp_path):
    """A folder of a run's marked ``inputs.parquet`` whose ``.salience-run.lock`` is a FIFO: ``lock_holder`` opened it
    for reading (waiting for a writer, under the lock of this process's runs), so ``open_run`` hung; now nobody holds
    it, and ``open_run`` says what a run stopped before its ``run.json`` says."""
    from salience.runs.lock import commit_holder, lock_holder
    from salience.runs.store import is_run_folder, open_run

    _a_run(tmp_path / "run")
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(tmp_path / "run" / "inputs.parquet", folder / "inputs.parquet")
    fifo = folder / LOCK_NAME
    os.mkfifo(fifo)
    assert is_run_folder(folder)
    assert _returns_soon(lambda: lock_holder(folder), fifo) == {"value": None}
    assert _returns_soon(lambda: commit_holder(folder), fifo) == {"value": None}
    error = _returns_soon(lambda: open_run(folder), fifo)["error"]
    assert str(error) == (f"{folder}: a dataset run's folder without its run.json (a run stopped before it wrote it, "
                          "or while --overwrite cleared it): nothing to show yet; run its command again")


# --------------------------------------------------------------------------------- 3. run.json nested deep


def _deep(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_run_json_nested_past_the_recursion_limit_is_no_manifest(files, tmp_path, capsys):
    """``{"a": [[[...]]], "format": "salience-run/2"}`` (400 KB, nested 100,000 deep; its ``format`` not first, so
    parsed): ``manifest_format`` raised ``RecursionError`` (so ``is_run_folder``, and ``salience explain IMAGE --out``
    into the folder: a traceback); now no manifest, the folder no run's, the figures written beside it."""
    from salience.runs.store import is_run_folder, manifest_format

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "run.json").write_bytes(b'{"a": ' + _deep() + b', "format": "salience-run/2"}')
    assert manifest_format(folder / "run.json") is None and not is_run_folder(folder)
    rc, _, err = test_s57_ends2._run(capsys, "explain", files.a, "--model", files.one_output, "--size", "32", "--top",
                                     "1", "--out", folder)
    assert rc == 0, err
    assert "summary.json" in {p.name for p in folder.iterdir()}



def test_a_salience_manifest_nested_past_the_recursion_limit_cannot_be_read(tmp_path):
    """``{"format": "salience-run/2", "a": [[[...]]]}``: a salience manifest by its first bytes; ``open_run`` raised
    ``RecursionError``; now a ``SalienceError`` saying the manifest cannot be read, as for any damaged one."""
    from salience.runs.store import open_run

    run = tmp_path / "run"
    _a_run(run)
    (run / "run.json").write_bytes(b'{"format": "salience-run/2", "a": ' + _deep() + b"}")
    with pytest.raises(SalienceError, match=r"run\.json: cannot read the run's manifest \(.*\); use overwrite=True"):
        open_run(run)
    with pytest.raises(SalienceError, match=r"run\.json: cannot read the run's manifest"):
        _a_run(run)


# --------------------------------------------------------------------------------- 4. a manifest cut short


def test_a_manifest_cut_short_is_started_again_with_overwrite_as_its_refusal_says(tmp_path):
    """A run's ``run.json`` cut to its first 60 bytes (``format`` whole in them): ``explain_dataset`` refuses it,
    saying to use ``overwrite=True``; that raised the same words (the manifest was read before ``overwrite``
    counted). Now the run starts again: 3 rows, as a run into a new folder makes."""
    run = tmp_path / "run"
    _a_run(run, 2)
    (run / "run.json").write_bytes((run / "run.json").read_bytes()[:60])
    with pytest.raises(SalienceError, match=r"cannot read the run's manifest \(.*\); use overwrite=True to start"):
        _a_run(run, 3)
    done = _a_run(run, 3, overwrite=True)
    fresh = _a_run(tmp_path / "fresh", 3)
    assert len(done) == 3 and done.table.column("path").to_pylist() == fresh.table.column("path").to_pylist()
    assert done.manifest["command"] == fresh.manifest["command"]


# --------------------------------------------------------------------------------- 5. a manifest not readable


def test_a_manifest_this_process_cannot_read_is_said_so_not_another_programs(tmp_path, monkeypatch):
    """A run's ``run.json`` this process may not open (another user's, mode 600; the tests run as root, so the
    system's ``open`` is made to refuse it): ``open_run`` said the folder "is not a salience run (its run.json is not
    a salience run's manifest ...)" and ``explain_dataset`` that it "holds a run.json that is not a salience run's
    manifest (... another program's file ...)". Now both say it cannot be read, why, and what to do; nothing
    touched."""
    import errno

    from salience.runs.store import open_run

    run = tmp_path / "run"
    _a_run(run)
    before = test_s57_ends2._files_of(run)
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith("run.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(SalienceError) as e:
        open_run(run)
    assert str(e.value) == (f"{run / 'run.json'}: cannot read the run's manifest (Permission denied); give this "
                            "process read access to it, then open the run again")
    for overwrite in (False, True):
        with pytest.raises(SalienceError) as e:
            _a_run(run, overwrite=overwrite)
        assert str(e.value) == (f"{run / 'run.json'}: cannot read the run's manifest (Permission denied); give this "
                                "process read access to it, or choose another out=")
    monkeypatch.undo()
    assert test_s57_ends2._files_of(run) == before


# --------------------------------------------------------------------------------- 6-8. pinned: held on the merge


def test_an_old_run_resumed_holds_unmarked_and_marked_shards_and_reads_whole(tmp_path):
    """A run of 6 images in shards of 2 whose tables carry no mark (written before the mark), stopped after 2 shards
    (its third shard and ``index.parquet`` gone): continued, it writes its third shard marked beside the two
    unmarked, keeps its unmarked ``inputs.parquet``, merges a marked ``index.parquet``; ``open_run`` reads all 6
    rows, from the index and from the mixed shards alike, equal to an uninterrupted run's; the explorer takes it."""
    import pyarrow.parquet as pq

    from salience.explore.runs import is_run
    from salience.runs.store import TABLE_MARK, open_run

    run = tmp_path / "old"
    _a_run(run, 6, shard_size=2)
    for p in [*run.glob("*.parquet"), *(run / "shards").glob("*.parquet")]:
        pq.write_table(pq.read_table(p).replace_schema_metadata(None), p)
    (run / "index.parquet").unlink()
    shards = sorted((run / "shards").glob("*.parquet"))
    shards[-1].unlink()
    _a_run(run, 6, shard_size=2)
    marks = [(pq.read_schema(p).metadata or {}).get(TABLE_MARK) for p in sorted((run / "shards").glob("*.parquet"))]
    assert marks == [None, None, b"shard"]
    assert (pq.read_schema(run / "inputs.parquet").metadata or {}).get(TABLE_MARK) is None
    assert pq.read_schema(run / "index.parquet").metadata[TABLE_MARK] == b"index"
    fresh = open_run(_a_run(tmp_path / "fresh", 6, shard_size=2).folder)
    columns = ["index", "path", "vanilla.max", "vanilla.mean"]
    want = fresh.table.select([c for c in columns if c in fresh.table.column_names]).to_pylist()
    assert open_run(run).table.select([c for c in columns if c in fresh.table.column_names]).to_pylist() == want
    (run / "index.parquet").unlink()
    assert open_run(run).table.select([c for c in columns if c in fresh.table.column_names]).to_pylist() == want
    assert is_run(run)


@pytest.mark.parametrize("options", [{}, {"row_group_size": 7}, {"write_page_index": True}, {"version": "1.0"},
                                     {"write_statistics": False}, {"compression": "zstd"}])
def test_the_footer_parsed_from_memory_equals_pyarrows_own_read(tmp_path, options):
    """A store-like table of 1,000 rows with 100 KB of key-value metadata, written by pyarrow with row groups of 7,
    a page index, format 1.0, no statistics, zstd: the schema parsed from the footer alone equals
    ``pyarrow.parquet.read_schema`` of the file, metadata included, and the table is a store's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import TABLE_MARK, _parquet_footer, is_store_table

    table = pa.table({"index": pa.array(range(1000), pa.int64()), "path": [f"p{i}" for i in range(1000)],
                      "shard": ["s"] * 1000, "offset": pa.array(range(1000), pa.int32())})
    path = tmp_path / "index.parquet"
    pq.write_table(table.replace_schema_metadata({TABLE_MARK: b"index", b"big": b"x" * 100_000}), path, **options)
    from_memory = pq.read_schema(pa.BufferReader(_parquet_footer(path)))
    assert from_memory.equals(pq.read_schema(path), check_metadata=True) and is_store_table(path)


def test_a_footer_of_exactly_the_cap_is_read_and_one_byte_over_is_not(tmp_path, monkeypatch):
    """The cap's boundary: a run's index whose footer's metadata is ``L`` bytes is a store table under a cap of ``L``
    and not under ``L - 1`` (``FOOTER_CAP`` read as each call runs)."""
    from salience.runs import store

    _a_run(tmp_path / "run")
    path = tmp_path / "run" / "index.parquet"
    length = int.from_bytes(path.read_bytes()[-8:-4], "little")
    monkeypatch.setattr(store, "FOOTER_CAP", length)
    assert store.is_store_table(path)
    monkeypatch.setattr(store, "FOOTER_CAP", length - 1)
    assert not store.is_store_table(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
