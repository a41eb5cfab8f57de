"""Session 51: SmoothGrad's predicted class (``target=None``), and ``Classes.known``.

SmoothGrad's default target is each image's predicted class, the argmax of ``model(x)`` on the clean images, fixed
once and used for every noisy copy (Smilkov et al. 2017 explain the class the model predicts for x). The references:
the call with the classes given as ``model(x).argmax(1)`` (the same passes: the same bits), and the paper's formula
written out here (the mean over the same noise stream of the gradient of that class's score). Session 51 measured the
class pass (benchmarks/sg-class-s51.md, docs/performance.md): it is the forward of the clean images itself, one pass
without gradients before the copies' passes; the alternative of carrying the clean images as extra rows of the first
chunk cost more than the pass at 4 images and on resnet50, so the design stays, and the pass count is pinned here.

``Classes.known(values, outputs=k)`` is the way to make classes known to fit a model of ``k`` outputs (an argmax of its
scores): their range is not checked in each pass against an output of ``k`` classes, and still is against any other.
Before, ``Predicted.resolved`` and integrated gradients' ``_ClassOnPath`` set the private ``Classes._fits`` from
outside.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import salience
from salience import targets as _targets
from salience._core.errors import SalienceError
from salience.targets import Classes, Predicted


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


class _Tiny(nn.Module):
    """A small conv net ending in a softmax (the class is the pre-softmax argmax, the score taken before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(torch.relu(self.conv(x)).flatten(1)), dim=1)


def _tiny() -> nn.Module:
    torch.manual_seed(1)
    return _Tiny().eval()


def _images(b: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _predicted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if isinstance(model, _Tiny):  # the scores before its softmax (strip_softmax), argmax unchanged
        out = out.log()
    return out.argmax(1)


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_target_none_is_the_predicted_classes_given(size: int) -> None:
    model, x = _resnet18(), _images(2, size)
    given = salience.smoothgrad(model, x, _predicted(model, x), samples=6, reduce=None, seed=3)
    default = salience.smoothgrad(model, x, None, samples=6, reduce=None, seed=3)
    assert torch.equal(default, given)


def test_tiny_target_none_is_the_predicted_classes_given_also_reduced() -> None:
    model, x = _tiny(), _images(3, 8)
    for reduce in (None, "max_abs"):
        given = salience.smoothgrad(model, x, _predicted(model, x), samples=5, reduce=reduce, seed=[4, 5, 6])
        default = salience.smoothgrad(model, x, None, samples=5, reduce=reduce, seed=[4, 5, 6])
        assert torch.equal(default, given)


def test_tiny_target_none_is_the_papers_formula() -> None:
    """The mean over the documented noise stream (one int seed: a ``randn`` of the batch's shape per copy from a
    generator seeded with it; sigma = noise * (max - min) per image) of the gradient of each image's predicted
    class's score before the softmax, written out."""
    model, x, samples, noise = _tiny(), _images(2, 8, seed=7), 4, 0.2
    cls = _predicted(model, x)
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    gen = torch.Generator().manual_seed(11)
    total = torch.zeros(x.shape, dtype=torch.float64)
    for _ in range(samples):
        xs = (x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)).requires_grad_(True)
        scores = model.fc(torch.relu(model.conv(xs)).flatten(1))
        total += torch.autograd.grad(scores.gather(1, cls.view(-1, 1)).sum(), xs)[0].double()
    got = salience.smoothgrad(model, x, None, samples=samples, noise=noise, reduce=None, seed=11)
    torch.testing.assert_close(got, (total / samples).float(), rtol=1e-5, atol=1e-7)


