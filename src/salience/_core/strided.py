"""Under a CPU bf16 autocast (``precision="bf16"`` or ``"bf16-mixed"``), ``nn.MultiheadAttention``'s inputs made
contiguous (session 42).

Why (docs/performance.md, "bf16-mixed: issue 19's table, and transformers (session 42)"; benchmarks/vit-bf16-linear-s42.md):
``nn.MultiheadAttention(batch_first=True)`` (torchvision's ViTs) transposes its input to a ``(tokens, batch, dim)``
view and gives it to ``F.linear`` (the in-projection); under a CPU bf16 autocast, with weights that do not require
gradients (salience's passes), ``F.linear`` on such a strided view is pathological: torchvision's ``vit_b_16``
in-projection at 2 images took 2.995 s against 0.017 s on a contiguous copy (torch 2.14,
benchmarks/bf16-strided-linear-s42.md), and the backward is as slow: a vanilla gradient of 2 images took 6.90x fp32's
time (benchmarks/vit-bf16-mixed-s42.md).

:class:`ContiguousAttention` is a ``TorchFunctionMode`` that hands ``F.multi_head_attention_forward`` contiguous
copies of a non-contiguous ``query``, ``key`` and ``value`` (one copy for arguments that are the same tensor: torch
checks ``query is key`` and ``key is value`` for its one packed in-projection), and ``F.linear`` a contiguous copy of
a non-contiguous input of 3 dimensions or more. ``.contiguous()`` is differentiable: the gradients flow through the
copy to the tensor the model made, and the values are the same (a layout, not a rounding). Every other function runs
as it is. :meth:`salience._core.perf.Run.autocast` enters it for models holding an ``nn.MultiheadAttention`` only
(other models: no mode, no cost); the model is not touched.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ContiguousAttention", "holds_attention"]

_QKV = ("query", "key", "value")
_LINEAR, _ATTENTION = torch._C._nn.linear, F.multi_head_attention_forward  # as torch hands them to a mode


def holds_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an ``nn.MultiheadAttention`` (itself or a submodule)."""
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def _contiguous(a: Any, copies: dict) -> Any:
    """``a`` contiguous when it is a non-contiguous tensor, one copy per tensor (``copies``: by ``id``)."""
    if not isinstance(a, torch.Tensor) or a.is_contiguous():
        return a
    if id(a) not in copies:
        copies[id(a)] = (a, a.contiguous())  # the original kept alive with its copy: its id is not reused
    return copies[id(a)][1]


class ContiguousAttention(TorchFunctionMode):
    """The mode: contiguous ``query`` / ``key`` / ``value`` for ``F.multi_head_attention_forward``, a contiguous
    input of 3 dimensions or more for ``F.linear``."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is _ATTENTION:
            copies: dict = {}
            args = tuple(_contiguous(a, copies) if i < 3 else a for i, a in enumerate(args))
            kwargs = {k: _contiguous(v, copies) if k in _QKV else v for k, v in kwargs.items()}
        elif func is _LINEAR and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            args = (_contiguous(args[0], {}), *args[1:])
        return func(*args, **kwargs)
