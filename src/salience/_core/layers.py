"""Find a layer of a model by module or dotted name, with a helpful error."""
from __future__ import annotations

import difflib
from typing import Union

from torch import nn

from salience._core.errors import SalienceError

LayerSpec = Union[str, nn.Module]

__all__ = ["LayerSpec", "resolve_layer", "layer_name"]


def resolve_layer(model: nn.Module, layer: LayerSpec) -> nn.Module:
    """Return the submodule of ``model`` named by ``layer`` (a module or a dotted name).

    Raises :class:`SalienceError` naming the closest existing names when it is not found.
    """
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise SalienceError(
                f"layer {type(layer).__name__} is not a submodule of the model; pass a module "
                "of this model or its dotted name (see model.named_modules())"
            )
        return layer
    if isinstance(layer, str):
        names = dict(model.named_modules())
        if layer in names and layer != "":
            return names[layer]
        close = difflib.get_close_matches(layer, [n for n in names if n], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
            "; list the names with [n for n, _ in model.named_modules()]"
        )
        raise SalienceError(f"the model has no layer named {layer!r}{hint}")
    raise SalienceError(
        f"expected a layer as an nn.Module or a dotted name like 'layer4.1.conv2', got {type(layer).__name__}"
    )


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model`` ('' for the model itself)."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise SalienceError(f"layer {type(layer).__name__} is not a submodule of the model")
