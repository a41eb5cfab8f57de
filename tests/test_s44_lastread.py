"""Session 44's last read: occlusion's region-limited passes trace the model as the folded copy does.

Occlusion's own fx trace recorded none of a forward's ``torch.autocast`` block (fx runs the block while tracing and
records only its operations), so under ``precision="bf16"`` the split model ran a float32 island of the model (a
head in ``torch.autocast(..., enabled=False)``) in bf16, where the full passes ran it in float32: other maps than
``local=False`` gives. The check on the clean images runs without an autocast and could not see it. The trace now
is the folded copy's (:func:`salience._core.folding.fx_traced`), which refuses such a forward: full passes.
"""
import logging
import warnings

import torch
from torch import nn

import salience


class _Island(nn.Module):
    """Two local convolutions, then a head that the model runs in float32 under any autocast."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = h.mean((2, 3))
        with torch.autocast("cpu", enabled=False):
            return self.head(h.float())


class _Plain(_Island):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_occlusion_keeps_a_float32_island_under_bf16(caplog):
    model = _Island().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = salience.occlusion(model, x, target=1, window=4, stride=4, precision="bf16", local=False)
        with caplog.at_level(logging.DEBUG, logger="salience.occlusion"):
            local = salience.occlusion(model, x, target=1, window=4, stride=4, precision="bf16")
    assert any("autocast" in r.getMessage() and "full passes" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    torch.testing.assert_close(local, full, rtol=0, atol=1e-6 * float(full.abs().max()))


def test_occlusion_still_splits_a_plain_model_under_bf16(caplog):
    """The same model without the island's block: the region-limited passes (the refusal is the block's)."""
    model = _Plain().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with caplog.at_level(logging.DEBUG, logger="salience.occlusion"):
            salience.occlusion(model, x, target=1, window=4, stride=4, precision="bf16")
    assert any("region-limited passes" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_the_float32_clean_activation_is_not_held_through_bf16_passes(monkeypatch):
    """Under ``precision="bf16"`` the passes start from the clean activation at their precision: the check's float32
    one (``Plan.clean``, ``(B, C', H', W')``, 25 MiB on resnet50's 8 images at a layer1 cut) is freed before them.
    It stayed referenced by the plan through every pass."""
    import weakref

    from salience.methods import _occlusion_local as L

    seen: dict = {}
    plan, paste = L.plan, L.paste

    def planned(*a, **k):
        p = plan(*a, **k)
        if p.clean is not None:
            seen["clean"] = weakref.ref(p.clean)
        return p

    def pasted(p, clean, act, sp):
        if "clean" in seen:  # the passes' pastes (the check's own comes before the plan is returned)
            seen.setdefault("alive", seen["clean"]() is not None)
        return paste(p, clean, act, sp)

    monkeypatch.setattr(L, "plan", planned)
    monkeypatch.setattr(L, "paste", pasted)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        salience.occlusion(_Plain().eval(), x, target=1, window=4, stride=4, precision="bf16")
    assert seen["alive"] is False
