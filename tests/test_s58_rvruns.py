"""Session 58, the review of the runs change (1dcb6842: every reader of ``run.json`` checks it). Every test marked
"fails on the base" fails on 1dcb6842, as its docstring says; the others guard what the change must keep.

1. A manifest's method names become paths (``maps/<method>/<shard>.npy``): a crafted ``run.json`` whose method is
   ``../../x`` (or holds a ``/`` or a NUL, or is ``..``) was read, and ``run.map(i, "../../x")`` loaded an array from
   outside the run's folder. Now such a manifest is damaged (``read_manifest``: a ``SalienceError``), and the writer
   (``explain_dataset``'s method names) and the readers share one test of a name (``_core.files.one_name``; on Windows
   also ``\\`` and a drive ``C:x``).
2. A table's ``shard`` becomes a path too (``maps/<method>/<shard>.npy``, ``thumbs/<shard>.jpg``): a row of
   ``index.parquet`` whose shard was ``../../x`` read maps from outside the run's folder. Now refused.
3. ``read_manifest`` read ``run.json`` whole, whatever its size. Now at most ``MANIFEST_READ_CAP`` (16 MiB; a run's
   manifest is 1.1 KiB, 19 KiB with ImageNet's 1000 class names, 0.4 MiB with 21843), a larger one refused.
4. ``salience explore RUN`` of a damaged run said "use overwrite=True", a Python keyword. Now the run is left out (as
   a run without its ``run.json`` is), its refusal said with the flag, ``--overwrite``.
5. ``shards/*.parquet``, ``inputs.parquet`` and ``maps/*/*.npy`` went to pyarrow / numpy plainly: ``np.load`` of a
   FIFO of a map's name waited for a writer for ever; pyarrow (its dataset discovery) raised a bare
   ``FileNotFoundError`` naming a FIFO that is there (``open_run``'s ``len``, ``done_indices``, a continued run's
   ``inputs.parquet``). Now each is checked first (``_core.files.check_regular``): a ``SalienceError`` saying to
   remove it. Run in a child process that kills itself after 20 s: a regression fails, it never hangs.
6. A manifest of a newer salience's format holding a key twice was "damaged: use overwrite=True to start again"
   (which deletes that run). Now its format is said: upgrade salience.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pytest

import salience
import test_s55_cliends
import test_s57_ends2
from salience import SalienceError
from salience.runs.store import open_run

_a_run = test_s57_ends2._a_run  # explain_dataset of a 2-conv net on n random 8 x 8 images, vanilla, workers=0
_files_of = test_s57_ends2._files_of
started = test_s55_cliends.started  # the explorer's server replaced by a recorder of its inputs
SRC = Path(salience.__file__).resolve().parents[1]  # the salience under test, for the child processes
DAMAGED = r"run\.json: the run's manifest is damaged \({}.*\); use overwrite=True to start again"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of 2 images (one shard), copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("s58rv") / "run"
    _a_run(folder)
    return folder


def _copy(finished: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "box" / "run"
    shutil.copytree(finished, folder)
    return folder


def _edit(folder: Path, **changes: Any) -> None:
    manifest = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**manifest, **changes}, indent=2))


def _outside(folder: Path, name: str, shard: str) -> Path:
    """A map file planted where ``maps/<name>/<shard>.npy`` leads from ``folder``, outside it: what a crafted run
    would read."""
    target = (folder / "maps" / name / f"{shard}.npy").resolve()
    assert not target.is_relative_to(folder.resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, np.full((2, 1, 8, 8), 7.0, np.float16))
    return target


# --------------------------------------------------------------------------------- 1. method names

@pytest.mark.parametrize("name", ["../../x", "../x", "..", "a/b", "a\0b", ".hidden", ""])
def test_a_manifest_method_that_is_no_folder_name_is_damaged(finished, tmp_path, name):
    """Fails on the base: the run opened, and (``../../x``) ``run.map(0, "../../x")`` loaded the array planted
    outside the run's folder. Now every reader refuses the manifest as damaged, naming ``methods``; nothing read or
    written."""
    from salience.explore.runs import RunSource
    from salience.runs import gallery
    from salience.runs.store import Store

    folder = _copy(finished, tmp_path)
    shard = open_run(folder).table.column("shard")[0].as_py()
    if name == "../../x":
        _outside(folder, name, shard)
    _edit(folder, methods=[name])
    before = _files_of(tmp_path)
    for read in (open_run, RunSource, gallery.write, Store.existing):
        with pytest.raises(SalienceError, match=DAMAGED.format(r'"methods" is .*expected a list of method names, '
                                                               r"each a folder's name")):
            read(folder)
    assert _files_of(tmp_path) == before


def test_a_continued_run_refuses_a_manifest_method_that_leads_out_of_its_folder(finished, tmp_path):
    """Fails on the base: the manifest was read; now it is damaged, the run's command refused before any write
    (``overwrite=True`` clears it, as any damaged manifest)."""
    folder = _copy(finished, tmp_path)
    _edit(folder, methods=["../../x"])
    before = _files_of(tmp_path)
    with pytest.raises(SalienceError, match=DAMAGED.format('"methods"')):
        _a_run(folder)
    assert _files_of(tmp_path) == before
    assert len(_a_run(folder, overwrite=True)) == 2


def test_a_method_named_with_a_nul_is_refused_before_any_file(tmp_path):
    """Fails on the base (the writer's test of a name let a NUL through: a ``ValueError`` from the file system once
    the run had begun). Now the writer and the readers share ``one_name``: a ``SalienceError``, nothing written."""
    with pytest.raises(SalienceError, match=r"method name 'a\\x00b' cannot name a folder of the store"):
        salience.explain_dataset(test_s57_ends2._model(), test_s57_ends2._data(2), {"a\0b": salience.vanilla},
                                 tmp_path / "run", workers=0)
    assert not (tmp_path / "run").exists()


def test_one_name_is_one_entry_inside_a_folder_on_posix_and_windows():
    """Fails on the base (no such function). A name reads as one part, no drive, no root: on Windows ``a\\b`` is two
    parts and ``C:x`` a drive, on POSIX both are one file's name (a run written there keeps reading)."""
    from salience._core.files import one_name

    for name in ("vanilla", "grad cam", "mine:v2", "é", "a..b"):
        assert one_name(name, PurePosixPath) and one_name(name, PureWindowsPath), name
    for name in ("", ".", "..", ".x", "../x", "x/..", "/x", "a\0b", None, 3, ["x"]):
        assert not one_name(name, PurePosixPath) and not one_name(name, PureWindowsPath), name
    for name in ("a\\b", "C:x", "\\\\server\\share"):
        assert one_name(name, PurePosixPath) and not one_name(name, PureWindowsPath), name


