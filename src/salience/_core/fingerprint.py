"""What salience's per-model process caches are kept for: a model's :func:`structure` (its modules,
instance ``forward`` methods and hooks of its own) and, with the weights' addresses and version counters,
:func:`_fold_key`; which hooks count (:func:`observer`, :func:`own_hooks`); and ``_lock``, the one lock of
those caches (:mod:`salience._core.perf`'s settings and measured choices, :mod:`~salience._core.compiled`'s
graphs, :mod:`~salience._core.folding`'s copies).

Apart from :mod:`salience._core.perf` because the compiled graphs, the folded copies, the measured choices
and :class:`~salience._core.perf.ModelCache` all key on these fingerprints: each of those modules imports
this one, and this one imports none of them.
"""
from __future__ import annotations

import functools
import operator
import threading
import weakref
from typing import Any, Callable, Optional

from torch import nn

__all__ = ["structure", "observer", "own_hooks", "one_walk", "walk_state", "close_walk", "walked", "end_walk"]

# The lock of the process state of perf, compiled and folding (one lock, as when they were one module).
_lock = threading.Lock()

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def structure(model: nn.Module) -> tuple:
    """A cheap fingerprint of ``model``'s structure: every module of the tree (its id and a weak reference to it,
    its class, its children's names, a ``forward`` set on the instance, the same way) and the keys of the hooks of
    its own on each (not :func:`observer` hooks, which a dataset run adds batch after batch, nor the hooks and
    instance ``forward`` salience holds for another thread's pass, :func:`~salience._core.autograd.this_thread`, which
    never run in this thread's). It changes when a module is replaced, added or removed (``model.fc =
    nn.Sequential(model.fc, nn.Softmax(1))``), a class or a ``forward`` is swapped, or a hook is added or removed,
    also where the new module or ``forward`` was made at the address of the old one, freed (``model.act = None;
    model.act = Act(cfg)``: by ``id`` alone it matched before session 48, and the folded copy of the old one ran; the
    weak references hold nothing alive, and a live object's is the same object each walk); not when a plain
    attribute of a module (a number its ``forward`` reads) changes. What
    :func:`~salience._core.perf.one_pass` remembers per model (a final softmax found), the compiled model and the
    CAMs' default layer (:class:`~salience._core.perf.ModelCache`) are kept for one structure, the folded copy for
    one :func:`_fold_key`. About 0.2 ms on resnet50 (0.3 ms with the tensors; docs/performance.md)."""
    return _walk(model, False)


def _fold_key(model: nn.Module) -> Optional[tuple]:
    """What a folded copy is kept for: the model's :func:`structure` and where each parameter and
    buffer lives and how often it was changed in place (``None``, not comparable, when a tensor has
    no version counter, e.g. one made under ``inference_mode``)."""
    try:
        return _walk(model, True)
    except RuntimeError:
        return None


