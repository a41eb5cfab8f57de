"""``precision="bf16-mixed"``: bf16 autocast, except the operations on the image's first, high-resolution feature
maps, which run in fp32.

Why (``benchmarks/bf16_islands.py``, docs/performance.md, "precision", "On a CPU"): the bf16 error of an input
gradient is the forward's rounding flipping activation gates (a ReLU6's ``0 < z < 6``), not the bf16 arithmetic of
the backward. On the pretrained EfficientNet-Lite0, a bf16 pass with the fp32 pass's gates gives a vanilla map of
correlation 0.9999 with fp32's; an fp32 pass with the bf16 pass's gates 0.68-0.82, as plain bf16. And the flips
that matter are those at high resolution: the stem and the first blocks in fp32 bring the correlation to 0.97, the
head and the last blocks in fp32 change nothing.

The rule: a function of ``torch`` / ``torch.nn.functional`` (what modules call: ``F.conv2d``, ``F.batch_norm``,
``F.relu``, ``torch.cat``; not a tensor's own methods and properties, which run as they are) one of whose tensor
arguments, positional or keyword (or a tensor in a list or tuple argument, ``torch.cat``'s) is a 4-D
``(N, C, h, w)`` map with ``h >= H / RATIO`` and ``w >= W / RATIO`` (``H x W``: the input image's size; with
:data:`RATIO` 4, the maps at the input's full, half and quarter resolution; each side, not the area: a channels-last
``(N, h, w, C)`` tensor, torchvision's ConvNeXt's MLPs, has ``w x C`` as its last two sides) runs with autocast off
and its bf16 arguments (keyword ones too: ``attn_mask=``, ``weight=``) cast to float32, so it and its backward
compute in fp32. The other operations run under the bf16 autocast as ``precision="bf16"`` runs them, and so does a
function a tensor method spells too (``torch.exp`` as ``a.exp()``, :func:`_method_twin`, session 44; or a method of
another name, ``F.relu6(x)`` as ``x.clamp(0, 6)``, ``torch.zeros_like(x)`` as ``x.new_zeros(x.shape)``,
:data:`SPELLS_A_METHOD`, session 45; but ``prelu``, a
gate autocast casts down, is under the rule in every spelling, the method too: :data:`GATES`). A model whose
input is not an image ``(N, C, H, W)`` runs as under ``"bf16"``. Products of activations are no map operations
(:data:`PRODUCTS`, session 42): attention (``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``),
``torch.matmul`` of two batched operands (both 3-D or more; by a 1-D or 2-D weight it is a linear layer on the map and
stays under the rule, :data:`MATMULS`), an einsum of batched operands (:data:`EINSUMS`) and the softmax and log-softmax in
every function spelling run under the bf16 autocast as ``"bf16"`` runs them, as the tensor methods ``q @ k``,
``a.softmax(-1)`` and ``a.log_softmax(-1)`` always did (one math written two ways runs at one precision, session 43;
``torch.tensordot`` as the einsum it spells, session 44): a vision transformer's attention tensors ``(batch, heads, tokens, dim)`` are 4-D
with sides past a quarter of the input's, and in fp32 they cost timm's ``vit_small_patch8_224`` (785 tokens) a vanilla
pass 0.60 of fp32's time against bf16's 0.50, for maps that bf16 already gives at correlation 0.99996 with fp32's
(benchmarks/vit-bf16-mixed-s42.md). In-place functions (``relu(..., inplace=True)``,
an ``out=`` tensor; not ``out=None``) are not cast (a cast copy would take the change), only run with autocast off.

It is a ``TorchFunctionMode`` entered around each eager pass (:meth:`salience._core.perf.Run.autocast`), so the
model is not touched (no hook, no attribute). ``torch.compile`` does not trace it correctly (inductor's graph
expected bf16 where the mode gave fp32, torch 2.14), so the option refuses ``compile``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["RATIO", "PRODUCTS", "MATMULS", "EINSUMS", "GATES", "SPELLS_A_METHOD", "HighResolutionFp32"]

RATIO = 4
"""Maps at ``1 / RATIO`` of the input's height and width or larger run in fp32 (measured: 2 left EfficientNet-Lite0's
vanilla maps at correlation 0.92-0.96 with fp32's on three photos, 4 gave 0.968-0.975, 8 0.984-0.988; resnet50's
forward + input gradient, channels-last, took 0.48, 0.64 and 0.82 of fp32's time, plain bf16 0.42: medians,
benchmarks/bf16-islands-s41.md)."""


PRODUCTS = frozenset({F.scaled_dot_product_attention, F.multi_head_attention_forward,
                      F.softmax, torch.softmax, torch.special.softmax, F.softmin,
                      F.log_softmax, torch.log_softmax, torch.special.log_softmax})
"""Functions the rule leaves to the bf16 autocast whatever their arguments' sizes: attention and its parts, the
functions that ``a.softmax(-1)`` and ``a.log_softmax(-1)`` (tensor methods, which run as they are) spell otherwise:
every function spelling of a softmax (``F.softmin(a)`` is ``(-a).softmax()``), so one math written two ways runs at
one precision (session 43: ``F.log_softmax`` ran in fp32 on a bf16 map, ``x.log_softmax()`` in bf16). The products
of two operands are decided by the operands' ranks, not by the function alone: :data:`MATMULS` (``torch.matmul``
among them, listed here too until session 44, though only its ranks decided), :data:`EINSUMS`."""

MATMULS = frozenset({torch.matmul, torch.linalg.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                     torch.Tensor.__rmatmul__, torch.tensordot})
"""Every spelling of a product of two operands (the functions ``torch.matmul`` and ``torch.linalg.matmul``, another
function object, which ran in fp32 on a large map until a review of session 43, the tensor methods ``@``,
``x.matmul``, and ``torch.tensordot``, which ran in fp32 where the einsum it spells ran in bf16 until session 44): one
rule for all of them, the operands' ranks (:func:`_product`): of two batched operands, both 3-D or more (``q @ k``),
it runs under the bf16 autocast; by a 1-D or 2-D weight it is a linear layer (``torch.matmul(h, w)`` on a
channels-last ``(N, h, w, C)`` map, a 1x1 convolution), under the rule (session 42 review). ``torch.bmm`` /
``torch.baddbmm`` take 3-D operands only, which the rule never reads as maps: bf16 in every spelling already."""

EINSUMS = frozenset({torch.einsum, torch.functional.einsum})
"""``torch.einsum``: a product of two or more operands all 3-D or more (attention, ``einsum("bhqd,bhkd->bhqk", q,
k)``, the ``q @ k.transpose(-2, -1)`` it spells) runs under the bf16 autocast as ``q @ k`` does; with an operand of 1
or 2 dimensions (a weight: ``einsum("bchw,dc->bdhw", x, w)``, a 1x1 convolution on a map) or one operand (a
permutation, a sum of a map) it stays under the rule (session 43: every einsum ran in fp32 on a large map)."""

GATES = frozenset({"prelu"})
"""The functions with a tensor-method twin that autocast casts to bf16 and that gate a CNN's activations on its
maps (``F.prelu``, ``torch.prelu``, ``x.prelu(w)``, ``nn.PReLU``): under the rule in every spelling, the tensor
method too (session 44: ``x.prelu(w)`` ran in bf16 on a full-resolution map where ``F.prelu`` ran in fp32)."""

_F_TWINS = frozenset({F.relu, F.sigmoid, F.tanh, F.hardshrink})  # F's functions spelling the tensor method of their
# name (F.unfold does not: Tensor.unfold is another operation; F.softmax, F.log_softmax: PRODUCTS; F.prelu: GATES)

SPELLS_A_METHOD = frozenset({
    # a clamp's kernel under another name: x.clamp(lo, hi), x.clamp(0, 6), x.where(x > t, v) (nn.Hardtanh, nn.ReLU6,
    # nn.Threshold call them)
    F.hardtanh, F.relu6, F.threshold,
    # torch.special's names of a tensor method's function: expit is x.sigmoid(), psi x.digamma(), gammaln x.lgamma(),
    # special.expm1 x.expm1() (and the others of one name)
    torch.special.expit, torch.special.psi, torch.special.gammaln, torch.special.multigammaln,  # x.mvlgamma(p)
    *(f for n, f in vars(torch.special).items() if callable(f) and not n.startswith("_") and hasattr(torch.Tensor, n)
      and callable(getattr(torch, n, None))),
    # factories whose result takes an argument's dtype: torch.zeros_like(x) is x.new_zeros(x.shape)
    *(getattr(torch, n) for n in dir(torch) if n.endswith("_like") and callable(getattr(torch, n)))})
"""Functions whose result a tensor method of another name gives too (session 45): ``F.hardtanh(x, 0, 6)``,
``F.relu6(x)`` and ``x.clamp(0, 6)``; ``F.threshold(x, 0, 0)`` and ``x.relu()``; ``torch.special.expit(x)`` and
``x.sigmoid()``; ``torch.special.multigammaln(x, p)`` and ``x.mvlgamma(p)`` (session 45's review);
``torch.zeros_like(x)`` and ``x.new_zeros(x.shape)``. Autocast leaves all of them in their inputs'
dtype, so on the float32 maps that the rule's convolutions give they were float32 in every spelling already; on a bf16
map the rule's cast made the function's result float32 where the method's stayed bf16, and the two spellings' maps
split (the rounding of what follows: ``relu6(u) * u`` in float32, ``u.clamp(0, 6) * u`` in bf16). They run as the
methods do, as :func:`_method_twin`'s functions of one name."""


def _method_twin(func: Any) -> bool:
    """A function that a tensor method spells too (``torch.exp`` and ``a.exp()``, ``torch.logsumexp`` and
    ``a.logsumexp()``, ``torch.add`` and ``a + b``, ``F.relu`` and ``a.relu()``): it runs as the method does, as it
    is under the bf16 autocast (session 44: ``torch.exp`` of a bf16 map ran in fp32, ``a.exp()`` in bf16). Autocast
    leaves these in their inputs' dtype, so on the float32 maps that the rule's convolutions give they compute in
    float32 in every spelling; on a bf16 map (attention's scores, a small map upsampled) in bf16 in every spelling.
    A method of another name too: :data:`SPELLS_A_METHOD` (``F.relu6`` and ``x.clamp(0, 6)``). Not the products (:data:`MATMULS`: by their ranks) nor :data:`GATES` (under the rule in every spelling)."""
    if func in _F_TWINS or func in SPELLS_A_METHOD:
        return True
    name = getattr(func, "__name__", "")
    return (name not in GATES and func not in MATMULS and getattr(torch, name, None) is func
            and hasattr(torch.Tensor, name))


def _tensor_method(func: Any) -> bool:
    """A method or property of a tensor (``x.dtype``, ``x.add_``, ``x[...] = v``, ``x.register_hook``, ``x + y``):
    run as it is; a cast copy would answer for another tensor (its dtype, its hooks, its changes). Not a product
    (:data:`MATMULS`) nor a gate (:data:`GATES`: ``x.prelu(w)``), which every spelling decides alike."""
    if func in MATMULS or getattr(func, "__name__", "") in GATES:
        return False
    return (getattr(func, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase)
            or getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase."))
            or getattr(func, "__name__", "") in ("__get__", "__set__"))


def _batched(ops: Sequence[Any]) -> bool:
    """Two or more operands, every one a tensor of 3 dimensions or more: a product of activations, not of a weight."""
    return len(ops) >= 2 and all(isinstance(a, torch.Tensor) and a.dim() >= 3 for a in ops)


def _product(func: Any, args: Sequence[Any], kwargs: dict) -> bool:
    """Left to the bf16 autocast whatever the sizes: a function of :data:`PRODUCTS`, but a matrix product (and an
    einsum) only of batched operands (a weight of 1 or 2 dimensions makes it a linear layer on a map, under the
    rule)."""
    if func in MATMULS:  # matmul(input, other), tensordot(a, b, dims)
        ops = [*args[:2], *(kwargs[k] for k in ("input", "other", "a", "b") if k in kwargs)]
        return len(ops) == 2 and _batched(ops)
    if func in EINSUMS:  # einsum(equation, *operands), or einsum(equation, [operands])
        ops = args[1:]
        return _batched(ops[0] if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops)
    return func in PRODUCTS


def _is_inplace(func: Any, kwargs: dict) -> bool:
    """Whether the call writes into a tensor it is given: ``inplace=True``, an ``out=`` tensor (not ``out=None``,
    which ``F.normalize`` and ``torch.norm`` pass on to the mode always), a name ending in ``_``."""
    name = getattr(func, "__name__", "")
    return bool(kwargs.get("inplace")) or kwargs.get("out") is not None or name.startswith("__i") or (
        name.endswith("_") and not name.endswith("__"))


class HighResolutionFp32(TorchFunctionMode):
    """The mode of ``precision="bf16-mixed"`` for one pass on images of ``size`` ``(H, W)`` on ``device_type``."""

    def __init__(self, device_type: str, size: Sequence[int], ratio: int = RATIO) -> None:
        super().__init__()
        self.device_type = device_type
        # each side: a channels-last (N, h, w, C) tensor (torchvision's ConvNeXt blocks, Keras layers) has its
        # channels last, and h * w read as w * C took ConvNeXt-T's MLPs down to 7 x 7 x 768 for a large map
        self.min_h, self.min_w = size[-2] / ratio, size[-1] / ratio

    def _large(self, args: Sequence[Any]) -> bool:
        for a in args:
            if isinstance(a, (list, tuple)):
                if self._large([t for t in a if isinstance(t, torch.Tensor)]):
                    return True
            elif (isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[-2] >= self.min_h
                  and a.shape[-1] >= self.min_w):
                return True
        return False

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if (_product(func, args, kwargs) or _tensor_method(func) or _method_twin(func)
                or not self._large((*args, *kwargs.values()))):
            return func(*args, **kwargs)
        if not _is_inplace(func, kwargs):  # keyword arguments too: F.scaled_dot_product_attention's attn_mask=
            args = tuple(_fp32(a) for a in args)
            kwargs = {k: _fp32(v) for k, v in kwargs.items()}
        with torch.autocast(self.device_type, enabled=False):
            return func(*args, **kwargs)


def _fp32(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a.float() if a.dtype in (torch.bfloat16, torch.float16) else a
    if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
        cast = [_fp32(t) for t in a]
        return cast if isinstance(a, list) else tuple(cast)
    return a
