"""The user's model comes back exactly as it was: after success, an exception, or Ctrl-C."""
from __future__ import annotations

import collections
import copy
import dis
import gc
import os
import re
import signal
import sys
import threading
import types
from contextlib import contextmanager
from typing import Optional

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets
from salience._core.guard import model_guard

from conftest import SmallCNN, assert_same_snapshot, model_snapshot, unchanged


@contextmanager
def interrupted_on_pass(module: nn.Module, n: int = 1):
    """Ctrl-C (``KeyboardInterrupt``) raised from ``module``'s ``n``-th forward call inside the block,
    which must end by it; the hook is removed afterwards whatever happens."""
    calls = []

    def hook(mod, inp, out):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt

    handle = module.register_forward_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        handle.remove()


def _train_mode_with_grads(m: nn.Module) -> None:
    m.train()
    m.head.eval()  # a mixed state must come back mixed
    m.features[0].weight.requires_grad_(False)
    m.head.weight.grad = torch.ones_like(m.head.weight)


def test_success_leaves_model_unchanged(small_cnn):
    _train_mode_with_grads(small_cnn)
    x = torch.rand(4, 3, 8, 8)
    with unchanged(small_cnn):
        salience.vanilla(small_cnn, x)
        salience.vanilla(small_cnn, x, targets.activation("features.3", 1))
        salience.vanilla(small_cnn, x, targets.multilabel([0, 1]), reduce="colored")


def test_batchnorm_statistics_not_updated_and_samples_not_mixed(small_cnn):
    small_cnn.train()
    bn = small_cnn.features[1]
    mean0 = bn.running_mean.clone()
    batches = bn.num_batches_tracked.clone()
    x = torch.rand(4, 3, 8, 8)
    a = salience.vanilla(small_cnn, x)
    b = salience.vanilla(small_cnn, x[:1])
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.num_batches_tracked, batches)
    assert torch.allclose(a[:1], b, atol=1e-6)
    assert small_cnn.training and bn.training


class Boom(Exception):
    pass


def _exploding_target(exc):
    def fn(out):
        raise exc

    return fn


@pytest.mark.parametrize("exc", [Boom("midway"), KeyboardInterrupt()])
def test_exception_midway_leaves_model_unchanged(small_cnn, exc):
    _train_mode_with_grads(small_cnn)
    with unchanged(small_cnn):
        with pytest.raises(type(exc)):
            salience.vanilla(small_cnn, torch.rand(2, 3, 8, 8), _exploding_target(exc))


def test_exception_inside_forward_leaves_model_unchanged(small_cnn):
    _train_mode_with_grads(small_cnn)

    with unchanged(small_cnn), interrupted_on_pass(small_cnn.features[2]):
        salience.vanilla(small_cnn, torch.rand(2, 3, 8, 8), targets.activation("features.3", 0))


def test_validation_errors_leave_model_unchanged(small_cnn):
    _train_mode_with_grads(small_cnn)
    with unchanged(small_cnn):
        for bad in (dict(target=9), dict(target=targets.activation("nope", 0)), dict(reduce="bad")):
            with pytest.raises(SalienceError):
                salience.vanilla(small_cnn, torch.rand(2, 3, 8, 8), **bad)


def test_buffers_written_in_place_are_restored():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1  # a model that writes its own state in forward
            return self.lin(x.flatten(1))

    m = Counter()
    with unchanged(m):
        salience.vanilla(m, torch.rand(1, 3, 2, 2), 0)
    assert m.calls == 0


def test_guard_is_reentrant_and_thread_safe(small_cnn):
    small_cnn.train()
    before = model_snapshot(small_cnn)
    barrier = threading.Barrier(4)
    results, errors = {}, []

    def work(i):
        try:
            barrier.wait()
            for _ in range(5):
                with model_guard(small_cnn):
                    assert not small_cnn.training
                    results[i] = salience.vanilla(small_cnn, torch.ones(2, 3, 8, 8) * i / 4)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert small_cnn.training
    for i in range(4):
        assert torch.allclose(results[i], salience.vanilla(small_cnn, torch.ones(2, 3, 8, 8) * i / 4))
    from conftest import assert_same_snapshot

    assert_same_snapshot(before, model_snapshot(small_cnn))


def test_threads_explaining_two_models_that_share_a_backbone(small_cnn):
    """Two models with one backbone (two heads), explained from two threads whose runs overlap: the
    second entered while the first held the backbone in eval mode with frozen parameters, recorded
    that as the user's state and put it back when it left last: the backbone stayed in eval mode,
    its parameters frozen (22 of 30 free-running trials). Each module and parameter is held now,
    restored when the last guard holding it leaves."""
    backbone = small_cnn.features
    a = nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    b = nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    a.train(), b.train()
    backbone[0].weight.requires_grad_(False)  # a mixed state comes back mixed
    before = model_snapshot(b)
    x = torch.rand(2, 3, 8, 8)
    a_holds, b_holds, a_left = threading.Event(), threading.Event(), threading.Event()
    errors, maps = [], {}

    def first():
        try:
            with model_guard(a):
                maps["a"] = salience.vanilla(a, x, 0)
                a_holds.set()
                assert b_holds.wait(10)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            a_left.set()

    def second():
        try:
            assert a_holds.wait(10)
            with model_guard(b):
                b_holds.set()
                assert a_left.wait(10)  # a leaves while b still holds the backbone
                assert not backbone.training and not backbone[3].weight.requires_grad
                maps["b"] = salience.vanilla(b, x, 1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            b_holds.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    from conftest import assert_same_snapshot

    assert_same_snapshot(before, model_snapshot(b))
    assert all(m.training for m in a.modules()) and backbone[3].weight.requires_grad
    torch.testing.assert_close(maps["b"], salience.vanilla(b, x, 1))


def test_nested_guard_restores_once_at_the_end(small_cnn):
    small_cnn.train()
    with model_guard(small_cnn):
        with model_guard(small_cnn):
            assert not small_cnn.training
        assert not small_cnn.training  # still inside the outer guard
    assert small_cnn.training


def test_a_nested_guard_holds_what_the_model_gained_inside_the_outer_one(small_cnn):
    """A nested guard of the same thread only counts itself when the outer one holds the same modules and
    parameters; a module added and a parameter replaced since are its own: put in eval mode / frozen
    for its block, given back when it leaves, while the outer guard's objects stay held."""
    small_cnn.train()
    with model_guard(small_cnn):
        small_cnn.extra = nn.Dropout()
        small_cnn.head.bias = nn.Parameter(torch.zeros(4))
        with model_guard(small_cnn):
            assert not small_cnn.extra.training and not small_cnn.head.bias.requires_grad
        assert small_cnn.extra.training and small_cnn.head.bias.requires_grad
        assert not small_cnn.training and not small_cnn.head.weight.requires_grad
    assert small_cnn.training and small_cnn.head.weight.requires_grad


def test_nested_guards_left_out_of_order_hold_until_the_last_leaves(small_cnn):
    """Guards closed in another order than opened (an ExitStack, a generator): the model stays held
    while any is open and comes back when the last one leaves."""
    small_cnn.train()
    outer, inner = model_guard(small_cnn), model_guard(small_cnn)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert not small_cnn.training and not small_cnn.head.weight.requires_grad
    inner.__exit__(None, None, None)
    assert small_cnn.training and small_cnn.head.weight.requires_grad


def test_a_train_override_of_the_model_is_called_even_in_eval_mode():
    """The guard puts the model in eval mode with its own ``train()``: a class that overrides it (here
    keeping its Dropout on, Monte-Carlo dropout) is called, also when every flag is off already."""
    class KeepsDropout(nn.Sequential):
        def train(self, mode=True):
            super().train(mode)
            self[1].train(True)
            return self

    model = KeepsDropout(nn.Linear(3, 3), nn.Dropout()).eval()
    model[1].training = False
    with unchanged(model), model_guard(model):
        assert model[1].training and not model[0].training


def test_non_module_model_is_rejected():
    with pytest.raises(SalienceError, match="torch.nn.Module"):
        salience.vanilla(lambda x: x, torch.rand(1, 3, 2, 2), 0)


def test_device_mismatch_is_a_clear_error():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).to("meta")
    with pytest.raises(SalienceError, match="x is on cpu but the model is on meta"):
        salience.vanilla(m, torch.rand(1, 3, 2, 2), 0)


