"""Attention capture: every attention matrix a model computes, whatever kernel it runs.

Attention rollout and transformer attribution (:mod:`salience.methods.transformer`) need the
attention matrices ``A = softmax(Q K^T / sqrt(d) + mask)`` ``(B, heads, N, N)`` of every layer,
and for the latter their gradients. Real models rarely hand them out: torchvision's ViT calls
``nn.MultiheadAttention`` with ``need_weights=False``, which runs the fused
``F.scaled_dot_product_attention``, whose kernels never form ``A``. Hooks on modules cannot see
inside. As :mod:`salience.rules` intercepts ReLU operations, :class:`AttentionCapture` is a
:class:`torch.overrides.TorchFunctionMode` that intercepts the attention *operation* while it is
active (around one forward pass, in the entering thread only):

* ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
  computed explicitly, ``A = softmax(q k^T * scale + mask)`` (a boolean mask keeps ``True``, a
  float mask is added, ``is_causal`` keeps the lower triangle), then ``A @ v``;
* ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls, with or without
  ``need_weights``): the in-projection, the same explicit attention per head (``attn_mask`` and
  ``key_padding_mask`` with PyTorch's meaning: ``True`` = not allowed), the out-projection; the
  weights it returns when asked are ``A`` (averaged over heads if ``average_attn_weights``).
  Without autograd (rollout) and on the fast path's conditions, PyTorch's own C++ kernel
  ``torch._native_multi_head_attention`` asked for the per-head weights instead: the operators
  of the bare fast-path forward, the same ``A``;
* an explicit ``softmax(..., dim=-1)`` of a tensor of 3 or more dims (``torch.softmax``,
  ``F.softmax``, ``torch.special.softmax``, ``x.softmax(-1)``): taken to be attention; its output is
  recorded as it is (5 or more dims: local attention, VOLO's outlook ``(B, heads, positions, K*K, K*K)``,
  which the attention methods refuse by name); ``softmax(dim=1)`` of a 4-D tensor with the keys first,
  ``(B, S, heads, L)`` or ``(B, S, L, heads)``, once a product (``einsum``, ``@``, ``matmul``, ``bmm``) contracts it
  (or a view of it) with the values: recorded permuted to ``(B, heads, L, S)`` (a softmax over the channels of a
  ``(B, C, H, W)`` map with ``C == H`` that only scales the map, channel attention in a CNN, or contracts the
  channels with a weight, no batch index, is not attention); with as many heads as tokens, ``(B, S, S, S)``, the
  product tells the heads (shared with the values) from the queries (:meth:`KeysFirst._read`).

Each call's arguments are read positional or by keyword alike (``torch.matmul(input=a, other=v)``,
``F.scaled_dot_product_attention(query=q, key=k, value=v)``): :func:`operands`, :func:`softmax_input`.

Every other torch call of the pass also reaches the mode (that is how modes work): it leaves at once
on one set lookup of the function (:data:`_WATCHED`). :func:`attention_maps` (attention rollout's pass) keeps
even that off the rest of the pass: a model's first pass runs under the mode throughout and notes the module
each attention was called from (the innermost module being called, where its hooks run); its later passes enter the
mode only inside those modules (forward hooks), checked by the count of matrices (:func:`scoped`, which transformer
attribution's forward shares, without the native path below: :class:`ActiveIn`); such a module that
is an ``nn.MultiheadAttention`` on its fast path's terms runs no mode at all: an instance ``forward`` for the pass
calls ``torch._native_multi_head_attention`` asked for the per-head weights and records them (:class:`_NativeMHA`).

What real models run is covered: timm's ``Attention`` (SDPA when ``fused_attn``, else
``(q * scale) @ k^T``, ``softmax(dim=-1)``, ``attn_drop``), Hugging Face eager attention
(``softmax(..., dim=-1, dtype=float32)``, then dropout; ``A`` recorded in float32) and SDPA
(``scaled_dot_product_attention(..., scale=...)``), tested in ``tests/test_transformers_timm_hf.py``.

So the numbers are the attention's own (up to float rounding of a fused kernel) and the recorded
``A`` is the very tensor the output is computed from: a gradient reaches it. Each ``A`` is
recorded as ``(B, heads, L, S)``: 4-D (or more) as it is; a 3-D ``(B * heads, L, S)`` (``bmm``-style) is
split with the batch size ``batch`` when given, else read as one head. Dropout inside attention
runs as the model asks (explaining runs in eval mode, where modules pass ``dropout_p=0``).

Not supported (a :class:`~salience.SalienceError`): ``nn.MultiheadAttention`` with ``bias_k`` /
``bias_v``, ``add_zero_attn``, static keys or unbatched input. A TorchScript model runs out of
reach of any mode: refused. Attention written without a ``softmax`` call (e.g. ``exp`` / sum)
is not seen.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from salience._core import perf as _perf
from salience._core.autograd import check_input, model_call, this_thread
from salience._core.errors import SalienceError
from salience._core.calm import calmly
from salience._core.guard import check_python_model, model_guard
from salience._core.tensors import check_flag, check_int

__all__ = ["AttentionCapture", "attention_maps", "check_model"]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_NAMES = tuple(_MHA_SIGNATURE.parameters)
_MHA_DEFAULTS = {n: p.default for n, p in _MHA_SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty}
_SDPA = F.scaled_dot_product_attention
SOFTMAXES = frozenset({torch.softmax, Tensor.softmax, F.softmax, torch.special.softmax})
# the functions the capture acts on; any other torch call passes straight through
# products that contract a keys-first softmax with the values (what makes it attention, not a channel weighting);
# torch.linalg.matmul is another function object than torch.matmul, the same product (session 44: a keys-first
# softmax contracted by it was never taken for attention, "saw no attention operation")
PRODUCTS = frozenset({torch.einsum, torch.matmul, torch.linalg.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm,
                      Tensor.bmm})
# calls that may copy a keys-first softmax on its way to that product (``a.permute(...).reshape(B * heads, L, S)``),
# casts among them (``softmax(s, dim=1, dtype=torch.float64).to(v.dtype)``: the same dims, another dtype; session 46,
# such a softmax was never taken for attention, "saw no attention operation")
CASTS = frozenset({Tensor.to, Tensor.type_as, Tensor.type, Tensor.float, Tensor.double, Tensor.half,
                    Tensor.bfloat16})
_COPYING = frozenset({Tensor.contiguous, Tensor.clone, torch.clone, Tensor.reshape, torch.reshape, Tensor.flatten,
                      torch.flatten, *CASTS})
_WATCHED = frozenset({_SDPA, F.multi_head_attention_forward, *SOFTMAXES, *PRODUCTS, *_COPYING})
# the operands each call reads, in torch's order and by torch's names: a call may give any of them by keyword
# (``torch.matmul(input=a, other=v)``, ``a.matmul(other=v)``, ``torch.bmm(input=a, mat2=v)``, ``torch.reshape(input=a,
# shape=s)``, ``F.scaled_dot_product_attention(query=q, key=k, value=v)``; session 45: read by position only, such a
# model's keys-first attention was not seen, "saw no attention operation", and SDPA's keywords were a TypeError)
_OPERAND_NAMES: dict[Any, tuple[str, ...]] = {
    **{f: ("input", "other") for f in (torch.matmul, torch.linalg.matmul, Tensor.matmul, Tensor.__matmul__)},
    **{f: ("input", "mat2") for f in (torch.bmm, Tensor.bmm)},
    **{f: ("input",) for f in _COPYING}, _SDPA: ("query", "key", "value")}


def operands(func: Any, args: tuple, kwargs: Optional[dict]) -> list[Any]:
    """The operands a call of ``func`` reads, in order, whichever way it spelled them (positional or keyword; a
    method's own tensor, ``a`` of ``a.matmul(other=v)``, is its first): a product's two (``@``, ``matmul``,
    ``linalg.matmul``, ``bmm``) or ``torch.einsum``'s tensors (given one by one or as a list; einsum takes no
    keywords), a copy's source (``contiguous``, ``clone``, ``reshape``, ``flatten``, a cast: ``to``, ``float``...), SDPA's query, key and value;
    ``[]`` for any other call. The one reader of these calls' arguments: the capture's :class:`KeysFirst`,
    :func:`product_labels` and the default-layer search's spotter all take them from here. A missing one is
    ``None``."""
    if func is torch.einsum:
        return [t for x in args[1:] for t in (x if isinstance(x, (list, tuple)) else (x,)) if isinstance(t, Tensor)]
    names = _OPERAND_NAMES.get(func, ())
    kwargs = kwargs or {}
    return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def _check_callable(fn: Any, name: str, what: str) -> None:
    """``fn`` ``None`` or callable, else a :class:`SalienceError` (it was a raw "'int' object is not callable"
    in the middle of the pass)."""
    if fn is not None and not callable(fn):
        raise SalienceError(f"{name} must be None or {what}, got {type(fn).__name__}")


def _mha_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``F.multi_head_attention_forward``'s arguments by name, defaults filled in (what
    ``inspect.Signature.bind`` gives, at a tenth of its cost: it runs once per attention layer)."""
    a = dict(_MHA_DEFAULTS)
    a.update(zip(_MHA_NAMES, args))
    a.update(kwargs)
    if len(a) != len(_MHA_NAMES) or len(args) > len(_MHA_NAMES):
        _MHA_SIGNATURE.bind(*args, **kwargs)  # the call's own TypeError
    return a


