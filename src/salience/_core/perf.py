"""How the engine runs its passes fast: memory format, compiled graphs, autocast, chunk size.

The options (:class:`Performance`) come from a method's keywords, else from the process-wide
settings (:func:`set_performance`, or :func:`performance` for a block):

- ``memory_format``: ``"contiguous"`` (default: the model as it is), ``"channels_last"``, or
  ``"auto"``, which runs a convolutional model channels-last when the
  first chunks of a run, timed in both layouts, show it is faster for that model and input shape;
  Models with fewer than three 2-D convolutions
  (transformers) and small ones (under :data:`SMALL_ITEM_BYTES` per item) are left as they are.
- ``compile``: ``False`` (default), ``True`` (``torch.compile`` with inductor), :data:`FREEZE`
  (``True``, and the passes without gradients run a graph compiled with inductor's freezing, kept
  for the weights' addresses and version counters: :func:`weights_key`; the plain gradient passes
  with one class target a frozen graph of forward + input gradient, :func:`gradient_call`), a backend name or a
  backend callable. The compiled model is cached for the process; every chunk of the one fixed
  size runs compiled, a chunk of another size (the last; the first, probing one under ``chunks="throughput"``;
  the memory probe's own pass) eagerly, so nothing recompiles
  across chunks (with ``compile``, a later call on the same model, shape, method and number of images takes an earlier call's
  probe, no probe's pass, its chunks the plan's as in every call: :meth:`Run.reused_probe`; with :data:`FREEZE` a
  last, shorter chunk whose size recurs runs frozen graphs of its own size: :meth:`Run._frozen_tail`); single passes (:func:`one_pass`) run compiled at the batch sizes that recur, at
  most :data:`ONE_PASS_SIZES`. Where compilation is unavailable or fails, a warning says why and the
  eager path runs.
- ``precision``: ``"fp32"`` (default), ``"bf16"``, ``"bf16-mixed"`` or ``"fp16"``: the forward pass under
  ``torch.autocast`` (see docs/performance.md for the tolerance): for CUDA, and ``"bf16"`` for a CPU with
  native bf16 that pays (AMX-BF16; Arm's BF16: :func:`native_bf16`), best with ``memory_format="channels_last"``; on
  a CPU without, ``"bf16"`` is no faster than fp32 (AVX512-BF16 alone) or slower, and warns once per process
  (:mod:`salience._core.cpu`). Under a CPU bf16 autocast every many-pass run (gradient methods and gradient-free
  ones) casts each weight to bf16 once per call, not once per pass (:meth:`Run.casts_kept`, :mod:`salience._core.casts`).
  ``"bf16-mixed"``: the bf16 autocast with the operations on the maps at a quarter of the input's resolution or
  larger in fp32 (:mod:`salience._core.islands`; the pixel-gradient maps much closer to fp32's than bf16's, at a
  part of bf16's speed-up), eager only (``compile`` refused with it).
- ``chunks``: ``"memory"`` (default): the chunk the memory budget allows (on a CPU's gradient passes at most
  ``engine.CPU_GRADIENT_CHUNK`` items, 32 where the model's parameters outweigh 8 items by the probe, up to 64
  where 64 items take at most ``engine.CPU_SMALL_PASS_BYTES`` (24 MiB): :func:`salience._core.engine.gradient_chunk_cap`; the items split evenly: :func:`salience._core.engine.planned_chunk`), the
  memory probe a pass of its own in the first call (thrown away), so that every call runs the same chunks from
  item 0 and a seeded call gives the same bits every time; ``"throughput"`` picks the chunk size by measured seconds per item
  (the fastest of :data:`SIZE_SAMPLES` timings per size), within the memory budget (results then
  agree only up to float rounding between calls).
- ``fold_batchnorm``: ``False`` (default) or ``True``: plain passes (no layer hooked, no backprop
  rule) run a copy of the model in which every BatchNorm that follows a convolution is folded into
  that convolution's weights and bias (eval-mode statistics, as salience always runs the model).
  The function is the same, so the input gradients are equal up to float rounding, and the
  normalisation's forward and backward work is gone (about 9 % of resnet50's forward + backward on
  this CPU). The copy is made with ``torch.fx`` (a model fx cannot trace, one with hooks of its own,
  or one without such a pair runs as it is, with a warning), cached for the process and made again
  when a parameter or buffer of the model or its :func:`structure` changes; it costs one copy of
  the weights (for eager passes under a bf16 / fp16 ``precision``, but ``bf16-mixed`` on images, its convolutions'
  and linear layers' weights held in that dtype: :func:`salience._core.folding.folded_model`).
- ``allocator``: ``"default"`` (glibc's dynamic mmap threshold raised once, before the first CPU pass, as the
  process's first free of a block just under 32 MiB would: :func:`salience._core.malloc.raise_dynamic_threshold`,
  the thresholds left adjusting; nothing where the process started with glibc's own threshold settings in its
  environment, ``MALLOC_MMAP_THRESHOLD_`` and the like: :func:`salience._core.malloc.user_tuned`; elsewhere than glibc
  the C allocator as it is), ``"system"`` (the C allocator exactly as the process has it: salience maps, frees and
  sets nothing for it; the off switch for a server embedding salience, a memory profiler, a process that tuned glibc
  itself) or ``"reuse"``: before the first
  pass of a model on a CPU under it (:func:`before_pass`, from :func:`salience._core.autograd.model_call`; a
  :class:`Run` before its probes), glibc's mmap and trim thresholds are fixed high, once for the process
  (:func:`salience._core.malloc.keep_freed_memory`), so the activations a pass frees are kept for the
  next instead of being given back and faulted in again. Process-wide and not undone (the process keeps the
  memory it freed), hence opt-in; elsewhere than glibc nothing, and a warning. The maps are the same bits.

``auto``, ``throughput`` and ``fold_batchnorm`` are not the defaults: the only benchmark run so far (under heavy load,
benchmarks/engine_speed.md) found ``auto`` slower than the default layout at 1 image; they become
defaults when a quiet run shows they pay.

A :class:`Run` holds one many-pass call's choices; :func:`salience._core.engine.accumulate` runs
each chunk under :meth:`Run.chunk`, and :func:`salience._core.autograd.backward` asks
:func:`active` how to run a pass of the model (input layout, compiled forward, autocast). The
model's parameters are converted in place for channels-last and always put back (also by
:func:`salience._core.guard.model_guard`, which records their data); a dataset run makes their channels-last
copies once and each call swaps them in (its run guard keeps them: :func:`salience._core.layouts.open_copies`).

What is measured is cached per model and input shape (:class:`_Record`), so a later call on the
same model and shape starts from the decision. What depends on the model's modules (a final
softmax found, the folded copy, the compiled model) is kept for the model's :func:`structure` at
the time (a module replaced, appended or hooked since: found again).

The compiled models and frozen graphs are made and cached in :mod:`salience._core.compiled`, the folded
copy in :mod:`salience._core.folding`, the fingerprints (:func:`structure`, :func:`observer`,
:func:`own_hooks`) and the lock of this state in :mod:`salience._core.fingerprint`; this module decides
when a pass runs them, and re-exports their public names.
"""
from __future__ import annotations

import contextvars
import math
import threading
import time
import warnings
import functools
import weakref
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from salience._core.calm import calmly
from salience._core.casts import CastCache, WeightCasts, drop_entry, served
from salience._core.cpu import native_bf16, warn_bf16_without_native
from salience._core.compiled import (FREEZE, _GRADIENT, _check_backend_name, _compile_failed, _compiled,
                                     _compiled_model, _freezing_on, _Frozen, _frozen_gradient, _frozen_model,
                                     _release_graphs, _shared_setting, _store, compile_unavailable, weights_key)
from salience._core.derived import target_classes
from salience._core.errors import SalienceError, user_stacklevel
from salience._core.guard import forget_copies
from salience._core.islands import HighResolutionFp32
from salience._core.strided import ContiguousAttention, holds_attention
from salience._core.fingerprint import _fold_key, _lock, end_walk, observer, own_hooks, structure
from salience._core.layouts import channels_last_data, copies_made, keep_only, keeping
from salience._core.malloc import dynamic_threshold_raised, keep_freed_memory, raise_dynamic_threshold, thresholds_fixed
from salience._core.tensors import is_numpy_bool
from salience._core.folding import _described, _folded, fold_failed, folded_model

__all__ = ["Performance", "Run", "close_run", "set_performance", "performance", "plain", "current", "resolve", "active", "inside",
           "MEMORY_FORMATS", "PRECISIONS", "CHUNKING", "SMALL_ITEM_BYTES", "ONE_PASS_SIZES", "clear_cache", "compile_unavailable", "folded_model",
           "own_hooks", "observer", "one_pass", "structure", "ModelCache", "FREEZE", "weights_key", "gradient_call",
           "native_bf16", "autocast_dtype"]

MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
PRECISIONS = ("fp32", "bf16", "bf16-mixed", "fp16")
CHUNKING = ("throughput", "memory")
# allocator: "default" raises glibc's dynamic mmap threshold once, as a free of a 32 MiB block would (thresholds still
# adjusting; nothing where the environment set glibc's thresholds, nor elsewhere); "reuse" (glibc) fixes its mmap and
# trim thresholds high once, so the activations a CPU pass frees are kept for the next; "system" does nothing to the
# C allocator (salience._core.malloc)
ALLOCATORS = ("default", "reuse", "system")
# A pass that needs less than this per item (measured by the engine's memory probe) is too small
# for the layout to matter against the noise of timing it: auto leaves such models contiguous.
SMALL_ITEM_BYTES = 4 << 20
# Thresholds of the probes: channels-last must be 5% faster per item (the spread of repeated
# timings of one pass on a shared CPU is a few percent); a bigger chunk 3% faster.
LAYOUT_GAIN = 0.95
SIZE_GAIN = 0.97
# Timings the size probe takes of each chunk size (chunks in a row) before comparing sizes by
# their fastest time per item. Timings of identical work spread by +-10 % on this VM
# (docs/performance.md, "Why auto and throughput are not the defaults"), more than the 3 % the
# probe looks for. Other work on the machine only adds time, so with one timing per size a single
# slow chunk either stopped the climb at the size before it or, at the size that was best so far,
# made the next size look faster and carried the climb past the best. The minimum of two rejects
# such a one-off. The probing chunks do the method's real work, so a second timing only runs a
# not-yet-best size a little longer, and the decision is cached. With memory_format="auto" the
# layout probe's two chunks in the chosen layout are the start size's timings (so keep this at 2
# or more: every size compared on as many timings).
SIZE_SAMPLES = 2
# Batch sizes :func:`one_pass` compiles per model, input shape and options (the one-pass methods'
# input gradients and a dataset run's prediction passes share them: one graph per size), each at its
# second input (a size seen once is a probe or a last, shorter batch). Every size is one more graph of
# the model class's ``forward``, a code object dynamo compiles at most ``recompile_limit`` (8) times
# for every instance of the class together, and layouts, precisions and the many-pass methods' chunk
# sizes add theirs; past the limit the model runs eagerly for the rest of the process. Two cover a
# dataset run's batch size and one more recurring size (one image at a time, or a recurring last
# batch), and three option sets (6 graphs) leave room for a many-pass method's chunks (with 3 sizes,
# two option sets take 6); a third recurring size runs eagerly, with one warning naming the sizes.
ONE_PASS_SIZES = 2
# compile=FREEZE: sizes of a many-pass call's last, shorter chunk that run the frozen graphs (one graph
# more each, compiled at the size's second call in one weights' state, :meth:`Run.plan`), per model, method, input shape
# and options. The frozen gradient graph of a model is one code object for every method and size,
# with dynamo's recompile limit of 8 graphs; past it the graph fails and, remembered for the model's
# structure, no pass of the model runs frozen. One tail per method keeps the sizes far from the limit
# (the full chunk of SmoothGrad and of integrated gradients, and their tails: 4 at most per input shape).
FROZEN_TAILS = 1
# ... and at most this many such (input shape, size) graphs per model, over all its methods and input
# shapes: a tail graph per method and input shape took one more of the limit's 8 graphs per input shape
# (SmoothGrad on five image sizes: ten graphs, the ninth failed, and no pass of the model ran frozen).
FROZEN_TAILS_PER_MODEL = 2
_DTYPES = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(options: "Performance") -> Optional[torch.dtype]:
    """The dtype of the autocast the passes of ``options`` run under (``None``: float32, no autocast)."""
    return _DTYPES.get(options.precision)


@dataclass(frozen=True)
class Performance:
    """The engine's options; see the module docstring."""

    memory_format: str = "contiguous"
    compile: Any = False
    precision: str = "fp32"
    chunks: str = "memory"
    fold_batchnorm: bool = False
    allocator: str = "default"

    def validated(self) -> "Performance":
        if self.memory_format not in MEMORY_FORMATS:
            raise SalienceError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}; got {self.memory_format!r}")
        if self.precision not in PRECISIONS:
            raise SalienceError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.chunks not in CHUNKING:
            raise SalienceError(f"chunks must be one of {', '.join(CHUNKING)}; got {self.chunks!r}")
        if not isinstance(self.fold_batchnorm, bool):
            raise SalienceError(f"fold_batchnorm must be True or False; got {self.fold_batchnorm!r}")
        if self.allocator not in ALLOCATORS:
            raise SalienceError(f"allocator must be one of {', '.join(ALLOCATORS)}; got {self.allocator!r}")
        c = self.compile
        if not (isinstance(c, (bool, str)) or callable(c)):
            raise SalienceError(f"compile must be True/False, {FREEZE!r}, a torch.compile backend name or callable; "
                                f"got {c!r}")
        if isinstance(c, str) and c != FREEZE:
            _check_backend_name(c)
        if self.precision == "bf16-mixed" and c is not False:
            raise SalienceError(f"precision='bf16-mixed' runs eagerly (torch.compile does not trace its fp32 operations "
                                f"correctly): use compile=False with it, or precision='bf16' to compile; got "
                                f"compile={c!r}")
        return self

    @property
    def backend(self) -> Any:
        """The torch.compile backend, or ``None`` when not compiling (``"inductor"`` for ``True`` and
        :data:`FREEZE`, whose gradient passes other than :func:`gradient_call`'s run the plain
        inductor graph)."""
        if self.compile is False:
            return None
        return "inductor" if self.compile is True or self.freeze else self.compile

    @property
    def freeze(self) -> bool:
        """Whether passes without gradients run a graph compiled with inductor's freezing
        (``compile="freeze"``)."""
        return isinstance(self.compile, str) and self.compile == FREEZE


_process = Performance()
# the options a performance() block names (its own and its enclosing blocks'), over the process's settings: a
# snapshot of all of them hid a set_performance() of another option made while the block ran
_override: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("salience_perf", default=None)
_plain: contextvars.ContextVar[bool] = contextvars.ContextVar("salience_perf_plain", default=False)


def current() -> Performance:
    """The settings in force here: the defaults inside :func:`plain` (:func:`_plain_options`), else the options the
    innermost :func:`performance` blocks name over the process's."""
    if _plain.get():
        return _plain_options()
    o = _override.get()
    return replace(_process, **o) if o else _process


def set_performance(**options: Any) -> Performance:
    """Set the process-wide options (``memory_format``, ``compile``, ``precision``, ``chunks``,
    ``fold_batchnorm``, ``allocator``; ``None`` leaves one as it is); returns the previous settings (pass them back with
    ``set_performance(**vars(prev))``). Inside a :func:`performance` block the options the block names stay
    the block's until it ends; the others are these."""
    global _process
    with _lock:
        prev = _process
        _process = _replace(prev, options)
    _allocator_kept(prev, _process)
    return prev


@contextmanager
def performance(**options: Any) -> Iterator[Performance]:
    """The options for the block (this thread / context only), e.g.
    ``with salience.performance(compile=True): salience.smoothgrad(...)``: those it names (``None``: not
    named) over the enclosing blocks' and the process's settings, which stay in force for the others."""
    before = current()
    _allocator_kept(before, _replace(before, options))  # checked
    named = {k: _option(k, v) for k, v in options.items() if v is not None}
    token = _override.set({**(_override.get() or {}), **named})
    try:
        yield current()
    finally:
        _override.reset(token)


def _plain_options() -> Performance:
    """The options of :func:`plain`'s passes: the defaults, but ``allocator="system"`` where it is in force (the off
    switch holds for every pass: a dataset run's batch-size probe under the defaults' allocator ran the lever on the
    allocator of a process that had said ``"system"``). ``"reuse"`` is not kept: its thresholds are fixed at the
    run's own first pass, after the run's DataLoader is made (docs/performance.md, session 43)."""
    o = _override.get()
    return _PLAIN_SYSTEM if (o or {}).get("allocator", _process.allocator) == "system" else _PLAIN


_PLAIN, _PLAIN_SYSTEM = Performance(), Performance(allocator="system")


