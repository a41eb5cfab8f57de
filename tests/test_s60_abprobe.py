"""Issue 15: Ablation-CAM's probing chunk runs in the call's forced channels-last layout (session 60).

Ablation-CAM's passes are hooked (``Run(plain_passes=False)``), and ``Run.probe_layout`` gave channels-last to plain
runs only: under ``memory_format="channels_last"`` its first, probing chunk ran contiguous (its bf16 weight copies made
once more, a contiguous bf16 pass about twice a channels-last one's time on resnet50) before every later chunk ran
channels-last. On the base commit (11f8b705) ``test_every_chunk_runs_channels_last`` fails for both ``chunks`` modes
(the probing chunk's passes are contiguous); the others pass there too: they pin what the change must keep (the
model's parameters back exactly, strides included, after a chunk raised; one map whatever the chunking).
"""
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import salience
from salience._core import perf as _perf


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _channels_last(t: torch.Tensor) -> bool:
    """Strided as channels-last and not also as contiguous (a (n, 1, 1, 1) tensor is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@contextmanager
def _chunks_seen(model: nn.Module):
    """Yield a list of ``(in an engine chunk, input channels-last)`` for every pass through ``model[4]`` (after the
    ablated layer ``model[2]``); "in an engine chunk": inside :meth:`salience._core.perf.Run.chunk` (the probing chunk,
    thrown away or not, and the planned ones), not the clean passes nor the sharing check."""
    seen: list[tuple[bool, bool]] = []
    depth = [0]
    orig = _perf.Run.chunk

    @contextmanager
    def chunk(self, channels_last, compiled):
        with orig(self, channels_last, compiled):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    handle = model[4].register_forward_pre_hook(lambda m, a: seen.append((depth[0] > 0, _channels_last(a[0]))))
    _perf.Run.chunk = chunk
    try:
        yield seen
    finally:
        _perf.Run.chunk = orig
        handle.remove()


@pytest.mark.parametrize("chunks", ["memory", "throughput"])
def test_every_chunk_runs_channels_last(chunks):
    """Each pass of every chunk, the probing one included, reads channels-last input at the layer after the ablated
    one (fails on the base: the probing chunk's are contiguous)."""
    model, x = _model(), _x()
    _perf.clear_cache()  # a first call: the memory probe runs
    with warnings.catch_warnings(), salience.performance(chunks=chunks), _chunks_seen(model) as seen:
        warnings.simplefilter("ignore")
        salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
    in_chunks = [cl for chunk, cl in seen if chunk]
    assert len(in_chunks) >= 2  # the probe's pass and at least one planned chunk's
    assert all(in_chunks), in_chunks


def _params(model: nn.Module) -> list[tuple[str, nn.Parameter, tuple, torch.Tensor, bool]]:
    return [(n, p, p.stride(), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]


def _same(model: nn.Module, before: list) -> None:
    after = dict(model.named_parameters())
    assert list(after) == [b[0] for b in before]
    for name, p, stride, values, grad in before:
        q = after[name]
        assert q is p, name
        assert q.stride() == stride, (name, q.stride(), stride)
        assert q.is_contiguous(), name
        assert q.dtype == torch.float32 and torch.equal(q.detach(), values), name
        assert q.requires_grad == grad, name


@pytest.mark.parametrize("chunks", ["memory", "throughput"])
def test_parameters_back_exactly_after_a_chunk_raised(chunks):
    """A pass that raises inside the probing chunk (now channels-last: ``Run.set_layout`` moved the parameters) leaves
    every parameter the object, strides, dtype and values it was; the model's next call gives the map of a fresh one."""
    model, x = _model(), _x()
    before = _params(model)
    _perf.clear_cache()

    def boom(m, a):
        if _channels_last(a[0]):
            raise RuntimeError("boom in a channels-last pass")

    handle = model[4].register_forward_pre_hook(boom)
    try:
        with warnings.catch_warnings(), salience.performance(chunks=chunks):
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="boom in a channels-last pass"):
                salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
    finally:
        handle.remove()
    _same(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
        fresh_model = _model()
        _perf.clear_cache()
        fresh = salience.ablationcam(fresh_model, x, 1, layer=fresh_model[2], precision="bf16",
                                     memory_format="channels_last")
    _same(model, before)
    assert torch.equal(again, fresh)


def test_parameters_back_exactly_after_a_call():
    model, x = _model(), _x(3)
    before = _params(model)
    for chunks in ("memory", "throughput"):
        _perf.clear_cache()
        with warnings.catch_warnings(), salience.performance(chunks=chunks):
            warnings.simplefilter("ignore")
            salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
        _same(model, before)


def test_chunking_does_not_change_the_map():
    """One item a pass three ways: ``chunk=1`` (no probe), the default plan under a 1-byte budget (its probe a pass of
    its own, thrown away), and ``chunks="throughput"`` under that budget, whose first chunk is the probe's (one item
    per image: two items of two images, one row each, as one pass per item runs them): every pass in the same
    layout, so the same scores, the same map."""
    model, x = _model(), _x()
    kw = dict(layer=model[2], precision="bf16", memory_format="channels_last")
    maps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _perf.clear_cache()
        maps.append(salience.ablationcam(model, x, 1, chunk=1, **kw))
        _perf.clear_cache()
        maps.append(salience.ablationcam(model, x, 1, max_memory=1, **kw))
        _perf.clear_cache()
        with salience.performance(chunks="throughput"):
            maps.append(salience.ablationcam(model, x, 1, max_memory=1, **kw))
    assert torch.isfinite(maps[0]).all() and maps[0].abs().amax() > 0
    for m in maps[1:]:
        assert torch.equal(m, maps[0])


def test_contiguous_and_auto_probe_unchanged():
    """The probing chunk of a contiguous call stays contiguous (no parameter moved), and ``"auto"`` probes contiguous
    before it times both layouts (its rule's own probe chunks, two a layout)."""
    model, x = _model(), _x()
    for fmt in ("contiguous", "auto"):
        _perf.clear_cache()
        with warnings.catch_warnings(), _chunks_seen(model) as seen:
            warnings.simplefilter("ignore")
            salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format=fmt)
        in_chunks = [cl for chunk, cl in seen if chunk]
        assert in_chunks and not in_chunks[0], (fmt, in_chunks)
        if fmt == "contiguous":
            assert not any(in_chunks)


def test_clean_scores_run_in_the_chunks_layout():
    """The bf16 clean scores ``S`` (the passes outside the chunks at the call's precision) read channels-last input at
    the layer after the ablated one, as every ``S_k`` does (fails on the base and with the probe change alone: ``S``
    ran contiguous)."""
    model, x = _model(), _x(3)
    _perf.clear_cache()
    with warnings.catch_warnings(), _chunks_seen(model) as seen:
        warnings.simplefilter("ignore")
        handle = model[4].register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype))
        dtypes: list = []
        try:
            salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
        finally:
            handle.remove()
    outside = [cl for (chunk, cl), dt in zip(seen, dtypes) if not chunk and dt == torch.bfloat16]
    assert outside and all(outside), outside