def _walk(model: nn.Module, tensors: bool) -> tuple:
    """:func:`structure`; with ``tensors``, each module's parameters' and buffers' ``(data_ptr,
    _version, shape, stride)`` too (``w.data = w.data.t()`` keeps the address and the version counter of
    the storage it views: only the strides say it changed). One walk over the modules' own dicts (``model.parameters()`` costs more than
    reading the tensors), in ``model.modules()``'s order from one stack (:func:`_modules`), the hook dicts of a
    module looked at in C (session 47: 61 -> 44 us on resnet18, 137 -> 97 us on resnet50, the same tuple).

    Where the ``_modules`` slots of the modules walked are not one module of its own each (a module reached twice, a
    ``None`` child, the root again), the ids each slot holds close the tuple: the walk and the children's names
    alone were the same for ``a = Sequential(b1, b1)`` before and after ``a[1] = c`` (b2), and the folded copy of
    the old wiring ran the new one (review of session 47). In a plain tree the order and the names' counts already
    say which module sits where (a depth-first order and each node's count of children give one tree)."""
    out: list = []
    add, ref = out.append, weakref.ref
    me = threading.get_ident()
    slots = []  # each module's _modules, for the children's ids where the modules are no plain tree
    n = 0
    for m in _modules(model):
        d = m.__dict__
        f = d.get("forward")
        if f is not None and getattr(f, "salience_thread", me) != me:  # another thread's pass's (attention._NativeMHA)
            f = None
        mods = d.get("_modules")  # a traced module (torch.jit.trace, not loaded) keeps them behind __getattr__
        if mods is None:
            mods = m._modules
        slots.append(mods)
        names = tuple(mods.keys())
        n += len(names)
        add((id(m), ref(m), type(m), names, None if f is None else _alive(f)))
        try:  # the four hook dicts at once, in C (most modules: all empty)
            hooked = any(_HOOKS_OF(d))
        except KeyError:  # a module made without nn.Module.__init__ (a dict missing)
            hooked = True
        if hooked:
            # each hook dict copied at once (in C, under the GIL) before getattr runs Python per hook: another
            # thread adding or removing its hook meanwhile raised "OrderedDict mutated during iteration"
            own = tuple(tuple(k for k, h in tuple((d.get(name) or {}).items())
                              if not getattr(h, "salience_observer", False) and getattr(h, "salience_thread", me) == me)
                        for name in _HOOK_DICTS)
            if any(own):  # observers alone leave the fingerprint as without them
                add(own)
        if tensors:
            for t in d.get("_parameters", m._parameters).values():
                if t is not None:
                    add((t.data_ptr(), t._version, t.shape, t.stride()))
            for t in d.get("_buffers", m._buffers).values():
                if t is not None:
                    add((t.data_ptr(), t._version, t.shape, t.stride()))
    if n != len(slots) - 1:  # a slot shared, None, or the root: say which module each slot holds
        add(tuple(tuple(map(id, mods.values())) for mods in slots))
    return tuple(out)


def _alive(f: Any) -> Any:
    """An instance ``forward``'s identity that a later object at its address does not take over: its ``id`` and a weak
    reference (the ``id`` alone where it takes none; never a strong reference, which a bound method's module would
    keep alive in every cache kept for it)."""
    try:
        return id(f), weakref.ref(f)
    except TypeError:
        return id(f)


_HOOKS_OF = operator.itemgetter(*_HOOK_DICTS)
_M = nn.Module


def _modules(model: nn.Module) -> Any:
    """``model.modules()``: the same modules in the same order (depth first, each where it is first reached, a
    ``None`` child skipped), from one stack over the ``_modules`` dicts (the generator builds every module's dotted
    name: half of :func:`structure`'s time on resnet18), unless a class changes how modules are listed (then the
    generator itself). Inside a :func:`one_walk` stretch on ``model``, the stretch's one walk (the list, shared:
    not to be changed)."""
    return walked(model, "modules", _walk_modules)


def _walk_modules(model: nn.Module) -> Any:
    """:func:`_modules`'s walk itself."""
    root = type(model)
    if root.modules is not _M.modules or "modules" in model.__dict__:
        return model.modules()
    found: list = []
    seen: set = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if m in seen:  # named_modules' memo: a set of the modules (their own hash)
            continue
        d = m.__dict__
        if type(m).named_modules is not _M.named_modules or "named_modules" in d:
            return model.modules()
        mods = d.get("_modules")
        if mods is None:  # a traced module keeps them behind __getattr__: as the generator reads them
            return model.modules()
        seen.add(m)
        found.append(m)
        if mods:
            children = [c for c in mods.values() if c is not None]
            children.reverse()
            stack += children
    return found


def observer(hook: Callable) -> Callable:
    """Mark ``hook`` as salience's own observer of a model's passes (a dataset run keeping the
    output, the explorer's progress): it changes no output, so it does not keep :func:`own_hooks`
    from letting a copy or a compiled graph run (where it may not be called)."""
    hook.salience_observer = True  # type: ignore[attr-defined]
    return hook


