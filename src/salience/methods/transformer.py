"""Attention rollout (Abnar & Zuidema 2020) and transformer attribution (Chefer, Gur & Wolf 2021).

Both read the attention matrices ``A`` ``(B, heads, N, N)`` of every self-attention layer,
captured at the attention operation itself (:mod:`salience.attention`: fused
``scaled_dot_product_attention``, ``nn.MultiheadAttention`` and explicit softmax alike), and
return the class token's row over the patch tokens, reshaped to the patch grid ``(h, w)`` and
upsampled bilinearly to the input (like Grad-CAM): raw ``(B, H, W)``, or ``(B, K, H, W)`` for K
targets. The prefix tokens (class, distillation, register) and the grid come from the patch
embedding or from ``prefix_tokens=`` / ``grid=`` (rules in :mod:`salience.methods._tokens`).

* **Attention rollout**: per layer, the heads fused (``mean``, ``max`` or ``min``), the lowest
  ``discard_ratio`` of the fused weights of each image set to 0 (never the class token's
  attention to itself, entry ``[0, 0]``, as in Gildenblat's reference implementation), then
  ``A' = 0.5 A + 0.5 I`` with rows renormalized to sum to 1; ``R = A'_L ... A'_2 A'_1``. One
  forward pass under inference mode, each layer's heads fused as soon as its ``A`` is formed (the
  ``(B, heads, N, N)`` matrices are not kept), the rest of ``A'`` formed for runs of layers at once after
  the pass, only ``R``'s class-token row computed (from the left: vector-matrix products); the map does not depend on the class, but a class target is
  checked against the model's output from that same pass (a wrong one is refused as elsewhere).
* **Transformer attribution** (Chefer et al. 2021, "Generic Attention-model Explainability",
  eqs. 5-6): per layer ``Abar = mean_heads(ReLU(dS/dA * A))``, ``R <- R + Abar R`` from
  ``R = I``, layers in forward order. One forward pass, one backward pass per target.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from salience._core import perf as _perf
from salience.attention import ActiveIn, AttentionCapture, attention_maps, check_model, scoped
from salience._core.autograd import backward, check_input, unwrap_output
from salience._core.errors import SalienceError
from salience._core.guard import modules_of
from salience._core.tensors import autocast_off, check_flag, upsample_bilinear
from salience.methods._multi import checked, hooked_pass, refuse_fp16_overflow, several_targets
from salience.methods._tokens import Layout, token_layout
from salience.targets import TargetLike, check_output, checked_on_output, split

__all__ = ["attention_rollout", "transformer_attribution", "HEAD_FUSIONS"]

HEAD_FUSIONS = ("mean", "max", "min")

# why the attention methods' passes do not take each of these performance options, by option: the reason the one
# warning per process of salience.methods._multi.hooked_pass gives (it applies the others: precision, autocast;
# memory_format="channels_last")
_WHY_ATTENTION_PASSES_SKIP: dict[str, str] = {
    "compile": "the attention capture is a torch function mode entered by hooks on the model's attention modules "
               "for the pass, which a compiled graph neither runs nor guards on; the passes run eagerly",
    "fold_batchnorm": "the attention capture runs in the model's own attention modules (learnt per model), not in a "
                      "folded copy's; the passes run the model itself",
}


def _check_maps(shapes: list[tuple[int, ...]], batch: int, method: str) -> int:
    """The common token count ``N`` of the captured ``(B, heads, N, N)`` matrices (their shapes), or a clear error."""
    if not shapes:
        raise SalienceError(
            f"{method} saw no attention operation in the model's forward pass: it needs a transformer whose "
            "attention runs through F.scaled_dot_product_attention, nn.MultiheadAttention or a softmax over the "
            "last dim (or over dim 1 of (B, keys, heads, queries)). For a convolutional model use gradcam"
        )
    local = [s for s in shapes if len(s) > 4]
    if local:
        verb = "is" if len(local) == 1 else "are"
        raise SalienceError(
            f"{method} needs attention between all tokens, (B, heads, N, N), in every layer; {len(local)} of the "
            f"model's {len(shapes)} attention operations {verb} local, a softmax over a {len(local[0])}-D "
            f"{local[0]} tensor: each token attends within its own window or neighbourhood only (VOLO's outlook "
            "attention, (B, heads, positions, K*K, K*K); MaxViT's block and grid attention, (B, windows, heads, "
            "P, P)), and no token-to-token matrix over the image exists to roll out or weigh. Explain this model "
            "with gradcam (or another gradient method: vanilla, integrated_gradients)"
        )
    n = shapes[0][-1]
    bad = [s for s in shapes if len(s) != 4 or s[0] != batch or tuple(s[-2:]) != (n, n)]
    if bad:
        raise SalienceError(
            f"{method} needs global self-attention over the same N tokens in every layer, one sequence per image "
            f"(B = {batch}): (B, heads, N, N); the model's attention gives {_shape_runs(shapes)}. Windowed "
            "attention (Swin), attention that subsamples or pools the tokens (LeViT, PVT v2, MViTv2, Hiera), class "
            "attention over a class token added late (CaiT, VOLO) and cross-attention are not supported: use gradcam"
        )
    return n


def _shape_runs(shapes: list[tuple[int, ...]], most: int = 4) -> str:
    """``shapes`` in call order, runs of one shape counted: ``"4 x (1, 12, 196, 196), then 2 x (1, 12, 1, 197)"``."""
    runs: list[list] = []
    for s in shapes:
        if runs and runs[-1][1] == s:
            runs[-1][0] += 1
        else:
            runs.append([1, s])
    text = ", then ".join(f"{k} x {s}" for k, s in runs[:most])
    return text + (f", ... ({len(runs) - most} more runs)" if len(runs) > most else "")


def _layout(model: nn.Module, x: Tensor, n: int, prefix_tokens: object, grid: object, method: str,
            modules: Optional[list[nn.Module]] = None) -> Layout:
    layout = token_layout(model, x.shape, n, grid=grid, prefix_tokens=prefix_tokens, what=f"{method}'s attention",
                          modules=modules)
    if layout.prefix < 1:
        raise SalienceError(
            f"{method} reads the class token's row, but the attention's {n} tokens are all patches "
            f"({layout.grid[0]}x{layout.grid[1]}); if the first token is a class token pass prefix_tokens=1 "
            "(command line: --prefix-tokens 1)"
        )
    return layout


def _row_map(r: Tensor, layout: Layout, x: Tensor, upsample: bool) -> Tensor:
    """The class token's row of ``r`` ``(B, N, N)`` over the patches -> ``(B, H, W)`` (or ``(B, h, w)``)."""
    assert layout.grid is not None
    m = r[:, 0, layout.prefix:].unflatten(-1, layout.grid)
    return upsample_bilinear(m, tuple(x.shape[-2:])) if upsample else m


