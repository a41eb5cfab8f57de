"""The attention capture narrowed to the modules that call the attention (salience.attention._pass): the maps
of a narrowed pass equal those of the capture around the whole pass (itself tested against explicit references
in test_transformer.py), the rest of the pass runs without the mode, and every way a narrowed pass can miss
(another path, a fast path, an error, another thread) ends right."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import salience
from salience import attention
from salience.attention import AttentionCapture, attention_maps

from conftest import unchanged
from tiny_vit import Block, TinyViT, torchvision_vit
from test_s49_record import ForwardLog


def _mode_on() -> bool:
    return torch._C._len_torch_function_stack() > 0


class Probe(nn.Module):
    """Identity that notes whether a torch function mode was active when it ran (outside the attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = ForwardLog()  # the guard puts back a plain list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_mode_on())
        return x


class Probed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.probe, self.model = Probe(), model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.probe(x))


class EncoderViT(nn.Module):
    """Patch embedding + ``nn.TransformerEncoder`` (batch first) with a key padding mask (the last token): in eval
    mode under inference mode, the encoder takes PyTorch's nested-tensor fast path unless a mode is active around
    it, on which ``nn.MultiheadAttention`` under a mode fails."""

    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        pad = torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device)
        pad[:, -1] = True
        t = self.encoder(t, src_key_padding_mask=pad)
        return self.head(t[:, 0])


class KeysFirstSplit(nn.Module):
    """A keys-first softmax ``(B, S, heads, L)`` in one module, its product with the values in a sibling."""

    class Weights(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1)

    class Mix(nn.Module):
        def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bshl,bhsd->bhld", a, v)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.weights, self.mix = self.Weights(), self.Mix()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, 8)
        q, k, v = (u.unflatten(-1, (2, 4)).transpose(1, 2) for u in self.qkv(t).chunk(3, -1))  # (B, 2, N, 4)
        o = self.mix(self.weights(q, k), v)
        return self.head(o.transpose(1, 2).flatten(2).mean(1))


def _tiny(mode: str) -> nn.Module:
    torch.manual_seed(0)
    m = TinyViT(size=(16, 16), patch=4).eval()
    for blk in m.blocks:
        blk.attn.mode = mode
    return m