@pytest.mark.parametrize("name, options", [
    ("scorecam", dict(layer="features.3")), ("ablationcam", dict(layer="features.3")),
    ("occlusion", dict(window=4)), ("rise", dict(masks=4, cell=2)),
])
def test_perturbation_methods_leave_the_model_unchanged(small_cnn, name, options):
    """Success, and an exception raised inside a chunk's forward pass (the CAMs' hooks are removed)."""
    _train_mode_with_grads(small_cnn)
    method = salience.METHODS[name]
    x = torch.rand(2, 3, 8, 8)
    with unchanged(small_cnn):
        method(small_cnn, x, torch.tensor([[0, 1], [2, 3]]), **options)
    with unchanged(small_cnn), interrupted_on_pass(small_cnn.head, 2):
        method(small_cnn, x, 0, **options)


def _graph_as_is(gm, inputs):  # a torch.compile backend that runs the traced graph: cheap to "compile"
    return gm.forward


@pytest.mark.parametrize("memory_format", ["auto", "contiguous", "channels_last"])
@pytest.mark.parametrize("compile", [False, _graph_as_is])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_performance_option_leaves_model_unchanged(small_cnn, memory_format, compile, precision):
    """Every combination of the engine's options (salience._core.perf), through SmoothGrad and
    Integrated Gradients, leaves modes, flags, grads, buffers and parameter strides as they were."""
    _train_mode_with_grads(small_cnn)
    x = torch.rand(2, 3, 8, 8)
    opts = dict(memory_format=memory_format, compile=compile, precision=precision)
    with unchanged(small_cnn):
        salience.smoothgrad(small_cnn, x, samples=3, chunk=2, **opts)
        with salience.performance(**opts):
            salience.integrated_gradients(small_cnn, x, steps=4)
        with pytest.raises(KeyboardInterrupt):
            salience.smoothgrad(small_cnn, x, _exploding_target(KeyboardInterrupt()), samples=3, **opts)


PERTURBATION_OPTIONS = [("scorecam", dict(layer="features.3")), ("ablationcam", dict(layer="features.3")),
                        ("occlusion", dict(window=4)), ("rise", dict(masks=4, cell=2))]


@pytest.mark.parametrize("memory_format", ["auto", "contiguous", "channels_last"])
@pytest.mark.parametrize("compile", [False, _graph_as_is])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_performance_option_of_the_perturbation_methods_leaves_model_unchanged(
        small_cnn, memory_format, compile, precision):
    """Score-CAM, Ablation-CAM, occlusion and RISE with every combination of the engine's options (as
    keywords and as settings): success, and Ctrl-C in the third chunk (raised by the target, outside
    the model: a hook on the model would be traced into a compiled graph)."""
    _train_mode_with_grads(small_cnn)
    x = torch.rand(2, 3, 8, 8)
    opts = dict(memory_format=memory_format, compile=compile, precision=precision)
    calls = []

    def interrupted_in_the_third_chunk(out):
        calls.append(1)
        if len(calls) == 4:  # the clean images' scores first, then one call per chunk (of 2 items)
            raise KeyboardInterrupt
        return out[:, 0]

    for name, options in PERTURBATION_OPTIONS:
        method = salience.METHODS[name]
        with unchanged(small_cnn):
            method(small_cnn, x, 0, chunk=2, **options, **opts)
            with salience.performance(**opts):
                method(small_cnn, x, [0, 1], **options)
        calls.clear()
        with unchanged(small_cnn):
            with pytest.raises(KeyboardInterrupt):
                method(small_cnn, x, interrupted_in_the_third_chunk, chunk=2, **options, **opts)
        assert len(calls) == 4, name


@pytest.mark.parametrize("name", ["road", "faithfulness_correlation", "max_sensitivity", "random_logit"])
def test_new_metrics_leave_the_model_unchanged(small_cnn, name):
    """Issue 16's metrics that run the model: success, and Ctrl-C inside the second forward pass."""
    from salience import evidence

    _train_mode_with_grads(small_cnn)
    x = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    calls = {
        "road": lambda: evidence.road(small_cnn, x, maps, fractions=(0.5,)),
        "faithfulness_correlation": lambda: evidence.faithfulness_correlation(small_cnn, x, maps, subsets=3),
        "max_sensitivity": lambda: evidence.max_sensitivity(small_cnn, x, "vanilla", samples=2),
        "random_logit": lambda: evidence.random_logit(small_cnn, x, "vanilla"),
    }
    with unchanged(small_cnn):
        calls[name]()
    with unchanged(small_cnn), interrupted_on_pass(small_cnn.head, 2):
        calls[name]()


_CHEAP = {"smoothgrad": dict(samples=2), "integrated_gradients": dict(steps=2), "rise": dict(masks=4, cell=2),
          "occlusion": dict(window=4)}
_CNN_METHODS = [n for n in salience.METHODS if n not in ("attention_rollout", "transformer_attribution")]


@pytest.mark.parametrize("name", _CNN_METHODS)
def test_input_dtype_unlike_the_models_is_a_clear_error(small_cnn, name):
    """A float64 model given a float32 image (and a float32 model given float64): every method says
    which dtypes met and how to convert, before anything runs (a raw "Input type (float) and bias
    type (double) should be the same" from inside the model before); the model is untouched."""
    x = torch.rand(2, 3, 8, 8)
    small_cnn.double()
    with unchanged(small_cnn), pytest.raises(SalienceError, match=r"x is torch\.float32 but the model computes in "
                                                                   r"torch\.float64.*x\.to\(torch\.float64\)"):
        salience.METHODS[name](small_cnn, x, 0, **_CHEAP.get(name, {}))
    small_cnn.float()
    with pytest.raises(SalienceError, match=r"x is torch\.float64 but the model computes in torch\.float32"):
        salience.METHODS[name](small_cnn, x.double(), 0, **_CHEAP.get(name, {}))


