"""Demo models shipped with salience, trained on :mod:`salience.data` shapes (no downloads).

:func:`load_demo` builds a :class:`ShapesNet` and loads its weights from the package
(``salience/demo/_weights/<name>.pt``, float16 on disk, float32 in memory), or a :class:`ShapesViT`
(``shapes-vit``, a small Vision Transformer). Each model takes images
``(B, 3, 64, 64)`` in ``[0, 1]`` (it normalizes internally), so preprocessing is only "resize to
64x64, scale to [0, 1]". The metadata (held-out accuracy or error, seed, training command) sits
beside the weights in ``<name>.json`` and is available as ``model.salience_info.extra``.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Optional, Sequence

import torch
from torch import nn

from salience._core.errors import SalienceError
from salience._core.info import ModelInfo, attach_info
from salience._core.tensors import check_flag

__all__ = ["DEMOS", "ShapesNet", "ShapesViT", "ARCHITECTURES", "build", "load_demo", "demo_metadata"]

DEMOS: dict[str, str] = {
    "shapes": "CNN classifying the five shapes of salience.data (circle, square, triangle, cross, star)",
    "shapes-regression": "CNN regressing the shape's size and horizontal position, outputs (B, 2)",
    "shapes-cue": "CNN classifier trained with a class-revealing cue mark (a 'Clever Hans' model)",
    "shapes-vit": "small Vision Transformer (patch 8, class token, 4 blocks) classifying the five shapes",
}
"""Name -> one-line description of each demo model."""

_MEAN = (0.5, 0.5, 0.5)
_STD = (0.25, 0.25, 0.25)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the fixed first layer of :class:`ShapesNet`."""

    def __init__(self, mean: Sequence[float] = _MEAN, std: Sequence[float] = _STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm, ``nn.ReLU`` (a module, so guided backprop can find it)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class ShapesNet(nn.Module):
    """A small CNN for ``(B, 3, 64, 64)`` images in ``[0, 1]``; output ``(B, num_outputs)``.

    ``normalize`` -> ``features`` (conv blocks with 2x2 max pooling between them) -> ``pool`` ->
    ``head``. ``head="avg"``: global average pooling then a linear layer (a classifier that does
    not care where the shape is); ``head="flatten"``: a linear layer over the last feature map,
    which keeps positions (for regressing where the shape is; needs 64x64 input). ``hidden``:
    width of a hidden layer (with ``nn.ReLU``) in the head; 0 for none.
    """

    def __init__(
        self,
        num_outputs: int = 5,
        widths: Sequence[int] = (16, 32, 64, 64),
        head: str = "avg",
        hidden: int = 0,
        input_size: int = 64,
    ):
        super().__init__()
        if head not in ("avg", "flatten"):
            raise SalienceError(f"ShapesNet: head must be 'avg' or 'flatten', got {head!r}.")
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(ConvBlock(c, int(w)))
            c = int(w)
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** (len(widths) - 1)
        self.pool = nn.AdaptiveAvgPool2d(1) if head == "avg" else nn.Identity()
        self.flatten = nn.Flatten()
        n_in = c if head == "avg" else c * side * side
        if hidden:
            self.head: nn.Module = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))
        else:
            self.head = nn.Linear(n_in, num_outputs)
        self.config = {"num_outputs": num_outputs, "widths": [int(w) for w in widths], "head": head,
                       "hidden": hidden, "input_size": input_size}

    @property
    def last_block(self) -> str:
        """Dotted name of the last conv block (Grad-CAM's default layer)."""
        return f"features.{len(self.features) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(self.normalize(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention as timm writes it: one ``qkv`` Linear, the fused
    ``F.scaled_dot_product_attention`` (the attention matrix is never formed, so the attention
    methods must capture it), an output ``proj`` Linear. ``(B, N, dim) -> (B, N, dim)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise SalienceError(f"SelfAttention: dim {dim} is not a multiple of heads {heads}.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """A pre-norm transformer encoder block, as torchvision's: ``x + attn(ln_1(x))``, then
    ``x + mlp(ln_2(x))`` (Linear, GELU, Linear), the attention a :class:`SelfAttention`."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _conv_stem(dim: int, patch: int) -> nn.Sequential:
    """``log2(patch)`` 3x3 stride-2 convolutions (widths doubling from 16 up to ``dim``) with GELU between them."""
    steps = patch.bit_length() - 1
    widths = [min(16 * 2 ** i, dim) for i in range(steps - 1)] + [dim]
    layers: list[nn.Module] = []
    c = 3
    for i, w in enumerate(widths):
        layers.append(nn.Conv2d(c, w, 3, stride=2, padding=1))
        if i < steps - 1:
            layers.append(nn.GELU())
        c = w
    return nn.Sequential(*layers)


class ShapesViT(nn.Module):
    """A small Vision Transformer for ``(B, 3, 64, 64)`` images in ``[0, 1]``; output ``(B, num_outputs)``.

    ``normalize`` (as :class:`ShapesNet`) -> tokens: ``patch_embed`` (a ``patch`` x ``patch``
    convolution with that stride, ViT's linear patch embedding: an ``(input_size / patch)``-square
    grid), plus, with ``stem=True``, a convolutional stem of ``log2(patch)`` 3x3 stride-2
    convolutions with GELU (Xiao et al. 2021, "Early convolutions help transformers see better")
    on the same grid -> a learned class token in front, learned position embeddings -> ``blocks``
    (``depth`` :class:`ViTBlock`) -> ``norm`` -> ``head`` on the class token. Grad-CAM's layer
    (:attr:`last_block`) is ``ln_1`` of the last block: after the last attention only the class
    token reaches the head, so later layers' patch tokens get no gradient.
    """

    def __init__(self, num_outputs: int = 5, patch: int = 8, dim: int = 48, depth: int = 4, heads: int = 4,
                 mlp: int = 96, input_size: int = 64, stem: bool = True):
        stem = check_flag(stem, "stem")
        super().__init__()
        if input_size % patch or (stem and patch & (patch - 1)):
            raise SalienceError(f"ShapesViT: input_size {input_size} is not a multiple of patch {patch} "
                                "(or, with stem=True, patch is not a power of 2).")
        self.normalize = Normalize()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)  # first Conv2d: where the token grid is read
        self.stem = _conv_stem(dim, patch) if stem else None
        n = (input_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.config = {"num_outputs": num_outputs, "patch": patch, "dim": dim, "depth": depth, "heads": heads,
                       "mlp": mlp, "input_size": input_size, "stem": stem}

    @property
    def last_block(self) -> str:
        """Dotted name of Grad-CAM's default layer: the LayerNorm before the last block's attention."""
        return f"blocks.{len(self.blocks) - 1}.ln_1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        t = self.patch_embed(x) if self.stem is None else self.patch_embed(x) + self.stem(x)
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


ARCHITECTURES: dict[str, type[nn.Module]] = {"ShapesNet": ShapesNet, "ShapesViT": ShapesViT}
"""Architecture name (``"architecture"`` in a demo model's metadata; ``ShapesNet`` when absent) -> class."""


def build(arch: dict[str, Any], architecture: str = "ShapesNet") -> nn.Module:
    """A fresh (untrained) demo network: ``ARCHITECTURES[architecture](**arch)``."""
    if architecture not in ARCHITECTURES:
        raise SalienceError(f"Unknown demo architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[architecture](**arch)


def demo_metadata(name: str) -> dict[str, Any]:
    """The metadata stored beside demo model ``name`` (accuracy, seed, training command ...)."""
    _check(name)
    text = resources.files("salience.demo").joinpath("_weights", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def load_demo(name: str, *, device: Optional[torch.device | str] = None) -> nn.Module:
    """Demo model ``name`` (a key of :data:`DEMOS`) with its weights, in eval mode, float32.

    The model carries a :class:`~salience._core.info.ModelInfo` (``model.salience_info``) with its
    class names, input size and Grad-CAM layer. ``device``: where to put it (default: CPU).
    """
    meta = demo_metadata(name)
    model = build(meta["arch"], meta.get("architecture", "ShapesNet"))
    blob = resources.files("salience.demo").joinpath("_weights", f"{name}.pt").read_bytes()
    import io

    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    if device is not None:
        model.to(device)
    info = ModelInfo(
        name=f"demo:{name}",
        input_size=(64, 64),
        class_names=tuple(meta["class_names"]),
        task=meta["task"],
        default_layer=str(getattr(model, "last_block")),
        extra=meta,
    )
    return attach_info(model, info)


def _check(name: str) -> None:
    if name not in DEMOS:
        raise SalienceError(
            f"Unknown demo model {name!r}; available: {', '.join(sorted(DEMOS))}. "
            "Use one of these names (e.g. load_demo('shapes'))."
        )
