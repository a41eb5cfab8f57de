"""Score-CAM and RISE under bf16 on a CPU (issue 15, session 42): the chunk's budget under an autocast, the folded
copy converted to channels-last in place (no contiguous copy of its weights held beside), the model's own weights
left as they are once the folded copy runs the passes, a channels-last probe, and Score-CAM's masked images in one
reused buffer."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience.methods.scorecam import _ChannelMasks


@pytest.fixture(autouse=True)
def _fresh():
    _perf.clear_cache()
    yield
    _perf.clear_cache()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _run(model: nn.Module, x: torch.Tensor, **options) -> _perf.Run:
    with warnings.catch_warnings():  # bf16 on a CPU without native bf16 warns
        warnings.simplefilter("ignore")
        return _perf.Run(model, x, _perf.resolve(**options), tag="s42", plain_passes=True)


def test_runs_of_score_cam_and_rise_say_their_passes_are_plain(monkeypatch):
    made = []
    init = _perf.Run.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("plain_passes", False))
        init(self, *args, **kwargs)

    monkeypatch.setattr(_perf.Run, "__init__", spy)
    model, x = _net(), torch.rand(1, 3, 16, 16)
    salience.rise(model, x, target=0, masks=2)
    salience.scorecam(model, x, target=0, layer="3")
    assert made == [True, True]


def test_low_precision_budget_is_half_the_inference_budget():
    cpu = torch.device("cpu")
    assert _engine.default_budget(cpu, inference=True, low_precision=True) == min(
        _engine.default_budget(cpu), _engine.CPU_LOW_PRECISION_BUDGET)
    assert _engine.CPU_LOW_PRECISION_BUDGET == _engine.CPU_INFERENCE_BUDGET // 2
    assert _engine.default_budget(cpu, inference=True) == min(_engine.default_budget(cpu),
                                                              _engine.CPU_INFERENCE_BUDGET)


def test_chunks_under_bf16_take_the_low_precision_budget():
    """4 MiB per item by the probe: 12 items a chunk under bf16 (0.8 * 64 MiB), 25 in fp32 (0.8 * 128 MiB)."""
    model, x = _net(), torch.rand(1, 3, 8, 8)

    def compute(start: int, stop: int) -> torch.Tensor:
        torch.empty(stop - start, 1 << 20).fill_(1)  # 4 MiB an item, seen by the memory probe
        return torch.ones(stop - start, 2)

    chunks = {}
    for precision in ("bf16", "fp32"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = _perf.Run(model, x, _perf.resolve(precision=precision), tag="s42")
        sums = _engine.accumulate(compute, 60, 1, device=torch.device("cpu"), inference=True, run=run)
        chunks[precision] = max(sums.chunks[1:])
    assert chunks == {"bf16": 12, "fp32": 25}


def test_folded_copy_goes_channels_last_in_place_and_the_model_stays():
    model, x = _net(), torch.rand(2, 3, 8, 8)
    run = _run(model, x, memory_format="channels_last", fold_batchnorm=True)
    folded = run._folded
    assert folded is not None
    own = {id(p): p.data.data_ptr() for p in model.parameters()}
    run.note_softmax(False)  # the first, eager pass found no final softmax: the folded copy runs the passes
    with run.chunk(True, False):
        convs = [p for p in folded.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        # no contiguous copy of the folded weights is held beside (data None: converted in place)
        assert all(data is None for p, data in run._saved if any(p is q for q in convs))
        # the model's own weights are not converted (the folded copy runs every pass)
        assert {id(p): p.data.data_ptr() for p in model.parameters()} == own
    run.close()
    assert all(p.is_contiguous() for p in folded.parameters())
    assert {id(p): p.data.data_ptr() for p in model.parameters()} == own


def test_probe_runs_channels_last_without_fold(monkeypatch):
    model, x = _net(), torch.rand(2, 3, 16, 16)
    got = []
    accumulate = _engine.accumulate

    def spy(*args, **kwargs):
        got.append(accumulate(*args, **kwargs))
        return got[-1]

    monkeypatch.setattr(_engine, "accumulate", spy)
    salience.rise(model, x, target=0, masks=6, memory_format="channels_last")
    assert got[0].layouts[0] == "channels_last"  # was "contiguous": the model's parameters converted after it


def test_scorecam_masked_images_reuse_one_buffer():
    torch.manual_seed(1)
    x, acts = torch.rand(2, 3, 16, 16), torch.rand(2, 4, 4, 4)
    items = _ChannelMasks(x, acts, False)
    first, owner_a = items.masked(torch.tensor([0, 1, 2, 3]))
    mask, owner = items(torch.tensor([0, 1, 2, 3]))
    assert torch.equal(first, x[owner] * mask)
    ptr = first.data_ptr()
    del first  # a buffer still held is not overwritten (tests/test_s42_rv_cam15.py)
    again, _ = items.masked(torch.tensor([4, 5, 6]))
    mask, owner = items(torch.tensor([4, 5, 6]))
    assert again.data_ptr() == ptr and torch.equal(again, x[owner] * mask)


@pytest.mark.parametrize("method", ["scorecam", "rise"])
def test_model_stays_when_the_folded_copy_runs_every_pass_keeping_the_softmax(monkeypatch, method):
    """``strip_softmax=False`` with ``fold_batchnorm`` and channels-last: the folded copy runs every pass from the
    first (no softmax to look for), so the model's own weights are left as they are in every chunk (they were
    converted, a second channels-last copy, because the run waited for a softmax check that path never makes); the
    maps are those of the same folded passes in the contiguous layout."""
    model, x = _net(), torch.rand(2, 3, 16, 16)
    own = {id(p): p.data.data_ptr() for p in model.parameters()}
    seen, layouts = [], []
    set_layout, accumulate = _perf.Run.set_layout, _engine.accumulate

    def spy(self, channels_last):
        set_layout(self, channels_last)
        seen.append({id(p): p.data.data_ptr() for p in model.parameters()})

    def recording(*args, **kwargs):
        sums = accumulate(*args, **kwargs)
        layouts.extend(sums.layouts)
        return sums

    monkeypatch.setattr(_perf.Run, "set_layout", spy)
    monkeypatch.setattr(_engine, "accumulate", recording)
    options = dict(strip_softmax=False, chunk=4)
    fn = {"scorecam": lambda **o: salience.scorecam(model, x, target=1, layer="3", **o),
          "rise": lambda **o: salience.rise(model, x, target=1, masks=6, seed=0, **o)}[method]

    def call(**o):
        with salience.performance(fold_batchnorm=True):
            return fn(**o)

    maps = call(memory_format="channels_last", **options)
    assert layouts and all(lay == "channels_last folded" for lay in layouts)  # each chunk: folded, channels-last
    assert seen and all(s == own for s in seen)  # the model's own weights never converted
    assert {id(p): p.data.data_ptr() for p in model.parameters()} == own
    monkeypatch.setattr(_perf.Run, "set_layout", set_layout)
    torch.testing.assert_close(maps, call(memory_format="contiguous", **options), rtol=1e-5, atol=1e-6)
