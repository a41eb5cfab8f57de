"""What a model's own forward changes on itself during salience's passes comes back as it was, on success and on an
exception mid-call (session 36): a buffer slot registered as ``None`` that the forward fills (a cache), buffers
registered, replaced or deleted, plain attributes (a call counter, the last shape, a cached tensor: SmoothGrad runs
its passes, which the user did not ask for), an attribute a hook of the user's sets on a torch.nn layer (the old
``torch.nn.utils.weight_norm``'s), and a parametrized layer's originals (``weight_norm`` of
``torch.nn.utils.parametrizations``). What remains a limit is in ``_core/guard/``'s docstring."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience._core.guard import model_guard, run_guard


class Caching(nn.Module):
    """A forward that changes the module itself: a counter, the last shape, a cached tensor, a buffer slot
    registered as ``None`` filled, a buffer replaced, one registered and one deleted; ``fail``: it raises on a
    pass of more than one image (SmoothGrad's noisy copies), after the changes."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fail = fail
        self.calls = 0
        self.register_buffer("cache", None)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("gone", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_shape = tuple(x.shape)
        self.seen = x
        self.cache = x.detach()
        self.scale = torch.full((1,), 2.0)
        if "gone" in self._buffers:
            del self.gone
        self.register_buffer("added", torch.zeros(1), persistent=False)
        if self.fail and x.shape[0] > 1:
            raise RuntimeError("the model failed")
        return self.conv(x).mean((2, 3)) * self.scale


def state(model: nn.Module) -> tuple:
    """What must come back: the attributes (values by identity), the buffers' names in order and objects, the
    non-persistent names."""
    attrs = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    return (sorted(attrs), [id(v) for _, v in sorted(attrs.items())], list(model._buffers),
            [id(b) for b in model._buffers.values()], sorted(model._non_persistent_buffers_set))


@pytest.mark.parametrize("method", ["vanilla", "smoothgrad", "integrated_gradients"])
def test_what_the_forward_changes_on_itself_comes_back(method):
    torch.manual_seed(0)
    model = Caching()
    before, scale = state(model), model.scale
    getattr(salience, method)(model, torch.rand(1, 3, 8, 8), 0)
    assert state(model) == before
    assert model.calls == 0 and model._buffers["cache"] is None and model.scale is scale
    assert "seen" not in vars(model) and "added" not in model._buffers and "gone" in model._buffers


def test_what_the_forward_changes_on_itself_comes_back_after_it_raises():
    torch.manual_seed(0)
    model = Caching(fail=True)
    before = state(model)
    with pytest.raises(Exception, match="the model failed"):
        salience.smoothgrad(model, torch.rand(1, 3, 8, 8), 0, samples=4)
    assert state(model) == before
    assert model.calls == 0 and model._buffers["cache"] is None


def test_a_user_call_in_the_guard_block_is_undone_too():
    """The guard's own block: what a forward run there changes is put back when it leaves, also on an error."""
    model = Caching()
    before = state(model)
    with pytest.raises(KeyError):
        with model_guard(model):
            model(torch.rand(2, 3, 8, 8))
            raise KeyError("stop")
    assert state(model) == before


def test_a_run_guard_puts_back_the_runs_state_after_each_call_and_the_users_at_its_end():
    model = Caching()
    model.calls = 7
    before = state(model)
    with run_guard(model):
        for _ in range(3):
            with model_guard(model):
                model(torch.rand(1, 3, 8, 8))
            assert model.calls == 7 and model._buffers["cache"] is None and "added" not in model._buffers
    assert state(model) == before


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the old weight_norm, deprecated
def test_an_attribute_a_users_hook_sets_on_a_torch_layer_comes_back():
    """A torch.nn layer is not copied unless a hook (or an instance forward) may set its attributes: here the
    old ``torch.nn.utils.weight_norm``, whose forward pre-hook sets ``weight`` from ``weight_g`` and ``weight_v``
    on each pass (under the guard, a tensor of salience's pass, its parameters frozen), and a forward hook."""
    torch.manual_seed(0)
    conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    conv.register_forward_hook(lambda module, args, out: setattr(module, "last", out))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    weight = conv.weight
    salience.vanilla(model, torch.rand(1, 3, 8, 8), 0)
    assert conv.weight is weight and weight.requires_grad and "last" not in vars(conv)


@pytest.mark.parametrize("method", ["vanilla", "gradcam"])
def test_a_parametrized_layer_comes_back_with_its_originals(method):
    """``parametrizations.weight_norm``: the originals are parameters of the parametrization's list, held and put
    back as any (``requires_grad`` of each, one frozen by the user, the data, the mode, no ``.grad``)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    originals = model[0].parametrizations.weight
    originals.original0.requires_grad_(False)
    params = dict(model.named_parameters())
    before = {k: (p.detach().clone(), p.requires_grad, p.data_ptr()) for k, p in params.items()}
    kwargs = {"layer": "0"} if method == "gradcam" else {}
    getattr(salience, method)(model, torch.rand(1, 3, 8, 8), 0, **kwargs)
    assert dict(model.named_parameters()) == params
    for k, p in params.items():
        assert torch.equal(p, before[k][0]) and p.requires_grad == before[k][1] and p.data_ptr() == before[k][2]
        assert p.grad is None
    assert all(m.training for m in model.modules())
    assert originals.original0 is params["0.parametrizations.weight.original0"]


class Rewiring(nn.Module):
    """A forward that replaces its parameters (one of one element by an unequal one, one of three by an equal one:
    each a new object) and its submodule, registers new ones and deletes one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.gain = nn.Parameter(torch.ones(1))
        self.mix = nn.Parameter(torch.ones(3))
        self.bias_gone = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gain = nn.Parameter(self.gain.detach() + 1)
        self.mix = nn.Parameter(torch.ones(3))  # an equal parameter, not the user's
        self.act = nn.Identity()
        self.register_parameter("extra", nn.Parameter(torch.zeros(1)))
        self.add_module("spare", nn.Identity())
        if "bias_gone" in self._parameters:
            del self.bias_gone
        return self.act(self.conv(x)).mean((2, 3))[:, :3] * self.gain * self.mix


@pytest.mark.parametrize("fail", [False, True])
def test_parameters_and_submodules_the_forward_replaces_registers_or_deletes_come_back(fail):
    torch.manual_seed(0)
    model = Rewiring()
    params, children = dict(model._parameters), dict(model._modules)
    x = torch.rand(1, 3, 8, 8)
    if fail:
        with pytest.raises(KeyError):
            with model_guard(model):
                model(x)
                raise KeyError("stop")
    else:
        salience.vanilla(model, x, 0)
    assert list(model._parameters) == list(params) and all(model._parameters[k] is p for k, p in params.items())
    assert list(model._modules) == list(children) and all(model._modules[k] is m for k, m in children.items())
    assert all(p.requires_grad for p in model.parameters())


class Noting(nn.Module):
    """A forward that notes its input and registers a buffer only on passes with autograd (salience's): what salience's
    restore takes off again while the user's own thread runs the model without autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.ones(1))
        self.register_parameter("gain", nn.Parameter(torch.ones(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.seen = x
            self.register_buffer("noted", x.detach(), persistent=False)
            self.register_parameter("extra", nn.Parameter(torch.zeros(1)))
        return self.conv(x).mean((2, 3)) * self.scale * self.gain


def test_the_users_thread_running_the_model_meanwhile_never_misses_an_attribute():
    """Putting back a module's dict, its buffers and parameters never takes away, even for an instant, what the
    user's model has: before, the dicts were cleared and refilled, and the user's own thread running the model
    meanwhile (no_grad inference) failed at random: "'Noting' object has no attribute '_backward_hooks'" (or
    'conv', 'scale'). Switching threads every microsecond makes that instant likely (1074 failures in 8 s before)."""
    import sys
    import threading
    import time

    model = Noting().eval()
    x = torch.rand(1, 3, 8, 8)
    errors: list = []
    stop = threading.Event()

    def user() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    model(x)
            except Exception as e:  # noqa: BLE001 - any failure of the user's forward is the finding
                errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=user)
    thread.start()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not errors:
            salience.vanilla(model, x, 0)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert "seen" not in vars(model) and list(model._buffers) == ["scale"] and list(model._parameters) == ["gain"]


class Repersisting(nn.Module):
    """A forward that registers its non-persistent buffer again with ``register_buffer``'s default, persistent, and a
    persistent one as non-persistent: the same names, the same order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("cache", torch.zeros(1), persistent=False)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.register_buffer("cache", x.detach())
        self.register_buffer("scale", self.scale, persistent=False)
        return self.conv(x).mean((2, 3)) * self.scale


@pytest.mark.parametrize("run", [False, True])
def test_which_buffers_persist_comes_back_when_the_names_stay(run):
    """The state dict keeps the user's keys: before, the non-persistent names were put back only when a buffer was
    registered or deleted, and here ``cache`` went into the state dict and ``scale`` out of it (a fresh model then
    refused the saved state: an unexpected key, a missing one)."""
    model = Repersisting()
    keys = list(model.state_dict())
    if run:
        with run_guard(model):
            salience.vanilla(model, torch.rand(1, 3, 8, 8), 0)
            assert list(model.state_dict()) == keys  # the run's baseline, after the call
    else:
        salience.vanilla(model, torch.rand(1, 3, 8, 8), 0)
    assert list(model.state_dict()) == keys == ["scale", "conv.weight", "conv.bias"]
    assert model._non_persistent_buffers_set == {"cache"}


class _Attending(nn.Module):
    """An ``nn.MultiheadAttention`` on its fast path's terms (rollout's pass runs it by an instance ``forward``,
    attention._NativeMHA) after a patch embedding, with a class token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Conv2d(3, 8, 4, 4)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.emb(x).flatten(2).transpose(1, 2)
        t = torch.cat([t[:, :1] * 0, t], 1)
        return self.head((t + self.att(t, t, t)[0]).mean(1))


def test_a_dataset_run_entered_during_another_threads_call_leaves_no_instance_forward():
    """A run guard entered (in another thread) while attention rollout's pass has its instance ``forward`` on an
    ``nn.MultiheadAttention`` (a torch.nn layer, whose dict the first guard did not copy): the run's baseline copied
    it, put it back after the run's next call, and nothing took it off at the end: the user's layer kept salience's
    ``_NativeMHA`` for good (a regression of session 36; before, the baseline did not copy a module's dict)."""
    import threading

    torch.manual_seed(0)
    model = _Attending().eval()
    x = torch.rand(1, 3, 16, 16)
    salience.attention_rollout(model, x, prefix_tokens=1)  # learns where the attention runs
    entered, done, seen, thread = threading.Event(), threading.Event(), [], []

    def dataset_run() -> None:
        with run_guard(model):
            entered.set()
            done.wait(10)
            with model_guard(model):  # a call of the run, after rollout's call ended
                pass
            seen.append(model.att.__dict__.get("forward"))

    def pre(module: nn.Module, args: tuple) -> None:
        if not thread and "forward" in vars(model.att):  # rollout's pass, its instance forward on
            thread.append(threading.Thread(target=dataset_run))
            thread[0].start()
            entered.wait(10)

    handle = model.emb.register_forward_pre_hook(pre)
    try:
        salience.attention_rollout(model, x, prefix_tokens=1)
    finally:
        handle.remove()
        done.set()
        for t in thread:
            t.join()
    assert len(thread) == 1 and seen == [None]
    assert "forward" not in vars(model.att)
