"""Review of precision="bf16-mixed" (session 41, :mod:`salience._core.islands`): the rule "a torch / F function one of
whose tensor arguments is a 4-D map at a quarter of the input's resolution or larger runs in fp32, its bf16 arguments
cast" held for positional arguments only (a bf16 keyword argument stayed bf16 with autocast off: a dtype error where
plain bf16 runs), and ``out=None`` (which ``F.normalize`` and ``torch.norm`` always pass on) read as in-place (the
call ran in bf16)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core.islands import HighResolutionFp32
from test_s49_record import ForwardNotes

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

BF = torch.bfloat16


class _Biased(nn.Module):
    """A 1x1 convolution on an 8 x 8 image, its 64 positions as tokens of 2 heads, attention with a bias computed
    by a linear layer (a relative-position bias: bf16 under autocast) given as ``attn_mask=``, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 1)
        self.pos = nn.Parameter(torch.randn(64, 4))
        self.bias = nn.Linear(4, 64)
        self.fc = nn.Linear(8, 3)
        self.seen = ForwardNotes()  # the guard puts back a plain dict

    def forward(self, x):
        n = x.shape[0]
        q = self.conv(x).flatten(2).transpose(1, 2).reshape(n, 64, 2, 4).transpose(1, 2)  # (n, 2, 64, 4)
        mask = self.bias(self.pos)[None, None]  # (1, 1, 64, 64)
        a = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        self.seen.update(q=q.dtype, mask=mask.dtype, a=a.dtype)
        return self.fc(a.transpose(1, 2).reshape(n, 64, 8).mean(1))


def test_a_bf16_keyword_argument_is_cast_with_the_positional_ones():
    model, x = _Biased().eval(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = salience.vanilla(model, x, 1)
    with salience.performance(precision="bf16"):
        salience.vanilla(model, x, 1)  # plain bf16 runs it
    with salience.performance(precision="bf16-mixed"):
        b = salience.vanilla(model, x, 1)  # was: "Expected attn_mask dtype to be bool or float or to match query dtype"
    # session 42: attention runs under the bf16 autocast whatever its sizes (islands.PRODUCTS; it was fp32 here, the
    # mask cast up); the keyword cast itself: test_keyword_arguments_count_and_are_cast
    assert model.seen == dict(q=torch.float32, mask=BF, a=BF)
    assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) > 0.99


def test_keyword_arguments_count_and_are_cast():
    x, w = torch.rand(1, 4, 16, 16).to(BF), torch.rand(4, 4, 3, 3).to(BF)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        by_keyword = F.conv2d(x, weight=w, padding=1)  # was: "expected scalar type Float but found BFloat16"
        large_by_keyword = F.conv2d(input=x, weight=w, padding=1)  # was: bf16, the map unseen
    want = F.conv2d(x.float(), w.float(), padding=1)
    assert by_keyword.dtype == large_by_keyword.dtype == torch.float32
    assert torch.equal(by_keyword, want) and torch.equal(large_by_keyword, want)


def test_out_none_is_not_in_place():
    x = torch.rand(1, 4, 16, 16).to(BF)  # a bf16 map at the input's resolution
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        n = F.normalize(x, dim=1)  # F.normalize and torch.norm hand the mode out=None
        m = torch.norm(x, dim=1, keepdim=True)
        by_method = x.norm(dim=1, keepdim=True)  # torch.norm runs as x.norm() does since session 44 (islands._method_twin)
        o = torch.empty(1, 4, 16, 16, dtype=BF)
        torch.add(x, 1.0, out=o)  # a real out=: written, in its own dtype
    assert n.dtype == torch.float32  # was bf16
    torch.testing.assert_close(n, F.normalize(x.float(), dim=1), rtol=0, atol=0)
    assert m.dtype == by_method.dtype and torch.equal(m, by_method)
    assert o.dtype == BF and torch.equal(o, (x.float() + 1).to(BF))


def test_the_no_native_bf16_warning_names_bf16_mixed(monkeypatch):
    from salience._core import cpu as _cpu
    monkeypatch.setattr(_cpu, "native_bf16", lambda: False)
    monkeypatch.setattr(_cpu, "_warned", False)
    with pytest.warns(UserWarning) as got, salience.performance(precision="bf16-mixed"):
        salience.vanilla(_Biased().eval(), torch.rand(1, 3, 8, 8), 0)
    said = [str(w.message) for w in got if "this CPU" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("precision='bf16-mixed': ")  # was "precision='bf16': "


class _ChannelsLastMlp(nn.Module):
    """torchvision's ConvNeXt's pattern on a 32 x 32 image: a stride-4 stem (8 x 8, a quarter), a linear layer on the
    channels-last (N, 8, 8, 16) features, a stride-2 convolution (4 x 4, an eighth), a linear layer on (N, 4, 4, 64),
    a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.mlp1 = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 16)
        self.down, self.mlp2 = nn.Conv2d(16, 64, 2, 2), nn.Linear(64, 64)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        h = self.mlp1(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = self.mlp2(self.down(h).permute(0, 2, 3, 1))
        return self.fc(F.relu(h).mean((1, 2)))


def test_a_channels_last_map_is_read_by_its_sides_not_its_last_two_dims_area():
    model, x = _ChannelsLastMlp().eval(), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = {}
    for name in ("stem", "mlp1", "down", "mlp2"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.dtype))
    with salience.performance(precision="bf16-mixed"):
        salience.vanilla(model, x, 0)
    # (1, 4, 4, 64) is an eighth of the image: bf16 (its last two sides 4 x 64 = 256 = 32 * 32 / 16 read it as large)
    assert seen == dict(stem=torch.float32, mlp1=torch.float32, down=torch.float32, mlp2=BF)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (64, 64)):
        nhwc = F.linear(torch.rand(1, 8, 8, 256), torch.rand(8, 256))  # an eighth, 256 channels: was fp32
        nchw = F.conv2d(torch.rand(1, 2, 16, 16), torch.rand(2, 2, 1, 1))  # a quarter, channels first
        wide = F.conv2d(torch.rand(1, 2, 64, 8), torch.rand(2, 2, 1, 1))  # an eighth of the width: bf16
    assert (nhwc.dtype, nchw.dtype, wide.dtype) == (BF, torch.float32, BF)
