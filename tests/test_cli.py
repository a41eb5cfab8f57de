"""The salience command end to end on the bundled demo model, its error messages, and report.py."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import METHODS
from salience.demo import zoo
from salience.cli import main
from salience.loading import load_image, preprocess
from salience.loading.images import resize_crop, with_preprocessing
from salience._core.info import ModelInfo
from salience.render.report import Report
from salience.targets import regression


@pytest.fixture(scope="module")
def shapes_model():
    return zoo.load_demo("shapes")


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    """Three demo images as PNG files (held-out seed) and their labels."""
    d = tmp_path_factory.mktemp("pics")
    images, labels, _ = salience.data.shapes(3, seed=10_001)
    paths = []
    for i in range(3):
        p = d / f"img{i}.png"
        Image.fromarray((images[i].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(p)
        paths.append(p)
    return paths, labels


def _input(model, path):
    return preprocess(load_image(path), model.salience_info).unsqueeze(0)


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_writes_figures_and_exact_maps(tmp_path, pics, shapes_model, capsys):
    paths, _ = pics
    out_dir = tmp_path / "out"
    rc, out, err = run(["explain", *paths, "--model", "demo:shapes", "--out", out_dir], capsys)
    assert rc == 0, err
    assert err == ""
    names = shapes_model.salience_info.class_names
    for p in paths:
        x = _input(shapes_model, p)
        with torch.no_grad():
            logits = shapes_model(x)[0]
        c = int(logits.argmax())
        line = next(ln for ln in out.splitlines() if ln.startswith(str(p)))
        prob = float(logits.softmax(0)[c])
        assert line.split(": ", 1)[1].startswith(f"{names[c]} {prob:.3f}")  # printed class and score
        fig = np.asarray(Image.open(out_dir / f"{p.stem}.png"))
        assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[0] >= 64 and fig.shape[1] >= 128
        saved = np.load(out_dir / f"{p.stem}_vanilla_top1-class{c}.npy")
        ref = METHODS["vanilla"](shapes_model, x, c)[0].numpy()
        assert saved.shape == (64, 64) and np.allclose(saved, ref, atol=1e-6)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["model"] == "demo:shapes" and len(summary["images"]) == 3 and summary["errors"] == []
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp") or f.startswith(".")]  # no leftovers


def test_top_k_several_methods_and_class_names(tmp_path, pics, shapes_model, capsys, monkeypatch):
    paths, _ = pics

    def negated(model, x, target=None, *, reduce="max_abs"):
        """Minus the raw gradient (a second method for the test)."""
        return -METHODS["vanilla"](model, x, target, reduce=None)

    monkeypatch.setitem(METHODS, "negated", negated)
    out_dir = tmp_path / "o"
    rc, out, err = run(["explain", paths[0], "-m", "demo:shapes", "--method", "vanilla,negated", "--method",
                        "vanilla", "--top", "2", "-o", out_dir], capsys)
    assert rc == 0, err
    x = _input(shapes_model, paths[0])
    top = shapes_model(x)[0].topk(2).indices.tolist()
    raw = METHODS["vanilla"](shapes_model, x, top[1], reduce=None)[0].numpy()
    got = np.load(out_dir / f"img0_negated_top2-class{top[1]}.npy")
    assert got.shape == (3, 64, 64) and np.allclose(got, -raw, atol=1e-6)
    assert (out_dir / f"img0_vanilla_top2-class{top[1]}.npy").exists()
    assert len(list(out_dir.glob("img0_*.npy"))) == 4  # 2 methods (vanilla once) x 2 ranks
    wide = np.asarray(Image.open(out_dir / "img0.png"))
    # one column per method and one row per rank: bigger than a 1 x 2 figure
    rc, _, _ = run(["explain", paths[0], "-m", "demo:shapes", "-o", tmp_path / "one"], capsys)
    narrow = np.asarray(Image.open(tmp_path / "one" / "img0.png"))
    assert wide.shape[1] > narrow.shape[1] and wide.shape[0] > narrow.shape[0]
    # --target by name (case-insensitive) explains that class
    rc, out, err = run(["explain", paths[0], "-m", "demo:shapes", "--target", "STAR", "-o", tmp_path / "t"], capsys)
    assert rc == 0 and "[explained: star (4)]" in out
    ref = METHODS["vanilla"](shapes_model, x, 4)[0].numpy()
    assert np.allclose(np.load(tmp_path / "t" / "img0_vanilla_target-class4.npy"), ref, atol=1e-6)


def test_regression_model_targets(tmp_path, pics, capsys):
    paths, _ = pics
    reg = zoo.load_demo("shapes-regression")
    rc, out, err = run(["explain", paths[1], "-m", "demo:shapes-regression", "--target", "x_position",
                        "--mode", "decrease", "-o", tmp_path], capsys)
    assert rc == 0, err
    x = _input(reg, paths[1])
    with torch.no_grad():
        value = float(reg(x)[0, 1])
    assert f"x_position={value:.4g}" in out
    ref = METHODS["vanilla"](reg, x, regression(1, "decrease"))[0].numpy()
    assert np.allclose(np.load(tmp_path / "img1_vanilla_x_position-decrease.npy"), ref, atol=1e-6)
    rc, _, err = run(["explain", paths[1], "-m", "demo:shapes-regression", "--top", "2", "-o", tmp_path], capsys)
    assert rc == 2 and "regression model" in err


def _huge_png(path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 90_000, 90_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_bad_files_in_a_batch_keep_the_others(tmp_path, pics, capsys):
    paths, _ = pics
    d = tmp_path / "in"
    d.mkdir()
    (d / "text.png").write_text("I am not a picture\n")
    good = np.asarray(Image.open(paths[0]))
    Image.fromarray(good).save(d / "full.png")
    Image.fromarray(good).save(d / "full.jpg", quality=95)
    for ext in ("png", "jpg"):
        data = (d / f"full.{ext}").read_bytes()
        (d / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    _huge_png(d / "huge.png")
    bad = [d / "missing.png", d / "text.png", d / "cut.png", d / "cut.jpg", d / "huge.png"]
    out_dir = tmp_path / "out"
    rc, out, err = run(["explain", paths[0], *bad, paths[2], "-m", "demo:shapes", "-o", out_dir], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == len(bad) and "Traceback" not in err
    for b, ln in zip(bad, lines):
        assert ln.startswith("salience: skipped ") and str(b) in ln
    assert "no such file" in lines[0] and "not an image file" in lines[1]
    assert "corrupt or truncated" in lines[2] and "corrupt or truncated" in lines[3]
    assert "90000x90000" in lines[4] and "limit of 50 megapixels" in lines[4]
    assert (out_dir / "img0.png").exists() and (out_dir / "img2.png").exists()
    assert "5 image(s) skipped" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [e["image"] for e in summary["errors"]] == [str(b) for b in bad]
    # every file bad: exit 2 (1 says some results were written), nothing explained
    rc, _, err = run(["explain", d / "text.png", "-m", "demo:shapes", "-o", tmp_path / "none"], capsys)
    assert rc == 2 and "none of the 1 image(s)" in err
    # a lower --max-pixels refuses an ordinary image (the only one: nothing explained)
    rc, _, err = run(["explain", paths[0], "-m", "demo:shapes", "--max-pixels", "1000", "-o", tmp_path / "m"], capsys)
    assert rc == 2 and "limit of 0.001 megapixels" in err


def test_odd_image_modes_are_explained(tmp_path, pics, capsys):
    paths, _ = pics
    rgb = np.asarray(Image.open(paths[0]))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    files = [tmp_path / n for n in ("gray.png", "rgba.png", "cmyk.jpg", "deep.png")]
    rc, out, err = run(["explain", *files, "-m", "demo:shapes", "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    for f in files:
        assert (tmp_path / "o" / f"{f.stem}.png").exists()
        assert np.isfinite(np.load(next((tmp_path / "o").glob(f"{f.stem}_vanilla_*.npy")))).all()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["-m", "demo:shape"], "did you mean 'shapes'"),
        (["-m", "resnet50"], "unknown model 'resnet50'"),
        (["-m", "demo:shapes", "--method", "vanila"], "did you mean 'vanilla'"),
        (["-m", "demo:shapes", "--target", "7"], "target class 7 is out of range for demo:shapes with 5 outputs"),
        (["-m", "demo:shapes", "--target", "sqare"], "did you mean 'square'"),
        (["-m", "demo:shapes", "--top", "9"], "more than the model's 5 classes"),
        # the methods whose map does not depend on the target refuse a wrong one as well
        (["-m", "demo:shapes", "--method", "eigencam", "--target", "5000"],
         "target class 5000 is out of range for demo:shapes with 5 outputs"),
        (["-m", "demo:shapes", "--method", "eigencam", "--target", "-1"],
         "target class -1 is out of range for demo:shapes with 5 outputs"),
        (["-m", "demo:shapes", "--method", "eigencam", "--top", "9"], "more than the model's 5 classes"),
        (["-m", "demo:shapes-vit", "--method", "attention_rollout", "--target", "5000"],
         "target class 5000 is out of range for demo:shapes-vit with 5 outputs"),
        (["-m", "demo:shapes-vit", "--method", "attention_rollout", "--top", "6"], "more than the model's 5 classes"),
        (["-m", "torchvision:resnet18", "--weights", "nothere.pth"], "no such file"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, pics, capsys, argv, words):
    paths, _ = pics
    rc, out, err = run(["explain", paths[0], *argv, "-o", tmp_path], capsys)
    assert rc == 2
    assert err.startswith("salience: error: ") and err.count("\n") == 1 and words in err
    assert not list(tmp_path.glob("*.png"))  # nothing explained


@pytest.mark.parametrize(
    "argv, words",
    [
        (["explain", "IMG", "-m", "demo:shapes", "--top", "0"], "--top must be an int >= 1, got 0"),
        (["explain", "IMG", "-m", "demo:shapes", "--top", "-3"], "--top must be an int >= 1, got -3"),
        (["explain", "IMG", "-m", "demo:shapes", "--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
        (["evaluate", "-m", "demo:shapes", "--n", "0"], "--n must be an int >= 1, got 0"),
        (["evaluate", "-m", "demo:shapes", "--deletion-steps", "0"], "--deletion-steps must be an int >= 1, got 0"),
        (["evaluate", "-m", "demo:shapes", "--randomization-images", "-1"],
         "--randomization-images must be an int >= 1, got -1"),
    ],
)
def test_bad_integer_options_are_one_line_exit_2(tmp_path, pics, capsys, argv, words):
    paths, _ = pics
    argv = [paths[0] if a == "IMG" else a for a in argv]
    rc, out, err = run([*argv, "-o", tmp_path / "o"], capsys)
    assert rc == 2 and out == ""
    assert err == f"salience: error: {words}\n"
    assert not (tmp_path / "o").exists()  # checked before anything is loaded or written


@pytest.mark.parametrize("command", [["explain", "IMG", "-m", "demo:shapes"], ["demo", "--n", "1"]])
def test_output_folder_that_cannot_be_made(tmp_path, pics, capsys, command):
    paths, _ = pics
    (tmp_path / "file").write_text("x")
    argv = [paths[0] if a == "IMG" else a for a in command]
    rc, out, err = run([*argv, "-o", tmp_path / "file" / "sub"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("salience: error: cannot create the output folder ") and err.count("\n") == 1


def test_python_m_salience_cli_runs_main(tmp_path):
    p = subprocess.run([sys.executable, "-m", "salience.cli", "--version"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0 and p.stdout.strip() == f"salience {salience.__version__}"


def test_pickled_model_needs_trust_flag(tmp_path, pics, capsys):
    paths, _ = pics
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    torch.save(model, tmp_path / "whole.pt")
    rc, _, err = run(["explain", paths[0], "-m", tmp_path / "whole.pt", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "--trust-pickle" in err and err.count("\n") == 1
    rc, out, err = run(["explain", paths[0], "-m", tmp_path / "whole.pt", "--trust-pickle", "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    x = load_image(paths[0]).unsqueeze(0)  # no ModelInfo: the image as it is
    c = int(model(x).argmax())
    ref = METHODS["vanilla"](model, x, c)[0].numpy()
    assert np.allclose(np.load(tmp_path / "o" / f"img0_vanilla_top1-class{c}.npy"), ref, atol=1e-6)


def test_progress_bar_on_request(tmp_path, pics, capsys):
    paths, _ = pics
    rc, _, err = run(["explain", *paths, "-m", "demo:shapes", "--batch-size", "1", "--progress", "-o", tmp_path], capsys)
    assert rc == 0 and re.search(r"explain 100%\|#+\| 3/3", err)


def test_list_names_methods_and_models(capsys):
    rc, out, _ = run(["list"], capsys)
    assert rc == 0
    for name in METHODS:
        assert f"  {name} " in out
    for name in zoo.DEMOS:
        assert f"demo:{name}" in out


def test_list_says_what_salience_picks_for_a_model(capsys):
    from salience.methods import ATTENTION_METHODS, GUIDED_METHODS
    from salience.methods.gradcam import default_layer

    for spec in ("demo:shapes-vit", "demo:shapes"):
        rc, out, err = run(["list", "--model", spec], capsys)
        assert rc == 0, err
        model = zoo.load_demo(spec.split(":")[1])
        layer = default_layer(model, torch.rand(1, 3, 64, 64))
        assert f"Grad-CAM layer (default; --layer to change): {layer} (" in out
        applies = out.split("methods that apply (run when none is named): ")[1].split("\n")[0].split(", ")
        assert ("attention_rollout" in applies) == (spec == "demo:shapes-vit")
        # the guided methods' rules refuse the ViT's GELU: left out there (salience.methods.GUIDED_METHODS)
        vit = spec == "demo:shapes-vit"
        assert set(applies) >= set(METHODS) - set(ATTENTION_METHODS) - (set(GUIDED_METHODS) if vit else set())
        assert bool(set(GUIDED_METHODS) & set(applies)) == (not vit)


def test_visualize_and_evaluate_are_wired(tmp_path, capsys):
    rc, out, err = run(["visualize", "-m", "demo:shapes", "--target", "square", "--steps", "2",
                        "-o", tmp_path / "c.png"], capsys)
    assert rc == 0, err
    assert np.asarray(Image.open(tmp_path / "c.png")).shape == (64, 64, 3)
    rc, _, err = run(["visualize", "-m", "demo:shapes", "--target", "5", "-o", tmp_path / "c.png"], capsys)
    assert rc == 2 and "out of range" in err
    rc, _, err = run(["evaluate", "-m", "demo:shapes", "--masks", tmp_path, "-o", tmp_path / "ev"], capsys)
    assert rc == 2 and "--images" in err


def test_demo_report(tmp_path, capsys):
    # 2 images (4 before): every section and method runs on each image alike, so 2 check the same page (each row's
    # true and predicted class, every method's map) with the classification section at half its cost
    rc, out, err = run(["demo", "--out", tmp_path / "demo", "--n", "2", "--class-model-steps", "20"], capsys)
    assert rc == 0, err
    index = tmp_path / "demo" / "index.html"
    assert str(index.resolve()) in out
    page = index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all(not s.startswith("/") and (index.parent / s).is_file() for s in srcs)
    assert {"classification.png", "class_models.png", "clever_hans.png"} <= set(srcs)
    assert any(s.startswith("regression_") for s in srcs)
    assert "failed" not in page
    for name in salience.methods.default_methods(zoo.load_demo("shapes")):  # every method that applies to a CNN
        assert name in page
    # the true and predicted classes of the demo images, as the model says
    model = zoo.load_demo("shapes")
    images, labels, _ = salience.data.shapes(2, seed=10_000)
    pred = model(images).argmax(1)
    names = model.salience_info.class_names
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\w+)</td><td>(\w+)</td>", page)
    assert [(int(r), t_, p) for r, t_, p in rows] == [
        (i + 1, names[int(labels[i])], names[int(pred[i])]) for i in range(2)
    ]
    # five class-model tiles side by side, enlarged to 160 pixels
    assert np.asarray(Image.open(tmp_path / "demo" / "class_models.png")).shape == (160, 5 * 160 + 4 * 4, 3)


def test_report_escapes_text_and_links_relatively(tmp_path):
    (tmp_path / "img").mkdir()
    pic = tmp_path / "img" / "a b.png"
    pic.write_bytes(b"")
    rep = Report("<script>alert(1)</script>")
    rep.heading("a & b").paragraph("x < y").table(["h<"], [["<td>"]]).figure(pic, 'say "hi"').raw("<hr>")
    path = rep.write(tmp_path / "site" / "index.html")
    page = path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a &amp; b" in page and "x &lt; y" in page and "&lt;td&gt;" in page and "<hr>" in page
    assert 'src="../img/a b.png"' in page and 'alt="say &quot;hi&quot;"' in page


def test_real_command_lines(tmp_path, pics):
    """Two real processes: the installed entry point's exit codes and its stderr on bad input."""
    paths, _ = pics
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(
        [sys.executable, "-m", "salience", "explain", str(paths[0]), str(tmp_path / "bad.jpg"), "-m", "demo:shapes",
         "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "bad.jpg" in p.stderr
    assert (tmp_path / "o" / "img0.png").exists() and "img0.png: " in p.stdout
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(paths[0]), "-m", "demo:nope"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("salience: error: unknown demo model 'nope'")
    assert "Traceback" not in p.stderr


def test_unsupported_activations_option(tmp_path, pics, capsys):
    """Guided backprop on a SiLU model is refused by default, with the option named; --unsupported warn runs."""
    pytest.importorskip("torchvision")
    paths, _ = pics
    args = ["explain", paths[0], "--model", "torchvision:efficientnet_b0", "--weights", "random",
            "--method", "guided_backprop,vanilla", "--out", tmp_path / "o"]
    rc, out, err = run(args, capsys)
    assert rc == 1  # vanilla's results are written, guided backprop's are not
    line = next(ln for ln in err.splitlines() if "guided_backprop failed" in ln)
    assert "pass --unsupported warn (or ignore)" in line and "unsupported='warn'" not in line  # the flag, once
    written = [p.name for p in (tmp_path / "o").glob("*.npy")]
    assert len(written) == 1 and written[0].startswith("img0_vanilla_top1-class")
    with pytest.warns(UserWarning, match=r"silu x\d+"):
        rc, out, err = run(args + ["--unsupported", "warn"], capsys)
    assert rc == 0, err
    assert len(list((tmp_path / "o").glob("*guided_backprop*.npy"))) == 1


@pytest.mark.parametrize("command", [["explain", "IMG", "-o", "OUT"], ["explain", "DIR", "-o", "OUT"],
                                     ["list"], ["visualize", "--target", "1", "--steps", "1", "-o", "OUT/c.png"]])
def test_device_auto_works_and_a_missing_device_is_one_line(tmp_path, pics, capsys, monkeypatch, command):
    """Every command's --device says 'cpu, cuda, cuda:N or auto': auto runs on the CPU when there is no
    CUDA, and a device that is not there or not a device is one line with exit 2, never an internal error."""
    paths, _ = pics
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(paths[0].read_bytes())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def argv(device: str, out: str) -> list:
        swap = {"IMG": paths[0], "DIR": folder, "OUT": tmp_path / out}
        # OUT/c.png too: a path left relative would be written into the directory the tests run from
        args = [swap.get(a, str(tmp_path / out / a[4:]) if a.startswith("OUT/") else a) for a in command[1:]]
        return [command[0], *args, "-m", "demo:shapes", "--device", device]

    rc, out, err = run(argv("auto", "auto"), capsys)
    assert rc == 0, err
    assert "Traceback" not in err and "unexpected" not in err
    for device, words in [("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"), ("tpu", "not a device")]:
        rc, out, err = run(argv(device, device), capsys)
        assert rc == 2, err
        assert err.startswith(f"salience: error: device {device!r}: {words}") and err.count("\n") == 1
        assert not (tmp_path / device).exists()  # refused before anything is written


def test_list_describes_a_torchscript_model(tmp_path, capsys):
    """``salience list --model FILE.pt`` on a TorchScript file (which explain runs) describes it instead of
    failing: the Grad-CAM line says why there is no layer; exit 0."""
    torch.jit.trace(zoo.load_demo("shapes"), torch.rand(1, 3, 64, 64)).save(str(tmp_path / "m.pt"))
    rc, out, err = run(["list", "--model", tmp_path / "m.pt", "--size", "64"], capsys)
    assert rc == 0, err
    assert f"model {tmp_path / 'm.pt'} (3 x 64 x 64 input):" in out
    line = next(ln for ln in out.splitlines() if "Grad-CAM layer" in ln)
    assert "none" in line and "TorchScript" in line
    applies = next(ln for ln in out.splitlines() if "methods that apply" in ln)
    assert "vanilla" in applies and "gradcam" not in applies and "guided_backprop" not in applies


def test_warnings_are_one_line_notes_without_source_lines(tmp_path, pics):
    """A library warning during a command (here from the user's build function; in practice e.g. an
    hf: model without its processor config) reaches the terminal as one ``salience: warning:`` line,
    not Python's ``path.py:LINE: UserWarning`` followed by a line of salience's source."""
    paths, _ = pics
    (tmp_path / "nets.py").write_text(
        "import warnings\nimport torch.nn as nn\n"
        "def build():\n"
        "    warnings.warn('no preprocessing config; images go in as they are')\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(paths[0]), "-m", "python:nets.py:build",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "salience: warning: no preprocessing config; images go in as they are\n"


def test_visualize_refuses_an_out_file_that_is_not_png(tmp_path, capsys):
    """visualize writes PNG: an --out named .jpg got PNG bytes under a JPEG name; now one line, exit 2."""
    rc, out, err = run(["visualize", "-m", "demo:shapes", "--target", "square", "--steps", "1",
                        "-o", tmp_path / "c.jpg"], capsys)
    assert rc == 2 and err.startswith("salience: error: --out") and ".png" in err and err.count("\n") == 1
    assert not (tmp_path / "c.jpg").exists()


def test_batch_size_is_the_dataset_runs_batch_too(tmp_path, pics, capsys, monkeypatch):
    """``--batch-size`` was taken by plain explains and silently ignored by a dataset run (only
    ``--batch`` counted there, and the out-of-memory hint named ``--batch-size``): now both flags
    are one option, and two different values are refused."""
    from salience.cli import explain_many

    paths, _ = pics
    seen = {}

    def fake_explain_dataset(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # the wiring is what is checked here

    monkeypatch.setattr(explain_many, "explain_dataset", fake_explain_dataset)
    with pytest.raises(SystemExit):
        main(["explain", str(paths[0].parent), "-m", "demo:shapes", "--batch-size", "2", "-o", str(tmp_path / "r")])
    assert seen["batch_size"] == 2
    rc, _, err = run(["explain", *paths, "-m", "demo:shapes", "--batch", "2", "--batch-size", "3", "-o",
                      tmp_path / "o"], capsys)
    assert rc == 2 and "--batch 2 and --batch-size 3 are the same option" in err
    rc, _, err = run(["explain", *paths, "-m", "demo:shapes", "--batch", "1", "--progress", "-o", tmp_path / "p"], capsys)
    assert rc == 0 and re.search(r"explain 100%\|#+\| 3/3", err)  # --batch on image files: passes of 1


def test_smoothgrad_on_a_few_files_gives_each_file_its_dataset_run_seed(tmp_path, pics, shapes_model, capsys):
    """``salience explain a.png b.png --method smoothgrad``: file i (its place on the command line,
    a file that cannot be read counted too, as a dataset run numbers it) gets the noise of the seed
    ``(S * 1_000_003 + i) % 2**63``, so its map is smoothgrad on that file alone with that seed,
    whichever files are named with it (one generator drew the noise of the whole batch), and the
    map a dataset run of the same files stores."""
    from salience.runs.job import image_seed

    paths, _ = pics
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    named = [paths[0], broken, paths[1], paths[2]]
    opts = ["--model", "demo:shapes", "--method", "smoothgrad", "--samples", "3", "--noise", "0.3", "--seed", "7"]
    rc, _, err = run(["explain", *named, *opts, "--out", tmp_path / "few", "--batch-size", "2"], capsys)
    assert rc == 1, err  # the broken file
    rc, _, err = run(["explain", paths[2], *opts, "--out", tmp_path / "one"], capsys)
    assert rc == 0, err
    for i, p in enumerate(named):
        if p == broken:
            continue
        alone = salience.smoothgrad(shapes_model, _input(shapes_model, p), samples=3, noise=0.3,
                                    seed=image_seed(7, i))[0].numpy()
        (stored,) = (tmp_path / "few").glob(f"{p.stem}_smoothgrad_*.npy")
        np.testing.assert_allclose(np.load(stored), alone, rtol=1e-5, atol=1e-7)
    # the last file named alone is image 0 of its command: seed 7 * 1_000_003
    (stored,) = (tmp_path / "one").glob(f"{paths[2].stem}_smoothgrad_*.npy")
    alone = salience.smoothgrad(shapes_model, _input(shapes_model, paths[2]), samples=3, noise=0.3,
                                seed=image_seed(7, 0))[0].numpy()
    np.testing.assert_allclose(np.load(stored), alone, rtol=1e-5, atol=1e-7)
    # the dataset run of the same files stores the same maps
    rc, _, err = run(["explain", *named, *opts, "--out", tmp_path / "run", "--dataset", "--workers", "0",
                      "--map-dtype", "float32"], capsys)
    assert rc == 1, err
    ds = salience.open_run(tmp_path / "run")
    for i, p in enumerate(named):
        if p != broken:
            (stored,) = (tmp_path / "few").glob(f"{p.stem}_smoothgrad_*.npy")
            np.testing.assert_allclose(ds.map(i, "smoothgrad"), np.load(stored), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["vanilla", "gradcam", "rise"])
def test_a_model_of_other_channels_than_the_images_is_one_line(tmp_path, pics, capsys, method):
    """A model whose stem takes 1 channel given RGB images (its info says nothing of gray): exit 2 with
    one line naming the input's shape, the channels the model takes and the conversion, not an
    "unexpected RuntimeError: Given groups=1, weight of size [4, 1, 3, 3] ..."."""
    paths, _ = pics
    nets = tmp_path / "gray_nets.py"
    nets.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    rc, out, err = run(["explain", paths[0], "-m", f"python:{nets}:build", "--method", method,
                        *(["--rise-masks", "4"] if method == "rise" else []), "--out", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 2, (out, err)
    assert err.startswith("salience: error: the model cannot take") and err.count("\n") == 1, err
    assert ", 3, " in err and "takes 1 channel;" in err and "x.mean(1, keepdim=True)" in err, err
    assert "(command line: --channels 1)" in err, err


def test_a_token_model_without_a_patch_conv_is_told_the_flags(tmp_path, pics, capsys):
    """A ViT whose patches are embedded without a convolution (no grid to read): the command line's
    error names its flags, ``--grid H,W --prefix-tokens K`` (it named only the Python keywords
    ``grid=(h, w)`` and ``prefix_tokens=k``); with them the stored map equals ``salience.gradcam`` with
    ``grid=(3, 5)`` on the same input."""
    paths, _ = pics
    nets = tmp_path / "vit_nets.py"
    nets.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny_vit import TinyViT\n"
        "def build():\n"
        "    torch.manual_seed(3)\n"
        "    return TinyViT(size=(24, 40), prefix=1, conv=False).eval()\n")
    common = ["explain", paths[0], "-m", f"python:{nets}:build", "--size", "24,40", "--method", "gradcam",
              "--target", "0", "--no-progress"]
    rc, out, err = run([*common, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.startswith("salience: method gradcam failed: the CAM layer"), (out, err)
    assert "(command line: --grid H,W --prefix-tokens K)" in err, err
    rc, out, err = run([*common, "--grid", "3,5", "--prefix-tokens", "1", "--out", tmp_path / "p"], capsys)
    assert rc == 0, (out, err)
    (stored,) = (tmp_path / "p").glob("*_gradcam_*.npy")
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_vit import TinyViT

    torch.manual_seed(3)
    model = TinyViT(size=(24, 40), prefix=1, conv=False).eval()
    x = resize_crop(load_image(paths[0]), ModelInfo(name="vit", input_size=(24, 40)))[None]
    want = salience.gradcam(model, x, 0, grid=(3, 5), prefix_tokens=1)[0].numpy()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(np.load(stored), want, rtol=1e-4, atol=1e-6)


def test_channels_option_feeds_a_gray_model_its_luma(tmp_path, pics, capsys):
    """``--channels 1``: a model with a one-channel stem and no info of its own (``python:``) is given
    each image's ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``; its map equals ``salience.vanilla`` on
    that luma image computed here by hand. A channels value other than 1 or 3 is one line, exit 2."""
    paths, _ = pics
    nets = tmp_path / "gray_nets2.py"
    nets.write_text(
        "import torch, torch.nn as nn\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    rc, out, err = run(["explain", paths[0], "-m", f"python:{nets}:build", "--channels", "1", "--size", "16",
                        "--target", "1", "--out", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 0, (out, err)
    (stored,) = (tmp_path / "o").glob("*_vanilla_*.npy")
    rgb = resize_crop(load_image(paths[0]), ModelInfo(name="rgb", input_size=(16, 16)))  # (3, 16, 16), as RGB models get
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)[None, None]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    np.testing.assert_allclose(np.load(stored), salience.vanilla(model, luma, 1)[0].numpy(), rtol=1e-4, atol=1e-6)
    for bad in ("2", "gray"):
        rc, _, err = run(["explain", paths[0], "-m", f"python:{nets}:build", "--channels", bad, "--out", tmp_path / "p",
                          "--no-progress"], capsys)
        assert rc == 2 and "--channels must be 1 (gray) or 3 (RGB)" in err and err.count("\n") == 1, err
    for bad in (2, "1", True):
        with pytest.raises(salience.SalienceError, match="channels must be 1 \\(gray\\) or 3 \\(RGB\\)"):
            with_preprocessing(ModelInfo(name="m"), channels=bad)


def test_an_untrustworthy_integrated_gradients_map_is_one_warning_line(tmp_path, pics):
    """``f = tanh(1e4 sum(x))`` from the black baseline: the trapezoid weighs the baseline's gradient
    1e4 by 1/62, far off f(x) - f(x') = +-1. The command says so once, one ``salience: warning:`` line
    naming the completeness gap and what to do, and still writes the map (exit 0)."""
    paths, _ = pics
    nets = tmp_path / "spike_nets.py"
    nets.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from nets import TanhSpike\n"
        "def build():\n"
        "    return TanhSpike(1.0, 1e4)\n")
    # a process of its own, as the terminal sees it (in this one pytest records the warnings instead)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(paths[0]), "--model", f"python:{nets}:build",
                        "--method", "integrated_gradients", "--out", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    said = [line for line in (p.stdout + p.stderr).splitlines() if "warning" in line.lower()]
    assert len(said) == 1, p.stdout + p.stderr
    assert list((tmp_path / "o").rglob("*.npy")) or list((tmp_path / "o").rglob("*.png")), "no map written"
    assert said[0].startswith("salience: warning: CompletenessWarning: integrated_gradients: the attributions do "
                              "not sum to f(x) - f(x')"), said
    assert "relative gap" in said[0] and "--steps 256" in said[0]
