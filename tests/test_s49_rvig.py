"""Review of session 49's integrated gradients change (``target=None`` read each image's class off ``x``'s rows of the
path's own first chunk): a near tie of two classes broken by that chunk's rounding gave the map of the class the model
does not predict at ``x``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience

STEPS = 32


def _tie(x: torch.Tensor) -> nn.Module:
    """A CNN whose two logits at ``x`` tie exactly in a pass of ``x`` alone (``model(x).argmax(1)`` is class 0, the
    first maximum), built on a feature ``k`` that comes out lower when ``x`` runs in a batch with the path's other
    points (float rounding of another batch size): logit 0 is feature ``k``, logit 1 that feature's value alone."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        alone = body(x)[0]
        # the trapezoid's points of the one image, x first: the path's one chunk of STEPS items
        batched = body(torch.cat([x] + [a * x for a in torch.linspace(0, 1, STEPS)[:-1].tolist()]))[0]
    lower = (batched < alone).nonzero().flatten()
    if lower.numel() == 0:  # this CPU's convolutions give x the same bits in any batch: no tie to break here
        pytest.skip("no feature of x rounds lower in the path's batch on this machine")
    k = int(lower[0])
    head = nn.Linear(16, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, k] = 1.0
        head.bias[1] = alone[k]
    return nn.Sequential(body, head).eval()


def test_near_tie_keeps_the_class_of_model_x():
    """``target=None`` explains ``model(x).argmax(1)`` (as vanilla does), the same bits as that class given; the merged
    code read the class in the path's chunk of 32, where feature ``k`` is lower, and explained class 1."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = _tie(x)
    with torch.no_grad():
        out = model(x)
    assert out[0, 0] == out[0, 1] and out.argmax(1).item() == 0  # the premise: an exact tie, class 0 first
    assert salience.vanilla(model, x).equal(salience.vanilla(model, x, 0))
    none = salience.integrated_gradients(model, x, steps=STEPS, reduce=None)
    zero = salience.integrated_gradients(model, x, 0, steps=STEPS, reduce=None)
    one = salience.integrated_gradients(model, x, 1, steps=STEPS, reduce=None)
    assert not torch.allclose(zero, one)  # the two classes' maps differ
    torch.testing.assert_close(none, zero, rtol=1e-5, atol=1e-7)
    assert none.equal(zero)  # the same passes as the class given (the path in one chunk)


def test_a_dataset_run_stores_the_map_of_the_class_its_row_names(tmp_path):
    """A dataset run's first method with the predicted class (``runs.job._first_pass``) records the class of the model's
    output at ``x`` in its row; the merged code stored class 1's map (all zeros here) under ``targets: [0]``."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = _tie(x)

    class One(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[0]

    run = salience.explain_dataset(model, One(), ("integrated_gradients",), tmp_path / "run", batch_size=1, workers=0,
                                   method_options={"integrated_gradients": {"steps": STEPS}})
    row = run.row(0)
    assert row["predicted"] == 0 and row["targets"] == [0]
    stored = torch.as_tensor(run.map(0, "integrated_gradients")).float().squeeze()
    zero = salience.integrated_gradients(model, x, 0, steps=STEPS)[0]
    assert zero.abs().max() > 1e-4
    torch.testing.assert_close(stored, zero, rtol=2e-3, atol=1e-7)  # float16 storage