class Refusing(nn.Module):
    """``b`` (attention) is called from the model and from inside ``a`` (attention too, not ``b``'s parent), where a
    pre-hook of the user's on ``b`` refuses the call (the input has no class token) and ``a`` goes on without it.
    The capture is entered before the user's pre-hooks (as around the whole pass, where they run under it), so the
    always-called hook balances the refused call; before, it left the capture ``a`` had entered, and every narrowed
    pass missed ``a``'s attention (run again everywhere)."""

    class Attend(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            q = t.unflatten(-1, (2, 4)).transpose(1, 2)  # (B, 2, N, 4)
            return (q @ q.transpose(-2, -1)).softmax(-1) @ q

    class Outer(nn.Module):
        def __init__(self, helper: nn.Module) -> None:
            super().__init__()
            self.helper = [helper]  # not a submodule

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            try:
                t = t + self.helper[0](t[:, 1:]).transpose(1, 2).flatten(2).mean(1, keepdim=True)
            except ValueError:
                pass
            return Refusing.Attend.forward(self, t)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.b = self.Attend()
        self.a = self.Outer(self.b)
        self.head = nn.Linear(8, 3)

        def refuse(module: nn.Module, args: tuple) -> None:
            if args[0].shape[1] % 2 == 0:
                raise ValueError("no class token")

        self.b.register_forward_pre_hook(refuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)  # (B, 17, 8)
        t = t + self.b(t).transpose(1, 2).flatten(2)
        return self.head(self.a(t).transpose(1, 2).flatten(2)[:, 0])


class DirectBlock(Block):
    """A block that calls its attention's ``forward`` itself (no hook of the attention module runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.forward(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _direct() -> nn.Module:
    m = _tiny("explicit")
    for blk in m.blocks:
        blk.__class__ = DirectBlock
    return m


MODELS = {
    "torchvision MHA": lambda: torchvision_vit(),
    "fused SDPA": lambda: _tiny("sdpa"),
    "explicit softmax": lambda: _tiny("explicit"),
    "nn.TransformerEncoder": lambda: (torch.manual_seed(0), EncoderViT().eval())[1],
    "keys-first in two modules": lambda: (torch.manual_seed(0), KeysFirstSplit().eval())[1],
    "attention's forward called directly": _direct,
    "a user's pre-hook refusing a nested call": lambda: (torch.manual_seed(0), Refusing().eval())[1],
}


def _counted(calls: list):
    def run(m, t):
        calls.append(1)
        return m(t)
    return run


def _everywhere(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The capture around the whole pass, on a copy of ``model`` (so its learnt scope is not used)."""
    cap = AttentionCapture(batch=x.shape[0])
    with cap, torch.inference_mode():
        copy.deepcopy(model)(x)
    return cap.maps


@pytest.mark.parametrize("name", list(MODELS))
def test_a_narrowed_pass_runs_once_equals_the_capture_everywhere_and_leaves_the_rest_bare(name):
    model = Probed(MODELS[name]())
    size = 32 if name == "torchvision MHA" else 16
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    want = _everywhere(model, x)
    assert len(want) == 2 if name != "keys-first in two modules" else len(want) == 1
    for n in range(3):  # the first pass learns where the attention runs, the next are narrowed to it
        calls: list = []
        with unchanged(model):
            got = attention_maps(model, x, forward=_counted(calls))
        assert len(calls) == 1, "a narrowed pass missed the attention and ran again"
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        # the probe runs before any attention: under the mode on the first pass only
        assert model.probe.seen[-1] is (n == 0)
    assert not _mode_on()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_narrowed_pass_that_fails_runs_again_everywhere(monkeypatch):
    """Not raised to the encoder (its fast path then runs, and MHA under the mode refuses its nested tensors): the
    narrowed pass fails, the pass everywhere gives the maps."""
    monkeypatch.setattr(attention, "_FAST_PATHS", ())
    model = MODELS["nn.TransformerEncoder"]()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    want = _everywhere(model, x)
    attention_maps(model, x)
    calls: list = []
    with unchanged(model):
        got = attention_maps(model, x, forward=_counted(calls))
    assert len(calls) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_rollout_narrowed_equals_rollout_everywhere():
    model = _tiny("explicit")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    first = salience.attention_rollout(model, x)  # learns the scope
    narrowed = salience.attention_rollout(model, x)
    fresh = salience.attention_rollout(copy.deepcopy(model), x)
    torch.testing.assert_close(narrowed, first, rtol=0, atol=0)
    torch.testing.assert_close(narrowed, fresh, rtol=0, atol=0)


def test_a_pass_that_takes_another_path_runs_again_everywhere_and_learns_it():
    model = _tiny("mha")  # the attention called from nn.MultiheadAttention ...
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    attention_maps(model, x)
    for blk in model.blocks:
        blk.attn.mode = "sdpa"  # ... now from its parent: a pass narrowed to the MHA modules sees none
    want = _everywhere(model, x)
    calls: list = []
    got = attention_maps(model, x, forward=_counted(calls))
    assert len(calls) == 2 and len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    calls.clear()
    attention_maps(model, x, forward=_counted(calls))
    assert len(calls) == 1  # learnt again


class EitherViT(nn.Module):
    """Two ViTs of the same layout, ``use`` picks the one that runs: the attention is called from other
    modules each time ``use`` changes."""

    def __init__(self) -> None:
        super().__init__()
        self.vits, self.use = nn.ModuleList([_tiny("explicit"), _tiny("sdpa")]), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vits[self.use](x)


def test_a_model_whose_path_keeps_changing_ends_with_the_capture_everywhere():
    model = EitherViT()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    runs = []
    for i in range(6):
        model.use = i % 2
        calls: list = []
        got = attention_maps(model, x, forward=_counted(calls))
        want = _everywhere(model, x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        runs.append(len(calls))
    assert runs == [1, 2, 2, 1, 1, 1]  # learnt, missed and learnt again, missed twice: everywhere from then on


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_a_narrowed_module_leaves_no_mode_and_no_hook(exc):
    model = _tiny("explicit")
    x = torch.rand(1, 3, 16, 16)
    attention_maps(model, x)
    attn = model.blocks[1].attn

    def boom(module, args, out):
        raise exc("inside the attention")

    handle = attn.register_forward_hook(boom)
    try:
        with unchanged(model), pytest.raises(exc):
            attention_maps(model, x)
    finally:
        handle.remove()
    assert not _mode_on()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert len(attention_maps(model, x)) == 2


def test_another_thread_running_a_narrowed_module_is_not_captured():
    model = _tiny("explicit")
    x = torch.rand(1, 3, 16, 16)
    attn = model.blocks[0].attn
    tokens = torch.rand(1, 17, 16)
    cap = AttentionCapture(batch=1)
    with attention._active_in(cap, [attn]), torch.no_grad():
        t = threading.Thread(target=attn, args=(tokens,))
        t.start()
        t.join()
        assert cap.maps == []
        attn(tokens)
        assert len(cap.maps) == 1
    assert not _mode_on() and not attn._forward_hooks and not attn._forward_pre_hooks
    assert len(attention_maps(model, x)) == 2


def _hooked(model: nn.Module) -> list:
    return [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_always_called]


def sigint_tracer(codes: set, run):
    """``traced(at)``: ``run()`` traced in the functions whose code is in ``codes``; the points where Python may raise
    ``KeyboardInterrupt`` (``test_hygiene._interruption_points``) passed there, in order, returned; with ``at`` (the
    k-th one), SIGINT sent there (the ``KeyboardInterrupt`` it raises out of ``run`` caught)."""
    import signal
    import sys

    from test_hygiene import _interruption_points

    points = {c: _interruption_points(c) for c in codes}

    def traced(at):
        passed: list = []

        def local(frame, event, arg):
            if event in ("opcode", "call") and frame.f_lasti in points[frame.f_code]:
                passed.append((frame.f_code, frame.f_lasti))
                if len(passed) == at:
                    sys.settrace(None)
                    signal.raise_signal(signal.SIGINT)
            return local

        def calls(frame, event, arg):
            if frame.f_code not in codes:
                return None
            frame.f_trace_opcodes = True
            return local(frame, event, arg)

        sys.settrace(calls)
        try:
            run()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        return passed
    return traced


def ctrl_c_leftovers(model: nn.Module, traced) -> tuple[list, int]:
    """The points (of ``traced``'s, :func:`sigint_tracer`) where SIGINT left a mode on the stack or a hook on
    ``model`` (cleaned up after each), and their number."""
    import signal

    from test_hygiene import _sigint_handled_by

    n = len(traced(None))
    assert n > 25
    failed = []
    for k in range(1, n + 1):
        with _sigint_handled_by(signal.default_int_handler):
            traced(k)
        if _mode_on() or _hooked(model):
            failed.append(k)
            while _mode_on():
                torch._C._pop_torch_function_stack()
            for m in model.modules():
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
                m._forward_hooks_always_called.clear()
    return failed, n


def test_ctrl_c_at_each_point_of_the_narrowing_leaves_no_mode_and_no_hook():
    """SIGINT (Ctrl-C) at each point where Python may raise ``KeyboardInterrupt`` in ``_active_in``, its two
    hooks and what puts them on and off, in turn: afterwards no mode is on the stack, no hook on the model, and the next pass is narrowed again.
    Before, a Ctrl-C in ``leave`` after the depth was lowered left the mode on the stack for good, one in
    ``enter`` before the mode was entered popped a mode that was not the capture (here: none, an error), and
    one between a hook's registration and its handle's append left the hook on the module."""
    import types

    model = _tiny("explicit")
    x = torch.rand(1, 3, 16, 16)
    attention_maps(model, x)  # learnt: the next passes are narrowed
    outer = attention._active_in.__wrapped__.__code__
    codes = {outer, *(c for c in outer.co_consts if isinstance(c, types.CodeType)),
             *(f.__code__ for f in (getattr(attention, "_hook", None), getattr(attention, "_unhook", None)) if f)}
    failed, n = ctrl_c_leftovers(model, sigint_tracer(codes, lambda: attention_maps(model, x)))
    assert not failed, f"{len(failed)} of {n} points left a mode or a hook"
    calls: list = []
    assert len(attention_maps(model, x, forward=_counted(calls))) == 2 and len(calls) == 1


class Equal(nn.Module):
    """A model class with its own ``__eq__``: two models that compare equal (hashed by identity, as PyTorch's
    module walks need)."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = _tiny("explicit")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Equal)

    __hash__ = nn.Module.__hash__


def test_a_model_that_compares_equal_to_another_is_narrowed_by_itself():
    one, two = Equal(), Equal()
    two.vit.blocks[0].attn.mode = "sdpa"  # its attention called from another module than one's
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    for model in (one, two, one, two):
        calls: list = []
        attention_maps(model, x, forward=_counted(calls))
    assert len(calls) == 1 and isinstance(attention._SCOPES.get(two, (), ()), attention._Scope)
    assert attention._SCOPES.get(one, (), ()).live() != attention._SCOPES.get(two, (), ()).live()


def test_clear_cache_forgets_where_the_attention_runs():
    """``clear_cache`` (what to call after changing a plain attribute the model's ``forward`` reads) forgets the
    scopes too: a model that went to the capture everywhere for good is narrowed again."""
    from salience._core.perf import clear_cache

    model = EitherViT()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for i in range(3):
        model.use = i % 2
        attention_maps(model, x)
    assert attention._SCOPES.get(model, (), ()) is attention._EVERYWHERE
    clear_cache()
    attention_maps(model, x)  # learnt again
    calls: list = []
    got = attention_maps(model, x, forward=_counted(calls))
    assert isinstance(attention._SCOPES.get(model, (), ()), attention._Scope) and len(calls) == 1
    for g, w in zip(got, _everywhere(model, x), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_narrowed_pass_leaves_another_threads_fingerprint_of_the_model_as_it_was():
    """The narrowing's hooks are this thread's (as every hook salience puts on a model,
    ``_core.autograd.this_thread``): another thread's ``structure`` of the model, what its cached default layers
    and compiled graphs are kept for, leaves them out. Before, a Grad-CAM call in another thread during a rollout
    saw a changed model (its caches missed)."""
    from salience._core.fingerprint import structure

    model = _tiny("explicit")
    seen: list = []

    def other() -> None:
        seen.append(structure(model))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    with attention._active_in(AttentionCapture(batch=1), [b.attn for b in model.blocks]):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen[0] == seen[1]
