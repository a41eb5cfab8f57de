"""Session 59: leftovers of earlier stops. Every test marked "fails on the base" fails on the code before (the base
commit 738b35b3), as its docstring says; the others guard what the change must keep.

1. A run's map file (``maps/<method>/<shard>.npy``), its tables (``inputs.parquet``, ``index.parquet``,
   ``shards/*.parquet``) and the explorer's sprites (``thumbs/<shard>.jpg``) were checked regular by a ``stat``
   (``_core.files.check_regular``), then opened by numpy / pyarrow / PIL by path: a file swapped for a FIFO between
   the two was opened plainly, and numpy's and PIL's opens waited for a writer for ever (pyarrow raised a bare
   ``FileNotFoundError``). Now each is opened once without waiting, checked on its handle (``fstat``) and read
   through it (``store._read_regular``; a map: ``np.load``'s steps on the handle, then ``np.memmap`` of it,
   ``store._load_maps``): a ``SalienceError`` saying to remove it. The swap is stood in for by an ``os.stat`` that
   says "regular" of the FIFO; each such read runs in a child process that kills itself after 20 s
   (``signal.alarm``): a regression fails, it never hangs the suite. The arrays, tables and errors of damaged files
   are numpy's and pyarrow's own (guards); an ``.npz`` archive under a map's name was returned as an archive (an
   ``AttributeError`` later, a 500 in the explorer): now a ``ValueError``, a damaged map.
2. ``load_image`` of a named pipe (``mkfifo``'s) that no program writes to waited for ever. Now it is opened without
   waiting and waited on for a writer ``PIPE_WAIT_S`` (5 s) at most: a ``SalienceError`` saying no program opened
   it for writing; a writer that comes in time is read whole (guard), as are the shell's pipes (``/dev/stdin``, ``<(...)``; guards).
3. ``python -m salience.demo.train`` and each example's parser took an abbreviated flag for the full one (``--epo 3``
   for ``--epochs 3``). Now they refuse it (the trainer naming the full flag: ``_core.args.FullFlags``, which the
   ``salience`` command's parser is too); a flag written in full still works (guard).
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import salience
import test_s57_ends2
from salience import SalienceError
from salience.runs.store import open_run

_a_run = test_s57_ends2._a_run  # explain_dataset of a 2-conv net on n random 8 x 8 images, vanilla, workers=0
SRC = Path(salience.__file__).resolve().parents[1]  # the salience under test, for the child processes
ROOT = Path(__file__).resolve().parents[1]
fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")


def _child(code: str, *args: str, timeout: float = 300) -> str:
    """``code`` run in a child process (``sys.argv[1:]`` = ``args``) that kills itself 20 s after its imports
    (``signal.alarm(20)`` in ``code``): its stdout; a wait fails the test, never hangs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:  # pragma: no cover - a regression: the child waited past its alarm
        pytest.fail(f"{args}: waited on a FIFO")
    assert done.returncode == 0, f"{args}: exit {done.returncode} (-14: waited 20 s on the FIFO); {done.stderr[-3000:]}"
    return done.stdout.strip()


# --------------------------------------------------------------------------------- 1. one open, checked on its handle

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of 2 images (one shard), copied by each test that changes it."""
    folder = tmp_path_factory.mktemp("s59") / "run"
    _a_run(folder)
    return folder


def _copy(finished: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "box" / "run"
    shutil.copytree(finished, folder)
    return folder


_SWAPPED = """
    import os, signal, stat, sys
    from pathlib import Path
    from salience import SalienceError
    from salience.runs.store import Store, done_indices, open_run
    folder, what, swapped = Path(sys.argv[1]), sys.argv[2], os.path.abspath(sys.argv[3])
    real_stat, regular = os.stat, os.stat(sys.argv[1] + "/run.json")

    def stat_said_regular(path, *args, **kwargs):  # the FIFO was a regular file when it was looked at
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)) == swapped:
            return regular
        return real_stat(path, *args, **kwargs)

    os.stat = stat_said_regular
    signal.alarm(20)  # imports done: a read that waits is killed (SIGALRM), the parent sees it
    try:
        if what == "map":
            print(open_run(folder).map(0, "vanilla").shape)
        elif what == "index":
            print(len(open_run(folder)))
        elif what == "shard":
            print(done_indices(folder))
        elif what == "inputs":
            print(Store.existing(folder).input_paths())
        elif what == "thumb":
            from salience.explore.runs import RunSource
            print(len(RunSource(folder).thumbnail(0)))
    except SalienceError as e:
        print(type(e).__name__ + ":", e)
