"""Score-CAM and RISE memory under bf16 on a CPU (issue 15, session 43): the folded copy held in the passes'
precision (no float32 copy of all the weights, nor autocast's casts of one), the model's own kept casts dropped
once the folded copy runs, and nothing small kept per CPU chunk (a few small tensors kept per chunk between its
freed activations split glibc's heap, whose peak then grew with the number of masks / channels)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import derived as _derived
from salience._core import engine as _engine
from salience._core import folding as _folding
from salience._core import perf as _perf


pytestmark = pytest.mark.usefixtures("fresh_perf_state")  # the folded copies made afresh in each test


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in model.modules():  # statistics of their own, so that the fold changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # bf16 on a CPU without native bf16 warns
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _float32_fold(monkeypatch) -> None:
    """The folded copy as before session 43: float32 whatever the passes' precision (autocast casts it)."""
    fold = _folding._fold
    monkeypatch.setattr(_folding, "_fold", lambda model, dtype=None: fold(model, None))


def test_bf16_folded_copy_holds_its_convolutions_and_linear_layers_in_bf16_and_nothing_of_the_model():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = _quiet(_perf.Run, model, torch.rand(1, 3, 8, 8), _perf.resolve(precision="bf16", fold_batchnorm=True),
                 tag="s43", plain_passes=True)
    folded = run._folded
    assert folded is not None
    kinds = {type(m).__name__: {p.dtype for p in m.parameters(recurse=False)} for m in folded.modules()
             if any(True for _ in m.parameters(recurse=False))}
    assert kinds == {"Conv2d": {torch.bfloat16}, "Linear": {torch.bfloat16}}  # the BatchNorms folded away
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not own & {t.untyped_storage().data_ptr() for t in (*folded.parameters(), *folded.buffers())}
    assert all(not p.requires_grad for p in folded.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model as it was
    assert all(p.requires_grad for p in model.parameters())
    # the float32 fold, cast as autocast casts it: the same bf16 values
    ref, _ = _folding.folded_model(model)
    for (name, p), q in zip(ref.named_parameters(), folded.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_a_fp32_run_keeps_its_float32_folded_copy():
    run = _quiet(_perf.Run, _net(), torch.rand(1, 3, 8, 8), _perf.resolve(fold_batchnorm=True), tag="s43")
    assert {p.dtype for p in run._folded.parameters()} == {torch.float32}


@pytest.mark.parametrize("method", ["scorecam", "rise"])
def test_maps_with_the_bf16_folded_copy_are_those_of_the_float32_one(method, monkeypatch):
    model, x = _net(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    kwargs = dict(layer="3") if method == "scorecam" else dict(masks=12)
    opts = dict(precision="bf16", memory_format="channels_last", fold_batchnorm=True)

    def call():
        with salience.performance(**opts):
            return _quiet(getattr(salience, method), model, x, target=[1, 3], chunk=4, **kwargs)

    now = call()
    _perf.clear_cache()
    _float32_fold(monkeypatch)
    assert torch.equal(now, call())  # bit for bit: autocast's cast of the float32 fold is what the copy holds


def test_the_model_s_kept_casts_are_dropped_once_when_the_folded_copy_runs():
    model, x = _net().requires_grad_(False), torch.rand(1, 3, 8, 8)  # frozen, as the guard has it in a call
    run = _quiet(_perf.Run, model, x, _perf.resolve(precision="bf16", fold_batchnorm=True), tag="s43",
                 plain_passes=True)
    weight = next(model.parameters())
    with run.casts_kept():
        cache = run._casts
        assert cache is not None
        cache.get(weight)  # the probing pass's cast of the model's own weight
        run.folded_now()  # the final softmax not yet known: the model itself may run again
        assert len(cache.copies) == 1
        run.note_softmax(False)
        run.folded_now()
        assert cache.copies == {}  # dropped: the folded copy runs every pass from now on
        cache.get(weight)
        run.folded_now()
        assert len(cache.copies) == 1  # once a run


def _held(scope: _derived.Derived) -> int:
    """The tensors the scope holds for its refusal of NaN scores."""
    held = [t for v in scope._scores.values() for note in v for t in note if isinstance(t, torch.Tensor)]
    return len(held) + sum(3 for _ in scope._cpu.values())


def test_cpu_passes_keep_no_tensor_each_for_the_refusal():
    counts = []
    for passes in (3, 300):
        scope = _derived.Derived()
        scope.levels.append((0, 2))
        for _ in range(passes):
            scope.note_scores("finite:scores", torch.zeros(6, 2, dtype=torch.bool), [None, None])
        counts.append(_held(scope))
    assert counts[0] == counts[1]


def test_the_refusal_still_names_the_images_and_classes():
    scope = _derived.Derived()
    bad = torch.zeros(6, 2, dtype=torch.bool)
    bad[4, 1] = True  # item 4 of the chunk starting at item 10 of 4 images: item 14, image 2
    scope.levels.append((10, 4))  # the engine's chunk (chunk_items)
    scope.note_scores("finite:scores", torch.zeros(6, 2, dtype=torch.bool), [None, None])
    scope.note_scores("finite:scores", bad, [None, None])
    saved = scope.snapshot()
    scope.note_scores("finite:scores", torch.ones(6, 2, dtype=torch.bool), [None, None])
    scope.restore(saved)  # a pass thrown away refuses nothing
    assert scope.bad_images("finite:scores") == ([(2, 1, None)], 4)


def test_score_cam_keeps_no_scores_per_chunk(monkeypatch):
    kept = []
    add = _engine._Adder.add

    def spy(self, start, result):
        kept.append(isinstance(result, tuple))
        add(self, start, result)

    monkeypatch.setattr(_engine._Adder, "add", spy)
    model, x = _net(), torch.rand(2, 3, 16, 16)
    salience.scorecam(model, x, target=1, layer="3", chunk=2)
    assert kept and not any(kept)


def test_score_cam_and_rise_refuse_nan_scores_still():
    model = _net()
    model[-1].bias.data[1] = float("nan")
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(salience.SalienceError, match="NaN or infinite"):
        salience.rise(model, x, target=1, masks=4, chunk=2)
    with pytest.raises(salience.SalienceError, match="NaN or infinite"):
        salience.scorecam(model, x, target=1, layer="3", chunk=2)