def _working(a: Tensor, x: Tensor) -> Tensor:
    """``a`` in the working precision: at least float32 (a model in half precision may form ``A`` in
    float32, as Hugging Face's eager attention does, or in its own dtype, as SDPA does: the same
    arithmetic either way), the map returned in ``x``'s dtype."""
    working = torch.promote_types(x.dtype, torch.float32)
    return a if a.dtype == working else a.to(working)


def _fuse_heads(a: Tensor, head_fusion: str) -> Tensor:
    """One layer's ``(B, heads, N, N)`` -> its heads fused, ``(B, N, N)``: their sum for the mean (divided by the
    head count in :func:`_rollout_layers`, as PyTorch's mean does), the max or the min. Called by the capture as
    soon as the layer's attention is formed (in the cache still), so only ``(B, N, N)`` is kept; the rest of
    ``A'`` waits for all the layers, to run once over them."""
    if head_fusion == "mean":
        return a.sum(1)
    return a.amax(1) if head_fusion == "max" else a.amin(1)


# Elements of (layers, B, N, N) fused at once (16 MB in float32): all the layers of a small ViT in one go, while a
# large batch or token count goes a few layers at a time, so that what the fusion adds to the layers' own (B, N, N)
# (the stack, and with discard_ratio topk's values and indices and the mask: ~15 bytes an element at 0.9) stays
# bounded, as the per-layer fusion before session 36 was (all 12 layers stacked at once: a 384 px ViT-Ti (577 tokens)
# at 16 images peaked at 963 MB with discard_ratio=0.9, 488 MB without; in runs: 361 MB both; benchmarks/rollout_peak.py)
_CHUNK = 1 << 22


