"""The BatchNorm-folded copy gives back what the model gives back (session 53).

``torch.fx`` lowers any returned dict to a plain one, so the ``fold_batchnorm=True`` copy of a model returning a Hugging
Face ``ModelOutput`` returned ``{"logits": ...}``: with ``output=lambda o: o.logits`` or ``output=0`` every method that
ran the copy raised "does not fit: the model returned a dict with keys ['logits']", where the same call without
``fold_batchnorm`` worked. ``folding.ThisThreadTracer.create_arg`` now makes a dict of a subclass again in the graph
(a dataclass by its fields, an ``OrderedDict`` or a dict-constructor subclass by its items); a type it cannot make
again stays a plain dict (``folding.FxPlainDict``) whose attribute / index pick says to pick by key.

Each map with ``fold_batchnorm=True`` (the copy's passes: no ``F.batch_norm`` call in them but RISE's and occlusion's
pass on the clean images, which runs the model) must equal the map of ``fold_batchnorm=False`` (the model's own passes)
within ``2**-13 * scale``: ``scale`` the map's largest magnitude for the gradient maps (vanilla, SmoothGrad), the clean
logits' for RISE and occlusion (sums and differences of scores: their rounding is the scores', and occlusion's
differences cancel most of them). Derivation: the copy computes the same function with each BatchNorm's affine map
multiplied into the convolution before it, so only rounding differs. In float32 (unit roundoff ``u = 2**-24``) each
folded weight carries at most 3 roundings more (``gamma / sqrt(var + eps)``, the products) and each convolution output,
a sum of ``K = 3 * 3 * 8 = 72`` products, is summed in another order (at most ``K u`` of the sum of the products'
magnitudes); over two such layers, the head and the gradient pass back through them, ``4 (K + 3) u = 300 u``, times the
ratio of the products' magnitudes to ``scale`` (a few: random weights), stays under ``2**11 u = 2**-13``. Seen: at most
1.8e-7 of ``scale`` (about 3 u). A wrong fold (a BatchNorm's statistics lost) moves the maps by
about their own size: the BatchNorms here have random statistics, far from the identity. Tiny nets at 16 px.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import perf as _perf
from salience._core.errors import SalienceError
from salience._core.folding import folded_model
from salience.loading.custom import select_output
from test_s53_hfout import _Scores  # a dict whose constructor takes the scores alone
from test_s53_rvhfout import _BN  # convolutions + BatchNorms returning a ModelOutput

transformers = pytest.importorskip("transformers")

TOL = 2 ** -13


def _randomised(m: nn.Module) -> nn.Module:
    """``m`` with each BatchNorm's weight, bias and running statistics random (the fold far from the identity)."""
    g = torch.Generator().manual_seed(1)
    for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.25)
    return m


def _Net() -> nn.Module:
    """Two convolution + BatchNorm + ReLU blocks and a linear head, returning Hugging Face's
    ``ImageClassifierOutputWithNoAttention`` (tests/test_s53_rvhfout.py's net), its BatchNorms random."""
    return _randomised(_BN())


PICKS = {"key": "logits", "attribute": lambda o: o.logits, "index": 0}
METHODS = {
    "vanilla": lambda m, x: salience.vanilla(m, x, 1, reduce=None),
    "rise": lambda m, x: salience.rise(m, x, 1, masks=16, cell=4),
    "occlusion": lambda m, x: salience.occlusion(m, x, 1, window=8, stride=8, reduce=None, local=False),
    "smoothgrad": lambda m, x: salience.smoothgrad(m, x, 1, samples=4, reduce=None),
}


def _norms(monkeypatch) -> list:
    """A list that each ``F.batch_norm`` call appends its batch size to (the model's passes; the folded copy has no
    BatchNorm)."""
    calls: list = []
    real = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    return calls


