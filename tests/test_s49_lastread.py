"""Session 49's last read: defects of two of the session's changes working together (each was reviewed alone)."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

import salience
from salience._core.guard import run_guard


class _Table(nn.Module):
    """A forward that writes in place a plain tensor attribute over the guard's copy limit (1 MiB: the guard records
    it without a copy, occlusion's Found with one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.table = torch.zeros(300_000)  # 1.14 MiB

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table.add_(1)
        return self.fc(self.conv(x).mean((2, 3))) + self.table[0] * 0


def test_found_put_back_of_a_large_tensor_is_no_warning_in_a_dataset_run() -> None:
    """Found puts a large written tensor back and tells the guard (``settled``); a dataset run's guard put back its
    baseline after each call, which was not told: "keeps those values" after every call, though the values were put
    back (Found + run_guard)."""
    torch.manual_seed(0)
    model, x = _Table(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with run_guard(model):
            for _ in range(2):
                salience.occlusion(model, x, 0, window=4, stride=4)
                assert torch.count_nonzero(model.table) == 0  # put back: the warning would be false
    assert not [w for w in caught if "keeps those values" in str(w.message)]
    assert torch.count_nonzero(model.table) == 0


def test_a_large_tensor_not_put_back_in_a_dataset_run_still_warns() -> None:
    """The other side: a gradient method (no Found) leaves the large tensor written; the run's guard says so."""
    torch.manual_seed(0)
    model, x = _Table(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with run_guard(model):
            salience.vanilla(model, x, 0)
    assert [w for w in caught if "keeps those values" in str(w.message)]
