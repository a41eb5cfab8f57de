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
3. docs/performance.md said the clamp spellings' gradients differ at a bound (``x.clamp``'s passing where
   ``F.hardtanh``'s and ``F.relu``'s is 0): in torch 2.14 every spelling with scalar bounds gives 0 there. The
   reference: the clamp's derivative, 1 strictly inside the bounds.
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


# ---- 3. the docs' note on the clamp spellings' gradient at a bound -------------------------------------------------

AT_BOUNDS = {  # (function, method) with scalar bounds (upper 6 where the name says so); x at each bound, in, out
    "hardtanh / clamp": (lambda u: torch.nn.functional.hardtanh(u, 0.0, 6.0), lambda u: u.clamp(0, 6)),
    "relu6 / clamp": (torch.nn.functional.relu6, lambda u: u.clamp(0, 6)),
    "relu / clamp(min=0)": (torch.nn.functional.relu, lambda u: u.clamp(min=0)),
    "threshold / relu": (lambda u: torch.nn.functional.threshold(u, 0.0, 0.0), lambda u: u.relu()),
}


@pytest.mark.parametrize("name", list(AT_BOUNDS))
def test_the_clamp_spellings_have_one_gradient_at_a_bound(name):
    """The reference: the derivative of a clamp by its definition, 1 strictly inside, 0 outside and (torch's
    convention for every spelling with scalar bounds) 0 at a bound itself."""
    x = torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0], requires_grad=True)
    hi = 6.0 if "clamp(0, 6)" in name or "6" in name or "hardtanh" in name else float("inf")
    want = ((x > 0) & (x < hi)).float()  # strictly inside: 0 at a bound itself
    for spell in AT_BOUNDS[name]:
        (g,) = torch.autograd.grad(spell(x).sum(), x)
        assert torch.equal(g, want), (name, g)


def test_the_performance_doc_says_no_clamp_gradient_passes_at_a_bound():
    """docs/performance.md said ``clamp``'s gradient passes at a bound where ``F.hardtanh``'s / ``F.relu``'s is 0
    (bb76fbb): it is 0 in every spelling (the test above)."""
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text().split())
    assert "`clamp`'s passes" not in text and "`x.clamp(min=0)`'s passes" not in text
