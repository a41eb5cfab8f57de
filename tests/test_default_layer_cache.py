"""The CAMs' default-layer search is cached per model, its structure and the input's per-image shape, dtype and
device type: a second Grad-CAM call on the same model and shape runs one forward pass (the method's), not two
(the search's pass of ``x[:1]`` before it). A module replaced, a hook added or another input size: searched
again. The cache holds no model alive; a refusal (no default layer) is raised again, with the same message."""
from __future__ import annotations

import gc
import threading
import weakref
from typing import Iterator

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import perf
from salience._core.autograd import this_thread
from salience.methods import default_methods
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies
from tiny_vit import TinyViT


def _net() -> nn.Sequential:
    """conv, ReLU, max-pool, conv, ReLU, global pool, linear: the default is the last ReLU ``"4"`` on 8x8
    (a 4x4 map); on 2x2 the maps after the max-pool are 1x1, so it is the first ReLU ``"1"`` (2x2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


class _Passes:
    """Counts the forward passes of a model (a pre-hook on its root, kept for the whole test: the model's
    structure, hooks included, stays the same between the calls compared)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list = []  # appended to (atomic), for passes of several threads
        self.handle = model.register_forward_pre_hook(lambda module, args: self.seen.append(1))

    def take(self) -> int:
        n = len(self.seen)
        del self.seen[:n]
        return n


@pytest.fixture
def counted() -> Iterator[tuple[nn.Sequential, _Passes]]:
    net = _net()
    passes = _Passes(net)
    yield net, passes
    passes.handle.remove()


def test_a_second_gradcam_call_runs_one_forward_pass(counted):
    net, passes = counted
    x = torch.rand(2, 3, 8, 8)
    first = salience.gradcam(net, x, 1)
    assert passes.take() == 2  # the search's pass of x[:1], then Grad-CAM's
    with unchanged(net):
        again = salience.gradcam(net, x, 1)
    assert passes.take() == 1  # Grad-CAM's alone: the search's result is the cached one
    assert torch.equal(again, first)
    # the other callers of the search reuse it: no pass
    assert default_layer(net, x) == "4"
    assert describe_default_layer(net, x).startswith("4 (ReLU, output (1, 6, 4, 4)")
    assert "gradcam" in default_methods(net, x) and "attention_rollout" not in default_methods(net, x)
    assert passes.take() == 0
    # other images of the same shape, another batch size: the same entry
    salience.hirescam(net, torch.rand(3, 3, 8, 8), 0)
    assert passes.take() == 1


def test_the_cached_default_gives_the_map_of_the_layer_named():
    """The cached call's map equals the map at the default layer named explicitly (a map net and a ViT, whose
    default is the last block's norm1, tokens read on the patch grid)."""
    for net, x in ((_net(), torch.rand(2, 3, 8, 8)), (TinyViT().eval(), torch.rand(2, 3, 24, 40))):
        t = torch.tensor([0, 2])
        salience.gradcam(net, x, t)  # the search runs here
        cached = salience.gradcam(net, x, t)
        named = salience.gradcam(net, x, t, layer=default_layer(net, x))
        assert_each_varies(named)
        assert torch.equal(cached, named)
    assert default_layer(net, x) == "blocks.1.norm1"


def test_a_changed_model_or_input_is_searched_again(counted):
    net, passes = counted
    x = torch.rand(1, 3, 8, 8)
    assert default_layer(net, x) == "4" and passes.take() == 1
    assert default_layer(net, x) == "4" and passes.take() == 0
    net[4] = nn.Identity()  # a module replaced: the last map is now the convolution's
    assert default_layer(net, x) == "3" and passes.take() == 1
    assert default_layer(net, x) == "3" and passes.take() == 0
    net[4] = nn.ReLU()
    assert default_layer(net, x) == "4" and passes.take() == 1
    handle = net[3].register_forward_hook(lambda m, i, o: o * 2)  # a hook of the user's: searched again
    try:
        assert default_layer(net, x) == "4" and passes.take() == 1
    finally:
        handle.remove()
    assert default_layer(net, x) == "4" and passes.take() == 1  # one entry per model and shape: the last state's
    small = torch.rand(1, 3, 2, 2)  # another size: the maps after the pooling are 1x1
    assert default_layer(net, small) == "1" and passes.take() == 1
    assert default_layer(net, x) == "4" and passes.take() == 0  # each size keeps its own entry
    perf.clear_cache()  # forgets it too
    assert default_layer(net, x) == "4" and passes.take() == 1


