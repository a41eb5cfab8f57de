"""Hooks a model's own forward registers during salience's passes and leaves on the model (a forward hook, a
pre-hook, a full backward hook, a state-dict hook, one registered lazily on the first call) are taken off when
the guard leaves (session 37): SmoothGrad's passes left one per pass, hooks the user never asked for (their own
single forward adds one). The user's own hooks, registered before, stay and are still called, also one whose key
another process's counter gave (a model pickled whole); salience's own hooks (an observer a dataset run puts on the
model around a call) stay too; torch's global module hooks are the process's and stay (another thread's profiler).
On an exception, nested in a dataset run's guard, and with two threads explaining the same model. What remains a
limit is in ``_core/guard/``'s docstring."""
from __future__ import annotations

import contextlib
import pickle
import threading

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import salience
from salience._core.autograd import this_thread
from salience._core.fingerprint import observer
from salience._core.guard import model_guard, run_guard

DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
         "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
         "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
GLOBAL_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                "_global_forward_hooks_with_kwargs", "_global_buffer_registration_hooks",
                "_global_module_registration_hooks", "_global_parameter_registration_hooks")
KINDS = ("forward", "pre", "backward", "lazy", "state_dict")


def _nothing(*args, **kwargs) -> None:
    return None


def _doubled(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2


class Hooking(nn.Module):
    """A forward that registers a hook of ``kind`` on each call (``lazy``: on its first call only, with kwargs and
    ``always_call``, so the companion dicts get keys too; another kind: none), and raises after it if ``fail``."""

    def __init__(self, kind: str, fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.kind, self.fail = kind, fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "forward":
            self.fc.register_forward_hook(_nothing)
        elif self.kind == "pre":
            self.conv.register_forward_pre_hook(_nothing)
        elif self.kind == "backward":
            self.fc.register_full_backward_hook(_nothing)
        elif self.kind == "state_dict":
            self.fc.register_state_dict_pre_hook(_nothing)
        elif self.kind == "lazy" and not getattr(self, "hooked", False):
            self.conv.register_forward_hook(_nothing, with_kwargs=True, always_call=True)
            self.conv.register_forward_pre_hook(_nothing, with_kwargs=True)
            self.hooked = True
        if self.fail:
            raise RuntimeError("the model failed")
        return self.fc(self.conv(x).relu().mean((2, 3)))


def hooks(model: nn.Module) -> tuple:
    """The keys of every hook dict of the model's modules and of torch's global ones."""
    return ([(name, [list(getattr(m, d)) for d in DICTS]) for name, m in model.named_modules()],
            [list(getattr(torch_module, d)) for d in GLOBAL_DICTS])


@pytest.fixture(autouse=True)
def global_hooks_put_back():
    """Torch's global hook dicts as they were after each test (a failing one left its global hooks behind)."""
    before = {d: dict(getattr(torch_module, d)) for d in GLOBAL_DICTS}
    yield
    for d, saved in before.items():
        now = getattr(torch_module, d)
        now.clear()
        now.update(saved)


def user_hooked(kind: str, fail: bool = False) -> tuple[nn.Module, list]:
    """A :class:`Hooking` model with a forward hook of the user's on ``fc`` counting its calls (in the list)."""
    torch.manual_seed(0)
    model, calls = Hooking(kind, fail), []
    model.fc.register_forward_hook(lambda m, i, o: calls.append(1))
    return model, calls


def explain(method: str, model: nn.Module) -> torch.Tensor:
    x = torch.rand(1, 3, 8, 8)
    if method == "smoothgrad":
        return salience.smoothgrad(model, x, 0, samples=4)
    if method == "gradcam":
        return salience.gradcam(model, x, 0, layer="conv")
    return salience.vanilla(model, x, 0)


def assert_users_hook_still_called(model: nn.Module, calls: list) -> None:
    calls.clear()
    model(torch.rand(1, 3, 8, 8))
    assert calls == [1]


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "gradcam"])
@pytest.mark.parametrize("kind", KINDS)
def test_hooks_the_forward_registers_are_taken_off(kind, method):
    model, calls = user_hooked(kind)
    before = hooks(model)
    explain(method, model)
    assert hooks(model) == before
    assert_users_hook_still_called(model, calls)


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "gradcam"])
@pytest.mark.parametrize("kind", KINDS)
def test_hooks_the_forward_registers_are_taken_off_when_it_raises(kind, method):
    model, calls = user_hooked(kind, fail=True)
    before = hooks(model)
    with pytest.raises(RuntimeError, match="the model failed"):
        explain(method, model)
    assert hooks(model) == before
    model.fail = False
    assert_users_hook_still_called(model, calls)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_in_a_guard_and_in_a_run_guard(kind):
    """SmoothGrad inside a model_guard, and calls inside a dataset run's guard: each call's hooks are off when it
    leaves (the run's state put back), an observer salience put on the model around a call stays."""
    model, calls = user_hooked(kind)
    before = hooks(model)
    with model_guard(model):
        explain("smoothgrad", model)
    assert hooks(model) == before
    with run_guard(model):
        for method in ("smoothgrad", "gradcam", "vanilla"):
            kept = model.register_forward_hook(observer(this_thread(_nothing)))
            explain(method, model)
            assert kept.id in model._forward_hooks
            kept.remove()
            assert hooks(model) == before, method
    assert hooks(model) == before
    assert_users_hook_still_called(model, calls)


