"""Every script in examples/ runs (so none rots) and computes what it says."""
from __future__ import annotations

import math
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
              "explain_real_photos.py", "real_model_evidence.py",  # these two in test_real_model.py (the test extra's model)
              "explain_vit.py"}
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


VIT_METHODS = ("attention_rollout", "transformer_attribution", "gradcam", "vanilla", "smoothgrad",
               "integrated_gradients")


def test_explain_vit_draws_its_grid(tmp_path):
    r = example("explain_vit.py")(["--n", "2", "--out", str(tmp_path)])
    assert list(r["maps"]) == [*VIT_METHODS, "random"]
    model, x, predicted = r["model"], r["images"], r["predicted"]
    assert model.salience_info.name == "demo:shapes-vit" and x.shape == (2, 3, 64, 64)
    for name in r["maps"]:
        assert np.load(tmp_path / f"{name}.npy").shape == (2, 64, 64)
    # the maps are the methods' own, Grad-CAM at the ViT's default token layer
    assert np.allclose(np.load(tmp_path / "transformer_attribution.npy"),
                       salience.transformer_attribution(model, x, predicted).numpy(), atol=1e-6)
    assert np.allclose(np.load(tmp_path / "gradcam.npy"),
                       salience.gradcam(model, x, predicted, layer="blocks.3.ln_1").numpy(), atol=1e-6)
    # the figure: 2 rows (one per image) of 9 tiles of 128 px (image, mask, 6 methods, random), 4 px apart,
    # each row below its own line of titles
    pic = np.asarray(Image.open(r["figure"]).convert("RGB"))
    tile, pad, columns = 128, 4, 2 + len(VIT_METHODS) + 1
    assert pic.shape[1] == columns * tile + (columns + 1) * pad and pic.shape[0] % 2 == 0
    row = pic.shape[0] // 2
    header = row - tile - 2 * pad
    assert 8 <= header <= 30, header  # one line of text
    for i in range(2):
        y = i * row + header + pad
        image_tile = pic[y:y + tile, pad:pad + tile]
        assert np.array_equal(image_tile, salience.viz.to_uint8_image(x[i]).repeat(2, 0).repeat(2, 1))
        mask_tile = pic[y:y + tile, 2 * pad + tile:2 * pad + 2 * tile]
        mask = r["masks"][i].numpy().repeat(2, 0).repeat(2, 1)
        inside, outside = np.unique(mask_tile[mask], axis=0), np.unique(mask_tile[~mask], axis=0)
        assert len(inside) == len(outside) == 1 and not np.array_equal(inside, outside)


def test_explain_vit_transformer_maps_put_more_energy_on_the_shape_than_random_maps(tmp_path):
    """On the example's held-out images, each transformer map's energy in mask beats a random map's of the same
    image (whose energy is about the mask's area fraction): the mean paired difference is over two of its standard
    errors over these images (against the masks flipped upside down and left-right, the misplaced ones, it is 0.4,
    0.7 and 1.3 standard errors: the bar tells them apart). Their pointing game against random maps:
    tests/test_demo_vit.py::test_maps_point_at_the_shape (64 fresh images; not repeated here)."""
    n = 16  # the held-out images of docs/demo-models.md's table (energy in mask 0.163, 0.293, 0.322; random 0.081)
    methods = ("attention_rollout", "transformer_attribution", "gradcam")
    r = example("explain_vit.py")(["--n", str(n), *(f"--method={m}" for m in methods), "--out", str(tmp_path)])
    random_energy = r["scores"]["random"][1]
    for name in methods:
        diff = r["scores"][name][1] - random_energy
        diff = diff[~diff.isnan()]  # a map with no positive mass has no energy (Grad-CAM, 1 image of 16)
        assert len(diff) >= n - 2, name
        assert diff.mean() > 2 * diff.std() / math.sqrt(len(diff)), (name, diff)