def test_a_tie_takes_the_first_of_the_tied_classes() -> None:
    """Two classes with the same weights tie on every image: the predicted class is the first (``argmax``'s rule, as
    ``model(x).argmax(1)``), not the other."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    with torch.no_grad():
        model[1].weight[2] = model[1].weight[1] * 0 + 5.0
        model[1].weight[1] = 5.0
        model[1].bias[1] = model[1].bias[2] = 10.0
    x = _images(2, 4)
    assert _predicted(model, x).tolist() == [1, 1]
    default = salience.smoothgrad(model, x, None, samples=3, reduce=None, seed=0)
    assert torch.equal(default, salience.smoothgrad(model, x, [1, 1], samples=3, reduce=None, seed=0))


def _passes(model: nn.Module, call) -> list[tuple[int, bool, bool]]:
    """The forward passes of a warm ``call()`` (a first call runs the memory probe's pass first): the batch size,
    whether gradients were on, whether the input was the clean images ``x`` of the call (by value)."""
    seen: list[tuple[int, bool, torch.Tensor]] = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[0], torch.is_grad_enabled(),
                                                                   a[0].detach().clone())))
    try:
        call()
        seen.clear()
        call()
    finally:
        h.remove()
    return seen


def test_the_class_is_one_pass_of_the_clean_images_without_gradients() -> None:
    """``target=None``: one forward of the B clean images, gradients off, before the copies' gradient passes (which
    are those of the call with the classes given); no pass of the clean images with gradients, none repeated."""
    model, x = _resnet18(), _images(2, 32)
    cls = _predicted(model, x)
    default = _passes(model, lambda: salience.smoothgrad(model, x, None, samples=8, reduce=None))
    given = _passes(model, lambda: salience.smoothgrad(model, x, cls, samples=8, reduce=None))
    (n, grad, seen_x), rest = default[0], default[1:]
    assert (n, grad) == (2, False) and torch.equal(seen_x, x)
    assert [(m, g) for m, g, _ in rest] == [(m, g) for m, g, _ in given]
    assert all(g for _, g, _ in given) and sum(m for m, _, _ in given) == 8 * 2
    assert not any(m == 2 and torch.equal(t, x) for m, _, t in given)


def test_target_none_checks_no_class_range_in_its_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The predicted classes are an argmax of the model's output: never out of range, not checked (a
    synchronization); classes given as a tensor are checked, once per call."""
    calls: list[int] = []
    real = _targets._check_range
    monkeypatch.setattr(_targets, "_check_range", lambda idx, k: (calls.append(k), real(idx, k))[1])
    model, x = _tiny(), _images(2, 8)
    salience.smoothgrad(model, x, None, samples=4, reduce=None)
    assert calls == []
    salience.smoothgrad(model, x, _predicted(model, x), samples=4, reduce=None)
    assert calls == [5]


def test_classes_known_skips_the_range_check_for_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = _targets._check_range
    monkeypatch.setattr(_targets, "_check_range", lambda idx, k: (calls.append(k), real(idx, k))[1])
    out = torch.randn(2, 3)
    known = Classes.known(torch.tensor([2, 0]), outputs=3)  # checked once, when made (review of session 51)
    assert calls == [3]
    torch.testing.assert_close(known(out), out[[0, 1], [2, 0]])
    item = known.for_items(torch.tensor([1, 0, 1]))  # the targets of items (copies) derived from it skip it too
    torch.testing.assert_close(item(out.repeat(2, 1)[:3]), out.repeat(2, 1)[:3][[0, 1, 2], [0, 2, 0]])
    assert calls == [3]
    Classes(torch.tensor([2, 0]))(out)  # made the plain way: checked
    assert calls == [3, 3]


def test_classes_made_the_plain_way_still_refuse_a_class_out_of_range() -> None:
    with pytest.raises(SalienceError, match="target class 3 is out of range for a model with 3 outputs"):
        Classes(torch.tensor([3, 0]))(torch.randn(2, 3))


def test_classes_known_for_one_width_are_checked_against_another() -> None:
    """Known to fit 5 outputs, scored on an output of 3: checked, and refused."""
    with pytest.raises(SalienceError, match="target class 4 is out of range for a model with 3 outputs"):
        Classes.known(torch.tensor([4, 0]), outputs=5)(torch.randn(2, 3))
    assert Classes.known(torch.tensor([2, 0]), outputs=5)(torch.zeros(2, 3)).shape == (2,)


def test_predicted_resolved_is_known_classes() -> None:
    out = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    top = Predicted().resolved(out)
    assert isinstance(top, Classes) and top.index.tolist() == [1, 0]
    assert Classes.known(torch.tensor([1, 0]), outputs=3).index.tolist() == [1, 0]


@pytest.mark.parametrize("values", [torch.tensor([[1, 0]]), torch.tensor([1.0, 0.0]), torch.tensor(1)])
def test_classes_known_takes_one_long_class_per_item(values: torch.Tensor) -> None:
    with pytest.raises(SalienceError, match="known classes are a \\(B,\\) long tensor"):
        Classes.known(values, outputs=3)
