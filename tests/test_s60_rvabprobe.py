"""Review of issue 15's probing chunk (session 60): Ablation-CAM's plan under a forced channels-last layout.

With the probing chunk channels-last (``Run.probe_layout``), the engine's memory probe of Ablation-CAM (a shared pass
of two items of one image) counted the pass's own channels-last copy of its image row, half a row per item: the plan
was smaller than a contiguous call's (resnet50 at 64 px, ``layer1.0.conv1``, 2 images, fp32: 126 + 2 items against
128, the map 8.3e-7 off main's). ``_Ablated`` now holds the images once in the forced layout, made before the probe.
On the branch before this fix ``test_ablation_probe_and_plan_do_not_depend_on_the_forced_layout`` fails (per item
864 bytes more, 14 + 2 items against 16); the other tests pass there too: they pin what the change must keep (the
parameters back exactly after an error or a Ctrl-C at every new channels-last point, gradient methods included; every
chunk of a forced channels-last call channels-last, the first one under ``chunks="throughput"`` too).
"""
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import salience
from salience._core import engine as _engine
from salience._core import perf as _perf


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@contextmanager
def _recorded(monkeypatch):
    """Yield ``(probes, plans)``: each memory probe's bytes per item, and each engine call's chunk sizes and
    layouts."""
    probes: list[int] = []
    plans: list[tuple[list[int], list[str]]] = []
    probed, result = _perf.Run.probed, _engine._Adder.result

    def probed_(self, per_item, n_images, block=None):
        probes.append(per_item)
        return probed(self, per_item, n_images, block)

    def result_(self, per_item, run):
        plans.append((list(self.sizes), list(run.layouts) if run is not None else []))
        return result(self, per_item, run)

    monkeypatch.setattr(_perf.Run, "probed", probed_)
    monkeypatch.setattr(_engine._Adder, "result", result_)
    yield probes, plans


def _ablation(model, x, fmt, **kw):
    _perf.clear_cache()  # a first call: the memory probe runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.ablationcam(model, x, 1, layer=model[2], memory_format=fmt, **kw)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ablation_probe_and_plan_do_not_depend_on_the_forced_layout(monkeypatch, precision):
    """The memory probe measures as many bytes an item under a forced channels-last layout as under a contiguous one
    (the same activations in another order), so under a budget that fits the 16 items exactly both run one chunk of
    16 (fails before the fix: 864 bytes an item more, the input row's copy, and 14 + 2 items)."""
    model, x = _model(), _x()
    with _recorded(monkeypatch) as (probes, plans):
        _ablation(model, x, "contiguous", precision=precision)
        per_item = probes[-1]
        budget = math.ceil(16 * per_item / 0.8)  # engine.chunk_size: 80% of the budget for the chunk
        _ablation(model, x, "contiguous", precision=precision, max_memory=budget)
        _ablation(model, x, "channels_last", precision=precision, max_memory=budget)
    assert probes[-1] == probes[-2] == per_item
    (ct_sizes, ct_layouts), (cl_sizes, cl_layouts) = plans[-2:]
    assert ct_sizes == cl_sizes == [16]
    assert ct_layouts == ["contiguous"] and cl_layouts == ["channels_last"]


def test_ablation_fp32_map_as_a_fixed_plan_gives():
    """fp32 under a forced channels-last layout: the planned call's map is the map of the same chunks given by hand
    (``chunk=16``, no probe): the plan is the contiguous probe's, every chunk channels-last."""
    model, x = _model(), _x()
    planned = _ablation(model, x, "channels_last")
    fixed = _ablation(model, x, "channels_last", chunk=16)
    assert torch.isfinite(planned).all() and planned.abs().amax() > 0
    assert torch.equal(planned, fixed)


def _state(model: nn.Module) -> list:
    return [(n, p, p.stride(), p.dtype, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]


def _same(model: nn.Module, before: list) -> None:
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [b[0] for b in before]
    for (name, p, stride, dtype, values, grad), (_, q) in zip(before, after):
        assert q is p and q.stride() == stride and q.is_contiguous() and q.dtype == dtype, name
        assert torch.equal(q.detach(), values) and q.requires_grad == grad, name


_CALLS = {
    "ablationcam": lambda m, x: salience.ablationcam(m, x, 1, layer=m[2]),
    "smoothgrad": lambda m, x: salience.smoothgrad(m, x, 1, samples=4, seed=0),
    "integrated_gradients": lambda m, x: salience.integrated_gradients(m, x, 1, steps=4),
}


@pytest.mark.parametrize("method", sorted(_CALLS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_parameters_back_after_an_error_at_every_pass(method, precision, error):
    """An error or a Ctrl-C raised in the model's n-th pass, for every n up to the call's last (the clean passes, the
    bf16 clean scores now in the chunks' layout, the sharing check, the probing chunk now channels-last for gradient
    methods too, the chunks): every parameter is back, the same object, strides, dtype, values and ``requires_grad``,
    and the next call gives a fresh model's map."""
    x = _x()
    options = dict(precision=precision, memory_format="channels_last")

    def call(model: nn.Module, nth: int) -> int:
        """The method on ``model`` with ``error`` raised in its ``nth`` pass through ``model[4]`` (0: none); the
        number of passes."""
        calls = [0]

        def boom(m, a):
            calls[0] += 1
            if calls[0] == nth:
                raise error("boom")

        handle = model[4].register_forward_pre_hook(boom)
        _perf.clear_cache()
        try:
            with warnings.catch_warnings(), salience.performance(**options):
                warnings.simplefilter("ignore")
                try:
                    _CALLS[method](model, x)
                except error:
                    pass  # a RuntimeError in Ablation-CAM's shared pass is taken for a rest that cannot share
        finally:
            handle.remove()
        return calls[0]

    passes = call(_model(), 0)
    assert passes >= 2  # the probe and a chunk at least
    for nth in range(1, passes + 1):
        model = _model()
        before = _state(model)
        call(model, nth)
        _same(model, before)
    with warnings.catch_warnings(), salience.performance(**options):
        warnings.simplefilter("ignore")
        again = _CALLS[method](model, x)
        _perf.clear_cache()
        fresh = _CALLS[method](_model(), x)
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_gradient_methods_every_chunk_channels_last_under_throughput(monkeypatch, method):
    """Under ``chunks="throughput"`` the first chunk is the memory probe's, real work: with a forced channels-last
    layout it runs channels-last as every later chunk (contiguous on the base: its maps from other kernels)."""
    model, x = _model(), _x()
    with _recorded(monkeypatch) as (_, plans):
        _perf.clear_cache()
        with warnings.catch_warnings(), salience.performance(chunks="throughput", memory_format="channels_last"):
            warnings.simplefilter("ignore")
            _CALLS[method](model, x)
    sizes, layouts = plans[-1]
    assert len(layouts) == len(sizes) >= 2
    assert set(layouts) == {"channels_last"}, layouts
