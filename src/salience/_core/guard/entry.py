"""The guards' entry and exit: :func:`model_guard` and :func:`run_guard`.

A guard holds each module and parameter, counted (:data:`~salience._core.guard.holds.registry`): the first holder
records its state, puts the model in eval mode (:func:`~salience._core.guard.refusals.eval_mode`, which refuses a
graph exported in train mode) and freezes its parameters; the last holder to leave puts the state back, and sweeps the
hooks registered meanwhile (:func:`_unhook`). A thread's nested blocks on the same model share its hold
(:data:`_threads`). A run guard records a baseline once per run, put back after each call. The bookkeeping runs with
Ctrl-C deferred (:func:`~salience._core.calm.calmly`). What a first hold refuses (inference tensors, uninitialized
lazy parameters, a BatchNorm without running statistics given a pass of several images) is in
:mod:`~salience._core.guard.refusals`.

Limits: a Ctrl-C in ``contextlib``'s ``__enter__`` just after the hold leaves the generator suspended (the model is
put back when it is collected); a SIGINT handler installed from C is replaced by Python's by the first guard in the
main thread."""
from __future__ import annotations

import operator
import sys
import threading
from contextlib import contextmanager
from itertools import compress, repeat
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle as _Handle

from salience._core import layouts
from salience._core.calm import calmly
from salience._core.errors import SalienceError
from salience._core.fingerprint import _modules, walked
from salience._core.guard.holds import ParamState, registry
from salience._core.guard.hooks import ATTRS_OF, HOOKS_OF, drop_hooks
# entry's own names for the checks it calls on entering (what tests/test_hygiene.py's Ctrl-C test interrupts, call by call)
from salience._core.guard.refusals import eval_mode as _eval
from salience._core.guard.refusals import refuse_inference_tensors as _refuse_inference_tensors
from salience._core.guard.refusals import refuse_mixed_batches as _refuse_mixed_batches
from salience._core.guard.state import ModuleState
from salience._core.guard.values import Snapshot, copy_notes
from salience._core.tensors import autocast_off


def _capture(obj: Any, wrapper: Optional[type], into: Any = None, snap: Optional[Snapshot] = None
             ) -> "ModuleState | ParamState":
    """The state of a module or a parameter (``wrapper``: torch.compile's ``OptimizedModule``, or ``None``
    where dynamo was never imported), recorded in ``into`` (its entry in ``registry``) if given; its buffers' copies
    left to ``snap`` if given (:meth:`ModuleState.take`)."""
    if into is not None:
        into.take(obj, wrapper, snap)
        return into
    return ModuleState(obj, wrapper, snap) if isinstance(obj, nn.Module) else ParamState(obj)


def _compiled_wrapper_class() -> Optional[type]:
    """torch.compile's wrapper class (``OptimizedModule``). Dynamo is not imported for it: where it was
    never imported, there is no wrapper (``None``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return None if eval_frame is None else eval_frame.OptimizedModule


_M = nn.Module


def _walk(model: nn.Module) -> tuple[list, list]:
    """``list(model.modules())`` and ``list(model.parameters())``: the same objects in the same order, from
    one walk of the modules' ``_modules`` (:func:`~salience._core.fingerprint._modules`, which
    :func:`~salience._core.fingerprint.structure` walks too) and their ``_parameters`` (the generators cost 0.38 ms
    on resnet50), unless a class changes how modules or parameters are listed. Once in a
    :func:`~salience._core.fingerprint.one_walk` stretch (the lists shared: not to be changed)."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    return walked(model, "guard", _walk_now)


