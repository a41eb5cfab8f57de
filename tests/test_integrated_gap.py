"""Integrated Gradients warns when its completeness gap says the map cannot be trusted: closed forms
where the trapezoid is far off (and where it is exact), once per call through SmoothGrad and once
per dataset run, and the cost of the check in passes."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import salience
from nets import TanhSpike
from salience.methods.integrated import GAP_WARNING, CompletenessWarning, quadrature


class Cubic(nn.Module):
    """``f(x) = s^2 (s - c)``: ``f = 0`` at the black baseline and where ``s = c``."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1)
        return (s * s * (s - self.c))[:, None]


def _gaps(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [w.message for w in caught if issubclass(w.category, CompletenessWarning)]


def _tanh_trapezoid(a: float, b: float, c: float, s: float, steps: int) -> tuple[float, float]:
    """By hand: the trapezoid's ``sum(IG) = s * sum_k w_k a b sech^2(b (alpha_k s - c))`` and
    ``f(x) - f(x')`` of :class:`TanhSpike` from the black baseline."""
    nodes, weights = [k / (steps - 1) for k in range(steps)], [1 / (steps - 1)] * steps
    weights[0] /= 2
    weights[-1] /= 2
    total = s * sum(w * a * b / math.cosh(b * (al * s - c)) ** 2 for al, w in zip(nodes, weights))
    return total, a * (math.tanh(b * (s - c)) - math.tanh(-b * c))


def test_a_gradient_spike_at_the_baseline_is_warned_with_its_gap():
    """Image 0 (s = 1): the baseline's gradient a*b = 200 weighs 1/14 in the 8-point trapezoid, so
    sum(IG) ~ 14.3 against f(x) - f(x') ~ 2: warned, its relative gap as by hand. Image 1
    (s = 0.004, b s = 0.4): the integrand is smooth there, its gap tiny: not named."""
    a, b, steps = 2.0, 100.0, 8
    x = torch.cat([torch.full((1, 1, 2, 2), 0.25), torch.full((1, 1, 2, 2), 0.001)])
    res, found = _gaps(lambda: salience.integrated_gradients(TanhSpike(a, b), x, 0, steps=steps, return_gap=True))
    assert len(found) == 1
    w = found[0]
    assert w.images == [0] and w.steps == steps
    total, delta = _tanh_trapezoid(a, b, 0.0, 1.0, steps)
    assert total == pytest.approx(200 / 14, rel=1e-6)  # the baseline's term: the rest is < 1e-9
    assert float(res.gap[0]) == pytest.approx(total - delta, rel=1e-5)
    assert float(res.delta[0]) == pytest.approx(delta, rel=1e-6)
    assert w.relative_gaps[0] == pytest.approx(abs(total - delta) / abs(delta), rel=1e-5)
    assert w.relative_gaps[0] > 5 * GAP_WARNING
    small_total, small_delta = _tanh_trapezoid(a, b, 0.0, 0.004, steps)
    assert float(res.gap[1]) == pytest.approx(small_total - small_delta, abs=1e-6)
    assert float(res.relative_gap[1]) < 0.01
    text = str(w)
    for said in ("image 0", "steps=8", "baseline='blur'", "rule='gausslegendre'", "--steps"):
        assert said in text
    assert "image 1" not in text
    # the advice holds: Gauss-Legendre does not take the baseline's gradient, and more steps shrink it
    for kw in ({"rule": "gausslegendre", "steps": 32}, {"steps": 2048}):
        _, again = _gaps(lambda: salience.integrated_gradients(TanhSpike(a, b), x, 0, **kw))
        assert again == [], kw


def test_equal_end_scores_with_a_nonzero_attribution_sum_are_warned():
    """``f = s^2 (s - c)`` with ``s = c = 2``: ``f(x) = f(x') = 0``, true IG is 0 everywhere, but the
    2-point trapezoid gives each pixel ``0.5 * (0 + f'(2)) / 2 * ...``: ``sum(IG) = s * f'(s) / 2 =
    2 * 4 / 2 = 4``. The gap 4 is measured against the floor ``1e-3 * sum|IG| = 0.004`` (the scores
    are 0): relative gap 1000."""
    x = torch.full((1, 1, 2, 2), 0.5)
    res, found = _gaps(lambda: salience.integrated_gradients(Cubic(2.0), x, 0, steps=2, reduce=None, return_gap=True))
    torch.testing.assert_close(res.attributions, torch.full_like(x, 1.0))
    assert float(res.delta[0]) == 0.0 and float(res.gap[0]) == pytest.approx(4.0)
    assert len(found) == 1 and found[0].images == [0]
    assert found[0].relative_gaps[0] == pytest.approx(4.0 / 0.004, rel=1e-5)


def test_exact_closed_forms_and_a_demo_model_are_not_warned():
    """A linear model (gap 0 in closed form) and a bias-free ReLU net: ``f(a x) = a f(x)`` on the path
    from 0, so the gradient is constant along it but at the baseline itself, where every ReLU's input
    is 0 and autograd takes ReLU'(0) = 0: the trapezoid misses its first weight, gap
    ``-(f(x) - f(x')) / (2 * 31)``, 1.6 %. And demo:shapes at the default steps: no warning."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    relu = nn.Sequential(nn.Flatten(), nn.Linear(192, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    for model, missed in ((linear, 0.0), (relu, 1 / 62)):
        res, found = _gaps(lambda: salience.integrated_gradients(model, x, return_gap=True))
        assert found == []
        torch.testing.assert_close(res.gap, -missed * res.delta, atol=1e-6, rtol=1e-4)
    demo = salience.load_model("demo:shapes")
    imgs = salience.data.shapes_batch(8, seed=1).images
    _, found = _gaps(lambda: salience.integrated_gradients(demo, imgs))
    assert found == []


def test_smoothgrad_of_ig_warns_once_per_call():
    """Noisy copies of the spike, run in 4 chunks: one warning naming image 0 (all its copies), not
    one per chunk; image 1 (far from the spike) not named."""
    x = torch.cat([torch.full((1, 1, 2, 2), 0.25), torch.full((1, 1, 2, 2), 0.001)])
    _, found = _gaps(lambda: salience.smoothgrad(TanhSpike(2.0, 100.0), x, 0, method=salience.integrated_gradients,
                                                 samples=4, noise=0.0, chunk=2, steps=8))
    assert len(found) == 1
    assert found[0].images == [0] and "(on 4 of SmoothGrad's noisy copies)" in str(found[0])


class TwoClassSpike(TanhSpike):
    """Classes ``[f, -f]`` of :class:`TanhSpike` (class 0 predicted where ``s > c``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = super().forward(x)
        return torch.cat([f, -f], 1)


def test_a_dataset_run_warns_once_naming_the_paths(tmp_path):
    """Three batches of spiking images: one warning for the run, naming the first batch's images by path."""
    x = torch.full((6, 1, 2, 2), 0.25)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long))
    _, found = _gaps(lambda: salience.explain_dataset(
        TwoClassSpike(2.0, 100.0), ds, ["integrated_gradients"], tmp_path / "run", batch_size=2, workers=0, shard_size=2,
        method_options={"integrated_gradients": {"steps": 8}}))
    assert len(found) == 1
    assert found[0].images == ["TensorDataset[0]", "TensorDataset[1]"]


