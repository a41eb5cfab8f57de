"""Session 51 review of ``Classes.known`` (the sgclass51 merge): it trusted any values.

``Classes.known(values, outputs=k)`` is public (``salience.targets.Classes``) and skipped the class range check in
every pass against an output of ``k`` classes without ever checking ``values`` itself: ``Classes.known([7, 0],
outputs=5)`` on a 5-class model gave PyTorch's raw "index 7 is out of bounds" in the pass (on CUDA a device-side
assert that poisons the process) where a plain ``Classes`` gives a ``SalienceError``. Now the values are checked
once, when made; the predicted class (an argmax: in range by construction) is still not checked, in no pass.
Also (session 50's code beside it): integrated gradients' class read on its path took a model whose output is a
scalar for scores and raised a raw IndexError.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import salience
from salience import targets as _targets
from salience._core.errors import SalienceError
from salience.targets import Classes


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bad", [7, 5, -1])
def test_known_refuses_a_class_out_of_range_when_made(bad: int) -> None:
    with pytest.raises(SalienceError, match=f"target class {bad} is out of range for a model with 5 outputs"):
        Classes.known(torch.tensor([0, bad]), outputs=5)


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad"])
def test_a_call_with_known_classes_out_of_range_is_a_salience_error(method: str) -> None:
    """The same error as the plain way's (``Classes([7, 0])``), not PyTorch's raw index error from the pass."""
    model, x = _linear(), _images()
    kw = {"samples": 4} if method == "smoothgrad" else {}
    with pytest.raises(SalienceError, match="target class 7 is out of range for a model with 5 outputs"):
        getattr(salience, method)(model, x, Classes(torch.tensor([7, 0])), **kw)
    with pytest.raises(SalienceError, match="target class 7 is out of range for a model with 5 outputs"):
        getattr(salience, method)(model, x, Classes.known(torch.tensor([7, 0]), outputs=5), **kw)


@pytest.mark.parametrize("outputs", [True, 0, 2.0, -3])
def test_known_refuses_outputs_that_are_not_a_positive_int(outputs: object) -> None:
    with pytest.raises(SalienceError, match="Classes.known's outputs must be an int >= 1"):
        Classes.known(torch.tensor([0, 0]), outputs=outputs)  # type: ignore[arg-type]


def test_known_is_checked_once_and_not_in_the_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked when made (one check, against its width), then in no pass of a many-pass call; the predicted class
    (``target=None``) in none at all."""
    calls: list[int] = []
    real = _targets._check_range
    monkeypatch.setattr(_targets, "_check_range", lambda idx, k: (calls.append(k), real(idx, k))[1])
    model, x = _linear(), _images()
    with torch.no_grad():
        top = model(x).argmax(1)
    known = Classes.known(top, outputs=5)
    assert calls == [5]
    got = salience.smoothgrad(model, x, known, samples=4, reduce=None, seed=0)
    assert calls == [5]
    salience.smoothgrad(model, x, None, samples=4, reduce=None, seed=0)
    assert calls == [5]
    assert torch.equal(got, salience.smoothgrad(model, x, top.tolist(), samples=4, reduce=None, seed=0))


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sum()


def test_integrated_gradients_predicted_class_of_a_scalar_output_is_a_salience_error() -> None:
    torch.manual_seed(2)
    with pytest.raises(SalienceError, match=r"class targets need a model output of shape \(B, K\), got \(\)"):
        salience.integrated_gradients(_Scalar().eval(), _images(), None, steps=4)
