"""Session 46, issue 19 where ``memory_format="auto"`` declines: the CPU gradient chunk chosen per model from numbers
that are the same in every process (docs/performance.md, "Session 46: where auto declines").

A CPU gradient pass takes at most ``engine.CPU_GRADIENT_CHUNK`` (16) items, or ``CPU_GRADIENT_CHUNK_WEIGHTY`` (32)
where the model's parameters weigh at least 16 items' bytes by the memory probe (``engine.gradient_chunk_cap``):
every pass reads all the weights, and on such a model (resnet18 at 64 px) a pass of 32 ran faster per item. Before,
16 on every model (resnet18's integrated gradients of one image: 16 + 16).
Since session 60 the weights need weigh only 8 items' bytes, and passes of small items take up to 64
(tests/test_s60_chunk.py).
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf
import test_s45_chunks as _s45


sums_seen = _s45.sums_seen  # the fixture: the Sums of every accumulate a method runs, in call order


def _probed_bytes(model: torch.nn.Module, size: int) -> int:
    """The memory probe's bytes per item for SmoothGrad's gradient passes of one ``size`` px image (a cold call of one
    sample: the probe's pass, then the one item)."""
    _perf.clear_cache()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    salience.smoothgrad(model, x, 0, samples=1, reduce=None)
    got = [rec.probes[1] for rec in _perf._records.values() if rec.model() is model and 1 in rec.probes]
    assert len(got) == 1, got
    return got[0]


def test_weight_bytes_are_the_parameters_bytes_each_counted_once():
    """torchvision's published parameter counts (resnet18 11,689,512; resnet50 25,557,032) at 4 bytes each, and a
    weight shared by two layers counted once (tied embeddings)."""
    assert _engine.weight_bytes(torchvision.models.resnet18()) == 4 * 11_689_512
    assert _engine.weight_bytes(torchvision.models.resnet50()) == 4 * 25_557_032
    a, b = torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10, bias=False)
    b.weight = a.weight
    assert _engine.weight_bytes(torch.nn.Sequential(a, b)) == 4 * 100
    assert _engine.weight_bytes(torch.nn.Sequential(a, b).double()) == 8 * 100


def test_gradient_chunk_cap_at_the_border():
    """32 from CPU_WEIGHTY_ITEMS (8; 16 before session 60) items' bytes up to the weights' (at the border too), 16
    below; 16 without a probe's figure. Items of 4 MiB: too big for the small-pass rule (24 MiB hold 6 of them)."""
    per_item = 4 << 20
    w = _engine.CPU_WEIGHTY_ITEMS * per_item
    assert _engine.CPU_WEIGHTY_ITEMS == 8
    assert _engine.gradient_chunk_cap(per_item, w) == _engine.CPU_GRADIENT_CHUNK_WEIGHTY == 32
    assert _engine.gradient_chunk_cap(per_item + 1, w) == _engine.CPU_GRADIENT_CHUNK == 16
    assert _engine.gradient_chunk_cap(None, w) == 16


@pytest.mark.parametrize("total, cap, limit, size", [
    (32, 1000, 32, 32),   # one chunk
    (64, 1000, 32, 32),
    (48, 1000, 32, 24),   # 24 + 24, not 32 + 16
    (32, 20, 32, 16),     # the budget's 20: 16 + 16
    (32, 1000, 16, 16),   # the default limit
])
def test_planned_chunk_under_a_limit(total, cap, limit, size):
    assert _engine.planned_chunk(total, cap, torch.device("cpu"), False, limit) == size
    assert _engine.planned_chunk(total, cap, torch.device("cuda"), False, limit) == cap  # the budget's, on CUDA


@pytest.mark.parametrize("name, size, cap", [
    ("resnet18", 64, 32),   # 46.8 MB of weights, 1.9 MB an item
    ("resnet50", 224, 16),  # 102 MB of weights, 87 MB an item
    ("vit_b_16", 112, 32),  # 346 MB of weights, 20.2 MB an item
    ("shapes", 64, 16),     # the demo CNN: 0.2 MB of weights, 1.4 MB an item
])
def test_the_rule_on_the_models_measured(name, size, cap):
    """The cap each model of session 46's table gets, from its real probe (the sizes the benchmark timed)."""
    torch.manual_seed(0)
    if name == "shapes":
        from salience.demo.zoo import load_demo
        model = load_demo("shapes").eval()
    else:
        kw = {"image_size": size} if name.startswith("vit_") else {}
        model = getattr(torchvision.models, name)(**kw).eval()
    assert _engine.gradient_chunk_cap(_probed_bytes(model, size), _engine.weight_bytes(model)) == cap


def test_a_weighty_model_runs_its_32_items_in_one_pass_and_keeps_its_bits(sums_seen):
    """resnet18 at 64 px, integrated gradients' 32 steps of one image: one chunk of 32 in the cold call (after the
    probe's thrown-away pass) and in the warm one, the same bits; the map equals one of chunk=32 given by hand (the same
    passes) and is within float rounding of the 16 + 16 the rule replaced. Old code: [16, 16]."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _perf.clear_cache()
    cold = salience.integrated_gradients(model, x, 7, steps=32, reduce=None)
    warm = salience.integrated_gradients(model, x, 7, steps=32, reduce=None)
    assert [s.chunks for s in sums_seen] == [[32], [32]]
    assert torch.equal(cold, warm)
    assert torch.equal(cold, salience.integrated_gradients(model, x, 7, steps=32, reduce=None, chunk=32))
    halves = salience.integrated_gradients(model, x, 7, steps=32, reduce=None, chunk=16)
    assert sums_seen[-1].chunks == [16, 16]
    torch.testing.assert_close(cold, halves, rtol=1e-4, atol=1e-6 * float(halves.abs().max()))
