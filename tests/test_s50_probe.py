"""Session 50: the engine's thrown-away memory probe, and every chunk of SmoothGrad and integrated gradients, see the
model's own state as the call found it (a forward that counts its calls, appends to a list, writes a buffer in place).

Before, the probe's pass (a gradient method's first call on a model: ``engine._probe_apart``) was thrown away but its
writes to the model's own state were not: the first call's chunks scored a model one count on, a second call (no
probe) did not, so integrated gradients' first and second calls differed (1.5x on a counter model); every chunk after
the first scored the state the chunk before left, so the map depended on the chunking; SmoothGrad's class pass
(``target=None``) left its write for the copies. The references are the papers' formulas with the model scored as the
user handed it, written out here: a linear model's closed forms (integrated gradients: ``(x - x') * dF/dx``; SmoothGrad:
``dF/dx``), and a path sum of a convolutional one with its state put back before each forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import salience
from salience._core import autograd as _autograd
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.guard import Found, model_guard


class _Counting(nn.Module):
    """``fc(x) * (1 + n)`` with ``n`` this model's count of its forwards (an int, a list's length or a buffer):
    as the user hands it (``n = 0``) each forward scores ``2 * fc(x)``."""

    def __init__(self, kind: str, features: int = 12) -> None:
        super().__init__()
        self.fc = nn.Linear(features, 3)
        self.kind = kind
        self.n = 0
        self.seen: list = []
        self.register_buffer("calls", torch.zeros(()))

    def count(self) -> float:
        if self.kind == "int":
            self.n += 1
            return float(self.n)
        if self.kind == "list":
            self.seen.append(1)
            return float(len(self.seen))
        self.calls += 1  # a buffer written in place
        return float(self.calls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * (1.0 + self.count())

    def as_found(self) -> bool:
        return self.n == 0 and self.seen == [] and float(self.calls) == 0.0


KINDS = ["int", "list", "buffer"]


def _pair(kind: str) -> tuple[_Counting, torch.Tensor]:
    torch.manual_seed(0)
    return _Counting(kind), torch.randn(2, 3, 2, 2)


def _grad_as_handed(model: _Counting, target: int) -> torch.Tensor:
    """dF/dx of the model as handed (``n = 0``, so the forward scores with ``1 + 1``): ``2 * W[target]`` as (C, H, W)."""
    return (2.0 * model.fc.weight[target]).detach().reshape(3, 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_ig_first_call_equals_second_and_the_closed_form(kind: str) -> None:
    """A fresh model's first call runs the engine's memory probe (a pass of its own, thrown away); it counted, and the
    first call's path scored ``3 * fc``: the map was 1.5x the second call's. Integrated gradients of ``2 * fc`` with a
    zero baseline is ``x * 2 * W[t]`` exactly (the trapezoid rule is exact on a linear path integrand)."""
    model, x = _pair(kind)
    first = salience.integrated_gradients(model, x, 1, steps=8, reduce=None)
    assert model.as_found()
    second = salience.integrated_gradients(model, x, 1, steps=8, reduce=None)
    expected = x * _grad_as_handed(model, 1)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert model.as_found()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_ig_every_chunk_sees_the_state_found(kind: str, chunk: int) -> None:
    """16 path points of 2 images in chunks of 1 or 3 (and the engine's own): each chunk scored the state the chunk
    before left (chunk=1: scales 2 to 17): the map depended on the chunking. Now each is the closed form."""
    model, x = _pair(kind)
    out = salience.integrated_gradients(model, x, 0, steps=8, reduce=None, chunk=chunk)
    torch.testing.assert_close(out, x * _grad_as_handed(model, 0), rtol=1e-5, atol=1e-6)
    assert model.as_found()


@pytest.mark.parametrize("kind", KINDS)
def test_ig_end_passes_see_the_state_found(kind: str) -> None:
    """Rule "middle" has neither end of the path: with ``return_gap`` both end scores take a forward pass of their own
    after the path; each scored the state the path (and the other end pass) left, so ``delta = f(x) - f(x')`` was not
    the model's. Closed form: ``2 * (W x + b) - 2 * (W 0 + b) = 2 W x``."""
    model, x = _pair(kind)
    res = salience.integrated_gradients(model, x, 2, steps=4, rule="middle", reduce=None, return_gap=True)
    delta = 2.0 * (x.flatten(1) @ model.fc.weight[2].detach())
    torch.testing.assert_close(res.delta, delta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.attributions, x * _grad_as_handed(model, 2), rtol=1e-5, atol=1e-6)
    assert model.as_found()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", [1, None])
def test_smoothgrad_first_call_every_chunk_and_the_class_pass(kind: str, target) -> None:
    """SmoothGrad of a linear model is its gradient whatever the noise: ``2 * W[t]`` for the model as handed. The
    probe's count (first call), the chunk before's (chunk=3) and the class pass's (``target=None``: a forward of x for
    the class) each scaled the copies' gradients. The class of ``target=None`` is the argmax of the model's output."""
    model, x = _pair(kind)
    with torch.no_grad():
        cls = model.fc(x.flatten(1)).argmax(1)
    for chunk in (None, 3, None):
        out = salience.smoothgrad(model, x, target, samples=6, seed=0, reduce=None, chunk=chunk)
        expected = torch.stack([_grad_as_handed(model, int(c)) for c in cls]) if target is None \
            else _grad_as_handed(model, 1).expand_as(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert model.as_found()


class _Recurrent(nn.Module):
    """A convolutional model whose forward keeps ``h`` for its next call and reads it: ``relu(conv(x) + h)`` with
    ``h`` the last call's mean activation (a model as handed has ``h = 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.h = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x) + self.h)
        self.h = a.detach().mean()
        return self.fc(a.mean((2, 3)))


def _ig_reference(model: _Recurrent, x: torch.Tensor, target: int, steps: int) -> torch.Tensor:
    """Sundararajan et al.'s path sum with the trapezoid rule, zero baseline, float64, each path point scored by the
    model as handed (``h`` put back to its value before every forward)."""
    ref = _Recurrent().double()
    ref.load_state_dict(model.state_dict())
    h0 = model.h.double()
    total = torch.zeros_like(x, dtype=torch.float64)
    for i in range(steps):
        a = i / (steps - 1)
        w = (0.5 if i in (0, steps - 1) else 1.0) / (steps - 1)
        ref.h = h0.clone()
        p = (a * x.double()).requires_grad_(True)
        ref(p)[:, target].sum().backward()
        total += w * p.grad
    return total * x.double()


@pytest.mark.parametrize("memory_format", ["contiguous", "auto"])
def test_ig_of_a_recurrent_model_is_the_path_sum_of_the_model_as_handed(memory_format: str) -> None:
    """A model reading the state its last call left: the first call (probe), a second call and chunks of 3 (the
    layout probe of ``memory_format="auto"`` times real chunks) each equal the hand-written path sum."""
    torch.manual_seed(1)
    model, x = _Recurrent(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model.h = torch.tensor(0.05)  # a state the user set: each pass starts from it
    ref = _ig_reference(model, x, 1, 16).float()
    for chunk in (None, None, 3):
        out = salience.integrated_gradients(model, x, 1, steps=16, reduce=None, chunk=chunk,
                                            memory_format=memory_format)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        assert float(model.h) == pytest.approx(0.05)


def test_the_engines_probe_leaves_the_state_without_a_found() -> None:
    """The engine's memory probe with no ``found`` from the caller (a method that puts the state back itself, or
    none): a Found of its own around the probe, so the first chunk scores the state as found (``2 * fc``), not the
    probe's count (``3 * fc``)."""
    model, x = _pair("int")
    with model_guard(model):
        run = _perf.Run(model, x, _perf.resolve(None, None, None), tag="s50-probe-test")

        def compute(start: int, stop: int) -> torch.Tensor:
            owner = torch.arange(start, stop) % x.shape[0]
            return model(x[owner]).detach()  # (n, 3)

        sums = _engine.accumulate(compute, 2 * x.shape[0], x.shape[0], run=run, chunk=None, inference=True)
    with torch.no_grad():
        expected = 2 * (2.0 * model.fc(x.flatten(1))).double()  # two items per image, each 2 * fc(x)
    assert sums.per_item_bytes is not None  # the probe ran (a pass of its own: chunks="memory")
    torch.testing.assert_close(sums.total, expected, rtol=1e-6, atol=1e-6)
    assert model.n == 0


def test_forward_scores_calls_before_pass_before_each_chunk() -> None:
    """The one batching loop takes the per-pass hook: 5 images, 2 a pass, the state put back before each of the 3
    passes (Found's), so every row is ``2 * fc(x)``; without the hook the rows are scored 2, 3 and 4 times."""
    torch.manual_seed(0)
    model, x = _Counting("int"), torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        expected = 2.0 * model.fc(x.flatten(1))
    calls = []
    with model_guard(model), Found(model) as found:
        def hook() -> None:
            calls.append(model.n)
            found.before_pass()
        out = _autograd.forward_scores(model, x, batch_size=2, before_pass=hook)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert calls == [0, 1, 1] and model.n == 0
    with model_guard(model):
        plain = _autograd.forward_scores(model, x, batch_size=2)  # no hook: each pass reads the last one's count
    torch.testing.assert_close(plain, torch.cat([expected[:2], expected[2:4] * 1.5, expected[4:] * 2]))


class _CountingCNN(nn.Module):
    """``fc(mean(relu(conv(x)))) * (1 + n)``, ``n`` its count of forwards: as handed each forward scores twice the
    logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * (1.0 + self.n)


def _gradcam_by_hand(model: _CountingCNN, x: torch.Tensor, target: int) -> torch.Tensor:
    """Selvaraju et al.'s Grad-CAM at the convolution, the model as handed (score ``2 * fc(...)``): the channels'
    mean gradients weigh the activations, then ReLU; the layer keeps the input's size (padding 1)."""
    a = model.conv(x).detach().requires_grad_(True)
    (2.0 * model.fc(torch.relu(a).mean((2, 3))))[:, target].sum().backward()
    return torch.relu((a.grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()


def test_smoothgrad_around_gradcam_first_call_with_its_layer_search() -> None:
    """Grad-CAM's first call on a model runs a layer search pass (no ``layer``), cached after. Inside SmoothGrad's
    guard that pass's count stayed for the Grad-CAM pass of the same chunk: chunks of one copy, noise 0, the first
    chunk scored ``3 * fc``. Each pass of a method within a chunk now starts from the state found."""
    torch.manual_seed(0)
    model, x = _CountingCNN(), torch.randn(2, 3, 6, 6)
    ref = _gradcam_by_hand(model, x, 1)
    for _ in range(2):  # the first call (the search's pass) and a second (cached)
        out = salience.smoothgrad(model, x, 1, method=salience.gradcam, samples=2, noise=0.0, chunk=1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
        assert model.n == 0


def test_smoothgrad_around_guided_gradcam_each_pass_sees_the_state_found() -> None:
    """Guided Grad-CAM runs two passes (guided backprop, then Grad-CAM). Called alone each is in a guard block of its
    own, which puts the state back; inside SmoothGrad's guard the Grad-CAM pass scored the guided pass's count: 50 %
    off (noise 0: SmoothGrad is the method itself). Now equal to the method alone and to a stateless model scoring
    ``2 * fc`` with the same weights (the counting model as handed)."""
    torch.manual_seed(0)
    model, x = _CountingCNN(), torch.randn(2, 3, 6, 6)

    class _Twice(_CountingCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * 2.0

    twin = _Twice()
    twin.load_state_dict(model.state_dict())
    alone = salience.guided_gradcam(twin, x, 1)
    torch.testing.assert_close(salience.guided_gradcam(model, x, 1), alone, rtol=0, atol=0)
    for chunk in (1, None):
        out = salience.smoothgrad(model, x, 1, method=salience.guided_gradcam, samples=2, noise=0.0, chunk=chunk)
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-9)
        assert model.n == 0


class _Flagged(_Counting):
    """The linear counting model whose output becomes a softmax's when the user sets ``soft`` between calls (the
    structure showed no final softmax before: the pass that shows one is run again under salience's tap)."""

    def __init__(self) -> None:
        super().__init__("int")
        self.soft = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.softmax(out, 1) if self.soft else out


def test_a_gradient_pass_run_again_for_a_softmax_starts_from_the_state_found() -> None:
    """A pass run again within one pass (a softmax appeared since the structure showed none) scored the count the
    thrown-away run left: integrated gradients' path scored ``3 * fc``. Closed form of the model as handed (``2 * fc``,
    the softmax stripped), zero baseline: ``x * 2 W[t]``."""
    model, x = _Flagged(), torch.randn(2, 3, 2, 2)
    salience.integrated_gradients(model, x, 1, steps=4)  # the structure: no final softmax
    model.soft = True
    ig = salience.integrated_gradients(model, x, 1, steps=4, reduce=None)
    torch.testing.assert_close(ig, x * _grad_as_handed(model, 1), rtol=1e-5, atol=1e-6)
    assert model.as_found()


def test_a_pass_without_gradients_run_again_for_a_softmax_starts_from_the_state_found() -> None:
    """The same in occlusion's clean pass (``forward_scores``, its ``before_pass`` hook): the clean scores were
    ``3 * fc``. Closed form with one window over the whole image and a zero baseline: ``2 W[t] . x`` at every pixel."""
    model, x = _Flagged(), torch.randn(2, 3, 2, 2)
    salience.occlusion(model, x, 1, window=2, stride=2)  # the structure: no final softmax
    model.soft = True
    occ = salience.occlusion(model, x, 1, window=2, stride=2, reduce=None)  # (B, C, H, W)
    drop = 2.0 * (x.flatten(1) @ model.fc.weight[1].detach())
    torch.testing.assert_close(occ, drop[:, None, None, None].expand_as(x), rtol=1e-5, atol=1e-6)
    assert model.as_found()
