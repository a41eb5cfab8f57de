"""default_methods: the guided methods left out where their default call refuses the model (an activation the rule
is not defined for, or no ReLU at all), and the CAMs and attention methods kept where the user's ``grid=`` /
``prefix_tokens=`` read the tokens that have several readings without them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import salience
from salience import SalienceError
from salience.methods import ATTENTION_METHODS, LAYER_METHODS, default_methods

GUIDED = {"guided_backprop", "deconvnet", "guided_gradcam"}


class _FunctionalNet(nn.Module):
    """Its activation called functionally: no activation module says which it is."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = self.c2(self.act(self.c1(x)))
        return self.fc(self.act(h).mean((2, 3)))


def _seq(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def _refuses(name: str, model: nn.Module, x: torch.Tensor) -> bool:
    kwargs = {"layer": "c2" if isinstance(model, _FunctionalNet) else "2"} if name == "guided_gradcam" else {}
    try:
        salience.methods.METHODS[name](model, x, **kwargs)
    except SalienceError:
        return True
    return False


@pytest.mark.parametrize("model", [
    _seq(nn.GELU()), _seq(nn.SiLU()), _seq(nn.Tanh()), _seq(nn.LeakyReLU(0.1)),
    _FunctionalNet(F.gelu).eval(), _FunctionalNet(torch.tanh).eval(),
], ids=["GELU", "SiLU", "Tanh", "LeakyReLU", "F.gelu", "tanh"])
def test_the_guided_methods_are_left_out_where_they_refuse(model):
    x = torch.rand(1, 3, 8, 8)
    assert all(_refuses(n, model, x) for n in GUIDED)  # the rule: what the default call does
    methods = default_methods(model, x)
    assert not GUIDED & set(methods)
    assert {"vanilla", "gradcam", "smoothgrad"} <= set(methods)


@pytest.mark.parametrize("model", [_seq(nn.ReLU()), _seq(nn.ReLU6()), _FunctionalNet(F.relu).eval()],
                         ids=["ReLU", "ReLU6", "F.relu"])
def test_the_guided_methods_are_kept_where_they_run(model):
    x = torch.rand(1, 3, 8, 8)
    assert not any(_refuses(n, model, x) for n in GUIDED)
    assert GUIDED <= set(default_methods(model, x))


def test_without_an_image_the_activation_modules_decide():
    assert not GUIDED & set(default_methods(_seq(nn.GELU())))
    assert GUIDED <= set(default_methods(_seq(nn.ReLU())))
    # nothing said by the modules (a functional activation): kept, for the methods' own calls to report
    assert GUIDED <= set(default_methods(_FunctionalNet(F.gelu).eval()))


class _Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj((q @ k.transpose(-2, -1) / 4).softmax(-1) @ v)


class _UnreadableViT(nn.Module):
    """A class token and 4x4 patches cut by a reshape (no patch embedding module): 17 tokens that read as 1 + 4x4 or
    8 + 3x3 (register tokens), so the CAMs and the attention methods ask for ``prefix_tokens=`` / ``grid=``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(192, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.norms = nn.ModuleList([nn.LayerNorm(16), nn.LayerNorm(16)])
        self.attns = nn.ModuleList([_Attention(16), _Attention(16)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, c, h, w = x.shape  # 4x4 patches of any image size, each averaged down to 8x8 pixels
        cells = x.reshape(b, c, 4, h // 4, 4, w // 4).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        p = self.embed(F.adaptive_avg_pool2d(cells, 8).reshape(b, 16, 192))
        t = torch.cat([self.cls.expand(b, -1, -1), p], 1)
        for norm, attn in zip(self.norms, self.attns):
            t = t + attn(norm(t))
        return self.head(F.relu(t[:, 0]))


@pytest.mark.parametrize("given", [{"prefix_tokens": 1}, {"grid": (4, 4)}])
def test_grid_or_prefix_tokens_given_keep_the_cams_and_the_attention_methods(given):
    torch.manual_seed(0)
    net = _UnreadableViT().eval()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(SalienceError, match="cannot tell which are patches"):
        salience.gradcam(net, x)
    without = set(default_methods(net, x))
    assert not (LAYER_METHODS | ATTENTION_METHODS) & without
    methods = set(default_methods(net, x, **given))
    assert (LAYER_METHODS | ATTENTION_METHODS) <= methods and without <= methods
    for name in ("gradcam", "attention_rollout", "transformer_attribution"):  # each runs with them
        assert salience.methods.METHODS[name](net, x, **given).shape == (1, 32, 32)


def test_a_bad_grid_is_refused_by_name():
    with pytest.raises(SalienceError, match="grid"):
        default_methods(_UnreadableViT().eval(), torch.rand(1, 3, 32, 32), grid=(4, 0))


def test_salience_evaluate_with_prefix_tokens_keeps_the_methods_that_take_it():
    """``salience evaluate --prefix-tokens 1`` without ``--method``: the default methods were chosen without the
    flag (no CAM, no attention method), so the flag was refused as "an option of gradcam, ...; not of vanilla"."""
    import argparse

    from salience.cli import evaluate_cmd

    torch.manual_seed(0)
    net = _UnreadableViT().eval()
    methods, options = evaluate_cmd._method_options(argparse.Namespace(images=None, n=1), net, None,
                                                    {"prefix_tokens": 1})
    assert (LAYER_METHODS | ATTENTION_METHODS) <= set(methods)
    assert options["gradcam"] == options["attention_rollout"] == {"prefix_tokens": 1}