@pytest.mark.parametrize("name", _CNN_METHODS)
def test_input_on_the_meta_device_is_a_clear_error(small_cnn, name):
    """An image on the meta device (shapes, no values) is refused with the reason, not a raw
    "Tensor.item() cannot be called on meta tensors" from the finiteness check."""
    with unchanged(small_cnn), pytest.raises(SalienceError, match="x is on the meta device"):
        salience.METHODS[name](small_cnn, torch.rand(2, 3, 8, 8, device="meta"), 0, **_CHEAP.get(name, {}))


def test_a_torch_compiled_model_is_explained_through_its_hooks(small_cnn):
    """``torch.compile(model)``: its cached graphs ignore hooks added after compiling (dynamo skips
    guards on module hooks), so Ablation-CAM on a second layer reused the graph of the first call
    (the first layer ablated: a wrong map, silently) and Grad-CAM after a plain call said the layer
    was not called. Under the guard the wrapper runs its original module eagerly: every method
    equals the plain model's, the wrapper's compiled forward is back afterwards (also after Ctrl-C),
    and layer names with the wrapper's ``_orig_mod.`` prefix work."""
    small_cnn.eval()
    compiled = torch.compile(small_cnn, backend=_graph_as_is)
    x = torch.rand(2, 3, 8, 8)
    compiled(x)  # a graph cached without salience's hooks
    for name, layer in [("vanilla", None), ("ablationcam", "features.0"), ("scorecam", "features.0"),
                        ("eigencam", "features.0"), ("guided_gradcam", "features.0"), ("gradcam", "features.0"),
                        ("ablationcam", "features.3"), ("gradcam", "features.3")]:
        opts = {} if layer is None else dict(layer=layer)
        with unchanged(compiled):
            ours = salience.METHODS[name](compiled, x, 1, **({"layer": "_orig_mod." + layer} if layer else {}))
        torch.testing.assert_close(ours, salience.METHODS[name](small_cnn, x, 1, **opts), atol=1e-6, rtol=1e-5)
    with unchanged(compiled), interrupted_on_pass(small_cnn.features[3]):
        salience.ablationcam(compiled, x, 0, layer=small_cnn.features[0])
    # a compiled submodule is run eagerly too
    outer = nn.Sequential(torch.compile(small_cnn.features, backend=_graph_as_is), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), small_cnn.head).eval()
    outer(x)
    plain = nn.Sequential(small_cnn.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), small_cnn.head).eval()
    with unchanged(outer):
        ours = salience.ablationcam(outer, x, 1, layer=small_cnn.features[3])
    torch.testing.assert_close(ours, salience.ablationcam(plain, x, 1, layer=small_cnn.features[3]),
                               atol=1e-6, rtol=1e-5)


def _exported(model: nn.Module, x: torch.Tensor):
    return torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


@pytest.mark.parametrize("name, options", [("vanilla", {}), ("integrated_gradients", dict(steps=3)),
                                           ("smoothgrad", dict(samples=2)), ("occlusion", dict(window=4)),
                                           ("guided_backprop", {})])
def test_a_torch_export_module_passed_directly(small_cnn, name, options):
    """``torch.export.export(model.eval(), ...).module()``, the flat module a user gets in Python, refuses
    ``eval()`` with a raw NotImplementedError, which every method raised from the guard. Its graph is
    fixed in eval mode, so the maps equal the eager model's."""
    small_cnn.eval()
    x = torch.rand(2, 3, 8, 8)
    flat = _exported(small_cnn, x).module()
    with unchanged(flat):
        ours = salience.METHODS[name](flat, x, 1, **options)
    torch.testing.assert_close(ours, salience.METHODS[name](small_cnn, x, 1, **options), atol=1e-5, rtol=1e-4)


def test_a_graph_exported_in_train_mode_is_refused(small_cnn):
    """A program exported in train mode keeps BatchNorm's batch statistics and Dropout in its graph,
    whatever ``eval()`` sets: the maps would mix the images of a batch. Flat or unflattened, passed
    directly (``load_model`` refused it already), it is refused, the module left as it was."""
    x = torch.rand(2, 3, 8, 8)
    ep = _exported(small_cnn.train(), x)
    for model in (ep.module(), torch.export.unflatten(ep)):
        with unchanged(model), pytest.raises(SalienceError, match=r"exported in train mode.*model\.eval\(\)"):
            salience.vanilla(model, x, 0)


