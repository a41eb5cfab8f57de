"""One table of the activations the backprop rules know (``salience.rules.ACTIVATIONS``), read by both sorters: the
rules' mode sorts torch calls by it, ``rules.activation_kind`` sorts modules by it (``default_methods`` asks the
latter where no pass says it). Each module type of the table is built and run under the rules' own dispatch mode
(``rules.ActivationCount``); each functional of the table is called under it with the same arguments: one kind for
all of an entry's spellings, modules and calls alike, and the module sorter says it without a pass. So an
activation added to the table is sorted the same way by both, and a torch activation module missing from it
(whose call the mode sorts) fails here."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import salience
from salience import rules
from salience.methods import _rules_apply

# arguments per entry, each the call's keywords and the module's constructor keywords (the same names: the module
# sorter reads a module's attributes of the call's parameter names); the first of each is the default
ARGUMENTS = {
    "hardtanh": [{}, {"min_val": 0.0, "max_val": 6.0}, {"min_val": 0.0, "max_val": 2.5}, {"min_val": 0.5}],
    "threshold": [{"threshold": 0.0, "value": 0.0}, {"threshold": 0.5, "value": 0.0}, {"threshold": 0.0, "value": -1.0}],
    "leaky_relu": [{}, {"negative_slope": 0.0}, {"negative_slope": 0.2}],
    "clamp": [{"min": 0}, {"min": 0.0, "max": 6.0}, {"min": 0.1}],
    "clip": [{"min": 0}, {"min": -1.0}],
    "clamp_min": [{"min": 0}, {"min": 0.5}],
}


def _seen(run) -> tuple[str | None, list[str]]:
    """What the rules' mode sorted in ``run(x)``: the kind (a rectifier taken over, an unsupported activation, or
    neither: None) and the names of the unsupported calls."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True) * 1  # not a leaf: in-place calls run too
    mode = rules.ActivationCount()
    with mode:
        run(x)
    assert not (mode.rectified and mode.unsupported_seen)
    kind = "rectifier" if mode.rectified else "unsupported" if mode.unsupported_seen else None
    return kind, list(mode.unsupported_seen)


def _call(func, name: str, kwargs: dict):
    if name == "prelu":  # its weight is an argument
        return lambda x: func(x, torch.tensor([0.25]), **kwargs)
    return lambda x: func(x, **kwargs)


CASES = [(name, i) for name in rules.ACTIVATIONS for i in range(len(ARGUMENTS.get(name, [{}])))]