def _rollout_layers(fused: list[Tensor], discard_ratio: float, heads: Optional[list[int]]) -> list[Tensor]:
    """The layers' fused heads ``(B, N, N)`` each (summed, with ``heads`` their head counts, for the mean) ->
    ``A' = 0.5 A_f + 0.5 I`` with rows renormalized, as ``(l, B, N, N)`` runs of layers in order: the lowest
    ``discard_ratio`` of each image's fused weights in each layer set to 0 (never ``[0, 0]``). Several layers at
    once (a few torch calls, not a few per layer: ~30 us a layer on a small ViT), at most ``_CHUNK`` elements a
    run unless one layer is more; each layer's numbers as from that layer alone. Empties ``fused``."""
    step = max(1, _CHUNK // max(1, fused[0].numel()))
    runs = []
    for i in range(0, len(fused), step):
        part = fused[:step]
        del fused[:step]  # the run's own tensors held by ``part`` only: freed once stacked
        runs.append(_rollout_run(part, discard_ratio, heads[i:i + step] if heads else None))
    return runs


def _rollout_run(fused: list[Tensor], discard_ratio: float, heads: Optional[list[int]]) -> Tensor:
    """:func:`_rollout_layers` for one run of layers ``(B, N, N)`` -> ``(l, B, N, N)``. Empties ``fused``."""
    stacked = torch.stack(fused)
    fused.clear()
    if heads and len(set(heads)) == 1:
        stacked.div_(heads[0])
    elif heads:  # layers of different head counts (each divided by its own)
        for layer, h in zip(stacked.unbind(0), heads):
            layer.div_(h)
    flat = stacked.flatten(2)  # (l, B, N * N)
    n = int(flat.shape[-1] * discard_ratio)
    if n:
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk(n, dim=-1, largest=False).indices, True)
        drop[..., 0] = False
        flat.masked_fill_(drop, 0)
    stacked.mul_(0.5).diagonal(dim1=-2, dim2=-1).add_(0.5)
    return stacked.div_(stacked.sum(dim=-1, keepdim=True))


