"""Layer outputs as ``(B, D, h, w)`` grids: token sequences and channels-last maps.

Grad-CAM and the transformer methods (:mod:`salience.methods.transformer`) read three layouts:

* ``channels_first``: ``(B, K, h, w)``, a convolutional map, used as it is;
* ``channels_last``: ``(B, h, w, K)`` (Keras models, torchvision Swin's stages and norm, the
  LayerNorm / Linear inside ConvNeXt's blocks), permuted to ``(B, K, h, w)``;
* ``tokens``: ``(B, N, D)`` with ``k`` prefix tokens (class, distillation, register tokens) before
  ``h * w`` patch tokens in row-major order: the prefix is dropped and the patches reshaped to
  ``(B, D, h, w)``.

**Channels-last rule** (a 4-D output ``(B, a, b, c)``, no ``grid`` given): it is read as
``(B, h, w, K)`` when the model is a Keras model (``ModelInfo.layout == "NHWC"``), or when
``c`` equals the layer's known channel count (``normalized_shape[-1]`` of a LayerNorm,
``out_features`` of a Linear, ``out_channels`` of a convolution, ``num_features`` of a norm; for
a container, of its last such submodule), ``a`` does not, and ``(a, b)`` fits in the input
(``a <= H``, ``b <= W``). Otherwise it is ``(B, K, h, w)``. With ``grid=(h, w)`` the output's
dims that equal ``(h, w)`` decide. A layer with no known channel count (an activation) whose
output is channels-last needs ``grid=``.

**Tokens rule** (``(B, N, D)``; a ``(B, C, L)`` whose known channel count is at dim 1 and not last,
a ``Conv1d``'s or a flattened map's, is refused: :func:`token_shaped`): ``grid`` and ``prefix_tokens`` if given (a ``grid`` with the
cells of the patch embedding's grid with rows and columns swapped, ``(w, h)`` for ``(h, w)``, is refused; another
shape of the same cells is taken as given); else the patch
embedding gives ``(h, w)``: the first ``Conv2d`` of the model (in ``named_modules()`` order) with
``in_channels`` equal to the input's channels, ``stride == kernel_size`` and a kernel larger than
1 (torchvision ViT's ``conv_proj``, timm's ``patch_embed.proj``), its output size computed from
the input's ``(H, W)`` (non-square inputs too); then ``prefix = N - h * w``. When ``N`` is smaller
than that grid and no prefix is given (a hierarchical model: Hugging Face Swin's stages and final
``layernorm`` are tokens ``(B, h * w, C)`` after patch merging), the grid is halved, rounding up,
until it has ``N`` cells, with no prefix tokens; if no halving has ``N`` cells and one has ``N - 1``, the
first token is a class token before them (CoaT, whose stages each embed their own patches and prepend
their own class token: ``(B, 1 + 7 * 7, C)`` in its last stage at 224 px, its first embedding's grid
56x56). **An input not a whole number of patches** (:func:`_embedding_grids`): the floor grid above, or the
padded one ``(ceil(H / p), ceil(W / p))`` (timm's ``dynamic_img_pad``, Hugging Face Swin): the module holding the
convolution decides where it says (``dynamic_img_pad``); else the one grid that reads the tokens with at most
``_PLAUSIBLE_PREFIX`` prefix tokens or as a halved stage (:func:`_grid_readings`), a :class:`SalienceError` naming
``grid=`` / ``prefix_tokens=`` where both do, or where neither does and both fit after more prefix tokens
(:func:`_padded_choice`). With only ``prefix_tokens`` and no patch
embedding, ``(h, w)`` keeps the input's aspect ratio, or else is the one stride grid (below) of
``N - k`` cells.

**Without a patch embedding** (LeViT: a stack of strided convolutions, then tokens that attention
stages subsample, ``14x14 -> 7x7 -> 4x4`` at 224 px), no ``grid`` and no ``prefix_tokens``: the
tokens are all patches, in a grid ``(h, w)`` that a whole stride ``s`` gives on the input, ``(ceil(H / s),
ceil(W / s))`` (padded strided convolutions, LeViT's ``[::2]`` subsampling) or ``(floor(H / s),
floor(W / s))``, with ``h * w == N``; read so only when exactly one such grid has ``N`` cells and none
has ``N - 1`` or ``N - 2`` (a class or distillation token before the patches would fit too).
Otherwise the tokens are read on **the model's own grids** (:func:`traced_grids`: one forward pass
of zeros notes the ``(h, w)`` of every ``Conv2d`` / 2-D pooling output ``(1, C, h, w)`` and of every
``nn.Unfold``'s blocks on a ``(1, C, H, W)`` map): a grid with ``N - k`` cells, ``k`` 0, 1 or 2, is
``k`` prefix tokens before that grid, taken when exactly one such reading exists (PiT: a 16x16
stride-8 patch convolution, then convolutional pooling, ``27x27 -> 14x14 -> 7x7`` at 224 px, whose
last stage holds ``1 (+ 1 distillation) + 7 * 7`` tokens; TNT: ``nn.Unfold(16, stride=16)`` of
the image, ``1 + 14 * 14`` tokens; row-major, as both flatten them). Otherwise a
:class:`SalienceError` names the readings that fit and asks for ``grid`` / ``prefix_tokens``. A
given ``grid`` whose transpose (and not itself) a stride grid is, is refused
(:func:`_check_stride_grid`); one whose cell count no stride grid has is taken as given.
Row-major order is what timm's and Hugging Face's LeViT use (``flatten(2)
.transpose(1, 2)`` after the stem; ``view(B, h, w, C)[:, ::s, ::s]`` to subsample). Hiera's are
not before its last q-pooling: :func:`check_token_order` refuses those layers, grid given or not.
"""
from __future__ import annotations