def _walk_now(model: nn.Module) -> tuple[list, list]:
    """:func:`_walk`'s walk itself."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    root, attrs = type(model), model.__dict__
    if root.parameters is not _M.parameters or root.named_parameters is not _M.named_parameters or \
            root._named_members is not _M._named_members or "parameters" in attrs:
        return list(model.modules()), list(model.parameters())
    modules = _modules(model)
    if type(modules) is not list:  # a class lists its modules itself: the generators, both
        return list(modules), list(model.parameters())
    params: list = []
    seen_params: set = set()  # ids: Tensor.__hash__ is id() in Python, 0.2 us a call
    for m in modules:
        if m._parameters:
            for p in m._parameters.values():
                if p is not None and id(p) not in seen_params:
                    seen_params.add(id(p))
                    params.append(p)
    return modules, params


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` from the one quick walk (:func:`_walk`): what per-call checks iterate over (the
    generators cost about 1 ms a call on a ViT-B of 150 modules)."""
    return _walk(model)[0]


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    """``list(model.parameters())`` (each once) from the same quick walk: for per-call sums over the weights
    (:func:`salience._core.engine.weight_bytes`; the generator walked the modules building their dotted names)."""
    return _walk(model)[1]


_lock = threading.Lock()
# thread id -> its open model_guard blocks: the passes the guard's own hooks (the one-image BatchNorm check) act on
_guarding: dict[int, int] = {}
# (thread id, id(model)) -> that thread's hold of the model: [the key, the objects held, how many of the thread's
# open model_guard blocks share it]. The thread's first model_guard on the model holds its modules and
# parameters; a guard nested in it (SmoothGrad around vanilla, a method inside evaluate's guard) that finds the
# same ones only counts itself here (0.45 -> 0.12 ms on resnet50): the outer block holds them until it leaves.
_threads: dict[tuple[int, int], list] = {}
# ids of the modules a hold left while a model_guard still held them, the hook counter moved in its block: their
# hooks are swept when they are put back, whatever the hold putting them back saw (see _unhook)
_stale: set[int] = set()


def _hold(objects: list, held: list, new: list) -> None:
    """Count one more holder of each of ``objects``, each appended to ``held`` as soon as it is counted
    (so that an interruption part way releases exactly those), and to ``new`` if no guard held it."""
    for obj in objects:
        entry = registry.get(id(obj))
        if entry is None:
            registry[id(obj)] = (ModuleState if isinstance(obj, _M) else ParamState).entry()
            new.append(obj)
        else:
            entry.holders += 1
        held.append(obj)


def _hold_new(modules: list, params: list, held: list, wrapper: Optional[type], snap: Snapshot) -> None:
    """:func:`_hold` and the capture of each of ``modules`` and ``params`` where no guard holds any of them (the
    common case: a call's own guard): each entry made, counted and its state recorded in one loop, the buffers'
    copies left to ``snap`` (resnet18's 130 objects: an entry call and a lookup each less than a hold, then a
    capture looking each up again). Each is appended to ``held`` as soon as it is counted, as :func:`_hold` does."""
    for objs, cls in ((modules, ModuleState), (params, ParamState)):
        new_entry = cls.__new__
        for obj in objs:
            e = new_entry(cls)
            e.holders, e.runs, e.baseline, e.captured = 1, 0, None, False
            registry[id(obj)] = e
            held.append(obj)
            _capture(obj, wrapper, e, snap)  # the one place a state is recorded (tests/test_hygiene.py interrupts it)


_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_FREEZE = operator.methodcaller("requires_grad_", False)


