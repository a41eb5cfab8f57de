"""Session 59 (issue 19): salience's own work per call on a small CPU model, cut without dropping a check.

A CPU call reads its checks' answers at once where a GPU call defers them (no device to wait for): the target's scores
finite (a one-pass call's all-finite scores note nothing: a refusal names the bad items only), the probabilities look
(a negative value or a NaN in the output says "no" in one op), ``check_input``'s finiteness (the least
and greatest values read as two numbers), all of them outside an engine run's passes (which read nothing per pass);
a deferred condition may then be a Python bool
(:meth:`salience._core.derived.Derived.defer`). ``backward`` enters its contexts in one ``with`` statement, a pass
with no mode to enter runs without an ExitStack, and one target's map is not stacked (copied) again.

What fails on main (3 of the 15): the count of tensor operations a vanilla call runs besides the model's own pass on
the tiny model (``test_a_vanilla_call_runs_few_tensor_ops_of_its_own``: 86 on main, 47 here), and the two tests of
the new read-at-once answers (a Python bool deferred, ``_probability_rows``'s ``read``). The rest holds on both
(behaviour kept): the refusals name the same images, the probabilities warning comes as before (at once and in a
many-pass call), a user's reduction's result is still copied, a model changed between two calls is still seen, the
model comes back exactly after an exception in the pass, a derived input that overflows is refused, and integrated
gradients' path points made at once are the point-by-point ones bit for bit."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import salience
from salience import SalienceError
from salience._core import autograd, derived


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


X = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class _Ops(TorchDispatchMode):
    """Counts the tensor operations (ATen calls) run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.n += 1
        return func(*args, **(kwargs or {}))


def _bare(model: nn.Module, x: torch.Tensor, cls: int) -> torch.Tensor:
    """The bare pass: the forward, the gradient of the class's score, the channel reduction."""
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    return torch.autograd.grad(out[:, cls].sum(), xi)[0].abs().amax(1)


def test_a_vanilla_call_runs_few_tensor_ops_of_its_own():
    m = _tiny()
    cls = int(m(X).argmax(1))
    for _ in range(3):  # warm: the final-softmax answer known, the caches as a warm call has them
        salience.vanilla(m, X, cls)
    with _Ops() as own:
        got = salience.vanilla(m, X, cls)
    with _Ops() as bare:
        want = _bare(m, X, cls)
    assert torch.equal(got, want)
    extra = own.n - bare.n
    assert extra <= 60, extra  # main: 86 (isfinite's 4 ops a tensor, the probabilities' 7, the notes' 12, a stack)


def test_the_cpu_finiteness_answers_are_the_tensor_ones():
    cases = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]),
             torch.tensor([-float("inf"), 0.0]), torch.tensor([3e38, -3e38]), torch.empty(0),
             torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), torch.tensor([65504.0], dtype=torch.float16),
             torch.tensor([1, 2], dtype=torch.int64)]
    for t in cases:
        assert autograd._all_finite(t) == bool(torch.isfinite(t).all()), t


def test_the_probabilities_look_gives_the_old_formula():
    def old(o: torch.Tensor) -> bool:
        return bool((o >= 0).all() & ((o.sum(1) - 1).abs() <= 1e-4 + 1e-5).all())

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g)
    cases = [logits, logits.softmax(1), logits.softmax(1).bfloat16(), logits.abs(), torch.full((2, 4), 0.25),
             torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), torch.tensor([[1.0, -0.0]]), torch.tensor([[1.0, 0.0]]),
             torch.empty(0, 3), logits.softmax(1) + 2e-4]
    for o in cases:
        rows = autograd._probability_rows(o)
        assert bool(rows) == old(o), o
    assert autograd._probability_rows(torch.rand(3)) is None


def test_deferred_bools_and_tensors_combine_as_tensors_did_in_order():
    ran: list[str] = []
    scope = derived.Derived()
    scope.defer("a", False, lambda: ran.append("a"))
    scope.defer("b", torch.tensor(False), lambda: ran.append("b"))
    scope.defer("c", torch.tensor(True), lambda: ran.append("c"))
    scope.defer("a", torch.tensor(True), lambda: ran.append("a"))  # False | True: holds, in a's first place
    scope.defer("b", True, lambda: ran.append("b"))
    scope.defer("c", False, lambda: ran.append("c"))  # True | False: still holds
    scope.defer("d", False, lambda: ran.append("d"))
    scope.defer("d", torch.tensor(False), lambda: ran.append("d"))
    scope.finish()
    assert ran == ["a", "b", "c"]
    only = derived.Derived()
    only.defer("x", True, lambda: ran.append("x"))
    only.defer("y", False, lambda: ran.append("y"))
    only.finish()  # no tensor at all: nothing stacked
    assert ran[-1] == "x" and "y" not in ran


