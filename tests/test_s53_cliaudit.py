"""Session 53's audit of the command line as a user meets it (benchmarks/cliaudit-s53.md): each defect found, fixed in
src/salience/cli/, pinned here by its exit code, its one-line message (saying what to do, with the command's flags) and
the files left behind. Every test here fails on the code before the fix. Demo models, 64-pixel images: a few seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salience.cli import explain_cmd, main, visualize_cmd


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    """A 48 x 64 RGB PNG of noise (the demo models resize it to 64 x 64)."""
    path = tmp_path_factory.mktemp("s53") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folder(png, tmp_path_factory) -> Path:
    """A folder of two images: an input that makes ``salience explain`` a dataset run."""
    d = tmp_path_factory.mktemp("s53-folder")
    for name in ("a.png", "b.png"):
        (d / name).write_bytes(png.read_bytes())
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _never(*args, **kwargs):
    raise AssertionError("reached: the command should have stopped before")


def test_explain_out_an_existing_file_is_refused_before_the_model_loads(png, tmp_path, capsys, monkeypatch):
    """``--out result.png`` where that file exists said ``cannot create the output folder result.png (File exists)``
    (as if a folder were there), and only after every map was computed; now it is named as a file before the model
    loads, and the file is left as it was."""
    existing = tmp_path / "result.png"
    existing.write_bytes(b"keep me")
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    rc, out, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--out", existing)
    assert rc == 2 and out == ""
    assert err == f"salience: error: --out {existing} is a file, not a folder; choose another --out\n"
    assert existing.read_bytes() == b"keep me"
    # a file above the folder: mkdir's words as before (tests/test_cli.py), now also before the model loads
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--out", existing / "sub")
    assert rc == 2 and err == f"salience: error: cannot create the output folder {existing / 'sub'} (Not a directory)\n"


def test_visualize_steps_and_out_under_a_file_are_said_with_their_flags(tmp_path, capsys, monkeypatch):
    """``visualize --steps 0`` said ``steps must be a positive integer`` (the keyword, once the model had loaded and
    run); ``--out f/class.png`` under a file ``f`` said ``cannot create the output folder f (File exists)``."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    monkeypatch.setattr(visualize_cmd, "load_model_arg", _never)
    rc, _, err = _run(capsys, "visualize", "--model", "demo:shapes", "--target", "star", "--steps", "0",
                      "--out", tmp_path / "c.png")
    assert rc == 2 and err == "salience: error: --steps must be an int >= 1, got 0\n"
    rc, _, err = _run(capsys, "visualize", "--model", "demo:shapes", "--target", "star", "--steps", "2",
                      "--out", a_file / "c.png")
    assert rc == 2
    assert err == f"salience: error: --out {a_file / 'c.png'}: {a_file} is a file, not a folder; choose another --out\n"
    assert a_file.read_text() == "x" and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("pick", ["5", "logits"])
def test_output_that_does_not_fit_is_said_as_the_flag(png, tmp_path, capsys, pick):
    """The errors of ``--output`` come from the first forward pass, after the model is loaded: they said the Python
    keyword (``output='logits' does not fit``), now the flag as typed (``--output logits does not fit``)."""
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--output", pick, "--out", tmp_path / "o")
    assert rc == 2
    assert err.startswith(f"salience: error: --output {pick} does not fit: the model returned a tensor of shape (1, 5)")
    assert "output=" not in err and not (tmp_path / "o").exists()
    rc, _, err = _run(capsys, "visualize", "--model", "demo:shapes", "--target", "0", "--steps", "1",
                      "--output", pick, "--out", tmp_path / "c.png")
    assert rc == 2 and err.startswith(f"salience: error: --output {pick} does not fit") and "output=" not in err


def test_mode_on_a_classifier_is_refused_in_a_run_of_files(png, tmp_path, capsys):
    """``--mode decrease`` on a classifier was ignored by a run of image files (exit 0, the maps of the class's
    increase) while a dataset run refused it: now both refuse it, with the flag, before any map is written."""
    rc, out, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--mode", "decrease", "--out", tmp_path / "o")
    assert rc == 2 and not (tmp_path / "o").exists()
    assert err == ("salience: error: --mode decrease is for a regression model or a model with one output; demo:shapes "
                   "is a classifier with 5 outputs: leave --mode out (its maps show what raises the class)\n")
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes-regression", "--mode", "decrease",
                      "--out", tmp_path / "r")
    assert rc == 0 and len(list((tmp_path / "r").glob("*_size-decrease.npy"))) == 1


