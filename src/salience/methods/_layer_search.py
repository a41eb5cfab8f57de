"""The default Grad-CAM layer: the search behind :func:`default_layer` (every CAM's layer when none is given).

One recorded pass of ``x[:1]`` (:func:`_record_calls`: each named module's output in the order they finished, and,
noted by :class:`~salience.methods._attention_spotter._AttentionSpotter`, every attention operation and factorized
attention the pass ran), then two rules on what it saw: the ViT rule (:func:`_before_last_attention`: the input of the
last global attention) and, where it finds nothing, the map rule (:func:`_map_candidates`: the last module with a
map). Refusals with what to do where no layer fits (several patch embeddings, attention in the model's own forward,
parallel token streams, no map). The result, or a refusal after the pass, is cached per model, structure and item
shape (:data:`_SEARCHED`, :func:`_searched`). :func:`describe_default_layer` says which layer and why (``salience
list``, error messages); :func:`default_layer_readable` whether the CAMs run there as they are
(:func:`salience.methods.default_methods`).

:mod:`salience.methods.gradcam` re-exports the public names (``default_layer``, ``describe_default_layer``,
``default_layer_readable``), where the CAMs and users import them from.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from salience._core.autograd import check_input, layer_value, model_call, this_thread
from salience._core.checkpoints import plain_checkpoints as _plain_checkpoints
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.layers import layer_name, resolve_layer
from salience._core.perf import ModelCache, structure
from salience import rules
from salience.methods._attention_spotter import _AttentionSpotter
from salience.methods._tokens import (Layout, channel_count, layer_layout, one_model, patch_embeddings, patch_grid,
                                      token_shaped)

__all__ = ["default_layer", "describe_default_layer", "default_layer_readable"]

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool2d)


def default_layer(model: nn.Module, x: Tensor) -> str:
    """The dotted name of the layer Grad-CAM uses when none is given.

    In order: ``model.salience_default_layer`` (a name or a module), ``model_info(model)
    .default_layer`` (set by :func:`salience.load_model`), else a heuristic from one forward
    pass of ``x[:1]`` with the input's gradient on (parameters frozen: an output that requires
    grad depends on the input):

    * **Several patch embeddings** (CrossViT's branches, whose class tokens the head averages): no
      default, a :class:`SalienceError` asking for ``layer=`` (one layer's map shows one branch). The
      same where the last attention's block attends over token streams of different lengths side by side
      (non-lite CoaT's parallel blocks, one per scale, whose class tokens the head combines): the error
      names each stream's layer.
    * **Vision Transformers** (global attention, by what the pass computes, never by a class name:
      ``nn.MultiheadAttention``, or a module with a submodule whose output is attention weights,
      ConViT's ``GPSA`` / ``MHSA`` by their ``attn_drop``, or a module that itself runs an attention
      operation, ``F.scaled_dot_product_attention`` or a softmax over the last dim, every token a query, a
      class token among them, ``(1, heads, N, S)`` with ``N`` more than the patch grid's cells, ``S`` the keys,
      sub-sampled or not (timm's ``Attention`` and ``AttentionRope``, an own ``Mixer``; a module named ``...Attention``
      running one op no mode sees, xformers', when its first output token reads the others; a model whose own forward
      runs it has no default layer: a :class:`SalienceError` asking for ``layer=``); whose output is the image's whole token sequence ``(1, N, D)``,
      ``N`` at least the patch grid's cells; Swin's windows ``(windows, n, D)`` are not; or a factorized
      attention, a module whose pass softmaxes the keys ``(1, heads, N, d)`` (or ``(heads, N, d)``, the heads folded
      into the batch, or ``(1, N, heads * d)`` before the heads are split) over their ``N`` tokens and contracts that (or a copy) with the values over them,
      ``softmax(k)^T v`` or ``v^T softmax(k)``, by ``@``, ``torch.bmm`` or ``torch.einsum`` of two or more operands (CoaT's ``FactorAttnConvRelPosEnc``, or one of the same form under any name), global over its own ``N`` tokens, whatever their number): the last
      module that finished before the *last* such attention call, outside it, with an output of
      the attention's shape: the LayerNorm before the last block's attention (torchvision ViT's
      ``encoder.layers[-1].ln_1``, timm's ``blocks[-1].norm1``, Hugging Face's
      ``layernorm_before`` of the last layer). Not the final output: after the last attention only
      the class token reaches the head, so the patch tokens there get exactly zero gradient
      (measured in ``tests/test_gradcam_transformers.py``) and Grad-CAM's weights would all be 0.
      Not on a model without a patch embedding whose tokens there (or the attention's own) are all
      patches (LeViT: no class token, the head pools them; TinyViT's last stage, one window) or one
      token: the map rule below applies.
    * **Maps**: the module that *finished last* among those whose output depends on the input and
      is a 4-D map, channels first or channels last, or tokens ``(1, N, D)`` that are all patches
      (the rules in :mod:`salience.methods._tokens`; torchvision / timm Swin's ``norm``, ConvNeXt's
      blocks, Hugging Face Swin's ``layernorm``; a module with no known channel count, such as an
      activation, keeps the layout of the last output of its shape), leaving out pooling layers,
      ``nn.Identity``, containers whose output is a pooling layer's, modules called more than once,
      attention weights (:func:`_attention_weights`), per-token class scores (:func:`_class_scores`: VOLO's
      ``aux_head``; its default is its last stage, ``network.4``), and outputs that are a permuted / reshaped view
      of an earlier candidate's (Swin's ``permute`` after ``norm``), unless the module holds that
      candidate: then it takes its place (MaxViT's and TinyViT's channels-last blocks, permuted back:
      their ``stages``); modules with ``h * w > 1`` are preferred, and where the last maps have one cell (a small
      input) not one inside the module that reduces the last such map to one cell (a branch of an Inception
      block, a step of a stage's downsample) but the block or stage output that module is computed from, where all
      later computation goes through it (:func:`_before_reduction`: timm's inception_v3 at 96 px ``Mixed_6e``, its
      efficientvit_m0 and shvit_s1 at 64 px ``stages.1``). A container is
      preferred to its last child (it finishes later). This gives torchvision's resnet
      ``layer4``, densenet / mobilenet / efficientnet / convnext ``features`` (the last stage's
      output), swin ``norm``, vgg the last ReLU of ``features`` (before the final max-pool), timm
      ConvNeXt's ``stages``, Hugging Face ConvNeXt's ``convnext.encoder.stages.3``, timm LeViT's
      ``stages``, Hugging Face LeViT's last ``levit.encoder.stages`` (tokens in the one grid a stride
      gives, :mod:`salience.methods._tokens`; tokens inside an innermost module that computes attention,
      :func:`_attention_internals`, are left out, and so are ``(1, C, L)`` outputs
      with the module's channels at dim 1, a ``Conv1d``'s or a flattened map's). A module that returns
      a tuple led by a tensor (Hugging Face's blocks) is read as that tensor: Hugging Face Hiera's
      ``hiera.encoder.stages.3``, its last block's output.

    :func:`describe_default_layer` says which layer this is and why.

    The search's result is cached for the process (a few dozen entries, the least recently used dropped), per
    model (held weakly: the cache keeps no model alive), the model's :func:`~salience._core.perf.structure` and the
    input's item shape ``(C, H, W)``, dtype and device type: a second CAM call on the same model and shape runs no
    search pass (Grad-CAM on one image: one forward pass instead of two). It runs again when a module was
    replaced, added or removed, a ``forward`` swapped or a hook of the user's added or removed since, or on another
    item shape, dtype or device type; not when the weights or a plain attribute the ``forward`` reads changed
    (the rules read shapes and the pass's graph, not values; after such a change
    ``salience._core.perf.clear_cache()`` forgets it). A refusal of the rules after the pass (attention in the
    model's own forward, CoaT's parallel streams, no layer with a map) is cached too and raised again with the same
    message; one without a pass (CrossViT's embeddings, a bad input) or an error of the model's pass is not.
    """
    return _pick_default(model, x)[0]


def describe_default_layer(model: nn.Module, x: Tensor) -> str:
    """One line: the default Grad-CAM layer for ``model`` on ``x`` ``(B, C, H, W)``, its output's
    layout and why it was picked (for error messages and listings)."""
    with one_model():
        name, why, mod, shape = _default_call(model, x)
        if shape is None:
            return f"{name} ({why})"
        try:
            layout = layer_layout(model, mod, shape, x.shape, what=f"layer {name!r}").describe()
        except SalienceError as e:
            layout = f"not usable: {e}"
    return f"{name} ({type(mod).__name__}, output {tuple(shape)}: {layout}; {why})"


def default_layer_readable(model: nn.Module, x: Tensor, seen: Optional[dict] = None, *, grid: object = None,
                           prefix_tokens: object = None) -> bool:
    """Whether the CAMs run at the default layer with ``grid`` / ``prefix_tokens`` (the user's, as the CAMs take
    them; ``None``: read off the model): a default is found and its output's layout is read
    (:mod:`salience.methods._tokens`); False where either is refused (CrossViT: no default; tokens with several
    readings and neither given: the CAMs ask for ``grid=`` / ``prefix_tokens=``). One forward pass (two where the
    tokens are read on the model's own grids), none where the search's result is cached (:func:`default_layer`).
    ``seen``: a dict that gets ``"attention"``, whether an attention operation or module ran in the search's pass
    (absent when no search ran: a layer the model names, or a refusal before it)."""
    try:
        with one_model():
            name, _, mod, shape = _default_call(model, x, seen)
            if shape is not None:
                layer_layout(model, mod, shape, x.shape, grid=grid, prefix_tokens=prefix_tokens,
                             what=f"layer {name!r}")
    except SalienceError:
        return False
    return True


def _default_call(model: nn.Module, x: Tensor,
                  seen: Optional[dict] = None) -> tuple[str, str, nn.Module, Optional[tuple[int, ...]]]:
    """``(name, why, module, the shape of its first output on x[:1])`` of the default layer (shape None where it
    did not run or gave no tensor): the shape from the search (:func:`_searched`, cached), or one pass recording
    that layer alone where the model names it. ``seen``: as in :func:`default_layer_readable`."""
    seen = {} if seen is None else seen
    name, why = _pick_default(model, x, seen)
    mod = resolve_layer(model, name)
    if "shape" in seen:
        return name, why, mod, seen["shape"]
    check_input(x, model)  # a layer the model names: no search checked x
    counting = rules.ActivationCount()
    shape = _first_shape(_record_calls(model, x, only=mod, counting=counting), mod)
    seen["guided"] = counting.rules_apply
    return name, why, mod, shape


def _first_shape(calls: list["_Call"], mod: nn.Module) -> Optional[tuple[int, ...]]:
    """The shape of ``mod``'s first output among ``calls`` (None: not called, or no tensor)."""
    call = next((c for c in calls if c.module is mod), None)
    return tuple(call.output.shape) if call is not None and isinstance(call.output, Tensor) else None


@dataclass
class _Call:
    name: str
    module: nn.Module
    output: Any
    node: Any = None  # the output's autograd node when the call finished (its grad_fn then: later in-place ops
    # on the output give the tensor a new one), None where the output does not depend on the input


def _record_calls(model: nn.Module, x: Tensor, only: Optional[nn.Module] = None,
                  outputs: Optional[list] = None, attending: Optional[list] = None,
                  factorized: Optional[list] = None, counting: Optional["rules.ActivationCount"] = None) -> list[_Call]:
    """Every named module's call on ``x[:1]``, in the order they *finished*, its output as a CAM reads it
    (:func:`~salience._core.autograd.layer_value`: a block's ``(hidden_states, ...)`` tuple -> its first
    tensor); an output requires grad exactly when it depends on the input (the parameters are frozen).
    The model's own output is appended to ``outputs`` when given; with ``attending`` (a list), the
    attention operations of the pass are appended to it as ``(the innermost running module's name, the
    attention's shape or None)`` (:class:`_AttentionSpotter`), and its factorized attentions to ``factorized`` (a
    list, given with ``attending``) as ``(module name, N tokens)``; ``counting``: entered around the pass, to count
    the activations a backprop rule would meet (:class:`~salience.rules.ActivationCount`). ``x``: checked by the caller
    (:func:`~salience._core.autograd.check_input`)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError("cannot look inside a TorchScript model for a Grad-CAM layer; pass the Python nn.Module")
    calls: list[_Call] = []
    running: list[str] = []
    named: dict[str, tuple[Any, Any]] = {}  # a module named ...Attention -> its last call's (input, output)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if running and running[-1] == name:
                running.pop()
            value = layer_value(output)
            if attending is not None and type(module).__name__.endswith("Attention") and inputs:
                named[name] = (inputs[0], value)
            calls.append(_Call(name, module, value, value.grad_fn if isinstance(value, Tensor) else None))
        return hook

    def make_pre_hook(name: str):
        def pre_hook(module: nn.Module, inputs: Any) -> None:
            running.append(name)
        return pre_hook

    handles = []
    try:
        for name, m in model.named_modules():
            if name and not isinstance(m, torch.jit.ScriptModule) and (only is None or m is only):
                handles.append(m.register_forward_hook(this_thread(make_hook(name))))
                if attending is not None:
                    handles.append(m.register_forward_pre_hook(this_thread(make_pre_hook(name))))
        # With the input's gradient on (parameters frozen by the guard), an output that requires grad
        # depends on the input: Swin's relative position bias (B, heads, n, n) does not. Also when the
        # caller runs under torch.inference_mode(), where enable_grad() alone records no graph.
        with model_guard(model), torch.inference_mode(False), torch.enable_grad(), _plain_checkpoints():
            one = x[:1].clone() if x.is_inference() else x[:1]
            with model_call(model, x), counting or contextlib.nullcontext(), \
                    (_AttentionSpotter(running) if attending is not None  # errors name the caller's x
                     else contextlib.nullcontext()) as spotter:
                out = model(one.detach().requires_grad_(True))
            if attending is not None:
                attending.extend(spotter.seen)
                for h in handles:  # a non-reentrant checkpoint's recomputation must not record calls again
                    h.remove()
                handles.clear()
                attending.extend(_opaque_attentions(named, spotter))
                if factorized is not None:
                    factorized.extend(spotter.factorized)
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return calls


def _opaque_attentions(named: dict[str, tuple[Any, Any]], spotter: "_AttentionSpotter") -> list[tuple[str, Any]]:
    """Attentions run in one op no mode sees (xformers' ``memory_efficient_attention``, DINOv2's ``MemEffAttention``,
    flash-attention kernels), as ``(name, (1, 1, N, N))`` entries of ``attending``: a module named ``...Attention``
    (``named``: its input and output ``(1, N, D)`` of the pass) in which no attention op was seen, whose first output
    token reads the other tokens (its gradient reaches them). The name alone decides nothing: a per-token MLP so named
    mixes no tokens."""
    seen = {n for n, _ in spotter.seen} | {n for n, _ in spotter.factorized}
    found = []
    for name, (inp, out) in named.items():
        if any(s == name or s.startswith(name + ".") for s in seen):
            continue
        if not (isinstance(inp, Tensor) and isinstance(out, Tensor) and inp.dim() == out.dim() == 3
                and inp.shape[:2] == out.shape[:2] and inp.shape[1] > 1 and inp.requires_grad and out.requires_grad):
            continue
        try:
            (g,) = torch.autograd.grad(out[0, 0].sum(), inp, retain_graph=True, allow_unused=True)
        except RuntimeError:  # a tensor of its graph changed in place later: not read
            continue
        if g is not None and bool(g[0, 1:].abs().sum() > 0):
            n = int(inp.shape[1])
            found.append((name, (1, 1, n, n)))
    return found


def _first_tensor(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _is_attention(m: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` (by its type: the other attentions are recognized by what their pass computes,
    :class:`_AttentionSpotter`, never by a class name)."""
    return isinstance(m, nn.MultiheadAttention)


def _attention_weights(out: Any) -> bool:
    """Whether ``out`` is attention weights ``(B, heads, N, M)``: 4-D, ``M > 1``, non-negative, each row of
    its last dim summing to 1 (a softmax over the keys, as the attention's dropout passes it on). Never a
    map: its last two dims are tokens, not the image's rows and columns."""
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[-1] < 2 or not out.is_floating_point():
        return False
    with torch.no_grad():
        # the first row alone first: it rules out nearly every map at the cost of one row (the search's pass
        # asks this of every 4-D output: 80 of its 220 ms on resnet50 at 224 px on this CPU, most of it the
        # full sums of ReLU maps)
        row = out.detach()[0, 0, 0].float()
        if not (bool(row.min() >= 0) and abs(float(row.sum()) - 1.0) <= 1e-4 + 1e-5):
            return False
        t = out.detach().float()
        return bool(t.min() >= 0) and bool(torch.allclose(t.sum(-1), torch.ones((), device=t.device), atol=1e-4))


def _weighing_modules(calls: list[_Call]) -> set[str]:
    """Names of the modules that hold a submodule whose output is attention weights (ConViT's ``GPSA`` and
    ``MHSA``, whose ``attn_drop`` gets the softmax): attention modules whatever their class is called."""
    return {c.name.rpartition(".")[0] for c in calls if "." in c.name and _attention_weights(c.output)}


def _global_attention(c: _Call, grid: Optional[tuple[int, int]], weighing: set[str] = frozenset(),
                      whole: Optional[dict[str, set[int]]] = None) -> bool:
    """An attention call (an ``nn.MultiheadAttention``, or a module in ``weighing`` or ``whole``) over one image's whole
    token sequence ``(1, N, D)`` (the calls run on ``x[:1]``), ``N`` at least the patch grid's cells: not a window
    of a Swin (``(windows, n, D)``, or one window with fewer tokens than patches). ``whole``: module name -> the
    token counts ``N`` of the factorized attentions it ran (:class:`_AttentionSpotter`: keys softmaxed over their
    ``N`` tokens, contracted with the values over them, CoaT's ``q @ (softmax(k)^T v)``), global over its own
    tokens by construction: an output of ``N`` tokens needs no more than that (CoaT runs one after each stage's
    own patch embedding, on fewer tokens than the first embedding's grid)."""
    out = _first_tensor(c.output)
    whole = whole or {}
    if not ((_is_attention(c.module) or c.name in weighing or c.name in whole) and isinstance(out, Tensor)
            and out.dim() == 3 and out.shape[0] == 1):
        return False
    return grid is None or out.shape[1] >= grid[0] * grid[1] or int(out.shape[1]) in whole.get(c.name, ())


def _class_token_stage(model: nn.Module, x: Tensor, c: _Call, between: Sequence[_Call]) -> bool:
    """Whether attention call ``c`` (:func:`_global_attention` but for its length) attends over a later stage's whole
    token sequence with a class token: ``(1, N, D)``, fewer tokens than the first embedding's grid, read as prefix
    token(s) + that stage's own grid (Hugging Face PVT v1, whose class token joins in the last stage, on a grid a
    quarter the size of the one before): after it only the class token reaches the head, as in a ViT. A Swin's
    single window reads as patches alone (no prefix), a class attention's output is one token: neither counts.
    ``between``: the calls since the last attention over the first grid; one of them must give that stage's grid as a
    map ``(..., h, w)`` (PVT's patch embedding of the stage): tokens a ViT kept of its patches (EViT, DynamicViT),
    or a decoder's queries, are no grid even where their count fits one."""
    out = _first_tensor(c.output)
    if out.shape[1] < 2:
        return False
    try:
        layout = layer_layout(model, c.module, out.shape, x.shape, what=f"layer {c.name!r}")
    except SalienceError:
        return False
    return layout.prefix > 0 and layout.grid is not None and any(
        isinstance(b.output, Tensor) and b.output.dim() == 4 and tuple(b.output.shape[-2:]) == tuple(layout.grid)
        and not _attention_weights(b.output) for b in between)


def _before_last_attention(model: nn.Module, x: Tensor, calls: list[_Call],
                           attending: Sequence[tuple[str, Any]] = (),
                           factorized: Sequence[tuple[str, int]] = ()) -> Optional[str]:
    """The ViT rule of :func:`default_layer`: the module that finished last before the last
    global attention call on tokens, outside it, with the attention's output shape; None if none,
    or if the model has no patch embedding and that module's tokens are all patches (LeViT: no
    class token, the head pools the tokens; the map rule then takes the last token stage) or a
    single token (a class attention's, VOLO's: nothing spatial). ``attending``: the attention
    operations seen (:class:`_AttentionSpotter`): the module that ran one counts as attention, whatever
    its class is called (a ``Mixer`` calling ``F.scaled_dot_product_attention``, a block with the softmax
    inline; a class name decides nothing) when every token of one image, a prefix among them, queries it:
    ``(1, heads, N, S)`` or ``(1, N, S)``, ``N`` more than the patch grid's cells, ``S > 1`` keys (sub-sampled
    or not): what the rule is for (after it only the class token reaches the head). Not Twins' attention over
    patches alone, nor CaiT's self-attention over patches alone (its class token comes in later, and its class
    attention, one query, reads every patch: the map rule). A later stage's attention over fewer tokens, a class
    token among them, counts too where a map of its grid was made after that one (:func:`_class_token_stage`).
    ``factorized``: ``(module name, N)`` of the factorized attentions seen (:func:`_global_attention`)."""
    grid = patch_grid(model, x.shape)
    cells = None if grid is None else grid[0] * grid[1]
    weighing = _weighing_modules(calls) | {
        name for name, a in attending
        if name and a is not None and len(a) in (3, 4) and a[0] == 1 and a[-1] > 1 and a[-2] > (cells or 1)}
    whole: dict[str, set[int]] = {}
    for name, n in factorized:
        if name:
            whole.setdefault(name, set()).add(n)
    at = [i for i, c in enumerate(calls) if _global_attention(c, grid, weighing, whole)]
    if not at:
        return None
    # a hierarchical ViT's later stages attend over fewer tokens than the first grid's cells: the last of them
    # with a class token is the last global attention (a refusal of parallel streams looks at the first rule's)
    later = [i for i, c in enumerate(calls[at[-1] + 1:], at[-1] + 1)
             if _global_attention(c, None, weighing, whole) and _class_token_stage(model, x, c, calls[at[-1] + 1:i])]
    _refuse_parallel_streams(model, x, calls, at)
    at += later
    att = calls[at[-1]]
    shape = _first_tensor(att.output).shape
    if grid is None and (shape[1] == 1 or _all_patches(model, x, _Call(att.name, att.module, _first_tensor(att.output)),
                                                        shape)):
        return None  # a single token (a class attention's) or all patches (TinyViT's last window): the map rule
    c = _input_of(calls, at[-1])
    if c is None or (grid is None and _all_patches(model, x, c, shape)):
        return None  # none, or all patches: the map rule
    return c.name


def _input_of(calls: list[_Call], i: int) -> Optional[_Call]:
    """The call that finished last before ``calls[i]`` (an attention call), outside it, with its output's shape."""
    att = calls[i]
    shape = _first_tensor(att.output).shape
    for c in reversed(calls[:i]):
        if not c.name.startswith(att.name + ".") and isinstance(c.output, Tensor) and c.output.shape == shape:
            return c
    return None


def _computed_from(node: Any, sources: Sequence[Any]) -> set:
    """The autograd nodes among ``sources`` that ``node`` was computed from: reachable from it through
    ``next_functions`` in the traced pass's graph (the pass records it: the input requires grad). Exact: an
    output depends on an earlier one exactly when the earlier one's node is on a path of the later one's graph.
    Stops once every source is found; ``None`` nodes (no graph) reach nothing and are never reached."""
    wanted = {s for s in sources if s is not None}
    found: set = set()
    if node is None or not wanted:
        return found
    stack, visited = [node], {node}
    while stack and len(found) < len(wanted):
        n = stack.pop()
        if n in wanted:
            found.add(n)
        for nxt, _ in n.next_functions:
            if nxt is not None and nxt not in visited:
                visited.add(nxt)
                stack.append(nxt)
    return found


def _refuse_parallel_streams(model: nn.Module, x: Tensor, calls: list[_Call], at: list[int]) -> None:
    """Refuse a default where the last attention's block also attends over other token streams of other
    lengths side by side (timm's non-lite CoaT: each parallel block runs one factorized attention per scale,
    ``1 + 28x28``, ``1 + 14x14``, ``1 + 7x7`` tokens at 224 px, mixes them, and its head combines the three
    scales' class tokens): a map of one layer shows one stream, as one of CrossViT's branches would. Side by side
    means: attentions of the same called block, finished within its call, whose outputs the last attention's
    input was not computed from (the traced pass's autograd graph, :func:`_computed_from`); a block running two
    attentions one after the other, pooling between them, is one stream."""
    last = at[-1]
    block = calls[last].name.rpartition(".")[0]
    # the block's own call around the last attention (a container such as an nn.ModuleList is never called: its
    # attentions run one after the other, with tokens pooled between them, not side by side); the side calls are
    # those that finished within it, after the block's previous call
    end = next((j for j in range(last + 1, len(calls)) if calls[j].name == block), None)
    if not block or end is None:
        return
    start = max((j for j in range(last) if calls[j].name == block), default=-1)
    side = [i for i in at if start < i < end and calls[i].name.rpartition(".")[0] == block
            and calls[i].name != calls[last].name]
    # side by side only where the last attention's input was not computed from the side attention's output (one
    # module running attn1, a pooling, then attn2 on what came of attn1 is one stream, not two)
    fed = _computed_from(calls[last].node, [calls[i].node for i in side])
    side = [i for i in side if calls[i].node is None or calls[i].node not in fed]
    streams = {int(_first_tensor(calls[i].output).shape[1]): i for i in side + [last]}
    if len(streams) < 2:
        return
    described = []
    for n, i in sorted(streams.items(), reverse=True):
        c = _input_of(calls, i)
        if c is None:
            continue
        name = c.name
        try:
            layout = layer_layout(model, None, (1, n, 1), x.shape, what=f"layer {name!r}")
            said = (f"{layout.prefix} prefix token(s) + {layout.grid[0]}x{layout.grid[1]} patches" if layout.grid
                    else f"{n} tokens")
        except SalienceError:
            said = f"{n} tokens: give grid= and prefix_tokens="
        described.append(f"{name!r} ({said})")
    raise SalienceError(
        f"the model's last attention block {block!r} attends over {len(streams)} token streams of different lengths "
        f"side by side ({', '.join(str(n) for n in sorted(streams, reverse=True))} tokens: one per scale, as CoaT's "
        "parallel blocks), and what follows combines them: a map of one layer would show one stream, so there is no "
        f"default layer. Pass layer= the stream to map, e.g. the input of its attention: {', '.join(described)} "
        "(a dotted name from model.named_modules(); grid=(h, w) and prefix_tokens=k where the tokens are not read "
        "right; command line: --layer, --grid, --prefix-tokens), or use a method without a layer (vanilla, "
        "integrated_gradients)"
    )


def _all_patches(model: nn.Module, x: Tensor, c: _Call, shape: Any) -> bool:
    """Whether ``c``'s output of ``shape`` ``(1, N, D)`` reads as tokens that are all patches (no prefix):
    never a ``(1, C, L)`` with the module's channels at dim 1 (a Conv1d's, a flattened map's;
    :func:`~salience.methods._tokens.token_shaped`); without a patch embedding only when the module's
    channel count says ``D`` is last and the grid is the one that fits (:mod:`salience.methods._tokens`)."""
    if len(shape) != 3 or shape[0] != 1:
        return False
    tokens = token_shaped(c.module, shape)
    if tokens is False or (tokens is None and patch_grid(model, x.shape) is None):
        return False
    try:
        layout = layer_layout(model, c.module, shape, x.shape, what=f"layer {c.name!r}")
    except SalienceError:
        return False
    return layout.prefix == 0


def _candidate_layout(model: nn.Module, x: Tensor, c: _Call, seen: dict) -> Optional[Layout]:
    """The layout of a 4-D output, or of tokens ``(1, N, D)`` that are all patches (a hierarchical
    model's, such as Hugging Face Swin's, or LeViT's; ViTs take the attention rule); None if it is neither."""
    out = c.output
    if out.dim() == 3:
        if not _all_patches(model, x, c, out.shape):
            return None
        return layer_layout(model, c.module, out.shape, x.shape, what=f"layer {c.name!r}")
    if channel_count(c.module) is None and tuple(out.shape) in seen:
        return seen[tuple(out.shape)]  # an activation keeps the layout of the map it came from
    layout = layer_layout(model, c.module, out.shape, x.shape, what=f"layer {c.name!r}")
    seen[tuple(out.shape)] = layout
    return layout


def _attention_internals(calls: list[_Call], attending: Sequence[tuple[str, Any]] = (),
                         factorized: Sequence[tuple[str, int]] = ()) -> tuple[str, ...]:
    """Name prefixes (``"name."``) of the modules that compute attention, by what the pass computed: a module where an
    attention operation ran (``attending``, :class:`_AttentionSpotter`: SDPA, ``F.multi_head_attention_forward``, a
    softmax over the last dim; an ``nn.Softmax`` or dropout passing on the weights stands for the module holding it),
    a factorized attention (``factorized``), a module holding a submodule whose output is attention weights
    (:func:`_weighing_modules`), an ``nn.MultiheadAttention``; the innermost of them. Tokens inside them (queries, keys,
    values) are not the model's token stream; a module around one (a stage, Hugging Face's ``ViTAttention`` around
    ``ViTSelfAttention``) is not one: its blocks' outputs are the token stream. A class name decides nothing: a module
    named ``...Attention`` that attends over nothing (a per-token MLP) holds token-stream outputs."""
    outputs = {c.name: c.output for c in calls}
    names = set(_weighing_modules(calls)) | {c.name for c in calls if _is_attention(c.module)}
    for name in [n for n, _ in attending] + [n for n, _ in factorized]:
        if name and "." in name and _attention_weights(outputs.get(name)):
            name = name.rpartition(".")[0]  # an nn.Softmax / dropout: the module holding it
        if name:
            names.add(name)
    named = [n + "." for n in names]
    return tuple(n for n in named if not any(o != n and o.startswith(n) for o in named))


def _class_scores(c: _Call, classes: Optional[int]) -> bool:
    """Whether ``c`` gives per-token class scores: an ``nn.Linear`` on tokens ``(1, N, classes)`` as wide as the
    model's output (VOLO's ``aux_head``, a token-labelling head whose maximum over the tokens is added to the
    class token's logits). Grad-CAM there is the target's token scores alone, ``ReLU(w / N * s_c)`` (``w`` the
    head's weight of that maximum), blind to the class token's path; at the features before such a head, pooled
    by a mean alone, Grad-CAM gives the same map (less the bias): the features lose nothing."""
    out = c.output
    return (classes is not None and isinstance(c.module, nn.Linear) and isinstance(out, Tensor) and out.dim() == 3
            and c.module.out_features == classes)


def _output_width(out: Any) -> Optional[int]:
    """The number of classes of a model's output ``(1, classes)`` (a Hugging Face output's ``logits``); else None."""
    out = getattr(out, "logits", out)
    return int(out.shape[-1]) if isinstance(out, Tensor) and out.dim() == 2 else None


def _map_candidates(model: nn.Module, x: Tensor, calls: list[_Call], classes: Optional[int] = None,
                    inner: tuple[str, ...] = ()) -> list[tuple[str, Tensor, bool]]:
    """Map outputs as ``(name, (B, K, h, w), whether tokens)``, in finishing order, by the rules of
    :func:`default_layer`; per-token class scores (:func:`_class_scores`, ``classes`` the model's output width)
    are left out, and so are tokens inside a module that computes attention (``inner``, :func:`_attention_internals`)."""
    counts = collections.Counter(c.name for c in calls)
    pooled = {id(c.output) for c in calls if isinstance(c.module, _POOLS)}
    kept: list[Tensor] = []
    seen: dict[tuple[int, ...], Layout] = {}
    cands: list[tuple[str, Tensor, bool]] = []
    flattened: dict[int, tuple[int, int]] = {}  # cells -> (h, w) of the last convolution's / pooling's map
    for c in calls:
        out = c.output
        if isinstance(c.module, (nn.Conv2d,) + _POOLS) and isinstance(out, Tensor) and out.dim() == 4:
            flattened[int(out.shape[-2] * out.shape[-1])] = (int(out.shape[-2]), int(out.shape[-1]))
        if (counts[c.name] != 1 or not isinstance(out, Tensor) or out.dim() not in (3, 4) or not out.requires_grad
                or isinstance(c.module, _POOLS + (nn.Identity,)) or id(out) in pooled
                or (out.dim() == 3 and c.name.startswith(inner)) or _attention_weights(out)
                or _class_scores(c, classes)):
            continue
        viewed = [i for i, k in enumerate(kept)
                  if out is not k and out.data_ptr() == k.data_ptr() and out.numel() == k.numel()]
        if viewed and not all(cands[i][0].startswith(c.name + ".") for i in viewed):
            continue  # a permuted / reshaped view of an earlier candidate: keep the original
        layout = _candidate_layout(model, x, c, seen)
        if (layout is not None and layout.kind == "tokens" and layout.prefix == 0
                and flattened.get(int(out.shape[1]), layout.grid) != layout.grid):
            # tokens read on the grid a stride or the patch embedding gives, while the last map with their number
            # of cells had another shape (tokens pooled to 3x8 where the embedding gives 4x6): their reading is in
            # doubt, and a map of them would be scrambled; not a candidate (layer= with grid= reads them)
            continue
        if layout is not None:
            # a block or stage handing on its last layer's output in another layout (MaxViT's and TinyViT's
            # channels-last blocks, permuted back to (B, C, h, w)) takes its place: the same values, later
            for i in reversed(viewed):
                del kept[i], cands[i]
            kept.append(out)
            cands.append((c.name, layout.to_grid(out), layout.kind == "tokens"))
    return cands


def _pick_default(model: nn.Module, x: Tensor, seen: Optional[dict] = None, *,
                  checked: bool = False) -> tuple[str, str]:
    """``(dotted name, why)`` of the default Grad-CAM layer (see :func:`default_layer`); ``seen``: a dict that gets
    the search's ``"attention"`` and ``"shape"`` (:func:`_searched`). Where the search runs, ``x`` is checked
    (:func:`~salience._core.autograd.check_input`) unless ``checked`` says its caller did (a CAM checks its ``x``
    first: a second finiteness test would be one more reduction, and a host-device synchronization on a GPU)."""
    attr = getattr(model, "salience_default_layer", None)
    if attr is not None:
        name = attr if isinstance(attr, str) else layer_name(model, resolve_layer(model, attr))
        return name, "the model's salience_default_layer"
    info_layer = model_info(model).default_layer
    if info_layer:
        resolve_layer(model, info_layer)
        return info_layer, "the model's ModelInfo.default_layer"
    if not checked:
        check_input(x, model)
    with one_model():
        return _searched(model, x, seen)


@dataclass(frozen=True)
class _Found:
    """What the default-layer search found for one model and item shape: the layer's ``name``, ``why``, the
    ``shape`` of its first output on ``x[:1]`` (None: no tensor), whether an attention operation or module ran in
    the pass (``attention``), or the message of its refusal (``refused``; then no name)."""

    name: str
    why: str
    shape: Optional[tuple[int, ...]]
    attention: bool
    refused: str = ""
    guided: Optional[bool] = None  # whether guided backprop's defaults take the pass (rules.ActivationCount)


_SEARCHED = ModelCache(keep=32)
"""The search's results (:class:`_Found`) per model (weakly), its :func:`~salience._core.perf.structure`, and the
input's item shape ``(C, H, W)``, dtype and device type: a second CAM call skips the search's pass."""


def _searched(model: nn.Module, x: Tensor, seen: Optional[dict] = None) -> tuple[str, str]:
    """:func:`_search`'s ``(name, why)``, cached (:data:`_SEARCHED`): a refusal of its rules after the pass is
    kept too (its message raised again as a new :class:`SalienceError`); one before it (the input, several
    patch embeddings: no pass to save) or an error of the pass itself is not. ``seen`` gets ``"attention"`` and
    ``"shape"`` (:class:`_Found`). ``x``: checked by the caller (:func:`_pick_default`)."""
    _refuse_branches(model, x)
    key = (tuple(x.shape[1:]), x.dtype, x.device.type)
    fingerprint = structure(model)
    found = _SEARCHED.get(model, key, fingerprint)
    if found is None:
        pass_seen: dict = {}
        try:
            name, why = _search(model, x, pass_seen)
            found = _Found(name, why, _first_shape(pass_seen["calls"], resolve_layer(model, name)),
                           pass_seen["attention"], guided=pass_seen["guided"])
        except SalienceError as e:
            if "calls" not in pass_seen:
                raise  # the pass itself failed: nothing the rules decided
            found = _Found("", "", None, pass_seen["attention"], str(e), pass_seen["guided"])
        if structure(model) == fingerprint:  # not a model that changed in its own pass (kept for what it is now)
            _SEARCHED.put(model, key, fingerprint, found)
    if seen is not None:
        seen["attention"], seen["shape"], seen["guided"] = found.attention, found.shape, found.guided
    if found.refused:
        raise SalienceError(found.refused)
    return found.name, found.why


def _refuse_inline_attention(model: nn.Module, x: Tensor, attending: Sequence[tuple[str, Any]]) -> None:
    """Refuse a model whose own ``forward`` (no submodule) computes attention over one image's tokens
    (``(1, heads, N, N)``, ``N > 1``: square, as the weighing rule of :func:`_before_last_attention` asks; not a
    softmax over a map's width ``(1, C, H, W)``): no module's output is the input of that attention, so the ViT
    rule has nothing to point at, and the map rule would pick a layer before it (the patch embedding) and say
    nothing."""
    own = [shape for name, shape in attending
           if not name and shape is not None and len(shape) == 4 and shape[0] == 1
           and shape[-1] == shape[-2] > 1]
    if own:
        raise SalienceError(
            f"the model computes attention (weights of shape {tuple(own[-1])}) in its own forward, not in a "
            "submodule, so no layer's output is the input of its last attention, where the default layer of a "
            "transformer is: there is no default layer. Pass layer= a module whose output is the token sequence "
            "(a dotted name from model.named_modules(); command line: --layer), or move the attention into a "
            "submodule (e.g. a block module per layer), or use a method without a layer (vanilla, "
            "integrated_gradients, attention_rollout)"
        )


def _refuse_branches(model: nn.Module, x: Tensor) -> None:
    """Refuse a model with several patch embeddings (CrossViT's branches): by its modules alone, no pass."""
    embeds = patch_embeddings(model, int(x.shape[1]))
    if len(embeds) > 1:
        names = ", ".join(repr(n) for n, _ in embeds)
        raise SalienceError(
            f"the model embeds the image in patches {len(embeds)} times ({names}: Conv2d layers with stride == "
            f"kernel_size on the {int(x.shape[1])}-channel input), one token stream per branch (CrossViT), and its "
            "head reads them all: a map of one layer would show one branch, so there is no default layer. Pass layer= "
            "a block of the branch to map (a dotted name from model.named_modules(); for tokens not on the first "
            "embedding's grid also grid=(h, w) and prefix_tokens=k; command line: --layer, --grid, --prefix-tokens), "
            "or use a method without a layer (vanilla, integrated_gradients)"
        )


def _search(model: nn.Module, x: Tensor, seen: Optional[dict] = None) -> tuple[str, str]:
    """The heuristic of :func:`default_layer` (the ViT rule, else the map rule) on a model
    :func:`_refuse_branches` let through: ``(name, why)``. ``seen``: a dict that gets the pass's ``"calls"`` and
    ``"attention"``: whether an attention operation (a softmax over the last dim, SDPA,
    ``F.multi_head_attention_forward``) or an attention module ran, before any refusal after the pass."""
    outputs: list = []
    attending: list[tuple[str, Any]] = []
    factorized: list[tuple[str, int]] = []
    counting = rules.ActivationCount()
    calls = _record_calls(model, x, outputs=outputs, attending=attending, factorized=factorized, counting=counting)
    if seen is not None:
        seen["calls"], seen["guided"] = calls, counting.rules_apply
        seen["attention"] = bool(attending) or bool(factorized) or any(_is_attention(c.module) for c in calls)
    _refuse_inline_attention(model, x, attending)
    vit = _before_last_attention(model, x, calls, attending, factorized)
    if vit is not None:
        return vit, ("the input of the last attention, where every token still reaches the output; after it, "
                     "a head that reads the class token alone gives the patch tokens no gradient")
    cands = _map_candidates(model, x, calls, _output_width(outputs[0]) if outputs else None,
                            _attention_internals(calls, attending, factorized))
    spatial = [c for c in cands if c[1].shape[-2:].numel() > 1]
    chosen = spatial or cands
    if not chosen:
        script = [n for n, m in model.named_modules() if n and isinstance(m, torch.jit.ScriptModule)]
        hidden = (f"; its submodule {script[0]!r} is TorchScript, whose layers take no hook and so were not "
                  "looked at: pass the model with its Python modules" if script else "")
        raise SalienceError(
            "found no layer with a 4-D map (B, K, h, w) / (B, h, w, K) or a transformer block to use for "
            "Grad-CAM; pass layer= (a module or a dotted name from model.named_modules()) with a spatial output"
            + hidden
        )
    if not spatial:
        return chosen[-1][0], "the last layer with a map (none has h * w > 1 on this input: use a larger input)"
    name, why = spatial[-1][0], "the last layer with a spatial map"
    if spatial[-1] is not cands[-1]:  # the last maps have one cell: not a layer inside the module that reduces them
        name, why = _before_reduction(calls, cands, outputs[0] if outputs else None) or (name, why)
    after = max(i for i, c in enumerate(cands) if c[1].shape[-2:].numel() > 1) + 1
    later = [c for c in cands[after:] if c[2]]
    if not later:
        return name, why
    # A token stage that subsampling left with one token (LeViT on a small input), or a class token: say so.
    return name, (f"{why}; the later token layer {later[-1][0]!r} holds a single token on this input, so its map "
                  "would be constant")


def _before_reduction(calls: list[_Call], cands: list[tuple[str, Tensor, bool]],
                      output: Any) -> Optional[tuple[str, str]]:
    """``(name, why)`` where the last map with ``h * w > 1`` (``S``, of the map candidates ``cands``, later ones
    having one cell) lies inside a module that reduces it to one cell (a small input: inception_v3's ``Mixed_7a``
    at 96 px, a stage's downsample): the map the outermost such module is computed from, the block or stage output
    before it, as the same model's default at a larger input is a block or stage output, not a branch or a step of
    the reduction. The modules around ``S`` are looked at from the outermost in; the first whose preceding map (the
    last candidate that finished before it began) has ``S``'s ``h x w`` and is gone through by every path of the
    pass's autograd graph from the model's ``output`` to the input (:func:`_all_through`: a map that a branch or a
    skip connection bypasses is not what all later layers are computed from) gives that map. A module around ``S``
    whose preceding map is larger (a stage that holds the last stage at ``S``'s size, a backbone wrapper), or that
    holds a block or stage at ``S``'s size before ``S`` or as ``S`` (:func:`_block_in_between`), is looked into.
    None where no module gives one, or where ``S`` is a residual block's output (:func:`_residual`: the main path's
    last map at its size, a sibling of the reduction after it, not a step of it): ``S`` stays the default."""
    index = {c.name: i for i, c in enumerate(calls)}  # a candidate is called once: its one call
    counts = collections.Counter(c.name for c in calls)
    top = _first_tensor(getattr(output, "logits", output))
    top = top.grad_fn if isinstance(top, Tensor) else None
    spatial = [c for c in cands if c[1].shape[-2:].numel() > 1]
    name, hw = spatial[-1][0], tuple(spatial[-1][1].shape[-2:])
    if _residual(calls, index[name]):
        return None  # S is a block's output: the main path at its size, before the reduction, not a step of it
    around = sorted({c.name for c in calls if name.startswith(c.name + ".") and counts[c.name] == 1}, key=len)
    for z in around:
        first = min(i for i, c in enumerate(calls) if c.name.startswith(z + "."))
        before = [(n, t) for n, t, _ in cands if index[n] < first]
        if (before and tuple(before[-1][1].shape[-2:]) == hw and _all_through(top, calls[index[before[-1][0]]].node)
                and not _block_in_between(calls, cands, index, z, (index[before[-1][0]], index[name]), hw, top)):
            return before[-1][0], (f"the last spatial map ({hw[0]}x{hw[1]}) before the module {z!r}, which reduces "
                                   "it to one cell on this input; all later layers are computed from it "
                                   f"({name!r} inside {z!r} is a branch or a step of that reduction; a larger input "
                                   "keeps more maps spatial)")
    return None


def _block_in_between(calls: list[_Call], cands: list[tuple[str, Tensor, bool]], index: dict[str, int], z: str,
                      span: tuple[int, int], hw: tuple[int, ...], top: Any) -> bool:
    """Whether a child of module ``z`` that is a block or a stage (it holds two or more convolutions or linear
    layers, not one layer with its norm and activation) finished in ``span`` (after the map before ``z``, up to
    ``S``: indices in ``calls``) with a map of ``S``'s ``h x w`` that every later layer goes through
    (:func:`_all_through`): then ``S`` is not a step of ``z``'s reduction but in or after a block before it, which
    the map before ``z`` would skip (timm's EfficientViT-M0 and SHViT-S1 at 32 px: ``stages.0``, at 2x2 as the
    patch embedding before ``stages``; timm's LeViT at 32 px, where ``S`` is ``stages.0`` itself). ``index``: each
    candidate's index in ``calls``; ``hw``: ``S``'s ``h x w`` (the caller's)."""
    for n, t, _ in cands:
        i = index[n]
        if (span[0] < i <= span[1] and n.startswith(z + ".") and "." not in n[len(z) + 1:]
                and tuple(t.shape[-2:]) == hw
                and sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in calls[i].module.modules()) > 1
                and _all_through(top, calls[i].node)):
            return True
    return False


def _residual(calls: list[_Call], i: int) -> bool:
    """Whether ``calls[i]``'s output is a residual block's, ``x + f(x)``: the sum (its autograd node an addition) of
    an earlier module's output (outside it) and another term (Hugging Face LeViT's ``LevitResidualLayer``, the last
    block at a size before the stage's subsampling)."""
    node, inner = calls[i].node, calls[i].name + "."
    if node is None or not type(node).__name__.startswith("AddBackward"):
        return False
    operands = {n for n, _ in node.next_functions if n is not None}
    return any(c.node in operands for c in calls[:i] if c.node is not None and not c.name.startswith(inner))


def _all_through(top: Any, node: Any) -> bool:
    """Whether every path of the traced pass's autograd graph from ``top`` (the model output's node) down to the
    input goes through ``node`` (a candidate's): the input reached only through it. The parameters are frozen in
    the pass, so a leaf's gradient accumulator that is reached is the input's (or a tensor made with requires_grad
    inside the model: not through ``node`` either; a miss makes the caller keep its default, never a wrong one)."""
    if top is None or node is None:
        return False
    stack, visited = [top], {top}
    while stack:
        n = stack.pop()
        if n is node:
            continue
        if hasattr(n, "variable"):  # an AccumulateGrad: the input, reached around node
            return False
        for nxt, _ in n.next_functions:
            if nxt is not None and nxt not in visited:
                visited.add(nxt)
                stack.append(nxt)
    return True
