"""Session 45's review of the loose-ends merge (bb76fbb): each defect found, checked against a reference.

1. The bf16 weight casts (:class:`salience._core.casts.WeightCasts`) did not serve ``torch.linalg.matmul`` (the same
   product as ``torch.matmul``, whose operands autocast casts as matmul's: session 44's attention spelling): a weight
   multiplied by it was cast again every pass. The reference: the ``torch.matmul`` spelling of the same model, the
   bf16 copies counted by the profiler's copies of the weight's shape, and the maps of the uncached passes bit for
   bit. (The suspected positional-only gap is none: torch hands ``F.multi_head_attention_forward`` to a mode with its
   first 13 arguments by position and the rest by keyword, whatever the caller's spelling.)
2. ``precision="bf16-mixed"``: ``torch.special.multigammaln(x, p)``, which ``x.mvlgamma(p)`` spells (a method of
   another name, missing from ``islands.SPELLS_A_METHOD``), ran in float32 on a bf16 full-resolution map where the
   method ran in bf16. The reference: the method's result, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from salience._core.islands import HighResolutionFp32
from test_s43_casts import CALLS, _casts, _uncached

BF = torch.bfloat16
class Products(nn.Module):
    """A token model whose weight multiplies by ``torch.matmul`` or ``torch.linalg.matmul``."""

    def __init__(self, product) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w, self.product = nn.Parameter(torch.randn(4, 24) * 0.3), product
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.product(x[:, 0], self.w).relu().mean(1))


X = torch.rand(2, 1, 5, 4, generator=torch.Generator().manual_seed(1))


def _ig(model: nn.Module, shape: list[int]) -> tuple[int, torch.Tensor, int, torch.Tensor]:
    import salience

    CALLS["ig_s45"] = lambda m, x, **kw: salience.integrated_gradients(m, x, 1, steps=8, **kw)
    try:
        return (*_casts("ig_s45", model, X, shape=shape), *_uncached("ig_s45", model, X, shape=shape))
    finally:
        del CALLS["ig_s45"]


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("product", [torch.matmul, torch.linalg.matmul], ids=["matmul", "linalg.matmul"])
def test_a_weight_multiplied_by_linalg_matmul_is_cast_once_per_call(product):
    n, m, again, ref = _ig(Products(product).eval(), [4, 24])
    assert again >= 4, again
    assert n == 1, n  # linalg.matmul: cast in every pass
    assert torch.equal(m, ref)


def test_special_multigammaln_runs_as_mvlgamma_on_a_full_resolution_map():
    u = (torch.rand(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 4 + 2).to(BF)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (32, 32)):
        by_function, by_method = torch.special.multigammaln(u, 2), u.mvlgamma(2)
    assert by_method.dtype == BF
    assert by_function.dtype == BF  # was float32: the rule's cast
    assert torch.equal(by_function, by_method)
