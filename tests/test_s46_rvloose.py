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


# 2. The folded copy (and occlusion's kept trace, keyed the same way: folding.kept_for) was kept for the weights'
# state and the modules' plain numbers, flags and strings, not for a tensor that is no parameter or buffer
# (``self.shift = torch.tensor(...)``, a trace's constant: the copy holds its own copy of it), a function the
# forward calls (``self.act = torch.tanh``) or a list (swin's ``shift_size``): one replaced or changed in place, the
# folded copy ran the old one (RISE's map off by 10 % of its range), and occlusion's kept trace failed its check and
# ran full passes for good. The references: the same call unfolded; occlusion's log of its region-limited passes.
class Shifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.shift, self.act, self.roll = torch.tensor(0.0), torch.relu, [0, 0]
        self.head = nn.Linear(8 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.c2(self.act(self.bn(self.c1(x))) + self.shift))
        y = torch.roll(nn.functional.adaptive_avg_pool2d(y, 2), self.roll, (2, 3))
        return self.head(y.flatten(1))


CHANGES = {
    "tensor replaced": lambda m: setattr(m, "shift", torch.tensor(0.5)),
    "tensor in place": lambda m: m.shift.add_(0.5),
    "function replaced": lambda m: setattr(m, "act", torch.tanh),
    "list in place": lambda m: m.roll.__setitem__(0, 1),  # swin's shift_size: a list the forward reads
}


def _rise(model: nn.Module, x: torch.Tensor, fold: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with salience.performance(fold_batchnorm=fold):
            return salience.rise(model, x, 1, masks=16, seed=0)


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("change", list(CHANGES))
def test_the_folded_copy_follows_a_constant_tensor_or_function_of_the_forward(change):
    model, x = Shifted().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    before = _rise(model, x, True)  # the folded copy made, kept for the model
    torch.testing.assert_close(before, _rise(model, x, False), rtol=0, atol=1e-5)
    CHANGES[change](model)
    after, ref = _rise(model, x, True), _rise(model, x, False)
    assert (ref - before).abs().max() > 1e-3  # the change changes the map
    torch.testing.assert_close(after, ref, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("change", ["tensor replaced", "function replaced"])
def test_occlusion_traces_again_after_a_constant_tensor_or_function_changed(change, caplog):
    model, x = Shifted().eval(), torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))

    def occlusion() -> list[str]:
        caplog.clear()
        with caplog.at_level("DEBUG", logger="salience.occlusion"):
            salience.occlusion(model, x, 2, window=6, stride=4, reduce=None)
        return [r.getMessage() for r in caplog.records if r.name == "salience.occlusion"]

    assert any("region-limited passes" in m for m in occlusion()), caplog.text
    CHANGES[change](model)
    said = occlusion()
    assert any("region-limited passes" in m for m in said), said  # was: full passes, the kept trace's check failing
