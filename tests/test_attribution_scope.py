"""Transformer attribution narrowed to the modules that call the attention (salience.attention.scoped, shared with
attention rollout): once a model's attention modules are known, its forward runs the capture only inside them (the
rest of the forward without a mode), its maps equal those of the capture around the whole forward (compared to the
bit: the same operations on the same inputs; the reference path is itself tested against explicit references in
test_transformer.py), and a narrowed pass that misses or raises runs again everywhere, leaving the model as it was.
A scope learnt by either method serves the other."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import salience
from salience import attention
from salience.attention import AttentionCapture, attention_maps

from conftest import unchanged
from test_attention_scope import MODELS, _tiny
from test_s49_record import ForwardNotes

NAMES = ["torchvision MHA", "fused SDPA", "explicit softmax", "nn.TransformerEncoder"]


class Outside(nn.Module):
    """Before the model: one torch call (``x * 1``) outside any attention module; ``hits`` counts the calls that
    reached ``AttentionCapture.__torch_function__`` while it ran, ``runs`` its forwards."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # a ForwardNotes: the pass's changes kept (the guard puts back a plain dict's contents)
        self.model, self.n = model, ForwardNotes({"inside": False, "hits": 0, "runs": 0})

    @property
    def hits(self) -> int:
        return self.n["hits"]

    @property
    def runs(self) -> int:
        return self.n["runs"]

    def reset(self) -> None:
        self.n.update(hits=0, runs=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n["inside"], self.n["runs"] = True, self.n["runs"] + 1
        try:
            x = x * 1
        finally:
            self.n["inside"] = False
        return self.model(x)


@pytest.fixture
def counted(monkeypatch):
    """``AttentionCapture.__torch_function__`` wrapped to count, on the ``Outside`` models listed, its calls made
    while their own torch call runs."""
    watched: list[Outside] = []
    original = AttentionCapture.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        for m in watched:
            m.n["hits"] += m.n["inside"]
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(AttentionCapture, "__torch_function__", counting)
    return watched


def _model(name: str) -> tuple[Outside, torch.Tensor]:
    size = 32 if name == "torchvision MHA" else 16
    return Outside(MODELS[name]()), torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target", [None, 1, [[0, 2], [1, 0]]], ids=["top", "class 1", "two per image"])
@pytest.mark.parametrize("name", NAMES)
def test_attribution_narrowed_equals_the_capture_everywhere_and_leaves_the_rest_bare(name, target, counted):
    model, x = _model(name)
    counted.append(model)
    want = salience.transformer_attribution(copy.deepcopy(model), x, target)  # a copy: its own first pass
    for n in range(3):  # the first pass learns where the attention runs, the next are narrowed to it
        model.reset()
        with unchanged(model):
            got = salience.transformer_attribution(model, x, target)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert model.runs == 1, "a narrowed pass missed the attention and ran again"
        assert (model.hits > 0) is (n == 0), "the capture ran outside the attention modules"
    assert torch._C._len_torch_function_stack() == 0


def test_a_path_that_changes_runs_again_everywhere_and_learns_it():
    model = Outside(_tiny("mha"))  # the attention called from nn.MultiheadAttention ...
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    salience.transformer_attribution(model, x)
    for blk in model.model.blocks:
        blk.attn.mode = "sdpa"  # ... now from its parent: a pass narrowed to the MHA modules sees none
    want = salience.transformer_attribution(copy.deepcopy(model), x, [[1, 3]])
    model.reset()
    with unchanged(model):
        got = salience.transformer_attribution(model, x, [[1, 3]])
    assert model.runs == 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.reset()
    torch.testing.assert_close(salience.transformer_attribution(model, x, [[1, 3]]), want, rtol=0, atol=0)
    assert model.runs == 1  # learnt again


@pytest.mark.parametrize("once", [True, False])
def test_an_error_in_a_narrowed_forward_runs_again_everywhere_or_leaves_the_model_as_it_was(once):
    """Raised once (in the narrowed forward only): the pass everywhere gives the maps, with no gradient of the failed
    attempt mixed in; raised every time: the error comes out, no mode, no hook left."""
    model, x = _model("explicit softmax")
    want = salience.transformer_attribution(copy.deepcopy(model), x, [[0, 1], [2, 1]])
    salience.transformer_attribution(model, x)
    raised: list = []

    def boom(module, args, out):
        if not (once and raised):
            raised.append(1)
            raise RuntimeError("inside the attention")

    handle = model.model.blocks[1].attn.register_forward_hook(boom)
    try:
        model.reset()
        with unchanged(model):
            if once:
                torch.testing.assert_close(salience.transformer_attribution(model, x, [[0, 1], [2, 1]]), want, rtol=0, atol=0)
            else:
                with pytest.raises(RuntimeError, match="inside the attention"):
                    salience.transformer_attribution(model, x, [[0, 1], [2, 1]])
    finally:
        handle.remove()
    assert model.runs == 2 and torch._C._len_torch_function_stack() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.reset()
    torch.testing.assert_close(salience.transformer_attribution(model, x, [[0, 1], [2, 1]]), want, rtol=0, atol=0)
    assert model.runs == 1


def test_a_count_that_changes_after_the_backward_keeps_no_gradient_of_the_failed_attempt():
    """A narrowed forward that records fewer matrices than the scope's (one attention skipped, then not): its
    backward ran, but the maps come from a fresh capture of the pass everywhere."""
    model, x = _model("explicit softmax")
    salience.transformer_attribution(model, x)
    scope = attention._SCOPES.get(model, (), ())
    scope.count += 1  # the narrowed pass now misses once
    want = salience.transformer_attribution(copy.deepcopy(model), x, [[2, 1], [0, 2]])
    model.reset()
    with unchanged(model):
        got = salience.transformer_attribution(model, x, [[2, 1], [0, 2]])
    assert model.runs == 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torchvision MHA", "explicit softmax", "nn.TransformerEncoder"])
def test_a_scope_learnt_by_rollout_serves_attribution_and_vice_versa(name, counted):
    model, x = _model(name)
    counted.append(model)
    want = salience.transformer_attribution(copy.deepcopy(model), x)
    salience.attention_rollout(model, x)  # learns the scope
    model.reset()
    torch.testing.assert_close(salience.transformer_attribution(model, x), want, rtol=0, atol=0)
    assert model.hits == 0 and model.runs == 1

    other, x = _model(name)
    counted.append(other)
    salience.transformer_attribution(other, x)  # learns the scope
    other.reset()
    maps = attention_maps(other, x)
    assert other.hits == 0 and other.runs == 1
    want_maps = attention_maps(copy.deepcopy(other), x)
    for g, w in zip(maps, want_maps, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["fused SDPA", "explicit softmax", "torchvision MHA"])
def test_a_ctrl_c_inside_a_narrowed_attention_runs_nothing_again_and_leaves_no_mode(name):
    """A ``KeyboardInterrupt`` (no ``Exception``: torch calls no always-called forward hook for it, so the capture the
    narrowing entered in the attention module is still on the stack) out of an attention module of a narrowed pass:
    raised as it is, no second pass, and no mode left on the thread's stack (the softmax tap, entered after the
    narrowing, popped the capture on its exit and was itself left there), no hook on the model."""
    model, x = _model(name)
    salience.transformer_attribution(model, x)  # learns the scope
    attn = attention._SCOPES.get(model, (), ()).live()

    def interrupt(module, args, out):
        raise KeyboardInterrupt

    handle = attn[-1].register_forward_hook(interrupt)
    try:
        model.reset()
        with unchanged(model):
            with pytest.raises(KeyboardInterrupt):
                salience.transformer_attribution(model, x, 1)
        left = [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]
    finally:
        handle.remove()
        while torch._C._len_torch_function_stack():  # the next tests not run under a leftover mode
            torch._C._pop_torch_function_stack()
    assert model.runs == 1 and left == []
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_always_called
                   for m in model.modules())


