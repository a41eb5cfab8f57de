"""``default_methods``' own pass under the guided rule (where the default-layer search's pass did not count the
activations) ran a reentrant ``torch.utils.checkpoint`` as torch does, its ReLUs without gradients, where the rule
counts none: the guided methods were left out of a model they run on. The methods' passes run a checkpoint as a
plain call; so does that pass now."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import salience
from salience.methods import _rules_apply


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def _body(self, x):
        return F.relu(self.conv(x))

    def forward(self, x):
        return self.head(checkpoint(self._body, x, use_reentrant=True).mean((2, 3)))


def test_the_guided_rule_counts_the_relus_of_a_reentrant_checkpoint():
    torch.manual_seed(0)
    model = Checkpointed().eval()
    x = torch.rand(1, 3, 8, 8)
    salience.guided_backprop(model, x, target=0)  # the method itself takes the model (no refusal)
    salience.deconvnet(model, x, target=0)
    assert _rules_apply(model, x)
