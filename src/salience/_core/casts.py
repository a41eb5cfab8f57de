"""Under a CPU bf16 autocast, each weight cast to bf16 once per call, not once per pass (session 43).

Why: ``torch.autocast`` keeps its cast of a weight (its cache) only for a leaf that requires gradients, made outside
``torch.inference_mode``, until the outermost autocast block leaves. Salience's passes run with the parameters'
``requires_grad`` off (the guard), each in its own autocast block, so every pass (every chunk) cast every weight
again: resnet50, 55 copies (its 53 convolutions' weights, the classifier's weight and bias) per pass. Session 42's fix (``Run.casts_kept`` turning the parameters'
``requires_grad`` on, the passes under ``no_grad``) served the gradient-free methods only, and the flip was visible to
other threads running the same model.

:class:`WeightCasts` is a ``TorchFunctionMode`` (the mode stack is thread-local: nothing another thread sees) that,
for the operations CPU autocast runs in bf16 and that take a weight (convolutions and transposed convolutions,
``F.linear``, the matmul family, ``prelu``), hands the function a bf16 copy of each fp32 ``nn.Parameter`` argument
that does not require gradients, made once per call (detached, outside inference mode, so that gradient passes and
inference passes share it) and kept in the call's dict (:class:`CastCache`) by the parameter's identity; autocast's
own cast of a bf16 argument is then nothing. A copy is made again when the parameter's ``_version`` (a change in
place: a user's hook, ``load_state_dict``), data pointer, strides or shape changed (``p.data = ...``: a change of
layout). The values are the same as autocast's cast (one rounding of the same fp32 values), so the maps are the same
bits. ``F.multi_head_attention_forward`` (Python: a mode does not see the ``F.linear`` calls inside it) is handed the copies
of its projections' weights and biases, which it uses only as ``F.linear``'s arguments (no other use of them in
torch 2.14's source), so its projections are served too. A parameter that requires gradients, a tensor that is not a
parameter (a weight computed in the forward) or an inference tensor (no version counter) is left to autocast; so is
everything while autocast's cache is turned off (``torch.autocast(..., cache_enabled=False)``), and a call with an
``out=`` tensor (autocast leaves that overload in fp32: a bf16 weight made it fail). A change in place that bumps no
version counter (through ``p.data``: ``p.data.mul_(2)``) during a call is not seen (autocast's own cache does not see
it either): ``p.data`` is a new tensor at each access with a version counter of its own, a storage has none, so only
reading the values could see it, and the cheapest read (a sum of each weight, not even a sound checksum) cost 0.18 of
the casts it would guard, every pass (session 44, benchmarks/cast-check-s44.txt): not done.

:meth:`salience._core.perf.Run.casts_kept` makes the call's cache; :meth:`salience._core.perf.Run.autocast` enters the
mode (CPU bf16, eager chunks only: a compiled graph casts inside itself).

``torch.einsum`` (session 46) is not on autocast's list: it runs in C++ as views of its operands and ``bmm`` (which
autocast casts: a view of a weight, so autocast's cache never held it), or as ``mul`` and ``sum`` in the operands'
dtype when nothing is contracted or a label is summed out of one operand alone. A bf16 copy handed to the latter
would round the weight where autocast does not (other bits), so a weight is served only where einsum, run once for
that equation and those shapes and strides (:data:`_EINSUM_SEEN`), took nothing of it but views and autocast's cast
to bf16, and cast it (an einsum that only views it, ``"ij->ji"``, returns its fp32 values): seen by a dispatch mode (:class:`_WeightUse`) on the pass that first meets the signature, which runs as
before (autocast casting).
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CastCache", "WeightCasts", "CAST_FUNCTIONS", "drop_entry", "served", "making"]

_MAKING = threading.local()  # set in this thread while CastCache.get makes a copy (making())


def making() -> bool:
    """Whether this thread is making a :class:`CastCache` copy of a weight now: the engine's memory probe
    (:class:`~salience._core.engine.MemoryProbe`) leaves such a copy out of a pass's bytes per item. The copies are
    made in a call's first pass (the probe's) and held for the whole call, whatever its chunks' size: counted per item
    they made resnet50's bf16 passes at 224 px 7 items, not 8 (7.47 MB an item measured, 5.42 MB of them the pass's
    own), 74 passes and one of a single item where a plain loop runs 64 for RISE's 64 masks on 8 images."""
    return getattr(_MAKING, "on", False)

