"""Session 54: the lead's decisions on the command line's open ends from session 53's audit
(benchmarks/cliaudit-s53.md): each pinned by the command's exit code and the key words of its one line, through
:func:`salience.cli.main` in this process (demo models, a traced net of a few weights, 32-pixel images). Every test
here fails on the code before (except the ``--mode`` case of the keyword table, which session 53's phrase matching
already said as the flag: kept here so that the table's every entry is checked)."""
from __future__ import annotations

import importlib
import json
import shutil
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from salience.cli import common, explain_cmd, explain_many
import test_s53_cliaudit


class _Tiny(nn.Module):
    """A convolution, a global mean and a linear head of ``k`` outputs: a model of a few weights."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _traced(k: int, path: Path) -> Path:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):  # torch.jit.trace is deprecated (the file it writes is still read)
        torch.jit.trace(_Tiny(k).eval(), torch.rand(1, 3, 32, 32)).save(str(path))
    return path


def _png(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    """Two 32 x 32 PNGs, a truncated PNG, a text file, an empty folder, a folder of two images, and traced nets
    of one and of three outputs."""
    d = tmp_path_factory.mktemp("s54")
    a, b = _png(d / "a.png", 0), _png(d / "b.png", 1)
    (d / "trunc.png").write_bytes(a.read_bytes()[:60])
    (d / "notes.txt").write_text("not an image")
    (d / "empty").mkdir()
    (d / "two").mkdir()
    for p in (a, b):
        shutil.copy(p, d / "two" / p.name)
    return types.SimpleNamespace(dir=d, a=a, b=b, trunc=d / "trunc.png", notes=d / "notes.txt", empty=d / "empty",
                                 two=d / "two", one_output=_traced(1, d / "one.ts"), three=_traced(3, d / "three.ts"))


_run = test_s53_cliaudit._run  # main(argv) in this process: (exit code, stdout, stderr), no traceback
_never = test_s53_cliaudit._never  # a stand-in for what the command must not reach


# --------------------------------------------------------------------------------- 1. --top on one output


def test_top_above_one_on_a_one_output_model_is_refused_in_both_runs(files, tmp_path, capsys):
    """Decision 1: ``--top 2`` on a model with one output was explained as the one output, silently, in a run of
    image files (exit 0), while a dataset run refused it; now both refuse it (exit 2), the file run naming the one
    output and what to do, before any map. ``--top 1`` is the one target and stays accepted."""
    model = ["--model", files.one_output, "--size", "32"]
    rc, out, err = _run(capsys, "explain", files.a, *model, "--top", "2", "--out", tmp_path / "o")
    assert rc == 2 and out == "" and not (tmp_path / "o").exists()
    assert err == ("salience: error: --top 2 ranks classes, but one.ts has one output (output 0): it is the one target "
                   "there is; leave --top out (or give --target 0)\n")
    rc, _, err = _run(capsys, "explain", files.two, *model, "--top", "2", "--workers", "0", "--out", tmp_path / "run")
    assert rc == 2 and err.startswith("salience: error: --top 2 ranks classes, but one.ts has one output") and \
        err.count("\n") == 1  # in the file run's words since session 55 (it said "--top ranks classes, but ...")
    rc, _, err = _run(capsys, "explain", files.a, *model, "--top", "1", "--out", tmp_path / "one")
    assert rc == 0, err
    assert [p.name for p in (tmp_path / "one").glob("*.npy")] == ["a_vanilla_0-increase.npy"]


# --------------------------------------------------------------------------------- 2. evaluate --skip-unreadable


def test_evaluate_refuses_an_unreadable_image_and_skip_unreadable_leaves_it_out(files, tmp_path, capsys):
    """Decision 2: one unreadable image still refuses the evaluation (exit 2), now saying ``--skip-unreadable``;
    with it the image is left out and named on stderr, the report says ``2 of 3 images``, ``results.json``'s
    ``skipped`` holds its path, the exit code is 1, and every number is that of a run on the readable images
    alone. None readable: exit 2."""
    mixed, good = tmp_path / "mixed", tmp_path / "good"
    for folder, names in ((mixed, ("a.png", "b.png", "trunc.png")), (good, ("a.png", "b.png"))):
        folder.mkdir()
        for name in names:
            shutil.copy(files.dir / name, folder / name)
    common_args = ["evaluate", "--model", files.three, "--method", "vanilla", "--deletion-steps", "2",
                   "--randomization-images", "1"]
    rc, _, err = _run(capsys, *common_args, "--images", mixed, "--out", tmp_path / "refused")
    assert rc == 2 and not (tmp_path / "refused").exists()
    last = err.splitlines()[-1]  # after the note that a TorchScript model has no randomization columns
    assert last.startswith(f"salience: error: 1 of 3 images could not be read; the first: {mixed / 'trunc.png'}: ")
    assert last.endswith("; or leave the unreadable images out with --skip-unreadable")
    rc, _, err = _run(capsys, *common_args, "--images", mixed, "--skip-unreadable", "--out", tmp_path / "skip")
    assert rc == 1, err
    assert f"salience: skipped {mixed / 'trunc.png'}: corrupt or truncated PNG file" in err
    rc_good, _, _ = _run(capsys, *common_args, "--images", good, "--out", tmp_path / "only")
    skip = json.loads((tmp_path / "skip" / "results.json").read_text())
    only = json.loads((tmp_path / "only" / "results.json").read_text())
    assert rc_good == 0 and only["skipped"] == []
    assert [s["image"] for s in skip["skipped"]] == [str(mixed / "trunc.png")]
    assert skip["source"] == f"2 of 3 images from {mixed} (1 unreadable, left out: trunc.png)"
    assert "2 of 3 images from" in (tmp_path / "skip" / "report.md").read_text()
    numbers = [{k: v for k, v in r.items() if k != "seconds"} for r in skip["rows"]]
    assert numbers == [{k: v for k, v in r.items() if k != "seconds"} for r in only["rows"]]
    for name in ("a.png", "b.png"):
        (mixed / name).unlink()
    rc, _, err = _run(capsys, *common_args, "--images", mixed, "--skip-unreadable", "--out", tmp_path / "none")
    assert rc == 2 and not (tmp_path / "none").exists()
    assert err.splitlines()[-1].startswith(f"salience: error: none of the 1 images in {mixed} could be read")


# --------------------------------------------------------------------------------- 3. explore's inputs


def test_explore_names_the_inputs_it_leaves_out_before_it_serves(files, capsys, monkeypatch):
    """Decision 3: ``salience explore notes.txt trunc.png EMPTY a.png`` started the page and printed its URL
    without a word of the three it cannot show; now each is a line on stderr before the model loads, the page gets
    the others; none left: exit 2, nothing started."""
    server = importlib.import_module("salience.explore.server")
    started: list = []

    def start(model, images, **kwargs):
        started.append(list(images))
        return types.SimpleNamespace(url="http://127.0.0.1:1/", serve_forever=lambda: None)

    monkeypatch.setattr(server, "start", start)
    rc, out, err = _run(capsys, "explore", "--model", "demo:shapes", files.notes, files.trunc, files.empty, files.a,
                        files.dir / "gone.png")
    assert rc == 0 and started == [[str(files.a)]] and out == "salience explore: http://127.0.0.1:1/  (Ctrl-C stops it)\n"
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("salience: left out ") for line in lines), err
    assert lines[0].startswith(f"salience: left out {files.notes}: not an image file")
    assert lines[1].startswith(f"salience: left out {files.trunc}: corrupt or truncated PNG file")
    assert lines[2].startswith(f"salience: left out {files.empty}: a folder without image files (.png")
    assert lines[3] == f"salience: left out {files.dir / 'gone.png'}: no such file or folder; check the path"
    rc, out, err = _run(capsys, "explore", "--model", "demo:shapes", files.notes, files.empty)
    assert rc == 2 and len(started) == 1 and out == ""
    assert err.splitlines()[-1] == ("salience: error: none of the 2 input(s) can be shown (each said above); give "
                                    "image files, folders of them or a run folder")


# --------------------------------------------------------------------------------- 4. --out a dataset run


def test_explain_of_image_files_into_a_dataset_run_folder_is_refused(files, tmp_path, capsys, monkeypatch):
    """Decision 4: ``explain IMG --out RUN`` (RUN a dataset run's folder) wrote its figures among the run's
    files; now exit 2 before the model loads, naming the folder as a run's, the folder untouched. The store's
    check (:func:`salience.runs.store.is_run_folder`) knows a run by its manifest or its tables (session 56: a table
    of the store's columns, ``index`` and ``path`` here; a file of the name alone is not one; session 57: the manifest
    of salience's format, the table marked by the store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import TABLE_MARK, is_run_folder  # new in session 54: imported here

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"format": "salience-run/2"}')  # session 57: a manifest of salience's format
    begun = tmp_path / "begun"
    begun.mkdir()
    pq.write_table(pa.table({"index": pa.array([0], pa.int64()), "path": ["a.png"]}).replace_schema_metadata(
        {TABLE_MARK: b"inputs"}), begun / "inputs.parquet")  # session 57: marked as the store marks its tables
    assert is_run_folder(run) and is_run_folder(begun) and not is_run_folder(tmp_path) and not is_run_folder(files.a)
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    for folder in (run, begun):
        before = sorted(p.name for p in folder.iterdir())
        rc, out, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--out", folder)
        assert rc == 2 and out == ""
        assert err == (f"salience: error: --out {folder} is a dataset run's folder (salience explain DIR --out made "
                       "it); the figures of image files go to a folder of their own: choose another --out\n")
        assert sorted(p.name for p in folder.iterdir()) == before


# --------------------------------------------------------------------------------- 5. the keyword table


@pytest.mark.parametrize("keyword, model, option, said", [
    ("top", "demo:shapes", ["--top", "0"], "--top must be an int >= 1, got 0"),
    ("mode", "demo:shapes", ["--mode", "decrease"], "--mode 'decrease' is for a regression model or a model with one "
                                                    "output; demo:shapes is a classifier with 5 outputs: leave --mode "
                                                    "out (its maps show what raises the class)"),
])
def test_each_keyword_of_the_table_is_said_as_its_flag_in_a_dataset_run(files, tmp_path, capsys, keyword, model,
                                                                        option, said):
    """Decision 5: a dataset run's refusals of the keywords it passed (``top``, ``mode``) are said with the flag
    of :data:`~salience.cli.explain_many.KEYWORD_FLAGS`, keyed on the keyword passed, not by phrases of the
    message: ``top must be an int >= 1, got 0`` matched none of session 53's phrases and said ``top`` bare."""
    assert explain_many.KEYWORD_FLAGS[keyword] == option[0]
    rc, _, err = _run(capsys, "explain", files.two, "--model", model, *option, "--workers", "0", "--out",
                      tmp_path / "run")
    assert rc == 2 and err == f"salience: error: {said}\n" and not (tmp_path / "run").exists()


def test_a_bare_keyword_is_a_flag_only_as_a_whole_word():
    """A bare keyword of the table (``top``, ``mode``) is a flag only as a word of its own: ``model`` and
    ``top-level`` stay (with_flags had no end to a key that ended in a letter: ``mode`` in ``model``)."""
    flags = dict(explain_many.KEYWORD_FLAGS)
    assert common.with_flags("the model's top-level layers; use top 3 (mode 'x')", flags) == \
        "the model's top-level layers; use --top 3 (--mode 'x')"
    assert common.with_flags("a model in train mode, topology", {"mode": "--mode"}) == "a model in train --mode, topology"
    assert common.with_flags("top=3 and mode=x stay", flags) == "top=3 and mode=x stay"


def test_only_the_keywords_passed_with_the_users_value_are_said_as_flags():
    """:func:`~salience.cli.explain_many._flags`: ``mode`` passed as the function's default (``increase``, no
    ``--mode`` given) is not a flag in the refusal, so a message's "train mode" stays as it is."""
    passed = explain_many._flags({"top": None, "mode": "increase"})
    assert "top" not in passed and "mode" not in passed and passed["mode="] == "--mode"
    passed = explain_many._flags({"top": 3, "mode": "decrease"})
    assert passed["top"] == "--top" and passed["mode"] == "--mode"


# --------------------------------------------------------------------------------- 6. loading's words


@pytest.mark.parametrize("method, said", [
    ("integrated_gradients", "--baseline: unknown baseline 'white'; expected black (zeros), blur or a number (a pixel "
                             "value, e.g. 0.5)"),
    ("occlusion", "--baseline: baseline must be a number (a pixel value, e.g. 0.5) or blur; got 'white'"),
])
def test_baseline_white_is_answered_with_the_command_lines_words(files, tmp_path, capsys, method, said):
    """``--baseline white`` said ``expected None/'black' (zeros), 'blur', a number or a tensor`` (``None`` and a
    tensor are no command-line values); now the words ``--baseline`` takes, exit 2."""
    rc, _, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--method", method, "--baseline", "white",
                      "--out", tmp_path / "o")
    assert rc == 2 and err == f"salience: error: {said}\n"


