"""Defects found by a command-line audit: each a bad value or path met as a user would meet it."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from salience.cli import main


@pytest.fixture(scope="module")
def pic(tmp_path_factory):
    p = tmp_path_factory.mktemp("pic") / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(p)
    return p


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("options, words", [
    (["--method", "vanilla,scorecam", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none, "
                                                            "channels; got 'nope'"),
    (["--method", "vanilla,ablationcam", "--softmax", "channels"], "--softmax: softmax must be one of auto, classes"),
    (["--method", "vanilla,ablationcam", "--value", "nan"], "--value: value must be a finite number"),
    (["--method", "vanilla,occlusion", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none"),
    (["--method", "vanilla,rise", "--softmax", "nope"], "--softmax: softmax must be one of auto, classes, none"),
    (["--method", "vanilla,gradcam", "--grid", "0,0"], "--grid: grid must be (h, w), two positive ints"),
    (["--method", "vanilla,scorecam", "--prefix-tokens", "-1"], "--prefix-tokens: prefix_tokens must be a "
                                                                 "non-negative int"),
])
def test_values_checked_after_the_first_pass_are_refused_before_any_method_runs(tmp_path, pic, capsys, options,
                                                                                 words):
    """The dry run stops each method at its first forward pass: a value checked after it (Score-CAM's
    default layer runs the model first; the CAMs check grid and prefix_tokens against the layer's
    output) went through, vanilla was written and the bad method failed (exit 1)."""
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *options], capsys)
    assert rc == 2, err
    assert err.startswith("salience: error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "o").exists()


def test_visualize_out_that_cannot_be_written_is_one_line_before_the_optimization(tmp_path, capsys, monkeypatch):
    """``visualize --out`` in a folder that cannot be made (a file in the way) or a folder named
    ``x.png``: exit 2 with one line, before the class model is optimized (was: the optimization ran
    first, then an internal error from ``mkdir`` (exit 3), or the folder's error after it)."""
    import salience.cli.visualize_cmd as vis

    def never(*a, **k):
        raise AssertionError("optimized before the output path was checked")

    monkeypatch.setattr(vis, "class_model", never)
    (tmp_path / "file").write_text("x")
    (tmp_path / "d.png").mkdir()
    for out in (tmp_path / "file" / "c.png", tmp_path / "d.png"):
        rc, _, err = run(["visualize", "-m", "demo:shapes", "--target", "star", "--steps", "1", "--out", out], capsys)
        assert rc == 2 and err.startswith("salience: error: ") and err.count("\n") == 1, err


def test_atomic_write_that_cannot_open_its_file_is_a_salience_error(tmp_path, monkeypatch):
    """A file that cannot be created (no permission, read-only or full disk) is a SalienceError naming
    the path (was: a raw OSError, an internal error with exit 3 on the command line)."""
    import os

    from salience._core import files
    from salience._core.errors import SalienceError

    def denied(path, flags, mode=0o777):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(SalienceError, match=r"cannot write the file .*out\.png \(Permission denied\)"):
        files.atomic_write(tmp_path / "out.png", b"x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [["--method", "layercam", "--gamma", "5"],
                                     ["--method", "layercam", "--gamma", "nan", "--layer", "features.0"],
                                     ["--method", "smoothgrad", "--smooth-method", "layercam", "--gamma", "3"]])
def test_gamma_that_one_layer_ignores_is_refused(tmp_path, pic, capsys, options):
    """LayerCAM's ``gamma`` scales only a fusion of several layers; ``--layer`` names one, so
    ``--gamma`` changed nothing (any value, ``nan`` too, gave the same map with exit 0)."""
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *options], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--gamma scales LayerCAM's maps only where several layers" in err, err
    assert not (tmp_path / "o").exists()


