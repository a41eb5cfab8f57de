"""precision="bf16-mixed" (:mod:`salience._core.islands`): the same math written two ways gets the same precision
(session 43). ``F.log_softmax`` on a large 4-D map ran in fp32 and ``x.log_softmax()`` in bf16; attention as
``torch.einsum("bhqd,bhkd->bhqk", q, k)`` ran in fp32 and as ``q @ k.transpose(-2, -1)`` in bf16. Every function
spelling of a softmax and every einsum of batched operands now runs as its tensor-method spelling does; an einsum by a
weight (a 1x1 convolution on a map) still runs in fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core.islands import HighResolutionFp32

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

BF = torch.bfloat16

# each pair: one math, two spellings (the second as the first ran before: the tensor method, or @)
PAIRS = {
    "log_softmax": (lambda a: F.log_softmax(a, -1), lambda a: a.log_softmax(-1)),
    "torch.log_softmax": (lambda a: torch.log_softmax(a, -1), lambda a: a.log_softmax(-1)),
    "special.log_softmax": (lambda a: torch.special.log_softmax(a, -1), lambda a: a.log_softmax(-1)),
    "softmax": (lambda a: F.softmax(a, -1), lambda a: a.softmax(-1)),
    "torch.softmax": (lambda a: torch.softmax(a, -1), lambda a: a.softmax(-1)),
    "special.softmax": (lambda a: torch.special.softmax(a, -1), lambda a: a.softmax(-1)),
    "softmin": (lambda a: F.softmin(a, -1), lambda a: (-a).softmax(-1)),
}
PRODUCTS = {
    "einsum": (lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), lambda q, k: q @ k.transpose(-2, -1)),
    "einsum list": (lambda q, k: torch.einsum("bhqd,bhkd->bhqk", [q, k]), lambda q, k: q @ k.transpose(-2, -1)),
    "matmul": (lambda q, k: torch.matmul(q, k.transpose(-2, -1)), lambda q, k: q @ k.transpose(-2, -1)),
    "Tensor.matmul": (lambda q, k: q.matmul(k.transpose(-2, -1)), lambda q, k: q @ k.transpose(-2, -1)),
    "bmm": (lambda q, k: torch.bmm(q[0], k[0].transpose(-2, -1))[None], lambda q, k: q @ k.transpose(-2, -1)),
    "baddbmm": (lambda q, k: torch.baddbmm(torch.zeros(2, 8, 8), q[0], k[0].transpose(-2, -1))[None],
                lambda q, k: q[0].bmm(k[0].transpose(-2, -1))[None]),
    "sdpa": (lambda q, k: F.scaled_dot_product_attention(q, k, k),
             lambda q, k: ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ k),
}


def _qk():
    g = torch.Generator().manual_seed(0)
    # a 16 px input: (1, 2, 8, 8) has both last sides past 16 / 4, as a ViT's (B, heads, 197, 64) at 224 px
    return torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, BF], ids=["fp32-map", "bf16-map"])
def test_every_spelling_of_a_softmax_runs_as_the_tensor_method(name, dtype):
    a = _qk()[0].to(dtype)
    function, method = PAIRS[name]
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        by_function, by_method = function(a), method(a)
    assert by_function.dtype == by_method.dtype == dtype  # a bf16 map's F.log_softmax was float32
    assert torch.equal(by_function, by_method)


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_every_spelling_of_an_attention_product_runs_in_bf16(name):
    q, k = _qk()
    first, second = PRODUCTS[name]
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        one, other = first(q, k), second(q, k)
    assert one.dtype == other.dtype == BF  # the einsum's was float32
    if name != "sdpa":  # SDPA's fused kernel rounds its own way: the dtype is the claim
        assert torch.equal(one, other)


def test_an_einsum_by_a_weight_or_of_one_map_stays_under_the_rule():
    x, w = torch.randn(1, 3, 16, 16), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        conv = torch.einsum("bchw,dc->bdhw", x, w)  # a 1x1 convolution on the full-resolution map
        alone = torch.einsum("bchw->bhwc", x.to(BF))  # one operand: a permutation of a map
    assert conv.dtype == torch.float32 and torch.allclose(conv, torch.einsum("bchw,dc->bdhw", x, w))
    assert alone.dtype == torch.float32


class _Attention(nn.Module):
    """A 4 px patch embedding of a 16 px image (16 tokens), one attention block, its scores through a log-softmax and
    its product spelled ``spelling`` ("method": ``q @ k.T``, ``.log_softmax``; "function": ``einsum``,
    ``F.log_softmax``), a linear head."""

    def __init__(self, spelling: str):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)
        self.spelling = spelling

    def forward(self, x):
        n = x.shape[0]
        t = self.embed(x).flatten(2).transpose(1, 2)  # (n, 16, 8)
        q, k, v = self.qkv(t).reshape(n, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each (n, 2, 16, 4): a "large map"
        if self.spelling == "function":
            a = F.log_softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5, dim=-1).exp()
        else:
            a = (q @ k.transpose(-2, -1) * 0.5).log_softmax(-1).exp()
        return self.fc(t + (a @ v).transpose(1, 2).reshape(n, 16, 8)).mean(1)


def test_a_model_written_two_ways_gives_the_same_map_under_bf16_mixed():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    by_function, by_method = _Attention("function").eval(), _Attention("method").eval()
    assert torch.equal(by_function(x), by_method(x))  # one model in fp32
    with salience.performance(precision="bf16-mixed"):
        maps = [salience.vanilla(m, x, 1) for m in (by_function, by_method)]
        outs = []
        for m in (by_function, by_method):
            with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
                outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(maps[0], maps[1])  # were apart: the einsum and F.log_softmax in fp32
