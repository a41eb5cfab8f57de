"""Keras 3 models given inputs they cannot take: one SalienceError saying what the model takes (its
``model.inputs[0].shape``), what it was given and what to do, Keras's own error as its cause, from
every method, the metrics, the keras-vis API and the command line; the model unchanged. Before,
Keras's raw ValueError ("Input 0 of layer ... is incompatible with the layer") came out. And a bare
(unwrapped) Keras model given to salience's functions, which gave a wrong map without a word."""
from __future__ import annotations

import os
import re

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import salience  # noqa: E402
from salience import SalienceError  # noqa: E402
from salience.compat import keras_vis as kv  # noqa: E402
from salience.methods import METHODS, default_methods  # noqa: E402

from conftest import unchanged  # noqa: E402
from test_metrics_inputs import CALLS  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
    pytest.skip("keras was imported with another backend in this process", allow_module_level=True)

from salience.loading.keras import wrap_keras  # noqa: E402


def _functional() -> "keras.Model":
    """conv(3->4, relu), conv(4->6, relu), global average pool, Dense(5, softmax) on 9 x 9 RGB images."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax", name="fc")(h), name="net")


def _sequential() -> "keras.Model":
    """A Sequential built (no keras.Input) for 8 x 8 RGB images: conv, flatten, Dense(4)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.layers.Conv2D(2, 3, name="c"), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(4, activation="softmax", name="d")], name="seq")
    model.build((None, 8, 8, 3))
    return model


def _state(model: "keras.Model") -> list:
    """Everything of a Keras model a call could change: weights (values), trainable flags, activations."""
    return [(layer.name, layer.trainable, getattr(layer, "activation", None),
             [(w.path, w.trainable, np.array(w.numpy())) for w in layer.weights]) for layer in model.layers]