def test_weights_cast_once_a_call():
    """One bf16 copy of each served weight for the whole call, probe included (fails on the base: three, made for the
    clean scores, in the contiguous probing chunk and at the first channels-last chunk; two with the probe change
    alone)."""
    from torch.profiler import ProfilerActivity, profile

    model, x = _model(), _x()
    _perf.clear_cache()  # the memory probe runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
    n = sum(e.count for e in p.key_averages(group_by_input_shape=True)
            if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0] == [16, 8, 3, 3])
    assert n == 1, n


@pytest.mark.parametrize("where", ["clean", "check"])
def test_parameters_back_after_an_error_before_the_chunks(where):
    """An error in the clean scores' pass (channels-last now) or in the sharing check after it, before any chunk:
    every parameter back exactly."""
    model, x = _model(), _x()
    before = _params(model)
    _perf.clear_cache()

    def boom(m, a):
        bf16 = a[0].dtype == torch.bfloat16
        seen.append((bf16, a[0].shape[0]))
        # the check: its shared pass (two rows, whose error it takes for a rest that cannot share), then its pass per
        # item (two rows, fp32 where the model is), whose error is the model's
        if (where == "clean" and bf16) or (where == "check" and seen.count((False, 2)) == 2):
            raise RuntimeError("boom before the chunks")

    seen: list = []
    handle = model[4].register_forward_pre_hook(boom)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="boom before the chunks"):
                salience.ablationcam(model, x, 1, layer=model[2], precision="bf16", memory_format="channels_last")
    finally:
        handle.remove()
    _same(model, before)