def _state(model: nn.Module) -> tuple:
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("pick", list(PICKS))
def test_folded_map_equals_the_models_for_every_output_pick(monkeypatch, pick, method):
    """main: "output=0 does not fit: the model returned a dict with keys ['logits']" (index and attribute picks)."""
    model = select_output(_Net().eval(), PICKS[pick])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    params, modes = _state(model)
    ref = METHODS[method](model, x)
    norms = _norms(monkeypatch)
    with _perf.performance(fold_batchnorm=True):
        METHODS[method](model, x)  # a first call may run the model itself (its softmax check)
        norms.clear()
        got = METHODS[method](model, x)
    # the copy ran every pass of perturbed or noisy images (RISE and occlusion take the clean scores from the model)
    assert all(n == len(x) for n in norms), norms
    assert len(norms) <= 2 and (method in ("rise", "occlusion")) == bool(norms), norms
    with torch.no_grad():
        s = float((ref if method in ("vanilla", "smoothgrad") else model(x).logits).abs().max())
    assert float(ref.abs().max()) > 0 and got.shape == ref.shape
    assert float((got - ref).abs().max()) <= TOL * s, (float((got - ref).abs().max()), s)
    assert params.keys() == model.state_dict().keys()
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert modes == [m.training for m in model.modules()]


def test_the_folded_copy_returns_the_models_output_type():
    """The copy's output is the model's ``ImageClassifierOutput`` (by attribute, index and key), the fold real."""
    model = _Net().eval()
    copy, why = folded_model(model)
    assert copy is not None, why
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(x), copy(x)
    assert type(got) is type(want) and list(got.keys()) == ["logits"]
    assert torch.equal(got.logits, got[0]) and torch.equal(got.logits, got["logits"])
    assert float((got.logits - want.logits).abs().max()) <= TOL * float(want.logits.abs().max())


class _Odd(_BN):
    """The same net returning tests/test_s53_hfout.py's ``_Scores``: a dict subclass a trace cannot make again."""

    def __init__(self) -> None:
        super().__init__()
        _randomised(self)

    def forward(self, x: torch.Tensor):
        return _Scores(self.head(self.body(x).mean((2, 3))))


def test_a_type_it_cannot_rebuild_says_to_pick_by_key(monkeypatch):
    """The key pick folds with the model's map; the attribute pick's error says to use the key (main: "'dict' object
    has no attribute 'scores'", no word of the trace nor of the key)."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    model = select_output(_Odd().eval(), "scores")
    ref = salience.vanilla(model, x, 1, reduce=None)
    norms = _norms(monkeypatch)
    with _perf.performance(fold_batchnorm=True):
        salience.vanilla(model, x, 1, reduce=None)
        norms.clear()
        got = salience.vanilla(model, x, 1, reduce=None)
    assert not norms
    assert float((got - ref).abs().max()) <= TOL * float(ref.abs().max())
    picked = select_output(_Odd().eval(), lambda o: o.scores)
    salience.vanilla(picked, x, 1)  # the model itself: its _Scores has the attribute
    with _perf.performance(fold_batchnorm=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SalienceError, match=r"_Scores back as a plain dict.*output='scores'"):
            for _ in range(2):  # the first call may run the model itself
                salience.vanilla(picked, x, 1)
    from salience._core.folding import FxPlainDict  # session 53's
    with pytest.raises(KeyError, match=r"no key 0: .*output='scores'"):  # a KeyError (review: was TypeError)
        FxPlainDict([("scores", 1)], "_Scores")[0]


def test_the_error_names_no_internal_class():
    """The attribute pick's error on the folded copy says "a dict with keys", not the internal ``FxPlainDict``
    (the lead's read of session 53: "the model returned a FxPlainDict with keys ['scores']")."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    picked = select_output(_Odd().eval(), lambda o: o.scores)
    with _perf.performance(fold_batchnorm=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SalienceError, match=r"returned a dict with keys \['scores'\]") as err:
            for _ in range(2):  # the first call may run the model itself
                salience.vanilla(picked, x, 1)
    assert "FxPlainDict" not in str(err.value)
