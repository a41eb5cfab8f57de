"""The command line reaches every method option, names classes, and preprocesses as told."""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import METHODS
from salience.cli import main
from salience.cli.options import NOT_FLAGS, keyword_parameters, method_options
from salience.demo import zoo
from salience.loading import load_image, preprocess
from salience.loading.models import MODEL_SPECS


@pytest.fixture(scope="module")
def model():
    return zoo.load_demo("shapes")


@pytest.fixture(scope="module")
def pic(tmp_path_factory):
    """A held-out demo image as a PNG file."""
    images, _, _ = salience.data.shapes(1, seed=10_002)
    p = tmp_path_factory.mktemp("pic") / "img.png"
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(p)
    return p


@pytest.fixture(scope="module")
def wide_pic(tmp_path_factory):
    """A 100 x 70 picture (not square, not the model's size)."""
    images, _, _ = salience.data.shapes(1, seed=10_003)
    arr = (images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    p = tmp_path_factory.mktemp("wide") / "wide.png"
    Image.fromarray(arr).resize((100, 70), Image.BILINEAR).save(p)
    return p


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def explain(pic, out_dir, capsys, *options, model="demo:shapes"):
    rc, out, err = run(["explain", pic, "-m", model, "-o", out_dir, *options], capsys)
    assert rc == 0, err
    return out, json.loads((out_dir / "summary.json").read_text())


def saved_map(out_dir, method, summary, stem="img"):
    c = summary["images"][0]["explained"][0]
    return np.load(out_dir / f"{stem}_{method}_top1-class{c}.npy"), c


def _x(model, pic, info=None):
    return preprocess(load_image(pic), info or model.salience_info).unsqueeze(0)


# --------------------------------------------------------------------------------- options reach the methods


def test_every_method_keyword_is_a_flag():
    options = method_options()
    for name, fn in METHODS.items():
        for p in keyword_parameters(fn):
            assert name in options[p.name].defaults
    assert options["grad_modifier"].flag == "--grad-modifier" and options["method"].flag == "--smooth-method"
    assert not set(NOT_FLAGS) & set(options)


def test_layer_reaches_gradcam(tmp_path, pic, model, capsys):
    _, summary = explain(pic, tmp_path, capsys, "--method", "gradcam,guided_gradcam", "--layer", "features.2")
    got, c = saved_map(tmp_path, "gradcam", summary)
    x = _x(model, pic)
    assert np.allclose(got, salience.gradcam(model, x, c, layer="features.2")[0].numpy(), atol=1e-6)
    assert not np.allclose(got, salience.gradcam(model, x, c)[0].numpy(), atol=1e-4)  # not the default layer
    guided, _ = saved_map(tmp_path, "guided_gradcam", summary)
    assert np.allclose(guided, salience.guided_gradcam(model, x, c, layer="features.2")[0].numpy(), atol=1e-6)
    assert summary["method_options"]["gradcam"] == {"layer": "features.2"}


def test_smoothgrad_options(tmp_path, pic, model, capsys):
    _, summary = explain(pic, tmp_path, capsys, "--method", "smoothgrad", "--samples", "3", "--noise", "0.1",
                         "--seed", "1", "--variant", "squared")
    got, c = saved_map(tmp_path, "smoothgrad", summary)
    # the file named first is image 0 of the command: the dataset runs' seed (1 * 1_000_003 + 0)
    ref = salience.smoothgrad(model, _x(model, pic), c, samples=3, noise=0.1, seed=1_000_003, variant="squared")
    assert np.allclose(got, ref[0].numpy(), atol=1e-6)
    assert summary["method_options"]["smoothgrad"] == {"samples": 3, "noise": 0.1, "seed": 1, "variant": "squared"}


def test_smoothgrad_inner_method_and_its_options(tmp_path, pic, model, capsys):
    _, summary = explain(pic, tmp_path / "g", capsys, "--method", "smoothgrad", "--smooth-method", "guided_backprop",
                         "--samples", "2", "--chunk", "1")
    got, c = saved_map(tmp_path / "g", "smoothgrad", summary)
    x = _x(model, pic)
    ref = salience.smoothgrad(model, x, c, method=salience.guided_backprop, samples=2)
    assert np.allclose(got, ref[0].numpy(), atol=1e-6)
    assert summary["method_options"]["smoothgrad"]["method"] == "guided_backprop"
    _, summary = explain(pic, tmp_path / "c", capsys, "--method", "smoothgrad", "--smooth-method", "gradcam",
                         "--layer", "features.4", "--samples", "2", "--seed", "3")
    got, c = saved_map(tmp_path / "c", "smoothgrad", summary)
    ref = salience.smoothgrad(model, x, c, method=salience.gradcam, layer="features.4", samples=2,
                              seed=3_000_009)  # image 0 of the command: 3 * 1_000_003 + 0
    assert np.allclose(got, ref[0].numpy(), atol=1e-6)


def test_integrated_gradients_options(tmp_path, pic, model, capsys):
    _, summary = explain(pic, tmp_path, capsys, "--method", "integrated_gradients", "--steps", "5",
                         "--baseline", "blur", "--rule", "middle", "--max-memory", "2GiB")
    got, c = saved_map(tmp_path, "integrated_gradients", summary)
    ref = salience.integrated_gradients(model, _x(model, pic), c, steps=5, baseline="blur", rule="middle")
    assert np.allclose(got, ref[0].numpy(), atol=1e-6)
    _, summary = explain(pic, tmp_path / "n", capsys, "--method", "integrated_gradients", "--steps", "4",
                         "--baseline", "0.5")
    got, c = saved_map(tmp_path / "n", "integrated_gradients", summary)
    ref = salience.integrated_gradients(model, _x(model, pic), c, steps=4, baseline=0.5)
    assert np.allclose(got, ref[0].numpy(), atol=1e-6)


def test_reduce_and_grad_modifier(tmp_path, pic, model, capsys):
    _, summary = explain(pic, tmp_path / "r", capsys, "--reduce", "colored", "--method", "vanilla,input_x_gradient")
    got, c = saved_map(tmp_path / "r", "vanilla", summary)
    x = _x(model, pic)
    assert got.shape == (3, 64, 64)
    assert np.allclose(got, salience.vanilla(model, x, c, reduce="colored")[0].numpy(), atol=1e-6)
    assert saved_map(tmp_path / "r", "input_x_gradient", summary)[0].shape == (3, 64, 64)
    _, summary = explain(pic, tmp_path / "m", capsys, "--grad-modifier", "negate", "--reduce", "max")
    got, c = saved_map(tmp_path / "m", "vanilla", summary)
    assert np.allclose(got, salience.vanilla(model, x, c, grad_modifier="negate", reduce="max")[0].numpy(), atol=1e-6)
    _, summary = explain(pic, tmp_path / "none", capsys, "--reduce", "none")
    assert saved_map(tmp_path / "none", "vanilla", summary)[0].shape == (3, 64, 64)


@pytest.mark.parametrize(
    "options, words",
    [
        (["--method", "smoothgrad", "--samples", "0"], "--samples: samples must be an int >= 1"),
        (["--method", "smoothgrad", "--noise", "-1"], "--noise: noise must be a finite number >= 0"),
        (["--method", "smoothgrad", "--noise", "much"], "--noise must be a number, got 'much'"),
        (["--reduce", "nope"], "--reduce must be one of max_abs"),
        (["--grad-modifier", "nope"], "--grad-modifier must be one of absolute"),
        (["--method", "gradcam", "--layer", "nope"], "--layer: the model has no layer named 'nope'"),
        (["--method", "smoothgrad", "--max-memory", "lots"], "--max-memory: cannot read max_memory 'lots'"),
        (["--method", "integrated_gradients", "--steps", "x"], "--steps must be an int, got 'x'"),
        (["--method", "integrated_gradients", "--steps", "0"], "--steps: steps must be an int >= 1"),
        (["--method", "integrated_gradients", "--rule", "nope"], "--rule: unknown rule 'nope'"),
        (["--method", "integrated_gradients", "--baseline", "grey"], "--baseline: unknown baseline 'grey'"),
        (["--method", "smoothgrad", "--smooth-method", "vanila"], "--smooth-method must be one of vanilla"),
        (["--samples", "3"], "--samples is an option of smoothgrad; not of vanilla"),
        (["--method", "vanilla,gradcam", "--steps", "3"], "--steps is an option of integrated_gradients"),
        (["--method", "smoothgrad", "--unsupported", "warn"], "--unsupported is an option of guided_backprop"),
        (["--smooth-method", "gradcam"], "--smooth-method is an option of smoothgrad"),
    ],
)
@pytest.mark.parametrize("dataset", [[], ["--dataset", "--workers", "0"]], ids=["files", "dataset-run"])
def test_bad_option_values_are_one_line_exit_2(tmp_path, pic, capsys, options, words, dataset):
    """Also in a dataset run (its values were checked by the run itself, after its folder was made, the
    line without the flag)."""
    rc, out, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *options, *dataset], capsys)
    assert rc == 2, err
    assert err.startswith("salience: error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "o").exists()  # nothing explained, nothing written


def test_bad_values_are_caught_before_any_method_runs(tmp_path, pic, capsys, monkeypatch):
    calls = []
    vanilla = METHODS["vanilla"]

    def spy(model, x, target=None, *, reduce="max_abs"):
        """vanilla, counted."""
        out = vanilla(model, x, target, reduce=reduce)
        calls.append(x.shape[0])
        return out

    monkeypatch.setitem(METHODS, "spy", spy)
    for options in (["--method", "spy,gradcam", "--layer", "nope"], ["--method", "spy,smoothgrad", "--samples", "0"],
                    ["--method", "spy,integrated_gradients", "--steps", "0"]):
        rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path, *options], capsys)
        assert rc == 2 and err.count("\n") == 1, err
    assert calls == []
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path, "--method", "spy", "--reduce", "l2"], capsys)
    assert rc == 0 and calls == [1], err