@pytest.mark.parametrize("kind", ["forward", "lazy"])
def test_two_threads_explaining_the_same_model(kind):
    model, calls = user_hooked(kind)
    before = hooks(model)
    errors: list = []
    start = threading.Barrier(2)

    def work(method: str) -> None:
        try:
            start.wait()
            for _ in range(5):
                explain(method, model)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in ("smoothgrad", "gradcam")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert hooks(model) == before
    assert_users_hook_still_called(model, calls)


def test_a_hook_registered_inside_a_users_model_guard_is_taken_off():
    """``salience.model_guard`` (public) promises the model back as it was: a hook the block registers goes too."""
    model, calls = user_hooked("forward")
    before = hooks(model)
    with model_guard(model):
        model.conv.register_forward_hook(_nothing)
    assert hooks(model) == before


def test_a_hook_left_by_a_guard_that_another_threads_guard_outlived():
    """Thread A's block registers a hook, thread B's guard enters after it and leaves last, having registered
    nothing in its own block: the hook is still taken off (A noted the modules it left held, B sweeps them)."""
    model, calls = user_hooked("forward")
    before = hooks(model)
    steps = [threading.Event() for _ in range(3)]

    def a() -> None:
        with model_guard(model):
            model.fc.register_forward_hook(_nothing)
            steps[0].set()
            steps[1].wait(5)
        steps[2].set()

    def b() -> None:
        steps[0].wait(5)
        with model_guard(model):
            steps[1].set()
            steps[2].wait(5)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s.is_set() for s in steps)
    assert hooks(model) == before
    assert_users_hook_still_called(model, calls)


@pytest.mark.parametrize("ahead", [10 ** 6, 3])
def test_a_hook_whose_key_another_process_gave_stays(ahead):
    """A model pickled whole with a hook of the user's (``torch.save(model)`` and ``torch.load``, the copy a Ray actor
    unpickles) keeps the key the saving process's counter gave it, which may be past this process's counter (a fresh
    process starts at 0). The sweep took every key from the block's start on: the user's hook went at the first call
    that registered one (Grad-CAM's own), and the model's outputs changed for good. Only keys given during the block
    (below the counter when it leaves) are swept, and not one the module had when recorded: this process's counter
    reaches the key a few calls later (``ahead=3``), in a dataset run's guard too."""
    torch.manual_seed(0)
    model = Hooking("none")
    handle = model.fc.register_forward_hook(_doubled)
    dicts = model.fc._forward_hooks
    dicts[handle.id + ahead] = dicts.pop(handle.id)  # as another process's counter, further, gave it
    model = pickle.loads(pickle.dumps(model))
    x = torch.rand(1, 3, 8, 8)
    before, out = hooks(model), model(x)
    for guard in (contextlib.nullcontext(), run_guard(model)):
        with guard:
            for _ in range(3):  # Grad-CAM's own hook and a hook of the forward's: the counter moves by 2 a call
                model.kind = "forward"
                salience.gradcam(model, x, 0, layer="conv")
                model.kind = "none"
                assert hooks(model) == before
    assert torch.equal(model(x), out)


def test_a_global_hook_another_thread_registers_during_a_call_stays():
    """torch's global module hooks are the process's, not the model's: one that another thread registers while
    salience's call runs (a profiler's, a monitoring library's) stays and is still called. The sweep took every global
    hook registered anywhere in the process during the call (a key says when it was registered, not by whom)."""
    started, go = threading.Event(), threading.Event()

    class Paused(Hooking):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            started.set()
            go.wait(5)
            return super().forward(x)

    me, seen, errors = threading.get_ident(), [], []

    def count(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if threading.get_ident() == me:  # this thread's passes only (the profiler's own)
            seen.append(type(module).__name__)

    def work() -> None:
        try:
            explain("vanilla", Paused("none"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    assert started.wait(5)
    handle = torch_module.register_module_forward_hook(count)  # registered while the call holds its model
    try:
        go.set()
        thread.join()
        assert not errors
        assert handle.id in torch_module._global_forward_hooks
        nn.Linear(2, 2)(torch.rand(1, 2))
        assert seen == ["Linear"]
    finally:
        handle.remove()