@pytest.mark.parametrize("name, i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_modules_and_calls_of_an_entry_are_sorted_alike_by_both_readers(name, i):
    """Every spelling of an entry's call, with the same arguments, is sorted alike by the mode; each module type of
    the entry (built with those arguments where it takes them: ``nn.ReLU6`` takes none) is sorted by the mode as the
    call with the module's own arguments is, and by the module sorter without a pass the same way."""
    entry = rules.ACTIVATIONS[name]
    kwargs = ARGUMENTS.get(name, [{}])[i]
    assert entry.calls, f"{name}: no call spells it"
    kinds = {}
    for func in entry.calls:
        kind, unsupported = _seen(_call(func, name, kwargs))
        assert kind is not None or name.startswith("cl"), f"{func} not sorted as {name}"  # only clamps are "other"
        assert all(u.startswith(name) for u in unsupported), (func, unsupported)
        kinds[getattr(func, "__qualname__", str(func))] = kind
    assert len(set(kinds.values())) == 1, f"{name} {kwargs}: its calls sorted differently: {kinds}"
    for cls in entry.modules:
        try:
            module = cls(**kwargs)
        except TypeError:  # nn.ReLU6: its bounds fixed, built with the default arguments only
            continue
        own = {p: getattr(module, p) for p, _ in entry.params if p != "inplace"}
        kind, unsupported = _seen(module)
        assert kind == _seen(_call(entry.calls[0], name, own))[0], (cls, own)
        assert rules.activation_kind(module) == kind, (cls, own)
        assert all(u.startswith(name) for u in unsupported), (cls, unsupported)


def test_the_table_sorts_the_known_cases():
    """Written from the rules' definitions (module docstring of salience.rules): a ReLU, a capped ReLU with a lower
    bound of 0 and a leaky ReLU of slope 0 are rectifiers; GELU, a leaky ReLU of slope 0.01 and a hardtanh of
    lower bound -1 are not defined for; a sigmoid is no activation of theirs."""
    kind = rules.activation_kind
    assert [kind(m) for m in (nn.ReLU(), nn.ReLU6(), nn.Hardtanh(0.0, 3.0), nn.LeakyReLU(0.0), nn.Threshold(0, 0))] \
        == ["rectifier"] * 5
    assert [kind(m) for m in (nn.GELU(), nn.LeakyReLU(), nn.Hardtanh(), nn.Threshold(0.1, 0), nn.PReLU())] \
        == ["unsupported"] * 5
    assert [kind(m) for m in (nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid(), nn.Conv2d(1, 1, 1))] == [None] * 4


class _MyReLU(nn.ReLU):
    pass


def test_a_subclass_is_sorted_by_its_nearest_base_in_the_table():
    assert rules.activation_kind(_MyReLU()) == "rectifier"
    assert rules.activation_kind(nn.ReLU6()) == "rectifier"  # a Hardtanh(0, 6)


class _ReLUThatIsAGELU(nn.ReLU):
    """A ReLU by its type, a GELU by what its forward computes (a user's subclass, its own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x)


def _instance_forward_relu() -> nn.Module:
    relu = nn.ReLU()
    relu.forward = torch.nn.functional.silu  # an instance forward: the type says nothing of the call
    return relu


@pytest.mark.parametrize("make", [_ReLUThatIsAGELU, _instance_forward_relu], ids=["subclass", "instance"])
def test_a_module_with_a_forward_of_its_own_is_not_sorted_by_its_type(make):
    """The table says what a torch.nn type's own forward calls; a module whose forward is another (a subclass's, an
    instance's) is None: the rules' mode, which sorts the calls it makes, says unsupported. So ``default_methods``
    without the search's pass runs its one pass under the guided rule, which sees the GELU / SiLU and leaves guided
    backprop out, as guided backprop refuses the model (it was kept: the module said "rectifier")."""
    module = make()
    assert _seen(module)[0] == "unsupported"
    assert rules.activation_kind(module) is None
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(1, 3, 8, 8)
    model(x)
    with pytest.raises(salience.SalienceError):
        salience.guided_backprop(model, x, 0)
    assert not _rules_apply(model, x)



class _OwnGELU(nn.GELU):
    """timm's PReLU's way: a subclass of an activation the rules are not defined for, its forward its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate=self.approximate)


def test_a_subclass_of_an_unsupported_activation_with_its_own_forward_stays_unsupported():
    """So ``default_methods`` without an image still leaves guided backprop out of such a model (as before)."""
    assert _seen(_OwnGELU())[0] == "unsupported" and rules.activation_kind(_OwnGELU()) == "unsupported"
    assert not _rules_apply(nn.Sequential(nn.Conv2d(3, 4, 3), _OwnGELU()), None)


def _torch_activation_modules() -> list[type]:
    found = []
    for _, cls in vars(nn.modules.activation).items():
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == nn.modules.activation.__name__):
            continue
        try:
            cls()
        except TypeError:  # arguments required (Threshold: in the table; MultiheadAttention: no activation)
            continue
        found.append(cls)
    return found


@pytest.mark.parametrize("cls", _torch_activation_modules(), ids=lambda c: c.__name__)
def test_every_torch_activation_module_the_mode_sorts_is_in_the_table(cls):
    """torch's own activation modules: one whose call the rules' mode sorts as an activation is in the table, and the
    module sorter says the same kind without a pass."""
    module = cls(dim=1) if cls in (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU) else cls()
    kind, _ = _seen(lambda x: module(torch.cat([x, x], 1)))
    assert rules.activation_kind(module) == kind
    if kind is not None:
        assert any(issubclass(cls, t) for a in rules.ACTIVATIONS.values() for t in a.modules)
