"""Grad-CAM written out by hand: the reference the default-layer tests compare salience's maps with."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gradcam_by_hand(net: nn.Module, x: Tensor, layer: Union[str, nn.Module], target: Tensor,
                    to_grid: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Grad-CAM of the paper on ``layer`` (a name or the module): a hook keeps its output (a tuple's
    first element, as Hugging Face's blocks return ``(hidden_states, ...)``), one backward of the
    target's logit (a Hugging Face output's ``.logits``) gives its gradient; ``to_grid`` turns both
    into ``(B, D, h, w)`` by hand (``None``: they are); ``ReLU(sum_k mean_ij(G_k) A_k)``, bilinear
    (``align_corners=False``) to the input's size -> ``(B, H, W)``."""
    module = net.get_submodule(layer) if isinstance(layer, str) else layer
    kept = []
    handle = module.register_forward_hook(lambda m, i, o: kept.append(o[0] if isinstance(o, tuple) else o))
    try:
        out = net(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    out = out if isinstance(out, Tensor) else out.logits
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), kept[0])
    grid = to_grid or (lambda t: t)
    a, g = grid(kept[0].detach()), grid(grad)
    cam = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0)
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def row_major(h: int, w: int, prefix: int = 0) -> Callable[[Tensor], Tensor]:
    """Tokens ``(B, prefix + h * w, D)`` -> ``(B, D, h, w)``, the prefix tokens dropped, row-major."""
    def to_grid(t: Tensor) -> Tensor:
        assert t.shape[1] == prefix + h * w, (tuple(t.shape), prefix, h, w)
        return t[:, prefix:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
    return to_grid


def assert_each_varies(maps: Tensor, rel: float = 1e-3) -> None:
    """Each image's map in ``maps`` ``(B, ...)`` varies: its spread (std) is more than ``rel`` of its largest
    absolute value, so a map constant up to rounding, or all 0, fails; one image's map varying does not stand in
    for another's (a std over the whole batch would pass on maps each constant at different values)."""
    flat = maps.detach().flatten(1).double()
    spread, top = flat.std(1), flat.abs().amax(1)
    assert bool((spread > rel * top).all()) and bool((top > 0).all()), (
        f"a constant map: per-image std {spread.tolist()}, largest |value| {top.tolist()}")
