"""A model whose module keeps extra state that is not a tensor (``get_extra_state`` returns any object; the
loaders take such state dicts since this stop) runs through a dataset run and the model-randomization test:
both read ``state_dict()`` and took every value for a tensor (``'dict' object has no attribute 'dtype'`` /
``'detach'``)."""
from __future__ import annotations

import torch
from torch import nn

import salience
from salience.evidence.sanity import randomization


class Versioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.version = {"version": 2}

    def get_extra_state(self):
        return dict(self.version)

    def set_extra_state(self, state) -> None:
        self.version = dict(state)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_dataset_run_takes_a_model_with_non_tensor_extra_state(tmp_path):
    torch.manual_seed(0)
    model = Versioned().eval()
    data = torch.utils.data.TensorDataset(torch.rand(3, 3, 8, 8))
    run = salience.explain_dataset(model, data, ["vanilla"], tmp_path / "run")
    assert run.table.num_rows == 3
    direct = salience.vanilla(model, data.tensors[0][:1], target=int(run.table.column("targets").to_pylist()[0][0]))
    assert torch.allclose(torch.as_tensor(run.map(0, "vanilla")).float(), direct[0].half().float(), atol=1e-3)
    assert model.version == {"version": 2}


def test_the_randomization_test_takes_a_model_with_non_tensor_extra_state():
    torch.manual_seed(0)
    model = Versioned().eval()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    result = randomization(model, torch.rand(2, 3, 8, 8), salience.vanilla, target=0)
    assert result.layers  # every layer's step ran
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v
