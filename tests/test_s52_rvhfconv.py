"""Review of session 52's hfconv change (occlusion traced as the call ``model(x)``, :class:`_occlusion_local._Called`).

The change gave no wrong map in the review; these pin what it checked that tests/test_s52_hfconv.py does not: the
written attributes' module indices (shifted by the wrapper) on a submodule, next to a module whose attribute of the
same name the trace reads (a wrong shift keeps that attribute out of the cache's key: after the user changes it the
stale trace is kept, which the check on the clean images refuses, so full passes; seen with the shift removed); a
default argument that picks a branch; and ``output=`` picks on a Hugging Face model (session 52: its trace returned a
plain dict, so an index or ``.logits`` pick gave full passes; since session 53 the trace rebuilds the ``ModelOutput``
and every pick keeps the region-limited passes, with the same maps). Maps against ``local=False`` within ``1e-5 * (1 + max |map|)``, the tolerance of tests/test_s52_hfconv.py
(crops sum their convolutions in another order). And a defect outside the change, found next to it: the folded copy
(``fold_batchnorm=True``) of a forward with an optional input ran the branch salience's calls never take.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import salience
from salience.loading.custom import select_output

LOG = "salience.occlusion"


def _maps(caplog, model: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(region-limited call's map, full passes' map, the first call's debug log); window 6, stride 5."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG):
        a = salience.occlusion(model, x, target, window=6, stride=5, reduce=None)
    log = " ".join(r.getMessage() for r in caplog.records if r.name == LOG)
    b = salience.occlusion(model, x, target, window=6, stride=5, reduce=None, local=False)
    assert float((a - b).abs().max()) <= 1e-5 * (1 + float(b.abs().max())), float((a - b).abs().max())
    return a, b, log


class _Counter(nn.Module):
    """Writes ``self.n`` each call (a counter the trace does not read)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return x


class _Gain(nn.Module):
    """Reads its plain attribute ``n`` (the next module after :class:`_Counter` in ``modules()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.n


class _Net(nn.Module):
    """``**kwargs``: fx traces two inputs, so the call is traced through the wrapper."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.count = _Counter()
        self.gain = _Gain()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.head(self.gain(self.count(self.conv(x).relu())).mean((2, 3)))


def test_written_attribute_index_shift_keeps_a_read_attribute_in_the_key(caplog):
    m = _Net().eval()
    x = torch.randn(1, 3, 20, 20)
    _, _, log = _maps(caplog, m, x, 1)
    assert "region-limited passes" in log, log
    m.gain.n = -3.0  # read by the trace: traced again (the stale trace, made with 2.0, fails the plan's check)
    a, b, log = _maps(caplog, m, x, 1)
    assert "region-limited passes" in log, log
    assert float(b.abs().max()) > 0


class _Mode(nn.Module):
    """A string default that picks a branch: fx made ``mode`` a proxy (the branch cannot be traced: full passes
    before); the call traced takes the default's branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, mode: str = "neg") -> torch.Tensor:
        y = self.conv(x).relu()
        if mode == "neg":
            y = -3 * y
        return self.head(y.mean((2, 3)))


def test_a_default_that_picks_a_branch_is_traced_with_its_default(caplog):
    _, _, log = _maps(caplog, _Mode().eval(), torch.randn(2, 3, 20, 20), 2)
    assert "region-limited passes" in log, log


def _hf_convnext() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5,
                                      layer_scale_init_value=1.0)
    return transformers.ConvNextForImageClassification(cfg).eval()


@pytest.mark.parametrize("pick", ["logits", 0, lambda o: o.logits], ids=["key", "index", "attribute"])
def test_hf_output_picks_on_the_traced_model_output(caplog, pick):
    """Session 53: the index and attribute picks were full passes here (the trace's plain dict)."""
    _, _, log = _maps(caplog, select_output(_hf_convnext(), pick), torch.randn(1, 3, 32, 32), 3)
    assert "region-limited passes" in log, log


class _Flip(nn.Module):
    """A convolution and BatchNorm (so ``fold_batchnorm=True`` makes a folded copy) and an optional input whose
    branch salience's calls never take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.body[1].running_mean.uniform_(-1, 1)
            self.body[1].running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor, flag=None) -> torch.Tensor:
        y = self.body(x)
        if flag is not None:
            y = -y
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("local", [False, True], ids=["full", "region-limited"])
def test_folded_copy_refused_for_a_forward_of_several_inputs(local):
    """Outside the reviewed change (``_core/folding.py``): the folded copy was the trace of ``forward(x, flag=None)``
    with ``flag`` an input and ``if flag is not None`` taken, so under ``fold_batchnorm=True`` every pass scored
    ``-y`` (0.70 off on a map of 0.004). Now no copy is made (a warning says why): the maps are those without
    ``fold_batchnorm`` (the same passes of the model; the tolerance of the tests above)."""
    from salience._core.perf import performance
    m = _Flip().eval()
    x = torch.randn(1, 3, 24, 24)
    ref = salience.occlusion(m, x, 1, window=6, stride=6, local=False)
    with performance(fold_batchnorm=True), pytest.warns(UserWarning, match="more inputs than the images"):
        a = salience.occlusion(m, x, 1, window=6, stride=6, local=local)
    assert float((a - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max())), float((a - ref).abs().max())