def test_ctrl_c_at_each_point_of_attributions_narrowing_leaves_no_mode_and_no_hook():
    """SIGINT at each point where Python may raise ``KeyboardInterrupt`` in ``ActiveIn``'s entry and exit, in
    ``_active_in``, its hooks and what puts them on and off, during a narrowed ``transformer_attribution``: afterwards
    no mode on the stack, no hook on the model, and the next call narrowed again with the same map."""
    import types

    from test_attention_scope import ctrl_c_leftovers, sigint_tracer

    model, x = _model("explicit softmax")
    want = salience.transformer_attribution(copy.deepcopy(model), x, 1)
    salience.transformer_attribution(model, x, 1)  # learnt: the next calls are narrowed
    outer = attention._active_in.__wrapped__.__code__
    codes = {outer, *(c for c in outer.co_consts if isinstance(c, types.CodeType)),
             attention._hook.__code__, attention._unhook.__code__,
             attention.ActiveIn.__enter__.__code__, attention.ActiveIn.__exit__.__code__}
    failed, n = ctrl_c_leftovers(model, sigint_tracer(codes, lambda: salience.transformer_attribution(model, x, 1)))
    assert not failed, f"{len(failed)} of {n} points left a mode or a hook: {failed}"
    model.reset()
    torch.testing.assert_close(salience.transformer_attribution(model, x, 1), want, rtol=0, atol=0)
    assert model.runs == 1


