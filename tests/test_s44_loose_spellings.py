"""precision="bf16-mixed" (:mod:`salience._core.islands`): one math written two ways runs at one precision (session 44,
after session 43's softmaxes, einsum and ``torch.linalg.matmul``). ``torch.exp(a)`` of a large bf16 map ran in fp32
and ``a.exp()`` in bf16; ``torch.logsumexp`` alike; ``torch.tensordot(q, k)`` in fp32 where the einsum and ``q @ k``
it spells ran in bf16; ``F.prelu`` (a CNN's gate) in fp32 on a full-resolution map where ``x.prelu(w)`` ran in bf16.
A function a tensor method spells too now runs as the method does; tensordot is decided by its operands' ranks as
every product is; prelu runs under the rule (fp32 on a large map) in every spelling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import islands
from salience._core.islands import HighResolutionFp32

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

BF = torch.bfloat16

# one math, two spellings: (a function, the tensor method as it always ran); each runs as the method does
TWINS = {
    "exp": (lambda a: torch.exp(a), lambda a: a.exp()),
    "logsumexp": (lambda a: torch.logsumexp(a, -1), lambda a: a.logsumexp(-1)),
    "add": (lambda a: torch.add(a, 0.3), lambda a: a + 0.3),
    "mul": (lambda a: torch.mul(a, a), lambda a: a * a),
    "sigmoid": (lambda a: torch.sigmoid(a), lambda a: a.sigmoid()),
    "F.sigmoid": (lambda a: F.sigmoid(a), lambda a: a.sigmoid()),
    "tanh": (lambda a: F.tanh(a), lambda a: a.tanh()),
    "relu": (lambda a: F.relu(a), lambda a: a.relu()),
    "torch.relu": (lambda a: torch.relu(a), lambda a: a.relu()),
    "manual softmax": (lambda a: torch.exp(a) / torch.sum(torch.exp(a), -1, keepdim=True),
                       lambda a: a.exp() / a.exp().sum(-1, keepdim=True)),
}


def _map(dtype):
    # a 16 px input: (1, 2, 8, 8) has both last sides past 16 / 4 (a large map under the rule)
    return torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("name", list(TWINS))
@pytest.mark.parametrize("dtype", [torch.float32, BF], ids=["fp32-map", "bf16-map"])
def test_a_function_runs_as_its_tensor_method(name, dtype):
    a = _map(dtype)
    function, method = TWINS[name]
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        by_function, by_method = function(a), method(a)
    assert by_function.dtype == by_method.dtype  # torch.exp of a bf16 map was float32, a.exp() bf16
    assert torch.equal(by_function, by_method)
    # the autocast leaves them in the map's dtype: a float32 map (the rule's convolutions' output) in float32
    assert by_method.dtype == dtype


def test_tensordot_runs_as_the_einsum_and_the_product_it_spells():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        # (b, h, q, d) x (b', h', k, d) -> (b, h, q, b', h', k): the diagonal in b, h is q @ k^T
        dot = torch.tensordot(q, k, dims=([3], [3]))[0, :, :, 0].diagonal(dim1=0, dim2=2).permute(2, 0, 1)[None]
        dot_kw = torch.tensordot(a=q, b=k, dims=([3], [3]))
        ein = torch.einsum("bhqd,bhkd->bhqk", q, k)
        at = q @ k.transpose(-2, -1)
        # by a weight (2-D): a linear layer on the map, under the rule
        w = torch.randn(8, 4, generator=g)
        lin = torch.tensordot(q, w, dims=([3], [0]))
    assert dot.dtype == dot_kw.dtype == ein.dtype == at.dtype == BF  # tensordot's was float32
    assert torch.equal(ein, at)
    # tensordot reshapes to one 2-D product, q @ k.T per head: bf16 products of the same bf16 operands
    torch.testing.assert_close(dot.float(), at.float(), rtol=1e-2, atol=1e-2)
    assert lin.dtype == torch.float32 and torch.allclose(lin, torch.tensordot(q, w, dims=([3], [0])))


def test_prelu_is_under_the_rule_in_every_spelling():
    x, w = _map(torch.float32), torch.full((2,), 0.25)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        spelled = [F.prelu(x, w), torch.prelu(x, w), x.prelu(w), nn.PReLU(2, 0.25)(x)]
    ref = F.prelu(x, w)  # fp32, no autocast
    for out in spelled:  # x.prelu(w) was bf16 (the autocast casts prelu down)
        assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_the_matrix_product_is_decided_in_one_place():
    """``torch.matmul`` is decided by its operands' ranks (:data:`islands.MATMULS`), not listed as a product whatever
    its operands (PRODUCTS listed it too, though never read for it)."""
    assert torch.matmul in islands.MATMULS and not (islands.MATMULS & islands.PRODUCTS)
    assert torch.tensordot in islands.MATMULS and torch.linalg.matmul in islands.MATMULS


class _Spelled(nn.Module):
    """A 4 px patch embedding of a 16 px image, one attention head's scores (16 x 16 tokens, a large map under the
    rule) through a hand-written softmax, spelled with functions or with tensor methods."""

    def __init__(self, functions: bool):
        super().__init__()
        torch.manual_seed(0)
        self.functions = functions
        self.embed, self.qkv, self.fc = nn.Conv2d(3, 8, 4, stride=4), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        q, k, v = self.qkv(t)[:, None].chunk(3, -1)  # (B, 1, 16, 8) each
        s = q @ k.transpose(-2, -1)
        if self.functions:
            e = torch.exp(torch.sub(s, torch.amax(s, -1, keepdim=True)))
            p = torch.div(e, torch.sum(e, -1, keepdim=True))
        else:
            e = (s - s.amax(-1, keepdim=True)).exp()
            p = e / e.sum(-1, keepdim=True)
        return self.fc((p @ v).mean((1, 2)))


def test_a_models_maps_do_not_depend_on_the_spelling():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    by_function, by_method = _Spelled(True).eval(), _Spelled(False).eval()
    assert torch.equal(by_function(x), by_method(x))  # one model in fp32
    with salience.performance(precision="bf16-mixed"):
        maps = [salience.vanilla(m, x, 1) for m in (by_function, by_method)]
    assert torch.equal(maps[0], maps[1])  # the function spelling ran its softmax in fp32
