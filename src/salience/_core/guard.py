"""Scope every change salience makes to a user's model, and always undo it.

While salience explains a model it puts it in eval mode (so BatchNorm neither mixes the
samples of a batch nor updates its running statistics, and Dropout is off) and turns off
``requires_grad`` of the parameters (so only input gradients are computed and no memory
is spent on parameter gradients). :func:`model_guard` records the model's state first and
puts it back afterwards, on success, on an exception and on ``KeyboardInterrupt``.

A ``torch.compile``d module (an ``OptimizedModule``, the model itself or any submodule) runs its
original module eagerly under the guard: its cached graphs do not see hooks added after they were
compiled (dynamo skips guards on module hooks), so a layer hooked by Grad-CAM was "not called",
and Ablation-CAM's hook on one layer was replaced by the graph of an earlier call that hooked
another, silently. The function is the same; salience's own ``compile=`` option compiles the
passes that need no hook.

The guard is reference counted per module and per parameter: nested calls (SmoothGrad around
vanilla), concurrent calls from several threads on the same model, and on models that share
modules (two heads on one backbone), share one saved state of each module and parameter, which
is restored when the last guard holding it leaves. Without that, a second thread would record
the first thread's temporary eval mode as "the user's" and restore the wrong one (and, counted
per model, the first thread to leave put a shared backbone back in train mode under the other's
running passes).

A dataset run holds the model for the whole run (:func:`run_guard`): the full save and restore
(about 7-12 ms on resnet50) is paid once per run, not once per batch and method. Each guard entered
inside it (a method's call) then only counts, and when it leaves while every holder left is a run
guard, it puts back what the run guard established (the *baseline*: eval mode, frozen
parameters, the user's data, buffers, gradients, tensor attributes), comparing and fixing only what
differs, so that no call's change (a buffer the model writes in its forward, a flag, a layout)
reaches the next batch's call.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from salience._core.errors import SalienceError
from salience._core.tensors import autocast_off

__all__ = ["model_guard", "run_guard", "ModelState", "check_python_model", "train_mode_op"]


@dataclass
class ModelState:
    """What salience may touch in a model's modules and parameters: modes, ``requires_grad``,
    ``.grad``, data, buffers, compiled forwards; :meth:`capture` records them for the given modules
    and parameters, :meth:`restore` puts them back."""

    training: list[tuple[nn.Module, bool]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    grads: list[tuple[nn.Parameter, "torch.Tensor | None"]]
    buffers: list[tuple[nn.Module, str, torch.Tensor, int, torch.Tensor]] = field(default_factory=list)
    # Each parameter's and buffer's Python attributes (its ``__dict__``, copied): torch.compile marks the
    # tensors it traces (``_dynamo_static_input_type``; inductor's freezing ``_is_frozen_param``), and
    # the user's tensors must come back without them (the compiled graphs do not read them again).
    attrs: list[tuple[torch.Tensor, dict]] = field(default_factory=list)
    # Each parameter's data as it was (storage, strides): the engine may convert it to
    # channels-last for a run (salience._core.perf) and must leave the user's layout.
    data: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    # Each torch.compile wrapper's own ``forward`` attribute (its compiled callable), put back after
    # the guard ran the original module eagerly (see the module's docstring).
    compiled: list[tuple[nn.Module, object]] = field(default_factory=list)
    # Hooks the guard put on the modules for the block (see _refuse_mixed_batches), removed first.
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def capture(cls, modules: list[nn.Module], params: list[nn.Parameter]) -> "ModelState":
        buffers = []
        for module in modules:
            for name, buf in module._buffers.items():
                if buf is not None:
                    # The version counter tells whether the buffer was written in place;
                    # the clone lets us put back the values if it was.
                    buffers.append((module, name, buf, buf._version, buf.detach().clone()))
        return cls(
            training=[(m, m.training) for m in modules],
            requires_grad=[(p, p.requires_grad) for p in params],
            grads=[(p, p.grad) for p in params],
            buffers=buffers,
            data=[(p, p.data) for p in params],
            compiled=[(m, m.__dict__.get("forward", _NO_FORWARD)) for m in compiled_wrappers(modules)],
            attrs=[(t, dict(t.__dict__)) for t in (*params, *(b[2] for b in buffers))],
        )

    def put_back(self) -> None:
        """:meth:`restore`, then the buffers' version counters taken again (a buffer put back by a copy has
        a new version; the next :meth:`put_back` copies only what was written since)."""
        self.restore()
        if any(buf._version != version for _, _, buf, version, _ in self.buffers):
            self.buffers = [(m, name, buf, buf._version, copy) for m, name, buf, _, copy in self.buffers]

    def run_eagerly(self) -> None:
        """Let each ``torch.compile`` wrapper call its original module, hooks and all, until :meth:`restore`."""
        for module, _ in self.compiled:
            module.__dict__["forward"] = module._orig_mod.__call__

    def restore(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        for module, forward in self.compiled:
            if forward is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
        for module, mode in self.training:
            if module.training != mode:  # nn.Module.__setattr__ costs: about half of a restore on resnet50
                module.training = mode
        for param, flag in self.requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for param, grad in self.grads:
            if param.grad is not grad:
                param.grad = grad
        for param, data in self.data:
            if param.data_ptr() != data.data_ptr() or param.stride() != data.stride() or param.shape != data.shape:
                param.data = data
        for module, name, buf, version, copy in self.buffers:
            # TorchScript modules' _buffers is a mapping without .get()
            current = module._buffers[name] if name in module._buffers else None
            if current is not buf:
                module._buffers[name] = buf
            if buf._version != version:
                with torch.no_grad():
                    buf.copy_(copy)
        for tensor, saved in self.attrs:
            _restore_attributes(tensor, saved)


def _restore_attributes(tensor: torch.Tensor, saved: dict) -> None:
    """Put ``tensor``'s Python attributes back to ``saved`` (a copy of its ``__dict__``): those added
    since are deleted, those changed get their old values (the user's own attributes stay)."""
    now = tensor.__dict__
    for k in [k for k in now if k not in saved]:
        del now[k]
    for k, v in saved.items():
        if now.get(k, _MISSING) is not v:
            now[k] = v


_NO_FORWARD = object()
_MISSING = object()


def compiled_wrappers(modules: list[nn.Module]) -> list[nn.Module]:
    """The ``torch.compile`` wrappers (``OptimizedModule``) among ``modules``. Dynamo is not imported
    for it: where it was never imported, there is none."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return []
    return [m for m in modules if isinstance(m, eval_frame.OptimizedModule)]


_lock = threading.Lock()
# Every module and parameter some guard holds: id -> [holders, its state as the first holder found it,
# how many of the holders are run guards, its state as the first run guard established it (the baseline)].
_held: dict[int, list] = {}
# thread id -> its open model_guard blocks: the passes the guard's own hooks (the one-image BatchNorm check) act on
_guarding: dict[int, int] = {}
_HOLDERS, _STATE, _RUNS, _BASELINE = range(4)


def _hold(objects: list, held: list, new: list) -> None:
    """Count one more holder of each of ``objects``, each appended to ``held`` as soon as it is counted
    (so that an interruption part way releases exactly those), and to ``new`` if no guard held it."""
    for obj in objects:
        entry = _held.get(id(obj))
        if entry is None:
            _held[id(obj)] = [1, None, 0, None]
            new.append(obj)
        else:
            entry[0] += 1
        held.append(obj)


def _release(objects: list, run: bool = False) -> None:
    """One holder fewer of each of ``objects`` (``run``: a run guard): the state of each that no guard
    holds any more is put back; one that only run guards hold now gets its baseline back."""
    last: tuple[list, list] = ([], [])
    back: tuple[list, list] = ([], [])
    for obj in objects:
        entry = _held[id(obj)]
        entry[_HOLDERS] -= 1
        if run:
            entry[_RUNS] -= 1
            if entry[_RUNS] == 0:
                entry[_BASELINE] = None
        if entry[_HOLDERS] == 0:
            del _held[id(obj)]
            if entry[_STATE] is not None:  # None: its capture did not happen (an error while entering)
                last[not isinstance(obj, nn.Module)].append(entry[_STATE])
        elif entry[_HOLDERS] == entry[_RUNS] and entry[_BASELINE] is not None:
            back[not isinstance(obj, nn.Module)].append(entry[_BASELINE])
    for state in last[0] + last[1]:  # modules first (compiled forwards, modes, buffers), then parameters
        state.restore()
    for state in back[0] + back[1]:
        state.put_back()


@contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with frozen parameters (its ``torch.compile`` wrappers running their
    original modules eagerly) for the block, then restore it.

    Restores every module's train/eval flag, every parameter's ``requires_grad``, ``.grad`` and
    data (storage and strides: a channels-last run is undone), and any buffer written in place,
    and each parameter's and buffer's Python attributes (those ``torch.compile`` sets on the tensors
    it traces are removed), also if the block raises. A caller's ``torch.autocast`` is off in the block (this thread's):
    the passes run in the precision of salience's ``precision=`` option (fp32 unless asked), which
    enters its own autocast inside.

    The guard holds each module and parameter, not the model: nested calls (SmoothGrad around
    vanilla), threads explaining the same model, and threads explaining two models that share
    modules (two heads on one backbone) share one saved state per module and parameter, put back
    when the last guard holding it leaves. Holding the model only, a thread that entered while
    another held the shared backbone recorded the other's eval mode and frozen flags as the
    user's and put them back last: the backbone stayed in eval mode, its parameters frozen.
    """
    me = threading.get_ident()
    objects = _enter(model)
    counted = False
    try:  # counted inside: a Ctrl-C before the count still releases what _enter held
        with _lock:
            _guarding[me] = _guarding.get(me, 0) + 1
            counted = True
        with autocast_off():
            yield model
    finally:
        with _lock:
            if counted:
                _guarding[me] -= 1
                if not _guarding[me]:
                    del _guarding[me]
            _release(objects)


def _enter(model: nn.Module) -> list:
    """Hold ``model``'s modules and parameters (each one no guard held: its state recorded, then the
    model put in eval mode with frozen parameters); returns what is held."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    objects: list = list(model.modules()) + list(model.parameters())
    held: list = []
    with _lock:
        try:  # also a Ctrl-C part way: what was counted is released (a state not yet captured is None)
            new: list = []
            _hold(objects, held, new)
            _refuse_inference_tensors(model, new)
            for o in new:  # a module or parameter no guard held: recorded, then the model put in eval mode
                state = ModelState.capture([o], []) if isinstance(o, nn.Module) else ModelState.capture([], [o])
                _held[id(o)][_STATE] = state
            if new:
                for o in new:
                    _held[id(o)][_STATE].run_eagerly()
                _eval(model)
                _refuse_mixed_batches(model, new)
                for p in model.parameters():
                    p.requires_grad_(False)
        except BaseException:
            _release(held)
            raise
    return objects


def _refuse_inference_tensors(model: nn.Module, new: list) -> None:
    """A model made (or loaded) under ``torch.inference_mode()`` holds inference tensors, which keep
    no version counter and cannot be saved for a backward pass: every method failed with torch's
    raw RuntimeError ("Inference tensors do not track version counter"). A lazy module's uninitialized
    parameters (torch's raw ValueError before) are refused too. Checked on the modules and
    parameters no guard held yet (``new``): inside a call, a forward run under inference mode may
    replace a buffer with an inference tensor, which the outer guard puts back at its end.

    Only ``new``'s own tensors are looked at (a module's direct parameters and buffers), and nothing
    when all is held already: walking every named parameter and buffer of the model under the lock
    cost each call 0.66 ms on resnet50 even then (each guard of a dataset run's calls, +50%)."""
    for o in new:
        tensors = list(o._parameters.values()) + list(o._buffers.values()) if isinstance(o, nn.Module) else [o]
        for t in tensors:
            if t is None:
                continue
            lazy = isinstance(t, nn.parameter.UninitializedTensorMixin)
            if lazy or t.is_inference():
                _refuse_tensor(model, t, lazy)


def _refuse_tensor(model: nn.Module, t: torch.Tensor, lazy: bool) -> None:
    """The refusal of ``model``'s tensor ``t`` (an uninitialized lazy parameter, or an inference tensor), by name."""
    name = next((n for n, u in list(model.named_parameters(remove_duplicate=False)) +
                 list(model.named_buffers(remove_duplicate=False)) if u is t), "?")
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if lazy:
        raise SalienceError(
            f"the model's {name!r} ({type(owner).__name__}) is not initialized yet: a lazy module takes its "
            "shapes from its first forward pass, which would change the model. Run one pass first, "
            "model(x) under torch.no_grad() with an input of the shape you will explain, then explain it")
    raise SalienceError(
        f"the model's {name!r} is an inference tensor: the model was built or loaded (or a forward pass "
        "stored it) under torch.inference_mode(), and such tensors can be neither tracked nor differentiated. Build or "
        "load the model outside inference_mode (torch.no_grad() is fine), or explain a copy made "
        "outside it: copy.deepcopy(model)")


@contextmanager
def run_guard(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`model_guard` for a whole dataset run: the model is saved and put in eval mode with frozen
    parameters once, and restored exactly once at the end (also on an exception or Ctrl-C).

    Every guard entered in the block (each method's call, batch after batch) only counts itself; when it
    leaves and only run guards hold a module or parameter, that object gets back its *baseline*, its
    state as this guard established it (recorded here, after eval mode and the frozen flags): what
    differs is put back (a buffer written in place is copied back, a flag, a mode, a parameter's data
    or strides, a ``.grad``, a tensor attribute), so each call starts as it would under a guard of its
    own. Guards of other threads share it as they share any guard's (counted per module and
    parameter); the baseline is put back only when no guard but run guards holds the object, never
    under another thread's running pass.

    A model the guard refuses (a graph exported in train mode) is not held: each call's guard refuses
    it, as without a run guard (a dataset run records the error per method)."""
    try:
        objects: Optional[list] = _enter(model)
    except SalienceError:
        objects = None
    if objects is None:
        yield model
        return
    counted: list = []
    with _lock:
        try:  # also a Ctrl-C part way: the run counts raised are lowered, the holds released
            for o in objects:
                entry = _held[id(o)]
                if entry[_BASELINE] is None:
                    entry[_BASELINE] = ModelState.capture([o], []) if isinstance(o, nn.Module) \
                        else ModelState.capture([], [o])
                entry[_RUNS] += 1
                counted.append(o)
        except BaseException:
            for o in counted:
                entry = _held[id(o)]
                entry[_RUNS] -= 1
                if entry[_RUNS] == 0:
                    entry[_BASELINE] = None
            _release(objects)
            raise
    try:
        yield model
    finally:
        with _lock:
            _release(objects, run=True)


def _eval(model: nn.Module) -> None:
    """``model.eval()``, and a refusal of a graph that keeps train mode whatever the flags say.

    ``torch.export``'s ``ExportedProgram.module()`` refuses ``eval()`` (a raw NotImplementedError):
    its graph is fixed in the mode it was exported in, so only the flags are set. A graph exported
    in train mode (that flat module, or ``torch.export.unflatten`` of it, whose ``eval()`` succeeds)
    would compute BatchNorm with the batch's statistics, mixing the images, and draw Dropout."""
    try:
        model.eval()
    except NotImplementedError:
        for m in model.modules():
            m.training = False
    for name, m in model.named_modules():
        graph = getattr(m, "graph", None)  # torch.fx.GraphModule, torch.export.unflatten's modules
        op = train_mode_op(graph) if isinstance(graph, torch.fx.Graph) else None
        if op is not None:
            where = "the model's graph" if name == "" else f"the graph of its submodule {name!r}"
            raise SalienceError(
                f"{where} was exported in train mode ({op} with training on), and an exported graph keeps "
                "that mode: BatchNorm would mix the images of a batch and Dropout draw at random. Export it "
                "after model.eval()")


def _refuse_mixed_batches(model: nn.Module, new: list) -> None:
    """A BatchNorm without running statistics (``track_running_stats=False``) normalizes by the
    statistics of the batch it is given, in eval mode too: the images of a pass (a batch, or the
    noisy copies / masked images a method runs together) changed each other's maps, silently. Such
    a layer gets a forward pre-hook for the block that refuses a pass of more than one image."""
    held = {id(o) for o in new}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None and id(m) in held:
            _held[id(m)][1].handles.append(m.register_forward_pre_hook(_one_image_per_pass(name)))


def _one_image_per_pass(name: str) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        # only the passes of a thread inside a guard (salience's): the user's own batch in another thread is theirs
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] > 1 and threading.get_ident() in _guarding:
            raise SalienceError(
                f"the model's BatchNorm {name!r} has no running statistics (track_running_stats=False): even in "
                f"eval mode it normalizes by the statistics of the batch it is given, so the {x.shape[0]} images "
                "of this pass would change each other's maps. Explain one image at a time (x[i:i + 1]) and pass "
                "chunk=1 to the methods that run several copies of it per pass (SmoothGrad, Integrated "
                "Gradients, occlusion, RISE, Score-CAM, Ablation-CAM); or give the layer running statistics")
    return hook


def train_mode_op(graph: Any) -> Optional[str]:
    """The first operation of a ``torch.fx`` graph (``torch.export``'s ATen graph) that runs BatchNorm
    or Dropout in train mode (its ``training`` argument fixed to ``True``), or ``None``."""
    for node in graph.nodes:
        name = str(node.target) if node.op == "call_function" else ""
        if ("batch_norm" in name and len(node.args) > 5 and node.args[5] is True) or \
                ("dropout" in name and len(node.args) > 2 and node.args[2] is True):
            return name
    return None


def check_python_model(model: nn.Module, method: str, why: str) -> None:
    """Refuse what is no ``nn.Module``, and a model with TorchScript in it: an interception mode
    (backprop rules, attention capture) cannot see inside compiled graphs. ``why`` ends the message
    (what the method would miss there)."""
    if not isinstance(model, nn.Module):
        raise SalienceError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            where = "the model is" if name == "" else f"its submodule {name!r} is"
            raise SalienceError(
                f"{method} cannot be applied to TorchScript: {where} a torch.jit.ScriptModule, {why}. "
                "Pass the original Python nn.Module instead"
            )