def test_pt2_with_a_bounded_batch_runs_its_passes_in_chunks_it_takes(tmp_path, small_cnn, capsys):
    """A program exported with ``Dim("batch", max=4)`` refuses a batch of 5: the many-pass methods'
    chunks (SmoothGrad's noisy copies, occlusion's windows) went over it, a raw RuntimeError (exit 3).
    Now chunked to the bound: the maps equal the eager model's."""
    import json

    import torch

    import salience
    from salience.loading import load_model

    eager = small_cnn.eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(eager, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4)}})
    path = tmp_path / "bounded.pt2"
    torch.export.save(ep, path)
    m = load_model(path)
    assert m.salience_info.extra["max_batch"] == 4
    for name, call in {"smoothgrad": lambda mod: salience.smoothgrad(mod, x, samples=5),
                       "occlusion": lambda mod: salience.occlusion(mod, x, window=8),
                       "integrated_gradients": lambda mod: salience.integrated_gradients(mod, x, steps=6)}.items():
        assert torch.allclose(call(m), call(eager), atol=1e-5), name
    pic = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(pic)
    rc, _, err = run(["explain", *[pic] * 6, "-m", path, "-o", tmp_path / "o", "--batch-size", "16",
                      "--method", "vanilla,smoothgrad", "--samples", "3"], capsys)
    assert rc == 0, err
    assert len(json.loads((tmp_path / "o" / "summary.json").read_text())["images"]) == 6


@pytest.mark.parametrize("raised", ["cpu", "cuda"])
def test_torch_out_of_memory_is_one_line_exit_2(tmp_path, pic, capsys, monkeypatch, raised):
    """torch's allocators raise RuntimeErrors (``--size 100000`` on a CPU: "DefaultCPUAllocator: can't
    allocate memory"; ``torch.OutOfMemoryError`` on CUDA), not MemoryError: they were an internal error
    (exit 3, "please report it") rather than the out-of-memory line saying what to do."""
    import torch

    import salience.cli.explain_cmd as cmd

    def oom(*a, **k):
        if raised == "cpu":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 120000000000 bytes")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cmd, "scores", oom)
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and err.startswith("salience: error: out of memory; use fewer or smaller images") and \
        err.count("\n") == 1, err


