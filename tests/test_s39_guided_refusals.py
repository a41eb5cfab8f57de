"""Every path of the backprop rules refuses a pass in which the rule met no ReLU (its map is vanilla's),
whether the pass ran to the model's output or stopped at a target's layer, or is taken w.r.t. a layer
(keras-vis's ``wrt_tensor=``): ``unsupported="ignore"`` takes it, ``"warn"`` says it."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets
from salience.compat import keras_vis as kv


def _relu_free() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()


def _relu_then_linear() -> nn.Module:
    """A ReLU early, none after layer 2 (conv -> relu -> conv -> tanh -> flatten -> linear)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(64, 3)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("method", [salience.guided_backprop, salience.deconvnet])
def test_a_target_on_the_last_layer_of_a_relu_free_model_is_refused(method, x):
    m = _relu_free()
    t = targets.activation("4", 1)  # the Linear: the pass stops there, having met no ReLU
    with pytest.raises(SalienceError, match="found no ReLU.*before the target's layer"):
        method(m, x, t)
    with pytest.warns(UserWarning, match="found no ReLU"):
        method(m, x, t, unsupported="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = method(m, x, t, reduce=None, unsupported="ignore")
    assert torch.equal(got, salience.vanilla(m, x, t, reduce=None))  # what "ignore" takes: vanilla's map


def test_a_target_before_every_relu_is_refused_too(x):
    """The pass stops at layer 0, before the ReLU: the map is vanilla's, whatever runs after."""
    m = _relu_then_linear()
    with pytest.raises(SalienceError, match="found no ReLU"):
        salience.guided_backprop(m, x, targets.activation("0", 0))
    salience.guided_backprop(m, x, targets.activation("2", 0))  # a ReLU before layer 2: the rule's map


def test_guided_gradcam_with_a_target_on_the_last_layer_of_a_relu_free_model_is_refused(x):
    m = _relu_free()
    t = targets.activation("4", 0)
    with pytest.raises(SalienceError, match="found no ReLU"):
        salience.guided_gradcam(m, x, t, layer="2")
    got = salience.guided_gradcam(m, x, t, layer="2", reduce=None, unsupported="ignore")
    assert torch.isfinite(got).all()


def test_keras_vis_class_saliency_of_a_relu_free_torch_model_is_refused():
    m = _relu_free()
    seed = torch.rand(3, 8, 8)
    for modifier in ("guided", "relu"):
        with pytest.raises(SalienceError, match="found no ReLU.*backprop_modifier=None"):
            kv.visualize_saliency(m, -1, 0, seed, backprop_modifier=modifier)
    kv.visualize_saliency(m, -1, 0, seed)  # plain gradients: taken


def test_keras_vis_wrt_tensor_refuses_a_pass_without_relu_after_the_layer():
    seed = torch.rand(3, 8, 8)
    for m in (_relu_free(), _relu_then_linear()):  # the second: a ReLU before layer 2, none after it
        with pytest.raises(SalienceError, match="found no ReLU.*backprop_modifier=None"):
            kv.visualize_saliency(m, -1, 0, seed, wrt_tensor="2", backprop_modifier="guided")
    # a ReLU after the wrt layer: the rule acts there
    got = kv.visualize_saliency(_relu_then_linear(), -1, 0, seed, wrt_tensor="0", backprop_modifier="guided")
    plain = kv.visualize_saliency(_relu_then_linear(), -1, 0, seed, wrt_tensor="0")
    assert got.shape == plain.shape and not (got == plain).all()


@pytest.mark.parametrize("wrt", [None, "0"])
def test_keras_vis_refusal_of_gelu_names_no_option_keras_vis_lacks(wrt):
    """keras-vis's functions take no ``unsupported=``: their refusal of a GELU said to pass it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    with pytest.raises(SalienceError, match="calls gelu") as e:
        kv.visualize_saliency(m, -1, 0, torch.rand(3, 8, 8), wrt_tensor=wrt, backprop_modifier="guided")
    assert "pass unsupported=" not in str(e.value) and "backprop_modifier=None" in str(e.value)


@pytest.mark.parametrize("modifier, named", [("guided", "salience.guided_backprop("), ("relu", "salience.deconvnet(")])
def test_keras_vis_refusal_of_gelu_names_the_modifiers_own_function(modifier, named):
    """A deconvnet modifier's refusal named ``salience.guided_backprop`` as the function that lets GELU through."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    with pytest.raises(SalienceError, match="calls gelu") as e:
        kv.visualize_saliency(m, -1, 0, torch.rand(3, 8, 8), backprop_modifier=modifier)
    assert named in str(e.value)
