"""Attention operations in a forward pass, seen by what it computes, never by a class name: :class:`_AttentionSpotter`.

A torch-function mode for the default-layer search's recorded pass (:func:`salience.methods._layer_search._record_calls`):
which module ran scaled dot-product attention, ``F.multi_head_attention_forward`` or a softmax over the last dim (what
:class:`~salience.attention.AttentionCapture` takes for attention), and which ran a factorized attention (keys
softmaxed over their tokens, contracted with values over them by ``@`` / ``matmul`` / ``bmm`` or ``torch.einsum``:
:func:`~salience.attention.product_labels` reads the products as einsum labels, :func:`_roles_in` finds the keys' dims
in a view of them). Every call's arguments are read as the capture reads them, positional or keyword
(:func:`~salience.attention.operands`, :func:`~salience.attention.softmax_input`).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from salience.attention import CASTS, PRODUCTS, SOFTMAXES, KeysFirst, attention_order, ambiguous_keys_first, \
    operands, product_labels, softmax_input

__all__: list[str] = []  # private to the methods (the default-layer search)

# the keys copied: the same dims, other memory (a cast too, ``.to(dtype)``, ``.float()``: session 46)
_COPIES = frozenset({Tensor.contiguous, Tensor.clone, torch.clone, *CASTS})


def _softmax_over_tokens(args: tuple, kwargs: dict) -> bool:
    """A softmax over dim -2 of a 4-D tensor ``(B, heads, N, d)`` or a 3-D one ``(B * heads, N, d)`` (the heads
    folded into the batch): keys normalized over the tokens, as a factorized attention's (``softmax(k)^T v``) are;
    :class:`_AttentionSpotter` takes it for attention only once the result is contracted with values over those
    tokens."""
    x, dim = softmax_input(args, kwargs)
    return (isinstance(x, Tensor) and x.dim() in (3, 4) and isinstance(dim, int)
            and dim in (-2, x.dim() - 2))


def _key_roles(k: Tensor) -> dict[str, Any]:
    """The dims of keys ``k`` softmaxed over dim -2: ``(B, heads, N, d)`` or ``(B * heads, N, d)``."""
    return {"token": k.dim() - 2, "channel": k.dim() - 1, "batch": tuple(range(k.dim() - 2))}


class _AttentionSpotter(TorchFunctionMode):
    """Notes which module was running (the innermost, by name; ``""`` for the model's own forward) each time an
    attention operation ran, and the attention's shape ``(B, heads, L, S)``: ``F.scaled_dot_product_attention``,
    ``F.multi_head_attention_forward`` or a softmax over the last dim of 3 or more dims or over dim 1 of
    ``(B, keys, heads, queries)`` once a product contracts it (or a view or copy of it) with the values (what
    :class:`~salience.attention.AttentionCapture` takes for attention). So attention written as a bare function
    in a module of any name (a ``Mixer`` whose forward calls SDPA, a block computing ``softmax(q k^T) v`` inline)
    is seen as attention, as the attention methods see it. Also, in ``factorized``, each factorized attention: a
    softmax over dim -2 of ``(B, heads, N, d)`` or ``(B * heads, N, d)`` (keys over the tokens) whose output (a view
    that permutes its dims or folds / unfolds batch and heads, or a copy of one by ``.contiguous()`` / ``.clone()``)
    a product in the same module contracts with values over those tokens (``softmax(k)^T v``, CoaT's, or ``v^T
    softmax(k)``), by ``@`` / ``matmul`` / ``bmm`` on 4-D or 3-D tensors or ``torch.einsum`` of two or more operands
    (``bhnk,bhnv->bhkv`` and its other spellings, ``bhnk,bhnv,bhmk->bhmv``): :meth:`_contraction`."""

    def __init__(self, running: list[str]):
        super().__init__()
        self.running, self.seen = running, []
        self.factorized: list[tuple[str, int]] = []  # (module name, N): a factorized attention over N tokens
        # keys, if factorized: (module name, a softmax over dim -2 or a copy of a view of one, its dims' roles, N)
        self._keys: list[tuple[str, Tensor, dict[str, Any], int]] = []
        # a keys-first softmax not yet contracted; its tag: (module name, its (B, heads, L, S) shape)
        self._pending: Optional[KeysFirst] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        where = self.running[-1] if self.running else ""
        if self._pending is not None and self._pending.contracted(func, args, kwargs, out):
            self.seen.append(self._pending.tag)
            self._pending = None
        if name == "scaled_dot_product_attention":
            q, k = operands(F.scaled_dot_product_attention, args, kwargs)[:2]
            if isinstance(q, Tensor) and isinstance(k, Tensor):
                self.seen.append((where, (*q.shape[:-1], k.shape[-2])))
        elif func is F.multi_head_attention_forward:
            self.seen.append((where, None))
        elif func in SOFTMAXES and isinstance(out, Tensor) and (order := attention_order(args, kwargs)) is not None:
            if order:  # keys first: attention once a product contracts it with the values, as the capture takes it
                self._pending = KeysFirst(out, order, (where, tuple(out.permute(order).shape)))
            else:
                self.seen.append((where, tuple(out.shape)))
        elif func in SOFTMAXES and isinstance(out, Tensor) and ambiguous_keys_first(args, kwargs):
            self._pending = KeysFirst(out, None, (where, tuple(out.shape)))  # (B, S, S, S): read as it is
        elif func in SOFTMAXES and _softmax_over_tokens(args, kwargs) and isinstance(out, Tensor):
            self._keys.append((where, out, _key_roles(out), int(out.shape[-2])))
        elif func in _COPIES and self._keys and isinstance(out, Tensor):
            self._copied(operands(func, args, kwargs)[0], out)
        elif func in PRODUCTS and self._keys:
            self._contraction(where, product_labels(func, args, kwargs))
        return out

    def _views(self, t: Tensor) -> Iterator[tuple[str, dict[str, Any], int]]:
        """``(module name, t's dims' roles, N)`` for each recorded keys tensor ``t`` is a view of (:func:`_roles_in`);
        none for a tensor without strided storage (sparse: no data pointer to compare)."""
        if t.layout != torch.strided:
            return
        for name, k, roles, n in self._keys:
            if t.data_ptr() == k.data_ptr() and t.numel() == k.numel():
                found = _roles_in(tuple(t.shape), t.stride(), tuple(k.shape), k.stride(), roles)
                if found is not None:
                    yield name, found, n

    def _copied(self, src: Any, out: Tensor) -> None:
        """``out``, a ``.contiguous()`` / ``.clone()`` of ``src``: where ``src`` is a view of keys, ``out`` is keys too,
        its dims those of ``src`` (the same shape, other memory)."""
        if (isinstance(src, Tensor) and src.layout == out.layout == torch.strided and out.shape == src.shape
                and out.data_ptr() != src.data_ptr()):
            self._keys.extend((name, out, roles, n) for name, roles, n in list(self._views(src)))

    def _contraction(self, where: str, parsed: Optional[tuple[list[tuple[Any, list]], set]]) -> None:
        """Note a factorized attention where a product (``parsed``: its operands with each one's index label per
        dim, and the output's labels; :func:`~salience.attention.product_labels`) run in module ``where``
        contracts keys softmaxed over their ``N`` tokens (an operand that is a view of that softmax's output or of a
        copy of one: its dims in any order, batch and heads folded into one or not, never tokens and channels mixed;
        the softmax run in ``where`` itself, ``k.softmax(dim=2)``, or in a submodule of it, an ``nn.Softmax(dim=-2)``
        it holds) with values over the same tokens: the keys' token index summed, found in another operand (the
        values) at a dim of ``N``; the keys' batch and head indices in the values and kept in the output; the values'
        own channel index kept; the keys' channel index kept (``softmax(k)^T v``, ``bhnk,bhnv->bhkv``, or ``v^T
        softmax(k)``) or contracted with a third operand (the queries: ``q (softmax(k)^T v)`` as one einsum,
        ``bhnk,bhnv,bhmk->bhmv``)."""
        if parsed is None:
            return
        operands, kept = parsed
        for i, (keys, lk) in enumerate(operands):
            if not isinstance(keys, Tensor):
                continue
            for name, roles, n in self._views(keys):
                if not (name == where or (where and name.startswith(where + "."))):
                    continue
                token, channel = lk[roles["token"]], lk[roles["channel"]]
                batch = [lk[d] for d in roles["batch"]]
                if token in kept or any(lab not in kept for lab in batch):
                    continue
                others = [lab for j, (_, lo) in enumerate(operands) if j != i for lab in lo]
                if channel not in kept and channel not in others:
                    continue  # the keys' channels summed alone: no query reads them
                for j, (vals, lv) in enumerate(operands):
                    if (j != i and isinstance(vals, Tensor) and token in lv and vals.shape[lv.index(token)] == n
                            and all(lab in lv for lab in batch) and any(lab in kept and lab not in lk for lab in lv)):
                        self.factorized.append((where, n))
                        return


def _roles_in(shape: tuple, strides: tuple, base_shape: tuple, base_strides: tuple,
              roles: dict[str, Any]) -> Optional[dict[str, Any]]:
    """For a view ``(shape, strides)`` of keys ``(base_shape, base_strides)`` over the same memory (whose dims'
    ``roles``: ``"token"`` and ``"channel"``, a dim each, ``"batch"``, the batch and head dims): the same roles as
    dims of the view, or None where the view is no such keys. The token and channel dims each one dim of the view,
    matched by size and stride; the view's other dims cover the same memory as the batch and head dims (in any order,
    folded into one or unfolded): a permutation, ``(B, heads, N, d)`` reshaped to ``(B * heads, N, d)``; not a
    reshape that mixes tokens and channels. Keys ``(B, N, heads * d)`` softmaxed over the tokens before the heads are
    split: the view's channel dim may be the inner ``d`` of the keys' channels (its stride, a size dividing theirs),
    the heads ``heads * d / d`` then among the batch dims (``(B, N, heads * d)`` viewed as ``(B, heads, N, d)``)."""
    free = list(range(len(shape)))
    found: dict[str, Any] = {}
    heads: list[tuple[int, int]] = []  # the keys' channels split into (heads, d): the heads' size and stride
    for role in ("token", "channel"):
        size, stride = base_shape[roles[role]], base_strides[roles[role]]
        j = next((j for j in free if shape[j] == size and (strides[j] == stride or size == 1)), None)
        if j is None and role == "channel":
            j = next((j for j in free if strides[j] == stride and 1 < shape[j] < size and size % shape[j] == 0), None)
            if j is not None:
                heads.append((size // shape[j], shape[j] * stride))
        if j is None:
            return None
        free.remove(j)
        found[role] = j
    mine = _offsets([shape[j] for j in free], [strides[j] for j in free])
    theirs = _offsets([base_shape[d] for d in roles["batch"]] + [h for h, _ in heads],
                      [base_strides[d] for d in roles["batch"]] + [st for _, st in heads])
    if mine is None or mine != theirs:
        return None
    found["batch"] = tuple(free)
    return found


def _offsets(sizes: list[int], strides: list[int], most: int = 1 << 16) -> Optional[list[int]]:
    """The memory offsets that dims of ``sizes`` and ``strides`` reach, sorted; None past ``most`` of them."""
    offsets = [0]
    for size, stride in zip(sizes, strides):
        if len(offsets) * size > most:
            return None
        offsets = [o + i * stride for o in offsets for i in range(size)]
    return sorted(offsets)
