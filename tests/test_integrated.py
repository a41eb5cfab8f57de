"""Integrated Gradients and input x gradient: closed forms, completeness, Captum, batching, hygiene."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.methods.integrated import quadrature
from conftest import unchanged



def _captum():
    """Captum's attribution module, the reference of the tests that compare with it. Imported
    here, not at module level, so that the closed-form and completeness tests run without Captum."""
    return pytest.importorskip("captum.attr")


def _x(b: int = 2, size: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


class SmoothNet(nn.Module):
    """Conv + softplus + tanh: a smooth function, so quadrature converges fast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(nn.functional.softplus(self.conv(x)) - 0.5)
        return self.head(h.mean((2, 3))) * 3


def _counting(model: nn.Module):
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_linear_model_closed_form():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = _x(2, 4)
    w = model[1].weight[2].view(1, 3, 4, 4)
    for rule in ("trapezoid", "gausslegendre", "left", "right", "middle"):
        attr = salience.integrated_gradients(model, x, 2, steps=3, rule=rule, reduce=None)
        torch.testing.assert_close(attr, x * w)
    base = torch.full((1, 3, 4, 4), 0.25)
    attr = salience.integrated_gradients(model, x, 2, baseline=base, steps=2, reduce=None)
    torch.testing.assert_close(attr, (x - base) * w)
    torch.testing.assert_close(salience.input_x_gradient(model, x, 2, reduce=None), x * w)
    torch.testing.assert_close(salience.input_x_gradient(model, x, 2), (x * w).abs().sum(1))


@pytest.mark.parametrize("rule, steps", [("trapezoid", 64), ("gausslegendre", 16), ("middle", 64)])
def test_completeness(rule, steps):
    model = SmoothNet()
    x = _x(3)
    res = salience.integrated_gradients(model, x, 1, steps=steps, rule=rule, reduce=None, return_gap=True)
    attr, gap = res
    with torch.no_grad():
        delta = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(res.delta, delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gap, attr.flatten(1).sum(1) - delta, rtol=1e-4, atol=1e-6)
    assert bool((res.relative_gap < 0.01).all()), res.relative_gap
    # few steps leave a visible gap, which is what the gap is for
    coarse = salience.integrated_gradients(model, x, 1, steps=2, rule="trapezoid", return_gap=True)
    assert bool((coarse.relative_gap > res.relative_gap).all())


@pytest.mark.parametrize("rule, captum_rule", [
    ("trapezoid", "riemann_trapezoid"), ("gausslegendre", "gausslegendre"), ("left", "riemann_left"),
    ("right", "riemann_right"), ("middle", "riemann_middle")])
def test_equals_captum(small_cnn, rule, captum_rule):
    x = _x(3)
    base = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(7))
    steps = 9
    with unchanged(small_cnn):
        ours = salience.integrated_gradients(small_cnn, x, [0, 3, 1], baseline=base, steps=steps, rule=captum_rule,
                                             reduce=None, chunk=4)
    small_cnn.eval()
    ref = _captum().IntegratedGradients(small_cnn).attribute(
        x, baselines=base, target=[0, 3, 1], n_steps=steps, method=captum_rule)
    if rule == "trapezoid":  # Captum's trapezoid weights sum to (n - 1) / n; ours to 1
        ref = ref * steps / (steps - 1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_equals_captum_resnet():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=5).eval()
    x = _x(2, 32)
    ours, gap = salience.integrated_gradients(model, x, steps=6, rule="gausslegendre", reduce=None, return_gap=True)
    pred = model(x).argmax(1)
    ref, delta = _captum().IntegratedGradients(model).attribute(
        x, target=pred, n_steps=6, method="gausslegendre", return_convergence_delta=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gap, delta.to(gap.dtype), rtol=1e-3, atol=1e-5)


def test_quadrature_weights():
    for rule in ("trapezoid", "gausslegendre", "left", "right", "middle"):
        nodes, w = quadrature(rule, 7)
        assert len(nodes) == len(w) == 7 and abs(sum(w) - 1) < 1e-12
        assert all(0 <= a <= 1 for a in nodes)
        # integral of a over [0, 1] is 1/2: exact but for the one-sided Riemann sums (error 1/(2n))
        expected = {"left": 0.5 - 1 / 14, "right": 0.5 + 1 / 14}.get(rule, 0.5)
        assert abs(sum(wi * a for wi, a in zip(w, nodes)) - expected) < 1e-12
    nodes, w = quadrature("gausslegendre", 5)  # exact for degree 9
    assert abs(sum(wi * a ** 9 for wi, a in zip(w, nodes)) - 0.1) < 1e-12


def test_default_target_is_the_clean_prediction_and_no_pass_is_repeated(small_cnn):
    x = _x(3)
    small_cnn.eval()
    with torch.no_grad():
        pred = small_cnn(x).argmax(1)
    calls, h = _counting(small_cnn)
    try:
        res = salience.integrated_gradients(small_cnn, x, steps=5, reduce=None, return_gap=True, chunk=3)
    finally:
        h.remove()
    # 15 path points in chunks of 3 (f(x), f(x')), x's first: the class read off them, no pass of its own (session 50)
    assert calls == [3, 3, 3, 3, 3]
    torch.testing.assert_close(res.attributions, salience.integrated_gradients(small_cnn, x, pred, steps=5, reduce=None))
    calls, h = _counting(small_cnn)
    try:
        salience.integrated_gradients(small_cnn, x, steps=5, rule="gausslegendre", return_gap=True, chunk=15)
    finally:
        h.remove()
    assert calls == [3, 15, 3]  # f(x) and class; the path; f(x')


