"""Session 56: one walk of the model per stretch of salience's own code before a pass (fingerprint.one_walk), shared
by the input checks, the guard's entry, the state found, the fingerprint and the weights' sum.

What must hold: a change the user makes to the model between two calls (a module added or replaced, a hook, a
parameter's dtype or requires_grad, train()) is seen by the next call as a fresh model's would be, or refused as
before; a change made by the user's code inside a call (a SmoothGrad ``method`` of the user's, which runs before its
passes) is seen by the guards after it; the model comes back bit for bit after an exception raised in a nested call's
pass; and the walks are shared (counted: fails on main, which walked the modules 4 times a vanilla call, 9 times a
SmoothGrad one)."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import fingerprint


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():  # running statistics of their own: a put-back of the buffers shows
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def _x() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _state(model: nn.Module) -> tuple:
    """Everything a call must give back: tensors bit for bit, modes, flags, hooks, modules."""
    tensors = {k: (v.dtype, v.shape, v.stride(), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    flags = [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    modes = [(n, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
             for n, m in model.named_modules()]
    return tensors, flags, modes


def _same_state(a: tuple, b: tuple) -> bool:
    (ta, fa, ma), (tb, fb, mb) = a, b
    return fa == fb and ma == mb and ta.keys() == tb.keys() and all(
        ta[k][:3] == tb[k][:3] and torch.equal(ta[k][3].view(-1).view(torch.uint8) if ta[k][3].numel() else ta[k][3],
                                               tb[k][3].view(-1).view(torch.uint8) if tb[k][3].numel() else tb[k][3])
        for k in ta)


def _fresh_map(model: nn.Module, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    """The map of a fresh copy of ``model`` as it is now (no cache of salience's has seen it)."""
    return salience.vanilla(copy.deepcopy(model), x, t, **kw)


@pytest.mark.parametrize("change", ["replace", "add_hook", "requires_grad", "train"])
def test_a_change_between_two_calls_is_seen(change):
    """Vanilla (one stretch: check_input, the guard, the pass) twice, the model changed between: the second map is a
    fresh model's (by the closed form: a vanilla map is the gradient torch.autograd.grad gives the eval model)."""
    model, x = _net(), _x()
    t = torch.tensor([2])
    salience.vanilla(model, x, t, reduce=None)
    salience.vanilla(model, x, t, reduce=None)  # warm: every cache of salience's filled for the model as it was
    if change == "replace":
        model[2] = nn.Tanh()
    elif change == "add_hook":
        model[2].register_forward_hook(lambda m, i, o: o * 3.0)
    elif change == "requires_grad":
        model[0].weight.requires_grad_(False)
    else:
        model.train()
    before = _state(model)
    got = salience.vanilla(model, x, t, reduce=None)
    assert _same_state(before, _state(model))  # given back as it was, the change kept
    reference = copy.deepcopy(model).eval()
    xr = x.clone().requires_grad_(True)
    want, = torch.autograd.grad(reference(xr)[0, 2], xr)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, _fresh_map(model, x, t, reduce=None), rtol=0, atol=0)
    assert model.training is (change == "train")


def test_a_dtype_change_between_two_calls_is_refused():
    """model.double() between two calls: the second refuses the float32 x (the dtype check reads the walk)."""
    model, x = _net(), _x()
    t = torch.tensor([0])
    salience.vanilla(model, x, t)
    salience.smoothgrad(model, x, t, samples=2)
    model.double()
    with pytest.raises(SalienceError, match="model computes in torch.float64"):
        salience.vanilla(model, x, t)
    with pytest.raises(SalienceError, match="model computes in torch.float64"):
        salience.smoothgrad(model, x, t, samples=2)


def test_an_inference_buffer_added_between_two_calls_is_refused():
    """A module holding an inference tensor added between two SmoothGrad calls: the guard's entry refuses it (the
    stretch's walk is the call's own, not the last call's)."""
    model, x = _net(), _x()
    t = torch.tensor([1])
    salience.smoothgrad(model, x, t, samples=2)
    extra = nn.Identity()
    with torch.inference_mode():
        extra.register_buffer("table", torch.ones(3))
    model.append(extra)
    with pytest.raises(SalienceError, match="inference tensor"):
        salience.smoothgrad(model, x, t, samples=2)


_MODES: list = []


