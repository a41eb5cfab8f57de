"""Keys-first attention with as many heads as tokens: a softmax over dim 1 of ``(B, S, S, S)``, whose shape cannot
say whether the heads or the queries come next. The product contracting it with the values says (the heads are the
axis the values share): the capture, rollout, attribution and the default-layer search read it as the same model
written with the attention laid out ``(B, heads, L, S)``, whose matrices the model itself records for the test."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience.attention import AttentionCapture, attention_maps
from salience.methods.gradcam import default_layer

from conftest import unchanged

D, HEADS = 20, 5  # 16 px images, 8 px patches: a class token and 2 x 2 patches, 5 tokens: as many as the heads


class Block(nn.Module):
    def __init__(self, layout: str) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj, self.layout = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D), layout
        self.seen: list[torch.Tensor] = []  # the standard layout's own A (B, heads, L, S): the reference

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q = q * (D // HEADS) ** -0.5
        if self.layout == "standard":
            a = (q @ k.transpose(-1, -2)).softmax(-1)
            self.seen.append(a.detach())
            o = a @ v
        elif self.layout in ("bshl", "bslh"):
            a = torch.einsum(f"bhld,bhsd->{self.layout}", q, k).softmax(dim=1)
            o = torch.einsum(f"{self.layout},bhsd->bhld", a, v)
        else:  # keys first (B, S, heads, L), permuted to (B, heads, L, S) for @ (a view, or a copy of one)
            a = torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1).permute(0, 2, 3, 1)
            o = (a.contiguous() if self.layout == "contiguous" else a) @ v
        return t + self.proj(o.transpose(1, 2).reshape(b, n, D))


class SquareViT(nn.Module):
    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, D, 8, stride=8), nn.Parameter(torch.randn(1, 1, D))
        self.blocks = nn.Sequential(Block(layout), Block(layout))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))[:, 0])


LAYOUTS = ["bshl", "bslh", "permute", "contiguous"]


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _reference(x: torch.Tensor) -> list[torch.Tensor]:
    model = SquareViT("standard").eval()
    with torch.no_grad():
        model(x)
    return [a for blk in model.blocks for a in blk.seen]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_as_many_heads_as_tokens_keys_first_is_captured_as_the_models_own_attention(layout, x):
    want = _reference(x)
    assert want[0].shape == (2, HEADS, 5, 5)
    model = SquareViT(layout).eval()
    with unchanged(model):
        for _ in range(2):  # the first pass everywhere, the second narrowed to the blocks
            got = attention_maps(model, x)
            assert len(got) == 2
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    cap = AttentionCapture(batch=2, grads=True)
    with cap:
        model(x)[:, 1].sum().backward()
    assert [tuple(g[0].shape) for g in cap.grads] == [(2, HEADS, 5, 5)] * 2  # the gradient permuted alike


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rollout_attribution_and_the_default_layer_read_it_as_the_standard_layout(layout, x):
    standard, model = SquareViT("standard").eval(), SquareViT(layout).eval()
    with unchanged(model):
        torch.testing.assert_close(salience.attention_rollout(model, x), salience.attention_rollout(standard, x),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(salience.transformer_attribution(model, x, 1),
                                   salience.transformer_attribution(standard, x, 1), rtol=1e-4, atol=1e-6)
    # the last block that runs attention, as for the standard layout (without the square case: "embed")
    assert default_layer(model, x) == default_layer(standard, x) == "blocks.0"


class ChannelSoftmaxCNN(nn.Module):
    """A softmax over the channels of a ``(B, 8, 8, 8)`` map (the keys-first shape), then a product over the width:
    not attention (the softmax's dim 1 is kept, not contracted with anything)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(8, 8)), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv(x).softmax(dim=1)
        h = s @ self.mix.expand(len(s), 8, 8, 8)  # 4-D by 4-D, as an attention's product: over the width only
        return self.head(h.mean((2, 3)))


def test_a_channel_softmax_of_that_shape_is_not_attention():
    cap = AttentionCapture(batch=2)
    with cap, torch.no_grad():
        ChannelSoftmaxCNN()(torch.rand(2, 3, 8, 8))
    assert cap.maps == []


class ChannelSoftmaxThen1x1(nn.Module):
    """A softmax over the channels of a ``(B, 8, 8, 8)`` map, then a 1x1 convolution written as a product with the
    weight expanded over the batch and the rows (channels last): the channels contracted, the rows "shared" with an
    operand that does not vary along them (stride 0). Not attention."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.w, self.head, self.how = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(8, 5)), \
            nn.Linear(5, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, w = self.conv(x).softmax(dim=1), self.w.expand(len(x), 8, 8, 5)
        h = s.permute(0, 2, 3, 1) @ w if self.how == "matmul" else torch.einsum("bchw,bhcd->bhwd", s, w)
        return self.head(h.mean((1, 2)))


@pytest.mark.parametrize("how", ["matmul", "einsum"])
def test_a_channel_softmax_then_a_1x1_convolution_by_an_expanded_weight_is_not_attention(how):
    model, x = ChannelSoftmaxThen1x1(how), torch.rand(2, 3, 8, 8)
    cap = AttentionCapture(batch=2)
    with cap, torch.no_grad():
        model(x)
    assert cap.maps == []
    assert default_layer(model, x) == "conv"  # a CNN's last conv, not 'the model computes attention'


@pytest.mark.parametrize("stat", ["bshl,ls->bh", "bshl,ls->bhl"])
def test_a_statistic_taken_first_leaves_the_order_to_the_values_product(stat):
    """The mean attention distance per head (or per head and query), ``einsum("bshl,ls->bh", a, distance)``, contracts
    the keys and shares the queries' index with the distance table, not the heads': read as the product it would
    transpose heads and queries; it sums the queries, or has no batch (no values), so the values' product says."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 4, 3, generator=g) for _ in range(3))  # (B, heads, L, d): 4 heads, 4 tokens
    distance = (torch.arange(4)[:, None] - torch.arange(4)).abs().float()
    cap = AttentionCapture(batch=2)
    with cap, torch.no_grad():
        a = torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1)
        torch.einsum(stat, a, distance)
        torch.einsum("bshl,bhsd->bhld", a, v)
    assert len(cap.maps) == 1
    torch.testing.assert_close(cap.maps[0], (q @ k.transpose(-1, -2)).softmax(-1))


class ChannelSoftmaxThenEinsum1x1(nn.Module):
    """A softmax over the channels of a ``(B, 8, 8, 16)`` map (the unambiguous keys-first shape ``(B, S, S, heads)``)
    then a 1x1 convolution by einsum, ``bchw,dc->bdhw``: the channels contracted with a weight, not with values
    (no batch index). Not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.w, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(5, 8)), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.einsum("bchw,dc->bdhw", self.conv(x).softmax(dim=1), self.w).mean((2, 3)))


def test_a_channel_softmax_then_an_einsum_1x1_convolution_is_not_attention():
    model, x = ChannelSoftmaxThenEinsum1x1(), torch.rand(2, 3, 8, 16)
    cap = AttentionCapture(batch=2)
    with cap, torch.no_grad():
        model(x)
    assert cap.maps == []
    assert default_layer(model, x) == "conv"
