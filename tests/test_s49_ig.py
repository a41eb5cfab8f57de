"""Session 49: integrated gradients with ``target=None`` no longer splits the path's chunks: the predicted class is
fixed on ``x`` in a forward pass of its own (the review of session 49: not read off the path's first chunk, whose
rounding could break a near tie the other way, tests/test_s49_rvig.py) and the path runs the chunks of the classes
given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience


def _model() -> nn.Module:
    """A small CNN whose top class changes along the path: class 0 near the black baseline (its bias), another at
    the images, so a class read per point (not fixed on x) gives another map."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].bias.zero_()
        m[4].bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
        m[4].weight.copy_(torch.tensor([[-1.0, -1.0, -1.0, -1.0], [2.0, 1.0, 0.0, 1.0], [0.0, 1.0, 2.0, 1.0]]))
    return m.eval()


def _images(b: int) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(b)) + 0.5


def _reference(model: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The paper's formula by hand, in float64: ``x * sum_j w_j df_c/dx(a_j x)``, black baseline, trapezoid
    weights ``1/(n-1)`` halved at both ends, ``c`` each image's top class at ``x``."""
    m = model.double()
    x = x.double()
    try:
        with torch.no_grad():
            c = m(x).argmax(1)
        total = torch.zeros_like(x)
        for j in range(steps):
            a = j / (steps - 1)
            w = (0.5 if j in (0, steps - 1) else 1.0) / (steps - 1)
            p = (a * x).requires_grad_(True)
            (g,) = torch.autograd.grad(m(p).gather(1, c.view(-1, 1)).sum(), p)
            total += w * g
        return (x * total).float()
    finally:
        model.float()


def _passes(model: nn.Module, call) -> list[int]:
    """The batch sizes of ``model``'s forward passes in ``call()``."""
    seen: list[int] = []
    h = model.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0]))
    try:
        call()
    finally:
        h.remove()
    return seen


def test_the_class_changes_along_the_path():
    """The test model's premise: points near the baseline predict class 0, the images another class."""
    model, x = _model(), _images(3)
    with torch.no_grad():
        assert (model(x).argmax(1) != 0).all()
        assert (model(0.05 * x).argmax(1) == 0).all()


@pytest.mark.parametrize("b,chunk", [(1, 8), (3, 2), (3, 4), (2, None)])
def test_predicted_class_on_the_path_is_the_papers_map(b, chunk):
    """``target=None`` gives the hand-written IG of each image's top class at ``x``, whatever the chunks (``chunk``
    smaller than ``B``: x's items span several passes, and points of other alphas share a pass with them)."""
    model, x = _model(), _images(b)
    got = salience.integrated_gradients(model, x, steps=9, reduce=None, chunk=chunk)
    torch.testing.assert_close(got, _reference(model, x, 9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b,chunk", [(1, 8), (3, 4), (2, 6)])
def test_the_path_is_not_split_for_the_predicted_class(b, chunk):
    """With ``target=None`` the passes (batch sizes) of the classes given, no pass of x of its own since session 50
    (the class read off x's rows of the first chunk where its top two scores are far apart, tests/test_s50_igtie.py;
    session 49 ran x's forward pass of B images first): main's gradient pass of x split the path
    (``[1, 8, 8, 8, 7]`` for 32 steps of 1 image in chunks of 8, not ``[8, 8, 8, 8]``)."""
    model, x = _model(), _images(b)
    with torch.no_grad():
        top = model(x).argmax(1)
    none = _passes(model, lambda: salience.integrated_gradients(model, x, steps=32, chunk=chunk))
    given = _passes(model, lambda: salience.integrated_gradients(model, x, top, steps=32, chunk=chunk))
    assert none == given
    assert sum(given) == 32 * b


def test_completeness_check_takes_no_pass_more():
    """``return_gap=True`` with ``target=None`` (trapezoid: both ends on the path): the gap from the path's own
    scores, no forward pass added (nor, since session 50, x's of its own for the class), and ``sum(IG) - gap`` equals ``f(x) - f(x')`` of the top class."""
    model, x = _model(), _images(2)
    out: list = []
    seen = _passes(model, lambda: out.append(salience.integrated_gradients(model, x, steps=16, chunk=8,
                                                                           reduce=None, return_gap=True)))
    assert seen == [8, 8, 8, 8]
    res = out[0]
    with torch.no_grad():
        f = model(x)
        c = f.argmax(1)
        delta = f.gather(1, c.view(-1, 1))[:, 0] - model(torch.zeros_like(x)).gather(1, c.view(-1, 1))[:, 0]
    torch.testing.assert_close(res.delta, delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.attributions.flatten(1).sum(1) - res.gap, delta, rtol=1e-4, atol=1e-5)


def test_several_targets_with_the_predicted_class():
    """A predicted class beside a given one (``[None, 2]``): each as its own call gives it."""
    model, x = _model(), _images(2)
    both = salience.integrated_gradients(model, x, [salience.targets.predicted(), salience.targets.classes(2)],
                                         steps=9, reduce=None, chunk=3)
    torch.testing.assert_close(both[:, 0], _reference(model, x, 9), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:, 1], salience.integrated_gradients(model, x, 2, steps=9, reduce=None),
                               rtol=1e-5, atol=1e-6)


def test_rules_without_x_still_fix_the_class_on_x():
    """``rule="left"`` has no ``a = 1``: the class is still read at ``x`` (a forward pass of its own), not per
    point (near the baseline class 0)."""
    model, x = _model(), _images(2)
    with torch.no_grad():
        top = model(x).argmax(1)
    torch.testing.assert_close(salience.integrated_gradients(model, x, steps=9, rule="left", reduce=None),
                               salience.integrated_gradients(model, x, top, steps=9, rule="left", reduce=None))


def test_output_without_classes_is_refused_from_the_path():
    """``target=None`` on a model whose output is not ``(B, K)``: the class targets' SalienceError, now raised in the
    path's first pass, and the model comes back as it was (eval mode, parameters and their requires_grad)."""
    from salience._core.errors import SalienceError

    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SalienceError, match=r"class targets need a model output of shape \(B, K\)"):
        salience.integrated_gradients(model, _images(2), steps=4)
    assert model.training
    for n, p in model.named_parameters():
        assert p.requires_grad and torch.equal(p, before[n])
