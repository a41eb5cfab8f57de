"""Gradient-free CAMs: Score-CAM (Wang et al. 2020) and Ablation-CAM (Desai & Ramaswamy 2020).

Both weigh each channel ``k`` of a layer's output ``A`` ``(B, D, h, w)`` by forward passes alone and
keep ``ReLU(sum_k w_k A_k)``, upsampled to the input like Grad-CAM (bilinear,
``align_corners=False``). The layer is chosen as for Grad-CAM (:func:`salience.methods.gradcam.
default_layer`; token and channels-last layers read by :mod:`salience.methods._tokens`).

* **Score-CAM**: channel ``k``, upsampled to the input and scaled to ``[0, 1]``, masks the image:
  ``w_k = S(x * H_k)``. The paper scores the masked image by the target class's *probability*
  (softmax over classes; ``softmax="auto"`` for class targets); pytorch-grad-cam instead takes the
  raw scores and applies a softmax over the *channels* (``softmax="channels"``).
* **Ablation-CAM**: channel ``k`` is set to ``value`` (0) in the layer's output and the relative
  drop of the score is its weight, ``w_k = (S - S_k) / S``.

Every (channel, image) pair is an item of :func:`salience._core.engine.accumulate` (item
``j = k * B + b``), run in chunks from the memory budget under ``torch.inference_mode``; K targets
share every pass. Score-CAM runs one forward pass per item, but a channel that is constant on an
image (a dead ReLU channel: common) masks the image to zeros, and that image's score of zeros is
computed once: the engine's items are the live (channel, image) pairs, found before the first
pass, so every full chunk has the same batch size; live channels of an image related by ``c * a + d``
(``c > 0``) have the same mask (bilinear upsampling is affine-equivariant) and share one pass
(:meth:`_ChannelMasks.distinct`). Ablation-CAM runs no pass for a channel already equal to ``value``
everywhere on its image (its ablation changes nothing: the clean score, weight 0). Ablation-CAM replaces the layer's output in the
forward pass: its items come image by image, and each run of two or more items of one image in a chunk runs the
layers before the layer once, on that image's one row, and the ablated copies of the layer's output (that row
repeated) through the rest together; a skip around the layer (a resnet block's shortcut, which reads the block's
input) or a read of ``x`` after it broadcasts its one row against the items' (session 43; before, the layers before
ran on the chunk's B images, and a skip with several images met B rows against the items', an error, and every pass
ran the whole model once per item). Where the rest cannot take one row against n (a concatenation of an earlier
tensor, a model that checks its batch sizes), the passes run one row per item; the first run of a call is checked
against its pass per item on two items, which catches a rest that takes ``b`` from ``x`` and mixes the items' rows.

Both take the engine's performance options (``memory_format``, ``compile``, ``precision``; see
docs/performance.md): Score-CAM's chunks of live items keep a compiled graph's one shape;
Ablation-CAM's hooked passes never run compiled nor folded (a warning says so once per process).
"""
from __future__ import annotations

from dataclasses import replace
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core import derived as _derived
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.autograd import (StopForward, capture_hook, captured_pass, check_input, final_softmax,
                                    forward_scores, layer_not_captured, this_thread)
from salience._core.errors import SalienceError
from salience._core.fingerprint import own_hooks
from salience._core.guard import Found, user_module, model_guard, put_back_state, record_state, state_changes
from salience._core.layers import LayerSpec
from salience._core.tensors import autocast_off, check_fits, check_number, check_flag
from salience.methods._multi import checked, several_targets, warn_unapplied
from salience.methods._tokens import Layout, one_model
from salience.methods.gradcam import grid_layout, resolve_cam_layer, upsample_maps
from salience.methods.perturbation import (SOFTMAX, _Reused, check_perturbation_targets, check_softmax, clean_batch,
                                           clean_passes, clean_scores, judge, score_items, scores_of, softmax_known,
                                           use_probabilities)
from salience.targets import Classes, Target, resolve, split

__all__ = ["scorecam", "ablationcam", "SCORECAM_SOFTMAX"]

# why Ablation-CAM's passes do not take each of these performance options, by option: the reason the one warning per
# process of salience.methods._multi.warn_unapplied gives (the layout and the autocast apply)
_WHY_ABLATION_PASSES_SKIP: dict[str, str] = {
    "compile": "a forward hook replaces the layer's output in each pass, which a compiled graph does not follow "
               "(dynamo does not guard on a hook added after it compiled) and would retrace for every chunk's hook; "
               "the passes run eagerly",
    "fold_batchnorm": "the folded copy has not the model's layer whose output the hook replaces; the passes run the "
                      "model itself",
}

SCORECAM_SOFTMAX = SOFTMAX + ("channels",)
"""Score-CAM's weights: ``"classes"`` (the target's probability, the paper), ``"none"`` (the raw
score), ``"channels"`` (raw scores, softmax over the channels: pytorch-grad-cam), ``"auto"``
(``"classes"`` for class targets of a model with two classes or more, else ``"none"``)."""


def _setup(method: str, model: nn.Module, x: Tensor, target: Any, layer: Optional[LayerSpec]
           ) -> tuple[list[Target], bool, nn.Module]:
    check_input(x, model)
    if isinstance(model, torch.jit.ScriptModule):
        raise SalienceError(f"{method} reads a layer's output with a forward hook, which a TorchScript model "
                            "does not support; pass the original Python nn.Module (or use occlusion / rise)")
    targets, multi = split(target, x.shape[0])
    check_perturbation_targets(targets, method)
    return targets, multi, resolve_cam_layer(model, x, layer, checked=True)


def _sizes(b: int, step: int) -> list[int]:
    """The images of each pass of a capture in parts: ``step`` a pass, the last the rest."""
    return [min(step, b - i) for i in range(0, b, step)]