def test_another_threads_scoped_hook_keeps_the_entry(counted):
    """A hook salience puts on the shared model for another thread's pass (:func:`this_thread`) never runs in this
    thread's: the cached entry stays good while it is on."""
    net, passes = counted
    x = torch.rand(1, 3, 8, 8)
    default_layer(net, x)
    passes.take()
    handles: list = []
    other = threading.Thread(target=lambda: handles.append(net[4].register_forward_hook(this_thread(
        lambda m, i, o: None))))
    other.start()
    other.join()
    try:
        assert default_layer(net, x) == "4" and passes.take() == 0
    finally:
        handles[0].remove()


def test_threads_sharing_a_model_share_the_entry(counted):
    """4 threads, 3 Grad-CAM calls each on one model: each map is the serial one, and the search ran at most once
    per thread (those that looked before the first search finished), not once per call."""
    net, passes = counted
    x = torch.rand(1, 3, 8, 8)
    ref = salience.gradcam(net, x, 2, layer="4")
    passes.take()
    got: list = []

    def work() -> None:
        got.extend(salience.gradcam(net, x, 2) for _ in range(3))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 12 and all(torch.equal(g, ref) for g in got)
    assert 12 + 1 <= passes.take() <= 12 + 4


def test_the_cache_keeps_no_model_alive():
    net = _net()
    x = torch.rand(1, 3, 8, 8)
    salience.gradcam(net, x, 0)
    salience.gradcam(net, x, 0)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


class _OwnAttention(nn.Module):
    """A patch embedding, then attention over the 4 tokens in the model's own forward (no submodule): no default
    layer (refused, :func:`salience.methods._layer_search._refuse_inline_attention`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.qkv, self.head = nn.Conv2d(3, 8, 4, 4), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 4, 8)
        b, n, d = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        t = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.head(t.mean(1))


def test_a_refusal_is_raised_again_without_a_pass():
    net = _OwnAttention().eval()
    passes = _Passes(net)
    x = torch.rand(1, 3, 8, 8)
    try:
        with pytest.raises(SalienceError, match="in its own forward, not in a submodule") as first:
            salience.gradcam(net, x, 0)
        assert passes.take() == 1
        with pytest.raises(SalienceError) as again:
            salience.gradcam(net, x, 0)
        assert str(again.value) == str(first.value) and passes.take() == 0
        assert "gradcam" not in default_methods(net, x)  # the layer methods left out
    finally:
        passes.handle.remove()


class _SwitchHere:
    """A user's forward hook whose attribute lookup lets another thread run at that moment, which puts salience's
    scoped hook (:func:`this_thread`, as a thread's search pass or Grad-CAM pass does) on the same module: the
    switch the interpreter may make at any bytecode, made at a known one."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.handles = module, []

    def __call__(self, *args: object) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        if name.startswith("salience_") and not self.handles:
            other = threading.Thread(target=lambda: self.handles.append(
                self.module.register_forward_hook(this_thread(lambda m, i, o: None))))
            other.start()
            other.join()
        raise AttributeError(name)


def test_the_structure_is_read_while_another_thread_hooks_the_model():
    """A thread's pass reads the model's structure (the final-softmax answer, the default layer: every vanilla and
    CAM call) while another thread's search pass hooks and unhooks every module of the shared model."""
    net = _net()
    switch = _SwitchHere(net[4])
    handles = [net[4].register_forward_hook(switch), net[4].register_forward_hook(lambda m, i, o: None)]
    try:
        perf.structure(net)  # raised RuntimeError: OrderedDict mutated during iteration
    finally:
        for h in handles + switch.handles:
            h.remove()


def test_a_cached_default_adds_no_finiteness_test(counted, monkeypatch):
    """A CAM checks its ``x`` once; the search it asks for its layer does not test ``x`` again (one more reduction,
    a host-device synchronization on a GPU): a cached call runs as many finiteness tests as one with the layer
    named. Called alone, the search still refuses a non-finite ``x``, cached or not."""
    from salience._core import autograd

    net, _ = counted
    x = torch.rand(2, 3, 8, 8)
    tests: list = []
    real = autograd._all_finite
    monkeypatch.setattr(autograd, "_all_finite", lambda t: tests.append(1) or real(t))
    salience.gradcam(net, x, 1)  # the search runs
    del tests[:]
    salience.gradcam(net, x, 1)
    cached = len(tests)
    del tests[:]
    salience.gradcam(net, x, 1, layer="4")
    assert cached == len(tests) > 0
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    for ask in (default_layer, describe_default_layer):
        with pytest.raises(SalienceError, match="1 NaN or infinite"):
            ask(net, bad)
    with pytest.raises(SalienceError, match="1 NaN or infinite"):
        salience.gradcam(net, bad, 1)