# --------------------------------------------------------------------------------- class names


@pytest.mark.parametrize("kind", ["lines", "json_list", "json_dict"])
def test_labels_name_the_classes(tmp_path, pic, capsys, kind):
    names = ["Round", "Box", "Tri", "Plus", "Twinkle"]
    path = tmp_path / "labels.txt"
    if kind == "lines":
        path.write_text("\n".join(names) + "\n\n")
    elif kind == "json_list":
        path.write_text(json.dumps(names))
    else:
        path.write_text(json.dumps({str(i): n for i, n in reversed(list(enumerate(names)))}))
    out, summary = explain(pic, tmp_path / "o", capsys, "--labels", path, "--target", "twinkle")
    assert "[explained: Twinkle (4)]" in out
    entry = summary["images"][0]
    assert entry["explained_names"] == ["Twinkle"]
    assert {p["name"] for p in entry["predicted"]} <= set(names)
    assert summary["class_names"] == f"labels: {path}"


def test_labels_of_the_wrong_count_or_form(tmp_path, pic, capsys):
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "gap.json").write_text('{"0": "a", "2": "c"}')
    for f, words in (("three.txt", "--labels: 3 class names for a model with 5 outputs"),
                     ("gap.json", "--labels: labels file"), ("missing.txt", "--labels: labels file")):
        rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", "--labels", tmp_path / f], capsys)
        assert rc == 2 and err.count("\n") == 1 and words in err, err