def test_randomization_test_runs_on_a_pt2_program(tmp_path, small_cnn):
    """``salience evaluate`` on a ``.pt2``: the randomization test deep-copies the model, and an
    unflattened export program keeps fake tensors in its graphs' metadata, which cannot be copied
    (every method's row failed, "Cannot call numel() on tensor with symbolic sizes", with torch's C++
    stack in the message). Now the copy shares that metadata: the test runs, the model is left as it was."""
    import torch

    import salience
    from salience.loading import load_model
    from tests.conftest import unchanged

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(small_cnn.eval(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, tmp_path / "cnn.pt2")
    m = load_model(tmp_path / "cnn.pt2")
    with unchanged(m):
        r = salience.evidence.randomization(m, x, "vanilla")
    assert len(r.layers) >= 2 and len(r["spearman_abs"]) == len(r.layers)


def test_evaluate_method_failure_is_one_line():
    """A method that fails with torch's C++ stack in its message (a RuntimeError of many lines): its
    row's error, which ``salience evaluate`` prints as ``method NAME failed: ...`` and puts in the
    report's tables, is the message's first line (was: every line, the stack on stderr and in a table cell)."""
    import torch

    from salience.demo import zoo
    from salience.evidence.evaluate import evaluate_methods

    def boom(model, x, target=None):
        """fails."""
        raise RuntimeError("Cannot call numel()\nException raised from ... (most recent call first):\nframe #0: x")

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    rows, _ = evaluate_methods(zoo.load_demo("shapes"), x, methods=[boom], baselines=False,
                               randomization_images=1)
    assert [r.error for r in rows] == ["RuntimeError: Cannot call numel()"]


@pytest.mark.parametrize("dtype", ["double", "half"])
def test_float64_and_float16_python_models_are_explained(tmp_path, pic, capsys, dtype):
    """A ``python:`` model in float64 (or float16): the images the commands read are float32, which
    such a model refuses ("Input type (float) and bias type (double) should be the same": exit 3 in
    explain, a dataset run, evaluate and visualize). They are now converted to the model's dtype; the
    map equals the library's on the converted batch."""
    import torch

    import salience
    from salience.loading import load_images, load_model

    nets = tmp_path / "nets.py"
    nets.write_text("import torch\nimport torch.nn as nn\n"
                    "def build():\n"
                    "    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
                    f"                         nn.Linear(4, 3)).{dtype}()\n")
    spec = f"python:{nets}:build"
    rc, _, err = run(["explain", pic, "-m", spec, "-o", tmp_path / "o", "--method", "vanilla,gradcam", "--target", "1"],
                     capsys)
    assert rc == 0, err
    model = load_model(spec)
    x, _, _ = load_images([pic], model.salience_info)
    want = salience.vanilla(model, x.to(getattr(torch, dtype)), 1)[0]
    got = np.load(tmp_path / "o" / "img_vanilla_target-class1.npy")
    assert np.allclose(got, want.float().numpy(), atol=1e-3)
    if dtype == "double":  # (float16's optimization may overflow: a SalienceError of its own)
        rc, _, err = run(["visualize", "-m", spec, "--target", "1", "--steps", "2", "--size", "16",
                          "--out", tmp_path / "c.png"], capsys)
        assert rc == 0, err
        rc, _, err = run(["explain", pic, "--dataset", "-m", spec, "--size", "16", "-o", tmp_path / "run"], capsys)
        assert rc == 0, err  # a dataset run: its probe, its batches
        rc, _, err = run(["evaluate", "-m", spec, "--images", pic.parent, "--method", "vanilla", "--deletion-steps", "2",
                          "--randomization-images", "1", "-o", tmp_path / "ev"], capsys)
        assert rc == 0, err


def test_visualize_negative_size_is_refused(tmp_path, capsys):
    rc, _, err = run(["visualize", "-m", "demo:shapes", "--target", "star", "--size", "-1",
                      "--out", tmp_path / "c.png"], capsys)
    assert rc == 2 and "--size must be an int >= 1, got -1" in err, err


@pytest.mark.parametrize("options, words", [(["--out", ""], "--out is empty"),
                                            (["--out", "OUT", "--max-pixels", "0"], "--max-pixels must be an int >= 1"),
                                            (["--out", "OUT", "--max-pixels", "-1", "--dataset"],
                                             "--max-pixels must be an int >= 1")])
def test_empty_out_and_max_pixels_below_one_are_refused(tmp_path, pic, capsys, monkeypatch, options, words):
    """``--out ""`` (an unset ``--out "$DIR"``) wrote the maps, or a whole dataset run, into the current
    folder; ``--max-pixels 0`` skipped every image one by one (exit 1). Both are one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", *[tmp_path / "o" if o == "OUT" else o for o in options]],
                     capsys)
    assert rc == 2 and err.startswith("salience: error: ") and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == []


def test_make_folder_refuses_an_empty_name():
    from salience._core.errors import SalienceError
    from salience._core.files import make_folder

    with pytest.raises(SalienceError, match="the output folder's name is empty"):
        make_folder("")


def test_torchvision_vit_at_another_size_is_a_salience_error():
    """torchvision's ViT asserts its input size ("Wrong image height! Expected 32 but got 16!"): with
    ``--size`` it was an internal error (exit 3); now the input-size message, as timm's and Hugging Face's."""
    import torch
    from torchvision.models import VisionTransformer

    from salience._core.autograd import forward_scores
    from salience._core.errors import SalienceError

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8,
                            num_classes=3).eval()
    with pytest.raises(SalienceError, match=r"cannot take the input of shape \(1, 3, 16, 16\).*Wrong image height"):
        forward_scores(vit, torch.rand(1, 3, 16, 16))


def test_corrupt_pt2_is_one_line_without_torchs_logged_traceback(tmp_path, capfd):
    """``torch.export.load`` logs a corrupt archive's whole traceback (a warning on stderr) before
    raising: the command printed it above its one-line error."""
    (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    capfd.readouterr()
    rc = main(["list", "--model", str(tmp_path / "bad.pt2")])
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("salience: error: ") and "not a torch.export program" in err


def test_visualize_takes_channels_for_a_gray_model(tmp_path, capsys):
    """A one-channel ``python:`` model: visualize's error said "(command line: --channels 1)", a flag
    visualize did not have (exit 2 whatever the user did). Now it takes it."""
    nets = tmp_path / "gray.py"
    nets.write_text("import torch\nimport torch.nn as nn\n"
                    "def build():\n"
                    "    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
                    "                         nn.Linear(4, 3))\n")
    argv = ["visualize", "-m", f"python:{nets}:build", "--target", "1", "--steps", "2", "--size", "16",
            "--out", tmp_path / "c.png"]
    rc, _, err = run(argv, capsys)
    assert rc == 2 and "--channels 1" in err, err
    rc, _, err = run(argv + ["--channels", "1"], capsys)
    assert rc == 0 and (tmp_path / "c.png").is_file(), err


def test_an_image_whose_results_cannot_be_written_does_not_lose_the_others(tmp_path, pic, capsys):
    """A folder named as one image's figure (``out/b.png``) in the way: that image is listed among the errors in
    ``summary.json`` (exit 1) and the other image's figure and maps are written (was: exit 2, nothing written)."""
    import json
    import shutil

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(pic, a)
    shutil.copy(pic, b)
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    rc, stdout, err = run(["explain", a, b, "-m", "demo:shapes", "--method", "vanilla", "-o", out], capsys)
    assert rc == 1, err
    assert "b.png: its results not written" in err and "wrote 1 figure(s) and 1 map(s)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [im["figure"] for im in summary["images"]] == [str(out / "a.png")]
    assert [e["image"] for e in summary["errors"]] == [str(b)] and (out / "a.png").is_file()
    assert len(list(out.glob("a_vanilla_*.npy"))) == 1 and not list(out.glob("b_*.npy"))


def test_pt2_with_a_bounded_batch_in_a_dataset_run_and_evaluate(tmp_path, small_cnn, capsys):
    """A program exported with ``Dim("batch", max=2)``: a dataset run's batches (chosen from memory, or
    ``--batch``), its metrics' perturbed copies and ``evaluate``'s passes (its predictions, the methods' maps, the metrics' perturbed
    copies, the randomization test's images) went over the bound, a raw RuntimeError (exit 3)."""
    import json

    import torch

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(small_cnn.eval(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=2)}})
    path = tmp_path / "bounded.pt2"
    torch.export.save(ep, path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    for extra in (["--metrics"], ["--batch", "8"]):  # --metrics: deletion / insertion's perturbed copies
        out = tmp_path / f"run{len(extra)}"
        rc, _, err = run(["explain", folder, "--dataset", "-m", path, "-o", out, "--method", "vanilla", *extra], capsys)
        assert rc == 0, err
        assert json.loads((out / "run.json").read_text())["batch"] <= 2
    rc, _, err = run(["evaluate", "-m", path, "--images", folder, "--method", "vanilla", "--deletion-steps", "2",
                      "--randomization-images", "3", "-o", tmp_path / "ev"], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert rows[0]["name"] == "vanilla" and rows[0]["error"] is None and rows[0]["randomization"], rows[0]


def test_unreadable_pt2_archive_says_the_cause_torch_logged(tmp_path, capfd):
    """A zip that is no export archive: torch.export.load logs the cause ("file in archive is not in a
    subdirectory") and raises "... Please check the warnings above": with the log silenced, the one
    line pointed at warnings that were not there and never said the cause. torch's logger is left as
    it was (no level, no filter)."""
    import logging
    import zipfile

    with zipfile.ZipFile(tmp_path / "z.pt2", "w") as z:
        z.writestr("a.txt", "hello")
    logger = logging.getLogger("torch.export")
    before = (logger.level, list(logger.filters))
    capfd.readouterr()
    rc = main(["list", "--model", str(tmp_path / "z.pt2")])
    err = capfd.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "not in a subdirectory" in err and "warnings above" not in err, err
    assert (logger.level, list(logger.filters)) == before


def test_pt2_load_keeps_torchs_plain_warnings(tmp_path, small_cnn, capfd, monkeypatch):
    """The silence is for a failed load's logged traceback only: a warning torch logs on a load that
    succeeds (e.g. "This version of file is deprecated") is still printed."""
    import logging

    import torch

    from salience.loading import load_model

    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(small_cnn.eval(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("b")}}),
                      tmp_path / "m.pt2")
    real = torch.export.load

    def load(*a, **k):
        logging.getLogger("torch.export").warning("Trying to deserialize for the older format (test)")
        return real(*a, **k)

    monkeypatch.setattr(torch.export, "load", load)
    capfd.readouterr()
    load_model(tmp_path / "m.pt2")
    assert "older format (test)" in capfd.readouterr().err


def test_explore_max_pixels_below_one_is_refused(capsys, monkeypatch):
    """``explore --max-pixels 0`` (as explain's, refused there): the explorer started and refused
    every image it was given or sent as "over the pixel limit". Refused before the server starts."""
    import importlib

    server = importlib.import_module("salience.explore.server")

    def never(*a, **k):
        raise AssertionError("the explorer started")

    monkeypatch.setattr(server, "start", never)
    rc, _, err = run(["explore", "-m", "demo:shapes", "--max-pixels", "0"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--max-pixels must be an int >= 1" in err, err
