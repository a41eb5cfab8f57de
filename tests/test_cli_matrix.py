"""Every model kind x every method x the target options of ``salience explain``: each combination
works, or the method says why not in one line (a SalienceError), never an unexpected error.

Model kinds: the demo classifier and regression model, torchvision (random weights), TorchScript,
Keras 3 and ONNX files made here from small models. One CLI run per kind and option explains
every method at once; the test then looks at each method's maps and messages.
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import salience  # noqa: E402
from salience.cli import main  # noqa: E402
from salience.render import viz  # noqa: E402

METHODS = list(salience.METHODS)
# What may fail, with a SalienceError that says what to do (never silently, never unexpectedly):
#  guided methods on models whose activations the rule is not defined for, or that it cannot see
#  inside (TorchScript); Grad-CAM and the other CAMs need hooks on an nn.Module (not TorchScript).
#  The attention methods need a transformer: on these CNNs they say so.
ATTENTION = set(salience.methods.ATTENTION_METHODS)
MAY_FAIL = {
    "torchscript": {"guided_backprop", "deconvnet", "gradcam", "guided_gradcam", "gradcam_plus_plus", "hirescam",
                    "xgradcam", "layercam", "eigencam", "scorecam", "ablationcam"} | ATTENTION,
}
# The many-pass methods with few passes: the matrix checks that they run, not their quality
# (occlusion's window of 64 pixels: 1 window on the 64 x 64 demo images, a few on squeezenet's 96 x 96).
FEW_PASSES = ["--rise-masks", "8", "--window", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model files of each kind, and two demo images."""
    d = tmp_path_factory.mktemp("matrix")
    images, _, _ = salience.data.shapes(2, seed=123)
    paths = []
    for i, img in enumerate(images):
        p = d / f"img{i}.png"
        viz.save_png(p, viz.to_uint8_image(img))
        paths.append(str(p))
    shapes = salience.zoo.load_demo("shapes").eval()
    ts = d / "shapes.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(shapes), str(ts))
    out = {"images": paths, "torchscript": str(ts)}
    import onnx2torch  # noqa: F401 - in the test extra: the ONNX kind must be tested, not skipped

    onnx = d / "shapes.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(shapes, torch.rand(1, 3, 64, 64), str(onnx), dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    out["onnx"] = str(onnx)
    import keras

    inp = keras.Input((64, 64, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    kpath = d / "net.keras"
    keras.Model(inp, keras.layers.Dense(5, name="head")(h)).save(str(kpath))
    out["keras"] = str(kpath)
    return out


KINDS = {
    "demo": ["-m", "demo:shapes"],
    # Score-CAM and Ablation-CAM run a pass per channel of the CAM layer: a layer of 16 channels
    # (the default layer has 512) keeps this run quick.
    # --size 96: the model kind's loading, layers and methods are checked, not its default 224 x 224 input
    "torchvision": ["-m", "torchvision:squeezenet1_1", "--weights", "random", "--layer", "features.3.squeeze",
                    "--size", "96"],
    "torchscript": None,
    "keras": None,
    "onnx": None,
}
OPTIONS = {"top": ["--top", "2"], "target": ["--target", "1"]}


def _run(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _check(code, err, out_dir, expect_fail, n_targets=1):
    assert "unexpected" not in err, err
    assert code in (0, 1), err
    failed = {m for m in METHODS if f"method {m} failed" in err}
    assert failed <= set(expect_fail), f"methods failed that must work: {failed - set(expect_fail)}\n{err}"
    for line in err.splitlines():
        if "failed:" in line:
            assert len(line) > 40, line  # a message that says something
    for m in METHODS:
        longer = [o for o in METHODS if o.startswith(m + "_")]  # gradcam_plus_plus's files are not gradcam's
        npys = sorted(p for p in out_dir.glob(f"img0_{m}_*.npy") if not any(p.name.startswith(f"img0_{o}_") for o in longer))
        if m in failed:
            assert not npys
        else:
            assert len(npys) == n_targets, (m, npys)
            assert np.isfinite(np.load(npys[0])).all()
    assert (code == 0) == (not failed)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_method_on_every_model_kind(kind, option, files, tmp_path, capsys):
    model = KINDS[kind] or ["-m", files[kind]]
    out_dir = tmp_path / "out"
    argv = ["explain", *files["images"], *model, "--method", ",".join(METHODS), *OPTIONS[option], *FEW_PASSES,
            "--out", str(out_dir), "--no-progress"]
    code, out, err = _run(capsys, argv)
    _check(code, err, out_dir, MAY_FAIL.get(kind, ATTENTION), n_targets=2 if option == "top" else 1)
    assert sum(line.startswith(tuple(files["images"])) for line in out.splitlines()) == 2  # a line per image


@pytest.mark.parametrize("mode", ["increase", "decrease", "maintain"])
def test_every_method_on_the_regression_model(mode, files, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = ["explain", *files["images"], "-m", "demo:shapes-regression", "--target", "x_position", "--mode", mode,
            "--method", ",".join(METHODS), *FEW_PASSES, "--out", str(out_dir), "--no-progress"]
    code, out, err = _run(capsys, argv)
    _check(code, err, out_dir, ATTENTION)


def test_torchscript_with_top_k_runs_the_gradient_methods(files, tmp_path, capsys):
    """The crash of the issue: --top on a TorchScript model."""
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, ["explain", *files["images"], "-m", files["torchscript"], "--method",
                                   "vanilla,smoothgrad,integrated_gradients", "--top", "2", "--out", str(out_dir)])
    assert code == 0, err
    assert len(list(out_dir.glob("*.npy"))) == 2 * 3 * 2
