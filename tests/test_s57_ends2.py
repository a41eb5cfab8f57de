"""Session 57: the dataset runs' open ends left by session 56's review of ``salience.runs``, each pinned. Every test
here fails on the code before (the base commit 30e60efd), as said in its docstring.

1. ``runs.store.is_store_table`` let pyarrow read a parquet footer of the length the file states: a file named
   ``inputs.parquet`` whose footer claimed 64 MiB (1 GiB alike, measured: 1 GiB read, 1 GiB resident, 9 s) was read
   that far. Now the footer is read by salience, 8 bytes and then at most ``FOOTER_CAP`` (4 MiB), and parsed from
   memory.
2. A user's own ``inputs.parquet`` of columns ``index`` and ``path`` was taken for a run's table. Now the store marks
   its tables (``TABLE_MARK`` in the parquet schema's key-value metadata); an unmarked table is a run's only beside
   its ``run.json`` or lock (old runs). And ``overwrite=True`` took such a user's file for the run's planned inputs
   (a folder without ``run.json``): now refused, the file untouched; a run's own leftover ``inputs.parquet`` (a run
   stopped while ``overwrite`` cleared it) is cleared, where it was kept and the new command ran over the old inputs.
3. Any ``run.json`` made a folder a run's, ``open_run`` said "unknown run format None ... upgrade salience", and
   ``overwrite=True`` deleted the user's ``run.json`` and ``maps/``. Now the manifest is checked (its ``format``,
   cheaply) and such a folder refused clearly, its files untouched.
4. ``salience.explore`` (and ``open_run``) of a run that is starting said "not a salience run (no run.json)": now the
   command line's words, from one function (``runs.store.unwritten_run``).
5. A Ray actor still writing a shard after its run ended (the run's end stops waiting after ``FENCE_WAIT``) holds the
   commits' byte, which ``lock_holder`` does not look at: ``explore`` of that folder without ``run.json`` said "run its
   command again" while the process wrote into it. Now ``lock.commit_holder`` names it and the advice is to wait.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

import test_s53_cliaudit
import test_s54_clidecide
import test_s56_ends
from salience import SalienceError
from salience.runs import lock
from salience.runs.lock import LOCK_NAME

files = test_s54_clidecide.files  # the fixture: two 32 x 32 PNGs, a truncated PNG, nets of one and three outputs
_run = test_s53_cliaudit._run  # main(argv) in this process: (exit code, stdout, stderr), no traceback
_hold_lock_in_a_child = test_s56_ends._hold_lock_in_a_child

linux_io = pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="bytes read: Linux's /proc/self/io")


def _read_bytes() -> int:
    """Bytes this process has read so far (``rchar`` of ``/proc/self/io``: every ``read``, pyarrow's C++ ones too)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(2, 3))


def _data(n: int):
    import torch

    return torch.utils.data.TensorDataset(torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)))


def _a_run(folder: Path, n: int = 2, **kwargs):
    import salience

    return salience.explain_dataset(_model(), _data(n), ["vanilla"], folder, workers=0, **kwargs)


def _users_table(path: Path) -> None:
    """A user's own table of the columns a run's ``inputs.parquet`` has (``index`` int64, ``path`` string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"index": pa.array([0, 1], pa.int64()), "path": ["mine/a.png", "mine/b.png"]}), path)


def _files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- 1. the footer read, bounded


@linux_io
@pytest.mark.parametrize("claimed", [64 << 20, (64 << 20) + 1000])
def test_a_footer_claiming_a_large_length_is_not_read(tmp_path, claimed):
    """A sparse file of 64 MiB + 12 bytes named ``inputs.parquet``, ``PAR1`` at both ends and a footer claiming 64 MiB
    of metadata (what the file holds) or more than it holds: the check read 64 MiB in the first case (pyarrow
    follows the length); now it reads the 8 bytes of the footer's end (and the 4 of its start), whichever. Not a run's
    table, the folder not a run's."""
    from salience.runs.store import is_run_folder, is_store_table

    path = tmp_path / "inputs.parquet"
    with open(path, "wb") as f:
        f.write(b"PAR1")
        f.seek((64 << 20) + 4)
        f.write(claimed.to_bytes(4, "little") + b"PAR1")
    before = _read_bytes()
    assert not is_store_table(path) and not is_run_folder(tmp_path)
    assert _read_bytes() - before < 1 << 20


