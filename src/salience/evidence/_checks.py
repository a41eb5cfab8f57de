"""What the metric families share: the checks of maps and masks, the method lookup, and the
keying of random draws by an image's content (:func:`image_seeds`). Private to
:mod:`salience.evidence`, but for :func:`image_seeds`, which it exports."""
from __future__ import annotations

import functools
import hashlib
from typing import Callable, Optional, Sequence, Union

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience._core.autograd import predicted_classes
from salience._core.engine import MAX_PASSES, check_passes
from salience._core.errors import ArgumentError, SalienceError
from salience._core.info import max_batch
from salience._core.tensors import check_int
from salience.methods import METHODS, QUICK, as_method
from salience.methods._multi import bound_problem, shape_problem
from salience.methods.options import check_taken
from salience.targets import Classes, Predicted, Target

MethodLike = Union[str, Callable[..., Tensor]]


def check_maps(maps: Tensor, name: str = "maps") -> Tensor:
    """``maps`` as a finite float32 or float64 ``(B, H, W)`` tensor (a ``(B, 1, H, W)`` one is
    squeezed). Integer, bool, float16 and bfloat16 maps become float32: the metrics sum thousands
    of values, which overflow float16 (65504) and lose all but 8 bits in bfloat16."""
    if not isinstance(maps, Tensor):
        raise SalienceError(f"expected {name} as a torch.Tensor of shape (B, H, W), got {type(maps).__name__}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        hint = ("; for a map per colour channel reduce the channels first, e.g. salience.reduce.max_abs(maps); "
                "for the maps of K targets (a (B, K) target) score each target apart: maps[:, k] with "
                "target[:, k] (reducing them would mix the classes)") if maps.dim() == 4 else ""
        raise SalienceError(f"expected {name} of shape (B, H, W), got shape {tuple(maps.shape)}{hint}")
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    return check_finite(maps, name, "a saliency map must be finite")


def check_finite(t: Tensor, name: str, why: str) -> Tensor:
    """``t`` ``(B, ...)`` if every value is finite, else a :class:`SalienceError` naming the rows that are not
    (``images 1, 3 of 4``) and ``why`` they must be."""
    bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(1) if t.shape[0] else torch.zeros(0, dtype=torch.bool)
    if bool(bad.any()):  # which ones: a batch of maps from several methods or files is found and fixed by image
        idx = bad.nonzero()[:, 0].tolist()
        which = ", ".join(map(str, idx[:5])) + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")
        raise SalienceError(f"{name} contain NaN or infinite values (image{'s' if len(idx) > 1 else ''} {which} of "
                            f"{t.shape[0]}); {why}")
    return t


