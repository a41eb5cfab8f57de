"""The keras-vis style facade on PyTorch and Keras 3 models, and Keras models as PyTorch modules."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import salience  # noqa: E402
from salience import SalienceError, targets
from salience.compat import keras_vis as kv  # noqa: E402
from salience.methods import METHODS  # noqa: E402

from conftest import unchanged  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
    pytest.skip("keras was imported with another backend in this process", allow_module_level=True)

from salience.loading.keras import KerasModel, import_keras, load_keras, wrap_keras  # noqa: E402

RULES = {None: "vanilla", "guided": "guided_backprop", "relu": "deconvnet"}
GRAD_MODIFIERS = ["absolute", "negate", "relu", "small_values", None]


class TorchNet(nn.Module):
    """conv(3->4) relu conv(4->6) relu, global average pool, linear(6->5): the Keras model's twin."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 6, 3)
        self.r2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.r2(self.c2(self.r1(self.c1(x)))))))


def _keras_net() -> "keras.Model":
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(5, activation="softmax", name="fc")(h)
    model = keras.Model(inp, out)
    # Non-zero biases, so that a wrong bias copy would show.
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.linspace(-0.2, 0.3, layer.bias.shape[0]).astype("float32"))
    return model


def _twin(km: "keras.Model") -> TorchNet:
    """A PyTorch model with the Keras model's weights (channels-first kernels, transposed Dense)."""
    tm = TorchNet()
    with torch.no_grad():
        for name in ("c1", "c2"):
            layer = km.get_layer(name)
            getattr(tm, name).weight.copy_(torch.as_tensor(np.asarray(layer.kernel.numpy())).permute(3, 2, 0, 1))
            getattr(tm, name).bias.copy_(torch.as_tensor(np.asarray(layer.bias.numpy())))
        fc = km.get_layer("fc")
        tm.fc.weight.copy_(torch.as_tensor(np.asarray(fc.kernel.numpy())).T)
        tm.fc.bias.copy_(torch.as_tensor(np.asarray(fc.bias.numpy())))
    return tm


@pytest.fixture(scope="module")
def pair() -> tuple["keras.Model", TorchNet]:
    km = _keras_net()
    return km, _twin(km)


@pytest.fixture
def seed_chw() -> torch.Tensor:
    return torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(1))


def _keras_vis_tail(grad: torch.Tensor, modifier: str | None, keepdims: bool) -> np.ndarray:
    """keras-vis's post-processing written out: modifier, signed channel max, (m - min) / (max - min + 1e-7)."""
    g = grad[0].clone()
    if modifier == "absolute":
        g = g.abs()
    elif modifier == "negate":
        g = -g
    elif modifier == "relu":
        g[g < 0] = 0
    elif modifier == "small_values":
        g = (1.0 / (g + 1e-7)).abs()
    if not keepdims:
        g = g.max(dim=0).values
    return ((g - g.min()) / (g.max() - g.min() + 1e-7)).numpy()


