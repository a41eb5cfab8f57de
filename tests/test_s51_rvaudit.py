"""Review of session 51's zoo-sweep merge (61f659ee): the later-stage class-token rule of the default layer
(``_layer_search._class_token_stage``) must not take tokens that are no grid for a later stage's grid."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import salience
from salience.methods.gradcam import default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand, row_major


class _Block(nn.Module):
    """Pre-norm transformer block on ``(B, N, D)`` tokens (``nn.MultiheadAttention``, a ReLU MLP)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y)[0]
        return x + self.mlp(self.norm2(x))


class _TokenDroppingViT(nn.Module):
    """A tiny ViT that drops tokens (EViT / DynamicViT style): 64 px -> 1 class token + 4x4 patches, two blocks,
    then only the class token and the ``keep`` patches with the largest norm go on to a last block. The kept
    tokens are a selection in no grid: 1 + 4 of them is no ``1 prefix + 2x2`` stage (a hierarchical model's,
    HF PVT v1's, is made by a patch embedding of the smaller grid)."""

    def __init__(self, d: int = 16, keep: int = 4, classes: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 16, stride=16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.1)
        self.blocks = nn.ModuleList([_Block(d), _Block(d), _Block(d)])
        self.norm, self.head, self.keep = nn.LayerNorm(d), nn.Linear(d, classes), keep

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
        t = self.blocks[1](self.blocks[0](t))
        top = t[:, 1:].norm(dim=-1).topk(self.keep, dim=1).indices.sort(dim=1).values
        kept = torch.gather(t[:, 1:], 1, top[..., None].expand(-1, -1, t.shape[-1]))
        t = self.blocks[2](torch.cat([t[:, :1], kept], 1))
        return self.head(self.norm(t)[:, 0])


def test_token_dropping_vit_keeps_the_last_attention_over_the_whole_grid():
    """After the drop the last block attends over 5 tokens: the merge's rule read them as 1 class token + a 2x2
    grid (4 = the 4x4 grid halved) and made ``blocks.2.norm1`` the default, a map of 4 gathered patches drawn as
    a 2x2 image: wrong. The default stays the input of the last attention over the whole 1 + 4x4 sequence, and
    Grad-CAM there is the hand computation."""
    torch.manual_seed(0)
    net = _TokenDroppingViT().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layer = "blocks.1.norm1"
    assert default_layer(net, x) == layer
    target = torch.tensor([2, 2])
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = gradcam_by_hand(net, x, layer, target, row_major(4, 4, prefix=1))
    assert_each_varies(cam)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-7)