@pytest.mark.parametrize("name", list(salience.METHODS))
def test_a_callers_autocast_does_not_change_the_map(small_cnn, name):
    """A call inside the caller's ``torch.autocast("cpu", dtype=torch.bfloat16)``: the map is the one
    outside it, in ``x``'s dtype (salience's precision is its ``precision=`` option). The CAMs came
    back in bfloat16 and rounded, the others in float32 but rounded, Score-CAM failed with a raw
    "Index put requires the source and destination dtypes match", and Integrated Gradients with a
    blurred baseline refused its own bfloat16 baseline as an input of the wrong dtype. The caller's
    autocast is on again afterwards."""
    from tiny_vit import TinyViT

    torch.manual_seed(0)
    attention = name in salience.methods.ATTENTION_METHODS
    model = TinyViT(size=(16, 16), patch=4).eval() if attention else small_cnn.eval()
    x = torch.rand(2, 3, 16, 16)
    options = dict(_CHEAP.get(name, {}))
    if name in ("integrated_gradients", "occlusion"):
        options["baseline"] = "blur"
    if "cam" in name:
        options["layer"] = "features.3"
    expected = salience.METHODS[name](model, x, 1, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with unchanged(model):
            ours = salience.METHODS[name](model, x, 1, **options)
        assert torch.is_autocast_enabled("cpu")
    assert ours.dtype == x.dtype
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_without_running_statistics_refuses_a_pass_of_several_images():
    """``BatchNorm2d(track_running_stats=False)`` normalizes by the statistics of the batch it gets, in
    eval mode too: a batch's images (and the noisy copies, path points, masked images a method runs
    together) changed each other's maps silently. A pass of more than one image is refused, saying
    what to do; one image at a time (``chunk=1`` for the many-pass methods) gives its own maps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).train()
    x = torch.rand(3, 3, 8, 8)
    for name, options in [("vanilla", {}), ("gradcam", dict(layer="2")), ("smoothgrad", dict(samples=4, chunk=2)),
                          ("occlusion", dict(window=8))]:
        with unchanged(model), pytest.raises(SalienceError, match=r"BatchNorm '1' has no running statistics.*"
                                                                  r"the \d images of this pass.*chunk=1"):
            salience.METHODS[name](model, x if name != "smoothgrad" else x[:1], 0, **options)
    one = x[1:2].clone().requires_grad_(True)
    model.eval()
    model(one)[0, 2].backward()
    with torch.no_grad():
        gap = model(x[1:2])[0, 2] - model(torch.zeros_like(x[1:2]))[0, 2]
    model.train()
    with unchanged(model):
        torch.testing.assert_close(salience.vanilla(model, x[1:2], 2), one.grad.abs().amax(1))
        # one window over the whole image: every pixel gets S(x) - S(0)
        torch.testing.assert_close(salience.occlusion(model, x[1:2], 2, window=8, chunk=1),
                                   gap.expand(1, 8, 8), rtol=1e-5, atol=1e-6)
        salience.smoothgrad(model, x[1:2], 2, samples=3, chunk=1)


def test_ctrl_c_while_the_guard_records_the_model(small_cnn, monkeypatch):
    """Ctrl-C while the guard records the model's state (cloning a big model's buffers takes a while):
    nothing stays held, so the next call puts the model in eval mode and restores it as ever (a module
    left counted as held was never put in eval mode or restored again)."""
    from salience._core.guard import entry as guard, holds

    _train_mode_with_grads(small_cnn)
    before = model_snapshot(small_cnn)
    real, calls = guard._capture, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(guard, "_capture", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with model_guard(small_cnn):
            pass  # pragma: no cover - not reached
    monkeypatch.setattr(guard, "_capture", real)
    from conftest import assert_same_snapshot

    assert_same_snapshot(before, model_snapshot(small_cnn))
    assert not any(id(o) in holds.registry for o in [*small_cnn.modules(), *small_cnn.parameters()])
    with model_guard(small_cnn):
        assert not any(m.training for m in small_cnn.modules())
    assert_same_snapshot(before, model_snapshot(small_cnn))


def test_a_loaded_torchscript_model_is_guarded(small_cnn, tmp_path):
    """``torch.jit.load`` gives parameters that are plain tensors, not ``nn.Parameter``: the guard
    held per module and parameter (d8d4eaa) took them for modules and failed with a raw
    "'Tensor' object has no attribute '_buffers'" in every method on a loaded TorchScript file."""
    small_cnn.eval()
    torch.jit.save(torch.jit.script(small_cnn), str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert not any(isinstance(p, nn.Parameter) for p in loaded.parameters())
    x = torch.rand(2, 3, 8, 8)
    expected = salience.vanilla(small_cnn, x, 1)
    loaded(x)  # a first call caches the ScriptMethod ``forward`` in the module's __dict__ (the snapshot reads it)
    loaded.train()
    loaded.head.eval()  # a mixed state must come back mixed
    with unchanged(loaded):
        torch.testing.assert_close(salience.vanilla(loaded, x, 1), expected)
        salience.rise(loaded, x, 1, masks=4, cell=2)
    with unchanged(loaded), pytest.raises(KeyboardInterrupt):
        salience.vanilla(loaded, x, _exploding_target(KeyboardInterrupt()))


def test_strip_softmax_must_be_a_bool_in_every_method(small_cnn):
    """``strip_softmax="no"`` was read as True (a non-empty string is truthy): the opposite of what
    was asked, silently. Every method that takes it refuses what is not a bool, the model unchanged."""
    import inspect

    from salience.methods import METHODS

    x = torch.rand(2, 3, 16, 16)
    takes = [n for n, fn in METHODS.items() if "strip_softmax" in inspect.signature(fn).parameters
             and n not in ("attention_rollout", "transformer_attribution")]  # those need a transformer
    assert len(takes) >= 10, takes
    for name in takes:
        for bad in ("no", "false", 0, None):
            with unchanged(small_cnn), pytest.raises(SalienceError, match="strip_softmax must be True or False"):
                METHODS[name](small_cnn, x, 1, strip_softmax=bad)


class _AlphaDropper(nn.Module):
    """Takes RGBA and drops the alpha itself: its first convolution's 3 channels are not its input's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :3])


def _model_for(name: str):
    from tiny_vit import TinyViT

    if name in salience.methods.ATTENTION_METHODS:
        torch.manual_seed(0)
        return TinyViT(), (24, 40)
    torch.manual_seed(0)
    from conftest import SmallCNN

    return SmallCNN(), (8, 8)


@pytest.mark.parametrize("name", list(salience.METHODS))
def test_images_of_other_channels_than_the_models_are_a_clear_error(name):
    """RGBA (4 channels) or gray (1) images into a 3-channel model (a CNN's stem, a ViT's patch
    embedding): every method raises a SalienceError naming the input's shape, the channels the model's
    first convolution takes and the conversion (a raw "Given groups=1, weight of size [6, 3, 3, 3],
    expected input[...] to have 3 channels" from inside the model before), the model's own error kept as
    the cause, and the model comes back as it was (modes, flags, grads, hooks)."""
    model, (h, w) = _model_for(name)
    _train_mode_with_grads_any(model)
    for c, hint in ((4, r"x\[:, :3\]"), (1, r"x\.expand\(-1, 3, -1, -1\)")):
        with unchanged(model), pytest.raises(SalienceError) as info:
            salience.METHODS[name](model, torch.rand(1, c, h, w), 0, **_CHEAP.get(name, {}))
        msg = str(info.value)
        assert f"(1, {c}, {h}, {w})" in msg or f", {c}, {h}, {w})" in msg, msg
        assert "takes 3 channels" in msg and re.search(hint, msg), msg
        assert isinstance(info.value.__cause__, RuntimeError) and "\n" not in msg


