"""Session 46: compiled fp32 passes (issue 19's 0.85x): what a compiled call compiles, chunk to chunk and call to call."""
from __future__ import annotations

import warnings

import pytest
import torch

import salience
from salience._core import perf as _perf

from conftest import snapshot_freezing, unchanged
from test_s45_compile import RTOL, _chunks_seen, _net, _rel


@pytest.fixture(autouse=True)
def _fresh_cache():
    _perf.clear_cache()
    yield
    _perf.clear_cache()


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_compile_freeze_in_both_layouts_alternated_compiles_one_graph_per_layout(monkeypatch, method):
    """The benchmark's use (benchmarks/compile_s46.py): ``compile="freeze"`` in the default layout and with
    ``memory_format="channels_last"`` called in turn on one model. Each layout's frozen gradient graph is compiled
    once (its first call) and kept: the two share the model's frozen entry (the same weights' state, taken before the
    run converts the weights) and dynamo guards the input's strides, so no later call and no chunk compiles again,
    every chunk of a later call runs frozen, and the maps are the eager ones within RTOL. Were the layouts' graphs
    to evict each other (the entry keyed by the converted weights), every call would compile (on resnet50 a minute
    or more)."""
    torch._dynamo.reset()
    compiles = snapshot_freezing(monkeypatch)
    model = _net()
    x = torch.rand(2, 3, 8, 8)
    seen = _chunks_seen(monkeypatch)

    def call(**options):
        with salience.performance(**options):
            if method == "smoothgrad":
                return salience.smoothgrad(model, x, [1, 3], samples=4, reduce=None, seed=0)
            return salience.integrated_gradients(model, x, [1, 3], steps=4, reduce=None)

    ref = call()
    layouts = {"contiguous": dict(compile="freeze"),
               "channels_last": dict(compile="freeze", memory_format="channels_last")}
    try:
        counts = []
        for _ in range(3):
            for name, options in layouts.items():
                with unchanged(model), warnings.catch_warnings():
                    warnings.simplefilter("error")
                    out = call(**options)
                counts.append(len(compiles))
                assert _rel(out, ref) <= RTOL, name
                assert seen[-1][1] == [f"{name} compiled frozen"] * 2, seen[-1]
        assert counts == [1, 2, 2, 2, 2, 2], counts
    finally:
        torch._dynamo.reset()