def test_a_runs_own_tables_are_read_from_their_footer_alone(tmp_path):
    """A run's ``inputs.parquet``, ``index.parquet`` and shard are store tables, their footers well under the cap;
    each is known from its footer (parsed from memory: a table whose data is zeroed still is one)."""
    from salience.runs.store import FOOTER_CAP, is_store_table

    _a_run(tmp_path / "run")
    tables = [tmp_path / "run" / "inputs.parquet", tmp_path / "run" / "index.parquet",
              *sorted((tmp_path / "run" / "shards").glob("*.parquet"))]
    for table in tables:
        data = table.read_bytes()
        length = int.from_bytes(data[-8:-4], "little")
        assert is_store_table(table) and length < FOOTER_CAP // 100
        table.write_bytes(b"PAR1" + bytes(len(data) - length - 12) + data[-8 - length:])  # the data zeroed
        assert is_store_table(table)


# --------------------------------------------------------------------------------- 2. a run's tables, marked


def test_a_users_inputs_table_of_index_and_path_is_not_a_run(files, tmp_path, capsys):
    """A user's folder holding their own ``inputs.parquet`` of columns ``index`` and ``path``: a run's to
    ``is_run_folder`` and ``explain IMAGE --out`` was refused (exit 2); now no run's, and the figures are written
    there beside the user's file, left as it was."""
    from salience.explore.runs import is_run
    from salience.runs.store import is_run_folder, is_store_table

    mine = tmp_path / "mine"
    mine.mkdir()
    _users_table(mine / "inputs.parquet")
    before = (mine / "inputs.parquet").read_bytes()
    assert not is_store_table(mine / "inputs.parquet") and not is_run_folder(mine) and not is_run(mine)
    rc, _, err = _run(capsys, "explain", files.a, "--model", files.one_output, "--size", "32", "--top", "1",
                      "--out", mine)
    assert rc == 0, err
    assert "summary.json" in {p.name for p in mine.iterdir()} and (mine / "inputs.parquet").read_bytes() == before


def test_the_store_marks_its_tables_and_a_copied_runs_tables_are_still_a_run(tmp_path):
    """Each table a run writes carries the mark (kind ``inputs``, ``shard``, ``index``), an ``inputs.parquet`` written
    again when a continued run restores its labels too; a run's
    tables copied without ``run.json`` and lock are still a run's (the base said so from the columns alone)."""
    import pyarrow.parquet as pq

    from salience.runs.store import TABLE_MARK, is_run_folder

    run = tmp_path / "run"
    _a_run(run, labels=[1, 2])
    inputs = pq.read_table(run / "inputs.parquet")
    pq.write_table(inputs.drop(["label"]).replace_schema_metadata(None), run / "inputs.parquet")
    _a_run(run, labels=[1, 2])  # continued: its labels written back into inputs.parquet (Store._restore_labels)
    kinds = {p.name if p.parent == run else "shard": pq.read_schema(p).metadata[TABLE_MARK]
             for p in [*run.glob("*.parquet"), *(run / "shards").glob("*.parquet")]}
    assert kinds == {"inputs.parquet": b"inputs", "index.parquet": b"index", "shard": b"shard"}
    assert pq.read_table(run / "inputs.parquet").column("label").to_pylist() == [1, 2]
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("inputs.parquet", "index.parquet"):
        shutil.copy(run / name, copied / name)
    assert is_run_folder(copied)


def test_a_run_written_before_the_mark_is_known_by_its_run_json_or_its_lock(tmp_path):
    """A run whose tables carry no mark (written before session 57): a run's with its ``run.json``, or its lock
    alone, and read by ``open_run`` as before; its tables alone are not (the base took them for a run's)."""
    import pyarrow.parquet as pq

    from salience.runs.store import is_run_folder, open_run

    run = tmp_path / "old"
    _a_run(run)
    for p in [*run.glob("*.parquet"), *(run / "shards").glob("*.parquet")]:
        pq.write_table(pq.read_table(p).replace_schema_metadata(None), p)
    assert is_run_folder(run) and len(open_run(run)) == 2
    manifest = (run / "run.json").read_bytes()
    (run / "run.json").unlink()
    assert is_run_folder(run)
    (run / LOCK_NAME).unlink()
    assert not is_run_folder(run)
    (run / "run.json").write_bytes(manifest)
    assert is_run_folder(run) and len(open_run(run)) == 2