"""


@fifo
@pytest.mark.parametrize("what", ["map", "index", "shard", "inputs", "thumb"])
def test_a_run_file_swapped_for_a_fifo_after_its_check_is_never_waited_on(finished, tmp_path, what):
    """Fails on the base: the check's ``stat`` said "regular" (the file swapped for a FIFO after it), then numpy
    (``map``) and PIL (``thumb``) opened the FIFO by path and waited for a writer (the child killed by its alarm),
    pyarrow raised a bare ``FileNotFoundError`` (the tables). Now the one open's handle is checked: a
    ``SalienceError`` saying the file is no regular file and to remove it, nothing read from the FIFO."""
    import stat

    folder = _copy(finished, tmp_path)
    shard = open_run(folder).table.column("shard")[0].as_py()
    path = {"map": folder / "maps" / "vanilla" / f"{shard}.npy", "index": folder / "index.parquet",
            "shard": folder / "shards" / f"{shard}.parquet", "inputs": folder / "inputs.parquet",
            "thumb": folder / "thumbs" / f"{shard}.jpg"}[what]
    path.unlink()
    os.mkfifo(path)
    out = _child(_SWAPPED, str(folder), what, str(path))
    said = {"index": ("the run's index.parquet", "open the run again (its rows are read from its shards)"),
            "thumb": ("the run's thumbnails", "run the run's command again to write them")}
    name, then = said.get(what, ("a run file's name", "run the command again (or open the run again)"))
    error = f"{path} is not a regular file (a FIFO, a device or a socket of {name}); remove it, then {then}"
    if what == "thumb":
        assert out == f"NotStored: the run's thumbnails for this row cannot be read: {error}", out
    else:
        assert out == f"SalienceError: {error}", out
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_a_runs_maps_and_tables_read_through_the_handle_are_numpys_and_pyarrows(finished):
    """Guard: ``run.map`` is ``np.load(..., mmap_mode="r")``'s map, bit for bit; the tables are pyarrow's of the
    path, equal."""
    import pyarrow.parquet as pq

    from salience.runs.store import Store, done_indices, read_shards

    run = open_run(finished)
    assert run.table.equals(pq.read_table(finished / "index.parquet"))
    assert read_shards(finished).equals(pq.read_table(next((finished / "shards").glob("*.parquet"))))
    assert done_indices(finished) == {0, 1}
    assert Store.existing(finished).input_paths() == pq.read_table(finished / "inputs.parquet").column("path").to_pylist()
    for row in run.table.to_pylist():
        want = np.load(finished / "maps" / "vanilla" / f"{row['shard']}.npy", mmap_mode="r")[row["offset"], 0]
        got = run.map(row["index"], "vanilla")
        assert got.dtype == np.float32 and np.asarray(want, np.float32).tobytes() == got.tobytes()


def _npy_cases(folder: Path) -> dict[str, Path]:
    """``.npy`` files of each kind ``np.load(mmap_mode="r")`` maps: versions 1, 2 and 3 (a UTF-8 header), Fortran
    order, big-endian, an empty array, a 0-d one, a structured dtype."""
    import warnings

    fmt = np.lib.format
    rng = np.random.default_rng(59)
    arrays = {"f16": rng.standard_normal((3, 2, 5, 4)).astype(np.float16),
              "fortran": np.asfortranarray(rng.standard_normal((3, 2, 5, 4)).astype(np.float32)),
              "big": rng.standard_normal((2, 3)).astype(">f4"), "empty": np.zeros((0, 2, 4, 4), np.float16),
              "scalar": np.float32(3.5).reshape(()), "struct": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
              "utf8": np.ones(2, dtype=[("\u00e9\u2603", "<f4")])}
    out = {}
    for name, a in arrays.items():
        out[name] = folder / f"{name}.npy"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Stored array in format 3.0"
            np.save(out[name], a)
    for v in ((1, 0), (2, 0), (3, 0)):
        out[f"v{v[0]}"] = folder / f"v{v[0]}.npy"
        with open(out[f"v{v[0]}"], "wb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fmt.write_array(f, rng.standard_normal((2, 3)).astype(np.float32), version=v)
    return out


def test_load_maps_is_np_loads_memory_map_bit_for_bit(tmp_path):
    """Guard (``_load_maps`` is new): the same class, dtype, shape, order, bytes and file name as
    ``np.load(path, mmap_mode="r")``, for format versions 1, 2, 3 and every layout."""
    from salience.runs.store import _load_maps

    fmt = np.lib.format
    cases = _npy_cases(tmp_path)
    assert fmt.read_magic(open(cases["utf8"], "rb")) == (3, 0)
    for name, path in cases.items():
        want, got = np.load(path, mmap_mode="r"), _load_maps(path)
        assert type(got) is type(want) is np.memmap, name
        assert (got.dtype, got.shape, got.flags.f_contiguous, got.flags.c_contiguous, got.filename) == (
            want.dtype, want.shape, want.flags.f_contiguous, want.flags.c_contiguous, want.filename), name
        assert got.tobytes() == want.tobytes() and not got.flags.writeable, name


def _error(call: Any) -> tuple[str, str]:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - compared
        return type(e).__name__, str(e)
    return "none", ""


def test_a_damaged_map_file_raises_what_np_load_raised(tmp_path):
    """Guard: empty (``EOFError``), not an ``.npy`` (a pickle's ``ValueError``), a magic cut short, an unknown
    version, a bad header, an object array, data cut short (``mmap length``), missing (``FileNotFoundError``): the
    same type and words as ``np.load(mmap_mode="r")``."""
    from salience.runs.store import _load_maps

    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).standard_normal((50, 50)).astype(np.float32))
    raw = good.read_bytes()
    damaged = {"empty": b"", "text": b"not an npy", "short": b"\x93NUMPY", "version": b"\x93NUMPY\x09\x00" + b"x" * 20,
               "header": raw[:10] + raw[10:].replace(b"'descr'", b"'dexcr'", 1), "cut": raw[:1000]}
    paths = {name: tmp_path / f"{name}.npy" for name in damaged}
    for name, data in damaged.items():
        paths[name].write_bytes(data)
    paths["object"] = tmp_path / "object.npy"
    np.save(paths["object"], np.array([1, "a"], dtype=object), allow_pickle=True)
    paths["missing"] = tmp_path / "missing.npy"
    for name, path in paths.items():
        want = _error(lambda: np.load(path, mmap_mode="r"))
        assert want[0] != "none" and _error(lambda: _load_maps(path)) == want, name


def test_an_npz_archive_under_a_maps_name_is_a_damaged_map(finished, tmp_path):
    """Fails on the base: ``np.load`` returned the ``.npz`` archive, and ``run.map`` failed on it with an
    ``AttributeError`` (the explorer: a 500). Now a ``ValueError``: the explorer's damaged map, a 404."""
    folder = _copy(finished, tmp_path)
    shard = open_run(folder).table.column("shard")[0].as_py()
    path = folder / "maps" / "vanilla" / f"{shard}.npy"
    with open(path, "wb") as f:
        np.savez(f, maps=np.zeros((2, 1, 8, 8), np.float16))
    with pytest.raises(ValueError, match=r"a zip archive \(\.npz\), not an \.npy file of maps"):
        open_run(folder).map(0, "vanilla")


def test_a_damaged_table_says_what_pyarrow_said_of_its_path(finished, tmp_path):
    """Guard: a damaged ``inputs.parquet`` read through the handle names its path, as pyarrow's own open said it
    (pyarrow names a handle ``<Buffer>``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import Store

    folder = _copy(finished, tmp_path)
    path = folder / "inputs.parquet"
    path.write_bytes(b"not a parquet file, some text")
    with pytest.raises(pa.ArrowInvalid) as want:
        pq.read_table(path)
    with pytest.raises(pa.ArrowInvalid) as got:
        Store.existing(folder).input_paths()
    assert str(got.value) == str(want.value) and f"'{path}'" in str(got.value)


# --------------------------------------------------------------------------------- 2. a named pipe without a writer

def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(5).integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(path)
    return path


_WRITERLESS = """
    import signal, sys, time
    from salience import SalienceError
    from salience.loading import load_image
    signal.alarm(20)  # imports done: a read that waits is killed (SIGALRM), the parent sees it
    start = time.monotonic()
    try:
        load_image(sys.argv[1])
    except SalienceError as e:
        print(f"{time.monotonic() - start:.1f}", e)
"""


@fifo
def test_load_image_of_a_named_pipe_without_a_writer_is_refused_in_bounded_time(tmp_path):
    """Fails on the base: ``load_image`` of a FIFO no program writes to waited for ever (killed by the alarm). Now a
    ``SalienceError`` after ``PIPE_WAIT_S`` (5 s), saying no program writes to it."""
    path = tmp_path / "in.png"
    os.mkfifo(path)
    waited, said = _child(_WRITERLESS, str(path)).split(" ", 1)
    assert 4.5 <= float(waited) < 15, waited
    assert said == (f"{path}: a named pipe that no program opened for writing in 5 s; start the program that writes "
                    "the image to it first, or save the image to a file and give its path")


@fifo
def test_the_wait_for_a_named_pipes_writer_is_pipe_wait_s(tmp_path, monkeypatch):
    """Fails on the base (no such limit: waited for ever; run in a thread here, let go by a writer that closes at
    once). ``PIPE_WAIT_S`` is the limit."""
    from salience.loading import images

    monkeypatch.setattr(images, "PIPE_WAIT_S", 0.3, raising=False)
    path = tmp_path / "in.png"
    os.mkfifo(path)
    got: dict = {}

    def read() -> None:
        start = time.monotonic()
        try:
            images.load_image(path)
        except Exception as e:  # noqa: BLE001 - returned to the test
            got["error"] = e
        got["took"] = time.monotonic() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the base: let the reader go with a writer that closes at once (EOF)
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("load_image waited on a named pipe without a writer")
    assert isinstance(got["error"], SalienceError) and "no program opened for writing in 0.3 s" in str(got["error"])
    assert got["took"] < 3, got


@fifo
def test_a_named_pipe_whose_writer_comes_in_time_is_read(tmp_path):
    """Guard: a writer that opens the pipe 0.5 s after the read began and writes a PNG (in two parts, 1 s apart):
    read whole, the image of the file."""
    from salience.loading import load_image

    png = _png(tmp_path / "a.png")
    data = png.read_bytes()
    path = tmp_path / "in.png"
    os.mkfifo(path)

    def write() -> None:
        time.sleep(0.5)
        with open(path, "wb") as f:
            f.write(data[:20])
            f.flush()
            time.sleep(1.0)
            f.write(data[20:])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    x = load_image(path)
    writer.join(10)
    assert np.array_equal(x.numpy(), load_image(png).numpy())


_SHELL = """
    import sys
    import numpy as np
    from salience.loading import load_image
    print(np.asarray(load_image(sys.argv[1])).tobytes().hex()[:64], tuple(load_image(sys.argv[2]).shape))
"""


@pytest.mark.skipif(shutil.which("bash") is None or not os.path.isdir("/dev/fd"), reason="bash and /dev/fd")
def test_the_shells_pipes_are_read_as_before(tmp_path):
    """Guard: ``cat a.png | ... /dev/stdin`` and bash's ``<(cat a.png)`` (``/dev/fd/N``) are read, a slow writer
    (1 s, then the bytes) too: the shell's pipes have their writer, no time limit."""
    from salience.loading import load_image

    png = _png(tmp_path / "a.png")
    code = tmp_path / "read.py"
    code.write_text(textwrap.dedent(_SHELL))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    line = (f"(sleep 1; cat '{png}') | '{sys.executable}' '{code}' /dev/stdin <(sleep 6; cat '{png}')")
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    want = np.asarray(load_image(png)).tobytes().hex()[:64]
    assert done.stdout.split() == [want, "(3,", "6,", "7)"], done.stdout


# --------------------------------------------------------------------------------- 3. flags written in full

class _Parser(Exception):
    pass


def _parser_of(main: Any, argv: list[str]) -> argparse.ArgumentParser:
    """The parser ``main(argv)`` builds, caught as it parses (nothing of ``main`` runs after)."""
    real = argparse.ArgumentParser.parse_known_args

    def caught(self, *args, **kwargs):
        raise _Parser(self)

    argparse.ArgumentParser.parse_known_args = caught
    try:
        main(argv)
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = real
    raise AssertionError("main parsed nothing")


def _value(action: argparse.Action) -> str:
    return str(action.choices[0] if action.choices else "3" if action.type is int else "0.5" if action.type is float
               else "x")


SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py")) + ["salience.demo.train"]


def _main(script: str) -> Any:
    if script == "salience.demo.train":
        from salience.demo.train import main
        return main
    return runpy.run_path(str(ROOT / "examples" / script))["main"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_an_abbreviated_flag_and_takes_it_in_full(script, capsys):
    """Fails on the base: each parser took a flag's every unique abbreviation for it (``--epo 3``: ``--epochs 3``).
    Now ``unrecognized arguments`` (exit 2); each flag written in full still parses to its value (guard)."""
    parser = _parser_of(_main(script), [])
    positionals = [_value(a) for a in parser._actions if not a.option_strings]
    flags = [(f, a) for a in parser._actions for f in a.option_strings
             if f.startswith("--") and a.nargs is None and not isinstance(a, argparse._HelpAction)]
    assert flags, script
    for flag, action in flags:
        others = [f for a in parser._actions for f in a.option_strings if f != flag]
        short = next((flag[:n] for n in range(3, len(flag)) if not any(o.startswith(flag[:n]) for o in others)), None)
        if short is None:  # no abbreviation of it names it alone (--n beside --n-images)
            continue
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*positionals, short, _value(action)])
        assert e.value.code == 2 and f"unrecognized arguments: {short} {_value(action)}" in capsys.readouterr().err
        got = getattr(parser.parse_args([*positionals, flag, _value(action)]), action.dest)
        assert got == (action.type or str)(_value(action)) or got == [_value(action)], (flag, got)


def test_the_demo_trainer_names_the_full_flag(tmp_path):
    """Fails on the base (``--epo 3`` trained with ``--epochs 3``): ``python -m salience.demo.train shapes --epo 3``
    exits 2 before any training, saying the full flag, as the ``salience`` command does."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "salience.demo.train", "shapes", "--epo", "3", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "unrecognized arguments: --epo 3; did you mean '--epochs'?" in done.stderr
    assert not any(tmp_path.iterdir())


def test_the_salience_commands_parser_is_the_shared_full_flags_parser():
    """Guard: one class of full-flag parsers: the ``salience`` command's ``Parser`` is a ``FullFlags``, abbreviations
    refused with the closest flag named."""
    from salience._core.args import FullFlags
    from salience.cli.common import Parser

    assert issubclass(Parser, FullFlags) and Parser().allow_abbrev is False
