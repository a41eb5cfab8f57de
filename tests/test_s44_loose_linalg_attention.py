"""Attention whose product is spelled ``torch.linalg.matmul`` (session 44). A keys-first softmax (over dim 1 of
``(B, S, heads, L)``) is attention once a product contracts it with the values; the capture's list of products
(:data:`salience.attention.PRODUCTS`) and the default-layer search's spotter did not hold ``torch.linalg.matmul``
(another function object than ``torch.matmul``, the same product), so such a model's attention was not captured.
Each spelling is checked against the model's own ``(B, heads, L, S)`` attention, recorded by the model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience.attention import attention_maps

from conftest import unchanged

D, HEADS = 16, 4  # 16 px images, 8 px patches: a class token and 2 x 2 patches, 5 tokens; 4 heads


class Block(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj, self.spelling = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D), spelling
        self.seen: list[torch.Tensor] = []  # the model's own A (B, heads, L, S): the reference

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q = q * (D // HEADS) ** -0.5
        if self.spelling.startswith("keys-first"):  # (B, S, heads, L), softmaxed over the keys, dim 1
            a = torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1).permute(0, 2, 3, 1)  # a view (B, heads, L, S)
            o = torch.linalg.matmul(a, v) if self.spelling.endswith("linalg") else a @ v
        else:  # the standard layout, its scores by linalg.matmul or @
            s = torch.linalg.matmul(q, k.transpose(-2, -1)) if self.spelling.endswith("linalg") else q @ k.transpose(-2, -1)
            a = s.softmax(-1)
            o = torch.linalg.matmul(a, v) if self.spelling.endswith("linalg") else a @ v
        self.seen.append(a.detach().clone())
        return t + self.proj(o.transpose(1, 2).reshape(b, n, D))


class TinyViT(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, D, 8, stride=8), nn.Parameter(torch.randn(1, 1, D))
        self.blocks = nn.Sequential(Block(spelling), Block(spelling))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))[:, 0])


X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _own(spelling: str) -> list[torch.Tensor]:
    model = TinyViT(spelling).eval()
    with torch.no_grad():
        model(X)
    return [a for blk in model.blocks for a in blk.seen]


@pytest.mark.parametrize("layout", ["keys-first", "standard"])
def test_linalg_matmul_attention_is_captured_as_the_at_spellings(layout):
    want = _own(f"{layout} @")
    assert want[0].shape == (2, HEADS, 5, 5)
    for spelling in (f"{layout} linalg", f"{layout} @"):
        model = TinyViT(spelling).eval()
        with unchanged(model):
            got = attention_maps(model, X)
        assert len(got) == 2, (spelling, len(got))  # keys-first by linalg.matmul: none captured
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["attention_rollout", "transformer_attribution"])
def test_the_maps_equal_the_at_spellings(method):
    fn = salience.METHODS[method]
    maps = []
    for spelling in ("keys-first linalg", "keys-first @", "standard @"):
        model = TinyViT(spelling).eval()
        with unchanged(model):
            maps.append(fn(model, X))
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=0)
    torch.testing.assert_close(maps[0], maps[2], rtol=1e-5, atol=1e-6)


def test_a_factorized_attention_by_linalg_matmul_is_recognized_as_by_at():
    """The default-layer search's spotter: CoaT's ``q @ (softmax(k)^T v)`` with ``torch.linalg.matmul`` is the same
    factorized attention (its products were read by name, ``matmul`` / ``__matmul__`` / ``bmm``: ``linalg_matmul``
    was none, so the map rule took ``embed2``, before the blocks)."""
    from test_default_layers import _Factorized, assert_spotted_as_by_at

    class LinalgFactorized(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            out = torch.linalg.matmul(q, torch.linalg.matmul(k.softmax(dim=2).transpose(-1, -2), v))
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    assert_spotted_as_by_at(LinalgFactorized)
