"""Integrated Gradients under ``precision="fp16"`` refuses a gradient past float16's 65504 (a ``SalienceError`` saying to
use "bf16" or "fp32"), as the other gradient methods do: the map came back NaN with only a completeness warning.
SmoothGrad of it (and of vanilla / input x gradient) goes through the same check: SmoothGrad's own ``precision`` /
``memory_format`` / ``compile`` keywords reach a wrapped many-pass method that names them (its passes ran under the
settings, float32, the keywords lost). The model: two linear layers of
weight 300 (each fits float16), so the input gradient is 300 * 300 = 90,000 under CPU fp16 autocast; its inputs are
small enough that the forward pass stays in range."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError


def _loud() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[1].weight.fill_(300.0), net[1].bias.zero_()
        net[3].weight.copy_(torch.tensor([[300.0], [-300.0]])), net[3].bias.zero_()
    return net.eval()


X = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e-3

CALLS = {
    "integrated_gradients": lambda m, **kw: salience.integrated_gradients(m, X, 0, steps=8, **kw),
    "integrated_gradients_gap": lambda m, **kw: salience.integrated_gradients(m, X, 0, steps=8, return_gap=True, **kw),
    "ig_gausslegendre": lambda m, **kw: salience.integrated_gradients(m, X, 0, steps=8, rule="gausslegendre", **kw),
    "smoothgrad_of_ig": lambda m, **kw: salience.smoothgrad(m, X, 0, method=salience.integrated_gradients, samples=4,
                                                            steps=4, **kw),
    # these two guard existing behaviour (refused before this change too, through vanilla's check)
    "smoothgrad": lambda m, **kw: salience.smoothgrad(m, X, 0, samples=4, **kw),
    "input_x_gradient": lambda m, **kw: _set(kw, lambda: salience.input_x_gradient(m, X, 0)),
}


def _set(kw: dict, call):
    """A one-pass method takes no precision=: the same under ``salience.performance``."""
    with salience.performance(**kw):
        return call()


@pytest.mark.parametrize("name", list(CALLS))
def test_fp16_overflow_is_refused(name):
    m = _loud()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no completeness warning about a NaN map: a refusal
        torch.manual_seed(0)  # SmoothGrad's noise: the same in every call
        ref = CALLS[name](m)
        ref = ref.attributions if hasattr(ref, "attributions") else ref
        assert torch.isfinite(ref).all()
        for precision in ("bf16", "fp32"):  # float32's range: the same map, to bf16's precision
            torch.manual_seed(0)
            got = CALLS[name](m, precision=precision)
            got = got.attributions if hasattr(got, "attributions") else got
            # the documented bf16 bound on a CPU (docs/performance.md, "precision"; tests/test_performance.py's
            # BF16_ATOL): the largest difference at most 0.1 of the map's largest value (measured 1.2e-3; fp32 0)
            assert torch.isfinite(got).all() and (got - ref).abs().max() <= 0.1 * ref.abs().max(), (name, precision)
        with pytest.raises(SalienceError, match=r"overflow float16 .*use precision='bf16' .* or 'fp32'"):
            CALLS[name](m, precision="fp16")
        with salience.performance(precision="fp16"), pytest.raises(SalienceError, match="overflow float16"):
            CALLS[name](m)


def test_fp16_in_range_is_not_refused():
    """Guards existing behaviour (passed before this change too): only an overflow is refused."""
    m = _loud()
    with torch.no_grad():
        m[1].weight.fill_(30.0)  # 30 * 300 = 9,000: within float16
    got = salience.integrated_gradients(m, X, 0, steps=8, precision="fp16")
    ref = salience.integrated_gradients(m, X, 0, steps=8)
    # the gradient 30 * 300 = 9,000 is exact in float16 (spacing 8 there), so the map is fp32's (measured: equal);
    # rtol=1e-2, about 20 of float16's unit roundoffs (2 ** -11), leaves room for another backend's rounding
    assert torch.isfinite(got).all() and torch.allclose(got, ref, rtol=1e-2, atol=1e-6)


def _seen(call) -> list:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    seen: list = []
    m[0].register_forward_pre_hook(lambda mod, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    m[0].register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # steps=2: a completeness warning, not the point
        call(m)
    return seen


@pytest.mark.parametrize("inner", [salience.integrated_gradients, salience.rise])
def test_smoothgrad_gives_its_pass_options_to_a_many_pass_method(inner):
    kw = {"steps": 2} if inner is salience.integrated_gradients else {"masks": 4}
    bf16 = _seen(lambda m: salience.smoothgrad(m, torch.rand(1, 3, 8, 8), 0, method=inner, samples=2, precision="bf16",
                                               **kw))
    assert torch.bfloat16 in bf16 and torch.float32 not in bf16[1:]  # every pass of the copies (after the target's)
    cl = _seen(lambda m: salience.smoothgrad(m, torch.rand(1, 3, 8, 8), 0, method=inner, samples=2,
                                             memory_format="channels_last", **kw))
    assert True in cl


def test_a_method_taking_any_keyword_is_not_given_them():
    """Guards existing behaviour (passed before this change too): a ``**kw`` method is not handed the pass options."""
    got = []

    def mine(model, x, target, **kw):
        got.append(sorted(kw))
        return salience.vanilla(model, x, target, **kw)

    _seen(lambda m: salience.smoothgrad(m, torch.rand(1, 3, 8, 8), 0, method=mine, samples=2, precision="bf16"))
    assert got and all("precision" not in k for k in got)