def own_hooks(model: nn.Module) -> Optional[str]:
    """Why a copy or a compiled graph of ``model`` cannot stand in for it: it has hooks of its own (or
    hooks on every module, ``register_module_forward_hook``), or ``None``. Checked at every run, not
    once per cached copy: a hook added after the copy was made, or after the graph was compiled
    (dynamo does not guard on module hooks, so even a fresh ``torch.compile`` of the model reuses the
    graph), was silently not run, and one removed since still ran. :func:`observer` hooks do not count."""
    from torch.nn.modules import module as _module

    def users(hooks: Any) -> bool:
        return any(not getattr(h, "salience_observer", False) for h in tuple((hooks or {}).values()))

    if any(users(m._forward_hooks) or users(m._forward_pre_hooks) or users(m._backward_hooks) or
           users(getattr(m, "_backward_pre_hooks", None)) for m in model.modules()):
        return "the model has hooks of its own, which a copy or a compiled graph would not follow"
    if _module._has_any_global_hook():
        return "module hooks are registered for every module (register_module_forward_hook...)"
    return None


class _Stretch(threading.local):
    """The thread's open stretch (:func:`one_walk`): ``open``, [the model, the walks made in it by name, the thread's
    count of passes when it opened], or ``None``; and that count (``passes``, moved by :func:`end_walk`)."""
    open: Optional[list] = None
    passes = 0


_stretch = _Stretch()


def one_walk(model: nn.Module) -> None:
    """Open a stretch of salience's own code on ``model`` before its pass: the input checks, the model guard's entry,
    the fingerprint, the weights' sum walk the model once in it (:func:`walked`), not once each (a SmoothGrad call
    walked resnet18 nine times, seven before its first pass, 45 to 90 us each). None of the user's code runs between
    the stretch's walks: the stretch ends for good at the first thing of the thread that runs the user's code (a
    pass of any model, a trace of one, the model's own ``train``; :func:`end_walk`, called by
    :func:`~salience._core.autograd.model_call`, before a trace and by the guard's eval mode), after which each walk
    is made anew; and where its block closes it. Whatever the user changes between two calls (a module added or
    replaced, a parameter's dtype) is seen by the next call's stretch, which walks again. A stretch opened inside
    another on the same model where no pass ran since that one opened is that one; else one of its own.

    The block, Ctrl-C safe (a context manager's ``__exit__`` starts a frame, where SIGINT's handler may raise before
    it closed anything: the stretch stayed open, and the next call on the model, changed meanwhile, took its walk)::

        outer = walk_state()  # no Python frame: nothing to interrupt
        try:
            one_walk(model)
            ...
        finally:
            close_walk(outer)  # the outer stretch (or none) back, in C"""
    open_, passes = _stretch.open, _stretch.passes
    if open_ is None or open_[0] is not model or open_[2] != passes:
        _stretch.open = [model, {}, passes]


# The thread's open stretch (to put back with close_walk) and its put-back: C calls (functools.partial of getattr and
# setattr on the thread-local), so that a Ctrl-C cannot fall between a stretch's block and its closing
walk_state: Callable[[], Optional[list]] = functools.partial(getattr, _stretch, "open")
close_walk: Callable[[Optional[list]], None] = functools.partial(setattr, _stretch, "open")


def walked(model: nn.Module, name: str, walk: Callable[[nn.Module], Any]) -> Any:
    """``walk(model)``, made once in this thread's :func:`one_walk` stretch on ``model`` (by ``name``) while no pass
    ran since it opened; else made each time. A walk that gives no list (a class listing its modules itself: a
    generator) is made each time."""
    open_ = _stretch.open
    if open_ is None or open_[0] is not model or open_[2] != _stretch.passes:
        return walk(model)
    found = open_[1].get(name)
    if found is None:
        found = walk(model)
        if type(found) is not list and type(found) is not tuple:
            return found
        open_[1][name] = found
    return found


def end_walk() -> None:
    """A pass of a model (or its trace) begins in this thread: the user's code runs, which may change the model; the
    open :func:`one_walk` stretches keep no walk from here on."""
    _stretch.passes += 1
