"""LayerCAM's ``gamma`` scales only a fusion of several layers (Jiang et al. 2021, Eq. 9). Given with one layer it
changed nothing (the map the same whatever its value: an option silently lost, as the command line already refused
``--gamma``); now it is refused there, and left out it is the paper's 2 for a list of layers."""
from __future__ import annotations

import pytest
import torch

import salience
from salience import SalienceError
from conftest import seeded_small_cnn, unchanged

X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][:2]


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_gamma_with_one_layer_is_refused_and_the_model_comes_back(gamma: float) -> None:
    model = seeded_small_cnn()
    with unchanged(model):
        with pytest.raises(SalienceError, match="only where several layers are fused"):
            salience.layercam(model, X, 0, layer=_layers(model)[0], gamma=gamma)


def test_gamma_left_out_is_the_papers_2_on_a_list_of_layers() -> None:
    """The fused map without ``gamma`` equals the one with ``gamma=2`` bit for bit, and differs from ``gamma=0.5``'s:
    Eq. 9's tanh(gamma * M / max M) of the same per-layer maps."""
    model = seeded_small_cnn()
    layers = _layers(model)
    default = salience.layercam(model, X, 0, layer=layers)
    assert torch.equal(default, salience.layercam(model, X, 0, layer=layers, gamma=2.0))
    assert not torch.equal(default, salience.layercam(model, X, 0, layer=layers, gamma=0.5))
    assert float(default.max()) <= float(torch.tanh(torch.tensor(2.0))) + 1e-6


def test_one_layer_without_gamma_is_the_raw_layercam_map() -> None:
    """One layer, no gamma: the raw map, ReLU(sum_c ReLU(dy/dA) * A) upsampled (no tanh scaling: values past tanh(2))."""
    model = seeded_small_cnn().eval()  # eval: the reference's forward then leaves the statistics as they are
    layer = _layers(model)[0]
    got = salience.layercam(model, X, 0, layer=layer, upsample=False)
    acts = {}
    mod = dict(model.named_modules())[layer]
    h = mod.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        out = model(X)
        a = acts["a"]
        g, = torch.autograd.grad(out[:, 0].sum(), a)
    finally:
        h.remove()
    want = (g.clamp(min=0) * a).sum(1).clamp(min=0).detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