# --------------------------------------------------------------------------------- 2. shard names of a table

@pytest.mark.parametrize("shard", ["../../../x", "a/b", ".."])
def test_a_table_row_whose_shard_leads_out_of_the_run_is_refused(finished, tmp_path, shard):
    """Fails on the base: ``run.map`` loaded ``maps/vanilla/../../../x.npy`` (planted outside the run's folder: the
    sevens) and the thumbnail's path led there too. Now both refuse the row, naming its shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.explore.runs import RunSource

    folder = _copy(finished, tmp_path)
    table = pq.read_table(folder / "index.parquet")
    table = table.set_column(table.column_names.index("shard"), "shard", pa.array([shard] * table.num_rows))
    pq.write_table(table, folder / "index.parquet")
    if shard == "../../../x":
        _outside(folder, "vanilla", shard)
    run = open_run(folder)
    said = rf"image 0's row in the run's table \(.*\) names the shard {shard!r}, which is no file name in the run's"
    with pytest.raises(SalienceError, match=said.replace(".", r"\.").replace(r"\.*", ".*")):
        run.map(0, "vanilla")
    with pytest.raises(SalienceError, match="which is no file name in the run's folder"):
        run.thumbnail(0)
    with pytest.raises(SalienceError, match="which is no file name in the run's folder"):
        RunSource(folder).stored_map(0, "vanilla")


def test_a_run_of_the_shard_names_salience_writes_reads_as_before(finished, tmp_path):
    """Guards: a run's own shard names (``000000000``, ``000000017-1``) are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _copy(finished, tmp_path)
    run = open_run(folder)
    expected = run.map(1, "vanilla")
    old = run.table.column("shard")[0].as_py()
    for p in ((folder / "maps" / "vanilla" / f"{old}.npy"), (folder / "thumbs" / f"{old}.jpg")):
        p.rename(p.with_name(f"{old}-1{p.suffix}"))
    table = pq.read_table(folder / "index.parquet")
    table = table.set_column(table.column_names.index("shard"), "shard", pa.array([f"{old}-1"] * table.num_rows))
    pq.write_table(table, folder / "index.parquet")
    again = open_run(folder)
    np.testing.assert_array_equal(again.map(1, "vanilla"), expected)
    assert again.thumbnail(1)[0].name == f"{old}-1.jpg"


# --------------------------------------------------------------------------------- 3. the manifest's size

