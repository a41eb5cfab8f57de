"""Review of session 53's hfout change (region-limited occlusion keeps a Hugging Face ``ModelOutput``).

The change traced a forward of the images alone that builds a ``ModelOutput`` as the call ``model(x)``
(``_occlusion_local._Called``), whose nodes are named ``model_...``; the folded copy is the forward's own trace
(``body_5``). Under ``precision="bf16"`` with ``fold_batchnorm=True`` the split found on the model is moved onto the
copy held in bf16 by the cut's name (``_occlusion_local.moved``): the name missed, so the split was found and checked
a second time on the float32 folded copy and the passes ran that copy (docs/methods-perturbation.md says the run's
bf16 copy). The forward's trace is now kept, its output rebuilt (first as the call's, ``_occlusion_local._given_like``;
since foldout53 by ``folding.ThisThreadTracer.create_arg`` in every trace).
Maps against ``local=False`` (both bf16 passes of the copy) within ``2**-7 * (1 + max |logits|)``: bf16 keeps 8
significant bits, so one rounding is at most ``2**-8`` of a value, and the crops' and the full passes' roundings differ
(seen: 0.0 on this model); the model left as it was.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import perf as _perf
from salience.loading.custom import select_output
from salience.methods import _occlusion_local

transformers = pytest.importorskip("transformers")


class _BN(nn.Module):
    """A forward of the images alone with batch norms (a folded copy) that builds a ``ModelOutput``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        return transformers.modeling_outputs.ImageClassifierOutputWithNoAttention(
            logits=self.head(self.body(x).mean((2, 3))))


def test_bf16_folded_split_moves_onto_the_runs_copy(monkeypatch):
    """merge a260753a: moved() returned None (cut ``model_body_5`` is no node of the copy) and plan() ran twice."""
    moved, planned = [], []
    real_moved, real_plan = _occlusion_local.moved, _occlusion_local.plan
    monkeypatch.setattr(_occlusion_local, "moved", lambda *a: moved.append(real_moved(*a)) or moved[-1])
    monkeypatch.setattr(_occlusion_local, "plan", lambda *a, **k: planned.append(1) or real_plan(*a, **k))
    model = select_output(_BN().eval(), "logits")
    was = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(), _perf.performance(precision="bf16", fold_batchnorm=True):
        warnings.simplefilter("ignore")  # bf16 on a CPU without bf16 instructions
        a = salience.occlusion(model, x, 1, window=8, stride=8, reduce=None)
        b = salience.occlusion(model, x, 1, window=8, stride=8, reduce=None, local=False)
    assert len(moved) == 1 and moved[0] is not None and moved[0].cut == "body_5", moved
    assert len(planned) == 1, planned
    with torch.no_grad():
        s = float(model(x).logits.abs().max())
    assert float((a - b).abs().max()) <= 2 ** -7 * (1 + s), float((a - b).abs().max())
    assert all(torch.equal(was[k], v) for k, v in model.state_dict().items())
