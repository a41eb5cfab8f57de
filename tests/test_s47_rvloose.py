"""Review of session 47's loose ends (rvloose): defects found in the merged change, each test failing on b36ecb9.

1. ``folding.settings``' ``skip``: the attributes a forward writes were dropped from what the folded copy is kept
   for, also those the trace reads and bakes in (a first-call flag ``self.warmed``, a lazily set constant
   ``self.scale``): once the user's model had run (or the user set the attribute), the kept copy ran the branch or
   constant of the trace's state. Reference: the same call unfolded (session 46 refolded and matched).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from salience._core import folding
from test_s47_loose import X, _Stem

pytestmark = pytest.mark.usefixtures("fresh_perf_state")


class FirstCall(_Stem):
    """The stem; its first call halves the BatchNorm's output and sets ``self.warmed`` (a first-call branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.warmed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.c1(x))
        if not self.warmed:
            y = y * 0.5
            self.warmed = True
        y = torch.relu(self.c2(torch.relu(y)))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


class LazyScale(_Stem):
    """The stem; ``self.scale`` is set by the first call when None, then read (a trace bakes it in)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = 2.0
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))) * self.scale
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def _user_runs(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model(X)


def _user_sets_scale(model: torch.nn.Module) -> None:
    model.scale = 5.0


CASES = {"first-call flag, the user ran the model": (FirstCall, _user_runs),
         "lazily set constant, the user set it": (LazyScale, _user_sets_scale)}


@pytest.mark.parametrize("case", list(CASES))
def test_an_attribute_the_forward_reads_and_writes_still_keys_the_folded_copy(case):
    make, change = CASES[case]
    model = make().eval()
    with torch.no_grad():
        first, _ = folding.folded_model(model)  # traced in the model's first state
        torch.testing.assert_close(first(X), make().eval()(X), rtol=0, atol=1e-5)
        change(model)
        copy, why = folding.folded_model(model)
        assert copy is not None, why
        ref = model(X)
        assert (ref - first(X)).abs().max() > 1e-2  # the change changes the output
        torch.testing.assert_close(copy(X), ref, rtol=0, atol=1e-5)  # b36ecb9: the first state's copy, 0.05-0.45 off


def test_a_written_attribute_the_trace_does_not_read_is_still_skipped():
    """The session 47 saving kept: a counter, a stored activation, a list appended to (the trace does not depend on
    them) are in ``written``; a flag the trace branches on is not."""
    from test_s47_loose import Writes

    written: set = set()
    assert isinstance(folding.fx_traced(Writes().eval(), None, written=written), torch.fx.GraphModule)
    assert written == {(0, "last"), (0, "calls"), (0, "sizes")}
    written = set()
    model = FirstCall().eval()
    assert isinstance(folding.fx_traced(model, None, written=written), torch.fx.GraphModule)
    assert written == set() and model.warmed is False


class Stores(_Stem):
    """The stem; its forward stores its activation in a dict it holds and in a new dict attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.stats = {"n": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        self.stats["last"] = y
        self.feats = {"y": y}
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def test_a_trace_of_the_users_model_puts_back_its_dicts():
    """2. Occlusion traces the user's model itself (``fx_traced``): a dict the forward writes into kept a ``Proxy``
    (b36ecb9: ``model.stats["last"]`` a Proxy, after ``salience.occlusion`` too), and a dict attribute it set stayed."""
    import warnings

    import salience

    model = Stores().eval()
    stats = model.stats
    gm = folding.fx_traced(model, None)
    assert isinstance(gm, torch.fx.GraphModule)
    assert model.stats is stats and stats == {"n": 0} and "feats" not in model.__dict__
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)
    model = Stores().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        salience.occlusion(model, X, 1, window=4, stride=4)
    # the eager passes' own writes (real tensors) are the guard's matter; no trace's Proxy is left
    assert not any(isinstance(v, torch.fx.Proxy) for v in model.stats.values()), model.stats


class MadeConstant(_Stem):
    """The stem; its forward makes a tensor (``torch.tensor(0.5)``: torch.fx keeps it as ``_tensor_constant0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))) + torch.tensor(0.5)
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


class HeldConstant(_Stem):
    """:class:`MadeConstant` with its 0.5 a buffer (the same function; the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))) + self.offset
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def test_a_tensor_the_forward_makes_is_traced_folded_and_occluded():
    """3. The trace put back fx's ``_tensor_constant0`` (an attribute it added) before the ``GraphModule`` copied it:
    b36ecb9 refused such a model's fold (``AttributeError``) and ``salience.occlusion`` raised ``AttributeError``."""
    import warnings

    import salience

    model = MadeConstant().eval()
    names = set(model.__dict__)
    gm = folding.fx_traced(model, None)
    assert isinstance(gm, torch.fx.GraphModule), gm
    assert set(model.__dict__) == names  # no constant left on the user's model
    copy, why = folding.folded_model(model)
    assert copy is not None, why
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)
        torch.testing.assert_close(copy(X), model(X), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = salience.occlusion(model, X, 1, window=4, stride=4)
        ref = salience.occlusion(HeldConstant().eval(), X, 1, window=4, stride=4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert set(model.__dict__) == names