def test_overwrite_never_takes_a_users_inputs_table_for_the_runs(tmp_path):
    """``overwrite=True`` into a user's folder holding only their ``inputs.parquet`` (index, path): the run was made
    over the user's two paths (its rows named ``mine/a.png``); now refused before anything is written, the folder
    as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    _users_table(mine / "inputs.parquet")
    before = _files_of(mine)
    with pytest.raises(SalienceError, match="exists and is not a salience run; choose another out="):
        _a_run(mine, 3, overwrite=True)
    assert _files_of(mine) == before and sorted(p.name for p in mine.iterdir()) == ["inputs.parquet"]


def test_a_run_stopped_while_overwrite_cleared_it_is_started_again_over_the_new_inputs(tmp_path):
    """A run of 2 images stopped while ``overwrite`` cleared it (after its ``run.json``: its lock and tables left),
    run again with ``overwrite=True`` over 3 images: its stale ``inputs.parquet`` was kept and the run made 2 rows;
    now 3, as a run into a new folder makes."""
    from salience.runs.store import is_run_folder

    run = tmp_path / "run"
    _a_run(run, 2)
    for name in ("maps", "shards", "thumbs"):
        shutil.rmtree(run / name)
    (run / "run.json").unlink()
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, "index.html", "index.parquet",
                                                            "inputs.parquet"]) and is_run_folder(run)
    done = _a_run(run, 3, overwrite=True)
    fresh = _a_run(tmp_path / "fresh", 3)
    assert len(done) == 3 and done.table.column("path").to_pylist() == fresh.table.column("path").to_pylist()


# --------------------------------------------------------------------------------- 3. run.json, by its content


def _users_run_json(folder: Path) -> None:
    """A user's experiment folder: their own ``run.json`` (another program's), a ``maps/`` of theirs and an image."""
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"name": "my experiment", "lr": 0.1}))
    (folder / "maps").mkdir()
    (folder / "maps" / "notes.txt").write_text("mine")


def test_a_users_run_json_is_not_a_run_and_is_refused_clearly(files, tmp_path):
    """A user's folder with their own ``run.json``: a run's to ``is_run_folder`` (base); ``open_run`` said "unknown run
    format None ... upgrade salience"; ``explain_dataset`` refused it as an unknown format, and with
    ``overwrite=True`` deleted the user's ``run.json`` and ``maps/``. Now no run's; each refusal says the file is not
    a salience run's manifest, and nothing is touched."""
    from salience.explore.runs import is_run
    from salience.runs.store import is_run_folder, open_run

    mine = tmp_path / "mine"
    _users_run_json(mine)
    shutil.copy(files.a, mine / "a.png")
    before = _files_of(mine)
    assert not is_run_folder(mine) and not is_run(mine)
    with pytest.raises(SalienceError) as e:
        open_run(mine)
    assert str(e.value) == (f"{mine} is not a salience run (its run.json is not a salience run's manifest: no "
                            "\"format\": \"salience-run/N\" in it); give the folder of a run (out= of "
                            "salience.explain_dataset, --out of 'salience explain DIR --out RUN')")
    for overwrite in (False, True):
        with pytest.raises(SalienceError) as e:
            _a_run(mine, overwrite=overwrite)
        assert str(e.value) == (f"{mine} holds a run.json that is not a salience run's manifest (no \"format\": "
                                "\"salience-run/N\" in it: another program's file, or a damaged one); choose another "
                                "out= (an empty or new folder), or move that run.json away")
        assert _files_of(mine) == before


def test_manifest_format_is_cheap_and_knows_salience_manifests_in_any_key_order(tmp_path):
    """A real run's ``run.json`` is known from its first 4 KiB; one whose ``format`` is not its first key is read
    whole; a 16 MiB file whose first key is another is read up to 1 MiB and is not a manifest; nor is JSON that is
    not an object, nor another format. (``manifest_format`` is new: the base read no content.)"""
    from salience.runs.store import MANIFEST_CAP, manifest_format

    run = tmp_path / "run"
    _a_run(run)
    assert manifest_format(run / "run.json") == "salience-run/2"
    manifest = json.loads((run / "run.json").read_text())
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({**{k: v for k, v in manifest.items() if k != "format"}, "format": "salience-run/1"}))
    assert manifest_format(moved) == "salience-run/1"
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"data": "x" * (16 << 20), "format": "salience-run/2"}))
    if Path("/proc/self/io").is_file():
        before = _read_bytes()
        assert manifest_format(big) is None
        assert _read_bytes() - before <= MANIFEST_CAP + 8192
    for text in ("[1, 2]", '"salience-run/2"', '{"format": "other/1"}', '{"format": 2}', "not json", "\xff"):
        (tmp_path / "x.json").write_text(text, encoding="latin-1")
        assert manifest_format(tmp_path / "x.json") is None, text
    assert manifest_format(tmp_path / "none.json") is None and manifest_format(tmp_path) is None


