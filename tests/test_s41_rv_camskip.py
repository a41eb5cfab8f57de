"""Review of the Score-CAM / Ablation-CAM skips (tests/test_s41_cam_skip.py): what c537931 got wrong.

* Ablation-CAM skipped a channel equal to ``value`` on the layer's *grid* of patches, but its ablation sets the
  channel on every token, a ViT's class token too: a channel equal to ``value`` on the patches and not on the
  class token changes the score when ablated (its weight is not 0, and with ``value != 0`` it multiplies a map
  of ``value``, so the map changed).
* Score-CAM's grouping of channels by their mask built float64 copies of every live channel of every image at
  once (5.5x the batch's layer output by :class:`MemoryProbe`, outside the memory budget); it now runs a block of
  images at a time (:attr:`_ChannelMasks.BLOCK_PIXELS`, one image at least), grouping the same channels.
"""
from __future__ import annotations

import torch
from torch import nn

import salience

from conftest import unchanged


class ClsTokens(nn.Module):
    """A 4 x 4 patch embedding (4 channels) -> tokens (B, 1 + 9, 4) with a class token first -> ``tok`` (the CAM
    layer) -> ``head`` of the class token plus the patches' mean. Channel 0 is 1.0 on every patch (its
    embedding is the bias alone) and 3.0 on the class token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.embed = nn.Conv2d(3, 4, 4, stride=4)
        with torch.no_grad():
            self.embed.weight[0], self.embed.bias[0] = 0.0, 1.0
        self.cls = nn.Parameter(torch.tensor([[[3.0, 0.5, -0.2, 0.1]]]))
        self.tok = nn.Identity()
        self.head = nn.Linear(4, 3)

    def tokens(self, x):
        p = self.embed(x).flatten(2).transpose(1, 2)  # (B, 9, 4)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), p], 1)

    def forward(self, x):
        t = self.tok(self.tokens(x))
        return self.head(t[:, 0] + t[:, 1:].mean(1))


def test_ablationcam_runs_a_channel_equal_to_value_on_the_patches_but_not_on_the_class_token():
    model = ClsTokens().eval()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    value = 1.0
    with torch.no_grad():
        t = model.tokens(x)  # (2, 10, 4)
        assert bool((t[:, 1:, 0] == value).all()) and bool((t[:, 0, 0] != value).all())
        s = model(x)
        c = s.argmax(1)
        y = s[torch.arange(2), c]
        # the head is linear in cls + mean(patches): setting channel k to value on every token drops the score by
        # W[c, k] (cls_k + mean_k - 2 value); w_k = (S - S_k) / S, the paper's weight
        w = model.head.weight[c] * (t[:, 0] + t[:, 1:].mean(1) - 2 * value) / y[:, None]  # (2, 4)
    grid = t[:, 1:].transpose(1, 2).unflatten(-1, (3, 3))  # (2, 4, 3, 3)
    ref = torch.einsum("bk,bkhw->bhw", w, grid).clamp(min=0)
    assert bool((w[:, 0].abs() > 1e-3).all())  # channel 0's ablation changes the score
    with unchanged(model):
        ours = salience.ablationcam(model, x, c, layer="tok", value=value, grid=(3, 3), prefix_tokens=1,
                                    upsample=False, relu=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)

