"""Session 45's loose ends: correctness defects left open by session 44, each checked against a reference.

1. Attention spelled with keyword arguments (``torch.matmul(input=a, other=v)``, ``torch.linalg.matmul(input=...,
   other=...)``, ``a.matmul(other=v)``, ``torch.bmm(input=..., mat2=...)``, ``torch.reshape(input=..., shape=...)``,
   ``F.scaled_dot_product_attention(query=..., key=..., value=...)``, ``torch.einsum`` with its operands as a list):
   the capture and the default-layer search's spotter read each call's operands in one place
   (:func:`salience.attention.operands`), positional or keyword. The reference: the model's own attention matrices
   ``(B, heads, L, S)``, recorded by the model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience.attention import attention_maps

from conftest import unchanged

D, HEADS = 16, 4  # 16 px images, 8 px patches: a class token and 2 x 2 patches, 5 tokens; 4 heads

# keys-first spellings: the softmax over dim 1 of (B, S, heads, L), then a product with the values
KEYS_FIRST = ("@", "matmul kw", "linalg kw", "method kw", "bmm kw", "einsum list")
# standard spellings: the scores' product, the softmax over the last dim (or SDPA), the product with the values
STANDARD = ("@", "matmul kw", "sdpa kw")


class Block(nn.Module):
    def __init__(self, layout: str, spelling: str) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.layout, self.spelling, self.record = layout, spelling, False
        self.seen: list[torch.Tensor] = []  # the model's own A (B, heads, L, S), when ``record``: the reference

    def _keys_first(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, b = self.spelling, q.shape[0]
        f = torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1)  # (B, S, heads, L)
        a = f.permute(0, 2, 3, 1)  # a view (B, heads, L, S)
        if self.record:
            self.seen.append(a.detach().clone())
        if s == "@":
            return a @ v
        if s == "matmul kw":
            return torch.matmul(input=a, other=v)
        if s == "linalg kw":
            return torch.linalg.matmul(input=a, other=v)
        if s == "method kw":
            return a.matmul(other=v)
        if s == "bmm kw":  # the heads folded into the batch by a keyword reshape (a copy: a is no plain view)
            a3 = torch.reshape(input=a, shape=(b * HEADS, *a.shape[-2:]))
            return torch.bmm(input=a3, mat2=v.reshape(b * HEADS, *v.shape[-2:])).reshape(v.shape)
        if s == "einsum list":
            return torch.einsum("bshl,bhsd->bhld", [f, v])
        raise AssertionError(s)

    def _standard(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.spelling == "sdpa kw":  # the model's own softmax only for the reference
            if self.record:
                self.seen.append((q @ k.transpose(-2, -1)).softmax(-1))
            return F.scaled_dot_product_attention(query=q, key=k, value=v, scale=1.0)  # q scaled already
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        if self.record:
            self.seen.append(a.detach().clone())
        return a @ v if self.spelling == "@" else torch.matmul(input=a, other=v)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q = q * (D // HEADS) ** -0.5
        o = self._keys_first(q, k, v) if self.layout == "keys-first" else self._standard(q, k, v)
        return t + self.proj(o.transpose(1, 2).reshape(b, n, D))


class TinyViT(nn.Module):
    def __init__(self, layout: str, spelling: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, D, 8, stride=8), nn.Parameter(torch.randn(1, 1, D))
        self.blocks = nn.Sequential(Block(layout, spelling), Block(layout, spelling))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(torch.cat([self.cls.expand(len(t), -1, -1), t], 1)))[:, 0])


X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
SPELLINGS = [("keys-first", s) for s in KEYS_FIRST] + [("standard", s) for s in STANDARD]


def _own(layout: str, spelling: str) -> list[torch.Tensor]:
    model = TinyViT(layout, spelling).eval()
    for blk in model.blocks:
        blk.record = True
    with torch.no_grad():
        model(X)
    return [a for blk in model.blocks for a in blk.seen]


@pytest.mark.parametrize("layout,spelling", SPELLINGS)
def test_keyword_spellings_of_attention_are_captured(layout, spelling):
    want = _own(layout, spelling)
    assert want[0].shape == (2, HEADS, 5, 5)
    model = TinyViT(layout, spelling).eval()
    with unchanged(model):
        got = attention_maps(model, X)
    assert len(got) == 2, (spelling, len(got))  # before session 45: none (keys-first) or a TypeError (SDPA)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout,spelling", [s for s in SPELLINGS if s[1] != "@"])
@pytest.mark.parametrize("method", ["attention_rollout", "transformer_attribution"])
def test_the_maps_of_keyword_spellings_equal_the_at_spelling(method, layout, spelling):
    fn = salience.METHODS[method]
    maps = []
    for s in ("@", spelling):
        model = TinyViT(layout, s).eval()
        with unchanged(model):
            maps.append(fn(model, X))
    torch.testing.assert_close(maps[1], maps[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout,spelling", [s for s in SPELLINGS if s[1] != "@"])
def test_the_default_layer_search_sees_keyword_spellings(layout, spelling):
    """The spotter reads the same calls: the search picks the layer it picks for the ``@`` spelling (the ViT rule's,
    before the last attention), not the map rule's patch embedding (where it saw no attention)."""
    from salience.methods.gradcam import default_layer

    by_at = default_layer(TinyViT(layout, "@").eval(), X)
    assert by_at == "blocks.0"  # the ViT rule: the input of the last block (its first block's output)
    assert default_layer(TinyViT(layout, spelling).eval(), X) == by_at


def test_a_factorized_attention_copied_by_a_keyword_clone_is_recognized():
    """CoaT's ``q @ (softmax(k)^T v)`` with the keys copied by ``torch.clone(input=...)`` and the products by
    ``torch.matmul(input=..., other=...)``: the same factorized attention as the ``@`` spelling."""
    from test_default_layers import _CoaTLike, _Factorized
    from salience.methods.gradcam import default_layer

    class KeywordFactorized(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            keys = torch.clone(input=k.softmax(dim=2).transpose(-1, -2))
            out = torch.matmul(input=q, other=torch.matmul(input=keys, other=v))
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    by_at = _CoaTLike(_Factorized).eval()
    torch.manual_seed(0)
    by_keywords = _CoaTLike(KeywordFactorized).eval()
    assert torch.equal(by_at(x), by_keywords(x))  # one model
    assert default_layer(by_at, x) == "blocks.1.norm1"
    assert default_layer(by_keywords, x) == "blocks.1.norm1"
