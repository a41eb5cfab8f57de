"""Review of the session-55 matrix change (tests/test_s55_matrix.py and its fixes): the fixes' boundaries, and the
map values the matrix does not check (it checks shape and finiteness only).

* ``blur_sigma`` past what the blur can use: a huge finite one (``1e308``: ``3 * sigma`` is ``inf``) was a raw
  ``OverflowError`` (the fix refused ``inf`` only); one that float32 rounds to 0 (``1e-300``) a NaN kernel, refused as
  "path points NaN". Now the limits: a box blur over the whole side, and no blur.
* a number past float's range given as a Python int (``10**400``) for a baseline / Ablation-CAM's value: a raw
  ``OverflowError`` beside the new ``check_fits`` refusal of ``1e308``.
* LayerCAM's fused ``gamma`` as an int past int64 (``2**64``, ``10**400``): a raw ``OverflowError`` (the fix bounded
  floats only).
* peers: the TorchScript (scripted, traced) and ``.pt2`` copies of the CNN, the CNN behind a tuple / dict output read
  with ``output=``, the CNN with frozen parameters and in train mode give the CNN's own maps, bit for bit, for every
  method that runs on them.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import salience
from salience import SalienceError
from salience._core.tensors import check_number, gaussian_blur
from conftest import unchanged
from test_s55_matrix import KINDS, _cnn, cells, expected_refusal, image

HUGE_INT = 10 ** 400  # past float's range: float(HUGE_INT) raises OverflowError


def _box_blur(x: torch.Tensor, r: int) -> torch.Tensor:
    """The mean over a (2r+1)-tap window per axis with reflect padding: the Gaussian of an infinite sigma cut at ``r``."""
    c = x.shape[1]
    k = torch.full((c, 1, 1, 2 * r + 1), 1.0 / (2 * r + 1), dtype=x.dtype)
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=c)


def test_a_huge_blur_sigma_is_the_box_blur() -> None:
    """``blur_sigma=1e308`` (finite: the fix let it through to a raw ``OverflowError``) is the limit of the Gaussian:
    a box blur over the side's whole reach (radius side - 1); IG from it equals IG from that box blur as a tensor."""
    model, x = _cnn(), image("cnn")
    want = _box_blur(x, x.shape[-1] - 1)
    torch.testing.assert_close(gaussian_blur(x, 1e308), want, rtol=1e-5, atol=1e-6)
    with unchanged(model):
        got = salience.integrated_gradients(model, x, baseline="blur", blur_sigma=1e308, steps=2, reduce=None)
    ref = salience.integrated_gradients(model, x, baseline=want, steps=2, reduce=None)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_a_blur_sigma_float32_rounds_to_zero_is_no_blur() -> None:
    """``blur_sigma=1e-300`` (positive, finite: accepted) is float32's 0: no blur, the baseline ``x`` itself, so IG's
    attributions ``(x - x') * mean gradient`` are exactly 0 (was a NaN kernel, refused as NaN path points)."""
    model, x = _cnn(), image("cnn")
    assert torch.equal(gaussian_blur(x, 1e-300), x)
    with unchanged(model):
        m = salience.integrated_gradients(model, x, baseline="blur", blur_sigma=1e-300, steps=2, reduce=None)
    assert torch.equal(m, torch.zeros_like(x))


@pytest.mark.parametrize("method, kw, says", [
    ("integrated_gradients", {"baseline": HUGE_INT}, "give a finite number"),
    ("occlusion", {"baseline": HUGE_INT, "window": 8}, "baseline must be a finite number"),
    ("ablationcam", {"value": HUGE_INT}, "value must be a finite number"),
    ("integrated_gradients", {"baseline": "blur", "blur_sigma": HUGE_INT}, "blur_sigma must be a finite number"),
])
def test_an_int_past_floats_range_is_refused(method: str, kw: dict[str, Any], says: str) -> None:
    """An int float cannot hold is refused like ``1e308`` / ``inf`` (was the raw ``OverflowError`` of ``float()``);
    the model comes back as it was."""
    model, x = _cnn(), image("cnn")
    with unchanged(model), pytest.raises(SalienceError, match=says):
        salience.METHODS[method](model, x, **kw)
    assert check_number(HUGE_INT, "n", finite=False) == float("inf")  # where infinity is allowed: it is one


def test_layercams_int_gamma_past_int64() -> None:
    """LayerCAM over several layers with an int ``gamma``: ``2**64`` (finite, a float 1.8e19) gives the map of that
    float, ``10**400`` (past float's range) is refused like ``inf`` (both were torch's raw ``OverflowError``)."""
    model, x = _cnn(), image("cnn")
    layers = ["features.3", "features.0"]
    with unchanged(model):
        got = salience.layercam(model, x, layer=layers, gamma=2 ** 64)
        with pytest.raises(SalienceError, match="gamma must be a positive finite number"):
            salience.layercam(model, x, layer=layers, gamma=HUGE_INT)
    assert torch.equal(got, salience.layercam(model, x, layer=layers, gamma=float(2 ** 64)))


PEERS = ("scripted", "traced", "exported", "tuple", "dict", "frozen", "train_mode")
"""Kinds whose model computes SmallCNN's function (``seeded_small_cnn`` in eval mode): each must give its maps."""

_RUN_ON_CNN = [m for m in salience.METHODS if expected_refusal("cnn", m, "default") is None]  # not attention's


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    """Each peer kind's model, built once (the ``.pt2`` export costs a second)."""
    out = {}
    for kind in PEERS:
        builder = KINDS[kind][0]
        out[kind] = builder(tmp_path_factory.mktemp("pt2")) if kind == "exported" else builder()
    return out


@pytest.mark.parametrize("method", _RUN_ON_CNN)
def test_peers_give_the_cnns_own_maps(peers: dict[str, torch.nn.Module], method: str) -> None:
    """The same function in another form gives the same map bit for bit (salience runs a train-mode model in eval
    mode, reads a tuple / dict output's chosen entry, and a TorchScript / exported copy runs the same kernels);
    the cells the matrix lists as refused (the hooked methods on TorchScript) are left out."""
    x = image("cnn")
    default = dict(cells("cnn", method))["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = salience.METHODS[method](_cnn(), x, **default)
        ran = []
        for kind, model in peers.items():
            if expected_refusal(kind, method, "default") is None:
                got = salience.METHODS[method](model, x, **default)
                ran.append(kind)
                assert torch.equal(got, want), f"{kind} x {method}: {(got - want).abs().max().item():.3g} off the CNN's"
    assert len(ran) >= 5, ran  # the five non-TorchScript peers run every method the CNN runs