def _same_state(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (name, trainable, act, ws), (name2, trainable2, act2, ws2) in zip(a, b):
        assert (name, trainable) == (name2, trainable2) and act is act2
        assert [(p, t) for p, t, _ in ws] == [(p, t) for p, t, _ in ws2]
        for (_, _, v), (_, _, v2) in zip(ws, ws2):
            assert np.array_equal(v, v2)


def _check(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    for part in parts:
        assert part in msg, msg
    assert "\n" not in msg and "\x1b" not in msg, msg
    cause = err.value.__cause__
    assert type(cause) is ValueError and "is incompatible with the layer" in str(cause), repr(cause)


# Bad inputs (B, C, H, W) to the wrapped 9 x 9 RGB model, and what the message must say.
BAD = {
    "gray": ((1, 1, 9, 9), "x.expand(-1, 3, -1, -1)"),
    "rgba": ((1, 4, 9, 9), "x[:, :3]"),
    "size": ((1, 3, 12, 12), "resize them to 9 x 9"),
    "channels-last": ((1, 9, 9, 3), "x.permute(0, 3, 1, 2)"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_every_method_says_what_the_keras_model_takes(bad):
    km = _functional()
    wm = wrap_keras(km)
    shape, hint = BAD[bad]
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    before = _state(km)
    for name in default_methods(wm):
        if bad == "channels-last" and name == "rise":
            continue  # its own check refuses the 9 x 3 image first: "cell=7 is more cells than the 9x3 image has"
        with unchanged(wm), pytest.raises(SalienceError) as err:
            METHODS[name](wm, x, 1)
        _check(err, f"cannot take the input of shape {shape}", "it takes input of shape (None, 9, 9, 3)", hint)
    _same_state(before, _state(km))


def test_a_sequential_built_for_another_size():
    km = _sequential()
    wm = wrap_keras(km)
    before = _state(km)
    for name in ("vanilla", "gradcam", "smoothgrad", "occlusion"):
        with unchanged(wm), pytest.raises(SalienceError) as err:
            METHODS[name](wm, torch.rand(2, 3, 9, 9), 0)
        # (the many-pass methods' first chunk is one item: the shape the model was given)
        assert re.search(r"'seq' cannot take the input of shape \((1|2), 3, 9, 9\)", str(err.value)), err.value
        _check(err, "it takes input of shape (None, 8, 8, 3)", "resize them to 8 x 8")
    _same_state(before, _state(km))


@pytest.mark.parametrize("name", list(CALLS))
def test_every_metric_says_what_the_keras_model_takes(name):
    km = _functional()
    wm = wrap_keras(km)
    before = _state(km)
    with unchanged(wm), pytest.raises(SalienceError) as err:
        CALLS[name](wm, torch.rand(2, 4, 9, 9), 0)
    _check(err, "it takes input of shape (None, 9, 9, 3)", "x[:, :3]")
    _same_state(before, _state(km))


# Bad seed_input (H, W, C) to keras-vis's functions on the 9 x 9 RGB model.
BAD_SEEDS = {
    "gray": ((9, 9, 1), "np.repeat(seed_input, 3, axis=-1)"),
    "rgba": ((9, 9, 4), "seed_input[..., :3]"),
    "size": ((12, 12, 3), "resize the image to 9 x 9"),
    "channels-first": ((3, 9, 9), "np.transpose(seed_input, (1, 2, 0))"),
}


@pytest.mark.parametrize("bad", list(BAD_SEEDS))
def test_the_keras_vis_api_says_what_the_keras_model_takes(bad):
    km = _functional()
    shape, hint = BAD_SEEDS[bad]
    seed = np.random.default_rng(0).random(shape).astype("float32")
    before = _state(km)
    calls = [
        lambda: kv.visualize_saliency(km, -1, 1, seed),  # the final Dense, read before its softmax
        lambda: kv.visualize_saliency(km, "c2", 1, seed, backprop_modifier="guided"),
        lambda: kv.visualize_saliency(km, -1, 1, seed, wrt_tensor="c1"),
        lambda: kv.visualize_saliency_with_losses(km, [(kv.ActivationMaximization(km.get_layer("fc"), 1), -1.0)],
                                                  seed),
    ]
    for call in calls:
        with pytest.raises(SalienceError) as err:
            call()
        _check(err, f"'net' cannot take seed_input of shape {shape}", "it takes input of shape (None, 9, 9, 3)", hint)
    _same_state(before, _state(km))
    seq = _sequential()
    with pytest.raises(SalienceError) as err:
        kv.visualize_saliency(seq, -1, 0, np.zeros((9, 9, 3), "float32"))
    _check(err, "'seq' cannot take seed_input of shape (9, 9, 3)", "(None, 8, 8, 3)", "resize the image to 8 x 8")


def test_a_bare_keras_model_is_refused_by_salience_functions():
    """A Keras model not wrapped reads a (B, C, H, W) batch as channels-last: given a channels-last batch,
    vanilla returned a (1, 9, 3) "map" before; now every function says to wrap it."""
    km = _functional()
    before = _state(km)
    for x in (torch.rand(1, 3, 9, 9), torch.rand(1, 9, 9, 3)):
        for call in (lambda: salience.vanilla(km, x, 0), lambda: salience.gradcam(km, x, 0),
                     lambda: salience.evidence.deletion(km, x, torch.rand(1, 9, 9), 0, steps=2)):
            with pytest.raises(SalienceError, match=r"Keras model \(Functional 'net'\).*wrap_keras\(model\)"):
                call()
    _same_state(before, _state(km))


def _linear() -> tuple["keras.Model", np.ndarray]:
    """Flatten, Dense(3, softmax) on 4 x 5 RGB images, and its kernel (60, 3)."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((4, 5, 3))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(keras.layers.Flatten()(inp)),
                        name="lin")
    model.get_layer("fc").bias.assign(np.array([0.1, -0.2, 0.3], "float32"))
    return model, np.asarray(model.get_layer("fc").kernel.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_good_inputs_still_give_the_closed_form(dtype):
    """A linear model: the gradient of class k's logit is its kernel column, (H, W, C) in Keras's
    flattening order; salience's map (B, C, H, W) is that permuted, keras-vis's its min-max scaling.
    Keras casts a float64 input itself (no dtype error to give)."""
    km, kernel = _linear()
    wm = wrap_keras(km)
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(3), dtype=dtype)
    before = _state(km)
    for k in range(3):
        expected = torch.from_numpy(kernel[:, k].reshape(4, 5, 3)).permute(2, 0, 1)
        with unchanged(wm):
            got = salience.vanilla(wm, x, k, reduce=None)
        torch.testing.assert_close(got.float(), expected.expand(2, 3, 4, 5), rtol=1e-5, atol=1e-6)
        seed = x[0].permute(1, 2, 0).numpy()
        g = kernel[:, k].reshape(4, 5, 3)
        heat = kv.visualize_saliency(km, -1, k, seed, grad_modifier=None, keepdims=True)
        np.testing.assert_allclose(heat, (g - g.min()) / (g.max() - g.min() + 1e-7), rtol=1e-5, atol=1e-6)
    _same_state(before, _state(km))


def test_the_command_line_says_what_the_keras_model_takes(tmp_path, capsys):
    """``--channels 1`` given to a model of RGB images: one line naming the shape it takes, no traceback."""
    from salience.cli import main
    from salience.render import viz

    km = _functional()
    km.save(str(tmp_path / "net.keras"))
    viz.save_png(tmp_path / "a.png", viz.to_uint8_image(torch.rand(3, 9, 9)))
    out = tmp_path / "out"
    code = main(["explain", str(tmp_path / "a.png"), "-m", str(tmp_path / "net.keras"), "--channels", "1",
                 "--method", "vanilla", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    assert "cannot take the input of shape (1, 1, 9, 9)" in err and "(None, 9, 9, 3)" in err, err


def test_a_keras_model_of_another_rank():
    """A model of flat vectors (None, 10) given images: the rank it takes, in one line, Keras's error the cause."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((10,))
    km = keras.Model(inp, keras.layers.Dense(3, name="d")(inp), name="flat")
    wm = wrap_keras(km)
    before = _state(km)
    with unchanged(wm), pytest.raises(SalienceError) as err:
        salience.vanilla(wm, torch.rand(1, 3, 9, 9), 0)
    _check(err, "'flat' cannot take the input of shape (1, 3, 9, 9)", "it takes inputs of shape (None, 10)")
    _same_state(before, _state(km))


def test_a_model_error_in_terminal_colours_is_quoted_plain():
    """Keras 3 writes a layer's error in bold (``\\x1b[1m ... \\x1b[0m``); a module that runs Keras layers
    itself (not through wrap_keras) raised it through salience's one rule for inputs a model cannot take,
    which quoted the codes into the one-line message (and the page, and the terminal)."""

    class Coloured(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("Exception encountered when calling Conv2D.call().\n\n\x1b[1mCalculated padded input "
                               "size per channel: (1 x 1). Kernel size: (3 x 3). Kernel size can't be greater than "
                               "actual input size\x1b[0m\n\nArguments received by Conv2D.call():\n  • inputs=...")

    with pytest.raises(SalienceError) as err:
        salience.vanilla(Coloured(), torch.rand(1, 3, 3, 3), 0)
    msg = str(err.value)
    assert "\x1b" not in msg and "\n" not in msg, msg
    assert msg.endswith("(the model said: Calculated padded input size per channel: (1 x 1). Kernel size: (3 x 3). "
                        "Kernel size can't be greater than actual input size)"), msg
