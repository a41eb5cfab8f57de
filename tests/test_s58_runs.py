"""Session 58: ``salience.runs`` leftovers: bad input gets a clear error, nothing waits forever. Every test marked
"fails on the base" fails on the code before (the base commit 02bd6ba2), as its docstring says; the others guard what
the change must keep.

1. A ``run.json`` of salience's format missing a key salience reads (``{"format": "salience-run/2"}`` alone), or
   holding one of another kind, passed the format check (``store.manifest_format``), then ``open_run`` (``run.methods``,
   ``len(run)``), the explorer's ``RunSource``, the gallery and a resumed ``explain_dataset`` raised a bare
   ``KeyError`` / ``TypeError`` / ``ValueError``, or refused it as "a run of a different command". Now every reader
   reads it through ``store.read_manifest``: a ``SalienceError`` saying the manifest is damaged, which key, and to use
   ``overwrite=True`` (which clears it) or remove the folder.
2. A ``format`` key held twice: the format check's fast path (``format`` first) read the first, its slow path
   (``json.loads``) and every reader the last. Now the format check reads the first either way, and a manifest
   holding any key twice is damaged (``read_manifest``).
3. ``lock.commit_fence`` and ``lock.run_going`` opened the lock file plainly (a FIFO of its name: waited for ever),
   ``Store.existing`` (the Ray actors) read ``run.json`` plainly (the same), and ``lock.run_lock`` met a FIFO lock file
   with a bare ``OSError`` (EINVAL from ``ftruncate``). Now each opens without waiting and refuses a file that is no
   regular file (``run_going``: ``False``, it raises nothing in the Ray worker's thread). Each is run in a child
   process that kills itself after 20 s (``signal.alarm``), under ``subprocess.run(timeout=...)``: a regression fails,
   it never hangs the suite.
4. ``store._open_regular`` built its no-wait open flags beside ``lock._LOOK``: now ``salience._core.files.NO_WAIT``
   and ``open_regular``, used by both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

import test_s57_ends2
from salience import SalienceError
from salience.runs.lock import LOCK_NAME
from salience.runs.store import manifest_format, open_run

_a_run = test_s57_ends2._a_run  # explain_dataset of a 2-conv net on n random 8 x 8 images, vanilla, workers=0
_files_of = test_s57_ends2._files_of

SRC = Path(__file__).resolve().parents[1] / "src"
DAMAGED = r"run\.json: the run's manifest is damaged \({}.*\); use overwrite=True to start again .*or remove the folder"


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "run.json").read_text())


def _read_all(folder: Path) -> None:
    """What a reader of a run does: open it, ask its methods, model, options, size, rows and completeness."""
    run = open_run(folder)
    run.methods, run.model, run.options, len(run), run.complete, list(run)


# --------------------------------------------------------------------------------- 1. a damaged salience manifest

def _drop(*keys: str) -> Callable[[dict], dict]:
    def edit(m: dict) -> dict:
        holder = m
        for k in keys[:-1]:
            holder = holder[k]
        del holder[keys[-1]]
        return m
    return edit


def _set(value: Any, *keys: str) -> Callable[[dict], dict]:
    def edit(m: dict) -> dict:
        holder = m
        for k in keys[:-1]:
            holder = holder[k]
        holder[keys[-1]] = value
        return m
    return edit


DAMAGES = {  # name: (edit of a real run's manifest, what the refusal names, the first use that refuses it: "read" (its
    # rows: open_run, the explorer), "page" (index.html), "write" (a continued run, the Ray actors' store))
    "format-only": (lambda m: {"format": m["format"]}, 'no "command"', "read"),
    "no-methods": (_drop("methods"), 'no "methods"', "read"),
    "methods-a-string": (_set("vanilla", "methods"), r'"methods" is \'vanilla\' \(str\), expected a list of method '
                                                     "names", "read"),
    "command-a-list": (_set([], "command"), r'"command" is \[\] \(list\), expected an object', "read"),
    "no-count": (_drop("command", "inputs", "count"), 'no "command.inputs.count"', "read"),
    "count-a-float": (_set(2.5, "command", "inputs", "count"), r'"command.inputs.count" is 2.5 \(float\)', "read"),
    "labels-a-string": (_set("yes", "labels"), r'"labels" is \'yes\' \(str\), expected true or false', "read"),
    "k-a-string": (_set("1", "k"), r'"k" is \'1\' \(str\), expected a whole number >= 1', "read"),
    "map-dtype-unknown": (_set("float64", "map_dtype"), r'"map_dtype" is \'float64\'', "read"),
    "seed-a-string": (_set("12", "seed"), r'"seed" is \'12\' \(str\)', "read"),
    "batch-a-string": (_set("x", "batch"), r'"batch" is \'x\' \(str\)', "read"),
    "cwd-a-number": (_set(3, "cwd"), r'"cwd" is 3 \(int\), expected a string', "read"),
    "thumb-zero": (_set(0, "thumb"), r'"thumb" is 0 \(int\), expected a whole number >= 1', "read"),
    "no-thumb": (_drop("thumb"), 'no "thumb"', "page"),
    "no-k": (_drop("k"), 'no "k"', "page"),
    "no-seed": (_drop("seed"), 'no "seed"', "write"),
    "no-shard-size": (_drop("command", "shard_size"), 'no "command.shard_size"', "write"),
    "no-map-dtype": (_drop("map_dtype"), 'no "map_dtype"', "write"),
}
USES = ("read", "page", "write")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of 2 images, copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("s58") / "run"
    _a_run(folder)
    return folder


def _damaged(finished: Path, tmp_path: Path, edit: Callable[[dict], dict]) -> Path:
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    (folder / "run.json").write_text(json.dumps(edit(_manifest(folder)), indent=2))
    assert manifest_format(folder / "run.json") in ("salience-run/1", "salience-run/2")  # salience's, by its format
    return folder


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_salience_manifest_is_said_damaged_by_every_reader(finished, tmp_path, damage):
    """Fails on the base: ``open_run`` and what reads a run (``methods``, ``len``, ``list``), the explorer's
    ``RunSource``, the gallery and the Ray actors' ``Store.existing`` raised ``KeyError`` / ``TypeError``, or read
    the run (a ``"k"`` of ``"1"`` in its page, a ``seed`` of ``"12"`` given to the actors). Now each reader that
    needs the key, or meets it of another kind, raises the same ``SalienceError`` naming it; a reader that does not
    need a missing key reads the run as before (a run written by hand holds what its rows need, not what writing
    it needs)."""
    from salience.explore.runs import RunSource
    from salience.runs import gallery
    from salience.runs.store import Store

    edit, said, first = DAMAGES[damage]
    folder = _damaged(finished, tmp_path, edit)
    before = _files_of(folder)
    for read, use in ((_read_all, "read"), (RunSource, "read"), (gallery.write, "page"), (Store.existing, "write")):
        if USES.index(use) >= USES.index(first):
            with pytest.raises(SalienceError, match=DAMAGED.format(said)):
                read(folder)
        else:
            read(folder)  # not needed there: read as before
    after = _files_of(folder)
    if first == "write":  # gallery.write wrote the page anew: the same rows
        before.pop("index.html"), after.pop("index.html")
    assert after == before  # nothing else written, nothing removed


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_salience_manifest_is_refused_by_a_resumed_run_and_cleared_by_overwrite(finished, tmp_path,
                                                                                          damage):
    """Fails on the base: the same command on the damaged run raised ``KeyError`` / ``TypeError`` / ``ValueError``
    (a ``seed`` or ``batch`` of the wrong kind) or said "a run of a different command ... run the same command to
    continue it" (no command to match). Now it says the manifest is damaged, nothing touched; ``overwrite=True``, as
    the refusal says, starts the run again: the rows and command of a run into a new folder."""
    edit, said, _ = DAMAGES[damage]
    folder = _damaged(finished, tmp_path, edit)
    before = _files_of(folder)
    with pytest.raises(SalienceError, match=DAMAGED.format(said)):
        _a_run(folder)
    assert _files_of(folder) == before
    done = _a_run(folder, overwrite=True)
    fresh = _a_run(tmp_path / "fresh")
    assert done.table.column("path").to_pylist() == fresh.table.column("path").to_pylist() and len(done) == 2
    assert done.manifest["command"] == fresh.manifest["command"]
    assert open_run(folder).methods == ["vanilla"]


def test_a_manifest_of_the_older_format_is_checked_and_one_of_a_newer_format_is_left_to_its_refusal(finished,
                                                                                                   tmp_path):
    """Guards (passes on the base too, except the damaged ``salience-run/1``): a ``salience-run/1`` manifest without
    a ``seed`` (the older salience wrote none) is read as before; one without ``methods`` is damaged; a manifest of an
    unknown format holding only its ``format`` is refused by its format ("upgrade salience"), not called damaged:
    its keys are that format's."""
    old = _damaged(finished, tmp_path, lambda m: {**_drop("seed")(m), "format": "salience-run/1"})
    assert open_run(old).methods == ["vanilla"] and len(open_run(old)) == 2
    (old / "run.json").write_text(json.dumps(_drop("methods")(_manifest(old))))
    with pytest.raises(SalienceError, match=DAMAGED.format('no "methods"')):
        _read_all(old)
    (old / "run.json").write_text(json.dumps({"format": "salience-run/9"}))
    with pytest.raises(SalienceError, match=r"unknown run format 'salience-run/9'.*upgrade salience"):
        _read_all(old)


