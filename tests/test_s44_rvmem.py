"""Review of the session-44 memory change (wt-rvmem-s44). The folding's own ``_fuse`` (torch's ``fuse`` with each
fused weight cast as it is made) folded a BatchNorm into a convolution that the forward calls more than once: the
module is replaced for every call, so the other call (plain, or followed by another BatchNorm) ran the fused weights
too, a BatchNorm applied twice or where there is none (torch's own ``fuse`` does the same). Such a pair is left as it
is now; the reference is the model itself (eval mode), the folded copy must compute its function."""
import pytest
import torch
from torch import nn

import salience
from salience._core import folding


def _stats(*bns: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)


class TwoNorms(nn.Module):
    """One convolution called twice, each call followed by a BatchNorm of its own; then a pair that folds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv2, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        _stats(self.bn1, self.bn2, self.bn3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv(x)) + self.bn2(self.conv(x))
        return self.head(self.bn3(self.conv2(h)).relu().mean((2, 3)))


class PlainToo(TwoNorms):
    """The convolution once with a BatchNorm after it, once without."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.conv(x)) + self.conv(x)
        return self.head(self.bn3(self.conv2(h)).relu().mean((2, 3)))


X = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls", [TwoNorms, PlainToo])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_folded_copy_computes_the_model_with_a_reused_convolution(cls, dtype):
    model = cls()
    folded = folding._fold(model, dtype)
    assert not isinstance(folded, str), folded  # conv2 + bn3 still fold
    assert not any(m is model.bn3 for m in folded.modules())
    with torch.no_grad():
        ref = model(X)
        if dtype is None:
            got = folded(X)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:
            with torch.autocast("cpu", dtype=dtype):
                got, want = folded(X).float(), model(X).float()
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("cls", [TwoNorms, PlainToo])
def test_rise_maps_with_fold_are_the_models(cls):
    model = cls()
    plain = salience.rise(model, X, 1, masks=16, seed=0)
    with salience.performance(fold_batchnorm=True):
        folded = salience.rise(model, X, 1, masks=16, seed=0)
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


class OnlyReused(nn.Module):
    """The only conv + BatchNorm pair has a convolution called twice: nothing folds, and the reason says why."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        _stats(self.bn)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x))).mean((1, 2, 3))


def test_no_fold_when_the_only_pair_has_a_reused_convolution():
    why = folding._fold(OnlyReused())
    assert isinstance(why, str) and "calls once" in why, why