def test_twin_models_agree(pair) -> None:
    km, tm = pair
    x = torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(tm(x).softmax(1), km(x.permute(0, 2, 3, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backprop_modifier", list(RULES))
@pytest.mark.parametrize("grad_modifier", GRAD_MODIFIERS)
def test_facade_equals_native_api(pair, seed_chw, backprop_modifier, grad_modifier) -> None:
    _, tm = pair
    idx = kv.find_layer_idx(tm, "fc")
    assert idx == len(kv.model_layers(tm)) - 1
    with unchanged(tm):
        got = kv.visualize_saliency(tm, idx, 3, seed_chw, backprop_modifier=backprop_modifier,
                                    grad_modifier=grad_modifier)
    raw = METHODS[RULES[backprop_modifier]](tm, seed_chw[None], 3, reduce=None)
    expected = _keras_vis_tail(raw, grad_modifier, keepdims=False)
    assert isinstance(got, np.ndarray) and got.shape == (9, 9)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert got.min() == 0.0 and got.max() == pytest.approx(1.0, abs=1e-3)


def test_multilabel_keepdims_and_filter_saliency(pair, seed_chw) -> None:
    _, tm = pair
    got = kv.visualize_saliency(tm, -1, [1, 4], seed_chw, keepdims=True)
    raw = salience.vanilla(tm, seed_chw[None], targets.multilabel([1, 4]), reduce=None)
    assert got.shape == (3, 9, 9)  # the PyTorch model's own layout
    np.testing.assert_allclose(got, _keras_vis_tail(raw, "absolute", keepdims=True), rtol=1e-4, atol=1e-6)
    # A conv layer: the mean of channel 2 over positions (conv filter saliency), by index or name.
    conv = kv.find_layer_idx(tm, "c2")
    got = kv.visualize_saliency(tm, conv, 2, seed_chw, grad_modifier=None)
    assert np.array_equal(got, kv.visualize_saliency(tm, "c2", 2, seed_chw, grad_modifier=None))
    raw = salience.vanilla(tm, seed_chw[None], targets.activation("c2", 2), reduce=None)
    np.testing.assert_allclose(got, _keras_vis_tail(raw, None, keepdims=False), rtol=1e-4, atol=1e-6)


def test_with_losses_is_the_weighted_sum_and_wrt_tensor(pair, seed_chw) -> None:
    _, tm = pair
    losses = [(kv.ActivationMaximization("fc", 0), -1.0), (kv.ActivationMaximization(tm.c2, [1, 5]), 0.5)]
    got = kv.visualize_saliency_with_losses(tm, losses, seed_chw, grad_modifier=None)
    g0 = salience.vanilla(tm, seed_chw[None], 0, reduce=None)
    g1 = salience.vanilla(tm, seed_chw[None], targets.activation("c2", 1), reduce=None)
    g5 = salience.vanilla(tm, seed_chw[None], targets.activation("c2", 5), reduce=None)
    np.testing.assert_allclose(got, _keras_vis_tail(g0 - 0.5 * (g1 + g5), None, False), rtol=1e-4, atol=1e-6)
    # wrt_tensor: the gradient w.r.t. the output of c1 (4 x 7 x 7), channel max over its 4 channels.
    got = kv.visualize_saliency(tm, -1, 2, seed_chw, wrt_tensor="c1", keepdims=True)
    p = salience._core.autograd.gradients(tm, seed_chw[None], salience.targets.as_target(2), layers=["c1"])
    np.testing.assert_allclose(got, _keras_vis_tail(p.layer_grads[0], "absolute", True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backprop_modifier", list(RULES))
def test_keras_model_equals_its_pytorch_twin(pair, seed_chw, backprop_modifier) -> None:
    km, tm = pair
    seed_hwc = seed_chw.permute(1, 2, 0).numpy()
    weights = [w.numpy().copy() for w in km.weights]
    # Class saliency: the final Dense, read before its softmax (the twin has no softmax).
    for keepdims in (False, True):
        got = kv.visualize_saliency(km, kv.find_layer_idx(km, "fc"), [0, 2], seed_hwc,
                                    backprop_modifier=backprop_modifier, keepdims=keepdims)
        ref = kv.visualize_saliency(tm, "fc", [0, 2], seed_chw, backprop_modifier=backprop_modifier,
                                    keepdims=keepdims)
        np.testing.assert_allclose(got, ref.transpose(1, 2, 0) if keepdims else ref, rtol=1e-4, atol=1e-5)
    # Conv filter saliency on channels-last outputs (a Keras Conv2D's output is after its ReLU: the twin's r2).
    got = kv.visualize_saliency(km, "c2", 3, seed_hwc, backprop_modifier=backprop_modifier, grad_modifier=None)
    ref = kv.visualize_saliency(tm, "r2", 3, seed_chw, backprop_modifier=backprop_modifier, grad_modifier=None)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # The saliency of the softmax's probabilities is a different map: the bypass matters.
    probs = salience.vanilla(tm, seed_chw[None], lambda out: out.softmax(1)[:, 0] + out.softmax(1)[:, 2],
                             reduce=None)
    assert not np.allclose(kv.visualize_saliency(km, -1, [0, 2], seed_hwc),
                           _keras_vis_tail(probs, "absolute", False), atol=1e-3)
    for w, w0 in zip(km.weights, weights):  # the Keras model is untouched
        assert np.array_equal(w.numpy(), w0)


def test_keras_wrt_tensor_is_channels_last(pair, seed_chw) -> None:
    km, tm = pair
    got = kv.visualize_saliency(km, -1, 1, seed_chw.permute(1, 2, 0).numpy(), wrt_tensor="c1", keepdims=True)
    ref = kv.visualize_saliency(tm, -1, 1, seed_chw, wrt_tensor="r1", keepdims=True)  # after c1's ReLU
    assert got.shape == (7, 7, 4)
    np.testing.assert_allclose(got, ref.transpose(1, 2, 0), rtol=1e-4, atol=1e-5)


def test_wrapped_keras_model_works_with_every_method(pair) -> None:
    km, tm = pair
    wm = wrap_keras(km)
    info = salience._core.info.model_info(wm)
    assert (info.layout, info.input_size, info.channels) == ("NHWC", (9, 9), 3)
    x = torch.rand(2, 3, 9, 9)
    with unchanged(wm):
        for name in ("vanilla", "guided_backprop", "deconvnet"):
            torch.testing.assert_close(METHODS[name](wm, x, [1, 4], reduce=None),
                                       METHODS[name](tm, x, [1, 4], reduce=None), rtol=1e-4, atol=1e-6)
        # Keras layers are reachable as layers.<name>; their outputs are channels-last.
        a = salience.vanilla(wm, x, targets.custom(lambda o: o[..., 2].mean((1, 2)), layer="layers.c2"))
    torch.testing.assert_close(a, salience.vanilla(tm, x, targets.activation("r2", 2)), rtol=1e-4, atol=1e-6)
    assert kv.visualize_saliency(wm, -1, 1, x[0].permute(1, 2, 0)).shape == (9, 9)  # unwrapped for keras-vis


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_save_and_load_round_trip(pair, tmp_path, suffix) -> None:
    km, tm = pair
    path = tmp_path / f"model{suffix}"
    km.save(str(path))
    loaded = load_keras(path)
    assert isinstance(loaded, KerasModel) and salience._core.info.model_info(loaded).name == f"keras:model{suffix}"
    same = salience.load_model(str(path))
    x = torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), km(x.permute(0, 2, 3, 1)))
        torch.testing.assert_close(same(x), km(x.permute(0, 2, 3, 1)))
    torch.testing.assert_close(salience.vanilla(loaded, x, 3), salience.vanilla(tm, x, 3), rtol=1e-4, atol=1e-6)


def test_bad_input(pair, seed_chw, tmp_path, monkeypatch) -> None:
    km, tm = pair
    with pytest.raises(SalienceError, match="no leaf layer named 'fcc'"):
        kv.find_layer_idx(tm, "fcc")
    with pytest.raises(SalienceError, match="no layer named 'dense'"):
        kv.find_layer_idx(km, "dense")
    with pytest.raises(SalienceError, match="unknown backprop_modifier"):
        kv.visualize_saliency(tm, -1, 0, seed_chw, backprop_modifier="smooth")
    with pytest.raises(SalienceError, match="without the batch dimension"):
        kv.visualize_saliency(tm, -1, 0, seed_chw[None])
    with pytest.raises(SalienceError, match="out of range"):
        kv.visualize_saliency(tm, 40, 0, seed_chw)
    with pytest.raises(SalienceError, match="out of range"):
        kv.visualize_saliency(km, -1, 7, seed_chw.permute(1, 2, 0))
    with pytest.raises(SalienceError, match="unknown grad_modifier"):
        kv.visualize_saliency(tm, -1, 0, seed_chw, grad_modifier="square")
    with pytest.raises(SalienceError, match="no such file"):
        load_keras(tmp_path / "missing.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SalienceError, match="could not load"):
        load_keras(bad)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(SalienceError, match="KERAS_BACKEND=torch"):
        import_keras()
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(SalienceError, match="KERAS_BACKEND='tensorflow'"):
        import_keras()


def test_gradcam_on_keras_layers_equals_the_twin(pair):
    """Keras layers give channels-last outputs: Grad-CAM (and Guided Grad-CAM) read them as such."""
    km, tm = pair
    wrapped = wrap_keras(km)
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 4])
    ours = salience.gradcam(wrapped, x, t, layer="layers.c2", upsample=False)
    ref = salience.gradcam(tm, x, t, layer="r2", upsample=False)  # Keras's c2 output is after its ReLU
    assert ours.shape == (2, 5, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(salience.gradcam(wrapped, x, t, layer="layers.c2"),
                               salience.gradcam(tm, x, t, layer="r2"), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(salience.guided_gradcam(wrapped, x, t, layer="layers.c2", reduce=None),
                               salience.guided_gradcam(tm, x, t, layer="r2", reduce=None), rtol=1e-4, atol=1e-6)
    # The default layer of the Keras model is its last conv layer.
    torch.testing.assert_close(salience.gradcam(wrapped, x, t), salience.gradcam(tm, x, t, layer="r2"),
                               rtol=1e-4, atol=1e-6)