def _train_mode_with_grads_any(m: nn.Module) -> None:
    """Train mode, one frozen parameter and one with a .grad: a state the guard must put back."""
    m.train()
    params = list(m.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.ones_like(params[-1])


def test_a_model_that_converts_its_input_itself_is_not_refused(small_cnn):
    """No refusal from the first convolution's channels alone: a model that drops the alpha itself
    takes RGBA images (its stem's 3 channels are not its input's)."""
    model = _AlphaDropper(small_cnn)
    x = torch.rand(1, 4, 8, 8)
    m = salience.vanilla(model, x, 0)
    assert m.shape == (1, 8, 8) and bool(m.abs().sum() > 0)
    ref = salience.vanilla(small_cnn, x[:, :3], 0)
    torch.testing.assert_close(m, ref)


def test_a_models_own_errors_are_not_rewritten(small_cnn):
    """Only a failure that says the input does not fit becomes a SalienceError: a model's own bug keeps
    its type and its traceback."""
    class Buggy(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom: a bug of the model's own")

    model = nn.Sequential(small_cnn.features, Buggy())
    for method in ("vanilla", "occlusion", "gradcam"):
        opts = {"layer": model[0][0]} if method == "gradcam" else _CHEAP.get(method, {})
        with pytest.raises(RuntimeError, match="boom") as info:
            salience.METHODS[method](model, torch.rand(1, 3, 8, 8), 0, **opts)
        assert not isinstance(info.value, SalienceError)


def test_a_vit_given_another_image_size_names_its_input_size():
    """A ViT with a fixed position embedding given 32 x 32 images where it takes 24 x 40: the size error
    from its addition of the embedding is a SalienceError that names the model's input size when its
    info knows it."""
    from tiny_vit import TinyViT

    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    model = attach_info(TinyViT(), ModelInfo(input_size=(24, 40)))
    with unchanged(model), pytest.raises(SalienceError, match=r"\(1, 3, 32, 32\).*takes 24 x 40 images.*"
                                                               r"must match the size"):
        salience.vanilla(model, torch.rand(1, 3, 32, 32), 0)


def test_a_run_guard_puts_a_call_s_changes_back_only_when_no_other_call_holds_the_model(small_cnn):
    """Under a dataset run's guard (run_guard) a call puts back what it changed when it leaves, so the
    next batch's call starts from the run's state: a flag, a buffer written in place; but not while
    another thread's call still runs on the model (its pass would lose its state), only when the last
    call left. At the end the user's model exactly as it was."""
    from salience._core.guard import run_guard

    small_cnn.train()
    w, bn = small_cnn.head.weight, small_cnn.features[1]
    mean = bn.running_mean.clone()
    inside, go, seen = threading.Event(), threading.Event(), []

    def other():
        with model_guard(small_cnn):
            w.requires_grad_(True)  # a change inside another thread's call
            inside.set()
            assert go.wait(10)
            seen.append(w.requires_grad)

    with unchanged(small_cnn):
        with run_guard(small_cnn):
            assert not small_cnn.training and not w.requires_grad
            t = threading.Thread(target=other)
            t.start()
            assert inside.wait(10)
            with model_guard(small_cnn):  # this thread's call leaves while the other's runs
                pass
            assert w.requires_grad
            go.set()
            t.join()
            assert seen == [True]
            assert not w.requires_grad and not small_cnn.training  # put back when the last call left
            with model_guard(small_cnn):
                bn.running_mean.add_(1)
                w.requires_grad_(True)
            assert torch.equal(bn.running_mean, mean) and not w.requires_grad
            with model_guard(small_cnn):  # and again: the copy back is seen as a write of its own
                bn.running_mean.add_(1)
            assert torch.equal(bn.running_mean, mean)


class _Gate(nn.Module):
    """Holds the explaining thread's first pass (before the hooked layer) until another thread has
    run a whole forward pass of the same model: both passes meet the layer while salience's hook is on."""

    def __init__(self) -> None:
        super().__init__()
        self.explainer: Optional[int] = None
        self.inside, self.other_done = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() == self.explainer and not self.inside.is_set():
            self.inside.set()
            assert self.other_done.wait(10), "the other thread's pass did not come"
        return x


@pytest.mark.parametrize("method", ["gradcam", "layercam", "ablationcam", "scorecam", "eigencam"])
def test_a_layer_hook_sees_and_changes_only_the_explaining_threads_passes(small_cnn, method):
    """A method's hook on a layer (Grad-CAM's capture, Ablation-CAM's ablation, Score-CAM's and Eigen-CAM's
    capture) fired for every thread's pass through the shared model: a forward of the user's code in
    another thread meanwhile was taken as the explained activation (a wrong map, or a failure) or
    ablated (that thread's output changed). The maps must be those of the call alone, and the other
    thread's output that of the plain model."""
    gate = _Gate()
    model = nn.Sequential(gate, small_cnn).eval()
    x, other = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.randn(
        3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    options = {} if method == "eigencam" else {"target": torch.tensor([0, 2])}
    fn = getattr(salience, method)
    alone = fn(model, x, layer="1.features.3", **options)
    with torch.no_grad():
        plain = model(other)
    got, seen, errors = {}, {}, []

    def explain() -> None:
        gate.explainer = threading.get_ident()
        try:
            got["map"] = fn(model, x, layer="1.features.3", **options)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
            gate.inside.set()

    def user() -> None:
        assert gate.inside.wait(10)
        with torch.no_grad():
            seen["out"] = model(other)
        gate.other_done.set()

    threads = [threading.Thread(target=explain), threading.Thread(target=user)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not errors, errors
    torch.testing.assert_close(got["map"], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["out"], plain, rtol=1e-5, atol=1e-6)


def test_a_model_built_under_inference_mode_is_refused_saying_what_to_do():
    """Its weights are inference tensors (no version counter, no backward): every method failed with
    torch's raw RuntimeError from the guard. Now a SalienceError naming the tensor and the cure; the
    cure it names (a deepcopy made outside inference mode) gives the plain model's map."""
    torch.manual_seed(3)
    with torch.inference_mode():
        frozen = SmallCNN().eval()
    torch.manual_seed(3)
    plain = SmallCNN().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    for method in ("vanilla", "gradcam", "occlusion"):
        with pytest.raises(SalienceError, match=r"'features\.0\.weight' is an inference tensor.*copy\.deepcopy"):
            getattr(salience, method)(frozen, x, 0)
    torch.testing.assert_close(salience.vanilla(copy.deepcopy(frozen), x, 0), salience.vanilla(plain, x, 0))

    class Counting(nn.Module):  # replaces its buffer in every forward: under a gradient-free method's
        def __init__(self) -> None:  # inference_mode the new buffer is an inference tensor mid-call
            super().__init__()
            self.net = plain
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1
            return self.net(x)

    counting = Counting().eval()
    torch.testing.assert_close(salience.occlusion(counting, x, 0, window=4), salience.occlusion(plain, x, 0, window=4))
    assert float(counting.calls) == 0 and not counting.calls.is_inference()


def test_a_lazy_module_not_yet_initialized_is_refused_and_explained_after_one_pass():
    """A LazyLinear before its first pass has no weights: the guard failed with torch's raw ValueError
    ("Attempted to use an uninitialized parameter"). A SalienceError now names it and the cure; after
    the pass it names, the map is the plain gradient (the model is linear after the conv: checked
    against autograd by hand)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(SalienceError, match=r"'2\.weight' \(LazyLinear\) is not initialized.*model\(x\)"):
        salience.vanilla(model, x, 0)
    assert isinstance(model[2], nn.LazyLinear)  # left as it was
    with torch.no_grad():
        model(x)
    xg = x.clone().requires_grad_(True)
    model(xg)[:, 0].sum().backward()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(salience.vanilla(model, x, 0, reduce=None), xg.grad)


def test_a_guard_inside_a_held_model_does_not_walk_its_tensors_again():
    """The inference-tensor / lazy check looked at every named parameter and buffer of the model under
    the guard's lock on every entry, also when another guard held it all already (each call of a
    dataset run, a method nested in SmoothGrad): +0.66 ms a call on resnet50 (+50%). Nothing is new
    there, so nothing is walked (the model's ``named_buffers`` is not called)."""
    calls = []

    class Walked(SmallCNN):
        def named_buffers(self, *args, **kwargs):  # type: ignore[override]
            calls.append(1)
            return super().named_buffers(*args, **kwargs)

    model = Walked().eval()
    with model_guard(model):
        calls.clear()
        with model_guard(model):
            pass
    assert calls == []


def test_a_layer_run_in_data_parallel_replica_threads_is_refused_saying_to_explain_model_module():
    """nn.DataParallel on several GPUs runs each replica's forward in a thread of its own, which the layer
    hooks (thread-scoped) do not see: the error said the layer "was not called in the forward pass",
    which it was. Simulated on CPU (two replicas, two threads, as ``parallel_apply`` does)."""
    class TwoReplicas(nn.DataParallel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            if x.shape[0] < 2:
                return self.module(x)
            chunks, outs = x.chunk(2), [None, None]
            grad = torch.is_grad_enabled()

            def replica(i: int) -> None:
                with torch.set_grad_enabled(grad):
                    outs[i] = self.module(chunks[i])
            threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
            [t.start() for t in threads]
            [t.join(30) for t in threads]
            return torch.cat(outs)  # type: ignore[arg-type]

    torch.manual_seed(0)
    plain = SmallCNN().eval()
    wrapped = TwoReplicas(plain)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for method in ("gradcam", "scorecam"):
        with pytest.raises(SalienceError, match=r"'module\.features' was not called in this thread.*DataParallel.*model\.module"):
            getattr(salience, method)(wrapped, x, 0, layer="module.features")


def test_the_one_image_batchnorm_check_leaves_another_threads_batch_alone(small_cnn):
    """A BatchNorm without running statistics gets a guard hook refusing a pass of several images; it
    refused the user's own batch run in another thread meanwhile (a SalienceError in their code). That
    thread's output must be the plain model's; the explaining thread's batch is still refused."""
    gate = _Gate()
    model = nn.Sequential(gate, nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Flatten(), nn.Linear(144, 3)).eval()
    other = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(other)
    with pytest.raises(SalienceError, match="no running statistics"):
        salience.vanilla(model, other, 0)
    seen, errors = {}, []

    def explain() -> None:
        gate.explainer = threading.get_ident()
        try:
            salience.vanilla(model, other[:1], 0)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
            gate.inside.set()

    def user() -> None:
        assert gate.inside.wait(10)
        try:
            with torch.no_grad():
                seen["out"] = model(other)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
        gate.other_done.set()

    threads = [threading.Thread(target=explain), threading.Thread(target=user)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not errors, errors
    torch.testing.assert_close(seen["out"], plain)


def test_the_guard_walk_lists_the_modules_and_parameters_as_torch_does(small_cnn):
    """The guard lists a model's modules and parameters in one walk of ``_modules`` / ``_parameters``:
    the same objects in the same order as ``modules()`` and ``parameters()``, with a module shared twice,
    a tied weight, a ``None`` submodule and parameter, and a TorchScript model."""
    from salience._core.guard.entry import _walk

    shared = nn.Linear(2, 2)
    tied = nn.Linear(2, 2)
    tied.weight = shared.weight
    model = nn.Sequential(small_cnn, nn.Sequential(shared, nn.ReLU()), shared, tied, nn.Linear(2, 2, bias=False))
    model.register_module("gone", None)
    cases = [model, torch.jit.script(small_cnn.eval())]
    for m in cases:
        modules, params = _walk(m)
        assert [id(u) for u in modules] == [id(u) for u in m.modules()]
        assert [id(p) for p in params] == [id(p) for p in m.parameters()]


@pytest.mark.parametrize("name", ["_walk", "_enter", "_hold", "_capture", "_eval", "_refuse_mixed_batches",
                                  "_refuse_inference_tensors", "_compiled_wrapper_class", "_enter_thread", "autocast_off"])
def test_ctrl_c_at_each_call_while_guards_enter(small_cnn, monkeypatch, name):
    """Ctrl-C at the n-th call of each function the guards call on entering (for every n), in a run guard
    with nested calls: the model comes back as it was and nothing stays held. Before, a Ctrl-C at the
    call between run_guard's hold and its try (the compile-wrapper look-up) left the model held in eval mode."""
    from salience._core.guard import entry as guard, holds

    from conftest import assert_same_snapshot

    real = getattr(guard, name)
    _train_mode_with_grads(small_cnn)
    before = model_snapshot(small_cnn)
    for n in range(1, 50):
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(guard, name, interrupted)
        try:
            with guard.run_guard(small_cnn), model_guard(small_cnn), model_guard(small_cnn):
                pass
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(guard, name, real)
        assert_same_snapshot(before, model_snapshot(small_cnn))
        assert not holds.registry and not guard._threads and not guard._guarding, (name, n)
        if finished:
            break


def test_a_meta_model_comes_back_from_the_guard():
    """A model on the meta device (built under ``torch.device("meta")`` before its weights are loaded):
    ``Tensor.is_set_to`` has no meta kernel, and the guard's exit raised torch's NotImplementedError part
    way, leaving parameters frozen. Its flags and its parameters' layout come back."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model.train()
    with model_guard(model):
        assert not model[0].training and not model[1].bias.requires_grad
        model[0].weight.data = model[0].weight.data.t()  # another layout, as a channels-last run makes
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert model[0].weight.stride() == (3, 1)


def test_ctrl_c_while_the_guard_puts_the_model_back(small_cnn, monkeypatch):
    """Ctrl-C at the n-th call of the tensor-attribute restore (for every n) while a guard, or a run
    guard's call, puts the model back: every other object is still put back, the model comes back whole.
    Before, the objects after the interrupted one stayed in eval mode, frozen, and no guard held them."""
    from salience._core.guard import entry as guard, holds, state

    from conftest import assert_same_snapshot

    real = holds.restore_attributes
    _train_mode_with_grads(small_cnn)
    before, grad = model_snapshot(small_cnn), small_cnn.head.weight.grad
    for n in range(1, 40):
        calls = []

        def interrupted(*args):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(holds, "restore_attributes", interrupted)
        monkeypatch.setattr(state, "restore_attributes", interrupted)
        try:
            with guard.run_guard(small_cnn):
                with model_guard(small_cnn):
                    small_cnn.features[1].running_mean.add_(1)
                    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)
                assert small_cnn.head.weight.grad is grad and not small_cnn.training
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(holds, "restore_attributes", real)
        monkeypatch.setattr(state, "restore_attributes", real)
        assert_same_snapshot(before, model_snapshot(small_cnn))
        assert not holds.registry and not guard._threads and not guard._guarding, n
        if finished:
            break



class _Keeping(nn.Module):
    """A module of the user's (its dict copied by the guard): a counter, a buffer slot registered as ``None`` and a
    non-persistent buffer, which :func:`_changed_on_itself` changes as a forward may."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.register_buffer("cache", None)
        self.register_buffer("gone", torch.zeros(1), persistent=False)
        self.act = nn.ReLU()


def _tiny_trained_model() -> nn.Sequential:
    """A BatchNorm in train mode, its bias frozen, its weight with a ``.grad``, and a module of the user's
    (:class:`_Keeping`): few objects, so a Ctrl-C at each point of the guards' bookkeeping stays cheap."""
    model = nn.Sequential(nn.BatchNorm1d(2), _Keeping())
    model.train()
    model[0].bias.requires_grad_(False)
    model[0].weight.grad = torch.ones(2)
    return model


def _nested(model: nn.Module) -> None:
    with model_guard(model), model_guard(model):
        pass


def _run_with_calls(model: nn.Module) -> None:
    """A dataset run's guard with calls inside that change the model (each put back to the run's baseline)."""
    from salience._core.guard import run_guard

    with run_guard(model):
        with model_guard(model), model_guard(model):
            model[0].running_mean.add_(1)
            model[0].weight.grad = torch.zeros(2)


_WEIGHT_4D = nn.Parameter(torch.rand(2, 2, 3, 3))  # a 4-D weight whose channels-last copy a run keeps


def _runs_keeping_copies(model: nn.Module) -> None:
    """Run guards that keep the run's channels-last copies (``layouts.open_copies`` / ``close_copies``, in the
    run guard's entry and exit since session 42): one with a call keeping a copy and a nested run guard sharing
    them, then a second run on the same model."""
    from salience._core import layouts
    from salience._core.guard import run_guard

    p = _WEIGHT_4D
    with run_guard(model):
        with model_guard(model):
            layouts.channels_last_data(model, p, p.data)
        with run_guard(model), model_guard(model):
            layouts.channels_last_data(model, p, p.data)
    with run_guard(model):
        layouts.channels_last_data(model, p, p.data)


def _change_on_itself(m: nn.Module) -> None:
    """What a forward may change on its module (session 36's restore of the dicts): an attribute reassigned and one
    added, a ``None`` slot filled, a buffer deleted and one registered, a parameter and a submodule replaced."""
    m.calls += 1
    m.seen = torch.ones(1)
    m.cache = torch.ones(1)
    del m.gone
    m.register_buffer("added", torch.ones(1), persistent=False)
    m.gain = nn.Parameter(torch.ones(1))
    m.act = nn.Identity()


def _changed_on_itself(model: nn.Module) -> None:
    """A guard and a run guard with a call inside, each block changing the user's module as a forward may."""
    from salience._core.guard import run_guard

    with model_guard(model):
        _change_on_itself(model[1])
    with run_guard(model):
        with model_guard(model):
            _change_on_itself(model[1])


def _own_state(model: nn.Module) -> list:
    """Each module's own attributes (by identity), buffers, parameters and submodules by name in order,
    non-persistent buffer names and the keys of its hook dicts, and those of torch's global hook dicts (which the
    guard leaves alone): what :func:`model_snapshot` does not see."""
    from salience._core.guard import hooks as guard

    return [(n, [(k, id(v)) for k, v in vars(m).items() if not k.startswith("_")],
             [(k, id(v)) for k, v in m._buffers.items()], [(k, id(v)) for k, v in m._parameters.items()],
             [(k, id(v)) for k, v in m._modules.items()], sorted(m._non_persistent_buffers_set),
             [list(getattr(m, d)) for d in guard._HOOK_DICTS + guard._COMPANIONS])
            for n, m in model.named_modules()] + \
        [[list(v) for k, v in vars(torch.nn.modules.module).items()
          if k.startswith("_global_") and isinstance(v, dict)]]


def _no_hook(*args, **kwargs) -> None:
    return None


def _hook_as_a_forward_may(model: nn.Module) -> None:
    """Hooks a forward may register and leave (session 37's sweep): on a torch.nn layer, and on the user's module
    (with kwargs and always called: the companion dicts)."""
    model[0].register_forward_hook(_no_hook)
    model[1].register_forward_pre_hook(_no_hook, with_kwargs=True)
    model[1].register_forward_hook(_no_hook, always_call=True)


def _hooked_in_the_block(model: nn.Module) -> None:
    """A guard and a run guard with a call inside, each block registering hooks as a forward may; and a guard
    that leaves the BatchNorm it hooked to a later guard of another model holding it (``_stale``)."""
    from salience._core.guard import run_guard

    with model_guard(model):
        _hook_as_a_forward_may(model)
    with run_guard(model):
        with model_guard(model):
            _hook_as_a_forward_may(model)
    first, second = model_guard(model), model_guard(nn.Sequential(model[0]))
    first.__enter__()
    try:
        _hook_as_a_forward_may(model)
        second.__enter__()
    except BaseException:
        first.__exit__(*sys.exc_info())
        raise
    try:
        first.__exit__(None, None, None)  # left first: the BatchNorm stays held by the second guard
    finally:
        second.__exit__(None, None, None)


def _shared(model: nn.Module) -> None:
    """A second model holding the first one's BatchNorm, guarded inside the first one's guard."""
    with model_guard(model), model_guard(nn.Sequential(model[0])):
        pass


# the guard package's functions that cannot change what the guards hold: the walk of the model before it is held, a class's kind
_PURE = ("_walk", "_kind")


class _LockOrFail:
    """The guard's lock, failing the test where a Ctrl-C left it held (instead of waiting for good); as
    ``threading.Lock``'s, its methods are not interrupted (not traced)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        assert self.lock.acquire(timeout=2), "a Ctrl-C left the guard's lock held"

    def __exit__(self, *exc) -> None:
        self.lock.release()


def _interruption_points(code: types.CodeType) -> frozenset:
    """The offsets in ``code`` where CPython may run a pending signal's handler (where Ctrl-C raises
    ``KeyboardInterrupt``): a frame's start and a generator's resumption by ``next`` (not by ``throw`` or
    ``close``), after each call, at a loop's back jump."""
    points, after_call = set(), False
    for ins in dis.get_instructions(code):
        # RESUME's low two bits: 0 a frame's start, 1 after a yield (3.13 adds an except-depth bit above them)
        if after_call or ins.opname == "JUMP_BACKWARD" or (ins.opname == "RESUME" and (ins.arg & 3) < 2):
            points.add(ins.offset)
        after_call = ins.opname in ("CALL", "CALL_FUNCTION_EX", "CALL_KW")
    return frozenset(points)


def _in_scope(frame: types.FrameType, top: types.CodeType) -> bool:
    """Whether ``frame`` runs in one of the guard package's functions (but :data:`_PURE`), or in what one called
    (below ``top``, the scenario's code)."""
    from salience._core import guard

    while frame is not None and frame.f_code is not top:
        code = frame.f_code
        if code in (_LockOrFail.__enter__.__code__, _LockOrFail.__exit__.__code__):
            return False
        if code.co_filename.startswith(os.path.dirname(guard.__file__) + os.sep):
            return code.co_name not in _PURE
        frame = frame.f_back
    return False


def _points_passed(scenario, model: nn.Module) -> list:
    """``scenario(model)`` run, and the interruption points (:func:`_interruption_points`) it passed in
    the guard package's functions and what they call, in order: ``(code, offset)``."""
    passed: list = []
    points: dict = {}

    def local(frame, event, arg):
        code = frame.f_code
        if code not in points:
            points[code] = _interruption_points(code)
        if event in ("opcode", "call") and frame.f_lasti in points[code]:
            passed.append((code, frame.f_lasti))
        return local

    def calls(frame, event, arg):
        if not _in_scope(frame, scenario.__code__):
            return None
        frame.f_trace_opcodes = True
        return local(frame, event, arg)

    _traced(scenario, model, calls)
    return passed


def _traced(scenario, model: nn.Module, tracer, raised: type = KeyboardInterrupt) -> bool:
    """``scenario(model)`` under the trace function ``tracer``: whether it finished (else a Ctrl-C ended it:
    SIGINT's handler raised ``raised``)."""
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        scenario(model)
        return True
    except raised:
        return False
    finally:
        sys.settrace(previous)


def _interrupted_at(scenario, model: nn.Module, point: tuple, k: int,
                    raised: type = KeyboardInterrupt) -> tuple[bool, bool]:
    """``scenario(model)`` with SIGINT (what Ctrl-C sends; its handler runs at once) the ``k``-th time it
    passes ``point`` (``(code, offset)``) in scope (:func:`_in_scope`): (whether it finished, whether the
    signal was sent). Only the frames of ``point``'s code are traced by opcode: a quick test."""
    code, offset = point
    seen = [0]

    def passes(frame) -> bool:  # False once the signal was sent
        if frame.f_lasti == offset:
            seen[0] += 1
            if seen[0] == k:
                sys.settrace(None)
                signal.raise_signal(signal.SIGINT)
        return seen[0] < k

    def local(frame, event, arg):
        return None if event == "opcode" and not passes(frame) else local

    def calls(frame, event, arg):
        if frame.f_code is not code or not _in_scope(frame, scenario.__code__):
            return None
        frame.f_trace_opcodes = True
        return local if passes(frame) else None

    return _traced(scenario, model, calls, raised), seen[0] >= k


@contextmanager
def _sigint_handled_by(handler):
    """SIGINT's handler is ``handler`` in the block (Python's default one may be missing: a process started
    with SIGINT ignored keeps it ignored), and the one before afterwards."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("scenario", [_nested, _run_with_calls, _shared, _changed_on_itself, _hooked_in_the_block,
                                      _runs_keeping_copies])
def test_ctrl_c_at_each_point_of_the_guards_bookkeeping(monkeypatch, request, scenario):
    """Ctrl-C (SIGINT, whose handler raises ``KeyboardInterrupt``) at each point where Python may raise
    it in the guards' functions and what they call, in turn (nested model guards, a run guard with calls
    inside, two models sharing a module, a module of the user's changed as its forward may: session 36's
    restore of its dict, buffers, parameters and submodules, 130 points in ``_restore_mapping``; hooks registered in
    the blocks, session 37's sweep, 323 points in ``_unhook``, ``_drop_hooks`` and ``_own_hook``): afterwards the
    model is as it was (its modules' own attributes, names and hook keys too, torch's global hooks), no guard holds
    anything, the handler is the one before, and the next guard holds and restores the model again. Before, 117 of the
    1402 points failed: a Ctrl-C inside the hold counts' bookkeeping (``_release``, ``_leave``, ``_each``,
    part way through ``_hold``, between ``run_guard``'s hold and its ``try``) left counts behind, so the
    model stayed in eval mode, frozen, or a later guard found a stale holder and did not restore it."""
    from salience._core import layouts
    from salience._core.guard import entry as guard, holds

    monkeypatch.setattr(guard, "_lock", _LockOrFail())
    model = _tiny_trained_model()
    before, own = model_snapshot(model), _own_state(model)
    # no garbage collection meanwhile: a collection in the bookkeeping (its weakref callbacks, dynamo's once a test
    # compiled, traced as points of it) in some runs and not others made the k-th pass of a point differ
    gc.collect()
    if gc.isenabled():
        gc.disable()
        request.addfinalizer(gc.enable)
    points = _points_passed(scenario, model)
    assert len(points) > 200  # the bookkeeping's paths were reached
    seen: collections.Counter = collections.Counter()
    for point in points:
        seen[point] += 1
        with _sigint_handled_by(signal.default_int_handler):
            finished, sent = _interrupted_at(scenario, model, point, seen[point])
            assert sent and not finished, point  # the Ctrl-C was raised, at once or when the bookkeeping ended
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, point
        assert_same_snapshot(before, model_snapshot(model))
        assert _own_state(model) == own, point
        assert not holds.registry and not guard._threads and not guard._guarding, point
        assert layouts._kept == {}, point  # the run's channels-last copies dropped too
        with model_guard(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert_same_snapshot(before, model_snapshot(model))


def test_ctrl_c_in_the_guards_bookkeeping_calls_the_users_handler_once():
    """A user's own SIGINT handler (one that does not raise) is called once for a Ctrl-C at any point of
    the guards, the guards finish, and it is the handler afterwards (the guard defers Ctrl-C only while it
    changes its tables)."""
    model = _tiny_trained_model()
    before = model_snapshot(model)
    calls: list = []

    def handler(signum, frame):
        calls.append(signum)

    seen: collections.Counter = collections.Counter()
    with _sigint_handled_by(handler):
        for point in _points_passed(_run_with_calls, model):
            calls.clear()
            seen[point] += 1
            finished, sent = _interrupted_at(_run_with_calls, model, point, seen[point])
            assert finished and sent and calls == [signal.SIGINT], point
            assert signal.getsignal(signal.SIGINT) is handler, point
    assert_same_snapshot(before, model_snapshot(model))


class _Stop(Exception):
    """What a user's SIGINT handler raises instead of ``KeyboardInterrupt``."""


@pytest.mark.parametrize("raised", [SystemExit, _Stop])
def test_ctrl_c_with_a_users_handler_that_raises_another_exception(monkeypatch, raised):
    """A user's SIGINT handler that raises something else than ``KeyboardInterrupt`` (``sys.exit(1)``'s
    ``SystemExit``, an exception of their own), at each point of the guards: the model is as it was, no
    guard holds anything, the handler is the user's. Before, a Ctrl-C at the start of the exit's
    ``calmly`` (before the deferral) was done once more only for a ``KeyboardInterrupt``: with the user's
    exception the hold stayed, the model in eval mode with frozen parameters for good. Also with run guards that
    keep channels-last copies (session 42): none stays kept."""
    from salience._core import layouts
    from salience._core.guard import entry as guard, holds

    monkeypatch.setattr(guard, "_lock", _LockOrFail())
    model = _tiny_trained_model()
    before = model_snapshot(model)

    def handler(signum, frame):
        raise raised(signum)

    for scenario in (_run_with_calls, _runs_keeping_copies):
        seen: collections.Counter = collections.Counter()
        for point in _points_passed(scenario, model):
            seen[point] += 1
            with _sigint_handled_by(handler):
                finished, sent = _interrupted_at(scenario, model, point, seen[point], raised)
                assert sent and not finished, point
                assert signal.getsignal(signal.SIGINT) is handler, point
            assert_same_snapshot(before, model_snapshot(model))
            assert not holds.registry and not guard._threads and not guard._guarding, point
            assert layouts._kept == {}, point