@pytest.mark.parametrize("labels, said", [
    ({"0": "x", "2": "z"}, "class 1 has no name: the object names 2 of the classes 0 to 2; give each of them a name"),
    ({"0": "x", "3": "z"}, "classes 1, 2 have no name: the object names 2 of the classes 0 to 3; give each of them a "
                           "name"),
    ({"-1": "x", "0": "z"}, "the index -1 is negative; the keys are class indices 0, 1, 2, ..."),
])
def test_labels_with_a_gap_name_the_missing_classes(files, tmp_path, capsys, labels, said):
    """``--labels`` ``{"0": "x", "2": "z"}`` said ``the indices must run 0..1 without gaps (missing 1)``: the
    object runs to 2; now the classes without a name, exit 2."""
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(labels))
    rc, _, err = _run(capsys, "explain", files.a, "--model", "demo:shapes", "--labels", path, "--out", tmp_path / "o")
    assert rc == 2 and err == f"salience: error: --labels: labels file {path}: {said}\n"


def test_trust_pickle_for_a_file_that_needs_none_is_said_to_be_needless(files, tmp_path, capsys, monkeypatch):
    """``--trust-pickle`` for a TorchScript file (nothing unpickled) or a state dict that loads safely passed
    without a word; now a warning line says it was not needed (the file still loads, exit 0). A pickled dict of
    other things than weights said ``holds a state dict (weights only)``; now what it holds. (The warnings are
    printed as the command prints them, not recorded as pytest does: by a function of the warnings module's own
    globals, so that the command's formatting finds who warned as it does when Python prints.)"""
    printed = eval("lambda m, c, f, n, file=None, line=None: sys.stderr.write(formatwarning(m, c, f, n, line))",
                   vars(warnings))
    monkeypatch.setattr(warnings, "showwarning", printed)
    warnings.simplefilter("always")  # undone after the test (pytest's catch_warnings around it)
    rc, _, err = _run(capsys, "explain", files.a, "--model", files.three, "--trust-pickle", "--out", tmp_path / "o")
    assert rc == 0
    assert (f"salience: warning: {files.three}: --trust-pickle was not needed: a TorchScript archive loads without "
            "unpickling code; leave it out\n") in err
    plain = tmp_path / "plain.pt"
    torch.save({"epoch": 3, "note": "x"}, plain)
    rc, _, err = _run(capsys, "explain", files.a, "--model", plain, "--trust-pickle", "--out", tmp_path / "p")
    assert rc == 2
    assert err == (f"salience: warning: {plain}: --trust-pickle was not needed: it holds tensors and plain values "
                   "only, which load without unpickling code; leave it out\n"
                   f"salience: error: {plain}: holds a dict ('epoch', 'note') that is no model and no state dict "
                   "(parameter name -> tensor); expected TorchScript (torch.jit.save) or a state dict, as --weights "
                   "beside its architecture\n")