def _release(objects: list, run: bool = False, start: int = -1) -> None:
    """One holder fewer of each of ``objects`` (``run``: a run guard): the state of each that no guard
    holds any more is put back; one that only run guards hold now gets its baseline back. ``start``: the
    hold's :data:`_Handle.next_id` when it began (-1: unknown); where a hook was registered since (or a hold
    left one to sweep, ``_stale``), the hooks registered since on what is put back are removed (:func:`_unhook`)."""
    until = _Handle.next_id  # the key the next hook registered anywhere gets
    moved = until != start  # the common case: no hook registered anywhere since, one attribute read
    last: tuple[list, list] = ([], [])
    back: tuple[list, list] = ([], [])
    error: Optional[BaseException] = None
    ids = list(map(id, objects))
    entries = list(map(registry.__getitem__, ids))
    if not run and list(map(_HOLDERS, entries)).count(1) == len(entries) and all(map(_CAPTURED, entries)):
        # the common case, told in C: this hold is the last of each object (a call's own guard), all recorded; each
        # taken out of the registry and put back, modules and parameters apart (no Python loop over them)
        for _ in map(registry.pop, ids):
            pass
        params = list(map(isinstance, entries, repeat(ParamState)))
        last = (list(compress(entries, map(operator.not_, params))), list(compress(entries, params)))
        objects = ()
    for obj in objects:
        entry = registry[id(obj)]
        entry.holders -= 1
        if run:
            entry.runs -= 1
            if entry.runs == 0:
                entry.baseline = None
        if entry.holders == 0:
            del registry[id(obj)]
            if entry.captured:  # not: its capture did not happen (an error while entering)
                last[type(entry) is ParamState].append(entry)
        elif entry.holders == entry.runs and entry.baseline is not None:
            back[type(entry.baseline) is ParamState].append(entry.baseline)
    # modules first (compiled forwards, modes, buffers), then parameters; each put back even if one raises
    if last[0] or back[0]:
        try:  # the baselines' too: a write that moved no version counter in a call of a dataset run, undone after it
            _check_snapshots(last[0] + back[0])
        except BaseException as e:  # noqa: BLE001 - the put-back goes on (by version counters); the error raised after
            error = e
    error = _each(last[0], False) or error
    error = _restore_params(last[1]) or error
    error = _each(back[0] + back[1], True) or error
    if moved or _stale:
        try:  # some objects still held by a model_guard (or not captured, an error while entering): noted, see _unhook
            kept = len(last[0]) + len(last[1]) + len(back[0]) + len(back[1]) < len(objects)  # () where all were
            _unhook(objects if kept else (), last[0] + back[0], moved, until)
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error


def _check_snapshots(states: list) -> None:
    """The buffers' copies (:class:`Snapshot`) the module records ``states`` hold, each compared with the values now
    (:meth:`Snapshot.check`) before they are put back: a write that moved no version counter (a BatchNorm run in train
    mode by the model's own forward, a write through ``.data``) is put back too."""
    snaps = set(map(_SNAP, states))  # each record's (or None), found in C
    snaps.discard(None)
    for snap in snaps:
        snap.check()


def _restore_params(states: list) -> Optional[BaseException]:
    """The parameters of ``states`` (:class:`ParamState` records whose last holder left) restored, as :func:`_each`
    restores them: where each still has its recorded data (storage, offset, sizes, strides), ``.grad`` and no Python
    attribute either side (the common case, told in C over all of them), only the ``requires_grad`` flags that differ
    are set back (resnet18's 62: one ``restore`` call each cost 0.4 us); else each restored on its own. Returns the
    first error, as :func:`_each`."""
    if not states:
        return None
    try:
        params = list(map(_PARAM, states))
        quick = all(map(_IS_SET_TO, params, map(_DATA, states))) and \
            all(map(operator.is_, map(_GRAD, params), map(_GRAD, states))) and \
            not any(map(_DICT, params)) and not any(map(_ATTRS, states))
        if quick:
            was = list(map(_REQUIRES_GRAD, states))
            for p, flag in compress(zip(params, was), map(operator.ne, map(_REQUIRES_GRAD, params), was)):
                p.requires_grad_(flag)
            return None
    except BaseException:  # noqa: BLE001 - no kernel for a meta or sparse tensor, a flag refused: each on its own
        pass
    return _each(states, False)


_SNAP = operator.attrgetter("snap")
_HOLDERS, _CAPTURED = operator.attrgetter("holders"), operator.attrgetter("captured")
_PARAM, _DATA, _GRAD = operator.attrgetter("param"), operator.attrgetter("data"), operator.attrgetter("grad")
_DICT, _ATTRS = operator.attrgetter("__dict__"), operator.attrgetter("attrs")
_IS_SET_TO = torch.Tensor.is_set_to


def _each(states: list, put_back: bool) -> Optional[BaseException]:
    """Each of ``states`` restored (or put back), all of them even if one raises (a buffer the block resized,
    a ``KeyboardInterrupt`` raised by code: a Ctrl-C waits for the end, see :func:`calmly`): the one that raised is run once more (a restore may
    run twice) and the others still run; returns the first error. Before, the objects after it stayed in
    eval mode, frozen, for good (no guard held them any more)."""
    error = None
    for state in states:
        try:
            state.put_back() if put_back else state.restore()
        except BaseException as e:
            error = error or e
            try:
                state.put_back() if put_back else state.restore()
            except BaseException:
                pass
    return error


