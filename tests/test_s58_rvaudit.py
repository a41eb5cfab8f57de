"""Session 58: review of the command-line audit (``test_s58_audit.py``) and its leftovers. Each test below but the
ones marked "guard" failed on 7e610530 (the audit's merge):

1. The writable check of ``--out`` trusted ``os.access``, which is wrong both ways on network file systems (NFS with
   root squash, SMB: the server decides), with ACLs and for root: a folder ``access`` calls unwritable was refused
   though a file could be made there, and one it calls writable passed though none could. Now a temporary file is
   made and removed there: what it can do decides.
2. ``--weights FILE`` of a non-PyTorch file said "expected a state dict ... or TorchScript (torch.jit.save)":
   TorchScript is no weights. Now it expects a state dict or a ``.safetensors`` file.
3. A TorchScript archive named ``.pt2`` and a ``torch.export`` program named ``.pt`` were said as torch's
   "PytorchStreamReader failed locating file ...: checkpoint corrupted" (a model), or as "a torch.export program"
   (a TorchScript ``.pt2`` given as weights). Now each is named as what it is, with the rename that loads it.
4. ``explain`` of image files none of which could be read exited 1, which ``docs/cli.md`` says is "some inputs
   failed (the others' results are written)": nothing was. Now 2 (nothing explained), as ``evaluate`` does.
5. "out of range for ... with 1 outputs".
6. argparse's abbreviations: ``--sample 3`` was taken as ``--samples 3`` (``--compil`` as ``--compile``). Now every
   parser has ``allow_abbrev=False``. ``--max-memory -5GB`` was argparse's "expected one argument": now the value
   reaches the flag's check ("must be positive").
7. An image that is a symbolic link loop was said as "no such file; check the path".
8. A ``--size`` outside a ``.pt2`` program's bounded dynamic sizes (``Dim("h", min=8, max=64)``) was torch's guard
   error, exit 3: now exit 2 naming the bounds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from salience import SalienceError
from salience.cli import build_parser, common, main
from salience.cli.common import parse_class
from salience.loading import load_model, read_state_dict
from salience.loading.images import load_image


def _run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------- 1. the writable check makes a file


def test_a_folder_os_access_calls_unwritable_but_that_takes_files_is_accepted(tmp_path, monkeypatch):
    """A network file system whose ``access`` is stricter than its server: the old check refused a folder where
    files can be made."""
    folder = tmp_path / "nfs"
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    common.check_no_file_in_way(str(folder))  # no error
    common.check_no_file_in_way(str(folder / "new" / "deeper"))  # a folder to be made below it
    common.writable_out(str(folder / "run"))
    assert list(folder.iterdir()) == []  # the probe file is gone


def test_a_folder_os_access_calls_writable_but_that_takes_no_file_is_refused(tmp_path, monkeypatch):
    """NFS with root squash: ``access`` says yes to root, the server refuses the file (``EACCES``)."""
    folder = tmp_path / "squashed"
    folder.mkdir()
    real = tempfile.TemporaryFile

    def refuse(*args: object, dir: object = None, **kwargs: object):  # noqa: A002 - tempfile's own keyword
        if dir is not None and Path(os.fspath(dir)) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(SalienceError, match=r"--out .*cannot write in the folder .*no permission to write there"):
        common.check_no_file_in_way(str(folder / "out"))
    with pytest.raises(SalienceError, match="cannot write in the folder"):
        common.writable_out(str(folder))


def test_a_relative_out_whose_folder_is_to_be_made_is_checked_in_the_working_folder(tmp_path, monkeypatch):
    """Guard: ``--out new/run`` (relative, not there) checks the working folder, which takes files."""
    monkeypatch.chdir(tmp_path)
    common.check_no_file_in_way("new/run")
    common.writable_out("new/run")


# ------------------------------------------------------------------------- 2, 3. what a file is


def test_weights_that_are_no_pytorch_file_expect_a_state_dict_not_torchscript(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n" * 10)
    with pytest.raises(SalienceError) as e:
        read_state_dict(notes)
    assert "not a PyTorch weights file" in str(e.value) and "TorchScript" not in str(e.value)
    assert ".safetensors" in str(e.value)
    bad_zip = tmp_path / "w.pt"
    import zipfile
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(SalienceError) as e:
        read_state_dict(bad_zip)
    assert "TorchScript" not in str(e.value) and "state dict" in str(e.value)


def _exported(path: Path) -> Path:
    ep = torch.export.export(_Net().eval(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=4),
                                                   3: torch.export.Dim("w", min=4)}})
    torch.export.save(ep, str(path))
    return path


def _scripted(path: Path) -> Path:
    torch.jit.save(torch.jit.trace(_Net().eval(), torch.rand(1, 3, 16, 16)), str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_file_named_pt2_is_said_to_be_torchscript(tmp_path):
    path = _scripted(tmp_path / "net.pt2")
    with pytest.raises(SalienceError) as e:
        load_model(str(path))
    assert str(e.value) == (f"{path}: is a TorchScript archive (torch.jit.save), named .pt2; salience reads a .pt2 "
                            "file as a torch.export program: rename it .pt")
    with pytest.raises(SalienceError, match=r"a TorchScript archive \(torch.jit.save\) is a whole model"):
        read_state_dict(path)
    renamed = path.rename(tmp_path / "net.pt")
    assert load_model(str(renamed))(torch.rand(1, 3, 16, 16)).shape == (1, 5)


def test_an_exported_program_named_pt_is_said_to_be_one(tmp_path):
    path = _exported(tmp_path / "net.pt")
    with pytest.raises(SalienceError) as e:
        load_model(str(path))
    assert str(e.value) == (f"{path}: is a torch.export program (torch.export.save), named .pt; salience reads "
                            "torch.export programs from .pt2 files only: rename it .pt2")
    with pytest.raises(SalienceError, match=r"a torch.export program \(torch.export.save\) is a whole model"):
        read_state_dict(path)
    renamed = path.rename(tmp_path / "net.pt2")
    assert load_model(str(renamed))(torch.rand(1, 3, 16, 16)).shape == (1, 5)


def test_a_dynamic_size_program_is_never_refused_a_size(tmp_path, png, capsys):
    """Guard: ``--size`` and ``--resize-mode none`` on a program exported with a dynamic height and width."""
    path = _exported(tmp_path / "net.pt2")
    for flags in (["--size", "12,20"], ["--size", "40"], ["--resize-mode", "none"]):
        rc, _, err = _run(capsys, "explain", png, "--model", path, "--out", tmp_path / "o", *flags)
        assert rc == 0, err


# ------------------------------------------------------------------------- 4. nothing readable: exit 2


def test_explain_with_no_readable_image_exits_2_and_writes_nothing(tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "explain", notes, tmp_path / "missing.png", "--model", "demo:shapes", "--out", out)
    assert rc == 2 and "none of the 2 image(s) could be read" in err and not out.exists()
    assert "2 nothing explained" in build_parser().epilog


# ------------------------------------------------------------------------- 5. 1 output


def test_one_output_is_said_in_the_singular():
    info = types.SimpleNamespace(class_names=None, name="net")
    with pytest.raises(SalienceError) as e:
        parse_class("3", info, 1)
    assert "with 1 output (valid: 0..0)" in str(e.value)
    with pytest.raises(SalienceError, match="with 5 outputs"):
        parse_class("7", info, 5)


# ------------------------------------------------------------------------- 6. flags in full; a value like -5GB


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_no_parser_takes_abbreviated_flags():
    parsers = _parsers(build_parser())
    assert len(parsers) == 7 and all(p.allow_abbrev is False for p in parsers)
    for abbreviated in (["--sample", "3"], ["--compil"], ["--max-mem", "1GB"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["explain", "a.png", "--model", "demo:shapes", *abbreviated])


def test_an_abbreviated_flag_is_refused_naming_the_full_one(png, tmp_path, capsys):
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--method", "smoothgrad", "--sample", "3",
                      "--out", tmp_path / "o")
    assert rc == 2 and "unrecognized arguments: --sample 3; did you mean '--samples'?" in err
    assert not (tmp_path / "o").exists()


def test_a_value_starting_with_minus_and_a_digit_reaches_the_flags_check(png, tmp_path, capsys):
    args = build_parser().parse_args(["explain", "a.png", "--model", "demo:shapes", "--max-memory", "-5GB"])
    assert args.method_option_max_memory == "-5GB"
    rc, _, err = _run(capsys, "explain", png, "--model", "demo:shapes", "--method", "smoothgrad", "--max-memory",
                      "-5GB", "--out", tmp_path / "o")
    assert rc == 2 and "expected one argument" not in err and "must be positive" in err
    # a flag after a flag is still a flag; plain negative numbers are as argparse reads them
    args = build_parser().parse_args(["explain", "a.png", "--model", "demo:shapes", "--layer", "-1", "--compile"])
    assert args.method_option_layer == "-1" and args.compile is True


# ------------------------------------------------------------------------- 7. a link loop


def test_an_image_that_is_a_link_loop_is_said_to_be_one(tmp_path, png, capsys):
    a, b = tmp_path / "loop_a.png", tmp_path / "loop_b.png"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(SalienceError) as e:
        load_image(a)
    assert str(e.value).startswith(f"{a}: a symbolic link loop") and "no such file" not in str(e.value)
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(SalienceError, match=f"a link to {tmp_path / 'nowhere.png'}, which is not there"):
        load_image(dangling)
    rc, _, err = _run(capsys, "explain", png, a, "--model", "demo:shapes", "--out", tmp_path / "o")
    assert rc == 1 and f"salience: skipped {a}: a symbolic link loop" in err


# ------------------------------------------------------------------------- review guards: names several classes share


def test_every_class_name_imagenet_repeats_ignoring_case_resolves_or_is_refused_with_indices():
    """Guard: the names salience's ImageNet list repeats when case is ignored (torchvision's list: ``Cardigan`` /
    ``cardigan`` only); written exactly, each is its class; written otherwise, refused naming each index."""
    from salience.loading.models import imagenet_class_names

    names = imagenet_class_names()
    if names is None:
        pytest.skip("torchvision's class names are not available")
    info = types.SimpleNamespace(class_names=names, name="resnet")
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.lower(), []).append(i)
    repeated = {k: v for k, v in groups.items() if len(v) > 1}
    assert repeated == {"cardigan": [264, 474]}
    for lower, indices in repeated.items():
        for i in indices:
            assert parse_class(names[i], info, 1000) == i
        for written in {lower, lower.upper(), lower.title()} - {names[i] for i in indices}:
            with pytest.raises(SalienceError, match="; ".join([", ".join(f"{i} \\({names[i]}\\)" for i in indices),
                                                                "give the index"])):
                parse_class(written, info, 1000)


def test_a_name_repeated_exactly_is_refused_with_its_indices():
    """Guard: a labels file naming two classes alike (ImageNet's original ``crane``, 134 and 517)."""
    info = types.SimpleNamespace(class_names=("crane", "cat", "crane"), name="net")
    for written in ("crane", "Crane"):
        with pytest.raises(SalienceError, match=r"names 2 classes: 0 \(crane\), 2 \(crane\)"):
            parse_class(written, info, 3)
    assert parse_class("CAT", info, 3) == 1


# ------------------------------------------------------------------------- review: a bounded dynamic size


def test_a_size_outside_a_programs_dim_bounds_is_exit_2_naming_them(tmp_path, png, capsys):
    """Before: ``unexpected RuntimeError: Expected input at *args[0].shape[2] to be <= 64, but got 100`` (exit 3).
    A size inside the bounds is explained."""
    ep = torch.export.export(_Net().eval(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch"),
                                                   2: torch.export.Dim("h", min=8, max=64),
                                                   3: torch.export.Dim("w", min=8, max=64)}})
    path = tmp_path / "bounded.pt2"
    torch.export.save(ep, str(path))
    assert load_model(str(path)).salience_info.extra["size_bounds"] == ((8, 64), (8, 64))
    rc, _, err = _run(capsys, "explain", png, "--model", path, "--size", "100,32", "--out", tmp_path / "o")
    assert rc == 2 and err == ("salience: error: --size 100,32: bounded.pt2 was exported with bounded dynamic sizes, "
                               "and --size 100,32 would give it height 100 (it takes 8..64); choose a size in range, "
                               "or export it again with wider Dim(min=, max=)\n")
    rc, _, err = _run(capsys, "explain", png, "--model", path, "--size", "4", "--out", tmp_path / "o")
    assert rc == 2 and "height 4 (it takes 8..64), width 4 (it takes 8..64)" in err
    rc, _, err = _run(capsys, "explain", png, "--model", path, "--size", "64,8", "--out", tmp_path / "o")
    assert rc == 0, err
    # Dim("h", min=4) (no maximum): any size from 4 up is taken
    free = _exported(tmp_path / "free.pt2")
    assert load_model(str(free)).salience_info.extra["size_bounds"] == ((4, None), (4, None))
    rc, _, err = _run(capsys, "explain", png, "--model", free, "--size", "300,4", "--out", tmp_path / "o")
    assert rc == 0, err
    rc, _, err = _run(capsys, "explain", png, "--model", free, "--size", "3,300", "--out", tmp_path / "o")
    assert rc == 2 and "height 3 (it takes 4..any)" in err


def test_visualize_of_a_bounded_program_refuses_a_size_outside_its_bounds(tmp_path, capsys):
    """Before: visualize's default ``--size 224`` on ``Dim("h", min=8, max=64)`` was torch's guard error, exit 3."""
    ep = torch.export.export(_Net().eval(), (torch.rand(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch"),
                                                   2: torch.export.Dim("h", min=8, max=64),
                                                   3: torch.export.Dim("w", min=8, max=64)}})
    path = tmp_path / "bounded.pt2"
    torch.export.save(ep, str(path))
    rc, _, err = _run(capsys, "visualize", "--model", path, "--target", "1", "--out", tmp_path / "v.png")
    assert rc == 2 and "--size 224: bounded.pt2 was exported with bounded dynamic sizes" in err
    assert not (tmp_path / "v.png").exists()
    rc, _, err = _run(capsys, "visualize", "--model", path, "--target", "1", "--size", "32", "--steps", "2",
                      "--out", tmp_path / "v.png")
    assert rc == 0 and (tmp_path / "v.png").exists(), err
