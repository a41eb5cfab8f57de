"""Session 58: a demanding user's audit of the command line and model loading. Each test pins a defect found, and
each fails on the code before (the counts are in the session's report):

1. An output folder that cannot be written in (no permission, read-only, immutable): a dataset run stopped with an
   unexpected ``PermissionError`` at its lock file (exit 3, "please report it"); a run of image files, ``visualize``
   and ``evaluate`` loaded the model and computed every map before failing to write. Now each is refused with exit 2
   before the model loads, naming ``--out``.
2. A ``.pt2`` program exported with a static size (``docs/models.md``: "its static input size") given another size
   or channel count by ``--size``, ``--crop``, ``--resize-mode none`` or ``--channels`` (``explain`` files and dataset
   runs, ``visualize --channels``): torch's guard error came out as an unexpected error, exit 3. Now exit 2 naming the
   flag and the program's fixed ``C x H x W``.
3. ``--size 8,x`` (``--crop 8,,9``, ``8x``) was read as ``8`` (runs of separators counted as one, a stray ``x`` as a
   separator): a typo explained silently at 8 x 8. Now refused as the other malformed sizes are.
4. ``--model python:DIR.py:FUNC`` where ``DIR.py`` is a folder said ``no such file; check the path`` of a path that
   is there. Now it says it is a folder.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from salience.cli import explain_cmd, explain_many, visualize_cmd
import test_s53_cliaudit

_run = test_s53_cliaudit._run  # main(argv) in this process: (exit code, stdout, stderr), no traceback
_never = test_s53_cliaudit._never


class _Net(nn.Module):
    """Two convolutions, a global pool and a head of 3 classes: any input size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of two 20 x 24 RGB PNGs."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def static_pt2(tmp_path: Path) -> Path:
    """A ``.pt2`` program of :class:`_Net` exported in eval mode with a dynamic batch and a static 3 x 16 x 16 image."""
    torch.manual_seed(0)
    ep = torch.export.export(_Net().eval(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    path = tmp_path / "net.pt2"
    torch.export.save(ep, str(path))
    return path


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the process cannot write in, as a read-only or immutable folder is, also for root (whom ``chmod``
    does not stop): ``os.access`` says so and creating a file in it fails with ``EACCES``, as the system would."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access, real_open, real_mkdir = os.access, os.open, os.mkdir

    def inside(p: object) -> bool:
        try:
            return Path(os.fspath(p)).resolve().is_relative_to(folder.resolve())
        except TypeError:
            return False

    def access(p: object, mode: int, *args: object, **kwargs: object) -> bool:
        if inside(p) and mode & os.W_OK:
            return False
        return real_access(p, mode, *args, **kwargs)

    def open_(p: object, flags: int, *args: object, **kwargs: object) -> int:
        if inside(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    def mkdir(p: object, *args: object, **kwargs: object) -> None:
        if inside(p) and Path(os.fspath(p)).resolve() != folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
        return real_mkdir(p, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return folder


# ------------------------------------------------------------------------- 1. an output folder that cannot be written


def test_dataset_run_into_a_folder_it_cannot_write_is_exit_2_not_an_internal_error(images, read_only, capsys):
    """Before: ``salience: error: unexpected PermissionError: ... '.salience-run.lock'``, exit 3."""
    rc, out, err = _run(capsys, "explain", images, "--model", "demo:shapes", "--out", read_only)
    assert rc == 2, err
    assert err == (f"salience: error: --out {read_only}: cannot write in the folder {read_only} (no permission to "
                   "write there, or a read-only folder); choose another --out\n")
    assert list(read_only.iterdir()) == []


def test_dataset_run_under_a_folder_it_cannot_write_is_refused_before_the_model(images, read_only, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(explain_many, "load_model_arg", _never)
    rc, out, err = _run(capsys, "explain", images, "--model", "demo:shapes", "--out", read_only / "run")
    assert rc == 2 and f"cannot write in the folder {read_only} " in err and "--out" in err


def test_file_run_into_a_folder_it_cannot_write_is_refused_before_the_model(images, read_only, capsys, monkeypatch):
    """Before: the model was loaded and every map computed, then ``cannot write the file ...``."""
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    for out in (read_only, read_only / "sub"):
        rc, _, err = _run(capsys, "explain", images / "a.png", "--model", "demo:shapes", "--out", out)
        assert rc == 2, err
        assert err.startswith(f"salience: error: --out {out}: cannot write in the folder {read_only} ")


def test_visualize_into_a_folder_it_cannot_write_is_refused_before_the_model(read_only, capsys, monkeypatch):
    monkeypatch.setattr(visualize_cmd, "load_model_arg", _never)
    rc, _, err = _run(capsys, "visualize", "--model", "demo:shapes", "--target", "star", "--steps", "1",
                      "--out", read_only / "c.png")
    assert rc == 2 and f"cannot write in the folder {read_only} " in err


def test_really_read_only_folder_when_the_system_enforces_it(images, tmp_path, capsys):
    """The same with the system's own refusal (``chmod 555``; skipped where it does not bind, as for root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user may write in a 0o555 folder (root)")
        rc, _, err = _run(capsys, "explain", images, "--model", "demo:shapes", "--out", folder)
        assert rc == 2 and "cannot write in the folder" in err
    finally:
        folder.chmod(0o755)


def test_a_writable_folder_still_takes_the_results(images, tmp_path, capsys):
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", "demo:shapes", "--out", tmp_path / "o")
    assert rc == 0, err
    assert (tmp_path / "o" / "summary.json").is_file()


# ----------------------------------------------------------------------- 2. a .pt2 program with a static image size


@pytest.mark.parametrize("flags, said, feeds", [
    (["--size", "24"], "--size 24", "3 x 24 x 24"),
    (["--crop", "8"], "--crop 8 --resize-mode crop", "3 x 8 x 8"),
    (["--resize-mode", "none"], "--resize-mode none", "3 x each image's own size"),
    (["--channels", "1"], "--channels 1", "1 x 16 x 16"),
])
def test_static_pt2_given_another_input_is_exit_2_naming_the_flag(static_pt2, images, tmp_path, capsys, flags, said,
                                                                  feeds):
    """Before: ``unexpected RuntimeError: Expected input at *args[0].shape[2] to be equal to 16, but got 24``, exit 3."""
    rc, out, err = _run(capsys, "explain", images / "a.png", "--model", static_pt2, "--out", tmp_path / "o", *flags)
    assert rc == 2, err
    assert err.startswith(f"salience: error: {said}: net.pt2 takes inputs of 3 x 16 x 16 (channels x height x width) "
                          f"only, fixed when it was exported, and {said} would give it {feeds}; leave {said} out")
    assert not (tmp_path / "o").exists()


def test_static_pt2_in_a_dataset_run_and_visualize(static_pt2, images, tmp_path, capsys):
    rc, _, err = _run(capsys, "explain", images, "--model", static_pt2, "--out", tmp_path / "run", "--size", "24")
    assert rc == 2 and err.startswith("salience: error: --size 24: net.pt2 takes inputs of 3 x 16 x 16"), err
    rc, _, err = _run(capsys, "visualize", "--model", static_pt2, "--target", "1", "--steps", "1", "--channels", "1",
                      "--out", tmp_path / "c.png")
    assert rc == 2 and err.startswith("salience: error: --channels 1: net.pt2 takes inputs of 3 x 16 x 16"), err


def test_static_pt2_with_its_own_size_still_runs_and_equals_the_eager_model(static_pt2, images, tmp_path, capsys):
    """The check refuses only what the program refuses: its own size given (``--size 16``, a resize before the crop,
    a mean) runs, and the map is the eager network's gradient."""
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", static_pt2, "--out", tmp_path / "o",
                      "--size", "16", "--resize", "20", "--target", "2")
    assert rc == 0, err
    saved = np.load(tmp_path / "o" / "a_vanilla_target-class2.npy")
    from salience.loading import load_image, preprocess
    from salience.loading.images import with_preprocessing
    from salience.loading.models import load_model
    info = with_preprocessing(load_model(str(static_pt2)).salience_info, size=16, resize=20)
    x = preprocess(load_image(images / "a.png"), info).unsqueeze(0).requires_grad_(True)
    torch.manual_seed(0)
    eager = _Net().eval()
    eager(x)[0, 2].backward()
    np.testing.assert_allclose(saved, x.grad.abs().amax(1)[0].numpy(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ 3. malformed sizes refused


@pytest.mark.parametrize("flag, value", [("--size", "8,x"), ("--size", "8x"), ("--crop", "8,,9"), ("--size", "x8")])
def test_a_malformed_size_is_refused_not_read_as_a_square(images, tmp_path, capsys, monkeypatch, flag, value):
    """Before: ``--size 8,x`` explained at 8 x 8, exit 0."""
    monkeypatch.setattr(explain_cmd, "load_model_arg", _never)
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", "demo:shapes", "--out", tmp_path / "o",
                      flag, value)
    assert rc == 2
    assert err == f"salience: error: {flag} must be H or H,W in pixels (whole numbers >= 1), got {value!r}\n"


@pytest.mark.parametrize("value, size", [("12", [12, 12]), ("12,10", [12, 10]), ("12x10", [12, 10]),
                                         (" 12, 10 ", [12, 10]), ("12 10", [12, 10])])
def test_the_sizes_written_as_docs_and_habit_say_still_read(images, tmp_path, capsys, value, size):
    import json
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", "demo:shapes", "--out", tmp_path / "o",
                      "--size", value)
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["preprocessing"]["input_size"] == size


# ------------------------------------------------------------------------- 4. python:FOLDER.py:FUNC names a folder


def test_python_spec_naming_a_folder_says_it_is_a_folder(images, tmp_path, capsys, monkeypatch):
    """Before: ``python:pkg.py: no such file; check the path`` of a folder that is there."""
    (tmp_path / "pkg.py").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", "python:pkg.py:build", "--out", tmp_path / "o")
    assert rc == 2
    assert err.startswith("salience: error: python:pkg.py: is a folder, not a Python file; give the .py file")


# ------------------------------------------------------------- 5. a whole pickled model whose class is not importable


def test_trusted_pickle_whose_class_is_gone_says_so_not_that_it_is_no_pytorch_file(tmp_path, monkeypatch, capsys):
    """Before: ``whole.pt: not a PyTorch model file salience can read (Can't get attribute 'Net' on <module
    '__main__'>); expected TorchScript ...``: a PyTorch file it is; the class its pickle names is not importable."""
    import importlib
    import sys
    (tmp_path / "s58_gone_mod.py").write_text("import torch.nn as nn\nclass Net(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("s58_gone_mod")
    torch.save(mod.Net(2, 3), tmp_path / "whole.pt")
    sys.modules.pop("s58_gone_mod")
    (tmp_path / "s58_gone_mod.py").unlink()
    from salience import SalienceError, load_model
    with pytest.raises(SalienceError) as e:
        load_model(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert "holds pickled Python objects" in str(e.value) and "cannot be found in this process" in str(e.value)
    assert "No module named 's58_gone_mod'" in str(e.value) and "not a PyTorch model file" not in str(e.value)
    rc, _, err = _run(capsys, "explain", "x.png", "--model", tmp_path / "whole.pt", "--trust-pickle",
                      "--out", tmp_path / "o")
    assert rc == 2 and "with --weights PATH), or save TorchScript" in err


# ------------------------------------------------------------------- 6. a class name that several classes share


@pytest.mark.parametrize("given, explained", [("cardigan", 2), ("Cardigan", 0), ("b", 1), ("CARDIGAN", None)])
def test_a_name_several_classes_share_is_the_exact_one_or_refused(images, tmp_path, capsys, given, explained):
    """ImageNet names 264 ``Cardigan`` (the corgi) and 474 ``cardigan`` (the sweater). Before: a case-insensitive
    match took the first silently, so ``--target cardigan`` explained the corgi. Now the name as written picks the one
    class it names exactly; a spelling that matches several only ignoring case is refused, naming them."""
    import json
    torch.manual_seed(0)
    torch.jit.save(torch.jit.trace(_Net().eval(), torch.rand(1, 3, 16, 16)), str(tmp_path / "net.ts"))
    (tmp_path / "labels.txt").write_text("Cardigan\nb\ncardigan\n")
    rc, _, err = _run(capsys, "explain", images / "a.png", "--model", tmp_path / "net.ts", "--labels",
                      tmp_path / "labels.txt", "--target", given, "--out", tmp_path / "o")
    if explained is None:
        assert rc == 2
        assert err == ("salience: error: target class 'CARDIGAN' names 2 classes: 0 (Cardigan), 2 (cardigan); give "
                       "the index of the one you mean\n")
    else:
        assert rc == 0, err
        assert json.loads((tmp_path / "o" / "summary.json").read_text())["images"][0]["explained"] == [explained]
