"""Session 55: the command line's remaining open ends, each pinned through :func:`salience.cli.main` in this process
(a traced net of a few weights, 32-pixel images; the explorer's server replaced by a stand-in that records what it was
given). Every test here fails on the code before (the count is in the session's report).

1. A dataset run refused ``--top 1`` on a one-output model, which a run of image files explains as its one target:
   now both explain it (the maps of output 0, checked against the gradient written out here), and both refuse
   ``--top 2`` in the same words.
2. ``salience explore FOLDER`` of unreadable images only started the page with nothing to show: now the folder is
   left out naming its first file's error (exit 2 when nothing else is left), its images checked cheaply up to the
   first readable one.
3. "Is this a run folder": one test (``runs.store.is_run_folder``), which the explorer's ``is_run`` calls; a run
   folder without its ``run.json`` yet (the lock a run writes first) is one for ``explain --out`` and ``explore``.
4. A ``--labels`` file with a blank line before a name named every later class by the next one's name, silently:
   now refused, naming the file and the line; blank lines at the end still allowed.
5. The help against the docs: the performance flags' title named ``integrated-gradients`` (no method's name), and
   ``evaluate --method`` said ``default: all`` where the methods that apply to the model run.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import salience
from salience import SalienceError
from salience.cli import build_parser, explain_cmd
from salience.loading import load_image
from salience.loading.models import read_labels
from salience.runs import store as _store
from salience.runs.lock import LOCK_NAME, run_lock
import test_s53_cliaudit
import test_s54_clidecide

ROOT = Path(__file__).resolve().parent.parent
files = test_s54_clidecide.files  # the fixture: two 32 x 32 PNGs, a truncated PNG, nets of one and three outputs
_run = test_s53_cliaudit._run  # main(argv) in this process: (exit code, stdout, stderr), no traceback
_never = test_s53_cliaudit._never


def _gradient_map(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Vanilla's map of output 0 in mode ``increase`` written out: ``max_c max(g, 0)`` of ``g = d out[:, 0] / d x``
    (a regression target's map shows the part of the gradient that raises the output: keras-vis's, salience.targets'
    ``Regression``), ``(B, H, W)``."""
    x = x.clone().requires_grad_(True)
    model(x)[:, 0].sum().backward()
    return x.grad.clamp(min=0).amax(1).numpy()


# --------------------------------------------------------------------------------- 1. --top 1 on one output