def test_torchscript_model_with_1000_outputs_gets_imagenet_names(tmp_path, pic, capsys):
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), str(tmp_path / "tiny.pt"))
    out, summary = explain(pic, tmp_path / "o", capsys, "--target", "285", model=tmp_path / "tiny.pt")
    assert "[explained: Egyptian cat (285)]" in out
    assert summary["images"][0]["explained_names"] == ["Egyptian cat"]
    assert summary["class_names"] == "imagenet-1k"
    out, _ = explain(pic, tmp_path / "o2", capsys, "--target", "egyptian cat", model=tmp_path / "tiny.pt")
    assert "(285)]" in out


# --------------------------------------------------------------------------------- preprocessing


def _check_input(tmp_path, capsys, model, pic, options, **info_values):
    """The maps of ``options`` are vanilla's on ``preprocess`` with a ModelInfo of ``info_values``."""
    _, summary = explain(pic, tmp_path, capsys, *options)
    info = dataclasses.replace(model.salience_info, **info_values)
    x = _x(model, pic, info)
    got, c = saved_map(tmp_path, "vanilla", summary, stem=pic.stem)
    assert got.shape == tuple(x.shape[-2:])
    assert np.allclose(got, salience.vanilla(model, x, c)[0].numpy(), atol=1e-6)
    return summary


