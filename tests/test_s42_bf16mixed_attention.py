"""precision="bf16-mixed" on transformers (session 42, :mod:`salience._core.islands`): the rule "an operation on a 4-D
map at a quarter of the input's sides or larger runs in fp32" read a ViT's attention tensors ``(batch, heads, tokens,
dim)`` as maps, so ``F.scaled_dot_product_attention`` and ``torch.matmul(q, k)`` ran in fp32 while ``q @ k`` (a tensor
method, which the mode runs as it is) ran in bf16. Attention, matmul and softmax now run under the bf16 autocast
whatever their sizes; a convolution on a large map still runs in fp32."""
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


def test_attention_shaped_products_run_in_bf16_and_a_large_map_conv_in_fp32():
    # a 16 px input: a (1, 2, 8, 8) tensor has both last sides past 16 / 4, as a ViT's (B, heads, 197, 64) at 224 px
    q = torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    x, w = torch.rand(1, 3, 16, 16), torch.rand(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=BF), HighResolutionFp32("cpu", (16, 16)):
        sdpa = F.scaled_dot_product_attention(q, q, q)  # was float32
        by_function = torch.matmul(q, q.transpose(-2, -1))  # was float32
        by_method = q @ q.transpose(-2, -1)  # a tensor method: bf16 before and after
        soft = F.softmax(by_method, dim=-1)  # was float32 (its bf16 input cast up)
        conv = F.conv2d(x, w, padding=1)  # a convolution on the input's full-resolution map: fp32
    assert (sdpa.dtype, by_function.dtype, by_method.dtype, soft.dtype) == (BF, BF, BF, BF)
    assert torch.equal(by_function, by_method)  # the two spellings of one product agree
    assert conv.dtype == torch.float32 and torch.equal(conv, F.conv2d(x, w, padding=1))


class _TinyViT(nn.Module):
    """A 4 px patch embedding of a 16 px image (16 tokens), one attention block through SDPA, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.fc = nn.Linear(8, 3)
        self.seen = ForwardNotes()  # the guard puts back a plain dict

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (n, 16, 8)
        q, k, v = self.qkv(t).reshape(x.shape[0], 16, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each (n, 2, 16, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        self.seen.update(embed=self.embed(x).dtype, attention=a.dtype)
        return self.fc(t + a.transpose(1, 2).reshape(x.shape[0], 16, 8)).mean(1)


def test_a_vits_attention_runs_as_under_bf16():
    model, x = _TinyViT().eval(), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with salience.performance(precision="bf16"):
        plain = salience.vanilla(model, x, 1)
    with salience.performance(precision="bf16-mixed"):
        mixed = salience.vanilla(model, x, 1)
    # the patch embedding reads the 16 px input: fp32; the attention on (2, 2, 16, 4): bf16 (was float32)
    assert model.seen == dict(embed=torch.float32, attention=BF)
    fp32 = salience.vanilla(model, x, 1)
    assert float(torch.corrcoef(torch.stack([fp32.flatten(), mixed.flatten()]))[0, 1]) > 0.99
    assert plain.shape == mixed.shape