class _LogOfMean(nn.Module):
    """Scores ``log(mean of the image)`` and its negative: NaN for an image of negative mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean((1, 2, 3)).log()
        return torch.stack([v, -v], 1) * 1.0


def test_a_nan_score_is_refused_naming_its_image_as_before():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x[1] -= 2.0  # image 1's mean is negative: its score is NaN
    with pytest.raises(SalienceError, match=r"the target's score is NaN or infinite \(image 1 of 3, class 0\)"):
        salience.vanilla(_LogOfMean(), x, 0)
    with pytest.raises(SalienceError, match=r"NaN or infinite \(image 1 of 3, class 0\)"):
        salience.smoothgrad(_LogOfMean(), x, 0, samples=2, noise=0.0)
    fine = x.clone()
    fine[1] += 2.0
    assert torch.isfinite(salience.vanilla(_LogOfMean(), fine, 0)).all()


class _Probabilities(nn.Module):
    """A model whose output is probabilities made without a softmax call (exp over its sum)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.fc(x.flatten(1)).exp()
        return e / e.sum(1, keepdim=True)


@pytest.mark.parametrize("call", ["vanilla", "smoothgrad"])
def test_the_probabilities_warning_still_comes_and_not_for_scores(call):
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    run = (lambda m: salience.vanilla(m, x, 0)) if call == "vanilla" else \
        (lambda m: salience.smoothgrad(m, x, 0, samples=4))
    with pytest.warns(UserWarning, match="looks like probabilities"):
        run(_Probabilities())
    plain = _Probabilities()
    plain.forward = lambda t: plain.fc(t.flatten(1))  # the scores themselves: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(plain)


def test_a_user_reduction_s_result_is_still_a_copy():
    held = torch.zeros(1, 16, 16)
    got = salience.vanilla(_tiny(), X, 0, reduce=lambda g: held)
    assert torch.equal(got, held) and got.data_ptr() != held.data_ptr()
    m = _tiny()
    cls = int(m(X).argmax(1))
    assert torch.equal(salience.vanilla(m, X, cls), _bare(m, X, cls))  # salience's own reduction: the same values
    two = salience.vanilla(m, X, torch.tensor([[0, cls]]))  # (B, K): two targets, stacked as before
    assert two.shape == (1, 2, 16, 16) and torch.equal(two[:, 1], _bare(m, X, cls))


def test_a_model_changed_between_two_calls_is_seen():
    m = _tiny()
    cls = 2
    first = salience.vanilla(m, X, cls)
    m[5] = nn.Sequential(nn.Linear(4, 5), nn.Softmax(1))  # replaced, now ending in a softmax
    again = salience.vanilla(m, X, cls)
    fresh = copy.deepcopy(m)
    fresh[5] = fresh[5][0]  # the softmax stripped: what the map must be
    assert torch.equal(again, salience.vanilla(fresh, X, cls))
    assert not torch.equal(first, again)


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net[1].running_mean.data.add_(1.0)  # a write that moves no version counter
        raise RuntimeError("the model's own bug")


def test_the_model_comes_back_exactly_after_an_exception_in_the_pass():
    m = _Fails().train()
    m.net[0].weight.requires_grad_(True)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    with pytest.raises(RuntimeError, match="the model's own bug"):
        salience.vanilla(m, X, 0)
    assert m.training and all(mod.training for mod in m.modules())
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_a_derived_input_that_overflows_is_still_refused_at_the_end():
    with pytest.raises(SalienceError, match="overflow"):
        with derived.run_scope():
            derived.derived(torch.tensor([1.0, math.inf]))
    with derived.run_scope():
        derived.derived(torch.tensor([1.0, 2.0]))  # finite: nothing said


def test_a_many_pass_call_reads_its_probabilities_look_once_not_per_pass():
    """The CPU's read-at-once answers are for a one-pass call's own scope: an engine run's passes read nothing per pass
    (tests/test_syncs.py counts CPU reads for a GPU's synchronizations); the probabilities look of a pass there stays
    a tensor, deferred."""
    out = torch.randn(2, 5)
    assert autograd._probability_rows(out) is False
    assert isinstance(autograd._probability_rows(out, False), torch.Tensor)
    with derived.run_scope(16) as scope:
        autograd._warn_if_probabilities(out)
        assert isinstance(scope._flags["probabilities"][0], torch.Tensor)
    with derived.run_scope() as scope:
        autograd._warn_if_probabilities(out)
        assert scope._flags["probabilities"][0] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_path_points_made_at_once_are_the_point_by_point_ones_bit_for_bit(dtype):
    """Integrated gradients' points of several alphas in one multiply and add (float32, float64): the same bits as
    ``x' + a (x - x')`` point by point and their ``cat`` (bfloat16 keeps that way), ``x`` exactly at ``a = 1``."""
    from salience.methods.integrated import PathPoints

    g = torch.Generator().manual_seed(4)
    for b in (1, 3):
        x = (torch.randn(b, 3, 5, 5, generator=g) * 7).to(dtype)
        base = torch.randn(b, 3, 5, 5, generator=g).to(dtype)
        for alphas in ([i / 32 for i in range(1, 33)], [0.0, 0.1, 0.5, 1.0], torch.linspace(0, 1, 17).tolist()):
            pp = PathPoints(x, base, alphas)
            n = len(alphas) * b
            for start, stop in [(0, n), (1, n - 1), (b, 3 * b), (0, 1), (n - 2, n)]:
                got = pp(start, stop)[0]
                want = torch.cat([pp.point(r, max(start, r * b) - r * b, min(stop, (r + 1) * b) - r * b)
                                  for r in range(start // b, (stop - 1) // b + 1)])
                assert got.shape == want.shape and got.is_contiguous()
                assert torch.equal(got.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.uint8),
                                   want.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.uint8))
            assert torch.equal(pp(n - b, n)[0], x)
