"""The keras-vis API (``salience.compat.keras_vis``) over the inputs a user passes, on a PyTorch model
and a Keras 3 model: each call gives keras-vis's map, or raises a ``SalienceError`` saying what to do.
Each test here failed before its fix: a numpy float64 seed (``np.random.rand``'s, keras-vis's usual
input) refused for a PyTorch model, torch's raw errors for a meta / string / ``None`` seed, a complex
seed's imaginary part dropped with a warning, ``filter_indices="1"`` or ``[0.5]`` explaining a unit
silently (``int("1")``, ``int(0.5) == 0``), raw ``IndexError`` / ``TypeError`` / ``ValueError`` of
``ActivationMaximization``, and ``model_layers`` of a Keras model listing torch's internals."""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from salience import SalienceError  # noqa: E402
from salience.compat import keras_vis as kv  # noqa: E402

from conftest import unchanged  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
    pytest.skip("keras was imported with another backend in this process", allow_module_level=True)


def _torch_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _keras_net() -> "keras.Model":
    keras.utils.set_random_seed(0)
    inp = keras.Input((7, 7, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax", name="fc")(h))


SEED = np.random.default_rng(0).random((3, 7, 7))  # float64, as np.random gives


@pytest.mark.parametrize("seed", [SEED, SEED.astype(np.float16), torch.tensor(SEED).bfloat16(),
                                  torch.tensor(SEED), SEED.tolist()],
                         ids=["numpy-float64", "numpy-float16", "bfloat16", "tensor-float64", "list"])
def test_a_pytorch_model_takes_any_float_seed(seed):
    """The seed is cast to the model's dtype, as the Keras path and keras-vis did: the map equals the
    float32 seed's (of the seed's own values). Refused before: 'x is torch.float64 but the model
    computes in torch.float32'."""
    model = _torch_net()
    before = np.array(seed.float().numpy() if isinstance(seed, torch.Tensor) else seed, dtype=np.float32)
    with unchanged(model):
        got = kv.visualize_saliency(model, -1, 2, seed)
    ref = kv.visualize_saliency(model, -1, 2, torch.tensor(before))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.shape == (7, 7) and got.min() == 0.0
    now = np.array(seed.float().numpy() if isinstance(seed, torch.Tensor) else seed, dtype=np.float32)
    assert np.array_equal(now, before)  # the user's seed is untouched


@pytest.mark.parametrize("keras_model", [False, True], ids=["pytorch", "keras"])
@pytest.mark.parametrize("seed, message", [
    (torch.empty(3, 7, 7, device="meta"), r"seed_input must be a dense tensor with values, got a torch.strided "
                                          r"tensor on meta"),
    ("cat.png", r"seed_input must be an image of real numbers .*got str of dtype <U7"),
    (None, r"seed_input must be an image of real numbers .*got NoneType of dtype object"),
    (SEED.astype(np.complex64), r"got ndarray of dtype complex64"),
    (torch.tensor(SEED, dtype=torch.complex64), r"seed_input must be real, got a complex tensor"),
], ids=["meta", "str", "none", "complex-numpy", "complex-tensor"])
def test_a_seed_that_is_no_image_is_refused(keras_model, seed, message):
    """Raw NotImplementedError ('Cannot copy out of meta tensor') and TypeError ("can't convert
    np.ndarray of type numpy.str_") before; a complex seed lost its imaginary part with a warning."""
    model = _keras_net() if keras_model else _torch_net()
    if keras_model and isinstance(seed, (np.ndarray, torch.Tensor)) and seed.ndim == 3:
        seed = seed.transpose(1, 2, 0) if isinstance(seed, np.ndarray) else torch.empty(7, 7, 3, device="meta") \
            if seed.is_meta else seed.permute(1, 2, 0)
    with pytest.raises(SalienceError, match=message):
        kv.visualize_saliency(model, -1, 0, seed)
    with pytest.raises(SalienceError, match=message):
        kv.visualize_saliency_with_losses(model, [(kv.ActivationMaximization(None, 0), -1.0)], seed)


@pytest.mark.parametrize("indices", ["1", [0.5], [1, "2"], np.array([0.0, 1.0]), torch.tensor([1.0]), [True]],
                         ids=["str", "float-in-list", "str-in-list", "float-array", "float-tensor", "bool-in-list"])
def test_filter_indices_that_are_not_ints_are_refused(indices):
    """``"1"`` became unit 1 and ``[0.5]`` unit 0 (``int(0.5)``): a map of a unit nobody asked for."""
    with pytest.raises(SalienceError, match=r"filter_indices must be an int or a list of ints"):
        kv.visualize_saliency(_torch_net(), -1, indices, SEED.astype(np.float32))
    with pytest.raises(SalienceError, match=r"filter_indices must be an int or a list of ints"):
        kv.ActivationMaximization("4", indices)


def test_integer_tensors_and_arrays_are_indices():
    """A 0-d integer tensor (``logits.argmax()``) was refused while a 1-d one was taken."""
    model, seed = _torch_net(), SEED.astype(np.float32)
    ref = kv.visualize_saliency(model, -1, 3, seed)
    for idx in (torch.tensor(3), np.int64(3), np.array(3), torch.tensor([3]), np.array([3])):
        assert np.array_equal(kv.visualize_saliency(model, -1, idx, seed), ref)


@pytest.mark.parametrize("make, message", [
    (lambda: kv.ActivationMaximization("fc", 0, channel_axis=5)(torch.rand(2, 6, 4, 4)),
     r"channel_axis 5 is out of range for the layer's output of shape \(2, 6, 4, 4\)"),
    (lambda: kv.ActivationMaximization("fc", 0, channel_axis="x"), r"channel_axis must be an int"),
    (lambda: kv.ActivationMaximization("fc", 0, channel_axis=True), r"channel_axis must be an int"),
    (lambda: kv.ActivationMaximization("fc", "a"), r"filter_indices must be an int or a list of ints, got 'a'"),
], ids=["axis-out-of-range", "axis-str", "axis-bool", "index-str"])
def test_activation_maximization_refuses(make, message):
    """Raw IndexError ('tuple index out of range'), TypeError and ValueError before."""
    with pytest.raises(SalienceError, match=message):
        make()


def test_model_layers_of_a_keras_model_and_of_no_model():
    """A Keras model's layers were torch's internals (``_torch_params``, a ParameterDict): not the
    list its ``layer_idx`` indexes. ``model_layers(None)``: a raw AttributeError."""
    km = _keras_net()
    layers = kv.model_layers(km)
    assert [name for name, _ in layers] == [layer.name for layer in km.layers]
    assert [name for name, _ in layers][1:] == ["c1", "gap", "fc"]  # after the InputLayer
    assert all(layer is km.layers[i] for i, (_, layer) in enumerate(layers))
    assert layers[kv.find_layer_idx(km, "c1")][0] == "c1"
    with pytest.raises(SalienceError, match=r"expected a torch.nn.Module or a keras.Model, got NoneType"):
        kv.model_layers(None)


@pytest.mark.parametrize("layer_idx, wrt, message", [
    (-1, 0, r"wrt_tensor 'input_layer(_\d+)?' is the model's input layer; leave wrt_tensor=None"),
    (-1, -1, r"wrt_tensor 'fc' is not a layer between the input and the explained layer 'fc'"),
    ("c1", "gap", r"wrt_tensor 'gap' is not a layer between the input and the explained layer 'c1'"),
], ids=["input-layer", "the-final-dense", "after-the-layer"])
def test_keras_wrt_tensor_outside_the_path_says_so(layer_idx, wrt, message):
    """Before: "layer 'layers.input_layer' was not called in the forward pass" and "the model has no
    layer named 'layers.fc'; did you mean ..." for a layer the model has."""
    with pytest.raises(SalienceError, match=message):
        kv.visualize_saliency(_keras_net(), layer_idx, 0, SEED.transpose(1, 2, 0), wrt_tensor=wrt)
    got = kv.visualize_saliency(_keras_net(), -1, 0, SEED.transpose(1, 2, 0), wrt_tensor="c1", keepdims=True)
    assert got.shape == (5, 5, 4) and got.min() == 0.0  # a layer on the path: its output's (h, w, channels)
