"""Session 50, issue 19: integrated gradients with ``target=None`` reads each image's class off ``x``'s rows of the
path's first chunk (x is the path's first point) where the two top scores there are more than
:data:`~salience.methods.integrated.TIE_BOUND` apart, so no forward pass of ``x`` of its own runs; in a near tie it runs
that plain fp32 pass as before (tests/test_s49_rvig.py: the chunk's rounding can break a tie the other way)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import salience
from salience.methods import integrated
from test_s49_ig import _passes
from test_s49_rvig import _tie as _tie49

TIE_BOUND = getattr(integrated, "TIE_BOUND", 1e-3)  # so that these tests run (and fail where they should) on main's

STEPS = 32


def _cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


def _images(b: int, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b))


def _top(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("b,chunk,rule,fmt", [(1, None, "trapezoid", None), (3, 2, "trapezoid", None),
                                              (4, None, "right", None), (2, 5, "trapezoid", "channels_last"),
                                              (3, 7, "right", "auto")])
def test_bit_equal_to_the_class_given(b, chunk, rule, fmt):
    """The map and the gap with ``target=None`` are the same bits as with each image's ``model(x).argmax(1)`` given
    (the same passes; x's rows spread over several chunks where ``chunk < B``)."""
    model, x = _cnn(), _images(b)
    kw = dict(steps=9, rule=rule, chunk=chunk, reduce=None, return_gap=True, memory_format=fmt)
    given = salience.integrated_gradients(model, x, _top(model, x), **kw)
    none = salience.integrated_gradients(model, x, **kw)
    assert none.attributions.equal(given.attributions) and none.gap.equal(given.gap) and none.delta.equal(given.delta)
    assert given.attributions.abs().amax() > 0


def test_several_targets_with_the_predicted_class_bit_equal():
    """``[None, 2]``: the predicted class's map is the one of ``model(x)``'s class given, beside class 2's."""
    model, x = _cnn(), _images(3)
    top = _top(model, x)
    both = salience.integrated_gradients(model, x, [None, 2], steps=8, reduce=None, chunk=4)
    given = salience.integrated_gradients(model, x, torch.stack([top, torch.full_like(top, 2)], 1), steps=8,
                                          reduce=None, chunk=4)
    assert both.equal(given)


@pytest.mark.parametrize("b,chunk", [(1, None), (3, 4), (2, 64)])
def test_no_pass_of_its_own_where_the_top_two_are_far_apart(b, chunk):
    """x's class read off the path: the forward passes are the ones of the class given (session 49 ran a pass of
    x's B images first: ``[b] + given``)."""
    model, x = _cnn(), _images(b)
    top = _top(model, x)
    salience.integrated_gradients(model, x, top, steps=STEPS, chunk=chunk)  # the first call's memory probe
    given = _passes(model, lambda: salience.integrated_gradients(model, x, top, steps=STEPS, chunk=chunk))
    none = _passes(model, lambda: salience.integrated_gradients(model, x, steps=STEPS, chunk=chunk))
    assert none == given and sum(given) in (STEPS * b, STEPS * b + b)  # a memory probe of one item per image


@pytest.mark.parametrize("call", [dict(rule="left"), dict(rule="gausslegendre"), dict(precision="bf16"),
                                  dict(x_dtype=torch.float64)])
def test_the_pass_of_its_own_where_the_path_cannot_tell(call):
    """No ``a = 1`` on the path (left Riemann sum, Gauss-Legendre), a precision other than float32: x's forward pass of
    its own as before, and the map of ``model(x)``'s class."""
    model, x = _cnn(), _images(2)
    dtype = call.pop("x_dtype", None)
    if dtype is not None:
        model, x = model.to(dtype), x.to(dtype)
    if call.get("precision") == "bf16":
        warnings.simplefilter("ignore")  # a CPU without native bf16 says it is no faster
    top = _top(model, x)
    salience.integrated_gradients(model, x, top, steps=8, chunk=8, **call)
    given = _passes(model, lambda: salience.integrated_gradients(model, x, top, steps=8, chunk=8, **call))
    none = _passes(model, lambda: salience.integrated_gradients(model, x, steps=8, chunk=8, **call))
    assert given[:2] == [8, 8] and none[:3] == [2, 8, 8]  # x's pass, then the path's 16 items (an end the rule
    # lacks: its pass for the gap where the other end is known, as before)


class _Head(nn.Module):
    """Logits ``[w.f + c0, w.f + c1, -10]`` over a CNN's features: the two first differ by ``c0 - c1`` whatever the
    rounding of ``f`` (the same weights)."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.w = nn.Parameter(torch.randn(8))
        self.register_buffer("c", torch.tensor([gap, 0.0, -10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.body(x) * self.w).sum(1, keepdim=True)
        return s + self.c


def test_a_margin_under_the_bound_runs_the_pass_and_keeps_model_x_class():
    """Top two 0.1 x TIE_BOUND apart (relative to the largest score): too close to trust the chunk, so x's pass of its
    own runs (the aborted first chunk, x's pass, the path), and the map is class 0's, the same bits as it given."""
    x = _images(1)
    probe = _Head(0.0).eval()
    with torch.no_grad():
        scale = probe(x).abs().amax().item()
    model = _Head(0.1 * TIE_BOUND * scale).eval()
    with torch.no_grad():
        out = model(x)[0]
    assert out.argmax().item() == 0 and 0 < out[0] - out[1] < TIE_BOUND * out.abs().amax()  # the premise
    given = salience.integrated_gradients(model, x, 0, steps=STEPS, reduce=None)
    seen_given = _passes(model, lambda: salience.integrated_gradients(model, x, 0, steps=STEPS, reduce=None))
    got: list = []
    seen = _passes(model, lambda: got.append(salience.integrated_gradients(model, x, steps=STEPS, reduce=None)))
    assert seen == [seen_given[0], 1] + seen_given
    assert got[0].equal(given)


def _tie(x: torch.Tensor, counter: bool = False) -> nn.Module:
    """tests/test_s49_rvig.py's tie: two logits equal in a pass of ``x`` alone (class 0, the first maximum), class
    0's lower in the path's chunk of 32 (float rounding of another batch size), so the chunk alone would say class 1.
    ``counter``: a module of its own after it that counts its calls and scales the logits by ``1 + n / 100`` (a
    stateful model: each chunk's gradient depends on the calls before it; the tie stays exact)."""
    model = _tie49(x)
    return nn.Sequential(*model, _Counter()).eval() if counter else model


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.n += 1
        torch.rand(1)  # a draw from the generator: the path must see the stream it sees with the class given
        return y * (1 + self.n / 100)


def test_a_tie_the_chunk_breaks_the_other_way_keeps_model_x_class():
    """The chunk's class 1 is not taken: x's pass of its own runs and the map is class 0's (``model(x).argmax``),
    the same bits as class 0 given; vanilla agrees."""
    x = _images(1)
    model = _tie(x)
    with torch.no_grad():
        out = model(x)
    assert out[0, 0] == out[0, 1] and out.argmax(1).item() == 0  # the premise: an exact tie, class 0 first
    zero = salience.integrated_gradients(model, x, 0, steps=STEPS, reduce=None)
    one = salience.integrated_gradients(model, x, 1, steps=STEPS, reduce=None)
    assert not torch.allclose(zero, one)
    seen_given = _passes(model, lambda: salience.integrated_gradients(model, x, 0, steps=STEPS, reduce=None))
    got: list = []
    seen = _passes(model, lambda: got.append(salience.integrated_gradients(model, x, steps=STEPS, reduce=None)))
    assert seen == [seen_given[0], 1] + seen_given  # the aborted first chunk, x's pass of its own, the path
    assert got[0].equal(zero)


@pytest.mark.parametrize("tie", [False, True])
def test_a_stateful_model_gets_the_map_of_the_class_given(tie):
    """A model counting its calls (each chunk's gradient scaled by its count) and drawing from the generator: with
    ``target=None`` the map is the same bits as with the class given on a copy as found, also where a near tie throws
    the first chunk away and runs x's pass (their writes put back, the generator given back), and the generator ends
    where it ends with the class given."""
    x = _images(1)
    if tie:
        model = _tie(x, counter=True)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(_cnn(), _Counter()).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        top = int(copy.deepcopy(model)(x).argmax(1))
    torch.manual_seed(7)
    given = salience.integrated_gradients(twin, x, top, steps=STEPS, reduce=None, chunk=8)
    after_given = torch.get_rng_state()
    torch.manual_seed(7)
    none = salience.integrated_gradients(model, x, steps=STEPS, reduce=None, chunk=8)
    assert torch.get_rng_state().equal(after_given)
    assert none.equal(given)
    assert model[-1].n == twin[-1].n == 0  # the model's own state put back after the call
    ones = salience.integrated_gradients(copy.deepcopy(twin), x, 1 - top if tie else (top + 1) % 5, steps=STEPS,
                                         reduce=None, chunk=8)
    assert not torch.allclose(none, ones)


def test_the_chunks_rounding_is_far_under_the_bound():
    """Where TIE_BOUND comes from, on this machine: x's logits in the path's batches (8, 32 items), channels-last,
    the BatchNorm-folded copy, against a plain eager ``model(x)``: far less than the bound apart (relative to the
    row's largest score). benchmarks/ig_tie_bound_s50.py measures the large models."""
    from salience._core.folding import folded_model

    model = _cnn()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    folded, _ = folded_model(model)
    x = _images(2, 32)
    path = torch.cat([x] + [a * x for a in torch.linspace(0, 1, STEPS)[:-1].tolist()])
    with torch.no_grad():
        plain = model(x)
        worst = 0.0
        for m, cl in ((model, False), (copy.deepcopy(model).to(memory_format=torch.channels_last), True),
                      (folded if folded is not None else model, False)):
            for n in (8, 2 * STEPS):
                items = path[:n].contiguous(memory_format=torch.channels_last) if cl else path[:n]
                got = m(items)[:2]
                worst = max(worst, ((got - plain).abs().amax(1) / plain.abs().amax(1)).max().item())
    assert worst < TIE_BOUND / 100
