"""Run folders and image inputs: the last gaps (session 58). Each test failed on the base commit:

1. A FIFO (or a folder) named ``index.parquet`` in a run was skipped quietly (``is_file()``) and the run read from its
   shards; now a ``SalienceError`` names the file and what to do. A FIFO in place of a run's thumbnail sprite was
   said to be "missing" by the explorer; now its thumbnail route says it is no regular file (and never opens it).
2. On Windows a method name with ':' (``mine:v2``) names an NTFS data stream: ``one_name`` took it.
3. An older-format run (``salience-run/1``, no ``shard_size`` / ``map_dtype``) continued was called "damaged";
   now it is "begun by an older salience".
4. A ``.pt2`` program with bounded dynamic sizes fed an image outside them (``--resize-mode none``, each image at its
   own size) stopped with torch's guard error (exit 3) in ``explain`` on files, and in a dataset run; now a
   ``SalienceError`` (exit 2) / a failed row says the bounds and the flags that resize.
5. A FIFO given as an image waited for ever for a writer (``salience explain fifo.png``, a dataset run naming it).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("pyarrow")
pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

import salience  # noqa: E402
from explore_helpers import hand_run, shapes_files  # noqa: E402
from salience import SalienceError  # noqa: E402
from salience._core import files  # noqa: E402
from salience.cli import main  # noqa: E402
from salience.explore.app import create_app  # noqa: E402
from salience.explore.server import build_hub  # noqa: E402
from salience.runs.store import JOINED_ERRORS, open_run  # noqa: E402

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


def _within(fn: Callable[[], Any], fifo: Path, seconds: float = 20) -> Any:
    """``fn()``'s result (or the exception it raised), or ``"waited"`` when it waited ``seconds`` (on the FIFO
    ``fifo``: the reader is then let go with a writer that closes at once)."""
    got: dict = {}

    def call() -> None:
        try:
            got["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            got["r"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    if not t.is_alive():
        return got["r"]
    for _ in range(50):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(0.2)
        if not t.is_alive():
            break
    return "waited"


def _png(path: Path, h: int = 20, w: int = 24) -> Path:
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


@pytest.fixture
def bounded(tmp_path: Path) -> Path:
    """A ``.pt2`` program whose height and width are ``Dim(min=8, max=64)``."""
    torch.manual_seed(0)
    ep = torch.export.export(_Net().eval(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch"),
                                                   2: torch.export.Dim("h", min=8, max=64),
                                                   3: torch.export.Dim("w", min=8, max=64)}})
    path = tmp_path / "bounded.pt2"
    torch.export.save(ep, str(path))
    return path


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# --------------------------------------------------------------------------- 1. index.parquet, thumbnails

@needs_fifo
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_an_index_parquet_that_is_no_regular_file_is_said(tmp_path, kind):
    """Before: skipped quietly, the run's rows read from its shards (none: an empty table, or their error)."""
    folder = hand_run(tmp_path / "run", path=["a.png", "b.png"])
    index = folder / "index.parquet"
    index.unlink()
    os.mkfifo(index) if kind == "fifo" else index.mkdir()
    got = _within(lambda: open_run(folder).table, index)
    assert isinstance(got, SalienceError), got
    assert str(got) == (f"{index} is not a regular file (a FIFO, a device or a socket of the run's index.parquet); "
                        "remove it, then open the run again (its rows are read from its shards)")


@needs_fifo
def test_a_fifo_in_place_of_a_thumbnail_sprite_is_refused_by_the_explorers_route(tmp_path):
    """Before: ``is_file()`` said the sprite was "missing" (the run has it: a FIFO of its name). Now the route says
    it is no regular file, a 404 at once, the FIFO never opened; a regular sprite beside it still answers."""
    folder = hand_run(tmp_path / "run", path=["a.png", "b.png"], shard=["s0", "s1"], offset=[0, 0])
    (folder / "thumbs").mkdir()
    os.mkfifo(folder / "thumbs" / "s0.jpg")
    Image.new("RGB", (128, 256), (200, 10, 10)).save(folder / "thumbs" / "s1.jpg")
    hub = build_hub("demo:shapes", [folder])
    c = TestClient(create_app(hub))
    try:
        r = _within(lambda: c.get("api/runs/r0/rows/0/thumb.jpg"), folder / "thumbs" / "s0.jpg")
        assert r != "waited" and r.status_code == 404, r
        said = r.json()["error"]
        assert "s0.jpg is not a regular file" in said and "is missing" not in said, said
        assert c.get("api/runs/r0/rows/1/thumb.jpg").status_code == 200
    finally:
        hub.close()


# --------------------------------------------------------------------------- 2. ':' on Windows

def test_a_name_with_a_colon_is_refused_on_windows_only(monkeypatch, tmp_path):
    """Before: ``mine:v2`` was one name on Windows too (NTFS: the stream ``v2`` of the file ``mine``)."""
    assert files.one_name("mine:v2")
    monkeypatch.setattr(files, "_on_windows", lambda: True)
    assert not files.one_name("mine:v2") and files.one_name("mine-v2")
    fn = salience.METHODS["vanilla"]
    with pytest.raises(SalienceError, match=r"method name 'mine:v2' cannot name a folder .* on Windows no ':'"):
        salience.explain_dataset("demo:shapes", [tmp_path / "a.png"], {"mine:v2": fn}, tmp_path / "run", workers=0)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 3. an older run continued

