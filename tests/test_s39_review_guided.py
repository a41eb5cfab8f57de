"""Review of the merge e91f5c2 (guided methods' refusals, default_methods without them, precision on the hooked
passes): what it left wrong, each test failing against the merge."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import salience
from salience import SalienceError
from salience.methods import default_methods

GUIDED = {"guided_backprop", "deconvnet", "guided_gradcam"}


class _ReluModulesAndFunctionalGelu(nn.Module):
    """ReLU modules, and a GELU called functionally (no module says so): guided backprop refuses it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc(F.gelu(self.c2(self.relu(self.c1(x)))).mean((2, 3)))


class _FunctionalReluCNN(nn.Module):
    """A CNN whose ReLUs are F.relu calls (torchvision's Inception v3, GoogLeNet): no activation module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def _forwards(model: nn.Module, call) -> tuple:
    """``call()``'s result and how many times the model's forward ran during it."""
    n = [0]
    handle = model.register_forward_pre_hook(lambda m, i: n.__setitem__(0, n[0] + 1))
    try:
        return call(), n[0]
    finally:
        handle.remove()


def test_a_functional_gelu_beside_relu_modules_leaves_the_guided_methods_out():
    """The module scan saw the ReLU modules and kept the guided methods, which then all refuse the F.gelu."""
    model = _ReluModulesAndFunctionalGelu().eval()
    x = torch.rand(1, 3, 8, 8)
    for name in GUIDED:
        kwargs = {"layer": "c2"} if name == "guided_gradcam" else {}
        try:
            salience.METHODS[name](model, x, **kwargs)
            raise AssertionError(f"{name} ran")
        except SalienceError as e:
            assert "gelu" in str(e)
    methods = default_methods(model, x)
    assert not GUIDED & set(methods)
    assert {"vanilla", "gradcam"} <= set(methods)


def test_default_methods_runs_one_forward_on_a_cnn_with_functional_relus():
    """The default-layer search's pass says which activations ran: no second pass under the guided rule (there were
    two on a CNN whose ReLUs are F.relu, one before the merge)."""
    model = _FunctionalReluCNN().eval()
    x = torch.rand(2, 3, 8, 8)
    methods, n = _forwards(model, lambda: default_methods(model, x))
    assert GUIDED <= set(methods)
    assert n == 1


class _Fp16Overflow(nn.Module):
    """Finite scores whose gradients overflow float16 (past 65504): ``(z * 1e-6) * 1e5`` gives the gradient 1e5 at
    ``z * 1e-6``; float32 and bfloat16 (float32's range) hold it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return (self.head(self.f(x).mean((2, 3))) * 1e-6) * 1e5


_FP16_CALLS = {
    "vanilla": lambda m, x: salience.vanilla(m, x, 1),
    "guided_backprop": lambda m, x: salience.guided_backprop(m, x, 1),
    "deconvnet": lambda m, x: salience.deconvnet(m, x, 1),
    "gradcam": lambda m, x: salience.gradcam(m, x, 1, layer="f.2"),
    "gradcam_plus_plus": lambda m, x: salience.gradcam_plus_plus(m, x, [0, 1], layer="f.2"),
    "layercam (fused)": lambda m, x: salience.layercam(m, x, 1, layer=["f.0", "f.2"]),
    "guided_gradcam": lambda m, x: salience.guided_gradcam(m, x, 1, layer="f.2"),
    "smoothgrad of guided backprop": lambda m, x: salience.smoothgrad(m, x, 1, method=salience.guided_backprop,
                                                                      samples=2),
}


@pytest.mark.parametrize("name", list(_FP16_CALLS))
def test_gradients_that_overflow_float16_under_precision_fp16_are_refused(name):
    """``precision="fp16"`` (autocast) on a pass whose gradients pass 65504: the map came back NaN / infinite in
    float32, without a word (the merge put the guided and CAM passes under the option; vanilla was so before);
    a SalienceError now says to use bf16 or fp32. bf16 gives a finite map close to fp32's."""
    m = _Fp16Overflow().eval()
    x = torch.rand(2, 3, 8, 8)
    ref = _FP16_CALLS[name](m, x)
    assert torch.isfinite(ref).all()
    with salience.performance(precision="fp16"):
        with pytest.raises(SalienceError, match=r"overflow float16 under precision='fp16'.*'bf16'"):
            _FP16_CALLS[name](m, x)
    with salience.performance(precision="bf16"):
        assert torch.isfinite(_FP16_CALLS[name](m, x)).all()


def test_keras_vis_wrt_tensor_with_a_modifier_runs_its_ruled_pass_under_the_precision_set():
    """keras-vis's ``wrt_tensor=`` with ``backprop_modifier=``: a ruled pass like guided backprop's, which the merge
    put under ``precision`` (autocast) and ``memory_format``; this one ran in float32 without a word. Now its pass
    runs under bf16, the map in the input's dtype, close to fp32's."""
    from salience.compat import keras_vis as kv

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.rand(3, 8, 8)
    seen: set = set()
    handle = m[2].register_forward_hook(lambda mod, i, o: seen.add(o.dtype))

    def call():
        return kv.visualize_saliency(m, -1, filter_indices=1, seed_input=x, backprop_modifier="guided",
                                     wrt_tensor=m[0])
    try:
        ref = call()
        assert seen == {torch.float32}
        seen.clear()
        with salience.performance(precision="bf16"):
            got = call()
    finally:
        handle.remove()
    assert seen == {torch.bfloat16}  # was float32: the setting silently not applied
    assert got.dtype == ref.dtype
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(ref), rtol=0.1, atol=0.05)


def test_memory_format_auto_is_not_said_unapplied_by_a_single_pass():
    """``memory_format="auto"`` is measured over a many-pass call's chunks only: no single pass applies it (vanilla,
    Grad-CAM, guided backprop say nothing). Eigen-CAM's new warning said it "not applied" all the same, once per
    process; ``"channels_last"`` is still said."""
    from salience.methods import _multi

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    _multi._UNAPPLIED.clear()
    try:
        with salience.performance(memory_format="auto"), warnings.catch_warnings():
            warnings.simplefilter("error")
            for name in ("vanilla", "gradcam", "guided_backprop", "eigencam"):
                salience.METHODS[name](m, x, **({"layer": "2"} if "cam" in name else {}))
        with salience.performance(memory_format="channels_last"):
            with pytest.warns(UserWarning, match="eigencam: memory_format='channels_last' is not applied"):
                salience.eigencam(m, x, layer="2")
    finally:
        _multi._UNAPPLIED.clear()


def test_a_model_naming_its_layer_is_decided_by_that_layers_pass():
    """A model that names its Grad-CAM layer (``salience_default_layer``: no search) has the one pass recording that
    layer count its activations: the F.gelu beside ReLU modules leaves the guided methods out, with no pass more
    than before the merge (that pass and attention rollout's)."""
    model = _ReluModulesAndFunctionalGelu().eval()
    model.salience_default_layer = "c2"
    x = torch.rand(2, 3, 8, 8)
    methods, n = _forwards(model, lambda: default_methods(model, x))
    assert not GUIDED & set(methods) and "gradcam" in methods
    assert n == 2