class _Spy(nn.Identity):
    """An identity that notes, outside the model, the mode each pass runs it in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _MODES.append(self.training)
        return x


def test_a_module_added_by_the_users_method_inside_the_call_is_held():
    """SmoothGrad's method is the user's code: it appends a module (train mode) to the net (a torch.nn Sequential,
    whose children neither the guard nor the state found puts back) before calling vanilla. Each inner call's guard
    must hold it, in eval mode (a walk shared from before the method ran missed it: it ran in train mode, in the
    engine's first pass); the map is the net's with it; it stays, in train mode, as the user left it."""
    model, x = _net(), _x()
    t = torch.tensor([1])
    salience.smoothgrad(model, x, t, samples=2, noise=0.0, reduce=None)  # warm

    def adding(m, xs, target, **kw):
        if not isinstance(m[-1], _Spy):
            m.append(_Spy())
        return salience.vanilla(m, xs, target, **kw)

    _MODES.clear()
    got = salience.smoothgrad(model, x, t, method=adding, samples=2, noise=0.0, reduce=None)
    assert _MODES and not any(_MODES)  # every pass ran it in eval mode
    assert isinstance(model[-1], _Spy) and model[-1].training
    # the mean of two copies' maps (noise 0: the same image) against one map: the batch of two sums in another order
    torch.testing.assert_close(got, _fresh_map(model, x, t, reduce=None), rtol=1e-4, atol=1e-8)


_PASSES = [0]


class _Boom(nn.Module):
    """Raises in its forward from the ``at``-th call on (counted outside the model, in ``_PASSES``: what a forward
    sets on the model, a counter or a list's items, is put back before each pass), after writing a buffer in place."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.register_buffer("seen", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _PASSES[0] += 1
        self.seen.add_(1.0)
        if _PASSES[0] >= self.at:
            raise RuntimeError("boom inside the pass")
        return x


@pytest.mark.parametrize("at", [1, 2])
def test_model_back_bit_for_bit_after_an_exception_in_the_nested_call(at):
    """SmoothGrad (outer guard) around vanilla (inner guard, sharing the outer's hold): a forward raising in the
    pass (``at``: the first chunk's pass, or the second's, chunk=1) leaves the model exactly as it was: buffers
    (the one written in place too), BatchNorm statistics, flags, modes, hooks, plain attributes."""
    body = _net()
    model = nn.Sequential(body, _Boom(at)).train()
    model[0][0].weight.requires_grad_(False)
    model[0][2].register_forward_hook(lambda m, i, o: None)
    x = _x()
    before = _state(model)
    _PASSES[0] = 0
    with pytest.raises(RuntimeError, match="boom inside the pass"):
        salience.smoothgrad(model, x, torch.tensor([0]), samples=3, chunk=1)
    assert _PASSES[0] == at  # raised in the at-th pass
    assert _same_state(before, _state(model))
    assert model.training and model[0][1].training


class _CountingDict(OrderedDict):
    """A module's ``_modules`` that counts the walks reading its children (``values()``)."""
    walks = 0

    def values(self):  # type: ignore[override]
        type(self).walks += 1
        return super().values()


class _Root(nn.Module):
    """The net under a root whose forward reads its child by name (a Sequential's forward reads ``values()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _counted() -> nn.Module:
    model = _Root().eval()
    model.__dict__["_modules"] = _CountingDict(model._modules)
    return model


@pytest.mark.parametrize("method, most", [("vanilla", 3), ("smoothgrad", 5)])
def test_one_walk_per_stretch(method, most):
    """The walks of the model's modules a warm call makes (each reads the root's children once): vanilla 3 (main:
    4: the input check, the guard, the fingerprint before and after the pass), SmoothGrad of one chunk 5 (main: 9)."""
    model, x = _counted(), _x()
    t = torch.tensor([1])
    call = (lambda: salience.vanilla(model, x, t)) if method == "vanilla" else \
        (lambda: salience.smoothgrad(model, x, t, samples=4))
    call()
    call()
    _CountingDict.walks = 0
    call()
    assert 1 <= _CountingDict.walks <= most


def test_a_pass_ends_the_stretch():
    """Inside a one_walk stretch the walk is made once while no pass ran; after a pass (model_call) it is made anew, so
    a module added by the user's forward is seen by the walks after it."""
    from salience._core.autograd import model_call
    from salience._core.guard import modules_of

    model = _net()
    outer = fingerprint.walk_state()
    try:
        fingerprint.one_walk(model)
        first = modules_of(model)
        assert modules_of(model) is first  # shared
        with model_call(model, _x()):
            model.append(nn.Identity())
        after = modules_of(model)
        assert after is not first and len(after) == len(first) + 1
        assert modules_of(model) is not after  # spent: each walk anew until the block ends
    finally:
        fingerprint.close_walk(outer)
    assert modules_of(model) is not modules_of(model)  # no stretch: each walk its own