def _capture(model: nn.Module, x: Tensor, mod: nn.Module, strip_softmax: bool, batch: Optional[int] = None,
             seen: Optional[list] = None, found: Optional[Found] = None) -> tuple[Tensor, Tensor]:
    """The layer's output (as the layer gives it) and the model's output for ``x``: one forward pass, or one per
    ``batch`` images (:func:`~salience.methods.perturbation.clean_batch`) where the layer's output is ``(n, ...)`` for
    ``n`` images, its other axes the same in every part (else the one pass of all: a layer with another first axis, a
    sequence-first one). A first axis equal to ``n`` by chance (a sequence-first ``(N, n, D)`` with ``N == n``: the
    parts joined along the tokens, a wrong layer output, session 45) is told from the batch by parts of two sizes:
    where another axis of the first part is ``n`` too and the parts would all be ``n`` images, the rest are split
    unevenly (8 images: 4, 3, 1), and a first axis that does not follow the part's size is the one pass of all.
    ``seen``: given, gets what the pass showed of a final softmax (:func:`final_softmax`, read while the capture
    hook, which changes no output, is on: the structure it was recorded for). ``found``: the model's own state put
    back before each pass (:class:`~salience._core.guard.Found`)."""
    b = x.shape[0]
    step = b if batch is None else max(1, min(int(batch), b))
    sizes = _sizes(b, step)
    acts: list[Tensor] = []
    outs: list[Tensor] = []
    i = part = 0
    copied = False  # a part's pass changed the layer's output in place: the next parts copy it at once
    while part < len(sizes):
        n = sizes[part]
        xb = x[i:i + n]
        i += n
        part += 1

        # the first output of a reused module; the layer's own, not as an in-place operation after it left it
        def scored(xb: Tensor = xb) -> Tensor:
            o = clean_passes(model, xb, strip_softmax, None, found)  # found's state put back first (and before a rerun)
            if seen is not None:
                seen[:] = [final_softmax(model)]
            return o

        store, out, copied = _captured(mod, scored, copied, xb)
        if not store or not isinstance(store[0], Tensor):
            raise layer_not_captured(model, mod, store)
        a = store[0]
        if len(sizes) > 1 and (a.dim() == 0 or a.shape[0] != n or out.dim() == 0 or out.shape[0] != n
                               or (acts and a.shape[1:] != acts[0].shape[1:])):
            del acts, outs, store, out, a
            # not image by image along its first axis: all at once, from the state found (session 50 last read)
            return _capture(model, x, mod, strip_softmax, seen=seen, found=found)
        if not acts and n > 1 and len(sizes) > 1 and n in a.shape[1:] and len(set(sizes)) == 1:
            sizes[1:] = _sizes(b - n, n - 1)  # parts of two sizes tell the batch axis from another of n
        acts.append(a.detach())
        outs.append(out)
        del store, out, a
    if len(sizes) > 1 and len(set(sizes)) == 1 and sizes[0] in acts[0].shape[1:]:  # one size (1), on another axis too
        del acts, outs
        return _capture(model, x, mod, strip_softmax, seen=seen, found=found)
    return (acts[0], outs[0]) if len(acts) == 1 else (torch.cat(acts), torch.cat(outs))


def _captured(mod: nn.Module, run: Callable[[], Any], copy: bool = False,
              inputs: Optional[Tensor] = None) -> tuple[list, Any, bool]:
    """:func:`~salience._core.autograd.captured_pass` without its copy of the layer's output where none is needed:
    the output kept as the layer returned it, with its version counter; where the rest of the pass changed it in
    place (the counter moved: a resnet block's ``out += identity`` after ``bn3``) the pass runs again under
    ``captured_pass``, which copies the values when the layer returns. The copy, alive through the rest of the
    clean pass, was Ablation-CAM's peak (6.1 MiB over a plain loop's at resnet50's ``layer1.0.conv1``, 8 images at
    224 px, session 45). Under ``torch.inference_mode`` (no version counter), or with ``copy`` (an earlier part's
    pass changed it), ``captured_pass`` at once. The rerun starts from the random generators' states the first pass
    found (a model that draws noise in its forward gets one pass's values, as a plain loop's capture; the review of
    session 46: the rerun drew new ones); what else a pass changes (the user's hooks and counters, an input the model
    changes in place) sees two passes. ``inputs``: the pass's input; a model that changed it in place (``x -= mean``
    in its forward) would run again on other values, a :class:`SalienceError` (the review of session 46: the maps of
    an input changed twice). Returns ``(store, run's result, whether it copied)``."""
    if copy or torch.is_inference_mode_enabled():
        return (*captured_pass(mod, run), True)
    rng = _rng_states()  # the rerun draws what this pass drew: the values and random numbers of one pass
    version = inputs._version if inputs is not None and not inputs.is_inference() else None
    store: list[Any] = []
    handle = mod.register_forward_hook(this_thread(capture_hook(store, False, copy=False)))
    try:
        result = run()
    finally:
        handle.remove()
    if store and isinstance(store[0], Tensor) and (store[1] is None or store[0]._version != store[1]):
        del store, result
        if version is not None and inputs is not None and inputs._version != version:
            raise SalienceError(
                f"the model changed its input in place in its forward (x -= ..., an in-place first layer) and the "
                f"layer {type(mod).__name__}'s output was changed in place after the layer: its values as the layer "
                "returned them need the pass again, on an input that is no longer the same. Pass a model that leaves "
                "its input as it is (clone it first in its forward), or choose a layer whose output nothing changes in "
                "place after it (the in-place activation after it, or the block it is in)")
        _set_rng_states(rng)  # a model with noise in its forward: the rerun's draws are the first pass's (session 46)
        return (*captured_pass(mod, run), True)  # changed in place after the layer (or no counter): with the copy
    return store[:1], result, False


def _rng_states() -> tuple[Tensor, Optional[list[Tensor]]]:
    """The CPU generator's state and, where CUDA is initialized, every CUDA device's (for :func:`_set_rng_states`)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_rng_states(states: tuple[Tensor, Optional[list[Tensor]]]) -> None:
    """Put back the generators' states :func:`_rng_states` read: a pass run again draws the same random numbers."""
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _grid(method: str, model: nn.Module, mod: nn.Module, acts: Tensor, x: Tensor, grid: Any,
          prefix_tokens: Any) -> tuple[Layout, Tensor]:
    """The layer's layout and its output as ``(B, D, h, w)``; a layer without channels is an error."""
    try:
        layout = grid_layout(model, mod, acts, x, grid, prefix_tokens)
    except SalienceError as e:
        raise SalienceError(str(e).replace("Grad-CAM", method)) from None
    return layout, layout.to_grid(acts)


def _check_channel_passes(method: str, channels: int) -> None:
    """A :class:`SalienceError` where ``method``'s passes of each image, one a channel of its layer, times the calls
    around it (SmoothGrad's noisy copies) are more than :data:`~salience._core.engine.MAX_PASSES`: the channels are
    known after the first pass (the layer's output), so SmoothGrad's own check before any pass could not count them;
    this one runs before their passes (:func:`~salience._core.engine.check_copies`, also with no SmoothGrad)."""
    _engine.check_copies(channels, f"{method}'s {channels:,} channels (a pass each)",
                         "fewer samples, or a layer with fewer channels (layer=)", alone=True)


