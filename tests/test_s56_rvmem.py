"""Review of session 56's merge (helper mem56): the perturbation methods' refusal of NaN / infinite scores names
float16's overflow only where the passes ran in float16, and gives advice that works there.

``precision="fp16"`` is an autocast: it casts no float64 operator (a float64 model runs in float64 under it, and cannot
overflow float16), and it cannot put back a model the user made float16 (``precision="fp32"`` runs it in float16
still). The merge decided by the run's precision alone: a float64 model's NaN scores were "probably float16's
overflow", and a float16 model's overflow was told to use ``precision='fp32'`` (which refuses the same) or was not
named at all (the default precision).
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from test_s56_mem import XL, _loud

PRECISION_ADVICE = "use precision='bf16' (float32's range) or 'fp32'"


CALLS = {
    "occlusion": lambda m, x, **kw: salience.occlusion(m, x, 0, window=4, stride=2, **kw),
    "ablationcam": lambda m, x, **kw: salience.ablationcam(m, x, 0, layer="0", **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 0, masks=8, cell=2, **kw),
    "scorecam": lambda m, x, **kw: salience.scorecam(m, x, 0, layer="0", **kw),
}


def _refusal(call, *args, **kw) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SalienceError, match="NaN or infinite") as caught:
            call(*args, **kw)
    return str(caught.value)


@pytest.mark.parametrize("name", list(CALLS))
def test_float16_model_overflow_named_with_working_advice(name):
    """A model made float16 by the user (``.half()``, float16 images): its scores overflow whatever ``precision`` is
    (``precision="fp32"`` refuses the same scores, so advising it is wrong): the refusal names float16's overflow and
    says to run the model in float32. Fails on the merge: no float16 at the default precision, 'fp32' advised under
    ``precision="fp16"``."""
    m, x = _loud().half(), XL.half()
    for precision in ("fp32", "fp16"):
        msg = _refusal(CALLS[name], m, x, precision=precision)
        assert "overflow float16" in msg and "model.float()" in msg, (precision, msg)
        assert PRECISION_ADVICE not in msg, (precision, msg)


@pytest.mark.parametrize("name", list(CALLS))
def test_float64_model_under_fp16_names_no_float16(name):
    """``precision="fp16"`` on a float64 model runs float64 passes (an autocast casts no float64 operator: the same
    model's float32 passes overflow float16 here, its float64 ones give a finite map), so its NaN scores (a NaN bias)
    are not float16's overflow. Fails on the merge: it said they probably were."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(CALLS[name](_loud().double(), XL.double(), precision="fp16")).all()
    nan = _loud().double()
    with torch.no_grad():
        nan[4].bias.fill_(float("nan"))
    msg = _refusal(CALLS[name], nan, XL.double(), precision="fp16")
    assert "float16" not in msg and "fp16" not in msg, msg


def _deep() -> nn.Module:
    """Three 3x3 convolutions (occlusion's region-limited passes cut after the first), scores about 4e7."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    with torch.no_grad():
        for i in (0, 2, 4):
            net[i].weight.abs_(), net[i].bias.zero_()
        net[0].weight.mul_(30), net[8].weight.fill_(3e4), net[8].bias.zero_()
    return net.eval()


def test_region_limited_occlusion_names_fp16_overflow(caplog):
    """The region-limited passes (scored from the cut, not by :func:`score_items`) under ``precision="fp16"``: the
    refusal names float16's overflow as the full passes' does (a guard: the merge's own tests ran full passes only)."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.DEBUG, logger="salience.occlusion"):
        msg = _refusal(salience.occlusion, _deep(), x, 0, window=8, stride=8, precision="fp16")
    assert "region-limited passes" in caplog.text
    assert "overflow float16" in msg and PRECISION_ADVICE in msg, msg