@pytest.mark.parametrize("model, option, said", [
    ("demo:shapes", ["--top", "9"], "--top 9 is more than the model's 5 classes; use --top 5 or less"),
    ("demo:shapes-regression", ["--top", "2"], "--top ranks classes, but demo:shapes-regression is a regression "
                                               "model; give --target OUTPUT and --mode MODE"),
    ("demo:shapes", ["--mode", "decrease"], "--mode 'decrease' is for a regression model or a model with one output; "
                                            "demo:shapes is a classifier with 5 outputs: leave --mode out"),
])
def test_a_dataset_run_names_top_and_mode_as_flags(folder, tmp_path, capsys, model, option, said):
    """A dataset run's refusals of ``--top`` and ``--mode`` said the keywords bare (``top 9 is more than the model's
    5 classes; use top 5 or less``, ``leave mode out``), which read as words, not flags; a run of files said
    ``--top``."""
    rc, _, err = _run(capsys, "explain", folder, "--model", model, *option, "--workers", "0", "--out", tmp_path / "run")
    assert rc == 2 and err.startswith(f"salience: error: {said}") and err.count("\n") == 1


def test_a_layer_without_a_close_name_gets_the_models_layers_not_python(png, tmp_path, capsys):
    """``--layer zzz`` said ``list the names with [n for n, _ in model.named_modules()]``, a line of Python the
    command's user cannot run; now the model's top-level layers and a dotted name inside one (a close name still
    gets ``did you mean``)."""
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--method", "gradcam", "--layer", "zzz")
    assert rc == 2
    assert err == ("salience: error: --layer: the model has no layer named 'zzz'; the model's top-level layers are "
                   "normalize, features, pool, flatten, head; a dotted name reaches inside one, e.g. features.0\n")
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--method", "gradcam", "--layer", "features.40")
    assert rc == 2 and "did you mean 'features.4.0'" in err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_demo_n_below_one_is_a_usage_error_not_an_internal_one(tmp_path, capsys, n):
    """``salience demo --n 0`` was exit 3, ``unexpected ValueError: torch.cat(): expected a non-empty list of Tensors
    ... please report it``, after its output folder was made; now exit 2 naming ``--n``, and no folder."""
    rc, _, err = _run(capsys, "demo", "--n", n, "--out", tmp_path / "demo")
    assert rc == 2 and err == f"salience: error: --n must be an int >= 1, got {n}\n"
    assert not (tmp_path / "demo").exists()


def test_evaluate_out_an_existing_file_is_named_as_a_file(tmp_path, capsys, monkeypatch):
    """``evaluate --out report.html`` where that file exists said ``cannot create the output folder report.html (File
    exists)``; now it says the file is one, before the model loads."""
    from salience.cli import evaluate_cmd

    existing = tmp_path / "report.html"
    existing.write_text("keep")
    monkeypatch.setattr(evaluate_cmd, "load_model_arg", _never)
    rc, _, err = _run(capsys, "evaluate", "--model", "demo:shapes", "--n", "2", "--method", "vanilla", "--out", existing)
    assert rc == 2 and err == f"salience: error: --out {existing} is a file, not a folder; choose another --out\n"
    assert existing.read_text() == "keep"


def test_list_model_checks_output(capsys):
    """``salience list --model M --output 3`` printed the model's layer and methods and exited 0 whatever ``--output``
    said (nothing in ``list`` read the scores); now the pick is tried on one pass, as ``explain`` would, and a pick that
    fits still lists."""
    rc, out, err = _run(capsys, "list", "--model", "demo:shapes", "--output", "3")
    assert rc == 2 and out == ""
    assert err.startswith("salience: error: --output 3 does not fit: the model returned a tensor of shape (1, 5)")
    rc, out, _ = _run(capsys, "list", "--model", "demo:shapes")
    assert rc == 0 and "Grad-CAM layer (default; --layer to change): features.6" in out