@pytest.mark.parametrize("rule, target, extra", [
    ("trapezoid", 0, 0),  # both ends on the path
    ("right", 0, 1),  # f(x') missing: one forward pass of B images
    ("left", None, 0),  # f(x) from the pass that fixes the predicted class, f(x') on the path
    ("middle", None, 1),  # f(x) from that pass, f(x') one forward pass
    ("middle", 0, 0),  # both missing: not checked (two passes), unless return_gap
])
def test_the_check_costs_at_most_one_forward_pass_of_the_batch(rule, target, extra):
    """Forward passes counted (images per pass). The cubic at ``s = c``: every rule's 5 points leave
    a gap (0.25 to 0.96 against ``f(x) = f(x') = 0``), so a check that runs warns."""
    model = Cubic(2.0)
    x = torch.full((3, 1, 2, 2), 0.5)
    seen: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        _, found = _gaps(lambda: salience.integrated_gradients(model, x, target, steps=5, rule=rule, chunk=15))
    finally:
        handle.remove()
    nodes, _ = quadrature(rule, 5)
    fixing = 0 if target is not None or 1.0 in nodes else 3  # the predicted class's own pass, off the path
    assert sum(seen) == 5 * 3 + fixing + 3 * extra
    checked = not (rule == "middle" and target is not None)
    assert len(found) == (1 if checked else 0)
