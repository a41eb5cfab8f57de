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


def test_a_large_tensor_written_by_a_gradient_method_in_a_dataset_run_is_put_back() -> None:
    """The other side: a gradient method (no Found): the run's guard puts the large tensor back after the call from its
    kept copy, no warning (session 53; until then it stayed written and the run's guard said so)."""
    torch.manual_seed(0)
    model, x = _Table(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with run_guard(model):
            salience.vanilla(model, x, 0)
            assert torch.count_nonzero(model.table) == 0
    assert not [w for w in caught if "keeps those values" in str(w.message)]
    assert torch.count_nonzero(model.table) == 0


class _Counter(nn.Module):
    """A stateful model: each forward counts itself, and the count scales the output (a closed form: the scores of a
    pass are ``fc(x) * (1 + count)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.fc(x.flatten(1)) * (1.0 + self.n)


def test_ig_predicted_class_pass_does_not_leave_its_state_to_the_path() -> None:
    """Integrated gradients with target=None runs a plain forward of x for the class first; its write of the model's
    own state (``self.n += 1``) was left for the path, whose passes then scored a model the call did not find: the map
    differed from the one with that class given (each model's first call, same weights, so both run the engine's probe
    alike). The class pass's state is put back (Found), and the model comes back as it was."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 2, 2)
    given, predicted = _Counter(), _Counter()
    predicted.load_state_dict(given.state_dict())
    with torch.no_grad():
        cls = int(given(x).argmax())
    given.n = 0
    a = salience.integrated_gradients(predicted, x, None, steps=4, reduce=None)
    b = salience.integrated_gradients(given, x, cls, steps=4, reduce=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert predicted.n == 0 and given.n == 0
