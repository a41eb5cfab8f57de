"""The shipped demo models: they load, they are as good as their metadata says, and they retrain."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from salience import SalienceError
from salience.demo import data, train, zoo
from salience._core.info import model_info

FRESH_SEED = 20_000  # neither the training seed (0) nor the held-out seed (10_000)


@pytest.fixture(scope="module")
def fresh() -> dict:
    return {c: data.shapes_batch(500, FRESH_SEED, cue=c) for c in (None, "train", "moved")}


def _predict(model, images):
    with torch.no_grad():
        return model(images)


def test_weights_ship_small_and_complete():
    folder = resources.files("salience.demo").joinpath("_weights")
    total = 0
    for name in zoo.DEMOS:
        pt = folder.joinpath(f"{name}.pt").read_bytes()
        assert len(pt) < 1.5e6
        total += len(pt)
        meta = json.loads(folder.joinpath(f"{name}.json").read_text())
        for key in ("held_out", "seed", "train_command", "n_train", "epochs", "date", "arch"):
            assert key in meta, (name, key)
        assert meta["train_command"].startswith(f"python -m salience.demo.train {name}")
    assert total < 5e6


def test_load_demo_contract():
    model = zoo.load_demo("shapes")
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    info = model_info(model)
    assert info.name == "demo:shapes" and info.input_size == (64, 64)
    assert info.class_names == data.CLASSES and info.task == "classification"
    layer = model.get_submodule(info.default_layer)
    assert isinstance(layer, zoo.ConvBlock) and layer is model.features[-1]
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    reg = model_info(zoo.load_demo("shapes-regression"))
    assert reg.class_names == ("size", "x_position") and reg.task == "regression"
    assert model_info(zoo.load_demo("shapes-cue")).name == "demo:shapes-cue"


def test_unknown_demo():
    with pytest.raises(SalienceError, match="shapes-regression") as e:
        zoo.load_demo("cats")
    assert "'cats'" in str(e.value)


def test_classifier_accuracy(fresh):
    model = zoo.load_demo("shapes")
    stated = zoo.demo_metadata("shapes")["held_out"]["accuracy"]
    assert stated >= 0.97
    b = fresh[None]
    acc = (_predict(model, b.images).argmax(1) == b.labels).float().mean().item()
    assert acc >= stated - 0.02, (acc, stated)
    # Batch-size independent (eval-mode BatchNorm) and device-agnostic dtype handling.
    one = _predict(model, b.images[:1])
    assert torch.allclose(one, _predict(model, b.images[:8])[:1], atol=1e-5)


def test_regression_error(fresh):
    model = zoo.load_demo("shapes-regression")
    stated = zoo.demo_metadata("shapes-regression")["held_out"]
    b = fresh[None]
    out = _predict(model, b.images)
    assert out.shape == (500, 2)
    truth = torch.stack([b.scale, b.center[:, 0]], 1)
    mae = (out - truth).abs().mean(0)
    baseline = (truth - truth.mean(0)).abs().mean(0)  # predicting the average
    assert (mae < 0.2 * baseline).all(), (mae, baseline)
    assert mae[0] <= stated["mae_size"] * 1.5 + 0.003
    assert mae[1] <= stated["mae_x_position"] * 1.5 + 0.003


def test_cue_model_is_a_clever_hans(fresh):
    model = zoo.load_demo("shapes-cue")
    stated = zoo.demo_metadata("shapes-cue")["held_out"]
    acc = {}
    for c, b in fresh.items():
        acc[c] = (_predict(model, b.images).argmax(1) == b.labels).float().mean().item()
    assert acc["train"] >= 0.97 and abs(acc["train"] - stated["accuracy_cue_train"]) < 0.03
    assert acc["moved"] < 0.5 * acc["train"], acc
    assert abs(acc["moved"] - stated["accuracy_cue_moved"]) < 0.08
    # With moved cues the model mostly follows the cue, not the shape.
    b = fresh["moved"]
    follows = (_predict(model, b.images).argmax(1) == b.cue_labels).float().mean().item()
    assert follows > 0.5


def test_train_is_reproducible(tmp_path):
    kw = dict(seed=3, n_train=64, epochs=1, n_held_out=50, verbose=False)
    m1 = train.train("shapes", out=tmp_path / "a", **kw)
    m2 = train.train("shapes", out=tmp_path / "b", **kw)
    w1 = torch.load(tmp_path / "a" / "shapes.pt", weights_only=True)
    w2 = torch.load(tmp_path / "b" / "shapes.pt", weights_only=True)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(v.dtype == torch.float16 for v in w1.values() if v.is_floating_point())
    assert m1["held_out"] == m2["held_out"] and m1["held_out"]["seed"] == 10_003
    assert m1["train_command"] == "python -m salience.demo.train shapes --seed 3 --n-train 64 --epochs 1"
    meta = json.loads((tmp_path / "a" / "shapes.json").read_text())
    assert meta["held_out"] == m1["held_out"]
    # The stored figure is that of the stored (float16) weights.
    model = zoo.ShapesNet(**meta["arch"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in w1.items()})
    got = train.evaluate(model, data.shapes_batch(50, 10_003), "classification")["accuracy"]
    assert got == pytest.approx(meta["held_out"]["accuracy"], abs=1e-5)
    with pytest.raises(SalienceError, match="trainable"):
        train.train("nope", out=tmp_path)


def _saliency_fractions(model, b):
    """Share of |d score / d input| (max over channels) on the shape and on the cue mark."""
    x = b.images.clone().requires_grad_(True)
    out = model(x)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    s = x.grad.abs().amax(1)
    total = s.flatten(1).sum(1)
    return ((s * b.masks).flatten(1).sum(1) / total).mean().item(), ((s * b.cue_masks).flatten(1).sum(1) / total).mean().item()


def test_models_look_where_they_should():
    b = data.shapes_batch(100, FRESH_SEED + 1, cue="train")
    mask_area, cue_area = b.masks.float().mean().item(), b.cue_masks.float().mean().item()
    on_mask, on_cue = _saliency_fractions(zoo.load_demo("shapes"), b)
    assert on_mask > 2 * mask_area and on_cue < 2 * cue_area  # the shape, not the mark
    on_mask, on_cue = _saliency_fractions(zoo.load_demo("shapes-cue"), b)
    assert on_cue > 5 * cue_area and on_mask < 1.5 * mask_area  # the mark, not the shape


def test_train_command_line(tmp_path, monkeypatch):
    # the command line's parsing, metadata and atomic write; the held-out draw is scored on 40 images, not the
    # default 2,000 x 3 cues (its size is train()'s argument, which the command does not set: checked here)
    real = train.train

    def fewer_held_out(*args, **kwargs):
        assert "n_held_out" not in kwargs
        return real(*args, **kwargs, n_held_out=40)

    monkeypatch.setattr(train, "train", fewer_held_out)
    assert train.main(["shapes-cue", "--out", str(tmp_path), "--n-train", "32", "--epochs", "1", "--seed", "2"]) == 0
    meta = json.loads((tmp_path / "shapes-cue.json").read_text())
    assert meta["train_command"] == "python -m salience.demo.train shapes-cue --seed 2 --n-train 32 --epochs 1"
    assert {"accuracy_cue_train", "accuracy_cue_moved", "accuracy_cue_none"} <= meta["held_out"].keys()
    assert oct((tmp_path / "shapes-cue.pt").stat().st_mode & 0o777) == "0o644"
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of the atomic write


def test_shapesnet_options():
    net = zoo.ShapesNet(num_outputs=3, widths=(4, 8), head="flatten", hidden=5)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 3) and net.last_block == "features.2"
    with pytest.raises(SalienceError, match="head"):
        zoo.ShapesNet(head="max")


def test_vit_recipe_trains_and_reloads(tmp_path):
    meta = train.train("shapes-vit", out=tmp_path, seed=1, n_train=32, epochs=1, n_held_out=20, verbose=False)
    assert meta["architecture"] == "ShapesViT" and meta["arch"]["patch"] == 8
    assert meta["train_command"] == "python -m salience.demo.train shapes-vit --seed 1 --n-train 32 --epochs 1"
    w = torch.load(tmp_path / "shapes-vit.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in w.values() if v.is_floating_point())
    model = zoo.build(meta["arch"], meta["architecture"])
    assert isinstance(model, zoo.ShapesViT)
    model.load_state_dict({k: v.float() for k, v in w.items()})
    got = train.evaluate(model, data.shapes_batch(20, 10_001), "classification")["accuracy"]
    assert got == pytest.approx(meta["held_out"]["accuracy"], abs=1e-5)


def test_shapesvit_options():
    net = zoo.ShapesViT(num_outputs=3, patch=16, dim=16, depth=2, heads=2, mlp=8)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 3) and net.last_block == "blocks.1.ln_1"
    with pytest.raises(SalienceError, match="multiple of patch"):
        zoo.ShapesViT(patch=7)
    with pytest.raises(SalienceError, match="multiple of heads"):
        zoo.ShapesViT(dim=30, heads=4)
    with pytest.raises(SalienceError, match="architecture"):
        zoo.build({}, "ResNet")