def _additive(mask: Optional[Tensor], allowed_when_true: bool, like: Tensor) -> Optional[Tensor]:
    """A boolean or float mask as a float mask to add to the logits (``-inf`` where not allowed)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if allowed_when_true else mask
        return torch.zeros(blocked.shape, dtype=like.dtype, device=like.device).masked_fill(blocked, float("-inf"))
    return mask.to(like.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor], causal: bool,
            dropout_p: float) -> tuple[Tensor, Tensor]:
    """``(A @ v, A)`` with ``A = softmax(q k^T * scale + mask)``: ``q`` ``(..., L, E)``, ``k``, ``v`` ``(..., S, E)``."""
    logits = (q * scale) @ k.transpose(-2, -1)  # q scaled, not the N x N logits (exact for d = 4^n, e.g. 64)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if mask is not None:
        logits = logits + mask
    a = torch.softmax(logits, dim=-1)
    used = F.dropout(a, dropout_p) if dropout_p > 0 else a
    return used @ v, a


class AttentionCapture(TorchFunctionMode):
    """Record every attention matrix of the forward pass it is entered around (see the module doc).

    ``maps``: the matrices ``(B, heads, L, S)`` in call order; ``kinds``: how each was computed
    (``"sdpa"``, ``"mha"``, ``"softmax"``); with ``grads=True``, ``grads[i]`` lists the gradient
    of ``maps[i]`` from each backward pass that reached it, in order. With ``reduce=f``, ``maps[i]``
    is ``f(A_i)``, computed as soon as ``A_i`` is (the matrix is not kept: a batch of ``L`` layers'
    ``(B, heads, N, N)`` matrices can take more memory than the model). A fresh instance per pass.
    """

    def __init__(self, *, batch: Optional[int] = None, grads: bool = False,
                 reduce: Optional[Callable[[Tensor], Tensor]] = None):
        grads = check_flag(grads, "grads")
        super().__init__()
        if batch is not None:
            batch = check_int(batch, "batch", minimum=1, what="the images of the pass, to split (B * heads, L, S)")
        _check_callable(reduce, "reduce", "a function of each attention matrix (B, heads, L, S)")
        if grads and reduce is not None:
            raise SalienceError("AttentionCapture: grads=True needs the matrices themselves, not reduce=; "
                                "give one of them")
        self.batch, self.keep_grads, self.reduce = batch, grads, reduce
        self._maps: list[Tensor] = []
        self._grads: list[list[Tensor]] = []
        self.kinds: list[str] = []
        self._pending: Optional[KeysFirst] = None  # a keys-first softmax not yet contracted
        self._sites: Optional[list[Optional[nn.Module]]] = None  # a list: where each record was called from
        self._versions: list[tuple[int, Tensor, int]] = []  # (index, matrix, version): exposed, with gradients, unread

    def _shape(self, t: Tensor) -> Tensor:
        if t.dim() == 3:
            b = self.batch if self.batch and t.shape[0] % self.batch == 0 else t.shape[0]
            return t.reshape(b, -1, *t.shape[-2:])
        return t  # 4-D as it is; 5-D or more too: local attention (VOLO's outlook: (B, heads, positions, K*K, K*K))

    @property
    def maps(self) -> list[Tensor]:
        for i, t, version in self._versions:
            if t._version != version:
                raise SalienceError(
                    f"AttentionCapture: the model changed attention matrix {i} ({self.kinds[i]}) in place after it "
                    "was formed, in a pass with gradients (where the capture keeps the matrix itself, not a copy): "
                    "capture under torch.no_grad() or torch.inference_mode() for the matrices as formed")
        # read as formed: a later change is the caller's, of a map it was given (rollout by hand adding the identity
        # in place), not the model's (until a review of session 43 the next read refused it, blaming the model)
        self._versions.clear()
        return list(self._maps)

    @property
    def grads(self) -> list[list[Tensor]]:
        return [[self._shape(g) for g in gs] for gs in self._grads]

    def _record(self, a: Tensor, kind: str, order: tuple[int, ...] = (), exposed: bool = True) -> None:
        """Record ``a``, the tensor the attention's output is computed from; ``order``: the permutation that
        makes it ``(B, heads, L, S)`` (a softmax over dim 1), its gradient permuted alike. ``exposed``: the model
        holds ``a`` (a softmax's output; the per-head weights ``nn.MultiheadAttention`` returns), which the rest of
        its pass may change in place (``attn.mul_(...)``, a masked fill): where ``a`` has no gradient (a pass under
        ``torch.no_grad()`` or ``torch.inference_mode()``, :func:`attention_maps`'s, a capture by hand; session 43:
        ``no_grad`` kept ``a`` itself, and a later in-place change) what is kept is then a copy where it shares ``a``'s
        memory (``a`` itself, a view ``reduce`` returned), the matrix as it was formed: the model lets go of ``a``
        after the product, so the copy takes its place. With a gradient, the matrix itself (the very tensor the
        module returned: its graph, its gradient hook; the copy would hold a second matrix a layer for the whole
        pass), its version noted: an in-place change of it fails the model's own backward (softmax and ``A @ v``
        saved it), and :attr:`maps` refuses it."""
        store: list[Tensor] = []
        shaped = self._shape(a.permute(order) if order else a)  # ``a`` itself or a view of it
        # reduced at once, while A is still in the cache; A itself is then free to go
        kept = shaped if self.reduce is None else self.reduce(shaped)
        if exposed and _shares_memory(kept, a):
            if a.requires_grad:
                self._versions.append((len(self._maps), kept, kept._version))
            else:
                kept = kept.clone()
        self._maps.append(kept)
        if self._sites is not None:
            self._sites.append(_caller_module())
        self._grads.append(store)
        self.kinds.append(kind)
        if self.keep_grads and a.requires_grad:  # the hook on ``a``: a view of it is not on the output's path
            # a partial of a module function: one object a layer, not a closure's function, tuple and cells (with the
            # guard's, a transformer_attribution call on ViT-Ti held over the 700 that start a young collection)
            a.register_hook(functools.partial(_keep_gradient, store, order))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        # every torch call of the forward comes here: the others leave at once (one set lookup)
        if func not in _WATCHED:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(args, kwargs)
        out = func(*args, **kwargs)
        if func in PRODUCTS or func in _COPYING:
            if self._pending is not None and self._pending.contracted(func, args, kwargs, out):
                if self._sites is not None:  # the softmax's module too: the product may be another's
                    self._sites.append(self._pending.tag)
                self._record(self._pending.out, "softmax", self._pending.order)
                self._pending = None
            return out
        order = attention_order(args, kwargs)
        if order and isinstance(out, Tensor):
            # keys first: attention once a product contracts it (tag: where the softmax ran, on a first pass)
            self._pending = KeysFirst(out, order, _caller_module() if self._sites is not None else None)
        elif order is not None and isinstance(out, Tensor):
            self._record(out, "softmax", order)
        elif isinstance(out, Tensor) and ambiguous_keys_first(args, kwargs):  # heads or queries next: the product says
            self._pending = KeysFirst(out, None, _caller_module() if self._sites is not None else None)
        return out

    def _sdpa(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> Tensor:
        """SDPA explicitly; its arguments by torch's names (``query=q``: a keyword call as a positional one)."""
        q, k, v = query, key, value
        if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, a = _attend(q, k, v, s, _additive(attn_mask, True, q), is_causal, dropout_p)
        self._record(a, "sdpa", exposed=False)  # A is the capture's own: the model never sees it
        return out

    def _mha(self, args: tuple, kwargs: dict) -> tuple[Tensor, Optional[Tensor]]:
        a = _mha_arguments(args, kwargs)
        query, key, value, h = a["query"], a["key"], a["value"], int(a["num_heads"])
        if (a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or a["static_k"] is not None
                or a["static_v"] is not None or query.dim() != 3):
            raise SalienceError(
                "attention capture supports nn.MultiheadAttention on batched input without bias_k / bias_v, "
                "add_zero_attn or static keys; this model uses one of them"
            )
        native = _native_mha(a, query, key, value, h)
        exposed = bool(a["need_weights"]) and not a["average_attn_weights"]  # the model gets the matrix itself
        if native is not None:
            out, att = native
            self._record(att, "mha", exposed=exposed)
        else:
            out, att = self._explicit_mha(a, query, key, value, h, exposed)
        if not a["need_weights"]:
            return out, None
        return out, att.mean(dim=1) if a["average_attn_weights"] else att

    def _explicit_mha(self, a: dict, query: Tensor, key: Tensor, value: Tensor, h: int,
                      exposed: bool) -> tuple[Tensor, Tensor]:
        """The Python attention: batch-first throughout (``query`` ``(L, B, E)`` is usually a view of a
        batch-first input), q, k, v as views of the projection, one copy back after ``A v``."""
        (ln, b, e), s = query.shape, key.shape[0]
        q, k, v = (t.unflatten(-1, (h, e // h)).transpose(1, 2)  # (B, h, L|S, d)
                   for t in _in_projection(a, query, key, value))
        mask = _mha_mask(a, b, h, ln, s, q)
        causal = bool(a["is_causal"]) and a["attn_mask"] is None
        drop = float(a["dropout_p"]) if a["training"] else 0.0
        out, att = _attend(q, k, v, 1.0 / math.sqrt(e // h), mask, causal, drop)
        self._record(att, "mha", exposed=exposed)
        out = F.linear(out.transpose(1, 2).reshape(b, ln, e), a["out_proj_weight"], a["out_proj_bias"])
        return out.transpose(0, 1), att


def _native_mha(a: dict, query: Tensor, key: Tensor, value: Tensor, h: int) -> Optional[tuple[Tensor, Tensor]]:
    """Self-attention without masks, dropout or autograd through PyTorch's own C++ kernel (what
    ``nn.MultiheadAttention``'s fast path calls, which a mode turns off) asked for the per-head
    weights: ``(out (L, B, E), A (B, h, L, L))``, the same numbers as the fast path, without the
    Python re-implementation's copies. ``None`` when a condition does not hold (then explicit)."""
    tensors = (query, a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"])
    e = query.shape[-1]
    if (not hasattr(torch, "_native_multi_head_attention") or not (query is key is value)
            or a["use_separate_proj_weight"] or any(t is None for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or a["attn_mask"] is not None or a["key_padding_mask"] is not None or a["is_causal"]
            or (a["training"] and a["dropout_p"] > 0) or e % h or query.dtype not in (torch.float32, torch.float64)
            or any(t.dtype != query.dtype or t.device != query.device for t in tensors)):
        return None
    qb = query.transpose(0, 1)  # (B, L, E): nn.MultiheadAttention(batch_first=True) passed a view of its input
    out, att = torch._native_multi_head_attention(qb, qb, qb, e, h, *tensors[1:], None, True, False)
    return out.transpose(0, 1), att


def _in_projection(a: dict, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
    """``nn.MultiheadAttention``'s input projections (packed or separate weights) of ``(L|S, B, E)``
    inputs, batch-first ``(B, L|S, E)`` each; self-attention as one product, q, k, v its views."""
    qb, kb, vb = (t.transpose(0, 1) for t in (query, key, value))
    bias = a["in_proj_bias"]
    if not a["use_separate_proj_weight"]:
        w = a["in_proj_weight"]
        if query is key is value:
            return tuple(F.linear(qb, w, bias).chunk(3, dim=-1))
        wq, wk, wv = w.chunk(3)
    else:
        wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    return F.linear(qb, wq, bq), F.linear(kb, wk, bk), F.linear(vb, wv, bv)


def _mha_mask(a: dict, b: int, h: int, ln: int, s: int, like: Tensor) -> Optional[Tensor]:
    """``attn_mask`` ``(L, S)`` / ``(B * h, L, S)`` and ``key_padding_mask`` ``(B, S)`` as one
    additive mask broadcastable to ``(B, h, L, S)`` (``True`` = not allowed, as in PyTorch)."""
    mask = _additive(a["attn_mask"], False, like)
    if mask is not None:
        mask = mask.reshape(b, h, ln, s) if mask.dim() == 3 else mask.reshape(1, 1, ln, s)
    pad = _additive(a["key_padding_mask"], False, like)
    if pad is not None:
        pad = pad.reshape(b, 1, 1, s)
        mask = pad if mask is None else mask + pad
    return mask


def softmax_input(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """A softmax call's ``(input, dim)``, whichever way it was spelled (the spotter's reader too)."""
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    return x, args[1] if len(args) > 1 else kwargs.get("dim")


def _is_attention_softmax(args: tuple, kwargs: dict) -> bool:
    """A softmax over the last dim of a tensor of 3 or more dims (attention weights, not class scores)."""
    x, dim = softmax_input(args, kwargs)
    if not isinstance(x, Tensor) or x.dim() < 3 or not isinstance(dim, int):
        return False
    return dim in (-1, x.dim() - 1)


def attention_order(args: tuple, kwargs: dict) -> Optional[tuple[int, ...]]:
    """How a softmax's output reads as attention weights ``(B, heads, L, S)``: ``()`` for a softmax over the
    last dim of 3 or more dims (as it is); for a softmax over dim 1 of a 4-D tensor (keys on dim 1, the layout
    ``(B, S, heads, L)`` or ``(B, S, L, heads)``) the permutation to ``(B, heads, L, S)``, the query axis being
    the one other axis of size ``S`` (self-attention); ``None`` for any other softmax (not attention)."""
    if _is_attention_softmax(args, kwargs):
        return ()
    x, dim = softmax_input(args, kwargs)
    if not isinstance(x, Tensor) or x.dim() != 4 or dim not in (1, -3):
        return None
    s, p, q = x.shape[1:]
    if p == s != q:
        return (0, 3, 2, 1)  # (B, S, L, heads)
    if q == s != p:
        return (0, 2, 3, 1)  # (B, S, heads, L)
    return None


def ambiguous_keys_first(args: tuple, kwargs: dict) -> bool:
    """A softmax over dim 1 of a 4-D tensor ``(B, S, S, S)``: keys first, as many heads as tokens, so the shape
    cannot say whether the heads or the queries come next; the product that contracts it with the values can
    (:meth:`KeysFirst.contracted`: the heads are the axis the values share)."""
    x, dim = softmax_input(args, kwargs)
    return isinstance(x, Tensor) and x.dim() == 4 and dim in (1, -3) and x.shape[1] == x.shape[2] == x.shape[3] > 1


def _dims_in(view: Tensor, base: Tensor) -> Optional[tuple[int, ...]]:
    """``view``'s dims as ``base``'s (a permutation: each matched by size and stride over the same memory), or
    ``None`` where ``view`` is no permuted view of ``base`` (another shape, a fold of two dims into one)."""
    if view.dim() != base.dim() or view.layout != torch.strided or view.data_ptr() != base.data_ptr():
        return None
    free, dims = list(range(base.dim())), []
    for size, stride in zip(view.shape, view.stride()):
        j = next((j for j in free if base.shape[j] == size and base.stride(j) == stride), None)
        if j is None:
            return None
        free.remove(j)
        dims.append(j)
    return tuple(dims)


def _contracts(ops: list[Any], seen: list[Tensor]) -> bool:
    """Whether a call's operands (:func:`operands`: a product's, ``@`` / ``matmul`` / ``bmm`` or ``einsum``'s, or a
    copy's source) include one of ``seen`` (a keys-first softmax's output and its copies) or a view of one (its storage: an inference
    tensor's view keeps no ``_base``): a keys-first softmax is attention when contracted with the values, as in
    ``einsum("bshl,bhsd->bhld", a, v)``; a softmax over the channels of a ``(B, C, H, W)`` map with ``C == H`` that
    only scales the map is not."""
    return any(isinstance(t, Tensor) and t.layout == a.layout == torch.strided and t.data_ptr() == a.data_ptr()
               and t.numel() == a.numel() for t in ops for a in seen)


class KeysFirst:
    """A keys-first softmax's output (``order``: its permutation to ``(B, heads, L, S)``) waiting for the product
    that makes it attention (:func:`_contracts`), with the copies made of it on the way; what both the capture and
    the default-layer search's spotter follow (``tag``: what the follower records when it is contracted)."""

    def __init__(self, out: Tensor, order: Optional[tuple[int, ...]], tag: Any) -> None:
        self.out, self.order, self.tag, self.copies = out, order, tag, [out]
        # each copy's dims as the softmax output's (None: folded): how the product that contracts it reads it
        self.dims: list[Optional[tuple[int, ...]]] = [tuple(range(out.dim()))]

    def contracted(self, func: Any, args: tuple, kwargs: Optional[dict], out: Any) -> bool:
        """Whether the call ``func(*args, **kwargs) -> out`` contracts it with the values (an order left open by the
        shape found then); a copy of it is noted."""
        if func in PRODUCTS:
            if not _contracts(operands(func, args, kwargs), self.copies):
                return False
            read = self._read(func, args, kwargs)
            if self.order is None:
                self.order = read or None
                return self.order is not None
            return read is not False  # a product read as no values' (or not read at all: taken, as the shape says)
        if func in _COPYING and isinstance(out, Tensor):
            src = operands(func, args, kwargs)[0]
            if not _contracts([src], self.copies):
                return False
            self.copies.append(out)  # a copy on its way to the product
            same = isinstance(src, Tensor) and out.shape == src.shape
            self.dims.append(self._dims_of(src) if same else None)
        return False

    def _dims_of(self, t: Tensor) -> Optional[tuple[int, ...]]:
        """``t``'s dims as the softmax output's, ``t`` a permuted view of it or of a copy; ``None`` if not one."""
        for c, dims in zip(self.copies, self.dims):
            found = _dims_in(t, c) if dims is not None else None
            if found is not None:
                return tuple(dims[j] for j in found)
        return None

    def _read(self, func: Any, args: tuple, kwargs: Optional[dict]) -> Union[tuple[int, ...], bool, None]:
        """The product contracting the softmax (an operand a permuted view of it or of a copy) read by its indices:
        ``False`` where it is no values' product, ``None`` where not read (no such operand, an equation not read),
        else the permutation to ``(B, heads, L, S)`` (the shape's, or for ``(B, S, S, S)`` the product's). The keys'
        index summed with the values' (another operand, with the batch's index; not a weight: ``einsum("bchw,dc->
        bdhw")``, a 1x1 convolution after a CNN's channel softmax, is no attention); for ``(B, S, S, S)`` the heads'
        index shared with the values, the queries' not, both kept (``einsum("bshl,bhsd->bhld")``,
        ``a.permute(0, 2, 3, 1) @ v``; a statistic such as ``einsum("bshl,ls->bh", a, distance)`` leaves it to the
        next). An operand's dim shares an index only where it varies: not one of size 1 or stride 0, an expanded
        weight's (``s.permute(0, 2, 3, 1) @ w.expand(B, H, C, D)``)."""
        parsed = product_labels(func, args, kwargs)
        for i, (op, labels) in enumerate(parsed[0] if parsed else ()):
            dims = self._dims_of(op) if isinstance(op, Tensor) else None
            if dims is None:
                continue
            label, kept = {d: lab for d, lab in zip(dims, labels)}, parsed[1]
            varying = [{lab for d, lab in enumerate(labs) if o.layout != torch.strided
                        or o.shape[d] > 1 and o.stride(d) != 0} if j != i else set()
                       for j, (o, labs) in enumerate(parsed[0])]
            values = [(v, labs) for v, (_, labs) in zip(varying, parsed[0]) if label[1] in v and label[0] in labs]
            if label[1] in kept or not values:
                return False
            if self.order is not None:
                return self.order
            others = set().union(*varying)
            if (label[2] in others) == (label[3] in others) or not (label[2] in kept and label[3] in kept):
                return False
            heads = 2 if label[2] in others else 3
            if not any(label[heads] in v for v, _ in values):
                return False
            return (0, 2, 3, 1) if heads == 2 else (0, 3, 2, 1)
        return None


def product_labels(func: Any, args: tuple, kwargs: Optional[dict]) -> Optional[tuple[list[tuple[Any, list]], set]]:
    """A product's operands (:func:`operands`) with each one's index label per dim, and the output's labels (the form
    :meth:`salience.methods._attention_spotter._AttentionSpotter._contraction` and :meth:`KeysFirst.contracted`
    read): ``torch.einsum``'s by :func:`einsum_labels`, a matmul's by :func:`_matmul_labels`; None for any other
    call or an equation not read."""
    if func is torch.einsum:
        return einsum_labels(args)
    if func not in PRODUCTS:
        return None
    a, b = operands(func, args, kwargs)
    return _matmul_labels(a, b)


def _matmul_labels(a: Any, b: Any) -> Optional[tuple[list[tuple[Any, list]], set]]:
    """A matmul of two 4-D tensors ``(B, heads, m, r) @ (B, heads, r, p)`` or two 3-D ones ``(B, m, r) @ (B, r, p)``
    (``bmm``'s; the heads folded into the batch) as einsum labels (``bhmr,bhrp->bhmp``, ``bmr,brp->bmp``); None for
    any other."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == b.dim() and a.dim() in (3, 4)
            and a.shape[:-2] == b.shape[:-2]):
        return None
    lead = ["b", "h"][:a.dim() - 2]
    return [(a, [*lead, "m", "r"]), (b, [*lead, "r", "p"])], {*lead, "m", "p"}


def einsum_labels(args: tuple) -> Optional[tuple[list[tuple[Any, list]], set]]:
    """The operands of an einsum call (two or more) with each one's index label per dim, and the output's labels (an
    ellipsis's dims labelled from the right, as they broadcast); None for an equation not read."""
    if not args:
        return None
    if isinstance(args[0], Tensor):  # sublist form: op, [0, 1, ...], op, [...], ..., [output]
        ops, subs = list(args[0::2]), list(args[1::2])
        out_sub = ops.pop() if len(ops) > len(subs) else None
        if len(ops) < 2 or len(subs) != len(ops):
            return None
        terms: list = [list(sub) for sub in subs]
        if any(Ellipsis in t for t in terms) or out_sub is not None and Ellipsis in out_sub:
            return None
        output = None if out_sub is None else list(out_sub)
    elif isinstance(args[0], str):
        ops = list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        eq = args[0].replace(" ", "")
        lhs, arrow, rhs = eq.partition("->")
        terms = [t.replace("...", ".") for t in lhs.split(",")]
        output = rhs.replace("...", ".") if arrow else None
        if len(ops) < 2 or len(terms) != len(ops):
            return None
    else:
        return None
    labelled, widest = [], 0
    for op, term in zip(ops, terms):
        if not isinstance(op, Tensor):
            return None
        explicit = [c for c in term if c != "."]
        if "." in term:
            e = op.dim() - len(explicit)
            if e < 0:
                return None
            widest = max(widest, e)
            i = list(term).index(".")
            labels = list(term[:i]) + [("...", e - j) for j in range(e)] + list(term[i + 1:])
        else:
            labels = list(term)
        if len(labels) != op.dim():
            return None
        labelled.append((op, labels))
    if output is None:  # implicit: the ellipsis's dims, then the labels seen once, in order
        seen = [lab for _, labels in labelled for lab in labels if not isinstance(lab, tuple)]
        kept = {("...", j) for j in range(1, widest + 1)} | {lab for lab in seen if seen.count(lab) == 1}
    else:
        kept = {("...", j) for j in range(1, widest + 1)} if "." in output else set()
        kept |= {c for c in output if c != "."}
    return labelled, kept


def check_model(model: nn.Module, method: str = "this method", modules: Optional[Sequence[nn.Module]] = None) -> None:
    """Refuse what a mode cannot see into (TorchScript), and what is no model, with a clear message. ``modules``:
    ``model``'s modules (``modules_of(model)``) where the caller walked them already in this call: none of them a
    ``ScriptModule`` and the model is checked (a walk the less); else the full check, which names the module."""
    if modules is not None and isinstance(model, nn.Module) and \
            not any(isinstance(m, torch.jit.ScriptModule) for m in modules):
        return
    check_python_model(model, method, "whose compiled graph hides its attention from salience")


def _shares_memory(t: Any, a: Tensor) -> bool:
    """Whether ``t`` (a recorded matrix, or what ``reduce`` made of it) is ``a``'s memory: the same storage."""
    return isinstance(t, Tensor) and t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()


def _keep_gradient(store: list[Tensor], order: tuple[int, ...], g: Tensor) -> None:
    """A recorded matrix's gradient hook: ``g`` kept in ``store``, permuted like the matrix (``order``)."""
    store.append(g.permute(order) if order else g)


class _Scope:
    """Where one model's attention runs: ``modules``, the submodules an attention pass needs the capture
    active in (weakly held), and ``count``, the matrices a pass of it records; ``missed``: a pass under this
    scope recorded another count once (a second time and the model runs under the capture everywhere)."""

    def __init__(self, modules: list[nn.Module], count: int, missed: bool) -> None:
        self.modules, self.count, self.missed = [weakref.ref(m) for m in modules], count, missed

    def live(self) -> Optional[list[nn.Module]]:
        """The modules, or ``None`` where one of them is gone (the scope is out of date then)."""
        modules = [r() for r in self.modules]
        return None if any(m is None for m in modules) else modules  # type: ignore[return-value]


# model -> where its attention runs, learnt on its first attention_maps pass; _EVERYWHERE: the capture stays
# active around the whole pass (no module to narrow it to, or two passes under the scope recorded other counts)
# (keyed by the model's id, held weakly: two models that compare equal are two keys); clear_cache
# forgets them (a model everywhere for good: narrowed again)
_SCOPES = _perf.ModelCache(keep=64)
_EVERYWHERE = object()
# nn.MultiheadAttention's parents that take a fused fast path, skipping it, unless a mode is active around them
_FAST_PATHS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
               nn.Transformer)


def _caller_module() -> Optional[nn.Module]:
    """The innermost module being called (a frame of ``nn.Module._call_impl``, where its hooks run): where the
    attention operation being recorded was called from. Not the innermost frame whose ``self`` is a module: a
    block calling its attention's ``forward`` (or another method) itself runs no hook of that module, and a
    scope of it would miss every pass. Looked up on a model's first pass only."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is _CALL_IMPL:
            return f.f_locals["self"]
        f = f.f_back
    return None


_CALL_IMPL = nn.Module._call_impl.__code__


def _scope_of(model: nn.Module, sites: list[Optional[nn.Module]]) -> Optional[list[nn.Module]]:
    """The outermost of the modules the attention was called from (each raised to its outermost ancestor with
    a fast path, :data:`_FAST_PATHS`), or ``None`` where that is the model itself or a site lies outside it."""
    parents = {id(c): p for p in model.modules() for c in p.children()}
    scope: list[nn.Module] = []
    for m in sites:
        if m is None or (m is not model and id(m) not in parents):
            return None
        up = m
        while id(up) in parents:  # an nn.TransformerEncoder's fast path (nested tensors) skips its layers' MHA
            up = parents[id(up)]
            m = up if isinstance(up, _FAST_PATHS) else m
        if m is model:
            return None
        if all(m is not s for s in scope):
            scope.append(m)
    inside = {id(c) for s in scope for c in s.modules() if c is not s}
    return [m for m in scope if id(m) not in inside]


@contextmanager
def _active_in(cap: AttentionCapture, modules: list[nn.Module], native: bool = False) -> Iterator[None]:
    """``cap`` active only while one of ``modules`` runs (in this thread), by a forward pre-hook and an
    always-called forward hook on each, removed when the block ends (and the capture left, also after an
    error): the rest of the pass runs without a mode (every torch call through Python otherwise). With
    ``native`` (a pass without autograd: rollout's), an ``nn.MultiheadAttention`` among ``modules`` on its fast
    path's terms runs PyTorch's kernel asked for the weights instead, no mode at all (:class:`_NativeMHA`)."""
    depth, below = [0], torch._C._len_torch_function_stack()  # the stack's height to leave it at

    @this_thread  # other threads' passes through the modules: not captured, and their fingerprints leave these out
    def enter(module: nn.Module, args: Any) -> None:
        depth[0] += 1
        if depth[0] == 1:
            cap.__enter__()

    @this_thread
    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if depth[0]:
            depth[0] -= 1
            if not depth[0]:
                cap.__exit__(None, None, None)

    handles: list = []
    try:  # Ctrl-C deferred while the hooks go on and off (a handle not yet kept would leave its hook behind)
        calmly(_hook, modules, enter, leave, handles, cap if native else None)
        yield
    finally:
        try:
            calmly(_unhook, cap, handles, below if depth[0] else None)
        except BaseException:  # a Ctrl-C before calmly deferred it left all to do: done once more
            calmly(_unhook, cap, handles, below if depth[0] else None)
            raise


def _hook(modules: list[nn.Module], enter: Callable, leave: Callable, handles: list,
          native: Optional[AttentionCapture] = None) -> None:
    for m in modules:
        if native is not None and _native_ready(m):
            f = _NativeMHA(m, native, enter, leave)
            handles.append(f)  # kept first: its remove() takes off its own forward only, if it was set
            if m.__dict__.setdefault("forward", f) is f:  # not one already there (the user's, another thread's)
                continue
            handles.pop()
        # entered before the user's pre-hooks (under the capture around the whole pass too): one that raises is
        # balanced by ``leave``, always called, instead of leaving a capture an outer module entered
        handles.append(m.register_forward_pre_hook(enter, prepend=True))
        handles.append(m.register_forward_hook(leave, always_call=True))


def _native_ready(m: nn.Module) -> bool:
    """``m`` an ``nn.MultiheadAttention`` (its own ``forward``) whose fast path could run: batch first, one packed
    in-projection with biases, no ``bias_k`` / ``bias_v`` / ``add_zero_attn``, an even number of heads (the
    conditions of ``nn.MultiheadAttention.forward`` that do not depend on the call; :func:`_native_weights` the
    rest)."""
    return (isinstance(m, nn.MultiheadAttention) and type(m).forward is nn.MultiheadAttention.forward
            and hasattr(torch, "_native_multi_head_attention") and m.batch_first and m._qkv_same_embed_dim
            and m.in_proj_weight is not None and m.in_proj_bias is not None and m.out_proj.bias is not None
            and m.bias_k is None and m.bias_v is None and not m.add_zero_attn and m.num_heads % 2 == 0)


def _native_weights(m: nn.MultiheadAttention, q: Tensor) -> Optional[tuple[Tensor, ...]]:
    """The in- and out-projections' weights and biases of ``m`` where the call-time conditions of its fast path hold,
    stricter (the caller checked: self-attention, no mask, not causal): batched, not nested, eval mode, inference mode,
    fp32 / fp64 alike in every tensor, one CPU or CUDA device, no autocast, the fast path not turned off, no tensor
    subclass nor mode with a torch function; else ``None``. Read from the modules' ``_parameters`` (a parametrized
    weight is not there: ``None``), not by ``nn.Module.__getattr__`` (6 us for the four, of the ~100 us a layer the
    native path saves)."""
    if (q.dim() != 3 or q.is_nested or m.training or q.dtype not in _NATIVE_DTYPES
            or not torch.is_inference_mode_enabled()):
        return None
    p, o = m._parameters, m._modules["out_proj"]._parameters
    tensors = (p.get("in_proj_weight"), p.get("in_proj_bias"), o.get("weight"), o.get("bias"))
    if any(t is None for t in tensors):
        return None
    device = q.device
    if (device.type not in ("cpu", "cuda") or any(t.dtype != q.dtype or t.device != device for t in tensors)
            or torch.is_autocast_enabled(device.type) or not torch.backends.mha.get_fastpath_enabled()
            or torch.overrides.has_torch_function((q, *tensors))):
        return None
    return tensors


_NATIVE_DTYPES = (torch.float32, torch.float64)


class _NativeMHA:
    """An ``nn.MultiheadAttention``'s instance ``forward`` for one narrowed pass without autograd (rollout's): its
    own ``__call__`` still runs the user's hooks around it. On the fast path's terms (:func:`_native_weights`, and
    self-attention without masks) one call of ``torch._native_multi_head_attention`` asked for the per-head weights,
    which ``cap`` records as the capture records an ``"mha"`` matrix: no mode, where under one ``nn.MultiheadAttention``
    runs its Python path (~13 torch calls through the mode, ~100 us a layer on a CPU proxy of a GPU). Otherwise, or
    in another thread, the class's ``forward`` with ``cap`` entered as the narrowing's hooks enter it (``enter`` /
    ``leave``, which leave other threads alone). :meth:`remove` takes it off the module (if it is still there)."""

    __slots__ = ("module", "cap", "enter", "leave", "salience_thread")

    def __init__(self, module: nn.Module, cap: AttentionCapture, enter: Callable, leave: Callable) -> None:
        self.module, self.cap, self.enter, self.leave = module, cap, enter, leave
        self.salience_thread = threading.get_ident()  # fingerprint.structure() of another thread leaves it out

    def __call__(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                 need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                 is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        m = self.module
        weights = _native_weights(m, query) if (
            query is key is value and key_padding_mask is None and attn_mask is None and not is_causal
            and threading.get_ident() == self.salience_thread) else None
        if weights is not None:
            out, att = torch._native_multi_head_attention(query, key, value, m.embed_dim, m.num_heads, *weights,
                                                          None, True, False, None)
            self.cap._record(att, "mha", exposed=need_weights and not average_attn_weights)
            return out, (att.mean(dim=1) if average_attn_weights else att) if need_weights else None
        self.enter(m, ())
        try:
            return type(m).forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        finally:
            self.leave(m, (), None)

    def remove(self) -> None:
        d = self.module.__dict__
        if d.get("forward") is self:
            del d["forward"]


def _unhook(cap: AttentionCapture, handles: list, below: Optional[int]) -> None:
    """The hooks (and the instance ``forward`` methods, :class:`_NativeMHA`) removed and ``cap`` left where it is
    still on top of the mode stack: by what the stack holds, not by the hooks' depth count (a Ctrl-C between the count
    and the mode's entry or exit makes them differ). With ``below`` (the block ends with a module still inside ``cap``:
    a ``KeyboardInterrupt`` out of a module calls no always-called hook, torch's ``except Exception``) the stack is put
    back to its height ``below`` at the block's entry: a mode entered inside the block after the hooks (attribution's
    softmax tap) popped ``cap`` on its exit instead of itself, and every mode entered inside the block has been left."""
    while handles:
        handles.pop().remove()
    while below is not None and torch._C._len_torch_function_stack() > below:
        if torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is cap:
            cap.__exit__(None, None, None)
        else:
            torch._C._pop_torch_function_stack()
    n = torch._C._len_torch_function_stack()
    if n and torch._C._get_function_stack_at(n - 1) is cap:
        cap.__exit__(None, None, None)


def _pass(model: nn.Module, x: Tensor, run: Callable[[nn.Module, Tensor], Any],
          reduce: Optional[Callable[[Tensor], Tensor]]) -> list[Tensor]:
    """One pass under inference mode with the capture where the model's attention runs (:func:`scoped`): the
    narrowed pass runs ``nn.MultiheadAttention`` natively where it can (:class:`_NativeMHA`); ``run`` may be called
    twice (the model's own error, if it is one, raised from the second call)."""

    def narrowed(cap: AttentionCapture, modules: list[nn.Module]) -> None:
        with _active_in(cap, modules, native=True), torch.inference_mode(), model_call(model, x):
            run(model, x)

    def everywhere(cap: AttentionCapture) -> None:
        with cap, torch.inference_mode(), model_call(model, x):
            run(model, x)

    return scoped(model, lambda: AttentionCapture(batch=x.shape[0], reduce=reduce), narrowed, everywhere).maps


def scoped(model: nn.Module, make: Callable[[], AttentionCapture],
           narrowed: Callable[[AttentionCapture, list[nn.Module]], Any],
           everywhere: Callable[[AttentionCapture], Any]) -> AttentionCapture:
    """A capture (``make()``) of one pass of ``model`` where its attention runs (its :class:`_Scope`): ``narrowed(cap,
    modules)`` runs the pass with ``cap`` active only inside ``modules`` (:func:`_active_in`); else, and where that
    records another count than the scope's or raises, ``everywhere(cap)`` runs it again with a fresh capture around
    the whole pass, learning the scope (a model that missed twice: everywhere from then on). A
    :class:`SalienceError` of a narrowed pass that recorded the scope's count (the user's mistake salience's own
    checks found, e.g. a target class out of range, checked before any backward) comes out at once: the model's
    forward is not run again and the scope stays as learnt. Shared by attention rollout and transformer attribution:
    the scope either learns serves both."""
    scope = _SCOPES.get(model, (), ())
    modules = scope.live() if isinstance(scope, _Scope) else None
    if modules is not None:
        cap = make()
        try:
            narrowed(cap, modules)
        except SalienceError:  # the capture saw every matrix: salience's check of the user's input (a target
            if len(cap._maps) == scope.count:  # that does not fit the output), raised at once, the scope kept
                raise
        except Exception:  # a path the model takes only without a mode around it: the pass everywhere decides
            pass
        else:
            if len(cap._maps) == scope.count:
                return cap
    cap = make()
    cap._sites = [] if scope is not _EVERYWHERE else None
    everywhere(cap)
    if cap._sites:  # a pass under the scope missed some once: learnt again; twice: everywhere from now on
        missed = isinstance(scope, _Scope) and modules is not None
        found = _scope_of(model, cap._sites)
        _SCOPES.put(model, (), (), _EVERYWHERE if found is None or (missed and scope.missed) else _Scope(
            found, len(cap._maps), missed))
    return cap


class ActiveIn:
    """:func:`_active_in` (``cap`` active only inside ``modules``, without the native path) as a context manager
    that can be entered again after it is left (a forward that runs twice enters its modes twice)."""

    def __init__(self, cap: AttentionCapture, modules: list[nn.Module]) -> None:
        self.cap, self.modules = cap, modules
        self._on: list = []

    def __enter__(self) -> "ActiveIn":
        cm = _active_in(self.cap, self.modules)
        cm.__enter__()
        self._on.append(cm)
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._on.pop().__exit__(*exc)

    def close(self) -> None:
        """Every entry not left yet left (hooks off, the stack put back): a safety net after the pass."""
        while self._on:
            self._on.pop().__exit__(None, None, None)


@contextmanager
def capturing(model: nn.Module, *, batch: Optional[int] = None, grads: bool = False,
              reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[AttentionCapture]:
    """``model`` under :func:`~salience._core.guard.model_guard` with an :class:`AttentionCapture`
    active for the block; everything is undone when it ends, also after an exception."""
    check_model(model, "attention capture")
    with model_guard(model), AttentionCapture(batch=batch, grads=grads, reduce=reduce) as cap:
        yield cap


def attention_maps(model: nn.Module, x: Tensor, *, forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
                   reduce: Optional[Callable[[Tensor], Tensor]] = None, method: str = "attention capture",
                   modules: Optional[Sequence[nn.Module]] = None) -> list[Tensor]:
    """The attention matrices ``(B, heads, L, S)`` of one forward pass of ``model`` on ``x``
    ``(B, C, H, W)``, without gradients, in call order (``forward(model, x)`` runs it; default ``model(x)``);
    with ``reduce``, ``reduce(A)`` of each instead, computed as each ``A`` is formed. ``method`` names the
    caller in errors; ``modules``: the model's modules where the caller walked them already (:func:`check_model`).

    The capture is active only inside the modules that call the attention (learnt on the model's first
    pass, kept while the model lives): the rest of the pass runs without a mode, at its bare cost. Should a
    pass so narrowed record another number of matrices than the first (the model changed, or its forward takes
    another path), it runs again with the capture around the whole pass: ``forward`` may be called twice, so it
    should start afresh each time (twice and the model keeps the capture around the whole pass).

    The pass runs under :func:`torch.inference_mode` (no autograd bookkeeping at all), so what comes
    back are inference tensors: fine for any out-of-place operation, not for in-place ones or autograd.
    """
    check_model(model, method, modules)
    if modules is None:  # a caller's own call (attention rollout checked its x already)
        check_input(x, model)
    _check_callable(forward, "forward", "a function forward(model, x) that runs the pass")
    _check_callable(reduce, "reduce", "a function of each attention matrix (B, heads, L, S)")
    with model_guard(model):
        return _pass(model, x, forward or (lambda m, t: m(t)), reduce)