WRONG = {"class out of range": 99, "negative class": -1, "one of two per image out of range": [[0, 2], [99, 1]],
         "a score per class, not per image": lambda out: out, "regression output out of range":
         salience.targets.regression(99)}


@pytest.mark.parametrize("wrong", WRONG.values(), ids=WRONG.keys())
@pytest.mark.parametrize("name", ["explicit softmax", "torchvision MHA"])
def test_a_wrong_target_on_a_learnt_scope_runs_one_forward_and_keeps_the_scope(name, wrong, counted):
    """The user's mistake (a target that does not fit the output, found by salience's checks after the narrowed
    forward, before any backward) comes out at once with the message a first call gives: it ran the forward (and
    the backward) a second time with the capture everywhere, the model's forward side effects twice. The scope is
    kept: the next call is narrowed (no capture outside the attention) with the maps of the capture everywhere."""
    model, x = _model(name)
    counted.append(model)
    with pytest.raises(salience.SalienceError) as first:  # a first call: the pass everywhere, where main raised
        salience.transformer_attribution(copy.deepcopy(model), x, wrong)
    want = salience.transformer_attribution(copy.deepcopy(model), x, 1)
    salience.transformer_attribution(model, x, 1)  # learns the scope
    scope = attention._SCOPES.get(model, (), ())
    learnt = (scope.count, scope.missed, scope.live())
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    try:
        with unchanged(model), pytest.raises(salience.SalienceError) as e:
            salience.transformer_attribution(model, x, wrong)
    finally:
        handle.remove()
    assert len(forwards) == 1, "the forward ran again for the user's mistake"
    assert str(e.value) == str(first.value)
    assert attention._SCOPES.get(model, (), ()) is scope and (scope.count, scope.missed, scope.live()) == learnt
    model.reset()
    torch.testing.assert_close(salience.transformer_attribution(model, x, 1), want, rtol=0, atol=0)
    assert model.runs == 1 and model.hits == 0


@pytest.mark.parametrize("learnt", [False, True], ids=["first call", "scope learnt before"])
@pytest.mark.parametrize("method", ["transformer_attribution", "attention_rollout"])
def test_a_target_on_an_inner_layer_teaches_no_scope(method, learnt):
    """A target on an inner layer (Activation of the first block: the forward stops there) saw only the attention
    before it; the scope was learnt from that pass (the first block's attention, one matrix), and every later call of
    either method on the model was narrowed to it and returned, without a word, a map without the second block's
    attention (0.005 off for transformer attribution, 0.02 for rollout, on this model)."""
    model, x = _model("explicit softmax")
    want = getattr(salience, method)(copy.deepcopy(model), x, 1)
    if learnt:
        salience.transformer_attribution(model, x, 1)
    salience.transformer_attribution(model, x, salience.targets.Activation("model.blocks.0", 0))
    model.reset()
    torch.testing.assert_close(getattr(salience, method)(model, x, 1), want, rtol=0, atol=0)
    torch.testing.assert_close(getattr(salience, method)(model, x, 1), want, rtol=0, atol=0)