def _unhook(objects: Any, states: list, moved: bool, until: int) -> None:
    """The hooks registered since each of ``states`` was recorded and before ``until`` (the counter when the hold
    left) removed from its module (the :class:`ModuleState` records put back: their last holder left, or their
    baseline put back), all but salience's own (:func:`_own_hook`). Then ``objects`` (a hold's, left; empty where all
    were put back) that a model_guard still holds are noted in ``_stale`` if the counter ``moved`` in the hold's
    block: what their forward registered then is swept by the hold that puts them back, which may have begun after
    it."""
    if _stale:
        for state in states:
            _stale.discard(id(state.module))
    try:  # the modules with a hook of any kind, found in C (0.2 us a module; a Python loop over the dicts cost 0.65)
        hooked = list(compress(states, map(any, map(HOOKS_OF, map(ATTRS_OF, states)))))
    except Exception:  # a module made without nn.Module.__init__ (a dict missing)
        hooked = states
    for state in hooked:
        drop_hooks(state.module.__dict__, state.since, until, state.foreign)
    for obj in objects:
        entry = registry.get(id(obj))
        if entry is None:
            _stale.discard(id(obj))  # released without a state put back (an error while entering)
        elif moved and type(entry) is ModuleState and entry.holders > entry.runs:
            _stale.add(id(obj))


@contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters (its ``torch.compile`` wrappers running their
    original modules eagerly) for the block, then restore it.

    Restores every module's train/eval flag, every parameter's ``requires_grad``, ``.grad`` and
    data (storage and strides: a channels-last run is undone), any buffer written in place, registered,
    replaced, deleted or filled (a ``None`` slot), the modules' plain attributes (one level; see the module's
    docstring for torch.nn's own layers and the limits), and each parameter's and buffer's Python attributes
    (those ``torch.compile`` sets on the tensors it traces are removed), and takes off the hooks registered in the
    block on the model's modules (salience's own excepted; torch's global module hooks, the process's, stay), also
    if the block raises. A caller's ``torch.autocast`` is off in the block (this thread's): the passes run in the
    precision of salience's ``precision=`` option (fp32 unless asked), which enters its own autocast inside.

    The guard holds each module and parameter, not the model: nested calls (SmoothGrad around
    vanilla), threads explaining the same model, and threads explaining two models that share
    modules (two heads on one backbone) share one saved state per module and parameter, put back
    when the last guard holding it leaves. Holding the model only, a thread that entered while
    another held the shared backbone recorded the other's eval mode and frozen flags as the
    user's and put them back last: the backbone stayed in eval mode, its parameters frozen.
    """
    me = threading.get_ident()
    hold: list = []  # this block's hold, once held and counted (see _enter_guard)
    try:  # inside: a Ctrl-C as calmly ends still releases what was held
        calmly(_enter_guard, model, me, hold)
        with autocast_off():
            yield model
    finally:
        try:  # a Ctrl-C before calmly deferred it (at its call) left all to do: done once more (see run_guard)
            calmly(_leave_guard, me, hold)
        except BaseException:  # not only KeyboardInterrupt: the user's SIGINT handler may raise anything (sys.exit)
            calmly(_leave_guard, me, hold)
            raise


def _enter_guard(model: nn.Module, me: int, box: list) -> None:
    """A model_guard block of thread ``me`` entered: counted in ``_guarding`` and ``model`` held
    (:func:`_enter_thread`); the hold is appended to ``box`` once both are done, and not at all on an error."""
    with _lock:
        _guarding[me] = _guarding.get(me, 0) + 1
    copy_notes.fresh, copy_notes.marking = None, {}  # the copies this entry takes or compares, for a Found right after it
    try:
        _enter_thread(model, me, box)
    except BaseException:
        if not box:
            with _lock:
                _unguard(me)
        raise
    finally:
        copy_notes.fresh, copy_notes.marking = copy_notes.marking if box else None, None


def _leave_guard(me: int, box: list) -> None:
    """The model_guard block whose hold is in ``box`` left (nothing if ``box`` is empty: it was not
    entered, or this ran already)."""
    copy_notes.fresh = None  # a Found after this exit compares the values itself (:func:`_trusted`)
    if box:
        with _lock:
            _unguard(me)
            _leave(box.pop())


def _unguard(me: int) -> None:
    """One open model_guard block of thread ``me`` fewer (under the lock)."""
    _guarding[me] -= 1
    if not _guarding[me]:
        del _guarding[me]


def _enter_thread(model: nn.Module, me: int, box: list) -> None:
    """Hold ``model`` for a model_guard block of thread ``me``: the thread's open hold of it counts one more
    block if it holds the same modules and parameters (the model's tree did not change since), else
    :func:`_enter`. The hold is appended to ``box``."""
    modules, params = _walk(model)
    objects = modules + params
    key = (me, id(model))
    with _lock:
        hold = _threads.get(key)
        if hold is not None and len(hold[1]) == len(objects) and all(map(operator.is_, hold[1], objects)):
            hold[2] += 1
            box.append(hold)
            return
    _enter(model, modules, params, box, key)


def _leave(hold: list) -> None:
    """One block fewer sharing ``hold`` (under the lock); the last releases its objects."""
    hold[2] -= 1
    if hold[2] == 0:
        if _threads.get(hold[0]) is hold:
            del _threads[hold[0]]
        _release(hold[1], start=hold[3])


def _enter(model: nn.Module, modules: list, params: list, box: list, key: Optional[tuple[int, int]]) -> None:
    """Hold ``model``'s ``modules`` and ``params`` (each one no guard held: its state recorded, then the
    model put in eval mode with frozen parameters); the hold, ``[key, objects, 1, start]`` (``start``: see
    :func:`_release`), is appended to
    ``box``, and registered as the thread's hold of the model under ``key`` if it has none (``None``: a run
    guard's, which nested blocks do not share)."""
    objects = modules + params
    held: list = []
    start = _Handle.next_id  # see _unhook
    with _lock:
        try:  # also an error part way: what was counted is released (a state not yet captured is None)
            new: list = []
            wrapper = _compiled_wrapper_class()
            snap = Snapshot()  # the buffers' copies, all at once once each module is recorded
            if not any(map(registry.__contains__, map(id, objects))):  # the common case, told in C: none held
                _refuse_inference_tensors(model, objects, len(modules))
                _hold_new(modules, params, held, wrapper, snap)
                new = objects
            else:
                _hold(objects, held, new)
                if new:
                    _refuse_inference_tensors(model, new)
                    for o in new:  # a module or parameter no guard held: recorded, then the model put in eval mode
                        _capture(o, wrapper, registry[id(o)], snap)
            if new:
                snap.take()  # before anything of the user's runs (a train() of its own, in _eval)
                if wrapper is not None:  # the compiled wrappers among them, found in C (a call per object before)
                    for o in compress(new, map(isinstance, new, repeat(wrapper))):
                        registry[id(o)].run_eagerly()
                _eval(model, modules)
                _refuse_mixed_batches(model, new, _guarding)
                # the parameters that require a gradient, frozen (found and set in C: a Python loop cost 15 us on
                # resnet18's 62)
                for _ in map(_FREEZE, compress(params, map(_REQUIRES_GRAD, params))):
                    pass
            hold = [key, objects, 1, start]
            box.append(hold)  # from here on the caller releases it
            if key is not None and key not in _threads:
                _threads[key] = hold
        except BaseException:
            if not box:
                _release(held)
            raise