import functools
import math
import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from salience._core.autograd import model_call, this_thread
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience._core.info import model_info
from salience._core.tensors import model_device, model_dtype

__all__ = ["Layout", "layer_layout", "token_layout", "patch_embedding", "patch_embeddings", "patch_grid", "channel_count", "token_shaped",
           "stride_grids", "traced_grids", "check_token_order"]

_HOW = ("pass grid=(h, w) (the patch grid) and prefix_tokens=k (the class / distillation / register tokens "
        "before the patches), with k + h * w equal to the number of tokens (command line: --grid H,W "
        "--prefix-tokens K)")


@dataclass(frozen=True)
class Layout:
    """How a layer's output ``(B, ...)`` becomes ``(B, D, h, w)``: ``kind`` is ``"channels_first"``,
    ``"channels_last"`` or ``"tokens"``; ``prefix`` and ``grid`` are set for tokens."""

    kind: str
    prefix: int = 0
    grid: Optional[tuple[int, int]] = None

    def to_grid(self, t: Tensor) -> Tensor:
        """``(..., B, ...)`` the layer's output (any leading dims) -> ``(..., B, D, h, w)``."""
        if self.kind == "channels_last":
            return t.movedim(-1, -3)
        if self.kind == "tokens":
            assert self.grid is not None
            patches = t[..., self.prefix:, :]  # (..., h*w, D)
            return patches.transpose(-1, -2).unflatten(-1, self.grid)
        return t

    def describe(self) -> str:
        if self.kind == "tokens":
            assert self.grid is not None
            return (f"tokens (B, N, D): {self.prefix} prefix token(s) + a {self.grid[0]}x{self.grid[1]} "
                    "grid of patches")
        return "channels-last (B, h, w, K)" if self.kind == "channels_last" else "(B, K, h, w)"


def _counted(m: nn.Module) -> Optional[int]:
    """The channels ``m``'s own type says it outputs, else None."""
    if isinstance(m, nn.LayerNorm) and m.normalized_shape:
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        return int(m.out_channels)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
        return int(m.num_features)
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    return None


def _channel_module(module: nn.Module) -> Optional[nn.Module]:
    """``module``, or for a container its last submodule, whose type says its channel count."""
    return next((m for m in reversed(list(module.modules())) if _counted(m) is not None), None)


def channel_count(module: nn.Module) -> Optional[int]:
    """The number of channels ``module`` outputs when its type says it (see the module doc), else None."""
    m = _channel_module(module)
    return None if m is None else _counted(m)


def token_shaped(module: Optional[nn.Module], shape: Sequence[int]) -> Optional[bool]:
    """Whether ``module``'s 3-D output of ``shape`` ``(B, a, b)`` reads as tokens ``(B, N, D)``, by its
    channel count (:func:`channel_count`): tokens carry it last. True when ``b`` is the count and ``a`` is
    not; False when ``a`` is and ``b`` is not (``(B, C, L)``: a ``Conv1d``'s output, a flattened map);
    when both are, the type of the module that sets the count decides (a ``Linear`` / ``LayerNorm`` puts
    them last; a ``Conv1d`` / ``BatchNorm1d`` first; a 2-D convolution's or norm's map may have been
    flattened either way: None, unless the module itself is one); None also when the count is unknown
    or neither."""
    counted = _channel_module(module) if module is not None else None
    if counted is None or len(shape) != 3:
        return None
    known = _counted(counted)
    last, first = int(shape[2]) == known, int(shape[1]) == known
    if last != first:
        return last
    if not last:
        return None
    if isinstance(counted, (nn.Linear, nn.LayerNorm)):
        return True
    return False if isinstance(counted, (nn.Conv1d, nn.BatchNorm1d)) or counted is module else None


_EMBEDS: ContextVar[Optional[dict]] = ContextVar("salience_patch_embeddings", default=None)


@contextmanager
def one_model() -> Iterator[None]:
    """Within it, :func:`patch_embedding` walks each model once and :func:`traced_grids` traces each model and
    input shape once: for a search that asks it of every layer of one model whose modules do not change meanwhile
    (the default-layer search), and for one CAM call (its default layer, then its layer's layout; as a decorator,
    ``@one_model()``). Nested, the outer scope's memo serves: it ends with the outermost."""
    if _EMBEDS.get() is not None:
        yield
        return
    token = _EMBEDS.set({})
    try:
        yield
    finally:
        _EMBEDS.reset(token)