def scaled_magnitudes(maps: Tensor) -> Tensor:
    """``|maps|`` ``(B, ...)`` in float64, each map divided by its largest value (an all-zero map kept):
    for the metrics of ratios (energy in mask, sparseness, complexity), which this leaves unchanged,
    while a sum of huge finite values (64 of 1e307, or of 1e37 in float32) overflowed to inf."""
    a = maps.abs().double()
    dims = tuple(range(1, a.dim()))
    return a / a.amax(dims, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def check_seed(seed: object) -> int:
    """``seed`` as an int a generator takes (``-2**63`` to ``2**64 - 1``), or a :class:`SalienceError`
    (a float seed was truncated or raised a raw error; a huge one overflowed inside torch)."""
    s = check_int(seed, "seed", minimum=None)
    if not -(2 ** 63) <= s < 2 ** 64:
        raise SalienceError(f"seed must be an int from -2**63 to 2**64 - 1 (a generator's seed), got {s}")
    return s


def image_keys(x: Tensor) -> list[bytes]:
    """The content key of each image of ``x`` ``(B, ...)``: the 16-byte BLAKE2b digest of its shape
    (int64, little-endian) and its values as little-endian float32 in C order (``-0.0`` as ``0.0``).

    The key depends on what the image is, not on where it is: the same image gives the same key in
    any batch, at any position, on any device, in float32 or float64 (values that are equal in
    float32)."""
    values = (x.detach().to("cpu", torch.float32) + 0.0).contiguous().numpy().astype("<f4", copy=False)
    shape = np.asarray(values.shape[1:], dtype="<i8").tobytes()
    return [hashlib.blake2b(shape + v.tobytes(), digest_size=16).digest() for v in values]


def keyed_seed(seed: int, key: bytes, stream: int = 0) -> int:
    """The seed of draw ``stream`` of the image with content ``key`` (:func:`image_keys`) in a
    metric seeded with ``seed``: the first 8 bytes, little-endian, of BLAKE2b(``key`` + ``seed`` as
    16 bytes little-endian signed + ``stream`` as 8 bytes little-endian), modulo ``2**63``."""
    data = key + int(seed).to_bytes(16, "little", signed=True) + int(stream).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % 2 ** 63


def image_seeds(x: Tensor, seed: int = 0, stream: int = 0) -> list[int]:
    """One seed per image of ``x`` ``(B, C, H, W)``, from ``seed`` and the image's content, not its
    position: ``keyed_seed(seed, image_keys(x)[i], stream)`` (docs/evaluation.md, "Random draws").

    Every random draw of the metrics that belongs to one image comes from a generator seeded so,
    which makes an image's score the same alone, in any batch and at any position. Give them to the
    functions that take one seed per image (``random_maps``, ``linear_imputation``,
    ``salience.smoothgrad``) for the same property."""
    s = check_seed(seed)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise SalienceError(f"expected x as a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    stream = check_int(stream, "stream", minimum=0, what="the number of the draw")
    if stream >= 2 ** 64:
        raise SalienceError(f"stream must be below 2**64 (8 bytes of the key), got {stream}")
    return [keyed_seed(s, k, stream) for k in image_keys(x)]


def check_count(value: object, name: str, minimum: int, what: str, most: Optional[int] = None) -> int:
    """A metric's count of passes of the model over each image (deletion / insertion ``steps``, faithfulness
    correlation's ``subsets``, max-sensitivity's ``samples``, ROAD's fractions) as an int from ``minimum``, the passes
    it runs at most :data:`~salience._core.engine.MAX_PASSES`, else a :class:`SalienceError` before anything is built
    or run: a bool, a float or a string is no count, and ``10**12`` ran for ever (or asked for terabytes) without a
    word. ``most``: the passes any count runs at most (deletion's H x W pixels: more steps are cut to one a pixel, as
    documented), so ``steps=10**7`` on a 224 x 224 image runs its 50,176 passes. ``what``: what one is."""
    n = check_int(value, name, minimum=minimum, what=what)
    runs = n if most is None else min(n, most)
    said = f"{name}={n:,} is" if runs == n else f"{name}={n:,} ({runs:,} passes, one a pixel) is"
    check_passes(runs, said, f"give at most {MAX_PASSES:,} ({what})")
    return n


def check_masks(masks: Tensor, maps: Tensor) -> Tensor:
    """``masks`` as boolean ``(B, H, W)`` on the maps' device, one per map and of its size."""
    if not isinstance(masks, Tensor):
        raise SalienceError(f"expected masks as a boolean torch.Tensor (B, H, W), got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != maps.shape:
        raise SalienceError(
            f"masks of shape {tuple(masks.shape)} do not match maps of shape {tuple(maps.shape)}; give one "
            "(H, W) mask per map, at the map's size (resize the maps with F.interpolate or the masks with "
            "nearest-neighbour interpolation)"
        )
    if masks.dtype != torch.bool:
        if masks.is_floating_point() and not bool(((masks == 0) | (masks == 1)).all()):
            raise SalienceError("masks must be boolean (or 0/1 values); threshold them first, e.g. masks > 0.5")
        masks = masks != 0
    return masks.to(maps.device)


def resolve_method(method: MethodLike, options: Optional[dict] = None, *,
                   called: bool = True) -> tuple[str, Callable[..., Tensor]]:
    """A method given by name (a key of :data:`salience.methods.METHODS`, with its
    :data:`~salience.methods.QUICK` options) or as a function, as ``(name, function)``; ``options`` (a
    metric's ``method_kwargs``) checked against what the method takes. A function is refused (an
    :class:`~salience._core.errors.ArgumentError` naming it, before any maps) where a keyword its
    ``functools.partial`` binds is not one it takes or, with ``called``, where it cannot be called as
    ``fn(model, x, target, **options)`` (no target, a keyword-only argument without a default):
    ``called=False`` for a caller that binds more options first (:func:`salience.evidence.evaluate.bound_methods`)."""
    if isinstance(method, str):
        if method not in METHODS:
            raise SalienceError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        fn = METHODS[method]
        quick = QUICK.get(method)  # the many-pass methods' cheaper options for reports (methods.QUICK)
        name, fn = method, (functools.partial(fn, **quick) if quick else fn)
    elif callable(method):  # the registry's contract (a target-free function takes the target too)
        name, fn = getattr(method, "__name__", "method"), as_method(method)
        problem = bound_problem(fn)  # a keyword its partial binds that it does not take: a TypeError at the maps
        if problem is not None:
            raise ArgumentError(problem)
    else:
        raise SalienceError(f"expected a method as a name or a function, got {type(method).__name__}")
    if options is not None:
        check_taken(fn, options, name)
    if called and not isinstance(method, str):  # a function that takes no target: a TypeError at its first maps
        problem = shape_problem(fn, list(options or ()))
        if problem is not None:
            raise ArgumentError(problem)
    return name, fn



def smoothgrad_seed(fn: Callable[..., Tensor], kwargs: Optional[dict] = None) -> Optional[int]:
    """The int seed of ``fn`` (with ``kwargs``) if it is SmoothGrad (``salience.smoothgrad`` or a
    ``functools.partial`` of it), else ``None``; ``None`` too for a seed of ``None`` (fresh noise)."""
    from salience.methods.smoothgrad import smoothgrad

    keywords: dict = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    if fn is not smoothgrad:
        return None
    seed = {**keywords, **(kwargs or {})}.get("seed", 0)  # smoothgrad's default
    return None if seed is None or isinstance(seed, (list, tuple, Tensor)) else check_seed(seed)


def method_maps(fn: Callable[..., Tensor], model: nn.Module, x: Tensor, target: Tensor, *, batch_size: int,
                kwargs: Optional[dict] = None, keys: Optional[Sequence[bytes]] = None,
                label: Optional[Callable[[int], str]] = None) -> Tensor:
    """``fn``'s maps of ``x`` for the per-image classes ``target`` ``(B,)``, ``batch_size`` images
    per call (at most the model's :func:`~salience._core.info.max_batch`), as float ``(B, H, W)`` at ``x``'s size: a ``(B, 1, H, W)`` map is the ``(B, H, W)``
    map with its signs (as :func:`check_maps` reads it), a ``(B, C, H, W)`` map of several channels
    is reduced by the channels' largest magnitude, a smaller map (Grad-CAM without upsampling)
    resized bilinearly.

    SmoothGrad with an int seed ``S`` draws each row's noise from the stream of its image's content:
    row ``j`` gets ``keyed_seed(S, keys[j])`` (default: the key of row ``j`` itself,
    :func:`image_keys`), so a map depends neither on ``batch_size`` nor on the image's position, and
    a perturbed copy of an image (``keys`` repeating the image's key) shares that image's noise: the
    metric sees the input's change, not SmoothGrad's sampling noise.

    A map with NaN or infinite values is a :class:`SalienceError` naming its row as ``label(j)``
    says (default ``"image j"``; a caller whose rows are copies of the caller's images names the
    image and the copy, not the row of its own flattened batch)."""
    kw0 = dict(kwargs or {})
    seeds = smoothgrad_seeds(fn, kwargs, x, keys)
    batch_size = min(batch_size, max_batch(model) or batch_size)  # a program exported with a bounded batch
    out = []
    for i in range(0, x.shape[0], batch_size):
        kw = dict(kw0)
        if seeds is not None:
            kw["seed"] = seeds[i:i + batch_size]
        m = fn(model, x[i:i + batch_size], target[i:i + batch_size], **kw).detach()
        # a metric of a NaN map would be NaN (or the maps refused later with a riddle)
        check_method_map(m, lambda r, i=i: label(i + r) if label is not None else f"image {i + r}",
                         "a metric of it would be NaN: check the method on that input (e.g. a division by a zero "
                         "gradient)")
        if m.dim() == 4 and m.shape[1] == 1:
            m = m[:, 0]
        elif m.dim() == 4:
            m = m.abs().amax(1)
        if m.shape[-2:] != x.shape[-2:]:
            m = F.interpolate(m[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        out.append(m.float())
    return torch.cat(out)


def check_method_map(m: Tensor, row: Callable[[int], str], use: str) -> None:
    """A method's map ``(B, H, W)`` or ``(B, C, H, W)`` with every value finite, else a
    :class:`SalienceError`: its shape, or its first map with NaN or infinite values named as
    ``row(j)`` says (the caller knows what row ``j`` is: an image, a copy, a model), then ``use``
    (what a NaN map would make of the result, and what to check)."""
    if m.dim() not in (3, 4):
        raise SalienceError(f"the method returned a map of shape {tuple(m.shape)}; expected (B, H, W) or (B, C, H, W)")
    bad = ~torch.isfinite(m).flatten(1).all(1)
    if bool(bad.any()):
        raise SalienceError(f"the method returned a map with NaN or infinite values ({row(int(bad.nonzero()[0]))}); "
                            f"{use}")


def smoothgrad_seeds(fn: Callable[..., Tensor], kwargs: Optional[dict], x: Tensor,
                     keys: Optional[Sequence[bytes]] = None) -> Optional[list[int]]:
    """The per-image seeds SmoothGrad (``fn`` with ``kwargs``, an int seed ``S``) gets for the rows of
    ``x``: ``keyed_seed(S, key)`` of each row's content key (``keys``, default :func:`image_keys` of
    ``x``); ``None`` for any other method (or a seed of ``None``: fresh noise)."""
    seed = smoothgrad_seed(fn, kwargs)
    if seed is None:
        return None
    if keys is None:
        keys = image_keys(x)
    if len(keys) != x.shape[0]:
        raise SalienceError(f"expected one image key per row ({x.shape[0]}), got {len(keys)}")
    return [keyed_seed(seed, k) for k in keys]


def class_indices(model: nn.Module, x: Tensor, target: object) -> Tensor:
    """The class of each image ``(B,)``: predicted on ``x`` for ``None`` (or
    :func:`salience.targets.predicted`), else ``target`` (one class index, or one per image, or
    :func:`salience.targets.classes` of them) as int64 on ``x``'s device. Anything else (a bool,
    a string, a multilabel set, a function) is refused: these tests explain one class."""
    if isinstance(target, Predicted):
        target = None
    elif isinstance(target, Classes):
        target = target.index
    if target is None:
        return predicted_classes(model, x)
    refused = SalienceError(f"target must be None, a class index or one class index per image ({x.shape[0]}), "
                            f"got {target!r}")
    if isinstance(target, (Target, str, bytes, bool)) or callable(target):
        raise refused
    try:
        t = torch.as_tensor(target, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise refused from None
    if (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() > 1
            or (t.dim() == 1 and t.shape[0] != x.shape[0])):
        raise refused
    return t.expand(x.shape[0]).long() if t.dim() == 0 else t.long()
