"""A tiny Vision Transformer for the tests, whose attention can run three ways with the same weights:
``nn.MultiheadAttention`` (``"mha"``, called with ``need_weights=False``), fused
``F.scaled_dot_product_attention`` (``"sdpa"``) and explicit ``softmax(q k^T / sqrt(d)) v``
(``"explicit"``). Non-square inputs, class + register tokens, and a patch embedding that is a
``Conv2d`` or an unfold + ``Linear`` (no conv: the grid must be given)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mode = "mha"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, n, d = x.shape
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
            o = a @ v
        return self.mha.out_proj(o.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """``(B, 3, H, W)`` -> ``(B, classes)``; ``prefix`` tokens (class first, then registers) before
    the ``(H / patch) x (W / patch)`` patch tokens; the head reads the class token."""

    def __init__(self, size=(24, 40), patch=8, dim=16, heads=2, depth=2, classes=5, prefix=1, conv=True):
        super().__init__()
        self.patch, self.grid = patch, (size[0] // patch, size[1] // patch)
        if conv:
            self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        else:
            self.embed_linear = nn.Linear(3 * patch * patch, dim)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.pos = nn.Parameter(0.5 * torch.randn(1, prefix + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def set_attention(self, mode: str) -> "TinyViT":
        for m in self.modules():
            if isinstance(m, Attention):
                m.mode = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed"):
            t = self.embed(x).flatten(2).transpose(1, 2)
        else:
            t = self.embed_linear(F.unfold(x, self.patch, stride=self.patch).transpose(1, 2))
        t = torch.cat([self.prefix.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


def torchvision_vit() -> nn.Module:
    """torchvision's ``VisionTransformer`` in a small configuration (32 px, patch 8, 2 layers, 2 heads,
    dim 16, 5 classes), seeded, in eval mode, its head re-drawn: torchvision initializes it to zeros."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)
    return model
