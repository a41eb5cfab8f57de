"""Occlusion's region-limited passes keep what a Hugging Face model returns (session 53).

Session 52 traced ``ConvNextForImageClassification`` as the call ``model(x)`` (:class:`_occlusion_local._Called`), but
``torch.fx`` makes any returned dict a plain one, so the trace gave ``{"logits": ...}`` for the model's
``ImageClassifierOutputWithNoAttention``: ``output=lambda o: o.logits`` and ``output=0`` failed on it, and the check on
the clean images gave full passes. The trace now rebuilds the ``ModelOutput`` (session 53's
``folding.ThisThreadTracer.create_arg``, for every trace; first ``_occlusion_local._as_given``, gone).
Each ``output=`` form must take the region-limited path (the debug line, and fewer convolution multiply-adds than
``local=False``) with the map of Captum's ``Occlusion`` on the logits within ``1e-5 * (1 + max |logits|)``, the
tolerance of tests/test_s52_hfconv.py (crops sum their convolutions in another order), and leave the model as it was.
A ``return_dict=False`` model is the HF model called with ``return_dict=False`` (a tuple): in transformers 5.25 a
``ConvNextConfig(return_dict=False)`` model raises in its own forward (its encoder returns a tuple that its
``ConvNextModel`` reads ``.last_hidden_state`` of). Tiny config (dims 8 / 16 / 24 / 32, one block a stage, layer
scales 1), random weights; nothing is downloaded.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import salience
from salience.loading.custom import select_output
from test_s44_occlusion_local import Shapes  # F.conv2d's input shapes and multiply-adds

transformers = pytest.importorskip("transformers")
pytest.importorskip("captum")

LOG = "salience.occlusion"


def _hf() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5,
                                      layer_scale_init_value=1.0)
    return transformers.ConvNextForImageClassification(cfg).eval()


class _AsTuple(nn.Module):
    """The HF model called with ``return_dict=False``: it returns ``(logits,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hf = _hf()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> tuple:
        return self.hf(pixel_values, return_dict=False, **kwargs)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out.logits


def _state(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [dict(m.__dict__) for m in model.modules()])


def _left_as_it_was(model: nn.Module, was: tuple) -> None:
    params, modes, attrs = was
    now = model.state_dict()
    assert params.keys() == now.keys() and all(torch.equal(params[k], now[k]) for k in params)
    assert modes == [m.training for m in model.modules()]
    for d, m in zip(attrs, model.modules()):
        assert d.keys() == m.__dict__.keys(), type(m).__name__
        assert all(d[k] is m.__dict__[k] for k in d), type(m).__name__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _run(caplog, model: nn.Module, x: torch.Tensor, target: int, local: bool) -> tuple:
    """(map, debug log, convolution multiply-adds) of one call, window 8, stride 8."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOG), Shapes() as shapes:
        a = salience.occlusion(model, x, target, window=8, stride=8, reduce=None, local=local)
    return a, " ".join(r.getMessage() for r in caplog.records if r.name == LOG), shapes.macs


def _captum(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    from captum.attr import Occlusion
    with torch.no_grad():
        return Occlusion(lambda t: _logits(model, t)).attribute(
            x, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=target, baselines=0.0,
            perturbations_per_eval=64)


@pytest.mark.parametrize("pick,as_tuple", [("logits", False), (lambda o: o.logits, False), (0, False), (0, True)],
                         ids=["key", "attribute", "index", "return_dict_false-index"])
def test_every_output_pick_keeps_the_region_limited_passes(caplog, pick, as_tuple):
    """main: "full passes: the split model failed on the clean images (SalienceError: output=0 does not fit: the
    model returned a dict with keys ['logits'])" for the index and attribute picks."""
    model = select_output(_AsTuple().eval() if as_tuple else _hf(), pick)
    x = torch.randn(1, 3, 64, 64)
    was = _state(model)
    a, log, macs = _run(caplog, model, x, 3, True)
    assert "region-limited passes" in log, log
    b, _, full = _run(caplog, model, x, 3, False)
    assert macs < 0.9 * full, (macs, full)
    with torch.no_grad():
        s = float(_logits(model, x).abs().max())
    ref = _captum(model, x, 3)
    assert a.shape == ref.shape
    assert float((a - ref).abs().max()) <= 1e-5 * (1 + s), float((a - ref).abs().max())
    assert float((a - b).abs().max()) <= 1e-5 * (1 + s), float((a - b).abs().max())
    assert float(ref.abs().max()) > 0
    _left_as_it_was(model, was)


class _Net(nn.Module):
    """A forward of the images alone that builds a ``ModelOutput`` (fx traces it directly: a plain dict before)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        return transformers.modeling_outputs.ImageClassifierOutputWithNoAttention(
            logits=self.head(self.body(x).mean((2, 3))))


def test_a_model_output_built_in_a_traceable_forward(caplog):
    model = select_output(_Net().eval(), lambda o: o.logits)
    x = torch.randn(1, 3, 32, 32)
    a, log, macs = _run(caplog, model, x, 2, True)
    assert "region-limited passes" in log, log
    b, _, full = _run(caplog, model, x, 2, False)
    assert macs < 0.9 * full, (macs, full)
    ref = _captum(model, x, 2)
    with torch.no_grad():
        s = float(_logits(model, x).abs().max())
    assert float((a - ref).abs().max()) <= 1e-5 * (1 + s) and float((a - b).abs().max()) <= 1e-5 * (1 + s)


class _Scores(dict):
    """A dict whose constructor takes the scores alone (not its items): the trace cannot rebuild it."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__(scores=scores)

    @property
    def scores(self) -> torch.Tensor:
        return self["scores"]


class _Odd(_Net):
    def forward(self, x: torch.Tensor, **kwargs):
        return _Scores(self.head(self.body(x).mean((2, 3))))


def test_an_output_type_it_cannot_rebuild_falls_back_with_the_reason(caplog):
    """The same maps (full passes), the reason in the debug line; a key still reads the plain dict."""
    model = select_output(_Odd().eval(), lambda o: o.scores)
    x = torch.randn(1, 3, 32, 32)
    a, log, _ = _run(caplog, model, x, 1, True)
    assert "full passes" in log and "_Scores back as a plain dict" in log, log
    b, _, _ = _run(caplog, model, x, 1, False)
    assert torch.equal(a, b)
    _, log, _ = _run(caplog, select_output(model, "scores"), x, 1, True)
    assert "region-limited passes" in log, log
