"""Review of session 53's folded copy that gives back the model's ``ModelOutput`` (merge 813659b1).

Three ways the merge's ``fold_batchnorm=True`` copy gave another output than the model's, where the same call without
the option (the model itself) worked:

- a dataclass rebuilt by its fields whose constructor does not give back the dict the forward returned: one that
  fills no items (its forward set them), so ``output="logits"`` found no key; a ``ModelOutput`` a field was set on
  after it was made (``out.loss = ...``: its key last), whose rebuild put the keys in field order, so ``output=0``
  picked ``loss``: a wrong map, silently. ``folding._rebuilds`` now tries the constructor once per trace;
- ``FxPlainDict`` (a type the trace cannot make again) raised ``TypeError`` for a missing key, so a user's pick that
  falls back on ``except KeyError`` raised a ``SalienceError`` instead.

The maps are compared within tests/test_s53_foldout.py's ``TOL`` (its derivation: the same nets, only rounding differs).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import salience
from salience._core import perf as _perf
from salience._core.errors import SalienceError
from salience.loading.custom import select_output
from test_s53_foldout import TOL, _Net
from test_s53_hfout import _Scores  # a dict whose constructor takes the scores alone: a plain dict in the trace

transformers = pytest.importorskip("transformers")


@dataclass
class _Filled(dict):
    """A dataclass dict whose constructor fills no items: the forward sets them."""

    logits: Optional[torch.Tensor] = None


class _FilledNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _Net()

    def forward(self, x: torch.Tensor):
        out = _Filled(logits=self.net(x).logits)
        out["logits"] = out.logits
        return out


class _LateNet(_FilledNet):
    """A ``ModelOutput`` whose ``loss`` (another tensor of the logits' shape) is set after it is made: its keys
    ``['logits', 'loss']``, so ``output=0`` is the logits."""

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        out.loss = 2 * out.logits
        return out


class _OddNet(_FilledNet):
    def forward(self, x: torch.Tensor):
        return _Scores(self.net(x).logits)


def _falls_back(o):
    """A user's pick for models giving ``pred_logits`` or else ``scores``."""
    try:
        return o["pred_logits"]
    except KeyError:
        return o["scores"]


def _folded(model, x):
    """vanilla's map with ``fold_batchnorm=True`` (its second call: the first may run the model itself)."""
    with _perf.performance(fold_batchnorm=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        salience.vanilla(model, x, 1, reduce=None)
        return salience.vanilla(model, x, 1, reduce=None)


@pytest.mark.parametrize("net, pick", [(_FilledNet, "logits"), (_LateNet, "logits"), (_OddNet, _falls_back)],
                         ids=["fields-fill-no-items", "late-field-by-key", "keyerror-fallback"])
def test_the_folded_map_is_the_models(net, pick):
    """merge: "output='logits' does not fit: the model returned a _Filled with keys []"; the fall-back pick:
    "(TypeError: no key 'pred_logits' ...)"."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    model = select_output(net().eval(), pick)
    ref = salience.vanilla(model, x, 1, reduce=None)
    got = _folded(model, x)
    assert float(ref.abs().max()) > 0
    assert float((got - ref).abs().max()) <= TOL * float(ref.abs().max())


def test_a_field_set_late_is_no_wrong_map_by_index():
    """merge: the copy's ``out[0]`` was ``loss`` (twice the logits): a map twice the model's, no word said."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    model = select_output(_LateNet().eval(), 0)
    ref = salience.vanilla(model, x, 1, reduce=None)
    try:
        got = _folded(model, x)
    except SalienceError as e:  # the copy's plain dict: it says to pick by key
        assert "pick by key, output='logits'" in str(e)
    else:
        assert float((got - ref).abs().max()) <= TOL * float(ref.abs().max())
