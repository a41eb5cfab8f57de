"""Session 47 "split": Ablation-CAM's float32 clean pass as two (scorecam._clean_apart) only where it is one pass twice
and where it can lower the peak.

On main at b54e0e2 the split ran for every float32 clean pass of all images; it is not the one pass twice where
* the model writes its own state in forward (a buffer written in place): the stopped pass saw the state after the
  first pass, the layer's output of another state (the map off);
* a user hook pair (a forward pre-hook pushing, a forward hook popping) is on the model: the stopped pass fired the
  pre-hook but not the hook (unbalanced after the call);
* a module draws noise from a torch.Generator of its own: the second pass drew other numbers (the map off).
Each is now :func:`salience.methods.scorecam._capture`'s one pass. The maps are the paper's formula by hand: A and S
from one pass, S_k with the layer's output replaced by A with channel k set to 0, w_k = (S - S_k) / S.
"""
import copy
import importlib

import torch
import torch.nn as nn
import pytest
import torchvision

import salience
from salience._core import perf as _perf
from test_s47_permem import _ablation_reference

scorecam = importlib.import_module("salience.methods.scorecam")


def _x(b: int = 3, s: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _reference(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """The paper's formula by hand (tests/test_s47_permem.py), ``(B, H, W)``: A and S from one pass, S_k one pass a
    channel with channel k of the layer's output set to 0."""
    return _ablation_reference(model, layer, x, torch.full((x.shape[0],), target), copy=True)


@pytest.fixture
def split_here(monkeypatch):
    """The split allowed at any layer (these small models' layers are not early enough for :func:`_split_pays`):
    what is tested is the fall back to the one pass."""
    monkeypatch.setattr(scorecam, "_split_pays", lambda *a, **k: True, raising=False)


class _Net(nn.Module):
    """conv -> ``pre`` (the state or the noise) -> conv (the layer) -> ReLU -> pool -> linear."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pre = pre
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.pre(self.stem(x))))


class Seen(nn.Module):
    """Adds its buffer ``seen`` (0 until its first pass, 1 after: an EMA's first update, a warm-up flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + self.seen
        self.seen.fill_(1.0)
        return out


class Warm(nn.Module):
    """Seen's flag as a plain attribute (``self.warm = True`` after its first pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.warm = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h + (1.0 if self.warm else 0.0)
        self.warm = True
        return out


class Noisy(nn.Module):
    """Adds noise from its own torch.Generator."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * torch.randn(h.shape, generator=self.gen)


@pytest.mark.parametrize("state", [Seen, Warm])
def test_a_model_that_writes_its_state_in_forward_gets_one_passs_map_and_state(split_here, state):
    """b54e0e2: the stopped pass saw ``seen`` = 1 / ``warm`` (the layer's output of another input: the map off)."""
    model, x = _Net(state()).eval(), _x()
    got = salience.ablationcam(model, x, 1, layer="conv")
    assert float(getattr(model.pre, "seen", 0.0)) == 0.0 and not getattr(model.pre, "warm", False)  # as it was
    fresh = _Net(state()).eval()
    # session 49: every pass sees the state the call found (perturbation.Found), the reference's S_k passes too:
    # ``pre`` as made before each forward (tests/test_s47_lastread.py's)
    made = copy.deepcopy(fresh.pre)
    fresh.register_forward_pre_hook(lambda m, a: setattr(m, "pre", copy.deepcopy(made)))
    ref = _reference(fresh, fresh.conv, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_user_hook_pairs_stay_balanced_and_the_map_is_the_papers(split_here):
    """b54e0e2: the stopped pass fired the model's pre-hook, not its hook: one push left after the call."""
    model, x = _Net(nn.Identity()).eval(), _x()
    stack: list = []
    handles = [m.register_forward_pre_hook(lambda mod, a: stack.append(mod)) for m in (model, model.conv)]
    handles += [m.register_forward_hook(lambda mod, a, o: None if stack.pop() else None) for m in (model, model.conv)]
    try:
        got = salience.ablationcam(model, x, 1, layer="conv")
        assert stack == []
    finally:
        for h in handles:
            h.remove()
    ref = _reference(model, model.conv, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_a_global_forward_pre_hook_keeps_the_one_pass(split_here):
    """torch's global module pre-hook / hook pair: balanced (b54e0e2: the stopped pass's modules up to the layer
    pushed without popping)."""
    model, x = _Net(nn.Identity()).eval(), _x()
    depth = [0]

    def push(mod, a):
        depth[0] += 1

    def pop(mod, a, o):
        depth[0] -= 1
    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    try:
        salience.ablationcam(model, x, 1, layer="conv", upsample=False)
    finally:
        for h in handles:
            h.remove()
    assert depth[0] == 0


def test_a_model_with_its_own_generator_gets_one_passs_noise(split_here):
    """The clean pass's ``(A, S)``: one pass's, A the layer's output of the noise S was scored with (b54e0e2: the
    stopped pass drew the generator's next numbers). The map's item passes draw more of them, per chunk: the clean
    pass is compared, with a pass of a fresh copy (the generator as the call found it)."""
    model, x = _Net(Noisy()).eval(), _x()
    a, s = scorecam._ablation_clean(model, x, model.conv, True, _perf.resolve(None, None, None), x.shape[0])
    fresh = _Net(Noisy()).eval()
    store: list = []
    h = fresh.conv.register_forward_hook(lambda m, i, o: store.append(o))
    with torch.no_grad():
        y = fresh(x)
    h.remove()
    torch.testing.assert_close(s, y, rtol=0, atol=0)
    torch.testing.assert_close(a, store[0], rtol=0, atol=0)


def _spied(monkeypatch) -> list:
    calls: list = []
    apart = scorecam._clean_apart

    def spy(*a, **k):
        calls.append("apart")
        return apart(*a, **k)
    monkeypatch.setattr(scorecam, "_clean_apart", spy)
    return calls


def test_the_split_runs_only_early_in_the_model(monkeypatch):
    """resnet50: the split at ``layer1.0.conv1`` (where it lowered the peak by 5.3 MiB), not at ``layer2.0.conv1``,
    ``layer3.5.conv3`` nor the default layer (``layer4``), where the peak was the same either way
    (docs/performance.md, session 47 "split"): no extra pass of the layers before the layer there."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.rand(1, 3, 32, 32)
    calls = _spied(monkeypatch)
    for layer, split in (("layer1.0.conv1", True), ("layer2.0.conv1", False), ("layer3.5.conv3", False),
                         (None, False)):
        calls.clear()
        salience.ablationcam(model, x, 1, layer=layer, chunk=64)
        assert calls == (["apart"] if split else []), layer


def test_a_model_that_writes_nothing_keeps_the_split(split_here, monkeypatch):
    """The checks do not fall back for nothing: a plain model (no hook, no generator, no state written) gets the two
    passes, no one pass after them, and the paper's map."""
    model, x = _Net(nn.Identity()).eval(), _x()
    calls: list = []
    capture = scorecam._capture

    def spy(*a, **k):
        calls.append("capture")
        return capture(*a, **k)
    monkeypatch.setattr(scorecam, "_capture", spy)
    apart = _spied(monkeypatch)
    got = salience.ablationcam(model, x, 1, layer="conv")
    assert apart == ["apart"] and calls == []
    torch.testing.assert_close(got, _reference(model, model.conv, x, 1), rtol=1e-4, atol=1e-6)
