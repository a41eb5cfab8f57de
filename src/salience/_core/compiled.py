"""The process's compiled models (``compile=True``, a backend, :data:`FREEZE`; :mod:`salience._core.perf`):
the ``torch.compile`` of a model, the frozen graphs of ``compile="freeze"`` (forward and input gradient, kept
for the weights' state, :func:`weights_key`) and their cache (``_compiled``, least recently used evicted,
dynamo's graphs of a dropped frozen entry released).

Apart from :mod:`salience._core.perf`, which decides when a pass runs them (:class:`~salience._core.perf.Run`,
:func:`~salience._core.perf.forward_call`, :func:`~salience._core.perf.gradient_call`), because compiling and
caching the graphs is a job of its own; it imports :mod:`~salience._core.fingerprint`, never perf. A test that
replaces a function of this module (``_freeze_compile``) patches it here: perf's re-exported name is not the
one this module's functions call.
"""
from __future__ import annotations

import threading
import types
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError, suggest, user_stacklevel
from salience._core.fingerprint import _fold_key, _lock

__all__ = ["FREEZE", "compile_unavailable", "weights_key"]

# compile=FREEZE: torch.compile with inductor, and for the passes that need no gradient (under
# torch.no_grad / inference_mode) a graph compiled with inductor's ``freezing`` (the parameters and
# buffers taken as constants: BatchNorm folded, convolution weights prepacked), kept for the weights'
# identities and version counters (:func:`_frozen_model`).
FREEZE = "freeze"

_compiled: "OrderedDict[tuple[int, Any], tuple[nn.Module, Any, tuple]]" = OrderedDict()
# entries kept for the process (each holds its model): a model under compile=FREEZE takes three (the plain
# compiled model, the frozen forward, the frozen gradient graph); at 4, two such models explained in turn
# evicted each other's frozen graphs, and every call compiled them again
_COMPILED_KEEP = 6


def _check_backend_name(name: str) -> None:
    """Refuse a backend name torch.compile does not know (a raw ``InvalidBackend`` from the first run
    before); where dynamo cannot be imported, :func:`compile_unavailable` says so at the run."""
    try:
        import torch._dynamo as dynamo

        known = dynamo.list_backends(exclude_tags=())
    except Exception:  # noqa: BLE001 - no dynamo: the run warns and runs eagerly
        return
    if name not in known:
        raise SalienceError(f"compile={name!r} is not a torch.compile backend{suggest(name, [*known, FREEZE])} "
                            f"(torch._dynamo.list_backends() lists them; True is inductor, {FREEZE!r} inductor with "
                            "freezing for the passes without gradients)")


