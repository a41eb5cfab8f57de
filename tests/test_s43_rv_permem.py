"""Review of session 43's low-precision folded copy (wt-permem-s43): where it must stay as the float32 fold was.

``precision="bf16-mixed"`` runs the operations on the high-resolution maps (the stem's convolutions) with autocast
off, in float32 (:mod:`salience._core.islands`): a folded weight held in bf16 is rounded there, where the float32
fold's was not. A float64 model under a bf16 ``precision`` runs in float64 (autocast does not cast float64): a bf16
folded weight beside a float64 input failed the pass (the fold dropped with a warning)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import folding as _folding
from salience._core import perf as _perf
from test_s43_permem import _net

pytestmark = pytest.mark.usefixtures("fresh_perf_state")


def _float32_fold(monkeypatch) -> None:
    """The folded copy as before session 43: in the model's dtype whatever the passes' precision."""
    fold = _folding._fold
    monkeypatch.setattr(_folding, "_fold", lambda model, dtype=None: fold(model, None))


def _call(method: str, model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    kwargs = dict(layer="3", chunk=4) if method == "scorecam" else dict(masks=8, chunk=4) if method == "rise" else \
        dict(samples=3) if method == "smoothgrad" else dict(steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
        with salience.performance(precision=precision, fold_batchnorm=True):
            return getattr(salience, method)(model, x, target=1, **kwargs)


@pytest.mark.parametrize("method", ["rise", "scorecam", "smoothgrad", "integrated_gradients"])
def test_bf16_mixed_maps_are_those_of_the_float32_fold(method, monkeypatch):
    # the 16 x 16 maps of both convolutions are high-resolution islands: float32 with the float32 folded weights
    model, x = _net(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    now = _call(method, model, x, "bf16-mixed")
    _perf.clear_cache()
    _float32_fold(monkeypatch)
    assert torch.equal(now, _call(method, model, x, "bf16-mixed"))


def test_a_float64_model_under_bf16_keeps_its_fold_and_its_maps(monkeypatch):
    model, x = _net().double(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).double()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with salience.performance(precision="bf16", fold_batchnorm=True):
            now = salience.rise(model, x, target=1, masks=8, chunk=4)
    assert not [w for w in said if "fold_batchnorm" in str(w.message)]  # not "the folded copy failed"
    _perf.clear_cache()
    _float32_fold(monkeypatch)
    assert torch.equal(now, _call("rise", model, x, "bf16"))


def test_a_bf16_model_s_folded_copy_shares_no_storage_with_it():
    model = _net().to(torch.bfloat16)
    folded, _ = _folding.folded_model(model, dtype=torch.bfloat16)
    assert folded is not None
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not own & {t.untyped_storage().data_ptr() for t in (*folded.parameters(), *folded.buffers())}
