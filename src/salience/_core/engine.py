"""The engine shared by methods that need many passes (SmoothGrad, Integrated Gradients, perturbations).

Such a method evaluates a per-item function (a saliency map of one noisy copy, the gradient at
one point of a path) on ``total`` *items* that belong to the ``B`` images of a batch, and sums
the results per image with weights. Items are numbered rep-major, ``j = r * B + b``: item ``j``
belongs to image ``j % B``. :func:`accumulate`

- runs the items in chunks, all images together, and keeps only running sums ``(B, ...)``
  (weighted sum, and the sum of squares when asked), so peak memory depends on the chunk, never
  on the number of samples or steps;
- picks the chunk size itself: a pass of one item per image is run under :class:`MemoryProbe`, which
  records the peak bytes of the tensors the pass creates (forward, saved activations, backward; on
  any device), and the chunk is the memory budget divided by the bytes per item. Under a
  :class:`~salience._core.perf.Run` with ``chunks="memory"`` (the default) that pass is one of its own,
  its result thrown away (:func:`discarded` is true inside it), in the first call for a model, method,
  item shape, options and number of images only (the measure is cached: :meth:`~salience._core.perf.Run.known_probe`);
  then every call, cold or warm, runs the same chunks from item 0, so a seeded call gives the same
  bits every time, and no call runs a small first chunk (session 45: SmoothGrad 16 of one image ran
  1 + 15 items before, 16 now). On a CPU a gradient pass takes at most :data:`CPU_GRADIENT_CHUNK`
  items (:data:`CPU_GRADIENT_CHUNK_WEIGHTY` where the model's parameters outweigh :data:`CPU_WEIGHTY_ITEMS` items by
  the probe, up to :data:`CPU_GRADIENT_CHUNK_SMALL` where the items are so small in bytes that a pass of that many
  stays under :data:`CPU_SMALL_PASS_BYTES`: :func:`gradient_chunk_cap`), where the C library is glibc at most as
  many as keep its largest single block under glibc's 32 MiB mmap threshold (:func:`mmap_chunk_cap`, the probe's
  :attr:`MemoryProbe.largest`; session 48), and the items are split evenly (:func:`planned_chunk`); on CUDA, and for gradient-free passes,
  the budget's size. Without a run, or with ``chunks="throughput"``, the probe's pass is the call's
  first chunk (real work). ``chunk=`` fixes the size, ``max_memory=`` sets the budget (default:
  :func:`default_budget`);
- shows a progress bar when asked;
- runs ``compute`` under ``torch.inference_mode()`` with ``inference=True``, for the gradient-free
  passes of the perturbation methods (Score-CAM, Ablation-CAM, occlusion, RISE);
- runs the whole call inside :meth:`salience._core.perf.Run.casts_kept`, so that under a CPU bf16 ``precision``
  each weight is cast once per call, not once per pass (gradient passes too).

:func:`input_gradients` and :func:`layer_gradients` are what methods ask of the engine: the
gradients of K targets over given items, from one forward pass and one backward pass per target
(:func:`salience._core.autograd.backward`). Nothing else happens inside a target's call, and no
result depends on the order of hooks or chunks.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from salience._core import derived as _derived
from salience._core import perf as _perf
from salience._core.autograd import TargetLike, backward, each_pass_from
from salience._core.casts import making as _making_cast
from salience._core.errors import SalienceError
from salience._core.guard import Found, parameters_of
from salience._core.info import max_batch
from salience._core.malloc import HEAP_BLOCK_MAX as _HEAP_BLOCK_MAX
from salience._core.malloc import _not_glibc as _malloc_not_glibc
from salience._core.progress import progress as _progress

__all__ = [
    "MemoryProbe",
    "Sums",
    "accumulate",
    "default_budget",
    "input_gradients",
    "layer_gradients",
    "accepts",
    "acc_dtype",
    "check_memory_options",
    "MAX_PASSES",
    "check_passes",
    "passes_within",
    "outer_passes",
    "outer_counts",
    "calls_said",
    "TargetsCounted",
    "check_copies",
    "signature_of",
    "unbind",
    "discarded",
    "planned_chunk",
    "CPU_GRADIENT_CHUNK",
    "CPU_GRADIENT_CHUNK_WEIGHTY",
    "CPU_WEIGHTY_ITEMS",
    "CPU_SMALL_PASS_BYTES",
    "CPU_GRADIENT_CHUNK_SMALL",
    "gradient_chunk_cap",
    "mmap_chunk_cap",
    "weight_bytes",
    "generators_kept",
]

_GiB = 1 << 30

MAX_PASSES = 1_000_000
"""The most passes of each image one call of a many-pass method runs: SmoothGrad's ``samples``, RISE's ``masks``,
occlusion's windows, ``class_model``'s ``steps`` (integrated gradients' ``steps``: ``MAX_STEPS``, the same). At 1 ms a
pass a million take 17 minutes an image; ``samples=10**12`` ran for ever without a word (and occlusion built its
windows first)."""


def check_passes(n: int, said: str, advice: str, targets: tuple[str, int] = ("", 1)) -> None:
    """A :class:`SalienceError` where ``n`` passes of each image are more than :data:`MAX_PASSES`, before anything is
    built. ``said``: the count as the user gave it, ending with its verb (``"samples=10 is"``); ``advice``: what
    to give instead. ``targets``: ``(head, K)`` where the count is of K targets (a call each): the message is
    ``head``, K's words (:func:`calls_said`), then ``said``, and the refusal a :class:`TargetsCounted` that can name
    the flag that asked for the K (session 43)."""
    if n > MAX_PASSES:
        tail = (f"{said} more than the {MAX_PASSES:,} passes of each image a call runs here (each is a pass of the "
                f"model: at 1 ms a pass a million take 17 minutes an image, and {n:,} would take "
                f"{_duration(n * 1e-3)}); {advice}")
        head, k = targets
        raise TargetsCounted(head, k, tail) if k > 1 else SalienceError(head + tail)


class TargetsCounted(SalienceError):
    """A refusal whose count includes K targets (``targets``, a call each): its message is ``head``, the K said by
    :func:`calls_said`, then ``tail``. :meth:`naming` says it again with the flag that asked for the K after them
    (``" for each of 3 targets of --top 3 (a call each)"``), so a command line names its flag from what the refusal
    counts, not by finding the words in its text (session 43; ``salience.cli.options.check_values``)."""

    def __init__(self, head: str, targets: int, tail: str) -> None:
        self.head, self.targets, self.tail = head, targets, tail
        super().__init__(self.naming())

    def __reduce__(self) -> tuple:
        # the instance's dict too, as an exception's own pickling keeps it (its notes: until a review of session 43
        # a TargetsCounted came back without the notes a SalienceError keeps)
        return type(self), (self.head, self.targets, self.tail), self.__dict__

    def naming(self, flag: str = "") -> str:
        """The message, the K targets said as asked for by ``flag`` (``"--top 3"``; none: the message as raised)."""
        return f"{self.head}{calls_said(self.targets, flag)}{self.tail}"


# (noisy copies, calls of the method on each copy) of the blocks around, each the product of theirs
_OUTER_PASSES: ContextVar[tuple[int, int]] = ContextVar("salience_outer_passes", default=(1, 1))


@contextlib.contextmanager
def passes_within(n: int, calls: int = 1) -> Iterator[None]:
    """Inside the block, every call of a method runs ``n`` times for each image (SmoothGrad's noisy copies: its
    ``samples``), ``calls`` times on each (SmoothGrad's K targets, for a method that takes one target a call), on top
    of the blocks around it: :func:`outer_passes` is the product of them all. A method whose count is
    known only after a pass (Score-CAM's, Ablation-CAM's channels), or called by a function whose signature hides its
    count (RISE, occlusion, integrated gradients: :func:`check_copies`), checks ``outer_passes() * count`` with
    :func:`check_passes` before its many passes. A :class:`~contextvars.ContextVar`: each thread's own, and reset
    when the block ends, by an exception (a ``KeyboardInterrupt``) too."""
    copies, each = _OUTER_PASSES.get()
    token = _OUTER_PASSES.set((copies * int(n), each * int(calls)))
    try:
        yield
    finally:
        _OUTER_PASSES.reset(token)


def outer_passes() -> int:
    """How many times each image's call runs from the calls around it (:func:`passes_within`; 1 outside any)."""
    copies, calls = _OUTER_PASSES.get()
    return copies * calls


def outer_counts() -> tuple[int, int]:
    """:func:`outer_passes`' two factors, ``(noisy copies, calls on each copy)``, for a message that says them apart
    (the calls are K targets of a method that takes one a call: not noisy copies); ``(1, 1)`` outside any."""
    return _OUTER_PASSES.get()


def _outer_copies_said() -> str:
    """The noisy copies of :func:`outer_passes`, said after a count (``" in each of 50 noisy copies (SmoothGrad's
    samples)"``), before its calls (:func:`calls_said`); empty outside any :func:`passes_within`."""
    copies = outer_counts()[0]
    return f" in each of {copies:,} noisy copies (SmoothGrad's samples)" if copies > 1 else ""


def calls_said(calls: int, flag: str = "") -> str:
    """``" for each of 3 targets (a call each)"``: SmoothGrad's ``calls`` of a method that takes one target a call,
    said after a count (empty for one call); the refusals of :func:`check_copies` and SmoothGrad's own say it alike.
    ``flag``: what asked for the targets, said after them (``" for each of 3 targets of --top 3 (a call each)"``)."""
    return f" for each of {calls:,} targets{f' of {flag}' if flag else ''} (a call each)" if calls > 1 else ""


def check_copies(n: int, what: str, advice: str, *, alone: bool = False) -> None:
    """:func:`check_passes` of a method's ``n`` passes of each image times :func:`outer_passes`, as its call runs,
    before its passes: a function that calls RISE, occlusion or integrated gradients inside SmoothGrad hides the count
    from SmoothGrad's check of the signature. Outside any SmoothGrad nothing, the method checks ``n`` itself, unless
    ``alone``: a count known only now, after a pass (Score-CAM's and Ablation-CAM's channels, the layer's output),
    which nothing checked before. ``what``: the count as the method says it (``"RISE's 4,000 masks"``)."""
    outer = outer_passes()
    if outer > 1 or alone:
        check_passes(outer * n, f" are {outer * n:,} passes of each image,", advice,
                     (f"{what}{_outer_copies_said()}", outer_counts()[1]))


def _duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number at least 1 (up to years)."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.0f} {unit}"
    return f"{seconds:.0f} seconds"


# --------------------------------------------------------------------------- memory


class MemoryProbe(TorchDispatchMode):
    """Peak bytes of the tensors created while the mode is active (device-agnostic).

    Every operator's output storages are tracked with weak references until they are freed;
    ``peak`` is the largest total alive at any operator. Storages that existed before (the
    model's parameters, the caller's tensors) and views of them are not counted. Backward
    operators are seen too (autograd runs them under the same dispatch modes).

    ``largest``: the bytes of the largest single storage created under the mode that holds the items: a tensor whose
    first dimension is ``items`` (the pass's items: its activations and their gradients, not a weight's cast), or one
    an operator made from such a storage (a sequence-first attention's ``(N, B, D)``, a model that flattens items x
    tokens: they lead with other sizes; session 48's review: they were not seen); ``None`` where none was (or ``items``
    was not given): what one ``malloc`` of the pass asks for at most, for :func:`mmap_chunk_cap`.
    """

    def __init__(self, items: Optional[int] = None) -> None:
        super().__init__()
        self.items = items
        self.largest: Optional[int] = None
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[Any, int]] = {}
        # storages that existed before, by address, each with a weak reference: an address freed and then
        # reused by a storage made under the mode is that new storage's, counted (a plain set of addresses
        # left it uncounted, the peak as low as the allocator's reuse made it)
        self._external: dict[int, Any] = {}
        self._items_held: set[int] = set()  # the live storages that hold the items (``largest``), by address
        self.current = 0
        self.peak = 0

    def _is_external(self, key: int) -> bool:
        """Whether ``key`` is the address of a storage that existed before and is still alive."""
        ref = self._external.get(key)
        if ref is None:
            return False
        if ref.expired():
            del self._external[key]
            return False
        return True

    def _prune(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]
            self._items_held.discard(k)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if _making_cast():  # a weight's bf16 copy kept for the whole call (casts.making): not the items' bytes
            return func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        from_items = False  # an input holds the items: so does what the operator makes
        for t in flat_in:
            if isinstance(t, Tensor):
                key = _storage_key(t)
                if key is not None and key not in self._live and not self._is_external(key):
                    self._external[key] = self._ref(t.untyped_storage())
                from_items = from_items or key in self._items_held
        out = func(*args, **(kwargs or {}))
        self._prune()
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                key = _storage_key(t)
                if key is None or key in self._live or self._is_external(key):
                    continue
                st = t.untyped_storage()
                n = st.nbytes()
                if n:
                    self._live[key] = (self._ref(st), n)
                    self.current += n
                    if self.items is not None and (from_items or (t.dim() and t.shape[0] == self.items)):
                        self._items_held.add(key)
                        if n > (self.largest or 0):
                            self.largest = n
        self.peak = max(self.peak, self.current)
        return out


def _storage_key(t: Tensor) -> Optional[int]:
    try:
        st = t.untyped_storage()
        ptr = st.data_ptr()
    except Exception:  # tensors without storage (meta, sparse, nested)
        return None
    return ptr if ptr else None


# Gradient-free passes on a CPU: the chunk's budget. Measured on resnet50 at 224 px (forward under
# inference_mode, 11 MB per image by the probe; benchmarks/chunk-curve-1thread.md, one thread):
# seconds per image at 1 / 4 / 8 / 16 / 32 / 64 images per pass 0.242 / 0.211 / 0.194 / 0.204 /
# 0.287 / 0.304: passes of a few hundred MB run out of the caches and get slower per image (the
# 1 GiB budget gave Score-CAM 75 images per pass there: 472 s for one image in the one round run
# before this fix, against 313 s for a plain loop in the next run). 128 MiB gives 11 images there;
# small inputs still batch widely.
CPU_INFERENCE_BUDGET = 128 << 20
# The same passes under a bf16 / fp16 autocast (precision=): the probe measures about half the bytes per item (6 MB
# per image for resnet50 at 224 px), so CPU_INFERENCE_BUDGET gave 16 images per pass, where one thread ran 5-7 %
# slower per image than at 8 (session 42, AMX-BF16, channels-last, benchmarks/perturbation-resnet50-8images-s42*.md)
# and held twice the activations. 64 MiB gives 8 there.
CPU_LOW_PRECISION_BUDGET = 64 << 20


def default_budget(device: torch.device, *, inference: bool = False, low_precision: bool = False) -> int:
    """The memory a chunk may use when ``max_memory`` is not given, in bytes.

    CUDA: half the free device memory, at most 4 GiB. Otherwise a quarter of the available
    host memory (``MemAvailable`` on Linux), at most 1 GiB; larger chunks do not run faster
    on a CPU, they only take memory from everything else. Gradient-free passes (``inference``)
    on a CPU: at most :data:`CPU_INFERENCE_BUDGET`, where they run fastest per item; under an autocast to bf16 /
    fp16 (``low_precision``): at most :data:`CPU_LOW_PRECISION_BUDGET`.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free // 2, 4 * _GiB))
    avail = _available_host_memory()
    budget = int(min(avail // 4, 1 * _GiB)) if avail else 512 << 20
    if not inference:
        return budget
    return min(budget, CPU_LOW_PRECISION_BUDGET if low_precision else CPU_INFERENCE_BUDGET)


def _available_host_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_options(chunk: Optional[int], max_memory: Union[None, int, float, str]) -> Optional[int]:
    """Validate ``chunk`` and ``max_memory``; returns the budget in bytes (``None``: default).

    ``max_memory``: bytes (int), or a string like ``"2GiB"``, ``"500MB"``, ``"1.5G"``.
    """
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise SalienceError(f"chunk must be a positive int (items per pass), got {chunk!r}")
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        budget = _parse_bytes(max_memory)
    elif isinstance(max_memory, (int, float)) and not isinstance(max_memory, bool):
        budget = int(max_memory)
    else:
        raise SalienceError(f"max_memory must be bytes (int) or a size like '2GiB', got {max_memory!r}")
    if budget <= 0:
        raise SalienceError(f"max_memory must be positive, got {max_memory!r}")
    return budget


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024 ** 2,
          "g": 1e9, "gb": 1e9, "gib": 1024 ** 3, "t": 1e12, "tb": 1e12, "tib": 1024 ** 4}


def _parse_bytes(text: str) -> int:
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    try:
        return int(float(num) * _UNITS[unit])
    except (ValueError, KeyError):
        raise SalienceError(f"cannot read max_memory {text!r}; write e.g. '2GiB', '500MB' or a number of bytes") from None


# --------------------------------------------------------------------------- accumulation


@dataclass
class Sums:
    """Running sums per image: ``total = sum_j w_j m_j``, ``squares = sum_j w_j m_j**2``.

    ``scores``: what ``compute`` returned beside the maps for each item ``(total, ...)`` (the
    targets' scores), when it returned any; ``chunks``: the size of every chunk that was run (the
    first is the probe's where the probe is real work: no run, or ``chunks="throughput"``; a probe of its own,
    thrown away, is not a chunk of the call); ``per_item_bytes``: what the probe measured (``None`` if ``chunk`` was
    given); ``layouts``: how each chunk ran (``"contiguous"``, ``"channels_last"``, ``+ " compiled"``)
    when a :class:`~salience._core.perf.Run` was given.
    """

    total: Tensor
    squares: Optional[Tensor]
    scores: Optional[Tensor]
    chunks: list[int]
    per_item_bytes: Optional[int]
    layouts: list[str] = field(default_factory=list)


def acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype running sums of ``t`` are kept in: float64 where the device has it, else float32."""
    if t.device.type in ("cpu", "cuda") and t.is_floating_point():
        return torch.float64
    return torch.float32


def chunk_size(per_item: int, budget: int, n_images: int) -> int:
    """Items per pass for ``per_item`` bytes each under a ``budget`` in bytes.

    80% of the budget goes to the chunk: the rest is headroom for what the probe cannot see
    (inputs built per chunk that the first chunk did not need, per-call buffers). Whole copies of
    the batch per pass when the budget allows: every pass then has the same shape (the caller's
    batch size, or a multiple), which is what the model's kernels are tuned to, and no pass mixes
    a partial copy.
    """
    chunk = max(1, int(0.8 * budget) // per_item)
    if chunk >= n_images:
        chunk -= chunk % n_images
    return chunk


def accumulate(
    compute: Callable[[int, int], Union[Tensor, tuple[Tensor, Tensor]]],
    total: int,
    n_images: int,
    *,
    weights: Optional[Sequence[float]] = None,
    squares: bool = False,
    chunk: Optional[int] = None,
    max_memory: Optional[int] = None,
    progress: bool = False,
    desc: str = "",
    device: Optional[torch.device] = None,
    inference: bool = False,
    run: Optional[_perf.Run] = None,
    found: Optional[Found] = None,
) -> Sums:
    """Run ``compute(start, stop) -> maps (stop - start, ...)`` over all items in chunks and sum.

    Items are computed once each, in increasing order (a chunk never goes back), so ``compute``
    may draw from a stream (SmoothGrad's seeded noise); the one exception is the memory probe's own pass
    (``chunks="memory"`` under a run, a process's first call: :func:`discarded` is true inside it), which
    computes items ``0..n_images-1`` once before the chunks compute them again from item 0: a stream must
    give its first block again (SmoothGrad's keeps its last draw), and what ``compute`` gathers on the side
    must skip that pass. ``compute`` may also return ``(maps, scores)``: the per-item ``scores`` ``(stop - start, ...)``
    are kept, in item order, in :attr:`Sums.scores` (they are small: the targets' scores).

    Item ``j`` belongs to image ``j % n_images`` and counts with weight ``weights[j // n_images]``
    (one weight per repetition; default 1). Sums are kept in float64 (float32 where the device
    has no float64), so the result does not depend on the chunking beyond rounding.
    ``max_memory``: budget in bytes for one chunk (default :func:`default_budget`).
    ``inference=True`` runs every ``compute`` under ``torch.inference_mode()``: for the
    gradient-free passes of perturbation methods (occlusion, RISE, Score-CAM, Ablation-CAM), so no
    autograd state is kept and the probe measures the forward pass alone.

    ``run`` (a :class:`salience._core.perf.Run` on the model ``compute`` uses): each chunk runs
    under the run's choices (memory format, compiled forward, autocast), and the chunk size is the
    plan's (:func:`planned_chunk`; ``chunks="throughput"``: measured seconds per item within the memory
    budget, see :mod:`salience._core.perf`);
    the model's layout is put back at the end. Without ``run``: chunks sized by memory only.

    The passes run in the call's :func:`salience._core.derived.run_scope`: what ``compute`` marks as derived
    from the method's checked ``x`` (:func:`~salience._core.derived.derived`) is not checked again in each pass,
    and the checks of each pass are deferred to one synchronization at the end (no host-device
    synchronization per chunk).

    ``found`` (the model's own state as the call found it, :class:`~salience._core.guard.Found`, recorded by the
    caller right after its guard is entered): put back before every chunk, the memory probe's pass included, so that
    each chunk's items are scored by the model the user called, not by the state the chunk before left (a forward
    that counts its calls, appends to a list, writes a buffer in place: session 50); the items of one chunk share
    one pass and see what that pass does. SmoothGrad, integrated gradients, occlusion, RISE and Score-CAM pass
    theirs (their copies, path points, windows, masks and channels are independent samples of one function);
    Ablation-CAM puts its back in its own passes (several a chunk, and its check's outside the engine). Without ``found``, the thrown-away memory probe still leaves the model's own state as it found it
    (a :class:`~salience._core.guard.Found` of its own around it, first call only).
    """
    if total < 1:
        raise SalienceError("nothing to compute (0 items)")
    kept = run.casts_kept() if run is not None else contextlib.nullcontext()
    before = found.before_pass if found is not None else None
    with _derived.run_scope(total), kept:
        return _accumulate(functools.partial(_run, compute, inference=inference, images=n_images, before=before),
                           total, n_images, weights, squares, chunk, max_memory, progress, desc, device, inference,
                           run, found is not None)


def _accumulate(compute: Callable[[int, int], Union[Tensor, tuple[Tensor, Tensor]]], total: int, n_images: int,
                weights: Optional[Sequence[float]], squares: bool, chunk: Optional[int], max_memory: Optional[int],
                progress: bool, desc: str, device: Optional[torch.device], inference: bool,
                run: Optional[_perf.Run], put_back: bool = False) -> Sums:
    """:func:`accumulate` in its scope (``put_back``: ``compute`` puts the model's found state back itself)."""
    sums = _Adder(n_images, weights, squares, total)
    limit = max_batch(run.model) if run is not None else None  # a program exported with a bounded batch
    if limit is not None:
        chunk = min(chunk, limit) if chunk is not None else None
    with _progress(total, desc, enabled=progress) as bar:
        start = 0
        per_item: Optional[int] = None
        reused = run.reused_probe(n_images) if (run is not None and chunk is None) else None
        # chunks="memory" under a run: the memory probe is a pass of its own, its result thrown away, in the
        # first call only (cached); every call then runs the same plan from item 0 (the same bits, cold and warm)
        apart = run is not None and run.options.chunks == "memory"
        if chunk is None:
            if reused is not None:  # compile: an earlier call's probe; every chunk the fixed size
                per_item = reused
            else:
                # one item per image, within a bounded batch (a program exported with Dim("batch", max=N) refused the
                # probe's pass of more images than N: found in the review of session 45, older than its chunk plan)
                first = min(total, n_images, limit if limit is not None else total)
                # an earlier call's probe of the same model, items and images: no probe (the same chunks, the same bits)
                known = run.known_probe(n_images) if run is not None else None
                if apart:
                    per_item = known if known is not None else _probe_apart(compute, first, n_images, weights,
                                                                            squares, run, put_back)
                else:  # the first chunk is the probe's, real work (chunks="throughput"; no run)
                    probe = MemoryProbe(first) if known is None else None
                    ctx = run.chunk(run.probe_layout(), False) if run is not None else nullcontext()
                    with ctx, (probe if probe is not None else nullcontext()):  # the sums' own temporaries count too
                        sums.add(0, compute(0, first))
                    sums.sizes.append(first)
                    bar.update(first)
                    start = first
                    per_item = known if probe is None else max(1, -(-probe.peak // first))
                    if run is not None and probe is not None:
                        run.probed(per_item, n_images, _per_item(probe.largest, first))
            cap = chunk_size(per_item, _budget(max_memory, device, inference, run), n_images)
            if apart:
                # the plan's size, also where a compiled call took an earlier call's probe (reused): it ran the
                # budget's cap, one chunk of 32 for IG 32 at one image where the other calls ran 16 + 16 (session 45's
                # last read); a bounded batch (limit) is the cap the plan splits evenly (it split 16 under 12 as 12 + 4)
                assert run is not None
                cap = planned_chunk(total, cap if limit is None else min(cap, limit), run.device, inference,
                                    gradient_chunk_cap(per_item, weight_bytes(run.model),
                                                       run.probed_block(n_images)))
        else:
            cap = chunk
        if limit is not None:
            cap = min(cap, limit)
        if run is None:
            while start < total:
                stop = min(total, start + cap)
                sums.add(start, compute(start, stop))
                sums.sizes.append(stop - start)
                bar.update(stop - start)
                start = stop
        else:
            try:
                _run_planned(compute, sums, run, start, total, n_images, cap, chunk is not None, per_item, bar)
            finally:
                _perf.close_run(run)
    return sums.result(per_item, run)


_DISCARDED: ContextVar[bool] = ContextVar("salience_discarded_pass", default=False)


def discarded() -> bool:
    """Whether the pass running here is the engine's thrown-away memory probe (:func:`accumulate`): its result is
    dropped and its items run again, so what a ``compute`` gathers on the side (SmoothGrad's completeness reports
    of its copies) must not count it."""
    return _DISCARDED.get()


def generators_kept(device: Optional[torch.device]) -> Any:
    """A block after which the random generators are as it found them (the CPU's, and ``device``'s where it is a CUDA
    device): for a pass whose result is thrown away (a memory probe), so that a model drawing noise in its forward
    sees the same stream whether or not the probe ran."""
    return torch.random.fork_rng(devices=[device] if getattr(device, "type", "cpu") == "cuda" else [])


def _probe_apart(compute: Callable[[int, int], Union[Tensor, tuple[Tensor, Tensor]]], first: int, n_images: int,
                 weights: Optional[Sequence[float]], squares: bool, run: _perf.Run, put_back: bool = False) -> int:
    """The memory probe as a pass of its own: items ``0..first-1`` (one per image) under :class:`MemoryProbe`, summed
    into sums of their own (their temporaries count too), all thrown away; returns the bytes per item and records
    them in ``run`` (:meth:`salience._core.perf.Run.probed`). Its chunk is not one of the call's (``run.layouts``
    keeps no entry for it). What it writes of the model's own state is put back: by the next chunk's put-back where
    ``compute`` puts the call's found state back before each chunk (``put_back``), else by a
    :class:`~salience._core.guard.Found` of its own around it (session 50: a forward counting its calls made a first
    call's chunks see one count more than a later call's, which runs no probe: integrated gradients 1.5x)."""
    probe, scratch = MemoryProbe(first), _Adder(n_images, weights, squares, first)
    # what the pass notes is forgotten after it (its items run again): the noted scores' buffers, made for the call's
    # items, were made again at twice the size at the last chunk of a process's first call (session 57)
    scope = _derived.current()
    saved = scope.snapshot() if scope is not None else None
    token = _DISCARDED.set(True)
    kept = len(run.layouts)
    # a model that draws random numbers in its forward (dropout-like noise, stochastic depth) must see the same
    # stream in a first call as in a later one, which runs no probe: the pass leaves the generators as it found them
    try:
        with generators_kept(run.device), (nullcontext() if put_back else Found(run.model)), \
                run.chunk(run.probe_layout(), False), probe:
            scratch.add(0, compute(0, first))
    finally:
        _DISCARDED.reset(token)
        del run.layouts[kept:]
    if scope is not None and saved is not None:
        scope.restore(saved)
    per_item = max(1, -(-probe.peak // first))
    run.probed(per_item, n_images, _per_item(probe.largest, first))
    return per_item


def _per_item(largest: Optional[int], items: int) -> Optional[int]:
    """A probe's largest block (:attr:`MemoryProbe.largest`, of a pass of ``items`` items) per item, rounded up."""
    return None if largest is None else -(-largest // items)


# Gradient passes on a CPU: at most this many items a pass (fp32, one thread, the AMD EPYC of session 44, bare
# forward + input-gradient passes, benchmarks/auto-declines-s44-*.md, median seconds): 16 items was the fastest
# size of 1, 8, 15, 16, 31, 32 for SmoothGrad's 16 items on resnet18 at 64 px (0.121 s; 15 items 0.156 s, all 32 of
# integrated gradients 0.239 s against 2 x 16 0.253 s), resnet50 at 112 px (0.966 s; 32 items 1.944 s against
# 2 x 16 1.818 s) and vit_b_16 at 112 px (3.461 s; 32 items 6.866 s against 2 x 16 7.111 s); the demo CNN at 64 px
# with 64 items ran 16 a pass in 0.098 s, 32 in 0.137 s, 60 in 0.158 s. AVX-512 holds 16 float32: sizes that are
# not a multiple of 8 ran 10-29 % slower per item than the multiple next to them (15 against 16).
CPU_GRADIENT_CHUNK = 16
# ... and this many where the model's parameters weigh at least CPU_WEIGHTY_ITEMS items' bytes by the memory probe
# (:func:`gradient_chunk_cap`): every pass reads all the weights (forward, and backward through each layer), so where
# they outweigh the activations of 16 items a bigger pass spreads that read over more items (session 46,
# benchmarks/auto-declines-s46-*.md, a loaded machine: integrated gradients' 32 items of one image in one pass against
# 16 + 16, per round, resnet18 at 64 px (46.8 MB of weights, 1.9 MB an item) 0.960, 0.922, 0.934 and in a second run
# 0.952, 0.839, 1.128; vit_b_16 at 112 px (346 MB, 20.2 MB) 0.855, 0.974, 0.930; on resnet50 at 224 px (102 MB,
# 87 MB an item: the rule keeps 16) one pass of 32 was 1.04-1.23 times the budget's 4 x 8). Both are bounded by
# mmap_chunk_cap where a pass's largest block per item is large (session 48: vgg11 at 112 px, weighty, 3.2 MB an
# item, passes of 32 items 1.06-1.09x of passes of 8 in every round, benchmarks/vgg-chunk-s48-112.txt).
CPU_GRADIENT_CHUNK_WEIGHTY = 32
# The weights must weigh at least this many items' bytes for CPU_GRADIENT_CHUNK_WEIGHTY: resnet50
# at 64 px (102 MB of weights, 7.0 MB an item: 14.5 items' bytes) and resnet18 at 112 px (46.8 MB, 5.5 MB: 8.4 items)
# ran integrated gradients' 32 items of one image within 1.02 of the bare pass of 32 in one pass, 1.11-1.14 in
# 16 + 16 (docs/performance-log.md, "The gradient chunk on small models", benchmarks/chunk-small-s60.md); resnet50
# at 112 px (22.2 MB an item: 4.6 items' bytes), where 32 items were slower than 2 x 16 (session 44), and at 224 px
# (1.2) stay under it; 16 items' bytes until session 60.
CPU_WEIGHTY_ITEMS = 8
# Where a pass's items are small in bytes its fixed costs (salience's per-pass work, the backward's setup, the
# kernels' per-call overhead) outweigh the cache misses of a bigger pass: a CPU gradient pass takes as many items as
# keep it under CPU_SMALL_PASS_BYTES by the memory probe (a multiple of 8), up to CPU_GRADIENT_CHUNK_SMALL, where that
# is more than the rules above give. Integrated gradients' 64 items of two images (one thread, CPU time, medians):
# the tiny CNN of benchmarks/fixed_cost_s59.py (22 KB an item) in one pass of 64 in 0.4 of the time of 4 x 16, the
# demo CNN at 24 px (188 KB) in 0.59 and at 32 px (334 KB: 64 items 21 MB) in 0.68; the demo CNN at 64 px (1.3 MB an
# item: 1.14 / 1.07 / 1.08 of the bare pass in passes of 16 / 32 / 64, within the noise, and session 44 had 16 faster
# than 32 there) stays at 16 (benchmarks/chunk-small-s60-sizes*.md). Items of 394-786 KB get a cap of 40-56, whose
# even split of 16 n or 32 n items can be no multiple of 8 (resnet18 at 32 px, 8 images' 256 points: 5 x 43 + 41,
# the tiny CNN at 80 px 6 x 37 + 34); those ran 0.94 and 1.03 of 8 x 32 (main's plan on resnet18), benchmarks/chunk-split-s60.md.
CPU_SMALL_PASS_BYTES = 24 << 20
CPU_GRADIENT_CHUNK_SMALL = 64


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters (each counted once): what every pass reads. The same in every process for
    the same model (unlike a timing), so a chunk size chosen from it keeps a seeded call's bits. A tied parameter
    once: ``parameters()`` yields each once, as the guard's quick walk (:func:`~salience._core.guard.modules_of`'s)
    that lists them here (session 47: with a dense tensor's bytes read first, 0.13 -> 0.03 ms a call on resnet18)."""
    return sum(_stored_bytes(p) for p in parameters_of(model))


def _stored_bytes(t: Tensor) -> int:
    """The bytes ``t`` holds: a sparse tensor's values and indices, not its dense shape's (a sparse COO identity of
    10,000 x 10,000 holds 0.24 MB; its numel times 4, 400 MB, made 32 items a pass of a model that reads 0.24 MB:
    review of session 46)."""
    layout = t.layout
    if layout is torch.strided:  # a dense tensor (most): one comparison, not three
        return t.numel() * t.element_size()
    if t.layout == torch.sparse_coo:
        parts: tuple[Tensor, ...] = (t._values(), t._indices())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.values(), t.crow_indices(), t.col_indices())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.values(), t.ccol_indices(), t.row_indices())
    else:
        return t.numel() * t.element_size()
    return sum(q.numel() * q.element_size() for q in parts)


def gradient_chunk_cap(per_item: Optional[int], weights: int, block: Optional[int] = None) -> int:
    """The most items a CPU gradient pass takes, from the memory probe's ``per_item`` bytes, the model's parameters'
    ``weights`` bytes (:func:`weight_bytes`) and ``block``, the largest single block a pass allocates per item (the
    probe's :attr:`MemoryProbe.largest`): the largest of

    - :data:`CPU_GRADIENT_CHUNK` (16);
    - :data:`CPU_GRADIENT_CHUNK_WEIGHTY` (32) where the weights weigh at least :data:`CPU_WEIGHTY_ITEMS` (8) items'
      bytes: every pass reads them all, a bigger pass spreads that read over more items;
    - as many items as :data:`CPU_SMALL_PASS_BYTES` holds (a multiple of 8), at most :data:`CPU_GRADIENT_CHUNK_SMALL`
      (64): a pass whose items are small in bytes is cheap, its fixed costs are a large part of it;

    and at most :func:`mmap_chunk_cap`'s for ``block``, so that no block of a pass passes glibc's mmap threshold
    (``per_item`` unknown: 16, within that bound). All are the same in every process for the same model, item shape
    and options, so the choice is too (a timing probe's would not be: ``chunks="throughput"`` is that, opt-in)."""
    cap = CPU_GRADIENT_CHUNK
    if per_item is not None and per_item > 0:
        if weights >= CPU_WEIGHTY_ITEMS * per_item:
            cap = CPU_GRADIENT_CHUNK_WEIGHTY
        small = min(CPU_GRADIENT_CHUNK_SMALL, CPU_SMALL_PASS_BYTES // per_item)
        cap = max(cap, small - small % 8)
    under = mmap_chunk_cap(block)
    return cap if under is None else min(cap, under)


@functools.lru_cache(maxsize=None)
def _glibc_heap() -> bool:
    """Whether this process's C library is glibc, whose malloc serves a block of at least its mmap threshold (at most
    :data:`salience._core.malloc.MMAP_THRESHOLD`, 32 MiB on 64-bit) with a fresh ``mmap``. Never raises."""
    try:
        return _malloc_not_glibc() is None  # malloc's own check, which its warning and the heap lever go by
    except (OSError, ValueError):
        return False


def mmap_chunk_cap(block: Optional[int]) -> Optional[int]:
    """The most items a CPU gradient pass may take so that its largest block, ``block`` bytes per item, stays under
    glibc's largest mmap threshold (``None``: no bound, where ``block`` is unknown or the C library is not glibc): at
    most :data:`salience._core.malloc.HEAP_BLOCK_MAX` bytes, which come from the heap both where
    :func:`~salience._core.malloc.raise_dynamic_threshold` put the threshold (just under 32 MiB) and under
    ``allocator="reuse"`` (32 MiB).

    glibc serves a block of at least its mmap threshold with a fresh ``mmap`` and unmaps it when freed; the threshold
    rises to the size of each such block freed, but only up to 32 MiB (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit;
    ``allocator="reuse"`` fixes it there, the same bound). A bigger block is mapped afresh in every pass, and the
    kernel zeroes its pages at a fault each: resnet50 at 224 px (3.2 MB an item in its first convolution's output
    and layer1's) faulted about 17,000 pages an item in bare passes of 12 and 16 items, 1,600-3,100 in passes of 8
    and 10 (session 48, docs/performance.md). The size is rounded down to a multiple of 8 where it is at least 8
    (oneDNN's fast sizes, :data:`CPU_GRADIENT_CHUNK`), never under 1: resnet50 at 224 px, 10 -> 8."""
    if block is None or block < 1 or not _glibc_heap():
        return None
    n = _HEAP_BLOCK_MAX // block
    if n >= 8:
        n -= n % 8
    return max(1, n)


def planned_chunk(total: int, cap: int, device: torch.device, inference: bool, limit: int = CPU_GRADIENT_CHUNK) -> int:
    """The size of every chunk of ``total`` items (the last may be shorter) where the memory budget allows ``cap``:
    on a CUDA device ``cap`` (bigger passes are faster there), and for gradient-free passes (``inference``: their
    CPU budget, :data:`CPU_INFERENCE_BUDGET`, is the measured one). A CPU's gradient passes: at most ``limit`` items
    (:data:`CPU_GRADIENT_CHUNK`, or :func:`gradient_chunk_cap`'s for the model), and the items split evenly over as
    few chunks as that size needs (16 items under a cap of 12: 8 + 8, not 12 + 4), rounded up to a multiple of 8
    where that needs no more chunks and leaves the last at least half a chunk (60 under 16: 16, 16, 16, 12, not
    15 x 4: oneDNN's 15-item pass is slower than its 16-item one)."""
    if device.type != "cpu" or inference:
        return cap
    cap = min(cap, limit)
    n = -(-total // cap)
    if n == 1:
        return total
    size = -(-total // n)
    round8 = -(-size // 8) * 8
    if size % 8 and round8 <= cap and -(-total // round8) == n and total - (n - 1) * round8 >= round8 // 2:
        size = round8
    return size


def _budget(max_memory: Optional[int], device: Optional[torch.device], inference: bool, run: Optional[_perf.Run]
            ) -> int:
    """``max_memory``, else :func:`default_budget` for the device and the run's autocast."""
    if max_memory is not None:
        return max_memory
    return default_budget(device or torch.device("cpu"), inference=inference,
                          low_precision=run is not None and run.dtype is not None)


def _run_planned(compute: Callable, sums: "_Adder", run: _perf.Run, start: int, total: int, n_images: int,
                 cap: int, fixed: bool, per_item: Optional[int], bar: Any) -> None:
    """The chunks after the first, each of the size and layout the run plans, timed for its probes."""
    while start < total:
        size, cl, compiled = run.plan(total - start, n_images, cap, fixed, per_item)
        stop = start + size
        # timed only while the run measures (its clock waits for the device: on a GPU two synchronizations a
        # chunk); a run that decided (a warm call) records no time (perf.Run.measured drops it)
        timed = run.measuring
        with run.chunk(cl, compiled):
            t0 = run.clock() if timed else 0.0
            sums.add(start, compute(start, stop))
            if timed:
                run.measured(size, cl, run.clock() - t0)
        sums.sizes.append(size)
        bar.update(size)
        start = stop


class _Adder:
    """The running sums per image (float64), and the per-item scores ``compute`` returned, written into one buffer of
    the call's ``total`` items (:meth:`_keep_scores`)."""

    def __init__(self, n_images: int, weights: Optional[Sequence[float]], squares: bool, total: int) -> None:
        self.n_images, self.squares, self.total = n_images, squares, total
        self.w = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
        self._w_on: Optional[Tensor] = None  # the weights on the maps' device, in their sums' dtype: copied once
        self.acc: Optional[Tensor] = None
        self.acc2: Optional[Tensor] = None
        self.item_scores: Optional[Tensor] = None  # (total, ...): each item's scores at its position
        self.kept = 0  # how many items' scores are in it
        self.sizes: list[int] = []

    def _keep_scores(self, start: int, scores: Tensor) -> None:
        """The chunk's ``scores`` ``(n, ...)`` written at items ``start..start+n-1`` of one buffer made at the first
        chunk for all ``total`` items. A small tensor kept per chunk (a list of them, concatenated at the end) stayed
        between a pass's freed activations, where glibc can carve it from their free blocks and split them for the
        next pass's large blocks (Ablation-CAM, whose ``compute`` returns its scores: session 56; the cause session 43
        found for :meth:`~salience._core.derived.Derived.note_scores`); on resnet50 the resident peak did not fall
        measurably with this (benchmarks/perturbation-resnet50-8images-s56-mem.md)."""
        scores = scores.detach()
        n = scores.shape[0]
        buf = self.item_scores
        if buf is None or torch.promote_types(buf.dtype, scores.dtype) != buf.dtype:  # a wider chunk: as torch.cat
            dtype = scores.dtype if buf is None else torch.promote_types(buf.dtype, scores.dtype)
            grown = torch.empty((max(self.total, start + n),) + tuple(scores.shape[1:]), dtype=dtype,
                                device=scores.device)
            if buf is not None:
                grown[:self.kept] = buf[:self.kept]
            self.item_scores = buf = grown
        buf[start:start + n] = scores
        self.kept = max(self.kept, start + n)

    def add(self, start: int, result: Union[Tensor, tuple[Tensor, Tensor]]) -> None:
        maps = result
        if isinstance(result, tuple):
            maps = result[0]
            self._keep_scores(start, result[1])
        n = maps.shape[0]
        if self.acc is None:
            dt = acc_dtype(maps)
            self.acc = torch.zeros((self.n_images,) + tuple(maps.shape[1:]), dtype=dt, device=maps.device)
            if self.squares:
                self.acc2 = torch.zeros_like(self.acc)
        acc, acc2 = self.acc, self.acc2
        idx = torch.arange(start, start + n, device=maps.device)
        owner = idx % self.n_images
        m = maps.detach().to(acc.dtype)
        if self.w is not None:
            if self._w_on is None or self._w_on.device != maps.device or self._w_on.dtype != acc.dtype:
                # a copy from the host per chunk waited for the device (a blocking copy synchronizes)
                self._w_on = self.w.to(device=maps.device, dtype=acc.dtype)
            ww = self._w_on[idx // self.n_images]
            ww = ww.view((n,) + (1,) * (m.dim() - 1))
            acc.index_add_(0, owner, m * ww)
            if acc2 is not None:
                acc2.index_add_(0, owner, m * m * ww)
        else:
            acc.index_add_(0, owner, m)
            if acc2 is not None:
                acc2.index_add_(0, owner, m * m)

    def result(self, per_item: Optional[int], run: Optional[_perf.Run]) -> Sums:
        assert self.acc is not None
        scores = self.item_scores[:self.kept] if self.item_scores is not None else None
        return Sums(self.acc, self.acc2, scores, self.sizes, per_item, list(run.layouts) if run is not None else [])


def _run(compute: Callable[[int, int], Union[Tensor, tuple[Tensor, Tensor]]], start: int, stop: int,
         inference: bool, images: int, before: Optional[Callable[[], None]] = None
         ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``compute(start, stop)``, under ``torch.inference_mode()`` when ``inference``; the inputs it marks as derived
    (:func:`salience._core.derived.derived`) are the chunk's only; its items are ``start..stop-1`` of ``images``
    images (:func:`salience._core.derived.chunk_items`: a refusal of their scores names the images). ``before``: called
    first (the call's found state put back, :meth:`~salience._core.guard.Found.before_pass`), and before every pass of
    a model within the chunk (:func:`~salience._core.autograd.each_pass_from`: a method's several passes in one chunk
    of SmoothGrad)."""
    if before is not None:
        before()
    mode = torch.inference_mode() if inference else contextlib.nullcontext()
    each = each_pass_from(before) if before is not None else contextlib.nullcontext()
    with mode, each, _derived.chunk_inputs(), _derived.chunk_items(start, images):
        return compute(start, stop)


# --------------------------------------------------------------------------- several targets, one forward


def input_gradients(
    model: nn.Module,
    x: Tensor,
    targets: Sequence[TargetLike],
    *,
    strip_softmax: bool = True,
    extra_modes: Sequence[Any] = (),
    checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of K targets w.r.t. ``x`` ``(n, C, H, W)`` from one forward pass.

    Returns ``(grads (K, n, C, H, W), scores (K, n), output)``: the forward pass is walked back
    once per target (:func:`salience._core.autograd.backward`), which costs one forward less per
    extra target than separate calls. ``checked``: ``x`` was checked just before (``backward``'s).
    """
    g = backward(model, x, targets, strip_softmax=strip_softmax, extra_modes=extra_modes, checked=checked)
    assert g.inputs is not None
    return g.inputs, g.score_matrix(x.shape[0]), g.output


def layer_gradients(
    model: nn.Module,
    x: Tensor,
    targets: Sequence[TargetLike],
    layer: nn.Module,
    *,
    strip_softmax: bool = True,
    extra_modes: Sequence[Any] = (),
) -> tuple[Tensor, Tensor]:
    """A layer's output and the gradients of K targets w.r.t. it, from one forward pass.

    Returns ``(activation (B, ...), grads (K, B, ...))``; the backward passes stop at the layer.
    """
    g = backward(model, x, targets, layers=[layer], input_grad=False, strip_softmax=strip_softmax,
                 extra_modes=extra_modes)
    return g.activations[0], g.layer_grads[0]


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """``fn``'s signature, or an empty one for a builtin without one (no options); the command line reads it too."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: no options
        return inspect.Signature()


def unbind(fn: Callable[..., Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``fn`` without its ``functools.partial`` layers (as the command line and ``method_options`` bind options), and
    the keywords they bind (an outer binding over an inner one)."""
    keywords: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    return fn, keywords


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
