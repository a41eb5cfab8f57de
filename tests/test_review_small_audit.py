"""A review of the audit of the small public surfaces (merge fdb0e5b): what its behaviour changes left
behind. Each test here failed before its fix."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import targets
from salience.cli import main
from salience.render import viz

from test_small_api_audit import _NoRelu as _Net  # a conv, an activation, a global mean and a linear head

X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- the command line

_BUILD = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()
"""


@pytest.fixture(scope="module")
def tanh_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tanh")
    (d / "tanhnet.py").write_text(_BUILD)
    images = d / "images"
    images.mkdir()
    for i in range(2):
        viz.save_png(images / f"img{i}.png", viz.to_uint8_image(torch.rand(3, 16, 16, generator=torch.Generator()
                                                                           .manual_seed(i))))
    return d


def test_the_command_line_says_the_no_relu_refusal_with_its_flags(tanh_files, capsys, tmp_path):
    """A guided method on a model without ReLUs is refused saying to use ``salience.vanilla`` or
    ``unsupported='ignore'``: the command line said the Python words (its replacement knew only the older
    refusal's ``unsupported='warn' (or 'ignore')``); it says ``--method vanilla`` / ``--unsupported ignore``."""
    model = f"python:{tanh_files / 'tanhnet.py'}:build"
    rc = main(["explain", str(tanh_files / "images" / "img0.png"), "--model", model, "--method",
               "guided_backprop,vanilla", "--out", str(tmp_path / "one")])
    err = capsys.readouterr().err
    assert rc != 0 or "guided_backprop failed" in err
    assert "found no ReLU" in err and "--unsupported ignore" in err and "--method vanilla" in err, err
    assert "unsupported='ignore'" not in err and "salience.vanilla" not in err, err
    rc = main(["explain", str(tanh_files / "images"), "--size", "16,16", "--model", model, "--method",
               "guided_backprop,vanilla", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "found no ReLU" in err and "--unsupported ignore" in err and "unsupported='ignore'" not in err, err


# ----------------------------------------------------------------------------- SmoothGrad over a rule

@pytest.mark.parametrize("act, words", [(nn.Tanh(), "found no ReLU"), (nn.GELU(), "not defined for")],
                         ids=["no-relu", "gelu"])
def test_smoothgrad_over_a_ruled_method_warns_once_per_call(act, words):
    """``unsupported="warn"``: the rule's warning came once per pass, i.e. once per chunk of noisy copies
    (4 with 8 copies of 2 images in chunks of 4); it comes once per SmoothGrad call."""
    torch.manual_seed(0)
    m = _Net(act).eval()
    for method in (salience.guided_backprop, salience.deconvnet):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            salience.smoothgrad(m, X, 0, method=method, samples=8, chunk=4, unsupported="warn")
        said = [str(w.message) for w in seen if words in str(w.message)]
        assert len(said) == 1, said
    with warnings.catch_warnings(record=True) as seen:  # two calls: two warnings (once per call, not process)
        warnings.simplefilter("always")
        for _ in range(2):
            salience.smoothgrad(m, X, 0, method=salience.guided_backprop, samples=8, chunk=4, unsupported="warn")
    assert len([w for w in seen if words in str(w.message)]) == 2


# ----------------------------------------------------------------------------- targets

@pytest.mark.parametrize("value", [np.array(1), np.array(1, dtype=np.int32)], ids=["int64", "int32"])
def test_a_0d_numpy_integer_array_is_an_index(value):
    """A 0-d integer array (``np.asarray(i)``, an ``np.argmax(..., keepdims=False)`` of an array kept as one)
    was taken before the audit and by ``vanilla(model, x, np.array(1))`` (a class target) still is; the
    regression index and the activation channel refused it while taking a 0-d integer tensor."""
    assert targets.regression(value).index == 1
    assert targets.activation("conv", value).channel == 1
    m = _Net(nn.ReLU()).eval()
    torch.testing.assert_close(salience.vanilla(m, X, targets.regression(value)),
                               salience.vanilla(m, X, targets.regression(1)))


# ----------------------------------------------------------------------------- keras-vis

def test_keras_vis_says_the_no_relu_refusal_in_its_own_words():
    """``visualize_saliency(..., backprop_modifier="guided")`` on a Keras model without ReLUs is refused as
    ``guided_backprop`` refuses it, but the refusal said to pass ``unsupported='ignore'``, a keyword the
    keras-vis functions do not take (a TypeError if tried); it says ``backprop_modifier=None``."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    from salience.compat.keras_vis import visualize_saliency

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="tanh")(inp)))
    model = keras.Model(inp, out)
    seed = np.random.default_rng(0).random((8, 8, 3)).astype("float32")
    for modifier in ("guided", "relu"):
        with pytest.raises(salience.SalienceError, match="found no ReLU") as e:
            visualize_saliency(model, -1, 1, seed, backprop_modifier=modifier)
        assert "backprop_modifier=None" in str(e.value) and "unsupported=" not in str(e.value), str(e.value)
    assert visualize_saliency(model, -1, 1, seed).shape == (8, 8)