def test_chunking_does_not_change_the_result(small_cnn):
    x = _x(3)
    ref = salience.integrated_gradients(small_cnn, x, steps=7, reduce=None, chunk=1000)
    for chunk in (1, 2, 4, None):
        torch.testing.assert_close(salience.integrated_gradients(small_cnn, x, steps=7, reduce=None, chunk=chunk),
                                   ref, rtol=1e-5, atol=1e-7)


def test_several_targets_equal_separate_calls(small_cnn):
    x = _x(3)
    t = torch.tensor([[0, 1], [2, 3], [1, 1]])
    calls, h = _counting(small_cnn)
    try:
        res = salience.integrated_gradients(small_cnn, x, t, steps=4, reduce=None, return_gap=True, chunk=6)
    finally:
        h.remove()
    assert calls == [6, 6]  # one forward per chunk for both targets
    assert res.attributions.shape == (3, 2, 3, 10, 10) and res.gap.shape == (3, 2)
    for k in range(2):
        one = salience.integrated_gradients(small_cnn, x, t[:, k], steps=4, reduce=None, return_gap=True)
        torch.testing.assert_close(res.attributions[:, k], one.attributions, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res.gap[:, k], one.gap, rtol=1e-4, atol=1e-6)
    ixg = salience.input_x_gradient(small_cnn, x, t)
    assert ixg.shape == (3, 2, 10, 10)
    torch.testing.assert_close(ixg[:, 1], salience.input_x_gradient(small_cnn, x, t[:, 1]))


def test_blur_baseline():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    from salience._core.tensors import gaussian_blur as _blur

    x = _x(1, 24)
    ours = _blur(x, 2.0)
    ref = scipy_ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 2.0, 2.0), mode="mirror", truncate=3.0)
    torch.testing.assert_close(ours, torch.from_numpy(ref), rtol=1e-5, atol=1e-6)
    # a flat image is its own blur: nothing to attribute
    model = SmoothNet()
    flat = torch.full((1, 3, 12, 12), 0.3)
    attr = salience.integrated_gradients(model, flat, 0, baseline="blur", steps=4, reduce=None)
    assert attr.abs().max() < 1e-6
    res = salience.integrated_gradients(model, x, 0, baseline="blur", steps=32, return_gap=True)
    assert bool((res.relative_gap < 0.01).all())


def test_model_unchanged(small_cnn):
    small_cnn.train()
    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)
    x = _x(2)
    with unchanged(small_cnn):
        salience.integrated_gradients(small_cnn, x, steps=3, return_gap=True)
        salience.input_x_gradient(small_cnn, x, torch.tensor([[0, 1], [1, 2]]))
    with unchanged(small_cnn), pytest.raises(SalienceError, match="out of range"):
        salience.integrated_gradients(small_cnn, x, 7, steps=3)


@pytest.mark.parametrize("kw, msg", [
    ({"baseline": torch.zeros(1, 3, 5, 5)}, "does not broadcast to x"),
    ({"baseline": torch.zeros(3, 1, 3, 10, 10)}, "does not broadcast to x"),
    ({"baseline": "grey"}, "unknown baseline"),
    ({"baseline": [0.0]}, "baseline must be None"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 1}, "trapezoid rule needs steps >= 2"),
    ({"rule": "simpson"}, "unknown rule"),
    ({"reduce": "sum"}, "unknown reduce"),
    ({"chunk": -1}, "chunk must be a positive int"),
    ({"baseline": "blur", "blur_sigma": 0}, "blur_sigma must be > 0"),
])
def test_bad_input(small_cnn, kw, msg):
    with pytest.raises(SalienceError, match=msg):
        salience.integrated_gradients(small_cnn, _x(2), **kw)


def test_an_input_that_requires_grad_gives_a_detached_map():
    """``x`` (and a baseline) that require grad, as a caller's own graph has them: the map is the plain
    tensor every other method returns, equal to the closed form of a linear model (``w * (x - x')``),
    and ``x.grad`` is untouched. IG and input x gradient returned maps with a grad_fn on the caller's
    graph (``.numpy()`` failed on them, and a later ``backward`` of the caller's went through them)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    w = lin[1].weight[1].view(1, 3, 4, 4)
    x = torch.rand(2, 3, 4, 4).requires_grad_(True)
    base = torch.rand(1, 3, 4, 4).requires_grad_(True)
    ig, gap = salience.integrated_gradients(lin, x, 1, baseline=base, steps=4, reduce=None, return_gap=True)
    ixg = salience.input_x_gradient(lin, x, 1, reduce=None)
    for m in (ig, gap, ixg):
        assert not m.requires_grad and m.grad_fn is None
    torch.testing.assert_close(ig, (w * (x - base)).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ixg, (w * x).detach(), rtol=1e-5, atol=1e-6)
    assert x.grad is None and base.grad is None and x.requires_grad
    ig.numpy(), ixg.numpy()