def test_overwrite_never_clears_another_programs_run_json(tmp_path):
    """Guards: a ``run.json`` whose ``format`` is not salience's (any keys) is another program's: refused, ``overwrite``
    or not, nothing touched; only salience's own (:func:`manifest_format`) is ever called damaged and cleared."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"format": "their-run/2"}))
    before = _files_of(folder)
    for overwrite in (False, True):
        with pytest.raises(SalienceError, match=r"not a salience run's manifest"):
            _a_run(folder, overwrite=overwrite)
    assert _files_of(folder) == before


# --------------------------------------------------------------------------------- 2. a key held twice

def _with_second_format(folder: Path, first: str, second: str, format_first: bool) -> bytes:
    """The run's manifest as JSON text with ``format`` held twice (``first`` then ``second``), ``format`` the first
    key (the format check's fast path) or not (its slow path)."""
    m = {k: v for k, v in _manifest(folder).items() if k != "format"}
    body = json.dumps(m)[1:-1]
    text = (f'{{"format": "{first}", {body}, "format": "{second}"}}' if format_first
            else f'{{{body}, "format": "{first}", "format": "{second}"}}')
    return text.encode("utf-8")


@pytest.mark.parametrize("first, second", [("salience-run/2", "their-run/1"), ("their-run/1", "salience-run/2")])
def test_a_format_held_twice_is_read_by_its_first_in_both_paths_of_the_format_check(finished, tmp_path, first,
                                                                                     second):
    """Fails on the base: with ``format`` first the check read the first ``format``, with it later ``json.loads``'s
    last: the same manifest was salience's one way and not the other. Now the first, both ways."""
    path = tmp_path / "run.json"
    seen = []
    for format_first in (True, False):
        path.write_bytes(_with_second_format(finished, first, second, format_first))
        seen.append(manifest_format(path))
    want = first if first.startswith("salience-run/") else None
    assert seen == [want, want]


@pytest.mark.parametrize("format_first", [True, False])
def test_a_salience_manifest_holding_a_key_twice_is_damaged_and_overwrite_clears_it(finished, tmp_path,
                                                                                    format_first):
    """Fails on the base: ``open_run`` read the last ``format`` ("unknown run format 'their-run/1' ... upgrade
    salience": wrong advice for a salience manifest), and the resumed run refused it as a newer salience's run that
    ``overwrite=True`` would delete. Now the manifest is damaged ("the key "format" is in it twice"), and
    ``overwrite=True`` starts the run again."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    (folder / "run.json").write_bytes(_with_second_format(finished, "salience-run/2", "their-run/1", format_first))
    said = DAMAGED.format(r'the key "format" is in it twice')
    with pytest.raises(SalienceError, match=said):
        _read_all(folder)
    with pytest.raises(SalienceError, match=said):
        _a_run(folder)
    assert len(_a_run(folder, overwrite=True)) == 2
    assert _manifest(folder)["format"] == "salience-run/2"


def test_a_key_held_twice_inside_the_command_is_damaged(finished, tmp_path):
    """Fails on the base (the last ``model`` read, the run opened): any object of the manifest holding a key twice is
    damaged, its key named."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    text = (folder / "run.json").read_text()
    assert text.count('"model": ') == 1
    (folder / "run.json").write_text(text.replace('"model": ', '"model": "other", "model": ', 1))
    with pytest.raises(SalienceError, match=DAMAGED.format(r'the key "model" is in it twice')):
        _read_all(folder)


# --------------------------------------------------------------------------------- 3. a FIFO never waited on

_CHILD = textwrap.dedent("""
    import os, signal, socket, sys
    from pathlib import Path
    from salience import SalienceError
    from salience.runs import lock
    from salience.runs.store import Store
    folder, what = Path(sys.argv[1]), sys.argv[2]
    writer = lock.Writer(str(folder), "token", os.getpid() + 1, socket.gethostname())  # another process's run
    signal.alarm(20)  # imports done: a call that waits is killed (SIGALRM), the parent sees it
    try:
        if what == "commit_fence":
            with lock.commit_fence(writer):
                print("entered")
        elif what == "run_going":
            print("going", lock.run_going(writer))
        elif what == "run_lock":
            with lock.run_lock(folder):
                print("locked")
        elif what == "holders":
            print("holders", lock.lock_holder(folder), lock.commit_holder(folder))
        elif what == "existing":
            Store.existing(folder)
            print("read")
        elif what == "open_regular":
            from salience._core.files import open_regular
            print("open_regular", open_regular(folder / "run.json"))
    except SalienceError as e:
        print("SalienceError:", e)
""")


def _in_a_child(folder: Path, what: str) -> str:
    """``what`` called in a child process on ``folder`` (its stdout); a call that waits fails the test, never hangs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), what], capture_output=True, text=True,
                              timeout=300, env=env)  # the child's own alarm ends a wait 20 s after its imports
    except subprocess.TimeoutExpired:  # pragma: no cover - a regression: the child waited past its alarm
        pytest.fail(f"{what} waited on a FIFO")
    assert done.returncode == 0, f"{what}: exit {done.returncode} (-14: waited 20 s on the FIFO); {done.stderr[-2000:]}"
    return done.stdout.strip()


fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="os.mkfifo")


@fifo
@pytest.mark.parametrize("what, said", [
    ("commit_fence", r"SalienceError: .*\.salience-run\.lock is not a regular file \(a FIFO, a device or a socket "
                     r"of the run lock's name\); remove it, then run the command again; the shard is not written"),
    ("run_going", r"going False"),
    ("run_lock", r"SalienceError: .*\.salience-run\.lock is not a regular file .*; remove it, then run again \(salience makes its lock file there\)"),
    ("holders", r"holders None None"),
])
def test_a_fifo_named_like_the_lock_is_never_waited_on(tmp_path, what, said):
    """Fails on the base for ``commit_fence`` and ``run_going`` (both waited for a writer: killed by the alarm) and
    ``run_lock`` (a bare ``OSError``: EINVAL from ``ftruncate``); ``lock_holder`` / ``commit_holder`` were fixed
    before (guards). Nothing written into the FIFO."""
    import re
    import stat

    os.mkfifo(tmp_path / LOCK_NAME)
    out = _in_a_child(tmp_path, what)
    assert re.fullmatch(said, out), out
    assert stat.S_ISFIFO(os.lstat(tmp_path / LOCK_NAME).st_mode)


@fifo
def test_a_fifo_named_run_json_is_never_waited_on_by_the_ray_actors_store(tmp_path):
    """Fails on the base: ``Store.existing`` (each Ray actor's store) read ``run.json`` plainly: a FIFO of that name
    waited for a writer. Now it is refused as a manifest that cannot be read; ``open_regular`` says ``None``."""
    os.mkfifo(tmp_path / "run.json")
    assert _in_a_child(tmp_path, "existing") == (
        f"SalienceError: {tmp_path / 'run.json'}: cannot read the run's manifest (it is not a regular file: a FIFO, "
        "a device or a socket of its name); use overwrite=True to start again (the run's command with it removes the "
        "run's own files and makes them anew), or remove the folder")
    assert _in_a_child(tmp_path, "open_regular") == "open_regular None"


# --------------------------------------------------------------------------------- 4. one place for the flags

def test_the_no_wait_open_flags_are_built_in_one_place():
    """Fails on the base: ``store._open_regular`` and ``lock._LOOK`` each built ``O_NONBLOCK`` flags. Now only
    ``salience._core.files`` does (``NO_WAIT``, ``open_regular``), and both rooms of the runs open through it."""
    from salience._core import files
    from salience.runs import lock

    building = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "O_NONBLOCK" in p.read_text())
    assert building == [os.path.join("salience", "_core", "files.py")]
    assert not hasattr(lock, "_LOOK")
    assert files.NO_WAIT == getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def test_open_regular_gives_a_blocking_descriptor_of_a_regular_file(tmp_path):
    """Guards: the descriptor ``open_regular`` gives of a regular file is back in blocking mode (what ``os.fdopen``
    readers and the lock's writes expect), and it reads the file."""
    from salience._core.files import open_regular

    (tmp_path / "f").write_bytes(b"abc")
    fd = open_regular(tmp_path / "f")
    try:
        assert os.get_blocking(fd) and os.read(fd, 10) == b"abc"
    finally:
        os.close(fd)