def test_size_stretches_to_the_input_size(tmp_path, wide_pic, model, capsys):
    summary = _check_input(tmp_path, capsys, model, wide_pic, ["--size", "40,56"], input_size=(40, 56))
    assert summary["preprocessing"] == {"mode": "stretch", "input_size": [40, 56], "resize": None, "crop": None,
                                        "mean": None, "std": None, "channels": 3}
    assert summary["model_spec"] == "demo:shapes"


def test_resize_and_crop_with_mean_and_std(tmp_path, wide_pic, model, capsys):
    summary = _check_input(tmp_path, capsys, model, wide_pic,
                           ["--resize", "60", "--crop", "48", "--mean", "0.5,0.4,0.3", "--std", "0.25"],
                           input_size=(48, 48), resize=60, mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))
    assert summary["preprocessing"]["mode"] == "crop" and summary["preprocessing"]["crop"] == [48, 48]
    assert summary["preprocessing"]["resize"] == 60 and summary["preprocessing"]["mean"] == [0.5, 0.4, 0.3]


def test_resize_mode_none_and_crop(tmp_path, wide_pic, model, capsys):
    _check_input(tmp_path / "none", capsys, model, wide_pic, ["--resize-mode", "none"], input_size=None)
    # crop mode on a model without a resize: the shorter side goes to the crop size
    _check_input(tmp_path / "crop", capsys, model, wide_pic, ["--resize-mode", "crop"], resize=64)


@pytest.mark.parametrize(
    "options, words",
    [
        (["--size", "0"], "--size must be H or H,W in pixels (whole numbers >= 1)"),  # read before the model loads
        (["--size", "big"], "--size must be H or H,W in pixels"),
        (["--size", "32", "--crop", "32"], "--size and --crop both"),
        (["--mean", "1,2"], "--mean: mean needs 1 or 3 values"),
        (["--std", "0"], "--std: std values must be finite and > 0"),
        (["--resize-mode", "squash"], "--resize-mode: resize_mode must be one of crop, stretch, none"),
        (["--resize-mode", "stretch", "--resize", "70"], "--resize: resize"),
        (["--resize-mode", "none", "--size", "32"], "--resize-mode: resize_mode 'none'"),
    ],
)
def test_bad_preprocessing_is_one_line_exit_2(tmp_path, pic, capsys, options, words):
    rc, _, err = run(["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *options], capsys)
    assert rc == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- list and help


def test_list_method_shows_its_options(capsys):
    rc, out, _ = run(["list", "gradcam"], capsys)
    assert rc == 0 and out.startswith("gradcam: Grad-CAM")
    assert "--layer NAME" in out and "layer: Optional[LayerSpec] = none" in out
    assert "--upsample/--no-upsample" in out
    rc, out, _ = run(["list", "smoothgrad"], capsys)
    assert "--samples N" in out and "samples: int = 50" in out and "--smooth-method NAME" in out
    rc, _, err = run(["list", "gradcm"], capsys)
    assert rc == 2 and "did you mean 'gradcam'" in err


def test_list_and_help_name_every_model_spec(capsys):
    rc, listed, _ = run(["list"], capsys)
    assert rc == 0
    rc, helped, _ = run(["explain", "--help"], capsys)
    assert rc == 0
    for spec, _ in MODEL_SPECS:
        assert spec in listed and spec in helped
    for opt in method_options().values():
        assert opt.flag in helped
    for flag in ("--size", "--crop", "--resize", "--resize-mode", "--mean", "--std", "--labels"):
        assert flag in helped
