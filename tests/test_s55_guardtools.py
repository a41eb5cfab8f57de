"""Session 55: the guard's refusals in a room of their own (``salience._core.guard.refusals``), as the guard's entry
calls them.

- The one-image check of a BatchNorm without running statistics reads the entry's live table of the threads inside a
  guard: a pass of two images is refused in the thread holding the guard, and runs in another thread meanwhile (the
  user's own batch), both while the block is open; after it no hook is left and the layer counts the user's passes.
- Each refusal the entry makes still raises its ``SalienceError`` through the public API (an inference tensor, a lazy
  parameter, a graph exported in train mode), and the model comes back as it was after each.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core.guard import model_guard


def _no_stats_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_the_one_image_check_refuses_this_threads_pass_and_lets_another_threads_run():
    model = _no_stats_net().train()
    x = torch.rand(2, 3, 8, 8)
    expected = model.eval()(x).detach()  # the other thread's pass: eval mode, its own batch's statistics
    model.train()
    seen: dict = {}

    def other() -> None:
        try:
            seen["out"] = model(x).detach()
        except BaseException as e:  # pragma: no cover - the failure the test reports
            seen["error"] = e

    with model_guard(model):
        with pytest.raises(SalienceError, match=r"BatchNorm '1' has no running statistics"):
            model(x)
        model(x[:1])  # one image: allowed
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert "error" not in seen, seen.get("error")
    assert torch.equal(seen["out"], expected)
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())
    model(x)  # the user's own batch after the block: no hook left


def test_a_nested_guard_keeps_the_check_and_the_outer_exit_removes_it():
    model = _no_stats_net().eval()
    x = torch.rand(2, 3, 8, 8)
    with model_guard(model):
        with model_guard(model):
            with pytest.raises(SalienceError, match="track_running_stats=False"):
                model(x)
        with pytest.raises(SalienceError, match="track_running_stats=False"):
            model(x)
    model(x)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_the_refusals_still_raise_through_a_method_and_leave_the_model_as_it_was():
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        frozen = _no_stats_net()
    with pytest.raises(SalienceError, match="inference tensor"):
        salience.vanilla(frozen, x, 0)
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(SalienceError, match="not initialized yet"):
        salience.vanilla(lazy, x, 0)
    assert lazy.training and isinstance(lazy[0].weight, nn.parameter.UninitializedParameter)


def test_a_graph_exported_in_train_mode_is_refused_and_put_back():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(1, 3, 8, 8)
    net(x)
    net.train()
    exported = torch.export.export(net, (x,)).module()
    flags = [m.training for m in exported.modules()]
    with pytest.raises(SalienceError, match="exported in train mode"):
        salience.vanilla(exported, x, 0)
    assert [m.training for m in exported.modules()] == flags