def _cam(weights: Tensor, acts: Tensor, relu: bool, upsample: bool, size: tuple[int, int], multi: bool) -> Tensor:
    """``ReLU(sum_d w_d A_d)``: weights ``(B, K, D)``, acts ``(B, D, h, w)`` -> ``(B, [K,] H, W)``."""
    with autocast_off():  # in the layer's dtype, whatever autocast the caller is in
        cam = torch.einsum("bkd,bdhw->bkhw", weights.to(acts.dtype), acts)
    if relu:
        cam = cam.clamp(min=0)
    if upsample:
        cam = upsample_maps(cam, size)
    return cam if multi else cam[:, 0]


def _per_image(scores: Tensor, b: int) -> Tensor:
    """Item scores ``(D * B, K)`` in item order ``j = d * B + b`` -> ``(B, K, D)``."""
    return scores.unflatten(0, (-1, b)).permute(1, 2, 0)


class _ChannelMasks:
    """Score-CAM's items: item ``j`` is image ``j % B`` times its channel ``j // B``, upsampled to the
    image and scaled to ``[0, 1]``; a channel constant on its image gives an empty mask (not live).

    :meth:`live` finds the items with a non-empty mask before any pass, so the engine's chunks hold
    live items only: every full chunk then runs the model on the same batch size, and the C
    allocator sees the same sizes in every chunk (chunks of varying live counts made glibc keep
    hundreds of MiB of freed memory: docs/methods-perturbation.md)."""

    BLOCK_PIXELS = 1 << 22  # items upsampled at once by :meth:`live` (16 MiB of float32); :meth:`distinct` per block

    def __init__(self, x: Tensor, acts: Tensor, align_corners: bool, model: Optional[nn.Module] = None) -> None:
        self.x, self.acts, self.align_corners = x, acts, align_corners
        self._buffer: Optional[Tensor] = None  # one item's upsampled channel, reused by every item
        self._inputs = _Reused(x, model)  # the chunks' masked images, in one buffer (in the chunk's layout)

    def _upsampled(self, items: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(up, lo, span, owner)``: the items' channels upsampled ``(n, 1, H, W)`` (into ``out`` when
        given: the values of ``F.interpolate``), their min and range."""
        b = self.x.shape[0]
        owner, ch = items % b, items // b
        a = self.acts[owner, ch].unsqueeze(1).to(self.x.dtype)  # (n, 1, h, w)
        size = [int(self.x.shape[-2]), int(self.x.shape[-1])]
        if out is None:
            up = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=self.align_corners)
        else:
            up = torch.ops.aten.upsample_bilinear2d.out(a, size, self.align_corners, None, None, out=out)
        lo = up.amin(dim=(2, 3), keepdim=True)
        return up, lo, up.amax(dim=(2, 3), keepdim=True) - lo, owner

    def live(self) -> Tensor:
        """The items whose mask is not empty, in increasing order ``(n_live,)`` (int64)."""
        total = self.acts.shape[0] * self.acts.shape[1]
        block = max(1, self.BLOCK_PIXELS // max(1, int(self.x.shape[-2]) * int(self.x.shape[-1])))
        out = []
        for start in range(0, total, block):
            items = torch.arange(start, min(total, start + block), device=self.x.device)
            out.append(items[self._upsampled(items)[2].flatten() > 0])
        return torch.cat(out)

    def distinct(self, live: Tensor) -> tuple[Tensor, Tensor]:
        """``(first, source)``: the live items whose mask no earlier live item of their image already has
        (increasing), and for each live item the position in ``first`` of the item with its mask.

        Bilinear upsampling is affine-equivariant (its weights sum to 1), so two channels of an image that
        differ by ``a' = c * a + d`` (``c > 0``) have the same mask ``(up - min) / (max - min)``: a ReLU6
        channel with one nonzero position, or saturated at 6 on the same positions as another. Compared
        exactly by each channel's own scaling to ``[0, 1]`` at the layer's size (float64 where the device
        has it); maps that only round apart stay apart. A block of images at a time (:attr:`BLOCK_PIXELS`
        values of the layer, one image at least): the float64 copies of every image at once took 5.5x the
        batch's layer output, outside the memory budget."""
        b, n = self.x.shape[0], len(live)
        by_image = (live % b).argsort(stable=True)  # the live items' positions, image by image
        ends = [0] + torch.bincount(live % b, minlength=b).cumsum(0).tolist()  # image i's: ends[i]:ends[i + 1]
        per = max(1, self.BLOCK_PIXELS // max(1, self.acts[0].numel()))  # images per block
        group = torch.empty(n, dtype=torch.long, device=live.device)  # each live item's mask, numbered across images
        groups = 0
        for start in range(0, b, per):
            at = by_image[ends[start]:ends[min(b, start + per)]]
            if len(at):
                inverse = self._groups(live[at])
                group[at] = inverse + groups
                groups += int(inverse.max()) + 1
        first = torch.full((groups,), n, dtype=torch.long, device=live.device)
        first.scatter_reduce_(0, group, torch.arange(n, device=live.device), "amin")  # each mask's first item
        order = first.argsort()
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=live.device)  # each mask's place among the firsts
        return live[first[order]], position[group]

    def _groups(self, items: Tensor) -> Tensor:
        """Each item's mask ``(n,)``, numbered ``0..m-1`` (items of one mask: one image, channels ``c * a + d``)."""
        b = self.x.shape[0]
        exact = torch.float32 if self.x.device.type == "mps" else torch.float64
        a = self.acts[items % b, items // b].flatten(1).to(self.x.dtype).to(exact)  # (n, h * w)
        lo = a.amin(1, keepdim=True)
        span = a.amax(1, keepdim=True) - lo
        canon = torch.cat([(items % b).unsqueeze(1).to(exact), a.sub_(lo).div_(span)], 1)
        del a
        return torch.unique(canon, dim=0, return_inverse=True)[1]

    def masked(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """``(images (n, C, H, W), owner (n,))``: the live items' images times their masks, in a buffer that the next
        call overwrites (:class:`~salience.methods.perturbation._Reused`: a fresh one a chunk grew glibc's heap by about
        its size a chunk, 300 MB over the 64 chunks of resnet50's ``layer1.0.conv1`` on 8 images at 224 px, session
        42). Item by item: each mask (:meth:`mask`, one ``(1, 1, H, W)`` buffer) times its image, written into the
        item's row of the buffer; the chunk's masks ``(n, 1, H, W)`` held in a buffer of their own through the pass were
        1.5 MiB of the call's live tensors over a plain loop's for 8 images at 224 px (session 46)."""
        owner = items % self.x.shape[0]
        out = self._inputs.rows(owner)
        for i in range(len(items)):  # no read of the items on the host (no device synchronization)
            out[i:i + 1].mul_(self.mask(items[i:i + 1]))
        return out, owner

    def mask(self, item: Tensor) -> Tensor:
        """The mask ``(1, 1, H, W)`` of one live item ``item`` ``(1,)``, in a buffer that the next call overwrites."""
        if self._buffer is None:
            self._buffer = torch.empty((1, 1) + tuple(self.x.shape[-2:]), dtype=self.x.dtype, device=self.x.device)
        return self(item, self._buffer)[0]

    def __call__(self, items: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(mask (n, 1, H, W), owner (n,))`` of live items (the same values :meth:`live` tested), into ``out`` where
        given."""
        up, lo, span, owner = self._upsampled(items, out)
        return up.sub_(lo).div_(span.clamp(min=torch.finfo(up.dtype).tiny)), owner


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
@one_model()  # one trace of the model's grids for the default layer and the layout
def scorecam(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    layer: Optional[LayerSpec] = None,
    softmax: str = "auto",
    relu: bool = True,
    upsample: bool = True,
    align_corners: bool = False,
    strip_softmax: bool = True,
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
) -> Tensor:
    """Score-CAM: each channel of a layer weighted by the target's score of the image it masks.

    ``x``: ``(B, C, H, W)`` -> raw ``(B, H, W)`` (``(B, h, w)`` with ``upsample=False``; ``(B, K, ...)``
    for K targets, which share every forward pass). Each channel ``A_k``, upsampled bilinearly to
    ``(H, W)`` (``align_corners``: ``True`` is pytorch-grad-cam's upsampling) and scaled to
    ``[0, 1]``, masks the image; ``w_k`` is the target's score of ``x * H_k``. ``softmax``: see
    :data:`SCORECAM_SOFTMAX` (default: the class probability, as the paper). One forward pass per
    distinct mask of an image (a constant channel's empty mask once per image; channels with the
    same mask share a pass): a layer with fewer channels is cheaper. ``layer``, ``relu``, ``grid``,
    ``prefix_tokens`` and ``strip_softmax`` as in :func:`salience.gradcam`; ``chunk``,
    ``max_memory``, ``progress``, ``memory_format``, ``compile`` and ``precision`` (how the masked
    passes run; ``None``: the settings) as in :func:`salience.smoothgrad`.
    """
    relu = check_flag(relu, "relu")
    upsample = check_flag(upsample, "upsample")
    align_corners = check_flag(align_corners, "align_corners")
    progress = check_flag(progress, "progress")
    check_softmax(softmax, SCORECAM_SOFTMAX)  # before _setup, whose default layer runs the model
    targets, multi, mod = _setup("Score-CAM", model, x, target, layer)
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    b = x.shape[0]
    with model_guard(model), Found(model) as found:  # the model's own state, put back before each pass (session 49)
        seen: list = [None]  # what the capture's pass showed of a final softmax, for the run
        acts, out = _capture(model, x, mod, strip_softmax, clean_batch(x, perf, chunk, budget, model, strip_softmax),
                             seen, found)
        _, acts = _grid("Score-CAM", model, mod, acts, x, grid, prefix_tokens)
        _check_channel_passes("Score-CAM", int(acts.shape[1]))  # before the channels' passes
        resolved = resolve(targets, model, x, strip_softmax=strip_softmax, output=out)
        probs = use_probabilities("none" if softmax == "channels" else softmax, resolved, out)
        already = judge(out, probs)  # once, on the clean images: every chunk (and the blank image) on one scale
        items = _ChannelMasks(x, acts, align_corners, model)
        live = items.live()  # item j = channel j // B of image j % B; the others mask the image to zeros
        first, source = items.distinct(live)  # the live items of a mask of their own; source: each one's first

        # the scores are the weights, written into one buffer: a small tensor kept per chunk (the engine's per-item
        # scores) between the chunk's freed activations split glibc's heap, whose peak then grew with the chunks
        got = torch.empty(len(first), len(resolved), dtype=x.dtype, device=x.device)

        def compute(start: int, stop: int) -> Tensor:
            masked, owner = items.masked(first[start:stop])
            s = score_items(model, masked, [t.for_items(owner) for t in resolved], probs, strip_softmax,
                            already=already, owner=owner)  # the live items: not the chunk's items in order
            got[start:stop] = s
            return s  # summed per image by the engine (small), unused

        total = acts.shape[1] * b
        scores = torch.empty(total, len(resolved), dtype=x.dtype, device=x.device)
        # the blank images' scores checked with the passes' (NaN: a refusal naming them); the noted scores' items
        with _derived.run_scope(len(first) + (b if len(live) < total else 0)):
            if len(live) < total:  # each image's scores of an all-zero mask (B, K), computed once, as the passes run
                blank = _perf.Run(model, x, replace(perf, compile=False, fold_batchnorm=False))  # its autocast only
                # one blank image: every image's is the same. Inside the run (forward_scores enters its autocast), not
                # in its autocast block: forward_scores' model_guard turns a caller's autocast off, and the blank
                # scores were float32 beside the passes' bf16 ones (session 46's last read)
                with torch.inference_mode(), _perf.inside(blank):
                    out0 = clean_passes(model, torch.zeros_like(x[:1]), strip_softmax, None, found)
                    # each image's own rows (a target may change its output in place: an expanded view refused it)
                    rows = out0.expand((b,) + tuple(out0.shape[1:])).contiguous()
                    empty = scores_of(rows, resolved, probs, already=already)
                scores[:] = empty[torch.arange(total, device=x.device) % b]
            if len(live):  # one pass per distinct mask of an image; the items of the same mask share its score
                # the run (its folded copy) made after the blank images' pass, which ran the model itself under the
                found.before_pass()  # autocast (session 44); the copy traced with the state found, not the blank's
                run = softmax_known(_perf.Run(model, x, perf, tag=f"scorecam:{probs}:{strip_softmax}", plain_passes=True,
                                              strip_softmax=strip_softmax), seen[0])
                _engine.accumulate(compute, len(first), b, chunk=chunk, max_memory=budget, progress=progress,
                                   desc="scorecam", device=x.device, inference=True, run=run, found=found)
                scores[live] = got[source]
    w = _per_image(scores, b)  # (B, K, D)
    if softmax == "channels":
        w = w.softmax(dim=-1)
    return _cam(w, acts, relu, upsample, (int(x.shape[-2]), int(x.shape[-1])), multi)


class _Ablated:
    """Ablation-CAM's items: item ``j`` is image ``j % B`` with channel ``j // B`` of the layer's output
    set to ``value``. A forward hook replaces the layer's output by the chunk's ablated copies."""

    def __init__(self, model: nn.Module, mod: nn.Module, x: Tensor, layout: Layout, value: float,
                 score: Callable[[Tensor, Tensor], Tensor], clean: Tensor, channels_last: bool = False) -> None:
        self.model, self.mod, self.x, self.layout, self.value, self.score = model, mod, x, layout, value, score
        # channels_last (the run's forced layout, Run.probe_layout): the images once in it for the chunks' passes
        # (:meth:`_images`), made before the engine's memory probe. Each pass's own channels-last copy of its image
        # row was counted by the probe (a shared pass of two items of one image) as half a row of every item: plans
        # smaller than a contiguous call's (resnet50 at 64 px, layer1.0.conv1, 2 images, fp32: 126 + 2 against 128),
        # so other fp32 maps than the contiguous probe's plan gave
        self.x_cl = x.detach().contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else None
        self.clean = clean  # (B, K): the images' clean scores, the check's scale (the drops S - S_k)
        # the layers before run once per run of an image's items in a chunk, on that image's one row (the layer's
        # output row repeated for the items' n after it: a read of x or of an earlier tensor after the layer
        # broadcasts its one row, or meets two batch sizes, an error, and the passes run once per item from then
        # on); False: once per item. One image at a time: rows of several images could not tell a read of another
        # image's x (chunk=3 of 4 images mixed them), and a skip around the layer (a resnet block's) cannot
        # broadcast several images' rows against the items'
        self.shared = True

    def _ablate(self, out: Tensor, rows: Tensor, ch: Tensor) -> Tensor:
        t = out[rows]  # a copy already (an index tensor), in out's layout: out[rows].clone() made two (session 44)
        n = torch.arange(len(ch), device=t.device)
        if self.layout.kind == "channels_first":
            t[n, ch] = self.value
        else:  # channels last, or tokens (B, N, D): the channel on every position / token
            t.movedim(-1, 1)[n, ch] = self.value
        return t

    def _run(self, inputs: Tensor, rows: Tensor, ch: Tensor, owner: Tensor) -> Tensor:
        calls: list[int] = []

        def hook(module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
            calls.append(1)  # a module called more than once: its first call is the layer's output
            if len(calls) != 1:
                return None
            if isinstance(output, (tuple, list)):  # (hidden states, ...): the first is the layer's tensor
                items = [self._ablate(output[0], rows, ch), *output[1:]]
                return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
            return self._ablate(output, rows, ch)

        handle = self.mod.register_forward_hook(this_thread(hook))
        try:
            return self.score(inputs, owner)
        finally:
            handle.remove()

    def _shared_pass(self, o: int, owner: Tensor, ch: Tensor, keep: bool) -> Optional[Tensor]:
        """The scores of items of image ``o`` (``owner`` all ``o``) with the layers before run once, on that image's
        one row (the layer's output row repeated for the items' n after it: a skip around the layer, or a read of
        ``x`` after it, broadcasts its one row); None where that pass fails or gives other rows. ``keep``: its
        deferred checks (NaN scores) stay."""
        scope = _derived.current()
        saved = scope.snapshot() if scope is not None else None
        s: Optional[Tensor] = None
        try:
            s = self._run(self._images()[o:o + 1], torch.zeros_like(owner), ch, owner)
        except Exception:  # noqa: BLE001 - one row against the items' n, or the model's own check of them (a
            pass  # ValueError, an assert): an error of the model's own comes again from the pass per item
        ok = s is not None and s.shape[0] == len(owner)
        if scope is not None and saved is not None and not (ok and keep):  # scores thrown away refuse nothing
            scope.restore(saved)
        return s if ok else None

    def _own(self, owner: Tensor, ch: Tensor) -> Tensor:
        """The items' scores with every item's image a row of its own (the whole model once per item)."""
        return self._run(self._images()[owner], torch.arange(len(owner), device=self.x.device), ch, owner)

    def _images(self) -> Tensor:
        """``x`` ``(B, C, H, W)`` for a pass: inside a channels-last chunk its channels-last copy (a row of it, or rows
        gathered from it, are channels-last already: the pass makes no copy of its own); else ``x`` (the sharing
        check, outside the chunks, as it was)."""
        run = _perf.active(self.model)
        return self.x_cl if self.x_cl is not None and run is not None and run.channels_last else self.x

    def _check_shared(self, o: int, owner: Tensor, ch: Tensor) -> bool:
        """Whether the shared pass gives items of image ``o`` (two: the call's first run's first two) the scores of
        their pass per item (one read per call): a rest that takes b from x (``b = x.shape[0]``, then
        ``reshape(b, c, -1)`` and back) mixes the items' rows with no error and no other shape. Both passes'
        deferred checks are dropped: these items run again."""
        s = self._shared_pass(o, owner, ch, keep=False)
        if s is None:
            return False
        scope = _derived.current()
        saved = scope.snapshot() if scope is not None else None
        own = self._own(owner, ch)
        if scope is not None and saved is not None:
            scope.restore(saved)
        # a relative 1e-3 of the drops S - S_k (the map's signal: one channel of hundreds moves S by 1e-3 of it or
        # less, so 1e-3 of S let a rest that mixed the items' rows by about the drops pass, a wrong map), and 8 eps of
        # the scores for the layers before rounding by a kernel's choice per batch size (the check runs in fp32 where
        # the model and x are: ablationcam; under a bf16 / fp16 autocast 8 eps of S is most of the drops)
        eps = 8 * torch.finfo(own.dtype).eps if own.is_floating_point() else 0.0
        drop = (own - self.clean[o].to(own.dtype)).abs().amax()
        return bool(((s - own).abs() <= 1e-3 * drop + eps * own.abs().amax() + 1e-7).all())

    def check(self, idx: Tensor, owners: Sequence[int]) -> None:
        """Check the sharing (:meth:`_check_shared`) on the first two items of the first image with two or more, before
        the engine's chunks: inside the first chunk, the engine's memory probe, its passes counted as the chunk's
        (11.2 MB an item against 6.9 without for resnet50 at 224 px: chunks of 4 items, not 7, and the rest of the
        model ran 14 % slower an image at 4 rows a pass than at 8). Nothing where no image has two items."""
        for i in range(1, len(owners)):
            if owners[i] == owners[i - 1]:
                b = self.x.shape[0]
                pair = idx[i - 1:i + 1]
                self.shared = self._check_shared(owners[i], pair % b, pair // b)
                return

    def __call__(self, idx: Tensor, owners: Sequence[int]) -> Tensor:
        """The scores of items ``idx`` (image by image: the engine's chunk of the items that are run, in the order
        :func:`ablationcam` gives them; ``owners``: their images, on the host, so that a chunk reads no tensor).
        Each run of two or more items of one image is one pass with the layers before the layer run once, on that
        image alone (its sharing checked before the chunks, :meth:`check`: any run of two items here is two
        neighbours of ``live``, which the check saw first); single items, and every item once sharing failed, run
        together, one row per item."""
        b = self.x.shape[0]
        owner, ch = idx % b, idx // b
        if not self.shared:
            return self._own(owner, ch)
        bounds = [i for i in range(1, len(owners)) if owners[i] != owners[i - 1]]
        done: list[tuple[int, int, Tensor]] = []  # (start, stop, scores) of the runs that ran shared
        rest: list[int] = []  # the positions that run one row per item
        for start, stop in zip([0] + bounds, bounds + [len(owners)]):
            s = None
            if stop - start > 1 and self.shared:
                s = self._shared_pass(owners[start], owner[start:stop], ch[start:stop], keep=True)
                self.shared = s is not None
            if s is None:
                rest.extend(range(start, stop))
            else:
                done.append((start, stop, s))
        if not done:
            return self._own(owner, ch)
        parts = [s for _, _, s in done]
        at = [torch.arange(start, stop, device=idx.device) for start, stop, _ in done]
        if rest:
            r = torch.tensor(rest, device=idx.device)
            parts.append(self._own(owner[r], ch[r]))
            at.append(r)
        return torch.cat(parts)[torch.cat(at).argsort()]


def _ablation_clean(model: nn.Module, x: Tensor, mod: nn.Module, strip_softmax: bool, perf: _perf.Performance,
                    batch: int, found: Optional[Found] = None) -> tuple[Tensor, Tensor]:
    """Ablation-CAM's ``(layer output, model output)`` of the clean images, ``batch`` images a pass
    (:func:`~salience.methods.perturbation.clean_batch`): a float32 pass of all of them as two (:func:`_clean_apart`),
    else :func:`_capture`'s passes (``found``'s state put back before each: the first too, after a probe's pass)."""
    if found is not None:
        found.before_pass()
    if perf.precision == "fp32" and batch >= x.shape[0] and _split_pays(model, mod) and _split_same(model):
        return _clean_apart(model, x, mod, strip_softmax, found)
    return _capture(model, x, mod, strip_softmax, batch, found=found)


# the split runs where the layer's first parameterised leaf is within the first 1/_EARLY of the model's (session 47)
_EARLY = 8


def _split_pays(model: nn.Module, mod: nn.Module) -> bool:
    """Whether :func:`_clean_apart`'s two passes can lower the clean pass's peak: where the layer is early in the
    model (its first leaf module with parameters within the first eighth of the model's, in ``modules()`` order), so
    that its kept output would live through the big activations after it. Measured on resnet50, 8 images at 224 px
    (docs/performance.md, session 47 "split"): at ``layer1.0.conv1`` (leaf 2 of 107) the split lowers the call's
    peak by 5.3 MiB; at ``layer2.0.conv1`` (leaf 22) and ``layer3.5.conv3`` the peak is a chunk's pass either way,
    and at ``layer4`` (the default) the split's is 32,000 bytes higher (the clean output through the second pass):
    there the split only added a pass of the layers before the layer. A heuristic of the order of the modules (a
    stem, then stages of falling resolution), not a measure of the pass."""
    mine = {id(m) for m in mod.modules()}
    leaves, at = 0, None
    for m in model.modules():
        d = m.__dict__
        params = d["_parameters"]
        if not d["_modules"] and params and any(p is not None for p in params.values()):  # a leaf with a parameter
            if at is None and id(m) in mine:
                at = leaves
            leaves += 1
    return at is not None and at * _EARLY < leaves


def _split_same(model: nn.Module) -> bool:
    """Whether the two passes can be the one pass twice as far as the model's own code goes: no hook of the user's
    (:func:`~salience._core.fingerprint.own_hooks`: on a module of the model or torch's global ones; the stopped pass
    would fire a forward pre-hook without its hook) and no ``torch.Generator`` among the modules' attributes (its
    numbers are not put back between the passes, as the process's generators are). A model that writes its own
    state in forward is told after the first pass (:func:`_own_state`)."""
    if own_hooks(model) is not None:
        return False
    generator = torch.Generator
    return not any(generator in map(type, m.__dict__.values()) for m in model.modules())  # its exact type, in C


def _own_state(model: nn.Module) -> Optional[list]:
    """What the model's own code may write in a forward (:func:`guard.record_state`): every buffer and its version
    counter, with a copy of the values of those of modules not from ``torch.nn`` (whose layers write no buffer in eval
    mode, where the model guard put them; a copy of theirs too cost the split its lower peak: tests/test_s47_permem.py;
    one such buffer the user's forward writes is put back from the guard's own copy), and those modules' plain
    attributes (one level), each tensor among them with its version counter and a copy (``self.seen.fill_(1)``; the
    review of session 47 "lastread"; whatever its size, unlike the model guard's: over its 1 MiB limit the one pass ran
    on the first pass's writes, last read of session 48) and each list, dict, set, deque, defaultdict or Counter with its contents
    (``self.hist.append(y)``: session 48), and their parameters and submodules by name (``self.w = nn.Parameter(...)``,
    a head swapped: nn.Module's own dicts written in place, missed before session 51, as :class:`Found` records them);
    ``None`` where such a tensor is an inference tensor (no version counter), and where a module is TorchScript (its
    state lives in TorchScript, not in dicts this record reads: a raw AttributeError before session 51; the one pass
    then, with :class:`~salience._core.guard.Found`'s record of it)."""
    modules = list(model.modules())
    if any(isinstance(m, torch.jit.ScriptModule) for m in modules):
        return None
    return record_state(modules, attributes=user_module, containers=True, copies=user_module, named=True)


def _clean_apart(model: nn.Module, x: Tensor, mod: nn.Module, strip_softmax: bool,
                 found: Optional[Found] = None) -> tuple[Tensor, Tensor]:
    """Ablation-CAM's float32 clean pass of all ``B`` images as two: the model's output (``S``) from a pass that keeps
    nothing of the layer, then the layer's output from a pass stopped when the layer returns (the layers before only),
    the random generators put back between them, so both passes draw one pass's numbers and the stream after them
    is one pass's. ``(layer output, model output)``, the values of :func:`_capture`'s one pass (the same kernels on
    the same batch; nothing after the layer runs on the kept output, so no in-place change reaches it). The one pass
    kept the layer's output through the layers after it, the call's peak: in float32 a plain loop's pass plus the
    model guard's copies of the BatchNorm buffers, 0.2 MiB over the loop's on resnet50 at ``layer1.0.conv1`` with 8
    images at 224 px (session 47: 5.1 MiB under it now, the chunks' passes the peak). A model that changed its input
    in place in that first pass (``x -= mean`` in its forward) would run the second on other values: then
    :func:`_capture`'s one pass gives both, its generators as the first found them (the input changed once more; its
    item passes, which read rows of ``x``, change it again anyway, as they did before). So does an inference tensor
    ``x``, whose in-place change cannot be told (it keeps no version counter), and a stop that did not come back as
    raised: caught in the model's forward (its ``except Exception``) and swallowed (the layers after ran on the kept
    output, which they may change in place) or raised as another error (the review of session 47: a
    ``RuntimeError`` where the one pass ran). The caller runs the two only where they can lower the peak
    (:func:`_split_pays`) and the model's own code cannot tell them from one pass (:func:`_split_same`: no user
    forward hook, no generator of a module's own); a model that wrote its own state in the first pass (a buffer, a
    plain attribute of a module not from torch.nn: :func:`_own_state`) gets that state put back and the one pass (the
    review of session 47: the stopped pass saw the state after the first, the map 0.014 off). ``found``: the call's
    :class:`~salience._core.guard.Found`, which puts back before the one pass what ``_own_state``'s record cannot (a
    buffer of a ``torch.nn`` layer the model's own code wrote, where the guard's copy is not of the state found: a
    dataset run's second call, a call in the user's guard after a pass; session 50 last read: the map 0.38 off)."""
    if x.is_inference():
        return _capture(model, x, mod, strip_softmax, x.shape[0], found=found)
    state = _own_state(model)
    if state is None:
        return _capture(model, x, mod, strip_softmax, x.shape[0], found=found)
    before, version = _rng_states(), x._version
    out = forward_scores(model, x, strip_softmax=strip_softmax)
    if x._version != version or state_changes(state):
        del out
        _set_rng_states(before)
        put_back_state(state)
        return _capture(model, x, mod, strip_softmax, x.shape[0], found=found)
    after = _rng_states()
    _set_rng_states(before)  # the layers before draw what the first pass drew
    store: list[Any] = []
    # the layer's first output kept and the pass ended there (a reused module: its first call is the layer's)
    handle = mod.register_forward_hook(this_thread(capture_hook(store, True)))
    stopped = False
    try:
        forward_scores(model, x, strip_softmax=strip_softmax)
    except StopForward:
        stopped = True
    except Exception:
        if not store:  # the model's own error, before the layer
            raise
    finally:
        handle.remove()
        _set_rng_states(after)
    if store and not stopped:  # the model's forward caught the stop: the one pass (from the first pass's generators)
        del store, out
        _set_rng_states(before)
        return _capture(model, x, mod, strip_softmax, x.shape[0], found=found)
    if not store or not isinstance(store[0], Tensor):
        raise layer_not_captured(model, mod, store)
    return store[0].detach(), out


def _check_precision(model: nn.Module, x: Tensor, run: _perf.Run) -> Any:
    """The precision of Ablation-CAM's sharing check (:meth:`_Ablated.check`): fp32 where the model and ``x`` are (a
    bf16 autocast's rounding is most of the drops ``S - S_k`` the check compares), else the passes' autocast."""
    fp32 = x.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    return autocast_off() if fp32 else run.autocast()


@contextmanager
def _chunks_layout(run: _perf.Run) -> Iterator[None]:
    """Ablation-CAM's ``run`` in its chunks' layout from the clean scores ``S`` on, under a 16-bit autocast
    (channels-last where ``memory_format="channels_last"`` is forced: :meth:`~salience._core.perf.Run.probe_layout`),
    the model's parameters put back at the end (:func:`~salience._core.perf.close_run`), after an error before the
    chunks too. ``S`` then comes from the kernels of the ``S_k`` it is compared with, and inside
    :meth:`~salience._core.perf.Run.casts_kept` the bf16 weight copies are made once for ``S`` and every chunk: they
    were made three times (for ``S``, contiguous; in the probing chunk; at the first channels-last chunk), each set
    51.6 MiB on resnet50, among the passes' activations (benchmarks/ablation-allocs-s59.md)."""
    try:
        if run.dtype is not None:
            run.set_layout(run.probe_layout())
        yield
    finally:
        _perf.close_run(run)


def _check_nonzero(clean: Tensor, targets: list[Target], probs: Sequence[bool]) -> None:
    """Refuse a clean score ``S`` of exactly 0 (``clean`` ``(B, K)``): Ablation-CAM's weights
    ``(S - S_k) / S`` would be 0 / 0 or infinite there, a map of NaN (a fresh torchvision
    VisionTransformer, whose head starts at zeros, scores 0 for every class)."""
    zero = (clean == 0).nonzero()
    if not len(zero):
        return
    b, k = (int(i) for i in zero[0])
    t = targets[k]
    index = getattr(t, "index", None)
    what = (f"class {index if isinstance(index, int) else int(index[b])}" if isinstance(t, Classes)
            else f"the target {t!r}")
    kind = "probability" if probs[k] else "score"
    raise SalienceError(
        f"the {kind} of {what} is 0 on image {b}: Ablation-CAM's weights (S - S_k) / S divide by it "
        "(a map of NaN); score class probabilities instead (softmax='classes'), or use another method "
        "(gradcam, scorecam)"
    )


def _ablation_value(value: Any, x: Any) -> float:
    """Ablation-CAM's ``value``, a finite number that the images' dtype holds (the ablated channels take it: 1e308
    in float32 was a raw ``RuntimeError``); ``x`` that is no floating tensor is left to :func:`_setup`'s check."""
    value = check_number(value, "value", what="the value an ablated channel takes, e.g. 0")
    return check_fits(value, x.dtype, "value") if isinstance(x, Tensor) and x.is_floating_point() else value


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
@one_model()  # one trace of the model's grids for the default layer and the layout
def ablationcam(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    layer: Optional[LayerSpec] = None,
    value: float = 0.0,
    softmax: str = "none",
    relu: bool = True,
    upsample: bool = True,
    strip_softmax: bool = True,
    grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
) -> Tensor:
    """Ablation-CAM: each channel of a layer weighted by the relative drop of the score without it.

    ``x``: ``(B, C, H, W)`` -> raw ``(B, H, W)`` (``(B, h, w)`` with ``upsample=False``; ``(B, K, ...)``
    for K targets, which share every forward pass). ``w_k = (S - S_k) / S``, ``S_k`` the target's
    score with channel ``k`` of the layer's output set to ``value`` (default 0, the paper's
    ablation; a channel already equal to ``value`` on an image costs no pass: ``S_k = S``); ``S`` near 0 makes the weights large, ``S == 0`` is a :class:`SalienceError`. ``softmax``: score the raw output (default, the
    paper's class score) or class probabilities (see :data:`salience.methods.perturbation.SOFTMAX`).
    ``layer``, ``relu``, ``grid``, ``prefix_tokens`` and ``strip_softmax`` as in :func:`salience.gradcam`;
    ``chunk``, ``max_memory``, ``progress``, ``memory_format``, ``compile`` and ``precision`` as in
    :func:`salience.smoothgrad`: the passes take the layout and the autocast, but never run compiled
    nor folded (a forward hook replaces the layer's output in each of them; ``compile`` and ``fold_batchnorm``
    are accepted, for settings shared with the other methods, its passes run eagerly on the model itself, and a
    warning says so once per process).
    """
    relu = check_flag(relu, "relu")
    upsample = check_flag(upsample, "upsample")
    progress = check_flag(progress, "progress")
    value = _ablation_value(value, x)
    check_softmax(softmax)  # both before _setup, whose default layer runs the model
    targets, multi, mod = _setup("Ablation-CAM", model, x, target, layer)
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    warn_unapplied("ablationcam", model, ("compile", "fold_batchnorm"), perf, why=_WHY_ABLATION_PASSES_SKIP)
    b = x.shape[0]
    with model_guard(model), Found(model) as found:  # the model's own state, put back before each pass (session 49)
        batch = clean_batch(x, perf, chunk, budget, model, strip_softmax)  # images a clean pass, within max_memory
        native, out = _ablation_clean(model, x, mod, strip_softmax, perf, batch, found)
        layout, acts = _grid("Ablation-CAM", model, mod, native, x, grid, prefix_tokens)
        _check_channel_passes("Ablation-CAM", int(acts.shape[1]))  # before the channels' passes
        resolved = resolve(targets, model, x, strip_softmax=strip_softmax, output=out)
        probs = use_probabilities(softmax, resolved, out)
        already = judge(out, probs)  # once, on the clean images: every chunk on one scale
        run = _perf.Run(model, x, replace(perf, compile=False, fold_batchnorm=False),  # _WHY_ABLATION_PASSES_SKIP:
                        tag=f"ablationcam:{probs}:{strip_softmax}:{value}")  # a hook replaces the layer's output
        with run.casts_kept(), _chunks_layout(run):  # one CastCache for S and every chunk, all in the chunks' layout
            clean = clean_scores(model, x, out, resolved, probs, strip_softmax, run, already=already, batch=batch,
                                 found=found)  # (B, K) in the clean output's parts
            _check_nonzero(clean, resolved, probs)

            def score(inputs: Tensor, owner: Tensor) -> Tensor:
                found.before_pass()
                return score_items(model, inputs, [t.for_items(owner) for t in resolved], probs, strip_softmax,
                                   already=already, plain=False, owner=owner)  # the live items: not in order

            items = _Ablated(model, mod, x, layout, value, score, clean, channels_last=run.probe_layout())

            # item j = channel j // B of image j % B; a channel already equal to value everywhere on its image is not
            # changed by its ablation: its score is the clean one (weight 0, and it multiplies a map of value anyway).
            # Tested on the layer's output as the ablation writes it: every token, a ViT's prefix tokens too (the grid
            # has the patches only: a channel at value on them and not on the class token changes the score)
            axis = 1 if layout.kind == "channels_first" else native.dim() - 1
            alive = (native != value).movedim(axis, 1).flatten(2).any(2)  # (B, D)
            # image by image: a chunk's items of one image share the layers before the layer (_Ablated: on its one row)
            at = alive.flatten().nonzero().flatten()
            live = (at % alive.shape[1]) * b + at // alive.shape[1]
            owners = (live % b).tolist()  # each item's image, read once: the chunks split their items by image
            if chunk is None or chunk > 1:  # chunk=1: no pass shares
                with torch.inference_mode(), _check_precision(model, x, run):  # outside the first chunk's probe
                    items.check(live, owners)

            def compute(start: int, stop: int) -> tuple[Tensor, Tensor]:
                s = items(live[start:stop], owners[start:stop])
                return s, s  # the scores give the weights: kept per item (small), combined below

            scores = clean.repeat(acts.shape[1], 1)  # (D * B, K): each item's clean score until its pass
            if len(live):
                sums = _engine.accumulate(compute, len(live), b, chunk=chunk, max_memory=budget, progress=progress,
                                          desc="ablationcam", device=x.device, inference=True, run=run)
                assert sums.scores is not None
                scores[live] = sums.scores.to(scores.dtype)
    ablated = _per_image(scores, b)  # (B, K, D)
    y = clean.unsqueeze(-1)
    w = (y - ablated) / y
    return _cam(w, acts, relu, upsample, (int(x.shape[-2]), int(x.shape[-1])), multi)
