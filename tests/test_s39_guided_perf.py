"""The performance settings on the methods whose passes run a backprop rule or hook a layer (guided backprop,
deconvnet, Grad-CAM and its family, Guided Grad-CAM): ``precision`` (autocast around the pass) is applied; the
options that cannot be (``compile``: a compiled graph does not see the rule's interception nor the layer's hook;
``fold_batchnorm``: the folded copy has not the hooked layer) are said by one warning per method and option."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience.methods import _multi

METHODS = {
    "guided_backprop": lambda m, x: salience.guided_backprop(m, x, 1, reduce=None),
    "deconvnet": lambda m, x: salience.deconvnet(m, x, 1, reduce=None),
    "gradcam": lambda m, x: salience.gradcam(m, x, 1, layer="2"),
    "hirescam": lambda m, x: salience.hirescam(m, x, 1, layer="2"),
    "guided_gradcam": lambda m, x: salience.guided_gradcam(m, x, 1, layer="2", reduce=None),
}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 8, 8)


@pytest.fixture(autouse=True)
def fresh_warnings():
    getattr(_multi, "_UNAPPLIED", set()).clear()
    yield
    getattr(_multi, "_UNAPPLIED", set()).clear()


def _dtypes_seen(model: nn.Module, call) -> tuple[torch.Tensor, set]:
    """``call()``'s result and the dtypes the first convolution's outputs had during it."""
    seen: set = set()
    handle = model[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try:
        return call(), seen
    finally:
        handle.remove()


@pytest.mark.parametrize("name", list(METHODS))
def test_precision_set_for_the_process_runs_the_pass_under_autocast(name, x):
    m = _net()
    ref, plain_dtypes = _dtypes_seen(m, lambda: METHODS[name](m, x))
    assert plain_dtypes == {torch.float32}
    prev = salience.set_performance(precision="bf16")
    try:
        got, dtypes = _dtypes_seen(m, lambda: METHODS[name](m, x))
    finally:
        salience.set_performance(**vars(prev))
    assert dtypes == {torch.bfloat16}  # was float32: the setting silently not applied
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.equal(got, ref)
    torch.testing.assert_close(got, ref, rtol=0.1, atol=0.05 * ref.abs().max().item())
    # a block of the thread as well
    with salience.performance(precision="bf16"):
        again, dtypes = _dtypes_seen(m, lambda: METHODS[name](m, x))
    assert dtypes == {torch.bfloat16} and torch.equal(again, got)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("option", [{"compile": True}, {"fold_batchnorm": True}])
def test_an_option_not_applied_is_said_once(name, option, x):
    m = _net()
    ref = METHODS[name](m, x)
    (key, value), = option.items()
    with salience.performance(**option):
        with pytest.warns(UserWarning, match=rf"{name}: {key}={value!r} is not applied") as record:
            got = METHODS[name](m, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: not again
            METHODS[name](m, x)
    assert record[0].filename == __file__  # names the user's line
    assert torch.equal(got, ref)  # the passes ran as without the option


def test_defaults_say_nothing(x):
    m = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in METHODS.values():
            call(m, x)


@pytest.mark.parametrize("name", list(METHODS))
def test_channels_last_set_for_the_process_runs_the_pass_in_that_layout(name, x):
    """``memory_format="channels_last"``: the layer's input (the model's input, prepared by the run) is channels-last
    during the pass, the map equals the default layout's within float rounding, and the model comes back as it was
    (its parameters' strides included)."""
    from conftest import unchanged

    m = _net()
    ref = METHODS[name](m, x)
    layouts = []
    handle = m[0].register_forward_pre_hook(
        lambda mod, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        with unchanged(m), salience.performance(memory_format="channels_last"):
            got = METHODS[name](m, x)
    finally:
        handle.remove()
    assert layouts == [True] * len(layouts) and layouts  # was contiguous: the setting not applied
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_smoothgrad_of_guided_backprop_says_its_compile_is_not_applied_to_the_ruled_passes(x):
    """Inside a many-pass method's chunk the method's own options are in force: SmoothGrad's ``compile=`` did not
    reach its ruled passes (they run eagerly), without a word."""
    m = _net()
    with pytest.warns(UserWarning, match=r"guided_backprop: compile='eager' is not applied"):
        salience.smoothgrad(m, x, 1, method=salience.guided_backprop, samples=2, compile="eager")


@pytest.mark.parametrize("option", [{"compile": True}, {"fold_batchnorm": True}, {"precision": "bf16"},
                                    {"memory_format": "channels_last"}])
def test_eigencam_says_the_options_its_pass_does_not_apply(option, x):
    """Eigen-CAM's pass (the layer's output without gradients, under its own guard) applies none of the options:
    said once per process, as for the methods above (it was silent)."""
    m = _net()
    ref = salience.eigencam(m, x, layer="2")
    (key, value), = option.items()
    with salience.performance(**option):
        with pytest.warns(UserWarning, match=rf"eigencam: {key}={value!r} is not applied"):
            got = salience.eigencam(m, x, layer="2")
    assert torch.equal(got, ref)
