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


def _twins(b=16, d=12, h=16):
    """Layer outputs ``(b, d, h, h)`` of ReLU'd noise, where per image some channels are ``2 a + 1`` / ``a / 4``
    (exact in float32) of an earlier one and some are constant; which ones differs between images."""
    g = torch.Generator().manual_seed(3)
    acts = (torch.randn(b, d, h, h, generator=g).clamp(min=0) * 256).round() / 256  # 2 a + 1 exact
    for i in range(b):
        k = i % (d - 3)
        acts[i, k + 1] = 2 * acts[i, k] + 1
        acts[i, k + 2] = acts[i, k] / 4
        acts[i, (k + 5) % d] = 0.0
    return acts


def _reference_groups(acts, live):
    """For each live item ``j`` (channel ``j // B`` of image ``j % B``), the first live item of its image with the
    same scaling of its channel to [0, 1] in float64, compared value by value."""
    b = acts.shape[0]
    seen, out = {}, []
    for j in live.tolist():
        a = acts[j % b, j // b].double().flatten()
        key = (j % b, ((a - a.min()) / (a.max() - a.min())).numpy().tobytes())
        out.append(seen.setdefault(key, j))
    return torch.tensor(out)


def test_scorecam_groups_masks_a_block_of_images_at_a_time():
    from salience._core.engine import MemoryProbe
    from salience.methods.scorecam import _ChannelMasks

    acts = _twins()
    b, one = acts.shape[0], acts[0].numel() * 8  # one image's layer output in float64
    x = torch.rand(b, 3, 32, 32)
    masks = _ChannelMasks(x, acts, align_corners=False)
    live = masks.live()
    ref = _reference_groups(acts, live)
    assert len(live) < acts.shape[0] * acts.shape[1] and len(set(ref.tolist())) < len(live) - b  # dead and twins
    for block in (1, acts[0].numel(), 3 * acts[0].numel() + 5, 1 << 22):  # images per block: 1, 1, 3, all
        masks.BLOCK_PIXELS = block
        with MemoryProbe() as probe:
            first, source = masks.distinct(live)
        assert torch.equal(first[source], ref) and bool((first.diff() > 0).all())
        assert torch.equal(first, torch.tensor(sorted(set(ref.tolist()))))
        if block < (1 << 22):  # the float64 copies of a block of images, not of the batch
            images = max(1, block // acts[0].numel())
            assert probe.peak < 6 * images * one + 64 * len(live), (block, probe.peak, one)
