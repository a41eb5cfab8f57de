"""Session 51, last read across the merges: what falls between the guard's new records and the methods that use them.

- A read-only NumPy array attribute (``flags.writeable = False``: a view the model keeps of a table it writes, kept
  elsewhere) whose values move through its base during the forward: the guard, which records NumPy arrays since
  session 51 (``_core.guard._tensor_records``), found the values moved and put them back with ``t[...] = copy``: a raw
  ``ValueError: assignment destination is read-only`` out of every method (before session 51: no error, the array was
  not recorded). A read-only array cannot be written through the attribute, so it is not the attribute's state to put
  back (its writable base, where it is an attribute, is recorded and put back itself).
- A forward that replaces a parameter's data (``self.fc.weight.data = ...``) under Ablation-CAM, whose passes run in
  inference mode: the guard's ``ParamState.restore`` set ``requires_grad`` back before the data, and torch refuses
  ``requires_grad=True`` on an inference tensor: a raw ``RuntimeError`` and the parameter left with the forward's
  data (an older defect than session 51, found by this read).

Both fixed in ``_core/guard/`` by the lead after the guard's review merged (the read-only array not recorded;
``ParamState.restore`` puts the data back before ``requires_grad``); each test failed on the merged code.
"""
import numpy as np
import pytest
import torch
from torch import nn

import salience

class ReadOnlyView(nn.Module):
    """Keeps a read-only view of a table its forward writes through the table (not an attribute)."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.view = table.view()
        self.view.flags.writeable = False
        self.bump = lambda: table.__setitem__(0, table[0] + 1)  # the table itself is no attribute (a closure's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bump()
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("method", ["vanilla", "occlusion"])
def test_read_only_numpy_view_is_no_error(method: str) -> None:
    """Every method runs; the model comes back in train mode with its parameters' requires_grad (the guard's record of
    the rest), the map the same as that of the same model without the view (the view is only read)."""
    torch.manual_seed(0)
    model = ReadOnlyView(np.zeros(4, dtype=np.float32)).train()
    x = torch.rand(1, 3, 16, 16)
    options = {"window": 8, "stride": 8} if method == "occlusion" else {}
    got = salience.METHODS[method](model, x, 1, **options)
    assert model.training and model.bn.training
    assert all(p.requires_grad for p in model.parameters())
    del model.view  # the same model, no read-only view: the map must not depend on it
    assert torch.equal(salience.METHODS[method](model, x, 1, **options), got)


class SwapsData(nn.Module):
    """A forward that replaces its head's weight data (doubled) and reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.data = self.fc.weight.data * 2
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_parameter_data_replaced_under_ablationcam_is_put_back() -> None:
    """Ablation-CAM runs; the head's weight comes back: the same object, its own storage and values, requires_grad."""
    torch.manual_seed(0)
    model = SwapsData().eval()
    weight, data, values = model.fc.weight, model.fc.weight.data, model.fc.weight.detach().clone()
    salience.METHODS["ablationcam"](model, torch.rand(1, 3, 16, 16), 0)
    assert model.fc.weight is weight and weight.is_set_to(data) and torch.equal(weight, values)
    assert weight.requires_grad and not weight.is_inference()