#: The functions (as torch hands them to a mode) whose fp32 parameter arguments are served bf16 copies: those of
#: torch's CPU autocast lower-precision list that take a weight or bias. ``torch.linalg.matmul`` is not on the list
#: but is ``matmul`` itself (autocast casts its operands as ``matmul``'s: the same copy); session 45: not served, its
#: weight was cast again every pass. ``F.multi_head_attention_forward``'s arguments reach the mode in one form whatever
#: the caller's spelling (torch passes its first 13 by position, the rest by keyword): see :data:`_ATTENTION_WEIGHTS`.
CAST_FUNCTIONS = frozenset({
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    torch.conv_tbc, torch._C._nn.linear, torch.matmul, torch.linalg.matmul, Tensor.matmul, Tensor.__matmul__,
    Tensor.__rmatmul__,
    torch.mm, Tensor.mm, torch.bmm, Tensor.bmm, torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm,
    torch.addbmm, Tensor.addbmm, torch.prelu, Tensor.prelu,
})
_ATTENTION = F.multi_head_attention_forward
# its arguments (by position and name) that it uses only as F.linear's weight and bias (in torch 2.14: directly, or
# chunked or split first): the in-projection, the separate q / k / v projections, the out-projection
_ATTENTION_WEIGHTS = frozenset({5, 6, 11, 12, "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                                "q_proj_weight", "k_proj_weight", "v_proj_weight"})


_EINSUM = torch.functional.einsum
#: einsum signature (equation, the copies' dtype, each operand's shape, strides, dtype and eligibility, opt_einsum's setting) -> the
#: positions of the eligible operands that einsum took only as views cast to bf16 (a process-wide memo; its size capped)
_EINSUM_SEEN: dict[tuple, frozenset] = {}
_EINSUM_LOCK = threading.Lock()
_EINSUM_CAP = 4096


class _WeightUse(TorchDispatchMode):
    """Records, for the storages watched, whether every operation that read them was a view or a cast to ``dtype``
    (views' results share the storage, so a chain of views is followed; the cast's result is a new storage)."""

    def __init__(self, storages: dict[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.storages, self.dtype, self.other, self.cast = storages, dtype, set(), set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        cast = func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype
        if not func.is_view:
            for a in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(a, Tensor) and a.untyped_storage().data_ptr() in self.storages:
                    (self.cast if cast else self.other).add(a.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _einsum_key(equation: str, operands: Sequence[Any], dtype: torch.dtype) -> tuple:
    from torch.backends import opt_einsum
    return (equation, dtype, opt_einsum.enabled, opt_einsum.strategy if len(operands) > 2 else None,
            tuple((tuple(o.shape), o.stride(), o.dtype, _eligible(o)) if isinstance(o, Tensor) else type(o)
                  for o in operands))


class CastCache:
    """One call's bf16 copies of the parameters: ``id(p)`` -> ``(ref, key, copy, source)``. ``ref``: a weak reference
    to ``p``, whose death drops the entry (so that its id, then free, finds nothing; a parameter a user's hook renews
    every pass, ``mod.weight = nn.Parameter(...)``, left every earlier one and its copy alive for the call while the
    entries held them). ``source``: ``p``'s values the copy was made of, so that their storage's address is not reused
    while the entry lives (a tensor swapped in for a pass, ``p.data = w * mask``, then the original put back, freed the
    swapped one's storage, and the next pass's swapped tensor, made at that address, was served the stale copy).
    ``made`` counts the copies made (for tests and reports). ``channels_last``: 4-D copies are made channels-last (the
    run's channels-last chunks, whose model parameters served here stay contiguous: ``Run.set_layout``)."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.copies: dict[int, tuple[weakref.ref, tuple, Tensor, Tensor]] = {}
        self.made = 0
        self.channels_last = False

    def clear(self) -> None:
        self.copies.clear()

    def get(self, p: Tensor) -> Tensor:
        """The low-precision copy of ``p`` for its current values (made now when ``p`` changed since)."""
        key = (p._version, p.data_ptr(), p.stride(), p.shape)
        hit = self.copies.get(id(p))
        if hit is not None and hit[0]() is p and hit[1] == key:
            return hit[2]
        with torch.inference_mode(False), torch.no_grad():
            source = p.detach()
            # the strides a cast of the weight set_layout made channels-last had (a 1x1 kernel's already was: as it
            # is; its channels-last strides instead changed oneDNN's rounding of occlusion's bf16 maps, session 46)
            cl = self.channels_last and p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if cl else torch.preserve_format
            _MAKING.on = True
            try:
                copy = source.to(self.dtype, memory_format=fmt)
            finally:
                _MAKING.on = False
        self.copies[id(p)] = (weakref.ref(p, functools.partial(drop_entry, self.copies, id(p))), key, copy, source)
        self.made += 1
        return copy


def drop_entry(entries: dict, key: Any, ref: weakref.ref) -> None:
    """The callback of the weak reference ``ref`` kept first in ``entries[key]`` (a parameter's here, a model's in
    :class:`~salience._core.perf.ModelCache`): at its object's death the entry is dropped, unless another took its
    place. No lock: a collection may run it while the cache's own lock is held."""
    hit = entries.get(key)
    if hit is not None and hit[0] is ref:
        entries.pop(key, None)


def served(p: Any) -> bool:
    """Whether :class:`WeightCasts` hands a cached copy for ``p`` (where a function it serves takes ``p``)."""
    return _eligible(p)


def _eligible(a: Any) -> bool:
    """A parameter CPU autocast would cast to bf16 afresh: a plain ``nn.Parameter`` (a subclass's own
    ``__torch_function__``, which runs after the mode, would get the bf16 copy where autocast hands it the fp32 values:
    a weight standardized in it came out otherwise), fp32, dense, on the CPU, not requiring gradients (one that
    does is autocast's to cache), not an inference tensor (no version counter to see a change by)."""
    return (type(a) is nn.Parameter and a.dtype == torch.float32 and a.layout == torch.strided
            and a.device.type == "cpu" and not a.requires_grad and not a.is_inference())


class WeightCasts(TorchFunctionMode):
    """The mode: the fp32 parameter arguments of :data:`CAST_FUNCTIONS` replaced by the call's copies (``cache``)."""

    def __init__(self, cache: CastCache) -> None:
        super().__init__()
        self.cache = cache

    def _casting(self) -> bool:
        """Whether autocast runs the call in the cache's dtype with its cache on (``precision="bf16-mixed"`` turns
        autocast off for its fp32 operations: :class:`salience._core.islands.HighResolutionFp32`)."""
        return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == self.cache.dtype
                and torch.is_autocast_cache_enabled())

    def _swap(self, a: Any) -> Any:
        return self.cache.get(a) if _eligible(a) else a

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("out") is not None:  # an out= overload: not on autocast's list, run in the arguments' dtypes
            pass
        elif func in CAST_FUNCTIONS and self._casting():
            args = tuple(self._swap(a) for a in args)
            kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        elif func is _EINSUM and self._casting() and args and isinstance(args[0], str):
            return self._einsum(func, args)
        elif func is _ATTENTION and self._casting():  # its projections' weights, which it hands to F.linear only
            args = tuple(self._swap(a) if i in _ATTENTION_WEIGHTS else a for i, a in enumerate(args))
            kwargs = {k: self._swap(v) if k in _ATTENTION_WEIGHTS else v for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _einsum(self, func: Any, args: Sequence[Any]) -> Any:
        """``torch.einsum(equation, *operands)`` (or its operands in one list) with the copies of the eligible
        operands that einsum only views and casts (known from the first run of the signature, which this one is
        when unknown)."""
        equation, operands = args[0], tuple(args[1:])
        listed = len(operands) == 1 and isinstance(operands[0], (list, tuple))
        if listed:
            operands = tuple(operands[0])
        eligible = [i for i, o in enumerate(operands) if _eligible(o)]
        if not eligible:
            return func(*args)
        key = _einsum_key(equation, operands, self.cache.dtype)
        served = _EINSUM_SEEN.get(key)
        if served is None:  # first met: run it as autocast does, watching what einsum does with each weight
            storages = {operands[i].untyped_storage().data_ptr(): i for i in eligible}
            with _WeightUse(storages, self.cache.dtype) as use:
                out = func(*args)
            # only views and a cast, and a cast seen: an einsum that only views a weight (``"ij->ji"``, ``"i->i"``)
            # returns a view of its fp32 values, which a bf16 copy would have rounded (session 46's review)
            served = frozenset(i for p, i in storages.items() if p in use.cast and p not in use.other)
            with _EINSUM_LOCK:
                if len(_EINSUM_SEEN) >= _EINSUM_CAP:
                    _EINSUM_SEEN.clear()
                _EINSUM_SEEN[key] = served
            return out
        if not served:
            return func(*args)
        swapped = [self.cache.get(o) if i in served else o for i, o in enumerate(operands)]
        return func(equation, swapped) if listed else func(equation, *swapped)