def test_a_manifest_over_the_cap_is_refused_unread_past_it(finished, tmp_path):
    """Fails on the base: a ``run.json`` of salience's format padded past 16 MiB was read whole and the run opened.
    Now a ``SalienceError`` saying it is over the cap; a manifest of 21843 class names (0.4 MiB, ImageNet-21k's
    count) is read as ever."""
    from salience.runs.store import MANIFEST_READ_CAP

    folder = _copy(finished, tmp_path)
    _edit(folder, class_names=[f"class number {i}" for i in range(21843)])
    assert len((folder / "run.json").read_bytes()) < 1 << 20
    assert len(open_run(folder)) == 2
    _edit(folder, class_names=["x" * (MANIFEST_READ_CAP // 2)] * 2)
    with pytest.raises(SalienceError, match=r"run\.json: cannot read the run's manifest \(it is over 16 MiB, and a "
                                            r"run's manifest is a few KiB: not one salience wrote\); use overwrite=True"):
        open_run(folder)


# --------------------------------------------------------------------------------- 4. the command line's words

def test_salience_explore_of_a_damaged_run_names_the_flag(finished, tmp_path, capsys, started):
    """Fails on the base: ``salience explore RUN`` of a run whose manifest is damaged kept it, and the explorer
    refused it with "use overwrite=True". Now the run is left out (a line naming it, said with ``--overwrite``), and
    with nothing else to show the command exits 2 before the model loads."""
    folder = _copy(finished, tmp_path)
    _edit(folder, methods="vanilla")
    rc, out, err = test_s55_cliends._run(capsys, "explore", "--model", "demo:shapes", folder)
    assert rc == 2 and started == []
    assert f"left out {folder / 'run.json'}: the run's manifest is damaged" in err
    assert "use --overwrite to start again" in err and "overwrite=True" not in err


def test_salience_explore_keeps_a_sound_run(finished, tmp_path, started):
    """Guards: a run whose manifest is sound is shown (no line said)."""
    from salience.cli.explore_cmd import _left_out

    assert _left_out(str(finished), 10**6) is None


# --------------------------------------------------------------------------------- 5. no FIFO handed to a reader

_CHILD = textwrap.dedent("""
    import shutil, signal, sys
    from pathlib import Path
    from salience import SalienceError
    from salience.runs.store import Store, done_indices, open_run
    folder, what = Path(sys.argv[1]), sys.argv[2]
    signal.alarm(20)  # imports done: a read that waits is killed (SIGALRM), the parent sees it
    try:
        if what == "shard":
            print(len(open_run(folder)))
        elif what == "done":
            print(done_indices(folder))
        elif what == "inputs":
            print(Store.existing(folder).input_paths())
        elif what == "map":
            print(open_run(folder).map(0, "vanilla").shape)
    except SalienceError as e:
        print("SalienceError:", e)
""")


def _in_a_child(folder: Path, what: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), what], capture_output=True, text=True,
                              timeout=300, env=env)
    except subprocess.TimeoutExpired:  # pragma: no cover - a regression: the child waited past its alarm
        pytest.fail(f"{what} waited on a FIFO")
    assert done.returncode == 0, f"{what}: exit {done.returncode} (-14: waited 20 s on the FIFO); {done.stderr[-2000:]}"
    return done.stdout.strip()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")
@pytest.mark.parametrize("what", ["shard", "done", "inputs", "map"])
def test_a_fifo_named_like_a_runs_table_or_map_is_never_handed_to_a_reader(finished, tmp_path, what):
    """Fails on the base: numpy opened the FIFO of a map's name and waited for a writer (the child killed by its
    alarm); pyarrow raised a bare ``FileNotFoundError`` of a file that is there. Now a ``SalienceError`` naming the
    file and saying to remove it."""
    import stat

    folder = _copy(finished, tmp_path)
    shard = open_run(folder).table.column("shard")[0].as_py()
    fifo = {"shard": folder / "shards" / "999999999.parquet", "done": folder / "shards" / "999999999.parquet",
            "inputs": folder / "inputs.parquet", "map": folder / "maps" / "vanilla" / f"{shard}.npy"}[what]
    if what == "shard":
        (folder / "index.parquet").unlink()  # a run still going: its rows are its shards'
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    assert _in_a_child(folder, what) == (
        f"SalienceError: {fifo} is not a regular file (a FIFO, a device or a socket of a run file's name); remove it, "
        "then run the command again (or open the run again)")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_check_regular_leaves_a_missing_path_to_its_reader(tmp_path):
    """Guards: a path not there is not refused by the check (the reader's own error says it, as before); a regular
    file and a link to one pass."""
    from salience._core.files import check_regular

    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    for p in (tmp_path / "missing", tmp_path / "f", tmp_path / "link"):
        check_regular(p, "a run file's name", "try again")
    with pytest.raises(SalienceError, match="is not a regular file"):
        check_regular(tmp_path, "a run file's name", "try again")


# --------------------------------------------------------------------------------- 6. a newer salience's run

def test_a_newer_formats_manifest_holding_a_key_twice_is_never_said_to_start_again(finished, tmp_path):
    """Fails on the base: a ``run.json`` of an unknown (a newer salience's) format holding a key twice was refused as
    damaged, "use overwrite=True to start again", which deletes that run. Now its format is said (upgrade salience),
    by ``open_run`` and by a continued run (which says ``overwrite=True`` would delete it), nothing written."""
    folder = _copy(finished, tmp_path)
    text = (folder / "run.json").read_text().replace('"salience-run/2"', '"salience-run/3"', 1)
    (folder / "run.json").write_text(text.replace('"model": ', '"model": "other", "model": ', 1))
    before = _files_of(tmp_path)
    with pytest.raises(SalienceError, match=r"unknown run format 'salience-run/3' .*; upgrade salience$"):
        open_run(folder)
    with pytest.raises(SalienceError, match=r"unknown run format 'salience-run/3' .*upgrade salience to continue it.*"
                                            r"\(overwrite=True would delete it\)"):
        _a_run(folder)
    assert _files_of(tmp_path) == before