def patch_embeddings(model: nn.Module, channels: int) -> list[tuple[str, nn.Conv2d]]:
    """Every ``Conv2d`` with ``in_channels == channels``, ``stride == kernel_size`` and a kernel larger than
    1, in ``named_modules()`` order: the patch embeddings of a ViT-like model (CrossViT has one per branch)."""
    memo, key = _EMBEDS.get(), (id(model), channels)
    if memo is not None and key in memo:
        return memo[key]
    found = [(name, m) for name, m in model.named_modules() if _patch_conv(m, channels)]
    if memo is not None:
        memo[key] = found
    return found


def _patch_conv(m: nn.Module, channels: int) -> bool:
    """Whether ``m`` is a patch embedding on a ``channels``-channel input (see :func:`patch_embeddings`)."""
    return (isinstance(m, nn.Conv2d) and m.in_channels == channels and tuple(m.stride) == tuple(m.kernel_size)
            and max(m.kernel_size) > 1 and not isinstance(m.padding, str))


def patch_embedding(model: nn.Module, channels: int) -> Optional[tuple[str, nn.Conv2d]]:
    """The first of :func:`patch_embeddings`: the patch embedding of a ViT-like model; ``None`` if there is none."""
    found = patch_embeddings(model, channels)
    return found[0] if found else None


def _conv_grid(conv: nn.Conv2d, size: Sequence[int]) -> tuple[int, int]:
    """The output ``(h, w)`` of ``conv`` on an input of spatial ``size`` ``(H, W)``."""
    out = []
    for i in range(2):
        k, s, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]  # type: ignore[index]
        out.append((int(size[i]) + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _check_grid(grid: object) -> Optional[tuple[int, int]]:
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in grid)):
        raise SalienceError(
            f"grid must be (h, w), two positive ints (the patch grid, e.g. grid=(14, 14) for a 224x224 "
            f"input and 16-pixel patches); got {grid!r}"
        )
    return int(grid[0]), int(grid[1])


def _check_prefix(prefix_tokens: object) -> Optional[int]:
    if prefix_tokens is None:
        return None
    if not isinstance(prefix_tokens, numbers.Integral) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
        raise SalienceError(
            f"prefix_tokens must be a non-negative int (the class / distillation / register tokens before "
            f"the patches, e.g. 1 for a ViT's class token); got {prefix_tokens!r}"
        )
    return int(prefix_tokens)


