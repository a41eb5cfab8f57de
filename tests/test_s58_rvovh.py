"""The fixed passes of a many-pass call under ``precision="bf16"``, counted with a forward hook (session 58's review of
the bf16 probe change, docs/methods-perturbation.md "The fixed passes of a call").

Each test pins the passes a call runs besides its chunks: the float32 clean passes (two of 4 for 8 images under a
16-bit autocast, ``perturbation.clean_batch``'s memory rule; one of 8 in float32), the 16-bit clean scores of
Ablation-CAM and occlusion (two of 4: one of 8 was tried and was slower on resnet50,
benchmarks/clean_score_pass_s58.md), and the engine's thrown-away memory probe (first call of a process only).
No code changed with them: they pass at 83094711 too (no defect found there to fix); they make a change of these
counts a visible choice.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import perf as _perf

SEEN: list[tuple[int, str]] = []  # (batch size, "bf16" / "f32") of every pass of the model


class _Count(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append((int(x.shape[0]), "bf16" if torch.is_autocast_enabled("cpu") else "f32"))
        return x


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Count(), nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


X = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh():
    _perf.clear_cache()
    SEEN.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns
        yield
    _perf.clear_cache()


def _twice(call) -> tuple[list, list]:
    """The passes of a process's first call and of the same call again (warm: no memory probe)."""
    call()
    first = list(SEEN)
    SEEN.clear()
    call()
    return first, list(SEEN)


@pytest.mark.parametrize("target", [3, None])
def test_rise_bf16_fixed_passes(target):
    """Float32 clean 4 + 4 (with a class target given too: the probability judgement), the probe's 8 in the first
    call only, then the 64 items (8 masks x 8 images) in one chunk."""
    model = _model()
    first, warm = _twice(lambda: salience.rise(model, X, target, masks=8, precision="bf16"))
    assert first == [(4, "f32"), (4, "f32"), (8, "bf16"), (64, "bf16")]
    assert warm == [(4, "f32"), (4, "f32"), (64, "bf16")]


def test_scorecam_bf16_fixed_passes():
    """Float32 clean 4 + 4 (the layer's output and the clean output from them), the probe's 8, the 128 items."""
    model = _model()
    first, warm = _twice(lambda: salience.scorecam(model, X, 3, layer="3", precision="bf16"))
    assert first == [(4, "f32"), (4, "f32"), (8, "bf16"), (128, "bf16")]
    assert warm == [(4, "f32"), (4, "f32"), (128, "bf16")]


def test_ablationcam_bf16_fixed_passes():
    """Float32 clean 4 + 4, the bf16 clean scores 4 + 4, then the sharing check (float32 and bf16 passes of 1-2)."""
    model = _model()
    first, warm = _twice(lambda: salience.ablationcam(model, X, 3, layer="3", precision="bf16"))
    assert first[:4] == warm[:4] == [(4, "f32"), (4, "f32"), (4, "bf16"), (4, "bf16")]
    assert len(first) == len(warm) + 1  # the probe's pass, first call only


def test_occlusion_bf16_fixed_passes():
    model = _model()
    first, warm = _twice(lambda: salience.occlusion(model, X, 3, window=16, stride=16, precision="bf16"))
    assert first == [(4, "f32"), (4, "f32"), (4, "bf16"), (4, "bf16"), (8, "bf16"), (32, "bf16")]
    assert warm == [(4, "f32"), (4, "f32"), (4, "bf16"), (4, "bf16"), (32, "bf16")]


def test_float32_fixed_passes():
    """precision="fp32": one clean pass of all 8 images, no 16-bit clean scores."""
    model = _model()
    first, warm = _twice(lambda: salience.occlusion(model, X, 3, window=16, stride=16))
    assert first == [(8, "f32"), (8, "f32"), (32, "f32")]
    assert warm == [(8, "f32"), (32, "f32")]