def _class_row(runs: list[Tensor]) -> Tensor:
    """Row 0 of ``R = A'_L ... A'_2 A'_1`` ``(B, 1, N)`` from ``runs`` of layers ``(l, B, N, N)``, from the left:
    ``e_0^T A'_L``, then one vector-matrix product per layer (``L N^2`` work per image instead of the full
    product's ``L N^3``; the same numbers up to float rounding)."""
    each = [a for run in runs for a in run.unbind(0)]
    v = each[-1][:, :1]
    for a in reversed(each[:-1]):
        v = torch.bmm(v, a)
    return v


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def attention_rollout(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    prefix_tokens: Optional[int] = None,
    grid: Optional[tuple[int, int]] = None,
    upsample: bool = True,
) -> Tensor:
    """Attention rollout: the product of every layer's head-fused attention plus identity, class token's row.

    ``x`` ``(B, C, H, W)`` -> raw ``(B, H, W)`` (``(B, h, w)`` with ``upsample=False``). ``target``
    is accepted for the common signature and does not change the map; K targets give the same map K
    times, ``(B, K, H, W)``. A wrong target is still refused as every method refuses it (per-image
    classes for another batch; a class the model does not have, out of range or negative: checked
    against the output of the rollout's own pass, no pass of its own). ``head_fusion``: ``"mean"``,
    ``"max"`` or ``"min"`` over heads; ``discard_ratio`` in ``[0, 1)``: the share of lowest fused
    weights set to 0 per layer.
    One forward pass, no gradient; the model comes back exactly as it was.
    """
    upsample = check_flag(upsample, "upsample")
    # one walk of the modules for the checks of the input, the model (in attention_maps) and the token layout
    modules = modules_of(model) if isinstance(model, nn.Module) else None
    check_input(x, model, modules)
    targets, multi = split(target, x.shape[0])
    if head_fusion not in HEAD_FUSIONS:
        raise SalienceError(f"head_fusion must be one of {', '.join(map(repr, HEAD_FUSIONS))}; got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise SalienceError(f"discard_ratio must be a number in [0, 1), e.g. 0.9; got {discard_ratio!r}")
    shapes: list[tuple[int, ...]] = []

    def layer(a: Tensor) -> Tensor:  # each layer's A -> A' as soon as it is formed
        shapes.append(tuple(a.shape))
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            return a  # refused after the pass (_check_maps): nothing to compute
        return _fuse_heads(_working(a, x), head_fusion)

    outputs: list[object] = []  # what the model returns, to check the targets against (no second pass)

    def run(m: nn.Module, t: Tensor) -> None:  # afresh each time attention_maps runs it (see there)
        shapes.clear()
        chunk = _perf.active(m)  # the performance options that apply (hooked_pass): the layout, autocast
        with chunk.autocast() if chunk is not None else contextlib.nullcontext():
            outputs[:] = [m(chunk.prepare(t) if chunk is not None else t)]

    with hooked_pass(model, x, "attention_rollout", why=_WHY_ATTENTION_PASSES_SKIP):
        fused = attention_maps(model, x, reduce=layer, forward=run, method="attention_rollout", modules=modules)
        if checked_on_output(targets):
            check_output(targets, unwrap_output(outputs[0], model))
        n = _check_maps(shapes, x.shape[0], "attention_rollout")
        refuse_fp16_overflow(model, *fused, what="the attention matrices")  # fp16 logits past 65504: NaN A
    layout = _layout(model, x, n, prefix_tokens, grid, "attention_rollout", modules)
    with torch.inference_mode(), autocast_off():
        heads = [s[1] for s in shapes] if head_fusion == "mean" else None
        m = _row_map(_class_row(_rollout_layers(fused, discard_ratio, heads)), layout, x, upsample).to(x.dtype)
    m = m.clone()  # a normal tensor for the caller (in-place operations allowed), (B, h, w) or (B, H, W): small
    return m.unsqueeze(1).repeat(1, len(targets), 1, 1) if multi else m


def _attribution_pass(model: nn.Module, x: Tensor, targets: list, strip_softmax: bool) -> AttentionCapture:
    """The forward and the targets' backward passes with the attention captured with its gradients: once the
    model's attention modules are known (by this or attention rollout), the capture is active only inside them
    during the forward (the backward needs no mode: the gradients come by the matrices' tensor hooks); a narrowed
    pass that misses or raises runs again with a fresh capture around the whole forward (:func:`scoped`). A target
    on an inner layer (its forward stops there) is captured around the whole forward and teaches no scope."""

    def run(cap: Any) -> None:
        backward(model, x, targets, extra_modes=[cap], strip_softmax=strip_softmax)

    if any(getattr(t, "layer", None) is not None for t in targets):  # the forward stops at the target's layer: the
        cap = AttentionCapture(batch=x.shape[0], grads=True)  # attention before it is not the model's, nor its scope
        run(cap)  # (learnt from it, later passes narrowed to those modules gave maps without the layers after it)
        return cap

    def narrowed(cap: AttentionCapture, modules: list[nn.Module]) -> None:
        active = ActiveIn(cap, modules)
        try:
            run(active)
        finally:  # a Ctrl-C at the start of ActiveIn.__exit__ left its hooks on: taken off here
            active.close()

    return scoped(model, lambda: AttentionCapture(batch=x.shape[0], grads=True), narrowed, run)


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def transformer_attribution(
    model: nn.Module,
    x: Tensor,
    target: TargetLike = None,
    *,
    prefix_tokens: Optional[int] = None,
    grid: Optional[tuple[int, int]] = None,
    upsample: bool = True,
    strip_softmax: bool = True,
) -> Tensor:
    """Transformer attribution (Chefer et al. 2021): ``R <- R + mean_h(ReLU(dS/dA * A)) R``, class token's row.

    ``x`` ``(B, C, H, W)`` -> raw ``(B, H, W)`` (``(B, h, w)`` with ``upsample=False``), or
    ``(B, K, H, W)`` for K targets, which share one forward pass (one backward pass each).
    ``target`` and ``strip_softmax`` as in :func:`salience.vanilla`; ``prefix_tokens`` / ``grid``
    as in :func:`salience.gradcam`. The model comes back exactly as it was.
    """
    upsample = check_flag(upsample, "upsample")
    modules = modules_of(model) if isinstance(model, nn.Module) else None  # one walk for the three checks
    check_input(x, model, modules)
    check_model(model, "transformer_attribution", modules)
    targets, multi = split(target, x.shape[0])
    checkpoint_error = getattr(torch.utils.checkpoint, "CheckpointError", ())
    try:  # the capture only inside the modules that call the attention, once known (a fresh one if that misses)
        # precision and the layout apply (autograd.backward finds the run); compile and fold_batchnorm are said
        with hooked_pass(model, x, "transformer_attribution", why=_WHY_ATTENTION_PASSES_SKIP):
            cap = _attribution_pass(model, x, targets, strip_softmax)
            refuse_fp16_overflow(model, *(g for gs in cap.grads for g in gs))  # dS/dA past 65504: a NaN map
    except checkpoint_error:  # type: ignore[misc]  # a non-reentrant checkpoint backward() could not run plainly
        raise SalienceError(
            "transformer_attribution cannot run through a non-reentrant torch.utils.checkpoint: the backward pass "
            "recomputes the checkpointed blocks without the attention capture, so torch finds other values than the "
            "forward pass saved. Turn gradient checkpointing off for the call (timm: model.set_grad_checkpointing("
            "False); Hugging Face: model.gradient_checkpointing_disable())"
        ) from None
    maps, grads = [_working(a.detach(), x) for a in cap.maps], [[_working(g, x) for g in gs] for gs in cap.grads]
    n = _check_maps([tuple(a.shape) for a in maps], x.shape[0], "transformer_attribution")
    layout = _layout(model, x, n, prefix_tokens, grid, "transformer_attribution", modules)
    if any(len(g) not in (0, len(targets)) for g in grads):
        raise SalienceError("an attention matrix got gradients from some targets' backward passes but not others'; "
                            "explain these targets in separate calls")
    eye = torch.eye(n, dtype=maps[0].dtype, device=maps[0].device)
    out = []
    with autocast_off():  # in the working precision, whatever autocast the caller is in
        for k in range(len(targets)):
            r: Optional[Tensor] = None  # R = I until the first layer the score depends on
            for a, g in zip(maps, grads):
                if g:  # a layer the score does not depend on adds nothing
                    abar = (g[k] * a).clamp_(min=0).mean(dim=1)
                    r = eye + abar if r is None else r + torch.bmm(abar, r)  # I + Abar I = I + Abar, exactly
            out.append(_row_map(eye.expand(x.shape[0], n, n) if r is None else r, layout, x, upsample))
    maps_k = torch.stack(out, dim=1).to(x.dtype)
    return maps_k if multi else maps_k[:, 0]