def compile_unavailable(backend: Any, device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` with ``backend`` cannot run here, or ``None`` when it can."""
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # noqa: BLE001 - any import failure means no compiler
        return f"torch._dynamo cannot be imported ({type(e).__name__}: {e})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if backend == "inductor":
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "inductor on CUDA needs triton, which is not installed"
        elif device.type == "cpu":
            import shutil

            from torch._inductor import config as ind_config

            cxx = ind_config.cpp.cxx
            names = [c for c in (cxx if isinstance(cxx, tuple) else (cxx,)) if c]
            if names and not any(shutil.which(c) for c in names):
                return f"inductor on CPU needs a C++ compiler ({', '.join(map(str, names))}); none was found"
    return None


def _compiled_model(model: nn.Module, backend: Any, fingerprint: tuple) -> Any:
    """The process's compiled version of ``model`` for ``backend`` (an exception object if it failed),
    made again when the user's model's ``fingerprint`` (its :func:`~salience._core.fingerprint.structure`)
    is not the one it was made for (dynamo's guards see a changed module tree too; a failure is then
    tried again)."""
    key = (id(model), backend if isinstance(backend, str) else id(backend))
    with _lock:
        hit = _compiled.get(key)
        if hit is not None and hit[0] is model and hit[2] == fingerprint:
            _compiled.move_to_end(key)
            return hit[1]
        compiled = torch.compile(model, backend=backend, dynamic=False)
        _compiled[key] = (model, compiled, fingerprint)
        _evict()
        return compiled


def _freeze_compile(gm: Any, example_inputs: Any) -> Any:
    """What compiles a graph for :data:`FREEZE` (inductor, under :func:`_freezing_on`); a test puts a
    cheap compiler with the same property here (the weights taken as constants when compiled)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _freezing_backend(model: nn.Module) -> Callable:
    """A new torch.compile backend for a frozen graph of ``model``. Dynamo matches a cached graph to its
    backend by the backend's identity (an inductor backend with the same options counts as the same one),
    and a frozen graph guards on the parameters' identity, not their values: a new ``torch.compile`` of
    the model with ``freezing`` ran the stale graph after an in-place change. A new callable compiles anew.
    It watches the tensors the graph took as constants (:func:`_graph_constants`) but ``model``'s own
    parameters and buffers, whose state the entry is kept for already (:func:`weights_key`)."""

    watch: list = []
    owner = weakref.ref(model)

    def freezing(gm: Any, example_inputs: Any) -> Any:
        m = owner()
        own = {id(t) for t in (*m.parameters(), *m.buffers())} if m is not None else set()
        watch.extend(_graph_constants(gm, own))
        return _freeze_compile(gm, example_inputs)

    freezing.watch = watch  # type: ignore[attr-defined]
    return freezing


def _graph_constants(gm: Any, own: set[int]) -> list[tuple[Any, int, int]]:
    """``(weakref, data_ptr, _version)`` of each tensor dynamo's graph ``gm`` holds as an attribute (what
    a frozen graph takes as a constant) but those whose ``id`` is in ``own`` (the model's parameters and
    buffers, kept by :func:`weights_key`): a tensor a module keeps as a plain attribute,
    ``self.scale = torch.tensor(...)``, which :func:`weights_key` does not see; dynamo installs the
    module's own tensors there, not copies. A parameter watched here too had, after a channels-last call,
    another address: the run converts the 4-D weights for its chunks and puts the user's back as it
    ends (:meth:`~salience._core.perf.Run.set_layout`), so the next call found a constant "moved" and
    compiled the frozen graph again, at every call (session 45: ``memory_format="channels_last"`` with
    ``compile="freeze"``). A tensor without a version counter (an inference tensor) is not watched."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor) and id(obj) not in own and not obj.is_inference():
            out.append((weakref.ref(obj), obj.data_ptr(), obj._version))
    return out


def _constants_unchanged(backend: Any) -> bool:
    """Whether every tensor the graphs compiled by the frozen ``backend`` took as constants
    (:func:`_graph_constants`) is as it was then: none changed in place (its version) or moved. One
    that is gone was replaced (dynamo's guard on its identity traces the graph again)."""
    for ref, ptr, version in getattr(backend, "watch", ()):
        t = ref()
        if t is not None and (t.data_ptr() != ptr or t._version != version):
            return False
    return True


def _freezing_on() -> Any:
    """Inductor's ``freezing`` set for a call of a frozen model. ``torch.compile(...,
    options={"freezing": True})`` is not enough: the option is set only while inductor compiles, and
    dynamo, which reads it while tracing to take the parameters as constants, does not see it (the
    parameters stayed inputs of the graph). It is a process-wide setting, on only while the call runs."""
    from torch._inductor import config as ind_config

    return _shared_setting(ind_config, "freezing", True)


_settings_lock = threading.Lock()
_settings: dict[tuple[int, str], list] = {}  # (id(config), name) -> [calls inside, the value found]


@contextmanager
def _shared_setting(config: Any, name: str, value: Any) -> Iterator[None]:
    """``config.name = value`` while at least one call (of any thread) is inside, then the value the
    first one found. ``config.patch`` saves and restores per call: two threads' calls overlapping (A in,
    B in, A out, B out) turned the setting off under B's running call, and B put back the value it had
    found (on) for the rest of the process."""
    key = (id(config), name)
    with _settings_lock:
        held = _settings.get(key)
        if held is None:
            held = _settings[key] = [0, getattr(config, name)]
            setattr(config, name, value)
        held[0] += 1
    try:
        yield
    finally:
        with _settings_lock:
            held[0] -= 1
            if held[0] == 0:
                del _settings[key]
                setattr(config, name, held[1])


def weights_key(model: nn.Module) -> Optional[tuple]:
    """What a frozen graph of ``model`` is kept for: its :func:`structure` and each parameter's and
    buffer's ``(data_ptr, _version, shape, stride)`` (``None`` when a tensor has no version counter, one made under
    ``inference_mode``); with :func:`_constants_unchanged`, which watches the other tensors a frozen
    graph took as constants (a plain tensor attribute, ``self.scale = torch.tensor(...)``). An in-place change through the tensor (an optimizer step, ``load_state_dict``,
    ``w.copy_`` or ``w.mul_`` under ``no_grad``) raises its version, a new tensor (``w.data = ...``)
    has another address, a new view of the same storage (``w.data = w.data.t()``) other strides; a change through ``w.data`` in place (``w.data.mul_(2)``) is counted by no
    version counter (torch's own ``.data`` semantics) and is not seen."""
    return _fold_key(model)


def _frozen_model(model: nn.Module, key: tuple, shape: tuple) -> Any:
    """The process's frozen compiled ``model`` (an exception object if it failed for the user's model's
    structure ``shape``) for the weights' state ``key`` (:func:`weights_key`), compiled anew (a new
    backend: :func:`_freezing_backend`) when the key is not the one it was made for."""
    ck = (id(model), FREEZE)
    with _lock:
        hit = _frozen_hit(ck, model, key, shape)
        if hit is not None:
            return hit

        def forward(x: Tensor) -> Any:
            return model(x)

        backend = _freezing_backend(model)
        fn = backend.code_of = _own_code(forward)  # type: ignore[attr-defined]
        compiled = torch.compile(fn, backend=backend, dynamic=False)
        _store(ck, (model, compiled, _Frozen(key, shape, backend, None)))
        _evict()
        return compiled


class _Frozen(NamedTuple):
    """What a frozen entry of ``_compiled`` (``(model, graph or the exception it failed with, _Frozen)``,
    keyed ``(id(model), FREEZE)`` or ``(id(model), _GRADIENT)``) is kept for: the weights' state
    (:func:`weights_key`) and the user's model's :func:`structure`, the backend that compiled the graph
    (its :func:`_graph_constants` watched; ``None`` for a failure) and, for the gradient graph, the
    ``unwrap`` it traced. A graph is good for one weights' state; a failure for the structure (any
    weights, any ``unwrap``): a model that changes a buffer in its forward (a counter, in eval mode)
    has new weights at every call, and its graph, which fails to trace the change, was tried again
    and warned at every call."""

    key: Optional[tuple]
    structure: tuple
    backend: Any
    unwrap: Optional[Callable[[Any], Tensor]]


def _frozen_hit(ck: tuple, model: nn.Module, key: Optional[tuple], shape: tuple,
                unwrap: Optional[Callable[[Any], Tensor]] = None) -> Any:
    """The cached frozen entry ``ck``'s graph when it is still good for ``model`` in the weights' state
    ``key`` with ``unwrap``, or the exception it failed with for the structure ``shape``, else
    ``None``; under ``_lock``."""
    hit = _compiled.get(ck)
    if hit is None or hit[0] is not model:
        return None
    info = hit[2]
    if isinstance(hit[1], Exception):
        if info.structure != shape:
            return None
    elif info.key != key or not _constants_unchanged(info.backend) or info.unwrap != unwrap:
        return None
    _compiled.move_to_end(ck)
    return hit[1]


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own, for a frozen graph's ``torch.compile``. Dynamo keeps its
    graphs on the code object it compiled (each with its guards and, frozen, the weights as constants)
    and counts them towards its recompile limit (8) per code object: compiled anew for every change of
    the weights, the one ``gradient`` function (or the model class's ``forward``) kept every old frozen
    graph for the life of the process, and the 9th change hit the limit (every later call warned and
    ran unfrozen). A code object of its own has its own limit, and its graphs are freed with it when
    its entry leaves the cache (:func:`_release_graphs`; ``tests/test_freeze_gradients.py``)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


_GRADIENT = "freeze-gradient"  # the key of a frozen input-gradient graph in ``_compiled``


def _frozen_gradient(model: nn.Module, key: tuple, shape: tuple,
                     unwrap: Optional[Callable[[Any], Tensor]] = None) -> Any:
    """The process's frozen input-gradient function of ``model`` for the weights' state ``key``
    (:func:`weights_key`): ``fn(x, classes) -> (gradient, output)``, the gradient w.r.t. ``x`` of the
    sum over the batch of each item's ``classes`` score, as :func:`torch.func.grad` compiled under
    ``torch.no_grad`` (an exception object if it failed before for the user's model's structure
    ``shape``: :class:`_Frozen`).

    Inductor freezes only graphs compiled with grad mode off. With the parameters not requiring
    gradients the input gradient is a function of the input alone, and ``torch.func.grad`` (a function
    transform, not autograd's tape) computes it under an outer ``no_grad``: dynamo hands inductor one
    graph, forward and backward, with grad mode off, which inductor freezes (weights constants,
    BatchNorm folded, convolution weights prepacked). Dynamo takes a parameter as a graph constant
    only where it first meets it with grad mode off; inside ``func.grad`` grad mode is on, so the
    function walks the parameters and buffers first (without that, freeze() kept every weight an
    input and folded nothing: benchmarks/frozen_gradient.py). ``unwrap`` takes the scores from what the
    model returns (:func:`~salience._core.perf.gradient_call`); the function's output is that tensor."""
    ck = (id(model), _GRADIENT)
    with _lock:
        hit = _frozen_hit(ck, model, key, shape, unwrap)
        if hit is not None:
            return hit

        def gradient(x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
            for _ in model.parameters():
                pass
            for _ in model.buffers():
                pass

            def score(z: Tensor) -> tuple[Tensor, Tensor]:
                out = model(z) if unwrap is None else unwrap(model(z))
                scores = out.unsqueeze(1) if out.dim() == 1 else out
                # kept in range: a bad class is refused by the target after the call (gradient_call's
                # caller), not met by the graph's bounds check (a GPU's device-side assert)
                idx = classes.view(-1, 1).clamp(0, scores.shape[1] - 1)
                return scores.gather(1, idx).sum(), out

            return torch.func.grad(score, has_aux=True)(x)

        backend = _freezing_backend(model)
        fn = backend.code_of = _own_code(gradient)  # type: ignore[attr-defined]
        compiled = torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)
        _store(ck, (model, compiled, _Frozen(key, shape, backend, unwrap)))
        _evict()
        return compiled


def _evict() -> None:
    """Keep :data:`_COMPILED_KEEP` compiled models (the least recently used go); under ``_lock``."""
    while len(_compiled) > _COMPILED_KEEP:
        _release_graphs(_compiled.popitem(last=False)[1])


def _store(key: tuple, entry: tuple) -> None:
    """``_compiled[key] = entry``, the frozen graphs of the entry it replaces released; under ``_lock``."""
    old = _compiled.get(key)
    _compiled[key] = entry
    if old is not None and old is not entry:
        _release_graphs(old)


def _release_graphs(entry: tuple) -> None:
    """Free dynamo's graphs of a frozen entry of ``_compiled`` that is dropped (its weights changed, or
    evicted): dynamo keeps them on the entry's own code object (:func:`_own_code`), in a cycle the
    garbage collector does not see, each holding the old weights as constants; a compiled model of
    ``compile=True`` (the model class's code, shared) is left to dynamo."""
    info = entry[2]
    backend = info.backend if isinstance(info, _Frozen) else None
    fn = getattr(backend, "code_of", None) if getattr(backend, "watch", None) is not None else None
    if fn is not None:
        torch._dynamo.reset_code(fn.__code__)


def _compile_failed(model: nn.Module, backend: Any, why: str, fingerprint: tuple) -> None:
    key = (id(model), backend if isinstance(backend, str) else id(backend))
    with _lock:
        _compiled[key] = (model, SalienceError(why), fingerprint)
    warnings.warn(f"compile: {why}; running eagerly (the results are the same, only slower)",
                  stacklevel=user_stacklevel())
