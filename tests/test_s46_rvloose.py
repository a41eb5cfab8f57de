"""Session 46's review of the loose ends (merge 21bfa4c): each defect found, checked against a reference.

1. ``torch.einsum`` that only views a weight (``"i->i"``, ``"ij->ji"``: no product, no cast) under a CPU bf16
   precision: the first pass's verdict "views and casts only" held (no other operation read the weight), and later
   passes were handed the weight's bf16 copy, so einsum returned rounded values where autocast leaves the fp32 ones.
   The reference: the same call with autocast's cache off (WeightCasts serves nothing), bit for bit.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience


class ViewedScale(nn.Module):
    """A linear layer whose output is scaled by ``torch.einsum(equation, self.scale)``: a view of the weight."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.equation = equation
        self.lin = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.randn(6, 6) * 0.3 + 1.0000001 if equation == "ij->ji" else
                                  torch.randn(6) * 0.3 + 1.0000001)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.lin(x.flatten(1))
        s = torch.einsum(self.equation, self.scale)
        return self.head(t * s if s.dim() == 1 else t * s.sum(0))


def _ig(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.integrated_gradients(model, x, 1, steps=8, chunk=2, precision="bf16")


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("equation", ["i->i", "ij->ji"])
def test_an_einsum_that_only_views_a_weight_keeps_its_fp32_bits(equation):
    model, x = ViewedScale(equation).eval(), torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    first, again = _ig(model, x), _ig(model, x)  # the second call meets the signature's verdict
    with torch.autocast("cpu", enabled=False, cache_enabled=False):  # WeightCasts off: autocast's own casts
        ref = _ig(model, x)
    assert torch.equal(first, ref)
    assert torch.equal(again, ref), float((again - ref).abs().max())
