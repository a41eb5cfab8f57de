"""Attention rollout's narrowed pass runs an ``nn.MultiheadAttention`` on its fast path's terms by one call of
PyTorch's ``torch._native_multi_head_attention`` asked for the per-head weights, with no mode around it
(salience.attention._NativeMHA): the Python attention (``F.multi_head_attention_forward``) is not called, the maps
equal the capture around the whole pass and a hand-written reference, every other case (masks, odd heads, not batch
first, the fast path turned off, an ``nn.TransformerEncoder``) runs as before, and the model comes back as it was.

Tolerances: against the capture everywhere (the same kernel on the same input) the maps are equal to the bit
(``atol=rtol=0``); against the hand-written ``softmax(Q K^T / sqrt(d))`` ``rtol=1e-5, atol=1e-6`` (float32, another
order of the sums)."""
from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError, attention
from salience.attention import AttentionCapture, attention_maps

from conftest import unchanged
from test_attention_scope import _everywhere
from test_transformer import ref_rollout

torchvision = pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402


def _vit(heads: int = 4, layers: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=heads, hidden_dim=16,
                              mlp_dim=32, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    return model


def _x(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hand_attention(mha: nn.MultiheadAttention, h: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d) [- inf where padded])`` ``(B, heads, N, N)`` of batch-first tokens ``h`` from the
    module's weights."""
    b, n, d = h.shape
    heads = mha.num_heads
    q, k, _ = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k))
    logits = q @ k.transpose(-2, -1) / math.sqrt(d // heads)
    if pad is not None:  # True (or -inf, as nn.TransformerEncoder hands it on) where padded
        pad = pad if pad.dtype == torch.bool else pad == float("-inf")
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _hand(model: nn.Module, x: torch.Tensor, mhas: list[nn.Module]) -> list[torch.Tensor]:
    """Each of ``mhas``' attention by hand, from the inputs it gets in a bare pass of ``model``."""
    inputs: dict = {}
    handles = [m.register_forward_pre_hook(lambda m, a, kw: inputs.setdefault(m, (a, kw)), with_kwargs=True)
               for m in mhas]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in mhas:
        args, kw = inputs[m]
        q = args[0] if m.batch_first else args[0].transpose(0, 1)
        out.append(_hand_attention(m, q, kw.get("key_padding_mask", args[3] if len(args) > 3 else None)))
    return out


@contextmanager
def _counting(calls: dict):
    """Counts, in ``calls``, of this thread's calls of the Python attention (``F.multi_head_attention_forward``, what
    ``nn.MultiheadAttention`` calls off its fast path) and of the native kernel, seen by a profile function (the
    functions themselves left as they are: the capture tells them by identity)."""
    python, native = F.multi_head_attention_forward.__code__, torch._native_multi_head_attention
    calls.update(python=0, native=0)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is python:
            calls["python"] += 1
        elif event == "c_call" and arg is native:
            calls["native"] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _narrowed(model: nn.Module, x: torch.Tensor, between=None) -> tuple[list, list, dict, list]:
    """The maps of the capture everywhere, then a first pass (which learns the scope), ``between()``, then a narrowed
    pass under ``unchanged`` with its calls counted: ``(its maps, the maps everywhere, the calls, its runs of the
    model)``."""
    want = _everywhere(model, x)
    attention_maps(model, x)
    if between is not None:
        between()
    calls: dict = {}
    runs: list = []
    with unchanged(model), _counting(calls):
        got = attention_maps(model, x, forward=lambda m, t: runs.append(m(t)))
    return got, want, calls, runs


def _mhas(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def _left_on(model: nn.Module) -> list:
    """What a pass could leave on the model: an instance ``forward``, a hook, a mode."""
    return ([n for n, m in model.named_modules() if "forward" in m.__dict__]
            + [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
            + ["mode"] * torch._C._len_torch_function_stack())


def _assert_maps(got: list, want: list, exact: bool) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if exact:
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_narrowed_pass_runs_the_native_kernel_no_python_attention_and_equals_both_references():
    model, x = _vit(), _x()
    hand = _hand(model, x, _mhas(model))
    for _ in range(2):
        got, want, calls, runs = _narrowed(model, x)
        assert attention._SCOPES.get(model, (), ()).live() == _mhas(model)  # the scope: the MHA modules
        assert calls == {"python": 0, "native": 3} and len(runs) == 1  # before: the Python path under the mode
        _assert_maps(got, want, exact=True)
        _assert_maps(got, hand, exact=False)
    assert not _left_on(model)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_with_the_native_kernel_equals_the_capture_everywhere_and_the_reference(fusion, discard):
    model, x = _vit(), _x(b=3, seed=2)
    ref = ref_rollout(_hand(model, x, _mhas(model)), 1, (4, 4), (32, 32), fusion, discard)
    first = salience.attention_rollout(copy.deepcopy(model), x, head_fusion=fusion, discard_ratio=discard)
    salience.attention_rollout(model, x)  # learnt
    calls: dict = {}
    with unchanged(model), _counting(calls):
        got = salience.attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard)
        several = salience.attention_rollout(model, x, torch.tensor([[0, 1], [2, 3], [4, 0]]),
                                             head_fusion=fusion, discard_ratio=discard)
    assert calls == {"python": 0, "native": 6}
    torch.testing.assert_close(got, first, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert several.shape == (3, 2, 32, 32)
    for k in range(2):
        torch.testing.assert_close(several[:, k], got, rtol=0, atol=0)


def test_a_users_hooks_on_the_attention_still_run_outside_any_mode_and_their_output_counts():
    """The module's own ``__call__`` runs the substituted ``forward``: the user's pre-hook and forward hook are
    called (once per pass), the forward hook's replaced output is what the next layer gets (the maps equal those
    of the capture everywhere with the same hook, not those without it), and no mode is active in them."""
    model, x = _vit(), _x()
    mha = model.encoder.layers[0].self_attention
    seen: list = []
    mha.register_forward_pre_hook(lambda m, a: seen.append(("pre", torch._C._len_torch_function_stack())))

    def doubled(m, a, out):
        seen.append(("post", torch._C._len_torch_function_stack()))
        return out[0] * 2, out[1]

    mha.register_forward_hook(doubled)
    got, want, calls, _ = _narrowed(model, x, between=seen.clear)
    assert calls["python"] == 0 and seen == [("pre", 0), ("post", 0)]  # before: the mode on in both
    _assert_maps(got, want, exact=True)
    mha._forward_hooks.clear()
    assert not torch.equal(_everywhere(model, x)[1], want[1])  # the hook's output reached layer 1


class WeightsViT(nn.Module):
    """Tokens through ``nn.MultiheadAttention`` layers (batch first) that ask for the weights and use them: the
    averaged ones (``(B, L, S)``) or the per-head ones (``(B, heads, L, S)``), each layer's first column added."""

    def __init__(self, average: bool, heads: int = 2, dim: int = 16, depth: int = 2, batch_first: bool = True,
                 pad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.average, self.batch_first, self.pad = average, batch_first, pad
        self.embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=batch_first) for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        pad = None
        if self.pad:
            pad = torch.zeros(t.shape[:2], dtype=torch.bool)
            pad[:, -1] = True
        for mha in self.attn:
            u = t if self.batch_first else t.transpose(0, 1)
            o, w = mha(u, u, u, key_padding_mask=pad, average_attn_weights=self.average)
            o = o if self.batch_first else o.transpose(0, 1)
            w = w if self.average else w.mean(1)
            t = t + o + w[..., :1]
        return self.head(t[:, 0])


@pytest.mark.parametrize("average", [True, False])
def test_the_weights_handed_back_are_the_modules_own(average):
    model, x = WeightsViT(average).eval(), _x()
    with torch.no_grad():
        bare = model(x)
    got, want, calls, outputs = _narrowed(model, x)
    assert calls == {"python": 0, "native": 2}
    torch.testing.assert_close(outputs[0], bare, rtol=1e-5, atol=1e-6)
    _assert_maps(got, want, exact=True)
    _assert_maps(got, _hand(model, x, _mhas(model)), exact=False)


FALLBACKS = {
    "key_padding_mask": lambda: WeightsViT(True, pad=True).eval(),
    "odd heads (no fast path)": lambda: WeightsViT(True, heads=1).eval(),
    "not batch first": lambda: WeightsViT(False, batch_first=False).eval(),
    "torchvision, fast path turned off": lambda: _vit(),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_where_the_fast_paths_conditions_fail_the_capture_runs_as_before(name, monkeypatch):
    model, x = FALLBACKS[name](), _x()
    if name.endswith("turned off"):
        monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    hand = _hand(model, x, _mhas(model))
    got, want, calls, runs = _narrowed(model, x)
    assert calls["python"] == len(want) and len(runs) == 1  # the Python path under the mode, in one pass
    _assert_maps(got, want, exact=True)
    _assert_maps(got, hand, exact=False)


def test_bias_kv_is_refused_as_before():
    model = _vit()
    blk = model.encoder.layers[1]
    blk.self_attention = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True).eval()
    with unchanged(model), pytest.raises(SalienceError, match="bias_k"):
        salience.attention_rollout(model, _x())


class EncoderViT(nn.Module):
    """Patch embedding + ``nn.TransformerEncoder`` (batch first), with or without a key padding mask: the scope is
    the encoder (its own fast path would skip its layers' attention without a mode around it), so its layers' MHA
    run under the mode as before."""

    def __init__(self, pad: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pad = pad
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        pad = None
        if self.pad:
            pad = torch.zeros(t.shape[:2], dtype=torch.bool)
            pad[:, -1] = True
        return self.head(self.encoder(t, src_key_padding_mask=pad)[:, 0])


@pytest.mark.parametrize("pad", [False, True])
def test_an_nn_transformer_encoder_keeps_its_attention_under_the_mode(pad):
    model, x = EncoderViT(pad).eval(), _x()
    hand = _hand(model, x, _mhas(model))
    got, want, calls, runs = _narrowed(model, x)
    assert attention._SCOPES.get(model, (), ()).live() == [model.encoder]
    assert calls["python"] == 2 and len(runs) == 1
    _assert_maps(got, want, exact=True)
    _assert_maps(got, hand, exact=False)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["kernel", "user hook"])
def test_an_error_mid_pass_leaves_the_model_as_it_was(exc, where, monkeypatch):
    model, x = _vit(), _x()
    attention_maps(model, x)
    mha = model.encoder.layers[1].self_attention
    native = torch._native_multi_head_attention
    calls: list = []

    def boom(*a, **kw):
        calls.append(1)
        if len(calls) >= 2:  # the second layer's, also in the pass everywhere that a failed narrowed one runs
            raise exc("inside the attention")
        return native(*a, **kw)

    handle = None
    if where == "kernel":
        monkeypatch.setattr(torch, "_native_multi_head_attention", boom)
    else:
        handle = mha.register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(exc("in the user's hook")))
    try:
        with unchanged(model), pytest.raises(exc):
            attention_maps(model, x)
    finally:
        if handle is not None:
            handle.remove()
    monkeypatch.undo()
    assert not _left_on(model)
    calls2: dict = {}
    with _counting(calls2):
        got = attention_maps(model, x)
    assert calls2 == {"python": 0, "native": 3}
    _assert_maps(got, _everywhere(model, x), exact=True)


def test_a_users_own_instance_forward_is_kept_and_called():
    model, x = _vit(), _x()
    mha = model.encoder.layers[0].self_attention
    called: list = []

    def own(*a, **kw):
        called.append(1)
        return type(mha).forward(mha, *a, **kw)

    mha.forward = own
    got, want, calls, _ = _narrowed(model, x, between=called.clear)
    assert called == [1] and mha.__dict__["forward"] is own
    assert calls == {"python": 1, "native": 3}  # layer 0: its own forward, under the mode (the kernel inside)
    _assert_maps(got, want, exact=True)


def test_another_thread_running_the_attention_gets_the_class_forward_uncaptured():
    from salience._core.fingerprint import structure

    model = _vit()
    mha = model.encoder.layers[0].self_attention
    tokens = torch.rand(1, 5, 16)
    seen: list = []

    def other() -> None:
        seen.append(structure(model))
        with torch.inference_mode():
            seen.append(mha(tokens, tokens, tokens, need_weights=False)[0])

    def in_thread() -> None:
        t = threading.Thread(target=other)
        t.start()
        t.join()

    in_thread()
    cap = AttentionCapture(batch=1)
    calls: dict = {}
    with attention._active_in(cap, [mha], native=True), _counting(calls):
        assert "forward" in mha.__dict__
        in_thread()
        assert cap.maps == []  # its own fast path (no mode in that thread), not recorded
        with torch.inference_mode():
            out = mha(tokens, tokens, tokens, need_weights=False)[0]
        assert len(cap.maps) == 1 and calls == {"python": 0, "native": 1}
    assert seen[0] == seen[2]  # the other thread's fingerprint leaves this pass's forward out
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
    torch.testing.assert_close(out, seen[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.maps[0], _hand_attention(mha, tokens), rtol=1e-5, atol=1e-6)
    assert not _left_on(model)


class HybridViT(nn.Module):
    """A convolution + BatchNorm stem (what ``fold_batchnorm`` folds) and two ``nn.MultiheadAttention`` layers on
    their fast path's terms (the narrowed pass's scope: the two, with no hook on them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.BatchNorm2d(16))
        self.attn = nn.ModuleList(nn.MultiheadAttention(16, 2, batch_first=True) for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        for mha in self.attn:
            t = t + mha(t, t, t)[0]
        return self.head(t.mean(1))


def test_a_copy_made_by_another_thread_mid_pass_carries_no_instance_forward():
    """Another thread's ``fold_batchnorm`` call (RISE) during a narrowed rollout pass: own_hooks() sees no hook (the
    native path puts none), so the folded copy is a deep copy of the model with this pass's instance ``forward``
    in it. The copy, kept for the process, then ran this thread's inference-mode passes through that forward,
    recording every attention matrix into a copy of the finished pass's capture (memory kept for good), and
    its other passes under the finished pass's own capture. The copy has no instance ``forward``."""
    from salience._core import perf as _perf

    model, x = HybridViT().eval(), _x()
    attention_maps(model, x)
    errors: list = []

    def rise() -> None:
        try:
            with salience.performance(fold_batchnorm=True):
                salience.rise(model, x[:1], 0, masks=4)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def run(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        assert all("forward" in a.__dict__ for a in m.attn)  # this pass's native path is on
        other = threading.Thread(target=rise)
        other.start()
        other.join()
        return m(t)

    try:
        got = attention_maps(model, x, forward=run)
        folded, why = _perf.folded_model(model)
        assert not errors and folded is not None, (errors, why)
        assert [n for n, m in folded.named_modules() if "forward" in m.__dict__] == []  # before: attn.0, attn.1
        with torch.inference_mode():
            folded(x)  # before: recorded by the pass's forward copied into the folded copy
    finally:
        _perf.clear_cache()
    _assert_maps(got, _everywhere(model, x), exact=True)
    assert not _left_on(model)


def test_ctrl_c_at_each_point_of_the_substitution_leaves_the_model_as_it_was():
    """SIGINT at each point where Python may raise ``KeyboardInterrupt`` in ``_active_in``, its hooks, ``_hook``,
    ``_unhook`` and the substituted forward (set, called, taken off): no instance ``forward``, hook or mode is
    left, and the next pass runs the native kernel again."""
    from test_attention_scope import sigint_tracer
    from test_hygiene import _sigint_handled_by

    model, x = _vit(layers=2), _x(b=1)
    attention_maps(model, x)
    outer = attention._active_in.__wrapped__.__code__
    codes = {outer, *(c for c in outer.co_consts if isinstance(c, types.CodeType)), attention._hook.__code__,
             attention._unhook.__code__, *(f.__code__ for f in (attention._NativeMHA.__init__,
                                                                 attention._NativeMHA.__call__,
                                                                 attention._NativeMHA.remove))}
    traced = sigint_tracer(codes, lambda: attention_maps(model, x))
    passed = traced(None)
    assert any(code is attention._NativeMHA.__call__.__code__ for code, _ in passed)
    failed = []
    for k in range(1, len(passed) + 1):
        with _sigint_handled_by(signal.default_int_handler):
            traced(k)
        if _left_on(model):
            failed.append(k)
            while torch._C._len_torch_function_stack():
                torch._C._pop_torch_function_stack()
            for m in model.modules():
                m.__dict__.pop("forward", None)
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
                m._forward_hooks_always_called.clear()
    assert not failed, f"{len(failed)} of {len(passed)} points left a forward, a hook or a mode"
    calls: dict = {}
    with _counting(calls):
        assert len(attention_maps(model, x)) == 2
    assert calls == {"python": 0, "native": 2}