@contextmanager
def run_guard(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`model_guard` for a whole dataset run: the model is saved and put in eval mode with frozen
    parameters once, and restored exactly once at the end (also on an exception or Ctrl-C).

    Every guard entered in the block (each method's call, batch after batch) only counts itself; when it
    leaves and only run guards hold a module or parameter, that object gets back its *baseline*, its
    state as this guard established it (recorded here, after eval mode and the frozen flags): what
    differs is put back (a buffer written in place is copied back, also where no version counter moved: the
    baseline's buffers have a :class:`~salience._core.guard.values.Snapshot` of their own, compared after each
    call; a flag, a mode, a parameter's data
    or strides, a ``.grad``, a tensor attribute), so each call starts as it would under a guard of its
    own. Guards of other threads share it as they share any guard's (counted per module and
    parameter); the baseline is put back only when no guard but run guards holds the object, never
    under another thread's running pass.

    A model the guard refuses (a graph exported in train mode) is not held: each call's guard refuses
    it, as without a run guard (a dataset run records the error per method).

    The block also keeps the channels-last copies of the model's 4-D weights for the run
    (:func:`salience._core.layouts.open_copies`: each call's channels-last pass copies a weight once a run, not once a
    call), dropped when it ends, by an exception or a Ctrl-C too: one entry point for a run over a model, which both
    dataset engines use."""
    box: list = []  # the run's hold, once held with its run counts raised
    copies: list = []  # the run's kept channels-last copies (layouts), once registered
    try:
        calmly(_enter_run, model, box, copies)
        yield model
    finally:
        # Inline, not a helper: a Ctrl-C at a helper's start (before its try) would leave the hold. One
        # arriving before calmly deferred it (at calmly's own start) left everything to do: done once more.
        # Any exception, not only KeyboardInterrupt: the user's SIGINT handler may raise anything (sys.exit);
        # an error of the exit itself left box empty (popped first), and the second call does nothing.
        try:
            calmly(_leave_run, box, copies)
        except BaseException:
            calmly(_leave_run, box, copies)
            raise


def _enter_run(model: nn.Module, box: list, copies: list) -> None:
    """Keep the run's channels-last copies (``copies``, :func:`salience._core.layouts.open_copies`), hold ``model``
    for a run guard and raise its objects' run counts (each one's baseline recorded by the first run guard); the hold
    is appended to ``box`` when all is done, and not at all on an error or a refused model."""
    layouts.open_copies(model, copies)
    try:
        modules, params = _walk(model)
        _enter(model, modules, params, box, None)
    except SalienceError:
        return
    except BaseException:
        if box:
            with _lock:
                _release(box.pop()[1])
        raise
    objects = box[0][1]
    counted: list = []
    with _lock:
        try:  # also an error part way: the run counts raised are lowered, the holds released
            wrapper = _compiled_wrapper_class()
            snap = Snapshot()  # the baselines' buffers, copied at once and compared after each call (_release)
            for o in objects:
                entry = registry[id(o)]
                if entry.baseline is None:
                    entry.baseline = _capture(o, wrapper, snap=snap)
                    if type(entry) is ModuleState and entry.attrs is None:
                        # the state recorded copied no dict (a torch.nn layer without hooks): nor does the baseline,
                        # which saw another thread's call mid-way (its instance forward, attention._NativeMHA) and put
                        # it back after each call, for good (the final restore had no dict to put back)
                        entry.baseline.attrs = None
                entry.runs += 1
                counted.append(o)
            snap.take()
        except BaseException:
            for o in counted:
                entry = registry[id(o)]
                entry.runs -= 1
                if entry.runs == 0:
                    entry.baseline = None
            box.clear()
            _release(objects)
            raise


def _leave_run(box: list, copies: list) -> None:
    """The run guard whose hold is in ``box`` and copies in ``copies`` left (nothing of either that is empty: the
    model was refused, the copies shared with another run's, or this ran already)."""
    layouts.close_copies(copies)
    if box:
        with _lock:
            hold = box.pop()
            _release(hold[1], run=True, start=hold[3])


def check_python_model(model: nn.Module, method: str, why: str) -> None:
    """Refuse what is no ``nn.Module``, and a model with TorchScript in it: an interception mode
    (backprop rules, attention capture) cannot see inside compiled graphs. ``why`` ends the message
    (what the method would miss there)."""
    script = torch.jit.ScriptModule
    if not any(isinstance(m, script) for m in modules_of(model)):  # raises the SalienceError for no nn.Module
        return
    for name, m in model.named_modules():  # the name for the message
        if isinstance(m, script):
            where = "the model is" if name == "" else f"its submodule {name!r} is"
            raise SalienceError(
                f"{method} cannot be applied to TorchScript: {where} a torch.jit.ScriptModule, {why}. "
                "Pass the original Python nn.Module instead"
            )
