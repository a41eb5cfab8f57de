"""Review of session 46's issue-15 memory merge (8c445e6): what a model that draws random numbers in its forward
sees of the extra passes the merge added (the capture's rerun where the layer's output was changed in place after
it, ``clean_batch``'s memory probe pass under ``max_memory``)."""
from __future__ import annotations

import torch
from torch import nn

from salience._core import perf as _perf
from salience.methods.perturbation import clean_batch
from salience.methods.scorecam import _capture


class _Noisy(nn.Module):
    """Noise added to the input in its forward (eval mode too), an in-place ReLU after ``conv``: its output is changed
    in place after the layer returns (the capture then runs the pass again, with a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.1 * torch.randn_like(x)
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def _model_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Noisy().eval(), torch.randn(2, 3, 8, 8)


def test_capture_rerun_gives_one_passs_values_and_random_numbers():
    # reference: one plain forward under the same seed, the layer's output copied as it returned
    model, x = _model_and_input()
    kept: list = []
    handle = model.conv.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()))
    torch.manual_seed(1)
    with torch.no_grad():
        ref_out = model(x)
    after_ref = torch.get_rng_state()
    handle.remove()
    torch.manual_seed(1)
    acts, out = _capture(model, x, model.conv, True)
    assert torch.equal(acts, kept[0]) and torch.equal(out, ref_out)  # the merge: the rerun's own draws
    # the generators as one pass leaves them (the call's later passes draw what a plain loop's would)
    assert torch.equal(torch.get_rng_state(), after_ref)


def test_clean_batch_memory_probe_leaves_the_generators_as_they_were():
    model, x = _model_and_input()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    assert clean_batch(x, _perf.Performance(), None, 10 ** 9, model, True) == 2  # a budget that fits both images
    assert torch.equal(torch.get_rng_state(), before)  # the merge: the probe's pass drew from them