# --------------------------------------------------------------------------------- 4. the Python API of a starting run


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_explore_and_open_run_of_a_starting_run_say_what_the_command_line_says(tmp_path):
    """A run holding its lock before its ``run.json``: ``salience.explore(model, [RUN])``, ``explore(model,
    run=RUN)`` and ``open_run`` said "RUN is not a salience run (no run.json)"; now ``RUN: `` and the command line's
    words (it is starting, open it again in a moment); after ``kill -9`` the command line's other words (run its
    command again)."""
    import socket

    import salience
    from salience.cli.explore_cmd import _left_out

    folder = tmp_path / "starting"
    pid = _hold_lock_in_a_child(folder)
    try:
        said = _left_out(str(folder), 10**6)
        assert said == (f"a dataset run that is starting (another salience process (pid {pid} on host "
                        f"{socket.gethostname()}) is writing it and has not written its run.json yet): nothing to show "
                        "yet; open it again in a moment")
        for call in (lambda: salience.explore("demo:shapes", [folder], show=False),
                     lambda: salience.explore("demo:shapes", run=folder, show=False),
                     lambda: salience.open_run(folder)):
            with pytest.raises(SalienceError) as e:
                call()
            assert str(e.value) == f"{folder}: {said}"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    said = _left_out(str(folder), 10**6)
    assert said.endswith("nothing to show yet; run its command again")
    with pytest.raises(SalienceError) as e:
        salience.explore("demo:shapes", run=folder, show=False)
    assert str(e.value) == f"{folder}: {said}"


# --------------------------------------------------------------------------------- 5. a commit after its run's end


@pytest.mark.skipif(not hasattr(os, "fork") or lock.fcntl is None, reason="fork, POSIX record locks")
def test_a_shard_still_written_after_its_run_ended_is_said(tmp_path, monkeypatch, capsys):
    """A process writing a shard (``commit_fence``) past its run's end (the end waited ``FENCE_WAIT``, warned, and
    released the run's lock): ``lock_holder`` says nobody holds the folder, and ``explore`` of it (without its
    ``run.json``) said to run its command again while that process wrote into it. Now ``commit_holder`` names the
    process and the advice is to wait for it; once it is gone, the old words."""
    from salience.cli.explore_cmd import _left_out
    from salience.runs.lock import commit_fence, lock_holder, run_lock

    monkeypatch.setattr(lock, "FENCE_WAIT", 0.2)
    folder = tmp_path / "run"
    with pytest.warns(UserWarning, match="a shard is still being written"):
        with run_lock(folder) as writer:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child: a Ray actor's commit, past its run's end
                try:
                    os.close(read)
                    with commit_fence(writer):
                        os.write(write, b"in")
                        signal.pause()
                finally:
                    os._exit(0)
            os.close(write)
            assert os.read(read, 2) == b"in"
            os.close(read)
    try:
        assert lock_holder(folder) is None
        assert _left_out(str(folder), 10**6) == (
            f"a dataset run's folder without its run.json, where another salience process (pid {pid}) is still "
            "writing a shard of a run that has ended: nothing to show yet; wait for it to finish (or stop it), then "
            "run its command again")
        from salience.runs.lock import commit_holder  # new in session 57

        assert commit_holder(folder) == f"another salience process (pid {pid})"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert commit_holder(folder) is None and _left_out(str(folder), 10**6).endswith("run its command again")


def test_a_run_that_begins_between_the_looks_is_said_to_be_starting(tmp_path, monkeypatch):
    """The run's lock free at the first look, the commits' byte held at the second (a run beginning then holds it a
    moment, writing its token): the run's lock is asked again, and the run said to be starting, not an ended run's
    commit."""
    from salience.runs import store

    looks = iter([None, "another salience process (pid 7 on host h)"])
    monkeypatch.setattr(store, "lock_holder", lambda folder: next(looks))
    monkeypatch.setattr(store, "commit_holder", lambda folder: "another salience process (pid 7)")
    assert store.unwritten_run(tmp_path) == (
        "a dataset run that is starting (another salience process (pid 7 on host h) is writing it and has not "
        "written its run.json yet): nothing to show yet; open it again in a moment")


def test_commit_holder_in_the_process_holding_the_run_never_opens_the_lock_file(tmp_path):
    """In the process that holds the run's lock, ``commit_holder`` answers ``None`` without opening the file (closing
    a descriptor of it would release the run's lock)."""
    from salience.runs.lock import commit_holder, run_lock

    folder = tmp_path / "mine"
    with run_lock(folder):
        said, opened = test_s56_ends._opens(lambda: commit_holder(folder))
        assert said is None and LOCK_NAME not in opened


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
