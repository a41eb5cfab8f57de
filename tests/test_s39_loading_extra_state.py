"""State dicts with a module's extra state (``get_extra_state`` / ``set_extra_state``: an ``_extra_state`` entry that
need not be a tensor) load as torch's ``load_state_dict`` loads them. ``read_state_dict`` refused such a file ("expected
a state dict ... got dict"), ``load_state`` refused the dict, and a tensor extra state of another shape than the
module's own was called a mismatch; each test here failed before the fix."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from salience import SalienceError
from salience.loading import load_model, load_state, read_state_dict

MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Scaled(nn.Module):
        """A convolution whose output is scaled by a plain float, kept as extra state with a list of names."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.scale, self.names = 1.0, []

        def get_extra_state(self):
            return {"scale": self.scale, "names": list(self.names)}

        def set_extra_state(self, state):
            self.scale, self.names = state["scale"], list(state["names"])

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * self.scale


    class Counter(nn.Module):
        """Extra state that is a tensor whose length is the module's own (a vocabulary, a table)."""

        def __init__(self):
            super().__init__()
            self.table = torch.zeros(2)

        def get_extra_state(self):
            return self.table

        def set_extra_state(self, state):
            self.table = state.clone()

        def forward(self, x):
            return x.mean((2, 3)) + self.table.sum()


    def build():
        return nn.Sequential(Scaled(), nn.ReLU())


    def build_counter():
        return nn.Sequential(Counter())
''')


@pytest.fixture()
def code(tmp_path, monkeypatch):
    (tmp_path / "extra_nets.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import extra_nets

    return importlib.reload(extra_nets)


def _trained(code):
    torch.manual_seed(0)
    m = code.build()
    m[0].scale, m[0].names = 2.5, ["cat", "dog"]
    return m


def test_read_state_dict_keeps_a_plain_extra_state_as_torch_load_does(tmp_path, code):
    p = tmp_path / "w.pt"
    torch.save(_trained(code).state_dict(), p)
    state = read_state_dict(p)
    reference = torch.load(p, weights_only=True)
    assert state.keys() == reference.keys()
    assert state["0._extra_state"] == {"scale": 2.5, "names": ["cat", "dog"]}


def test_load_state_loads_it_as_load_state_dict_does(tmp_path, code):
    trained = _trained(code)
    p = tmp_path / "w.pt"
    torch.save(trained.state_dict(), p)
    ours, theirs = code.build(), code.build()
    assert load_state(ours, read_state_dict(p), p, "the net") is ours
    theirs.load_state_dict(torch.load(p, weights_only=True))
    for m in (ours, theirs):
        assert (m[0].scale, m[0].names) == (2.5, ["cat", "dog"])
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), trained.parameters()))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(ours(x), trained(x)) and torch.equal(ours(x), theirs(x))


def test_load_model_python_spec_with_extra_state(tmp_path, code):
    trained = _trained(code)
    p = tmp_path / "w.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 7}, p)
    model = load_model(f"python:{tmp_path / 'extra_nets.py'}:build", weights=p)
    assert (model[0].scale, model[0].names) == (2.5, ["cat", "dog"])
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(model(x), trained(x))


def test_a_tensor_extra_state_of_another_length_loads_as_torch_loads_it(tmp_path, code):
    saved = code.build_counter()
    saved[0].table = torch.arange(5.0)
    p = tmp_path / "c.pt"
    torch.save(saved.state_dict(), p)
    ours, theirs = code.build_counter(), code.build_counter()
    theirs.load_state_dict(torch.load(p, weights_only=True))  # torch hands it to set_extra_state, whatever its shape
    load_state(ours, read_state_dict(p), p, "the counter")
    assert torch.equal(ours[0].table, theirs[0].table) and torch.equal(ours[0].table, torch.arange(5.0))


def test_extra_state_is_still_checked_as_a_key(tmp_path, code):
    """A module without extra state does not take one (torch: an unexpected key), one with it needs it (missing)."""
    trained = _trained(code)
    state = trained.state_dict()
    with pytest.raises(SalienceError, match=r"does not fit the net \(unexpected 0\._extra_state\)"):
        load_state(nn.Sequential(nn.Conv2d(3, 2, 1)), {k.replace("conv.", ""): v for k, v in state.items()}, "w.pt",
                   "the net")
    del state["0._extra_state"]
    with pytest.raises(SalienceError, match=r"does not fit the net \(missing 0\._extra_state\)"):
        load_state(code.build(), state, "w.pt", "the net")
    with pytest.raises(SalienceError, match=r"'0\.conv\.weight' holds a list"):
        load_state(code.build(), {**trained.state_dict(), "0.conv.weight": [1.0]}, "w.pt", "the net")