@contextmanager
def plain() -> Iterator[None]:
    """Every pass in the block runs with the default options (``Performance()``; ``allocator="system"`` kept where
    it is in force: :func:`_plain_options`), whatever the settings
    in force and whatever a method's own keywords say (``compile=``, ``memory_format=``,
    ``precision=``: :func:`resolve` checks them, then gives the defaults); for a measure that must not
    depend on how the passes run (a dataset run's batch-size probe, :func:`salience.runs.job.choose_batch`)."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)


def _allocator_kept(before: Performance, after: Performance) -> None:
    """A warning where a setter changes ``allocator`` after what the first one set in this process cannot be undone:
    ``"reuse"``'s ``mallopt`` (glibc's thresholds stay fixed: turned into ``"default"``, or into ``"system"`` from any
    setting), or the
    default's raised dynamic threshold (turned into ``"system"``: the thresholds still adjust, but from where the
    raise put them). A warning, not an error: the call sets what it names, and ``set_performance(**vars(prev))``
    restores the other options. A block that names the setting in force (a dataset run's
    ``performance(**vars(current()))``) changes nothing and says nothing; nor does anything before a CPU pass."""
    if before.allocator == after.allocator:
        return
    # "system" after thresholds "reuse" fixed, whatever came between ("reuse" -> "default" -> "system"): the reuse
    # warning, not the default's (whose "still adjusts" mallopt made false; session 49's review)
    if thresholds_fixed() and (before.allocator == "reuse" or after.allocator == "system"):
        warnings.warn(f"allocator={after.allocator!r} cannot undo allocator='reuse' in this process: glibc's mmap and "
                      "trim thresholds, fixed by mallopt before its first CPU pass, stay as they are (there is no way "
                      f"back; the process keeps the memory it frees). The option now says {after.allocator!r} and "
                      "salience sets nothing more; for the C allocator as it is, start a new Python process "
                      "(allocator='system' before its first CPU pass)", stacklevel=user_stacklevel())
    elif after.allocator == "system" and dynamic_threshold_raised():
        warnings.warn("allocator='system' cannot undo what allocator='default' did before this process's first CPU "
                      "pass: glibc's dynamic mmap threshold was raised (one block just under 32 MiB mapped and freed), "
                      "and it still adjusts from there. salience does nothing more to the C allocator; for it exactly "
                      "as the process has it, set allocator='system' before the first CPU pass (or start a new Python "
                      "process)", stacklevel=user_stacklevel())


def _replace(base: Performance, options: dict) -> Performance:
    unknown = set(options) - {"memory_format", "compile", "precision", "chunks", "fold_batchnorm", "allocator"}
    if unknown:
        raise SalienceError(f"unknown performance option(s) {sorted(unknown)}; "
                            "expected memory_format, compile, precision, chunks, fold_batchnorm, allocator")
    return replace(base, **{k: _option(k, v) for k, v in options.items() if v is not None}).validated()


def _option(name: str, value: Any) -> Any:
    """A numpy bool as a Python bool for the flags (``fold_batchnorm``, ``compile``), as every bool option of
    salience takes it (:func:`salience._core.tensors.check_flag`): it was "must be True or False; got np.True_"."""
    if name in ("fold_batchnorm", "compile") and is_numpy_bool(value):
        return bool(value)
    return value


def resolve(memory_format: Optional[str] = None, compile: Any = None, precision: Optional[str] = None,
            fold_batchnorm: Optional[bool] = None) -> Performance:
    """A method's keywords over the settings in force (``None``: the setting); the defaults inside
    :func:`plain` (the keywords checked all the same)."""
    options = _replace(current(), dict(memory_format=memory_format, compile=compile, precision=precision,
                                       fold_batchnorm=fold_batchnorm))
    return _plain_options() if _plain.get() else options


# --------------------------------------------------------------------------- per-model results


class ModelCache:
    """A small process cache of what was worked out for a model (the CAMs' default layer,
    :func:`salience.methods.gradcam.default_layer`): one value per ``(model, key)`` (``key``: what else it
    depends on, e.g. the input's item shape), good for the model's :func:`structure` it was found for (a module
    replaced, appended or hooked since: :meth:`get` misses, and the caller works it out again). The model is
    held by a weak reference, never kept alive, and its entry goes when it dies (an entry's value may hold its
    modules, so their weights; the id may be another model's then); the least recently used entries go past ``keep``. Thread-safe (a lock of its own);
    :func:`clear_cache` empties it."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._entries: "OrderedDict[tuple, tuple[Any, tuple, Any]]" = OrderedDict()
        _model_caches.append(self)

    def get(self, model: nn.Module, key: tuple, fingerprint: tuple) -> Any:
        """The value kept for ``model`` and ``key`` in the state ``fingerprint`` (its :func:`structure`), or None."""
        k = (id(model), key)
        with self._lock:
            hit = self._entries.get(k)
            if hit is None or hit[0]() is not model or hit[1] != fingerprint:
                return None
            self._entries.move_to_end(k)
            return hit[2]

    def put(self, model: nn.Module, key: tuple, fingerprint: tuple, value: Any) -> None:
        """Keep ``value`` (not None) for ``model`` and ``key`` in the state ``fingerprint``, replacing the one kept
        for another state."""
        k = (id(model), key)
        with self._lock:
            ref = weakref.ref(model, functools.partial(drop_entry, self._entries, k))  # gone with its model
            self._entries[k] = (ref, fingerprint, value)
            self._entries.move_to_end(k)
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_model_caches: list[Any] = []  # ModelCache, and attention's scopes: each has clear()


# --------------------------------------------------------------------------- measured choices


@dataclass
class _Record:
    """What was measured for one model, input shape and options: seconds per item by
    ``(chunk size, channels_last)``, and the decisions once made."""

    model: Any  # weakref to the model (an id alone could be reused)
    samples: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    layout: Optional[bool] = None
    size: Optional[int] = None
    best: Optional[int] = None
    down: bool = False
    softmax: Optional[bool] = None  # one-pass runs: whether an eager pass found a final softmax to strip
    structure: Optional[tuple] = None  # the model's structure() that ``softmax`` was found for
    # (a structure(), whether the model has 3 convolutions in it: _is_convolutional): the modules' classes are in the
    # structure, so the answer holds while it does (a walk of the model's modules less per call; docs/performance.md,
    # session 41). A pair, not a flag beside ``structure``: another thread's Run may set that meanwhile
    convolutional: Optional[tuple[tuple, bool]] = None
    seen: dict[int, int] = field(default_factory=dict)  # one-pass runs under compile: inputs per batch size
    last: Any = None  # one-pass runs under compile: a weakref to the last call's input
    compiled: list[int] = field(default_factory=list)  # the one-pass sizes compiled (on _ONE_PASS's record)
    refused: bool = False  # a recurring size was refused for the cap (warned once; on _ONE_PASS's record)
    # the engine's memory probe: bytes per item of an eager chunk, per number of images of the call
    # (Run.known_probe, Run.reused_probe)
    probes: dict[int, int] = field(default_factory=dict)
    # ... and the largest single block a pass allocated per item (engine.mmap_chunk_cap; None: none seen), the same keys
    blocks: dict[int, Optional[int]] = field(default_factory=dict)
    tails: dict[int, Any] = field(default_factory=dict)  # FREEZE: per size of a last, shorter chunk, the weights_key of its last call
    frozen_tails: list[int] = field(default_factory=list)  # FREEZE: the tail sizes that run frozen (FROZEN_TAILS)

    def t(self, size: int, cl: bool) -> float:
        """The fastest seconds per item measured at ``size`` in layout ``cl`` (``inf``: none)."""
        return min(self.samples.get((size, cl), [math.inf]))

    def n(self, size: int, cl: bool) -> int:
        """How many timings of ``size`` in layout ``cl`` were taken."""
        return len(self.samples.get((size, cl), ()))


_records: dict[tuple, _Record] = {}
# compile=FREEZE: per model (id), a weakref to it and the (input item shape, size) of each last, shorter
# chunk granted a frozen graph, over all its records (FROZEN_TAILS_PER_MODEL)
_model_tails: dict[int, tuple[Any, list[tuple]]] = {}
_ONE_PASS = "one-pass sizes"  # the tag of the record that holds one_pass's compiled sizes for all its tags


def _record(model: nn.Module, x: Tensor, options: Performance, tag: str) -> _Record:
    """The record of ``model``, ``tag``, items shaped like ``x[0]`` and ``options`` (made when new)."""
    key = (id(model), tag, tuple(x.shape[1:]), x.dtype, str(x.device), options.memory_format,
           options.precision, options.fold_batchnorm)
    with _lock:
        rec = _records.get(key)
        if rec is None or rec.model() is not model:
            rec = _records[key] = _Record(weakref.ref(model))
        return rec


def clear_cache() -> None:
    """Forget every measured choice, compiled model, folded copy and :class:`ModelCache` entry (the CAMs' default
    layers), and where attention rollout found each model's attention (``salience.attention._SCOPES``) (tests, or
    after changing a plain attribute a model's ``forward`` reads: :func:`structure` sees
    modules, hooks and weights only); and the copies of large tensor attributes kept across calls
    (:func:`~salience._core.guard.forget_copies`, session 51)."""
    with _lock:
        _records.clear()
        _model_tails.clear()
        for entry in _compiled.values():
            _release_graphs(entry)
        _compiled.clear()
        _folded.clear()
    for cache in _model_caches:
        cache.clear()
    forget_copies()


def _is_convolutional(model: nn.Module) -> bool:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 3


# --------------------------------------------------------------------------- one run


_active: contextvars.ContextVar[tuple] = contextvars.ContextVar("salience_runs", default=())


def active(model: nn.Module) -> Optional["Run"]:
    """The run whose chunk is executing on ``model`` here, if any."""
    for run in reversed(_active.get()):
        if run.model is model:
            return run
    return None


@contextmanager
def inside(run: "Run") -> Iterator[None]:
    """``run`` active (:func:`active`) in the block without a chunk: a pass of the call outside the engine's chunks (a
    method's clean scores, :func:`salience.methods.perturbation.clean_scores`) at the run's precision, which
    ``forward_scores`` enters (a caller's own autocast around it is turned off by its ``model_guard``)."""
    token = _active.set(_active.get() + (run,))
    try:
        yield
    finally:
        _active.reset(token)


def close_run(run: "Run") -> None:
    """``run.close()`` with Ctrl-C deferred (:func:`~salience._core.calm.calmly`), and once more if it raised (a
    Ctrl-C before the deferral, or an exception in it): for the ``finally`` of every block that made a run. A
    Ctrl-C before close put the layouts back left the process's folded copy, converted in place
    (:meth:`Run.set_layout`), channels-last for every later call on the model (the user's own parameters are put
    back by the model guard)."""
    try:
        calmly(run.close)
    except BaseException:  # a Ctrl-C before calmly deferred it, or the user's SIGINT handler's exception
        calmly(run.close)
        raise


class Run:
    """The options of one many-pass call on ``model`` for items shaped like ``x[0]``, and its state:
    the model's current layout, whether this chunk may run compiled, what the probes measured.

    ``tag`` names the per-item computation (e.g. ``"smoothgrad:vanilla"``): measurements are cached
    per model, tag, item shape, dtype, device and options. ``close()`` puts the model's parameters
    back (:func:`salience._core.engine.accumulate` calls it).
    """

    _casts: Optional[CastCache] = None  # inside casts_kept: the call's bf16 copies of the weights
    _softmax_taken = False  # the final-softmax answer is an earlier call's, not yet said anew (note_softmax)

    def __init__(self, model: nn.Module, x: Tensor, options: Optional[Performance] = None, *, tag: str = "",
                 plain_passes: bool = False, strip_softmax: bool = True) -> None:
        self.model = model
        # every pass is plain (no hook, no interception: Score-CAM's and RISE's): once the folded copy runs them (from
        # the first with strip_softmax=False), the model's own parameters are not run again: as they are (set_layout)
        self.plain_passes, self.strip_softmax = plain_passes, strip_softmax
        self.options = (options or current()).validated()
        self.device = x.device
        self.dtype = autocast_dtype(self.options)
        _allocator(self.options, self.device)
        warn_bf16_without_native(self.options.precision, self.device)
        # Compiled runs share the eager runs' decisions (they measure nothing themselves).
        rec = self.record = _record(model, x, self.options, tag)
        self._item_shape = tuple(x.shape[1:])
        self._take_structure(model, rec)
        # What the folded copy is kept for, taken now (a channels-last chunk moves the parameters).
        self._fold_key = _fold_key(model) if self.options.fold_batchnorm else None
        self.channels_last = False
        # (parameter, its data before): put back by _restore; data None: the folded copy's, converted in place
        self._saved: list[tuple[nn.Parameter, Optional[Tensor]]] = []
        self._compiled_now = False
        # compile="freeze": this chunk (a last, shorter one) may run the frozen graphs only, never the
        # plain compiled model (another size of the model class's graph): set by plan() for the next chunk
        self._frozen_only = self._tail_next = False
        self._used_compiled = False
        self._probing = False
        self.softmax_checked = self.softmax_stripped = False
        self._holds_attention: Optional[bool] = None  # holds an nn.MultiheadAttention (_strided_attention)
        # an earlier run checked for a final softmax: a warm call's first chunk may run the folded copy or compiled
        # model (no eager probing chunk since session 45); their output is looked at once (softmax_appeared: a fold
        # made after a flag turned a softmax on holds it; before the review of session 45 the folded copy's was not)
        self.softmax_reused = (self.options.backend is not None or self.options.fold_batchnorm) and rec.softmax is not None
        if rec.softmax is not None:  # an earlier call's answer, renewed by this call's first eager look (note_softmax)
            self.softmax_checked, self.softmax_stripped, self._softmax_taken = True, rec.softmax, True
        # A pass without gradients (a prediction pass) that runs the compiled model as a gradient pass
        # does, so that the two share one graph (set by one_pass(gradient_graph=True)).
        self.gradient_graph = False
        self.layouts: list[str] = []  # per chunk, for Sums
        self._compiled_fn: Any = None
        # compile="freeze": the frozen graph for the passes without gradients, and the weights' state
        # (weights_key) it is kept for, taken now (a channels-last chunk moves the parameters).
        self._frozen_fn: Any = None
        self._frozen_base: Optional[nn.Module] = None
        self._weights_key: Optional[tuple] = None
        self._used_frozen = False
        self._folded: Optional[nn.Module] = None
        self._used_folded = False
        self._dropped_casts = False  # the model's own kept casts dropped once the folded copy runs (folded_now)
        self._take_folded(model)
        if self.options.backend is not None:
            why = (compile_unavailable(self.options.backend, self.device) or own_hooks(model)
                   or ("torch.compile does not take a TorchScript model" if isinstance(model, torch.jit.ScriptModule)
                       else None))
            if why is not None:
                warnings.warn(f"compile: {why}; running eagerly", stacklevel=user_stacklevel())
            else:
                base = self._folded if self._folded is not None else model
                self._compiled_fn = _compiled_model(base, self.options.backend, self.structure)
                if isinstance(self._compiled_fn, Exception):
                    self._compiled_fn = None
                elif self.options.freeze:
                    self._freeze(base)

    def _take_folded(self, model: nn.Module) -> None:
        """``self._folded``: the process's folded copy of ``model`` with ``fold_batchnorm`` (else ``None``; a warning
        says why there is none); eager passes under an autocast run one held in its dtype (:func:`folded_model`), but
        for ``bf16-mixed`` on images, whose high-resolution convolutions run in float32."""
        # not under bf16-mixed's fp32 islands (islands.py): their convolutions ran the float32 fold's weights unrounded
        self._fold_dtype = self.dtype if self.options.backend is None and not self._islands() else None
        if self.options.fold_batchnorm:
            # bf16-mixed's float32 copy runs under its autocast only: a block of the forward at that dtype is served
            passes = self.dtype if self.options.backend is None and self._islands() else None
            end_walk()  # the trace runs the model's forward (the user's code)
            self._folded, why = folded_model(model, self._fold_key, self._fold_dtype, passes)
            if self._folded is None:
                warnings.warn(f"fold_batchnorm: {why}; running the model as it is", stacklevel=user_stacklevel())

    def _islands(self) -> bool:
        """Whether the eager passes run bf16-mixed's fp32 islands (:class:`HighResolutionFp32`): on images only."""
        return self.options.precision == "bf16-mixed" and len(self._item_shape) == 3

    def _take_structure(self, model: nn.Module, rec: _Record) -> None:
        """``self.structure``, the model's :func:`structure` now (what ``rec`` found for another is forgotten), and
        ``self.convolutional``, kept in ``rec`` with the structure it was found for (its modules' classes are in it)."""
        self.structure = structure(model)
        if rec.structure != self.structure:  # a module, a forward or a hook changed: found again
            rec.softmax, rec.probes, rec.blocks, rec.structure = None, {}, {}, self.structure
        conv = rec.convolutional
        if conv is None or conv[0] != self.structure:
            conv = rec.convolutional = (self.structure, _is_convolutional(model))
        self.convolutional: bool = conv[1]

    def _freeze(self, base: nn.Module) -> None:
        """Take the frozen graph of ``base`` (the model or its folded copy) for the model's weights as
        they are now; the passes without gradients run it (:func:`forward_call`)."""
        self._weights_key = weights_key(self.model)
        if self._weights_key is None:
            warnings.warn(f"compile={FREEZE!r}: a parameter or buffer of the model has no version counter (made "
                          "under torch.inference_mode), so a change to it could not be seen; the passes run the "
                          "compiled model without freezing", stacklevel=user_stacklevel())
            return
        frozen = _frozen_model(base, self._weights_key, self.structure)
        if not isinstance(frozen, Exception):
            self._frozen_fn, self._frozen_base = frozen, base

    # ---- layout

    def set_layout(self, channels_last: bool) -> None:
        """Convert the model's 4-D parameters to channels-last (or back to the user's) in place (the copies made once
        per dataset run: :func:`salience._core.layouts.open_copies`). The folded copy's, salience's own, are
        converted in place outside a dataset run (and back at the end): keeping its contiguous weights beside
        them held a third copy of the weights (94 MB on resnet50). With ``plain_passes``, once the folded copy runs
        the passes the model's own stay as they are (their channels-last copies were one more). Inside
        :meth:`casts_kept` the model's parameters that the call's bf16 casts serve stay as they are too: the casts are
        made channels-last (Ablation-CAM's hooked passes under bf16: float32 channels-last copies of resnet50's 3x3
        convolution weights, 40.5 MiB, were held beside the user's contiguous ones and the casts, session 46)."""
        if channels_last == self.channels_last:
            return
        if self._casts is not None:
            self._casts.clear()  # its copies have the old layout
            self._casts.channels_last = channels_last
        if channels_last:
            own = tuple(self.model.parameters())
            folded = tuple(self._folded.parameters()) if self._folded is not None else ()
            made, in_place = copies_made(), not keeping(self.model)
            cast = self._casts is not None and not self._islands()  # bf16-mixed's fp32 convolutions read them
            for p in (*(() if self._folded_runs() else own), *folded):
                if cast and served(p) and not any(p is q for q in folded):
                    continue  # its cast is made channels-last (CastCache.channels_last)
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    data = p.data
                    if in_place and any(p is q for q in folded):
                        self._saved.append((p, None))
                        p.data = data.contiguous(memory_format=torch.channels_last)
                    else:
                        self._saved.append((p, data))
                        p.data = channels_last_data(self.model, p, data)  # kept across a dataset run's calls
                    del data
            if copies_made() != made:  # a copy made: those of parameters gone (an old folded copy's) dropped
                keep_only(self.model, (*own, *folded))
        else:
            self._restore()
        self.channels_last = channels_last

    @contextmanager
    def casts_kept(self) -> Iterator[None]:
        """Each weight cast to bf16 once for all the passes of the call (a CPU bf16 ``precision``, eager): the call's
        :class:`salience._core.casts.CastCache`, which :meth:`autocast` hands to a
        :class:`salience._core.casts.WeightCasts` mode in each pass (thread-local; the parameters, the model's and the
        folded copy's, untouched: their ``requires_grad`` stays as the guard set it). Every pass cast every weight
        again before (autocast keeps a cast only of a leaf that requires gradients, out of ``torch.inference_mode``,
        within one block): resnet50, 55 copies per pass, ``aten._to_copy`` counted. Gradient passes and gradient-free
        ones alike (the copies are detached: no graph holds the weights). Not with ``compile`` (a compiled graph
        casts in itself), not on CUDA (not measured there). The copies are dropped as the call leaves."""
        if self._casts is not None or not _caches_casts(self):
            yield
            return
        # entered channels-last (no caller does today): the parameters set_layout converted without a cache are put
        # back first, then the layout is set again through the cache (the served ones stay as they are, their casts
        # channels-last), as if entered contiguous; before session 47 the converted float32 copies stayed beside the
        # casts (set_layout returned at once: the same layout)
        cl = self.channels_last
        if cl:
            self.set_layout(False)
        cache = self._casts = CastCache(self.dtype)
        try:
            if cl:
                self.set_layout(True)
            yield
        finally:
            self._casts = None
            cache.clear()  # a traceback the caller keeps holds the passes' modes, and so this cache
            if self.channels_last:  # left channels-last: the served parameters are the user's, as they were; the next
                self.set_layout(False)  # chunk's layout (Run.chunk) converts them, with no cache to serve them

    def _folded_runs(self) -> bool:
        """Whether every pass from now on runs the folded copy (:meth:`forward_fn`): ``plain_passes``, and no final
        softmax to strip (an eager pass showed none, or the passes keep it: ``strip_softmax=False``)."""
        if not self.plain_passes or self._folded is None:
            return False
        return not self.strip_softmax or (self.softmax_checked and not self.softmax_stripped)

    def probe_layout(self) -> bool:
        """The layout of the first, probing chunk (which runs the model itself): with no folded copy, channels-last
        where the run's ``memory_format`` is (a contiguous bf16 pass took twice a channels-last one's time on resnet50;
        a hooked run's, Ablation-CAM's, ran contiguous before its channels-last chunks: its bf16 weight copies made
        once more, its heap grown by 98 MiB, and under ``chunks="throughput"`` its first chunk's scores from other
        kernels than every later chunk's); else contiguous (with a folded copy the model's parameters are left as they
        are, :meth:`set_layout`; ``"auto"`` times both layouts after the probe)."""
        return self._folded is None and self.options.memory_format == "channels_last"

    def _restore(self) -> None:
        """Put the parameters :meth:`set_layout` converted back; each one is dropped from the list once it is back, so
        that a second try (:func:`close_run`, after an exception here) puts back the rest."""
        while self._saved:
            p, data = self._saved[-1]
            p.data = p.data.contiguous() if data is None else data
            self._saved.pop()

    def close(self) -> None:
        self._restore()
        self.channels_last = False
        if self.softmax_checked:  # kept for the model's structure (Run.__init__ forgets it when it changed)
            self.record.softmax = self.softmax_stripped

    def reused_probe(self, n_images: int) -> Optional[int]:
        """The bytes per item an earlier call's memory probe (its pass, eager) measured for this
        model, tag, item shape, options and number of images, when this run may skip its own
        probe: with ``compile`` (``True``, :data:`FREEZE`, a backend) only, once the final softmax is known too (``None``: probe).
        Then every chunk is one of the fixed size and runs the compiled model (the frozen graphs):
        SmoothGrad's 64 items at 4 images ran 9 chunks (4 eager, 7 x 8 frozen, 4 eager), now 8 x 8
        frozen; with ``compile=True`` (session 45) SmoothGrad 16 at 1 image ran 1 eager, 8 compiled, 7
        eager in every call, now 8, 8 compiled. Kept per :func:`structure` with the softmax answer. Only a probe of
        the same number of images, as the eager options' (:meth:`known_probe`): the bytes per item, and so the
        chunks (:func:`~salience._core.engine.gradient_chunk_cap` compares them with the weights) and the bits,
        depend on it; the last probe of any number of images (before session 47) gave a call other chunks after
        another call history."""
        if self.options.backend is None or not self.softmax_checked:
            return None
        return self.record.probes.get(n_images)

    def known_probe(self, n_images: int) -> Optional[int]:
        """The bytes per item that an earlier call's memory probe measured for this model, tag, item shape,
        options and number of images (``None``: probe). The engine then plans its chunks from it without the
        probe: with ``chunks="memory"`` the same chunks, so the same bits, as the probing call (whose probe was
        a pass of its own, thrown away; session 45: before, every call ran a first chunk of one copy of each
        image, the probe's, to keep the bits); without the probe's cost (a Python dispatch mode that sees every operator of the forward and backward
        passes: SmoothGrad 8 on resnet50 at 16 px took 160 ms with it against 98 ms with a fixed chunk on this
        CPU; on a GPU, where a pass costs its kernels' launches, more). Kept per :func:`structure`."""
        return self.record.probes.get(n_images)

    def probed(self, per_item: int, n_images: int, block: Optional[int] = None) -> None:
        """Record what this run's memory probe measured (bytes per item; ``block``: the largest single block a pass
        allocated per item, :meth:`probed_block`) for a call of ``n_images`` images, for :meth:`reused_probe` and
        :meth:`known_probe`."""
        self.record.blocks[n_images] = block
        self.record.probes[n_images] = per_item

    def probed_block(self, n_images: int) -> Optional[int]:
        """The largest single block per item the memory probe of :meth:`known_probe` (or :meth:`reused_probe`) saw
        (``None``: none recorded): the engine keeps a CPU gradient chunk's blocks under glibc's mmap threshold
        (:func:`~salience._core.engine.mmap_chunk_cap`), so a call that reuses the probe plans the same chunks."""
        return self.record.blocks.get(n_images)

    # ---- what a chunk runs under

    @contextmanager
    def chunk(self, channels_last: bool, compiled: bool) -> Iterator[None]:
        self.set_layout(channels_last)
        self._compiled_now = compiled and self._compiled_fn is not None
        self._frozen_only, self._tail_next = self._tail_next and self._compiled_now, False
        self._used_compiled = self._used_folded = self._used_frozen = False
        token = _active.set(_active.get() + (self,))
        try:
            yield
        finally:
            _active.reset(token)
            self._compiled_now = self._frozen_only = False
            self.layouts.append(("channels_last" if channels_last else "contiguous")
                                + (" folded" if self._used_folded else "")
                                + (" compiled" if self._used_compiled else "")
                                + (" frozen" if self._used_frozen else ""))

    @property
    def compiling(self) -> bool:
        """Whether the chunk running now may run the compiled model (a chunk of the one fixed size):
        a method whose passes could change shape within a chunk keeps them at the chunk's size then."""
        return self._compiled_now

    def prepare(self, x: Tensor) -> Tensor:
        """The input of a pass in the run's layout (always the same strides, so that a compiled
        graph is not recompiled for an input that broadcasting happened to lay out otherwise)."""
        if x.dim() != 4:
            return x
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def autocast(self) -> Any:
        """The run's autocast (``precision``), or nothing for fp32; with the JIT's optimized execution off in this
        thread (:func:`_scripted_autocast`): TorchScript runs in the passes wherever the model calls it, a scripted
        submodule or a scripted function (no module says so), and the flag is the JIT's alone."""
        if self.dtype is None:
            return contextlib_null()
        modes: list = []
        if self._casts is not None and not self._compiled_now:  # first: it sees each call last, as autocast will run it
            modes.append(WeightCasts(self._casts))
        if self._strided_attention():
            modes.append(ContiguousAttention())
        if self._islands():
            modes.append(HighResolutionFp32(self.device.type, self._item_shape))
        return _scripted_autocast(self.device.type, self.dtype, *modes)

    def _strided_attention(self) -> bool:
        """Whether an eager pass under this run's autocast hands ``nn.MultiheadAttention`` contiguous inputs
        (:mod:`salience._core.strided`): a CPU bf16 autocast, a model holding one (asked once per run), not a compiled
        chunk (the compiled graph is inductor's own)."""
        if self.dtype is not torch.bfloat16 or self.device.type != "cpu" or self._compiled_now:
            return False
        if self._holds_attention is None:
            self._holds_attention = holds_attention(self.model)
        return self._holds_attention

    def forward_fn(self, plain: bool, strip_softmax: bool) -> Optional[Callable]:
        """What runs a plain pass (no hooks, no interception modes) once an eager pass showed no
        final softmax to strip: the compiled model (of the folded copy, when folding) in a chunk
        that may run compiled, else the folded copy; ``None``: run the model itself eagerly."""
        if not plain or (not self._compiled_now and self._folded is None):
            return None
        if strip_softmax and (not self.softmax_checked or self.softmax_stripped):
            return None
        return self._compiled_fn if self._compiled_now else self._folded

    def frozen_for(self, fn: Callable) -> Optional[Callable]:
        """The frozen graph to run instead of ``fn`` (from :meth:`forward_fn`), or ``None``: only for
        the compiled model, in a pass without gradients (``torch.no_grad`` / ``inference_mode``) that
        is not to share the gradient passes' graph (``gradient_graph``)."""
        if fn is None or fn is not self._compiled_fn or self._frozen_fn is None:
            return None
        if torch.is_grad_enabled() or self.gradient_graph:
            return None
        return self._frozen_fn

    def folded_now(self) -> None:
        """Before a pass of the folded copy: the first in a run whose every pass runs it (:meth:`_folded_runs`) drops
        the call's kept casts (:meth:`casts_kept`), which are the model's own weights' from the first, probing pass
        (the model itself) and are not used again: 49 MiB of bf16 on resnet50, held beside the folded copy (whose
        convolutions' and linear layers' weights are in the passes' precision already, nothing of them cached; under
        ``bf16-mixed`` on images the copy is float32 and its own casts are cached from here on)."""
        if not self._dropped_casts and self._casts is not None and self._folded_runs():
            self._dropped_casts = True
            self._casts.clear()

    def ran(self, fn: Callable) -> None:
        """Record that this chunk's pass ran ``fn`` (from :meth:`forward_fn` or :meth:`frozen_for`)."""
        if fn is self._folded:
            self._used_folded = True
        else:
            self._used_compiled = True
            self._used_folded = self._folded is not None
            self._used_frozen = self._used_frozen or fn is self._frozen_fn

    def frozen_gradient(self, strip_softmax: bool, unwrap: Optional[Callable[[Any], Tensor]] = None) -> Optional[Callable]:
        """The frozen input-gradient function (:func:`_frozen_gradient`) for a plain gradient pass of
        this chunk, or ``None``: only with ``compile="freeze"`` in a chunk that runs the compiled model
        (:meth:`forward_fn`: an eager pass showed no final softmax to strip), without autocast."""
        if self._frozen_base is None or self._weights_key is None or self.dtype is not None:
            return None
        fn = self.forward_fn(True, strip_softmax)
        if fn is None or fn is not self._compiled_fn:
            return None
        got = _frozen_gradient(self._frozen_base, self._weights_key, self.structure, unwrap)
        return None if isinstance(got, Exception) else got

    def gradient_failed(self, error: BaseException) -> None:
        """The frozen gradient function raised: not tried again in this process until the model's
        :func:`structure` changes (:class:`_Frozen`); this pass and the next run the compiled model
        with autograd."""
        self._frozen_failed(_GRADIENT, "the frozen input-gradient graph", error,
                            "the gradient passes run the compiled model without freezing")

    def _frozen_failed(self, kind: str, what: str, error: BaseException, instead: str) -> None:
        """Remember that the frozen graph ``kind`` (``FREEZE``, ``_GRADIENT``) of the model failed with
        ``error`` (dynamo's ``BackendCompilerFailed``: the compiler's own error is named), and warn."""
        cause = getattr(error, "inner_exception", None)
        why = f"{what} failed on this model ({_described(cause or error)})"
        with _lock:
            _store((id(self._frozen_base), kind), (self._frozen_base, SalienceError(why),
                                                   _Frozen(self._weights_key, self.structure, None, None)))
        warnings.warn(f"compile={FREEZE!r}: {why}; {instead} (the results are the same, only slower)",
                      stacklevel=user_stacklevel())

    def forward_failed(self, fn: Callable, error: BaseException) -> None:
        """``fn`` (from :meth:`forward_fn` or :meth:`frozen_for`) raised: never run it again in this
        process (the frozen graph: until the model's :func:`structure` changes)."""
        if fn is self._frozen_fn and self._frozen_base is not None:
            self._frozen_failed(FREEZE, "torch.compile with freezing", error,
                                "the passes without gradients run without freezing")
            self._frozen_fn = None
            return
        if fn is not self._folded:
            self.compile_failed(error)
            return
        why = f"the folded copy failed ({_described(error)})"
        fold_failed(self.model, self._folded, why)  # in its own entry (bf16-mixed's float32 copy has one)
        warnings.warn(f"fold_batchnorm: {why}; running the model as it is", stacklevel=user_stacklevel())
        self._folded = None

    def note_softmax(self, stripped: bool) -> None:
        """An eager pass stripped a final softmax (or found none to strip). The first such note of a run that took an
        earlier call's answer replaces it: a softmax a flag of the forward turned off since (no change of
        :func:`structure`) left the answer "stripped" for good before session 47, and every later ``compile`` or
        ``fold_batchnorm`` call ran eagerly (:meth:`forward_fn`; the maps right, the options unused). One turned on is
        seen by the copy's or graph's first output (:func:`~salience._core.autograd.softmax_appeared`)."""
        if self._softmax_taken:
            self._softmax_taken = False
            self.softmax_stripped = stripped
        else:
            self.softmax_stripped = self.softmax_stripped or stripped
        self.softmax_checked = True

    def compile_failed(self, error: BaseException) -> None:
        why = f"torch.compile failed on this model ({_described(error)})"
        _compile_failed(self._folded if self._folded is not None else self.model, self.options.backend, why,
                        self.structure)
        self._compiled_fn = None
        self._compiled_now = False

    # ---- the plan: each chunk's size and layout

    def plan(self, remaining: int, start_size: int, cap: int, fixed: bool, per_item_bytes: Optional[int]) -> tuple[int, bool, bool]:
        """``(size, channels_last, compiled)`` of the next chunk: probes first (until decided), then
        the decision. ``start_size``: the first size tried (the batch size); ``cap``: the largest size
        the memory budget allows; ``fixed``: the size was given (no size probe)."""
        rec, opt = self.record, self.options
        layout = self._layout_choice(per_item_bytes)
        if layout is None:  # probe: the two layouts alternately at the start size, two chunks each
            s = min(start_size, cap)
            n_cl, n_ct = len(rec.samples.get((s, True), ())), len(rec.samples.get((s, False), ()))
            if n_cl >= 2 and n_ct >= 2:
                rec.layout = rec.t(s, True) < LAYOUT_GAIN * rec.t(s, False)
                layout = rec.layout
            else:
                self._probing = s <= remaining  # a chunk cut short by the end is no sample
                return min(s, remaining), n_ct > n_cl, False
        self._probing = False
        if fixed or opt.chunks == "memory":
            size = cap
        elif opt.backend is not None:
            size = rec.size if rec.size is not None else cap
        else:
            size = self._size_choice(layout, min(start_size, cap), cap)
            # A chunk cut short by the end of the items is no sample: it is not the size planned,
            # and counting it under its own size could give a size more timings than the one it is
            # compared with (the minimum of more timings is lower: an unfair comparison).
            self._probing = rec.size is None and size <= remaining
        size = min(size, remaining)
        full = rec.size if (rec.size is not None and not fixed and opt.chunks != "memory") else cap
        compiled = opt.backend is not None and size == full
        if not compiled and size == remaining and self._frozen_base is not None and self._frozen_tail(size):
            compiled = self._tail_next = True  # the last, shorter chunk: the frozen graphs only
        return size, layout, compiled

    def _frozen_tail(self, size: int) -> bool:
        """compile="freeze": whether a last chunk of ``size`` items, shorter than the fixed size, runs
        the frozen graphs (a graph of its own size: the same function, so the same maps up to
        rounding). Only a size that recurs in the weights' state: from its second call with the same
        :func:`weights_key` on (a size seen once costs a compile and is never run again; a model whose
        weights change between calls, a training loop that explains every epoch, compiled a tail graph
        for every state and ran it once), at most :data:`FROZEN_TAILS` sizes per record and
        :data:`FROZEN_TAILS_PER_MODEL` per model (its graphs share dynamo's recompile limit). Items are not padded
        to the fixed size instead: whether the padding changes the real items' results (a model that
        mixes the items of a batch) cannot be told without the eager pass, and a chunk of the fixed
        size costs about 1.5x an eager chunk of half its size (docs/performance.md, "Chunks")."""
        rec = self.record
        with _lock:
            again = rec.tails.get(size) == self._weights_key
            rec.tails[size] = self._weights_key
            if not again:
                return False
            if size in rec.frozen_tails:
                return True
            if len(rec.frozen_tails) >= FROZEN_TAILS:
                return False
            held = _model_tails.get(id(self.model))
            if held is None or held[0]() is not self.model:
                held = _model_tails[id(self.model)] = (weakref.ref(self.model), [])
            graph = (self._item_shape, size)
            if graph not in held[1]:
                if len(held[1]) >= FROZEN_TAILS_PER_MODEL:
                    return False
                held[1].append(graph)
            rec.frozen_tails.append(size)
            return True

    def _layout_choice(self, per_item_bytes: Optional[int]) -> Optional[bool]:
        mf = self.options.memory_format
        if mf != "auto":
            return mf == "channels_last"
        if self.record.layout is not None:
            return self.record.layout
        small = per_item_bytes is not None and per_item_bytes < SMALL_ITEM_BYTES
        if not self.convolutional or small or self.options.backend is not None:
            return False  # not measured: compiled graphs are fixed to a layout, and not cached as a decision
        return None

    def _size_choice(self, cl: bool, start: int, cap: int) -> int:
        """Hill-climb on seconds per item in layout ``cl``: double while 3% faster, else (from the
        start) halve. Each size is timed :data:`SIZE_SAMPLES` times (chunks in a row) and sizes are
        compared by their fastest timing; only timings in layout ``cl`` count (the other layout's,
        from the layout probe, time other work)."""
        rec = self.record
        if rec.size is not None:
            return rec.size
        if rec.best is None:
            rec.best = start
        if rec.n(rec.best, cl) < SIZE_SAMPLES:
            return rec.best
        while True:
            cand = rec.best // 2 if rec.down else rec.best * 2
            if (cand > cap) if not rec.down else (cand < 1):
                cand = 0
            if cand and rec.n(cand, cl) < SIZE_SAMPLES:
                return cand
            if cand and rec.t(cand, cl) < SIZE_GAIN * rec.t(rec.best, cl):
                rec.best = cand
                continue
            if not rec.down and rec.best == start and start > 1:
                rec.down = True
                continue
            rec.size = rec.best
            return rec.size

    @property
    def measuring(self) -> bool:
        """Whether the chunk the run planned last is timed for the run's choices (chunk size, layout): the engine
        reads :meth:`clock`, which on a GPU synchronizes the device, only then (a warm call times nothing)."""
        return self._probing

    def measured(self, size: int, channels_last: bool, seconds: float) -> None:
        """Record a chunk's time (while the choices are still being measured)."""
        rec = self.record
        if not self._probing:
            return
        rec.samples.setdefault((size, channels_last), []).append(seconds / size)

    def clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _caches_casts(run: Run) -> bool:
    """Whether ``run`` keeps its weight casts for the call (:meth:`Run.casts_kept`): a CPU bf16 autocast, eager."""
    return run.dtype is torch.bfloat16 and run.device.type == "cpu" and run.options.backend is None


@contextmanager
def _scripted_autocast(device_type: str, dtype: torch.dtype, *modes: Any) -> Iterator[None]:
    """``torch.autocast`` with the JIT's optimized execution off in this thread (``torch.jit.optimized_execution(
    False)``, a thread-local flag, put back after), for the TorchScript a model may run: a scripted model or
    submodule, or a scripted function its Python forward calls (a model without any is not affected). The optimized
    executor keeps one backward graph per scripted function with the first autocast dtype's casts in it: the same
    process's fp16 gradient pass after a bf16 one (or bf16 after fp16) failed with TorchScript's raw "expected m1
    and m2 to have the same dtype, but got: c10::Half != c10::BFloat16" (torch's own, without salience).
    Unoptimized, each pass casts as eager autocast does: any order of precisions works, at the cost of the JIT's
    fusions. ``modes``: torch function modes entered inside the autocast, in order (the last one sees a call
    first): :class:`salience._core.strided.ContiguousAttention`, ``precision="bf16-mixed"``'s
    :class:`salience._core.islands.HighResolutionFp32`."""
    with torch.jit.optimized_execution(False), torch.autocast(device_type=device_type, dtype=dtype), ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield


@contextmanager
def contextlib_null() -> Iterator[None]:
    yield


def _recompile_limit_raises() -> Any:
    """Inside it, a compiled call that hits dynamo's recompile limit raises instead of what dynamo does
    by default: log one line and run that code object eagerly for the rest of the process, so a
    ``compile=True`` run compiled nothing without a word. (The limit is per code object: every
    instance of a model class shares it, and layouts, autocast and shapes each add a graph.) The
    error falls back to eager with :func:`_compile_failed`'s warning, and this model is not compiled
    again. A torch without the option: dynamo's own behaviour."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "fail_on_recompile_limit_hit"):
        return contextlib_null()
    return _shared_setting(config, "fail_on_recompile_limit_hit", True)


def forward_call(model: nn.Module, x_in: Tensor, plain: bool, strip_softmax: bool,
                 eager: Callable[[], Any]) -> tuple[Any, bool]:
    """Run one pass's forward: the compiled model when the active run allows it, else ``eager()``;
    under the run's autocast. Returns ``(output, compiled)``."""
    run = active(model)
    if run is None:
        return eager(), False
    with ExitStack() as stack:
        stack.enter_context(run.autocast())
        fn = run.forward_fn(plain, strip_softmax)
        frozen = run.frozen_for(fn)
        if frozen is not None:
            fn = frozen
        elif fn is not None and fn is run._compiled_fn and run._frozen_only:
            fn = run._folded  # a last, shorter chunk: only the frozen graphs take its size
        if fn is not None:
            try:
                if fn is not run._folded:
                    stack.enter_context(_recompile_limit_raises())
                    if frozen is not None:
                        stack.enter_context(_freezing_on())
                    elif run.gradient_graph and not torch.is_grad_enabled():
                        x_in = _as_gradient_pass(stack, x_in)
                if fn is run._folded:
                    run.folded_now()
                with _observers_aside(model) as (pre, post):
                    for hook in pre:
                        hook(model, (x_in,))
                    out = fn(x_in)
                    for hook in post:
                        hook(model, (x_in,), out)
                run.ran(fn)
                return out, True
            except Exception as e:  # noqa: BLE001 - any compiler (or folded copy) failure falls back to eager
                if isinstance(e, SalienceError):
                    raise
                run.forward_failed(fn, e)
        return eager(), False


def _as_gradient_pass(stack: ExitStack, x_in: Tensor) -> Tensor:
    """The state a gradient pass runs the compiled model in (:func:`salience._core.autograd.backward`:
    gradients on, outside inference mode, the input a leaf that requires grad), entered on ``stack``;
    returns that input. Dynamo guards on the grad mode and on the input's ``requires_grad``: a pass
    without them compiles a graph of its own (another compile, and one more towards the recompile
    limit). The values are those of the pass; the caller detaches the output."""
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return (x_in.clone() if x_in.is_inference() else x_in).detach().requires_grad_(True)


def gradient_call(model: nn.Module, x_in: Tensor, target: Any, strip_softmax: bool,
                  unwrap: Optional[Callable[[Any], Tensor]] = None) -> Optional[tuple[Any, Tensor]]:
    """A plain gradient pass (no layer hooked, no backprop rule, one class target) through the frozen
    input-gradient graph (:func:`_frozen_gradient`) when the active run has one (``compile="freeze"``):
    ``(output, gradient of the target's summed scores w.r.t. x_in)``; ``None``: run the pass as before
    (also when the graph fails, with a warning, :meth:`Run.gradient_failed`). The classes' range is not
    checked here: the caller scores the output with the target itself, which refuses a bad class.

    ``unwrap``: what takes the score tensor from what the model returns (a dict, a Hugging Face
    ``ModelOutput``: the caller's rule of outputs, traced into the graph; ``None``: the output is the
    tensor), compared by ``==`` to the one the cached graph was made with; the output returned is
    that tensor."""
    run = active(model)
    if run is None or not run.options.freeze:
        return None
    if torch._C._is_torch_function_mode_enabled():
        return None  # a mode of the caller's (a backprop rule around vanilla) may change the gradient
    # None: a target of another kind (the frozen gradient graph computes class scores only)
    classes = target_classes(target, int(x_in.shape[0]))
    if classes is None:
        return None
    fn = run.frozen_gradient(strip_softmax, unwrap)
    if fn is None:
        return None
    x = x_in.detach()
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(_recompile_limit_raises())
            stack.enter_context(_freezing_on())
            with _observers_aside(model) as (pre, post):
                grad, out = fn(x, classes.to(x.device))
                for hook in pre:  # observers only: told of the pass once it ran
                    hook(model, (x_in,))
                for hook in post:
                    hook(model, (x_in,), out)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the pass runs as before
        if isinstance(e, SalienceError):
            raise
        run.gradient_failed(e)
        return None
    run._used_compiled = run._used_frozen = True
    run._used_folded = run._folded is not None
    return out, grad


@contextmanager
def _observers_aside(model: nn.Module) -> Iterator[tuple[list, list]]:
    """The model's :func:`observer` hooks (forward pre-hooks, forward hooks), taken off the model for
    the block: a pass a copy or a compiled graph runs calls them itself, outside the copy (which does
    not call the model's hooks) and outside the graph (which would trace them, and break on their
    Python, when it compiles the model with its hooks), as the model's own call would have: a dataset
    run reads the output of the method's pass, the explorer counts passes. Only observers can be
    there: a hook of the user's keeps the copies from running (:func:`own_hooks`)."""
    taken = []
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        ids = [k for k, h in hooks.items() if getattr(h, "salience_observer", False)]
        taken.append([(k, hooks.pop(k)) for k in ids])
    try:
        yield [h for _, h in taken[0]], [h for _, h in taken[1]]
    finally:
        for hooks, pairs in zip((model._forward_pre_hooks, model._forward_hooks), taken):
            for k, h in pairs:
                hooks[k] = h


def _allocator(options: Performance, device: Any) -> None:
    """Before a pass on a CPU, once per process: ``allocator="reuse"`` fixes glibc's thresholds, not undone
    (:func:`salience._core.malloc.keep_freed_memory`); ``"default"`` raises glibc's dynamic mmap threshold as the
    process's first free of a large block would, thresholds left adjusting, unless the process started with glibc's
    own threshold settings (:func:`salience._core.malloc.raise_dynamic_threshold`; docs/performance.md, session 48);
    ``"system"`` nothing (the C allocator exactly as the process has it). Nothing elsewhere than glibc."""
    if getattr(device, "type", None) != "cpu":
        return
    if options.allocator == "reuse":
        keep_freed_memory()
    elif options.allocator == "default":
        raise_dynamic_threshold()


def before_pass(x: Any) -> None:
    """What the options in force ask before any pass of a model on ``x`` (:func:`salience._core.autograd.model_call`,
    which every pass salience runs goes through: one-pass methods, the CAMs', a dataset run's prediction, the
    metrics'): on a CPU, ``allocator="reuse"``'s fixed thresholds, or under the default glibc's dynamic threshold
    raised once per process (session 48; :func:`_allocator`); nothing under ``"system"``."""
    _allocator(current(), getattr(x, "device", None))


def changes_single_pass(options: Performance) -> bool:
    """Whether ``options`` change how a single pass runs (``"auto"`` layouts are chosen by measuring
    chunks: a single pass runs contiguous under it); a method that runs its own single passes as a run's chunk
    (:func:`salience.methods.class_model`'s steps) asks it, as :func:`one_pass` does."""
    return (options.memory_format == "channels_last" or options.backend is not None
            or options.precision != "fp32" or options.fold_batchnorm)


def _compiles(rec: _Record, sizes: _Record, x: Tensor) -> bool:
    """Whether a one-pass call of ``x``'s batch size may run compiled: the size is one of those
    compiled (``sizes.compiled``, shared by the tags whose passes share the graphs), or this tag
    (``rec``) has now seen it with a second input and fewer than :data:`ONE_PASS_SIZES` are compiled.
    A call on the same tensor as the tag's call before is not another input: a dataset run's
    one-pass methods (vanilla, then input x gradient) on one batch count once, so its last,
    shorter batch stays eager. A recurring size refused for the cap runs eagerly; the first such
    refusal warns, naming the sizes compiled."""
    n = int(x.shape[0])
    with _lock:
        again = rec.last is not None and rec.last() is x
        rec.last = weakref.ref(x)
        if not again:
            rec.seen[n] = rec.seen.get(n, 0) + 1
        if n in sizes.compiled:
            return True
        if rec.seen[n] < 2:
            return False
        if len(sizes.compiled) < ONE_PASS_SIZES:
            sizes.compiled.append(n)
            return True
        warn, sizes.refused = not sizes.refused, True
        have = ", ".join(map(str, sizes.compiled))
    if warn:
        warnings.warn(f"compile: batch size {n} recurs on this model (input {tuple(x.shape[1:])}), but batch sizes "
                      f"{have} are compiled already, the most a model keeps (ONE_PASS_SIZES = {ONE_PASS_SIZES}: "
                      "each is a graph, and dynamo compiles a model class at most 8 times); calls of any other size "
                      "run eagerly (the same results); salience._core.perf.clear_cache() forgets the sizes, "
                      "torch._dynamo.reset() the graphs", stacklevel=user_stacklevel())
    return False


@contextmanager
def one_pass(model: nn.Module, x: Tensor, *, tag: str, gradient_graph: bool = False) -> Iterator[Optional[Run]]:
    """A single pass on ``model`` (a one-pass method's input gradient, a dataset run's prediction)
    under the options in force (:func:`current`), as one chunk of a :class:`Run`; yields the run.

    Nothing changes (``None`` is yielded) inside a run already active on the model (the chunk of a
    many-pass method decides) or when the options run a single pass as it is (the defaults, and
    ``memory_format="auto"``, which is measured only over a many-pass call's chunks). Else the block
    is one chunk: the model's layout (channels-last), autocast, and for a plain pass (no layer
    hooked, no backprop rule) the folded copy or the compiled model. What the passes learn is kept
    in the model's record (per ``tag``, input shape and options), so that calls in a row (a dataset
    run's batches) share it: whether the model ends in a softmax (found by the first eager pass of
    the model's :func:`structure`; later passes may run a copy or a graph), and how many inputs of
    each batch size it was called on (:func:`_compiles`: a size runs compiled from its second input
    on, at most :data:`ONE_PASS_SIZES` sizes for all tags together; a size seen once, e.g. a probe or
    a dataset run's last, shorter batch, runs the folded copy or the model eagerly, so nothing
    recompiles from batch to batch).

    ``gradient_graph``: the block's pass is one without gradients (a dataset run's prediction pass)
    that runs the compiled model as the gradient passes do (gradients on, the input requiring them),
    so that it and the one-pass methods' input gradients of the same batch size share one compiled
    graph instead of compiling a graph of each (the forward's values are the same; it keeps the
    activations until the output is dropped)."""
    options = current()
    if active(model) is not None or not changes_single_pass(options):
        yield None
        return
    run = Run(model, x, options, tag=tag)
    run.gradient_graph = gradient_graph
    rec = run.record
    if rec.softmax is not None:
        run.softmax_checked, run.softmax_stripped = True, rec.softmax
    compiled = run._compiled_fn is not None and _compiles(rec, _record(model, x, options, _ONE_PASS), x)
    try:
        with run.chunk(options.memory_format == "channels_last", compiled):
            yield run
    finally:
        if run.softmax_checked:
            rec.softmax = run.softmax_stripped
        close_run(run)