def test_a_dataset_run_explains_top_1_on_a_one_output_model_as_a_run_of_files_does(files, tmp_path, capsys):
    """``--top 1`` on a model of one output: a run of image files explained it as output 0; a dataset run refused it
    (``--top ranks classes, but one.ts is a model with one output``). Now both write the maps of output 0: equal to
    its gradient written out here, and to each other; ``--top 2`` is refused by both in one and the same line."""
    model = ["--model", files.one_output, "--size", "32"]
    rc, _, err = _run(capsys, "explain", files.two, *model, "--top", "1", "--workers", "0", "--batch", "2", "--map-dtype", "float32",
                      "--out", tmp_path / "run")
    assert rc == 0, err
    rc, _, err = _run(capsys, "explain", files.a, files.b, *model, "--top", "1", "--out", tmp_path / "files")
    assert rc == 0, err
    run = salience.open_run(tmp_path / "run")
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated (it still reads the file)
        net = torch.jit.load(str(files.one_output)).eval()
    want = _gradient_map(net, torch.stack([load_image(files.a), load_image(files.b)]))
    got = np.stack([run.map(i, "vanilla") for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    for i, name in enumerate(("a", "b")):
        np.testing.assert_allclose(np.load(tmp_path / "files" / f"{name}_vanilla_0-increase.npy"), want[i],
                                   rtol=1e-5, atol=1e-9)
    said = "salience: error: --top 2 ranks classes, but one.ts has one output (output 0): it is the one target there " \
           "is; leave --top out (or give --target 0)\n"
    rc_files, _, err_files = _run(capsys, "explain", files.a, *model, "--top", "2", "--out", tmp_path / "f2")
    rc_run, _, err_run = _run(capsys, "explain", files.two, *model, "--top", "2", "--workers", "0",
                              "--out", tmp_path / "r2")
    assert (rc_files, err_files) == (rc_run, err_run) == (2, said)
    assert not (tmp_path / "f2").exists() and not (tmp_path / "r2" / "run.json").exists()


def test_explain_dataset_refuses_top_2_in_keywords_before_any_file(tmp_path):
    """The Python API: ``top=2`` on a one-output module is refused naming ``top`` and ``target=0`` (the command says
    them as flags, above), and ``top=1`` with ``target=`` as on a classifier; nothing is written."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(2, 1))
    data = torch.utils.data.TensorDataset(torch.rand(2, 3, 8, 8))
    with pytest.raises(SalienceError, match=r"^top 2 ranks classes, but .* has one output \(output 0\): it is the one "
                                            r"target there is; leave top out \(or give target=0\)$"):
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "t2", top=2, workers=0)
    with pytest.raises(SalienceError, match="give target or top, not both"):
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "t3", top=1, target=0, workers=0)
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()


# --------------------------------------------------------------------------------- 2. explore: unreadable folders


class _Starts(list):
    """A stand-in for the explorer's server: the inputs of each start, in order; it serves nothing."""

    def start(self, model, images, **kwargs) -> types.SimpleNamespace:
        self.append(list(images))
        return types.SimpleNamespace(url="http://127.0.0.1:1/", serve_forever=lambda: None)


@pytest.fixture
def started(monkeypatch) -> _Starts:
    starts = _Starts()
    monkeypatch.setattr(importlib.import_module("salience.explore.server"), "start", starts.start)
    return starts


def _bad_idat_checksum(src: Path, dst: Path) -> Path:
    """``src`` (a PNG) with its image data's checksum spoilt: Pillow's ``verify`` refuses it, its decoder reads it."""
    b = bytearray(src.read_bytes())
    i = b.index(b"IDAT")
    b[i + 4 + struct.unpack(">I", b[i - 4:i])[0]] ^= 0xFF
    dst.write_bytes(bytes(b))
    return dst


def test_explore_leaves_out_a_folder_of_unreadable_images_naming_the_first(files, tmp_path, capsys, started):
    """A folder of a truncated PNG and a ``.jpg`` of text only: the page started with nothing to show (exit 0). Now
    the folder is left out, one line naming it and its first file's error (in the page's order), and with nothing
    else named the command exits with 2 before the model loads."""
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(files.trunc, bad / "a.png")
    (bad / "b.jpg").write_text("not an image")
    rc, out, err = _run(capsys, "explore", "--model", "demo:shapes", bad)
    assert rc == 2 and out == "" and started == []
    lines = err.splitlines()
    assert lines[0].startswith(f"salience: left out {bad}: none of its 2 image file(s) can be read; the first: "
                               f"{bad / 'a.png'}: corrupt or truncated PNG file"), err
    assert lines[1:] == ["salience: error: none of the 1 input(s) can be shown (each said above); give image files, "
                         "folders of them or a run folder"]
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", bad, files.a)
    assert rc == 0 and started == [[str(files.a)]] and err.startswith(f"salience: left out {bad}: none of its 2")


def test_a_folder_is_checked_up_to_its_first_readable_image_without_decoding_a_sound_one(files, tmp_path, capsys,
                                                                                         started, monkeypatch):
    """The check is cheap: a sound image is opened and verified, never decoded (``load_image``, the page's reader,
    is not called for it), and the folder's images after the first readable one are not looked at; a file that fails the quick check is
    read by ``load_image``, whose verdict counts: a PNG whose image-data checksum alone is wrong decodes, so its
    folder is shown."""
    images = importlib.import_module("salience.explore.images")
    read: list = []
    monkeypatch.setattr(images, "load_image", lambda path, **kw: read.append(Path(path).name) or load_image(path, **kw))
    sound = tmp_path / "sound"
    sound.mkdir()
    for i in range(3):
        shutil.copy(files.a, sound / f"{i}.png")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(files.trunc, mixed / "a.png")
    _bad_idat_checksum(files.a, mixed / "b.png")
    shutil.copy(files.trunc, mixed / "c.png")
    with pytest.raises(Exception):  # Pillow's own check refuses it ...
        with Image.open(mixed / "b.png") as img:
            img.verify()
    assert load_image(mixed / "b.png").shape == (3, 32, 32)  # ... the page reads it
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", sound, mixed)
    assert rc == 0 and err == "" and started == [[str(sound), str(mixed)]]
    # none of sound/; mixed/ read in the folder's own order (the review: no listing of all of it first) up to b.png
    assert read[-1] == "b.png" and sorted(set(read)) == sorted(read) and set(read) <= {"a.png", "b.png", "c.png"}


# --------------------------------------------------------------------------------- 3. one test of a run folder


def _killed_in_first_shard(tmp_path: Path, monkeypatch) -> Path:
    """A real dataset run stopped (KeyboardInterrupt) as it commits its first shard."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(_store.Store, "write_shard", stop)
        salience.explain_dataset(model, torch.utils.data.TensorDataset(torch.rand(2, 3, 8, 8)), ["vanilla"],
                                 tmp_path / "killed", workers=0)
    return tmp_path / "killed"


def test_the_explorer_and_explain_out_know_a_run_folder_by_one_test(files, tmp_path, capsys, started, monkeypatch):
    """``explore.runs.is_run`` (a ``run.json``) and ``runs.store.is_run_folder`` (a ``run.json`` or the tables) were
    two tests; now the explorer's calls the store's, which also knows a run by its lock, written before its
    ``run.json``. A run stopped in its first shard (its ``run.json`` and ``inputs.parquet`` written) is refused as
    ``explain --out`` and shown by ``explore`` (no rows yet); one stopped before its ``run.json`` (its lock alone)
    is refused as ``--out`` too (the figures went among its files), and ``explore`` leaves it out saying why (it
    took it for a folder without images)."""
    from salience.explore.runs import is_run
    from salience.runs.store import is_run_folder

    killed = _killed_in_first_shard(tmp_path, monkeypatch)
    assert {p.name for p in killed.iterdir()} == {"run.json", "inputs.parquet", LOCK_NAME}
    begun = tmp_path / "begun"
    with run_lock(begun):  # what a run writes first: its lock, then its run.json
        pass
    tables = tmp_path / "tables"  # --overwrite removes run.json before the tables
    tables.mkdir()
    shutil.copy(killed / "inputs.parquet", tables / "inputs.parquet")
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(files.a, plain / "a.png")
    for folder, want in ((killed, True), (begun, True), (tables, True), (plain, False), (files.a, False)):
        assert is_run(folder) == is_run_folder(folder) == want, folder
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    for folder in (killed, begun, tables):
        rc, _, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--out", folder)
        assert rc == 2 and err.startswith(f"salience: error: --out {folder} is a dataset run's folder"), err
    rc, _, err = _run(capsys, "explore", "--model", "demo:shapes", killed, begun, tables)
    assert rc == 0 and started == [[str(killed)]], err
    assert err.splitlines() == [f"salience: left out {f}: a dataset run's folder without its run.json (a run stopped "
                                "before it wrote it, or while --overwrite cleared it): nothing to show yet; run its "
                                "command again" for f in (begun, tables)]
    from salience.explore.runs import RunSource

    assert len(RunSource(killed).run) == 0  # what the page opens: a run of no rows yet


# --------------------------------------------------------------------------------- 4. --labels with a blank line


@pytest.mark.parametrize("text, line, after", [
    ("cat\n\ndog\nbird\n", 2, "after class 0 ('cat')"),
    ("\ncat\ndog\nbird", 1, "before class 0"),
    ("cat\ndog\n   \nbird\n\n", 3, "after class 1 ('dog')"),
])
def test_a_blank_line_before_a_name_is_refused_naming_the_file_and_line(tmp_path, text, line, after):
    """Skipped, it named class ``i`` by class ``i + 1``'s name from there on (``cat, dog, bird`` read as three names
    of four lines: ``bird`` the name of class 2 where the file's line 4 meant class 3)."""
    p = tmp_path / "labels.txt"
    p.write_text(text)
    with pytest.raises(SalienceError) as e:
        read_labels(p)
    assert str(e.value) == (f"labels file {p}: line {line} is blank ({after}); each line names the next class, so a "
                            "blank line would shift every name after it: remove it, or give that class a name")


def test_blank_lines_at_the_end_are_allowed_and_the_command_names_the_line(files, tmp_path, capsys):
    p = tmp_path / "labels.txt"
    p.write_text("cat\ndog\nbird\n\n  \n")
    assert read_labels(p) == ("cat", "dog", "bird")
    p.write_text("cat\n\ndog\nbird\n")
    rc, out, err = _run(capsys, "explain", files.a, "--model", files.three, "--size", "32", "--labels", p,
                        "--out", tmp_path / "o")
    assert rc == 2 and out == "" and not (tmp_path / "o").exists()
    assert err.startswith(f"salience: error: --labels: labels file {p}: line 2 is blank (after class 0 ('cat'))")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------------- 5. the help, the docs


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_performance_title_names_the_many_pass_methods_by_their_names():
    """The performance flags' title of each command named ``integrated-gradients``, which is no method (the name is
    ``integrated_gradients``): each name there is a method's, exactly those that take the performance keywords."""
    from salience._core.engine import signature_of

    takers = [name for name, fn in salience.METHODS.items() if "memory_format" in signature_of(fn).parameters]
    assert "integrated_gradients" in takers and len(takers) >= 5
    for command, sub in _subparsers().items():
        for group in sub._action_groups:
            if group.title and group.title.startswith("performance"):
                named = re.match(r"performance \(many-pass methods: ([^;]+);", group.title).group(1).split(", ")
                assert named == takers, (command, group.title)


def test_evaluate_method_says_the_default_that_runs(capsys):
    """``salience evaluate --method`` said ``(default: all)``, docs/cli.md ``Every method (or --method)``: without
    it the methods that apply to the model run (``evidence.evaluate.default_names``), on a CNN not the attention
    methods. Both now say so, and name ``salience list --model``, whose line lists the same methods."""
    from salience.evidence.evaluate import default_names

    said = next(a.help for a in _subparsers()["evaluate"]._actions if "--method" in a.option_strings)
    assert "default: all" not in said and "salience list --model" in said, said
    model = salience.load_model("demo:shapes")
    runs = default_names(model, torch.rand(1, 3, 64, 64), {})
    assert set(runs) < set(salience.METHODS)  # "all" was false
    rc, out, _ = _run(capsys, "list", "--model", "demo:shapes")
    listed = re.search(r"methods that apply \(run when none is named\): (.*)", out).group(1).split(", ")
    assert rc == 0 and listed == runs
    docs = (ROOT / "docs" / "cli.md").read_text()
    section = docs[docs.index("## `salience evaluate"):]
    assert "Every method (or `--method`)" not in section and "salience list --model MODEL" in section[:600]
