"""Every script in examples/ runs (so none rots) and computes what it says."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import salience
from salience import targets

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str):
    """The example's ``main`` (loaded without running it as a script)."""
    return runpy.run_path(str(EXAMPLES / name))["main"]


def test_every_example_is_tested():
    tested = {"explain_photo.py", "filter_saliency.py", "regression_targets.py", "compare_methods.py",
              "explain_real_photos.py", "real_model_evidence.py"}  # these two in test_real_model.py (the test extra's model)
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_explain_photo_random_weights(tmp_path, capsys):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)).save(photo)
    torch.manual_seed(0)
    r = example("explain_photo.py")([str(photo), "--arch", "resnet18", "--weights", "random", "--method", "vanilla",
                                     "--out", str(tmp_path / "out")])
    assert r["x"].shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert r["class"] == int(r["model"](r["x"]).argmax())
    saved = np.load(tmp_path / "out" / "photo_vanilla.npy")
    assert saved.shape == (224, 224)
    assert np.allclose(saved, salience.vanilla(r["model"], r["x"], r["class"])[0].numpy(), atol=1e-6)
    assert "explained class" in capsys.readouterr().out


def test_filter_saliency(tmp_path):
    r = example("filter_saliency.py")(["--channel", "3", "--n", "2", "--out", str(tmp_path)])
    assert r["layer"] == r["model"].salience_info.default_layer
    saved = np.load(tmp_path / f"filter_{r['layer']}_3.npy")
    # the map is the input gradient of that filter's mean activation, computed by hand here
    x = r["images"].clone().requires_grad_(True)
    acts = {}
    layer = r["model"].get_submodule(r["layer"])
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        r["model"](x)
    finally:
        h.remove()
    acts["a"][:, 3].mean((1, 2)).sum().backward()
    assert saved.shape == (2, 64, 64)
    assert np.allclose(saved, x.grad.abs().amax(1).numpy(), atol=1e-6)


def test_regression_targets(tmp_path):
    r = example("regression_targets.py")(["--output", "x_position", "--n", "2", "--out", str(tmp_path)])
    assert r["index"] == 1
    inc, dec, keep = (np.load(tmp_path / f"x_position_{m}.npy") for m in ("increase", "decrease", "maintain"))
    assert np.allclose(inc, -dec, atol=1e-7) and np.abs(inc).max() > 0
    assert np.allclose(keep, 1 / (np.abs(inc) + np.finfo(np.float32).eps), rtol=1e-4)
    ref = salience.vanilla(r["model"], r["images"], targets.regression(1, "increase"), reduce=None)
    assert np.allclose(inc, ref.numpy(), atol=1e-7)


def test_compare_methods(tmp_path):
    r = example("compare_methods.py")(["--n", "2", "--out", str(tmp_path)])
    assert set(r["maps"]) == set(salience.METHODS) - salience.methods.ATTENTION_METHODS
    for name in r["maps"]:
        assert (tmp_path / f"{name}.npy").exists() and r["maps"][name].shape == (2, 64, 64)
    ref = salience.vanilla(r["model"], r["images"], r["predicted"])
    assert np.allclose(np.load(tmp_path / "vanilla.npy"), ref.numpy(), atol=1e-7)
