"""The BatchNorm-folded copy of a model (``fold_batchnorm=True``, :mod:`salience._core.perf`): made with
``torch.fx``, cached for the process per model and weights' state (:func:`~salience._core.fingerprint._fold_key`).

Apart from :mod:`salience._core.perf`, which runs the copy (:class:`~salience._core.perf.Run`), because making
and caching it is a job of its own; it imports :mod:`~salience._core.fingerprint`, never perf.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from salience._core.fingerprint import _HOOK_DICTS, _fold_key, _lock, own_hooks
from salience._core.tensors import copy_model

__all__ = ["folded_model"]

_folded: "OrderedDict[int, tuple[Any, tuple, Any]]" = OrderedDict()
_FOLDED_KEEP = 2  # folded copies kept for the process (each holds a copy of its model's weights)


def _fold(model: nn.Module) -> Any:
    """A copy of ``model`` (eval mode, parameters frozen) with each BatchNorm after a convolution
    folded into it, or the reason there is none (a string)."""
    from torch.fx.experimental.optimization import fuse

    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript model cannot be traced by torch.fx"
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return "the model has no BatchNorm layer"
    try:
        clone = copy_model(model).eval().requires_grad_(False)
        # no hook in the copy: own_hooks() found none on the model, but another thread's pass may have hooked it
        # since (salience's hooks for that thread), and a copied hook would fire in this thread's passes of the copy
        for m in clone.modules():
            for name in (*_HOOK_DICTS, "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks_with_kwargs"):
                hooks = m.__dict__.get(name)
                if hooks:
                    hooks.clear()
        folded = fuse(clone, inplace=True)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: run the model as it is
        return f"torch.fx cannot trace it ({_described(e, 200)})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if left == len(norms):
        return "no BatchNorm layer follows a convolution directly"
    return folded


def folded_model(model: nn.Module, key: Optional[tuple] = None) -> tuple[Optional[nn.Module], str]:
    """The process's BatchNorm-folded copy of ``model`` (made again when the model's structure, see
    :func:`~salience._core.fingerprint.structure`, or its parameters or buffers changed since: ``key``,
    its :func:`~salience._core.fingerprint._fold_key`, when the caller has it), or ``(None, why)`` when
    folding does not apply."""
    why = own_hooks(model)
    if why is not None:
        return None, why
    sig = key if key is not None else _fold_key(model)
    with _lock:
        hit = _folded.get(id(model))
        if hit is not None and hit[0]() is model and sig is not None and hit[1] == sig:
            _folded.move_to_end(id(model))
            made = hit[2]
        else:
            made = None
    if made is None:
        made = _fold(model)
        _remember_fold(model, sig, made)
    return (made, "") if isinstance(made, nn.Module) else (None, made)


def _remember_fold(model: nn.Module, sig: Optional[tuple], made: Any) -> None:
    """Cache ``made`` (the folded copy, or why there is none) for ``model`` in the state ``sig``."""
    with _lock:
        _folded[id(model)] = (weakref.ref(model), sig, made)
        _folded.move_to_end(id(model))
        while len(_folded) > _FOLDED_KEEP:
            _folded.popitem(last=False)


def _described(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (cut at ``limit`` characters), for warnings."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:limit] if text else ''}"
