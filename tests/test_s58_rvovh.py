"""The 16-bit clean-score pass of Ablation-CAM and occlusion (session 58's review of the bf16 probe change).

Under ``precision="bf16"`` the clean images' scores are taken again under the passes' autocast
(:func:`salience.methods.perturbation.clean_scores`, and occlusion's region-limited clean cut). That pass took
:func:`~salience.methods.perturbation.clean_batch`'s images a pass, which halves the *float32* clean passes (a float32
pass of B images held twice a 16-bit chunk's activations): 8 images ran as two bf16 passes of 4, where a plain loop
runs one of 8. It takes all B now (:func:`~salience.methods.perturbation.score_batch`: at most ``chunk``, and within
``max_memory`` the float32 passes' size).

Before this change (at 83094711) ``test_ablationcam_bf16_clean_scores_are_one_pass``,
``test_occlusion_bf16_clean_scores_are_one_pass`` and ``test_score_batch`` failed (two passes of 4; no
``score_batch``); so did the three map tests, which patch ``score_batch`` to compare the maps of the two batchings
(the bf16 maps agree within 1e-2 of the map's span; the float32 maps are the same bits). The bound test and the float32
pass count passed there too.
"""
from __future__ import annotations

import sys
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


def _bf16_clean(seen: list[tuple[int, str]]) -> list[int]:
    """The bf16 passes right after the float32 clean passes (the leading float32 ones), before anything else."""
    i = 0
    while i < len(seen) and seen[i][1] == "f32":
        i += 1
    return [n for n, kind in seen[i:i + 2] if kind == "bf16"]


def test_ablationcam_bf16_clean_scores_are_one_pass():
    """8 images: float32 clean passes of 4 + 4 (clean_batch's memory rule), then the bf16 clean scores in one pass of 8
    (before: 4 + 4), then the sharing check's passes and the channels' (first a smaller one: fewer passes in all)."""
    salience.ablationcam(_model(), X, 3, layer="3", precision="bf16")
    seen = list(SEEN)
    assert seen[:3] == [(4, "f32"), (4, "f32"), (8, "bf16")], seen
    assert seen[3][1] == "f32"  # the sharing check follows at once: no second bf16 clean pass


def test_occlusion_bf16_clean_scores_are_one_pass():
    salience.occlusion(_model(), X, 3, window=16, stride=16, precision="bf16")
    seen = list(SEEN)
    # float32 clean 4 + 4, the bf16 clean scores 8 (before: 4 + 4), the engine's thrown-away probe 8, the windows' 32
    assert seen == [(4, "f32"), (4, "f32"), (8, "bf16"), (8, "bf16"), (32, "bf16")], seen


def test_float32_passes_unchanged():
    """precision="fp32": one clean pass of 8 and no second clean pass (the same as before)."""
    salience.ablationcam(_model(), X, 3, layer="3")
    assert SEEN[0] == (8, "f32") and all(kind == "f32" for _, kind in SEEN)
    SEEN.clear()
    _perf.clear_cache()
    salience.occlusion(_model(), X, 3, window=16, stride=16)
    assert SEEN == [(8, "f32"), (8, "f32"), (32, "f32")], SEEN


def test_score_batch():
    from salience.methods.perturbation import score_batch
    x = torch.zeros(8, 3, 4, 4)
    assert score_batch(x, 4) == 8  # the float32 passes' halving is not the 16-bit pass's
    assert score_batch(x, 4, chunk=3) == 3  # the caller's items a pass bound it
    assert score_batch(x, 2, budget=1 << 20) == 2  # within max_memory: the float32 passes' measured size
    assert score_batch(x[:1], 1) == 1


def test_chunk_and_max_memory_still_bound_the_bf16_clean_pass():
    salience.ablationcam(_model(), X, 3, layer="3", precision="bf16", chunk=2)
    assert _bf16_clean(SEEN)[:1] == [2], SEEN
    SEEN.clear()
    _perf.clear_cache()
    # a budget of about 2 float32 images' clean pass: the bf16 clean pass takes no more than the float32 ones
    salience.occlusion(_model(), X, 3, window=16, stride=16, precision="bf16", max_memory=120_000)
    f32 = [n for n, kind in SEEN if kind == "f32"]
    lead = [n for n, kind in SEEN[len(f32) + 0:] if kind == "bf16"]
    assert max(f32) < 8 and lead[0] <= max(f32), SEEN


def _old_and_new(monkeypatch, method, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 map with the clean scores in one pass of all B images (now) and in clean_batch's halves (before:
    score_batch made to hand back the float32 passes' size, as the code before passed)."""
    perturbation, scorecam = (sys.modules[f"salience.methods.{n}"] for n in ("perturbation", "scorecam"))
    model = _model()
    new = method(model, X, **kw)
    _perf.clear_cache()
    with monkeypatch.context() as m:
        m.setattr(perturbation, "score_batch", lambda x, batch, chunk=None, budget=None: batch)
        m.setattr(scorecam, "score_batch", lambda x, batch, chunk=None, budget=None: batch)
        old = method(model, X, **kw)
    return new, old


def test_ablationcam_bf16_map_is_the_halves_within_bf16_rounding(monkeypatch):
    new, old = _old_and_new(monkeypatch, salience.ablationcam, target=3, layer="3", precision="bf16", relu=False)
    span = float(old.max() - old.min())
    assert span > 0.05, span  # a map, not a blank (with the ReLU this toy's map is about 0)
    assert float((new - old).abs().max()) <= 1e-2 * span


def test_occlusion_bf16_map_is_the_halves_within_bf16_rounding(monkeypatch):
    new, old = _old_and_new(monkeypatch, salience.occlusion, target=3, window=16, stride=16, precision="bf16",
                            softmax="none")
    span = float(old.max() - old.min())
    assert span > 0, span
    assert float((new - old).abs().max()) <= 1e-2 * span


def test_float32_maps_unchanged(monkeypatch):
    """float32 takes no 16-bit clean pass: the maps are the same bits whatever score_batch hands back (the float32
    clean output gives the clean scores)."""
    for method, kw in ((salience.ablationcam, dict(layer="3")), (salience.occlusion, dict(window=16, stride=16))):
        new, old = _old_and_new(monkeypatch, method, target=3, **kw)
        assert torch.equal(new, old)