def _aspect_grid(n: int, size: Sequence[int]) -> Optional[tuple[int, int]]:
    """``(h, w)`` with ``h * w == n`` and ``h / w == H / W``, if there is one."""
    h = round(math.sqrt(n * size[0] / size[1])) if n > 0 else 0
    if h > 0 and n % h == 0 and (n // h) * size[0] == h * size[1]:
        return h, n // h
    return None


def _merged_grid(g: tuple[int, int], n_tokens: int) -> Optional[tuple[int, int]]:
    """The grid of a hierarchical model's later stage: ``g`` halved (rounding up, as patch merging
    pads odd sizes) until it has ``n_tokens`` cells; None if no halving does."""
    h, w = g
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
        if h * w == n_tokens:
            return h, w
    return None


def stride_grids(n: int, size: Sequence[int]) -> list[tuple[int, int]]:
    """The grids ``(h, w)`` with ``h * w == n`` that a whole stride ``s`` gives on an input of spatial
    ``size`` ``(H, W)``: ``(ceil(H / s), ceil(W / s))`` or ``(floor(H / s), floor(W / s))``, sorted."""
    return list(_stride_grids(int(n), int(size[0]), int(size[1])))


@functools.lru_cache(maxsize=4096)
def _stride_grids(n: int, rows: int, cols: int) -> tuple[tuple[int, int], ...]:
    found: set[tuple[int, int]] = set()
    if n > 0:
        for s in range(1, max(rows, cols) + 1):
            for g in ((-(-rows // s), -(-cols // s)), (rows // s, cols // s)):
                if g[0] * g[1] == n:
                    found.add(g)
    return tuple(sorted(found))


_POOLS_2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


def _unfold_grid(m: nn.Unfold, size: Sequence[int]) -> Optional[tuple[int, int]]:
    """The ``(h, w)`` of the blocks ``m`` takes from a map of spatial ``size`` (row-major, as ``nn.Unfold`` lists them)."""
    def pair(v: object) -> tuple[int, int]:
        return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # type: ignore[index]
    try:
        k, d, p, s = pair(m.kernel_size), pair(m.dilation), pair(m.padding), pair(m.stride)
    except (TypeError, ValueError, IndexError):
        return None
    out = tuple((int(size[i]) + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
    return (out[0], out[1]) if min(out) > 0 else None


def traced_grids(model: nn.Module, x_shape: Sequence[int]) -> list[tuple[int, int]]:
    """The spatial grids ``(h, w)`` the model produces on one image of shape ``x_shape[1:]``, in the order they
    finished: the outputs ``(1, C, h, w)`` of its ``Conv2d`` and 2-D pooling layers, and the block grids of its
    ``nn.Unfold`` layers on a ``(1, C, H, W)`` map (TNT's patches); distinct. One forward pass of zeros
    (parameters, modes and buffers put back by the model guard), memoised like :func:`patch_embedding`;
    ``[]`` if the model does not run on it. What a model without a patch embedding turns into tokens comes from
    one of these (PiT's pooled stages, TNT's unfolded patches): :func:`_traced_reading`."""
    memo, key = _EMBEDS.get(), ("grids", id(model), tuple(int(v) for v in x_shape[1:]))
    if memo is not None and key in memo:
        return memo[key]
    found: list[tuple[int, int]] = []

    def hook(m: nn.Module, inputs: object, output: object) -> None:
        g: Optional[tuple[int, int]] = None
        if isinstance(m, nn.Unfold):
            first = inputs[0] if isinstance(inputs, tuple) and inputs else None
            if isinstance(first, Tensor) and first.dim() == 4 and first.shape[0] == 1 and isinstance(output, Tensor):
                g = _unfold_grid(m, first.shape[-2:])
                g = g if g is not None and output.dim() == 3 and g[0] * g[1] == output.shape[-1] else None
        elif isinstance(output, Tensor) and output.dim() == 4 and output.shape[0] == 1:
            g = (int(output.shape[-2]), int(output.shape[-1]))
        if g is not None and g not in found:
            found.append(g)

    handles = [m.register_forward_hook(this_thread(hook)) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Unfold) + _POOLS_2D)]
    try:
        image = torch.zeros(1, *(int(v) for v in x_shape[1:]), device=model_device(model), dtype=model_dtype(model))
        with model_guard(model), torch.no_grad(), model_call(model, image):
            model(image)
    except Exception:  # noqa: BLE001 - a model that does not run on zeros: no grids, the caller says what to pass
        found = []
    finally:
        for h in handles:
            h.remove()
    if memo is not None:
        memo[key] = found
    return found


def _traced_reading(model: nn.Module, n_tokens: int, x_shape: Sequence[int]) -> tuple[list[tuple[int, tuple[int, int]]],
                                                                                       list[tuple[int, int]]]:
    """The readings ``(prefix, grid)`` of ``n_tokens`` tokens on the grids the model produced (:func:`traced_grids`):
    a grid with ``n_tokens - k`` cells, ``k`` 0, 1 or 2 (all patches; a class token; class and distillation tokens
    before them); and the grids traced."""
    grids = traced_grids(model, x_shape)
    readings = [(n_tokens - g[0] * g[1], g) for g in grids if 0 <= n_tokens - g[0] * g[1] <= 2]
    return readings, grids


def _stride_reading(n_tokens: int, x_shape: Sequence[int], what: str,
                    model: Optional[nn.Module] = None) -> tuple[int, tuple[int, int]]:
    """``(prefix, grid)`` of ``n_tokens`` tokens on a model without a patch embedding (see the module doc): all
    patches in the one grid a whole stride gives, else the one reading the model's own grids give
    (:func:`_traced_reading`); a :class:`SalienceError` naming what fits when neither is the only reading."""
    size = x_shape[-2:]
    fits = stride_grids(n_tokens, size)
    prefixed = [(k, g) for k in (1, 2) for g in stride_grids(n_tokens - k, size)]
    if len(fits) == 1 and not prefixed:
        return 0, fits[0]
    traced, grids = _traced_reading(model, n_tokens, x_shape) if model is not None else ([], [])
    if len(traced) == 1:
        return traced[0]
    on = f"the {int(size[0])}x{int(size[1])} input"
    readings = [f"{g[0]}x{g[1]} patches" for g in fits] + [f"{k} prefix token(s) + {g[0]}x{g[1]} patches"
                                                             for k, g in prefixed]
    if not readings:
        found = f"they fit no grid that a whole stride gives on {on}"
    elif not fits and len(prefixed) == 1:
        k, g = prefixed[0]
        found = (f"they fit a grid of {on} only after prefix tokens ({readings[0]}: if so, pass prefix_tokens={k}; "
                 f"command line: --prefix-tokens {k})")
    else:
        found = f"they fit several readings of {on} ({', '.join(readings)})"
    if traced:
        found += ("; the model's own maps fit several too (" + ", ".join(f"{k} prefix token(s) + {g[0]}x{g[1]}"
                                                                       for k, g in traced) + ")")
    elif model is not None:
        found += ("; nor does any map the model's convolutions, pooling or unfolding produced ("
                  + (", ".join(f"{g[0]}x{g[1]}" for g in grids) or "none") + ") have 0, 1 or 2 cells fewer")
    raise SalienceError(
        f"{what} gives {n_tokens} tokens, and salience cannot tell which are patches: the model has no patch "
        f"embedding (a Conv2d with stride == kernel_size on the {x_shape[1]}-channel input), and {found}; {_HOW}"
    )



# Models that keep their tokens out of row-major order at some layers. Hiera (timm ``Hiera``, Hugging
# Face ``HieraModel``) "unrolls" its tokens after the patch embedding so that q-pooling is a max over a
# leading dim: a block's output is in grid order only once no unroll is left to undo (timm
# ``reroll.schedule[block]``, Hugging Face ``encoder.schedule[stage]``, is empty): after the last
# q-pooling, in the last stage with the default ``q_pool``. Read in timm's and Hugging Face's hiera.py.
@dataclass(frozen=True)
class _Unrolled:
    """One Hiera: per scope (a module name prefix: a timm block, a Hugging Face stage), the token
    orders a layer inside can see, its input's and its output's, as ``(tokens, in grid order)`` at
    the configured size; the patch convolution (for the tokens at the input's size), the last scope
    in grid order (None if none) and whose Hiera it is."""

    scopes: tuple[tuple[str, tuple[tuple[int, bool], ...]], ...]
    tokens0: int  # the first stage's tokens at the configured size
    conv: nn.Conv2d
    grid_scope: Optional[str]
    kind: str


def _hiera(name: str, m: nn.Module) -> Optional[_Unrolled]:
    """The token orders of a timm ``Hiera`` or a Hugging Face ``HieraModel`` named ``name``; else None."""
    prefix = f"{name}." if name else ""
    if type(m).__name__ == "Hiera":  # timm
        schedule, blocks = getattr(getattr(m, "reroll", None), "schedule", None), f"{prefix}blocks"
        conv, kind = getattr(getattr(m, "patch_embed", None), "proj", None), "timm's"
    else:  # Hugging Face
        schedule, blocks = getattr(getattr(m, "encoder", None), "schedule", None), f"{prefix}encoder.stages"
        conv = getattr(getattr(getattr(m, "embeddings", None), "patch_embeddings", None), "projection", None)
        kind = "Hugging Face's"
    if not isinstance(schedule, dict) or 0 not in schedule or not isinstance(conv, nn.Conv2d):
        return None
    orders = [(math.prod(size), not sched) for sched, size in (schedule[i] for i in sorted(schedule))]
    scopes = [(f"{blocks}.{i}", (orders[max(i - 1, 0)], orders[i])) for i in range(len(orders))]
    if kind == "timm's":
        scopes.insert(0, (f"{prefix}unroll", (orders[0],)))
    grid_scope = next((s for s, o in reversed(scopes) if o[-1][1] and s.startswith(blocks)), None)
    return _Unrolled(tuple(scopes), orders[0][0], conv, grid_scope, kind)


def _unrolled_models(model: nn.Module) -> list[_Unrolled]:
    """The Hieras in ``model`` (memoised like :func:`patch_embedding`)."""
    memo, key = _EMBEDS.get(), ("unrolled", id(model))
    if memo is not None and key in memo:
        return memo[key]
    found = [u for u in (_hiera(n, m) for n, m in model.named_modules() if type(m).__name__ in ("Hiera", "HieraModel"))
             if u is not None]
    if memo is not None:
        memo[key] = found
    return found


def check_token_order(model: nn.Module, module: Optional[nn.Module], x_shape: Sequence[int], n_tokens: int,
                      what: str) -> None:
    """Refuse ``module``'s ``n_tokens`` tokens where the model keeps them out of grid order (Hiera
    before its tokens are rerolled, see :class:`_Unrolled`): a map of them would be scrambled."""
    unrolled = _unrolled_models(model) if module is not None else []
    if not unrolled:
        return
    name = next((n for n, m in model.named_modules() if m is module), None)
    for u in unrolled:
        scope = next((s for s in u.scopes if name is not None and (name == s[0] or name.startswith(s[0] + "."))), None)
        if scope is None:
            continue
        # the scope's input and output tokens at this input's size: the first stage's (the patch grid) times
        # their share of it at the configured size (q-pooling divides them by the same factor at any size)
        g = _conv_grid(u.conv, x_shape[-2:])
        seen = [ok for count, ok in scope[1] if g[0] * g[1] * count == n_tokens * u.tokens0]
        if seen and all(seen):
            return
        fix = (f"choose a layer of its last stage, where they are back in grid order: {u.grid_scope!r} or a module "
               "inside it (the default layer is one: leave layer out)" if u.grid_scope else
               "no block of this model has them in grid order (its q-pooling stops before the last unroll is undone): "
               "choose a convolutional layer, or a method without a layer (vanilla, integrated_gradients)")
        raise SalienceError(
            f"{what} gives {n_tokens} tokens that are not in grid order: {u.kind} Hiera keeps its tokens \"unrolled\" "
            f"(grouped by their offset in each pooling window) until its last q-pooling, so a map of them would be "
            f"scrambled, whatever grid= says; {fix}"
        )


def _embedding_grids(model: nn.Module, x_shape: Sequence[int], modules: Optional[Sequence[nn.Module]] = None
                     ) -> tuple[list[tuple[int, int]], Optional[bool]]:
    """The grids the patch embedding may give on an input of shape ``x_shape``: its output grid (floor), then,
    where ``(H, W)`` is not a whole number of patches, the grid of the input padded to whole patches (ceil: timm's
    ``dynamic_img_pad``, Hugging Face Swin); and whether the model says it pads: the ``dynamic_img_pad`` of the
    module holding the convolution (timm's ``PatchEmbed``), None where it does not say (or the input is whole
    patches). ``([], None)`` without a patch embedding. ``modules``: as in :func:`patch_grid`."""
    channels = int(x_shape[1])
    if modules is not None:
        conv = next((m for m in modules if _patch_conv(m, channels)), None)
    else:
        embed = patch_embedding(model, channels)
        conv = None if embed is None else embed[1]
    if conv is None:
        return [], None
    floor = _conv_grid(conv, x_shape[-2:])
    padded = (-(-int(x_shape[-2]) // int(conv.stride[0])), -(-int(x_shape[-1]) // int(conv.stride[1])))
    if padded == floor or any(int(p) for p in conv.padding):  # type: ignore[union-attr]
        return [floor], None
    said = (getattr(m, "dynamic_img_pad", None) for m in (modules if modules is not None else model.modules())
            if any(c is conv for c in m.children()))
    pads = next((v for v in said if isinstance(v, bool)), None)
    return [floor, padded], pads


def patch_grid(model: nn.Module, x_shape: Sequence[int], modules: Optional[Sequence[nn.Module]] = None
               ) -> Optional[tuple[int, int]]:
    """The patch embedding's output grid ``(h, w)`` for an input of shape ``x_shape``; None without one: the
    padded grid where the model says it pads its input to whole patches (timm's ``dynamic_img_pad``), else the
    floor grid (see :func:`_embedding_grids`). ``modules``: ``model``'s modules in ``named_modules()`` order
    (``modules_of(model)``) where the caller walked them already in this call."""
    grids, pads = _embedding_grids(model, x_shape, modules)
    return None if not grids else grids[-1] if pads else grids[0]


# The most prefix tokens a padded or floor patch grid is read with when the model does not say which it uses:
# class, distillation and register tokens (timm's and DINOv2's ``reg4``: 1 + 4).
_PLAUSIBLE_PREFIX = 8


def _grid_readings(g: tuple[int, int], n_tokens: int, k: Optional[int]) -> list[tuple[int, tuple[int, int]]]:
    """The readings ``(prefix, grid)`` of ``n_tokens`` tokens on the patch grid ``g``: ``k`` (given) or a few
    (``<= _PLAUSIBLE_PREFIX``) prefix tokens before ``g``; or a later stage of a hierarchical model (see
    :func:`_merged_grid`), with no prefix or one class token."""
    cells = g[0] * g[1]
    if k is not None:
        if k + cells == n_tokens:
            return [(k, g)]
        merged = _merged_grid(g, n_tokens - k) if k <= 1 else None
        return [] if merged is None else [(k, merged)]
    if 0 <= n_tokens - cells <= _PLAUSIBLE_PREFIX:
        return [(n_tokens - cells, g)]
    merged = _merged_grid(g, n_tokens)
    classed = _merged_grid(g, n_tokens - 1) if merged is None else None
    return [(0, merged)] if merged is not None else [(1, classed)] if classed is not None else []


def _padded_choice(grids: list[tuple[int, int]], pads: Optional[bool], x_shape: Sequence[int], n_tokens: int,
                   k: Optional[int], what: str) -> Optional[tuple[Optional[int], tuple[int, int]]]:
    """``grids``, ``pads``: :func:`_embedding_grids`'. Where the input is not a whole number of patches and the
    model does not say whether it pads: the one
    reading of ``n_tokens`` tokens on the floor or the padded grid (:func:`_grid_readings`); None where neither
    reads them (the caller goes on with the floor grid, as before) or the input is whole patches; a
    :class:`SalienceError` naming ``grid=`` / ``prefix_tokens=`` where both do, or where neither does but the
    tokens are as many as the padded grid's cells or more (both fit after more than ``_PLAUSIBLE_PREFIX``)."""
    if len(grids) < 2 or pads is not None:
        return None
    readings = list(dict.fromkeys(r for g in grids for r in _grid_readings(g, n_tokens, k)))
    if len(readings) == 1:
        return readings[0]
    if not readings and k is None and n_tokens >= grids[1][0] * grids[1][1]:  # both, after more prefix tokens
        readings = [(n_tokens - g[0] * g[1], g) for g in grids]  # than plausible: read on the floor, a wrong map
    if not readings:
        return None
    (h0, w0), (h1, w1) = grids
    options = " or ".join(f"grid=({g[0]}, {g[1]}), prefix_tokens={p} (command line: --grid {g[0]},{g[1]} "
                          f"--prefix-tokens {p})" for p, g in readings)
    alone = [p for p, _ in readings if [q for q, _ in readings].count(p) == 1]  # a prefix only one reading has
    if alone:
        options += ("; prefix_tokens alone settles it: " + " or ".join(f"prefix_tokens={p} (--prefix-tokens {p})"
                                                                       for p in alone))
    raise SalienceError(
        f"{what} gives {n_tokens} tokens, and the {int(x_shape[-2])}x{int(x_shape[-1])} input is not a whole number "
        f"of patches: the patch embedding gives a {h0}x{w0} grid, or {h1}x{w1} if the model pads its input to whole "
        f"patches, and the model does not say which (timm's patch_embed.dynamic_img_pad); the tokens fit both "
        f"({', '.join(f'{p} prefix token(s) + {g[0]}x{g[1]} patches' for p, g in readings)}). Pass {options}"
    )


def _check_said_padding(grids: list[tuple[int, int]], pads: Optional[bool], x_shape: Sequence[int], n_tokens: int,
                        k: Optional[int], g: tuple[int, int], what: str) -> None:
    """Refuse the padded grid ``g`` of a model that says it pads its input to whole patches (``dynamic_img_pad``)
    where the tokens do not fit it (fewer than its cells; or not ``k`` + its cells) and fit the floor grid (with a
    few prefix tokens, or ``k``): the model does not pad as it says, and ``grid=`` tells which grid it is.
    ``grids``, ``pads``: :func:`_embedding_grids`'."""
    if not pads or g != grids[-1] or (n_tokens >= g[0] * g[1] if k is None else k + g[0] * g[1] == n_tokens):
        return
    floor = [r for r in _grid_readings(grids[0], n_tokens, k) if r[1] == grids[0]]
    if not floor:
        return
    p, (h, w) = floor[0]
    raise SalienceError(
        f"{what} gives {n_tokens} tokens, but the model says it pads its {int(x_shape[-2])}x{int(x_shape[-1])} input "
        f"to whole patches (its patch embedding's dynamic_img_pad=True): a {g[0]}x{g[1]} grid of {g[0] * g[1]} "
        f"patches{'' if k is None else f' and prefix_tokens={k}'}, which the tokens do not fit. They fit the unpadded "
        f"{h}x{w} grid after {p} prefix token(s): if the model does not pad, pass grid=({h}, {w}), prefix_tokens={p} "
        f"(command line: --grid {h},{w} --prefix-tokens {p})"
    )


def _check_stride_grid(x_shape: Sequence[int], grid: tuple[int, int]) -> None:
    """Without a patch embedding: refuse a given ``grid`` whose transpose, and not itself, a whole stride
    of the input gives (``(4, 3)`` where ``(3, 4)`` fits a 160x224 input): rows and columns swapped, the map
    would be scrambled. Any other grid is kept as given: one whose cell count no stride gives, and one of
    another shape (tokens pooled to ``(3, 8)`` on a 32x48 input, where a stride gives 24 cells as ``4x6``:
    the user knows the grid, salience cannot)."""
    fits = stride_grids(grid[0] * grid[1], x_shape[-2:])
    if (grid[1], grid[0]) in fits and grid not in fits:
        names = " or ".join(f"grid={g} (command line: --grid {g[0]},{g[1]})" for g in fits)
        raise SalienceError(
            f"grid={grid} has {grid[0] * grid[1]} cells, but on the {int(x_shape[-2])}x{int(x_shape[-1])} input a "
            f"whole stride gives that many only as {' or '.join(f'{g[0]}x{g[1]}' for g in fits)}: the model has no patch "
            f"embedding to check against, and a grid in another shape would scramble the map. grid is (rows, "
            f"columns): pass {names}, or leave grid out"
        )


def _check_given_grid(model: nn.Module, x_shape: Sequence[int], grid: tuple[int, int], n_tokens: int,
                      prefix: Optional[int]) -> None:
    """Refuse a given ``grid`` that contradicts the patch embedding's grid ``pg`` for this input:

    - its rows and columns swapped (``(w, h)`` for ``(h, w)`` on a non-square input): the tokens
      fit it, and the map would come back scrambled (the same cells in a shape that is no swap, tokens
      pooled to ``(3, 8)`` after a ``4x6`` embedding, are taken as given: a way round when the tokens are
      not on the embedding's grid);
    - without ``prefix_tokens``, another number of cells while ``pg`` also fits the tokens: the prefix
      inferred from the given grid (``N - h * w``) and the embedding's (``N - pg cells``) differ, and
      which tokens are patches is ambiguous (e.g. ``grid=(2, 2)`` on a 3x5 grid of 16 tokens reads 12
      prefix tokens); the user says which with ``prefix_tokens``."""
    embed = patch_embedding(model, int(x_shape[1]))
    if embed is None:
        _check_stride_grid(x_shape, grid)
        return
    grids, pads = _embedding_grids(model, x_shape)
    if grid in grids and pads is None:
        return  # the floor or the padded grid, the model not saying which: the user does
    pg = grids[-1] if pads else grids[0]
    where = f"{embed[0]!r} on a {int(x_shape[-2])}x{int(x_shape[-1])} input" + (", padded to whole patches" if pads else "")
    cells, given = pg[0] * pg[1], grid[0] * grid[1]
    if pg != grid and grid == (pg[1], pg[0]):
        raise SalienceError(
            f"grid={grid} has the {cells} cells of the patch embedding's {pg[0]}x{pg[1]} grid ({where}) in "
            f"another shape: the map would be scrambled. grid is (rows, columns): pass grid={pg} (or leave grid out; "
            f"command line: --grid {pg[0]},{pg[1]})"
        )
    if prefix is None and cells != given and given <= n_tokens and cells <= n_tokens:
        raise SalienceError(
            f"grid={grid} reads {n_tokens - given} of the {n_tokens} tokens as prefix tokens, but the patch "
            f"embedding's {pg[0]}x{pg[1]} grid ({where}) reads {n_tokens - cells}: which tokens are patches is "
            f"ambiguous. Pass prefix_tokens={n_tokens - given} with grid={grid} if that is meant, or leave grid out "
            f"for {pg} (command line: --prefix-tokens {n_tokens - given} --grid {grid[0]},{grid[1]})"
        )


def token_layout(model: nn.Module, x_shape: Sequence[int], n_tokens: int, *, grid: object = None,
                 prefix_tokens: object = None, what: str = "the layer",
                 modules: Optional[Sequence[nn.Module]] = None) -> Layout:
    """Which of ``n_tokens`` tokens are patches, and their grid, for an input of shape ``x_shape``
    ``(B, C, H, W)`` (see the module doc for the rule). Raises :class:`SalienceError` saying what to pass.
    ``modules``: as in :func:`patch_grid`."""
    g, k = _check_grid(grid), _check_prefix(prefix_tokens)
    grids, pads = _embedding_grids(model, x_shape, modules) if g is None else ([], None)  # one walk of the modules
    if g is not None:
        _check_given_grid(model, x_shape, g, n_tokens, k)
    elif (chosen := _padded_choice(grids, pads, x_shape, n_tokens, k, what)) is not None:
        k, g = chosen  # an input not a whole number of patches, the model not saying whether it pads
    else:
        g = None if not grids else grids[-1] if pads else grids[0]  # patch_grid's
        if g is not None and g[0] * g[1] > n_tokens and not k:
            merged = _merged_grid(g, n_tokens)  # Hugging Face Swin's later stages: (B, h * w, C), no prefix
            classed = _merged_grid(g, n_tokens - 1) if merged is None and k is None else None
            g, k = (classed, 1) if classed is not None else (merged or g, k)  # CoaT's stages: a class token first
        elif g is None and k is not None:
            fits = stride_grids(n_tokens - k, x_shape[-2:])
            g = _aspect_grid(n_tokens - k, x_shape[-2:]) or (fits[0] if len(fits) == 1 else None)
            if g is None:
                raise SalienceError(
                    f"{what} gives {n_tokens} tokens, and salience cannot tell the grid of the {n_tokens - k} after "
                    f"prefix_tokens={k}: the model has no patch embedding (a Conv2d with stride == kernel_size on the "
                    f"{x_shape[1]}-channel input), and no single grid of the input's size has that many cells; {_HOW}"
                )
        elif g is None:
            k, g = _stride_reading(n_tokens, x_shape, what, model)
        if g is not None:
            _check_said_padding(grids, pads, x_shape, n_tokens, k, g, what)
    if k is None:
        k = n_tokens - g[0] * g[1]
        if k < 0:
            raise SalienceError(f"{what} gives {n_tokens} tokens, fewer than the {g[0]}x{g[1]} = {g[0] * g[1]} "
                                f"patches of the grid; {_HOW}")
    if k < 0 or k + g[0] * g[1] != n_tokens:
        raise SalienceError(
            f"{what} gives {n_tokens} tokens, but a {g[0]}x{g[1]} grid of patches and {k} prefix token(s) make "
            f"{k + g[0] * g[1]}; {_HOW}"
        )
    return Layout("tokens", prefix=k, grid=g)


def _four_d(model: nn.Module, module: Optional[nn.Module], shape: Sequence[int], x_shape: Sequence[int],
            grid: Optional[tuple[int, int]]) -> Layout:
    a, b, c = int(shape[1]), int(shape[2]), int(shape[3])
    if grid is not None:
        if (b, c) == grid:
            return Layout("channels_first")
        if (a, b) == grid:
            return Layout("channels_last")
        raise SalienceError(f"grid={grid} matches neither (h, w) of a (B, K, h, w) nor of a (B, h, w, K) output "
                            f"of shape {tuple(shape)}; pass the output's spatial size as grid=")
    if model_info(model).layout == "NHWC":
        return Layout("channels_last")
    known = channel_count(module) if module is not None else None
    if known is not None and c == known and a != known and a <= x_shape[-2] and b <= x_shape[-1]:
        return Layout("channels_last")
    return Layout("channels_first")


def layer_layout(model: nn.Module, module: Optional[nn.Module], shape: Sequence[int], x_shape: Sequence[int], *,
                 grid: object = None, prefix_tokens: object = None, what: str = "the layer") -> Layout:
    """The :class:`Layout` of ``module``'s output of ``shape`` for an input of shape ``x_shape``.

    4-D: channels first or last (see the module doc); 3-D ``(B, N, D)``: tokens. Anything else is
    a :class:`SalienceError` that says which layers fit.
    """
    g = _check_grid(grid)
    if len(shape) == 4:
        if prefix_tokens:
            raise SalienceError(f"prefix_tokens={prefix_tokens!r} applies to token outputs (B, N, D); {what} "
                                f"gives a 4-D map of shape {tuple(shape)}: leave prefix_tokens out")
        return _four_d(model, module, shape, x_shape, g)
    if len(shape) == 3:
        if token_shaped(module, shape) is False:
            raise SalienceError(
                f"{what} gives shape {tuple(shape)} with its {shape[1]} channels at dim 1, (B, C, L) (a Conv1d's "
                "output or a flattened map), not tokens (B, N, D) with the channels last: it cannot be read as "
                "a grid; pass layer= a layer with a map (B, K, h, w) (the one before the flatten) or with tokens"
            )
        check_token_order(model, module, x_shape, int(shape[1]), what)
        return token_layout(model, x_shape, int(shape[1]), grid=g, prefix_tokens=prefix_tokens, what=what)
    raise SalienceError(
        f"Grad-CAM and the other CAMs need a layer whose output is a map (B, K, h, w) or (B, h, w, K), or tokens (B, N, D); "
        f"{what} gives shape {tuple(shape)}. Pass layer= a convolutional block or a transformer block's norm "
        "(see model.named_modules())"
    )