def test_an_older_format_run_without_shard_size_is_said_older_not_damaged(tmp_path):
    """Before: ``the run's manifest is damaged ("command.shard_size" is missing ...)``."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({
        "format": JOINED_ERRORS, "methods": ["vanilla"], "labels": False, "metrics": [],
        "command": {"model": "demo:shapes", "inputs": {"count": 2}}}))
    data, _, _ = shapes_files(tmp_path, 2)
    with pytest.raises(SalienceError) as e:
        salience.explain_dataset("demo:shapes", data, ["vanilla"], folder, workers=0)
    said = str(e.value)
    assert "begun by an older salience" in said and "damaged" not in said and "overwrite=True" in said, said
    run = salience.explain_dataset("demo:shapes", data, ["vanilla"], folder, workers=0, overwrite=True)
    assert len(run) == 2


# --------------------------------------------------------------------------- 4. bounded dynamic sizes

def test_explain_on_files_outside_a_programs_bounds_is_exit_2_naming_them(tmp_path, bounded, capsys):
    """Before: ``unexpected RuntimeError: Expected input at *args[0].shape[2] to be <= 64, but got 100`` (exit 3)."""
    big = _png(tmp_path / "big.png", 100, 32)
    rc, _, err = _run(capsys, "explain", big, "--model", bounded, "--resize-mode", "none", "--out", tmp_path / "o")
    assert rc == 2 and err == (
        f"salience: error: {big}: bounded.pt2 was exported with bounded dynamic sizes and takes no input of 100 x 32: "
        "height 100 (it takes 8..64); resize the images into its range (--size H,W with --resize-mode, or size= of "
        "with_preprocessing), or export it again with wider Dim(min=, max=)\n"), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    fits = _png(tmp_path / "fits.png", 40, 32)
    rc, _, err = _run(capsys, "explain", fits, "--model", bounded, "--resize-mode", "none", "--out", tmp_path / "o")
    assert rc == 0, err


def test_a_dataset_run_outside_a_programs_bounds_is_refused_naming_them(tmp_path, bounded):
    """Before: torch's guard error (``RuntimeError: Expected input at *args[0].shape[2] to be <= 64, but got 100``)
    from the run's first pass. A dataset run reads every image at its model's size (here a ``ModelInfo`` given in
    Python; the command's ``--size`` is checked up front): outside the bounds it is refused before the run, saying
    them and what resizes; a size inside is explained."""
    from salience._core.info import attach_info
    from salience.loading.images import with_preprocessing

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.png", 40, 32)
    _png(imgs / "b.png", 20, 24)
    model = salience.load_model(str(bounded))
    info = model.salience_info
    attach_info(model, with_preprocessing(info, size=(100, 32)))
    with pytest.raises(SalienceError) as e:
        salience.explain_dataset(model, imgs, ["vanilla"], tmp_path / "run", batch_size=1, workers=0)
    assert str(e.value) == (
        "the run's input size: bounded.pt2 was exported with bounded dynamic sizes and takes no input of 100 x 32: "
        "height 100 (it takes 8..64); resize the images into its range (--size H,W with --resize-mode, or size= of "
        "with_preprocessing), or export it again with wider Dim(min=, max=)")
    assert not (tmp_path / "run").exists()
    attach_info(model, with_preprocessing(info, size=(40, 32)))
    run = salience.explain_dataset(model, imgs, ["vanilla"], tmp_path / "ok", batch_size=1, workers=0)
    assert [row["error"] for row in run] == [None, None]


# --------------------------------------------------------------------------- 5. a FIFO as an image

@needs_fifo
def test_explain_of_a_fifo_is_refused_at_once(tmp_path, capsys):
    """Before: ``salience explain fifo.png`` waited for ever for a writer."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    got = _within(lambda: main(["explain", str(fifo), "--model", "demo:shapes", "--out", str(tmp_path / "o")]), fifo)
    assert got == 2, got
    err = capsys.readouterr().err
    assert f"{fifo} is not a regular file (a FIFO, a device or a socket of an image's name); remove it" in err, err


@needs_fifo
def test_a_dataset_run_naming_a_fifo_is_refused_and_one_listed_fails_its_row(tmp_path):
    """Before: the run's reader waited for ever on the FIFO (named, or a line of a .txt list)."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    good = _png(tmp_path / "good.png", 32, 32)
    got = _within(lambda: salience.explain_dataset("demo:shapes", [good, fifo], ["vanilla"], tmp_path / "r1",
                                                   workers=0), fifo)
    assert isinstance(got, SalienceError) and "fifo.png is not a regular file" in str(got), got
    listed = tmp_path / "list.txt"
    listed.write_text(f"{good}\n{fifo}\n")
    got = _within(lambda: salience.explain_dataset("demo:shapes", listed, ["vanilla"], tmp_path / "r2", workers=0),
                  fifo)
    assert not isinstance(got, (str, BaseException)), got
    rows = list(got)
    assert rows[0]["error"] is None and "fifo.png is not a regular file" in rows[1]["error"], rows
