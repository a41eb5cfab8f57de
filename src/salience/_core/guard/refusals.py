"""What a guard refuses, and eval mode: the checks made when a guard first holds a model's modules and parameters.

:func:`eval_mode` puts the model in eval mode (the flags set directly where no class changes how ``train`` switches
them) and refuses a graph exported in train mode (:func:`train_mode_op`, which ``torch.export``'s loader asks too);
:func:`refuse_inference_tensors` refuses inference tensors and uninitialized lazy parameters, by name;
:func:`refuse_mixed_batches` gives a BatchNorm without running statistics a hook that refuses a pass of several
images. Each is called by :mod:`~salience._core.guard.entry` under the guards' lock, on the modules and parameters no
guard held yet (``new``), and raises a :class:`~salience._core.errors.SalienceError` saying what to do.

Limits: a graph is looked at only on a module that may have one (a ``graph`` in its ``__dict__``, or a class with a
``graph`` attribute or its own ``__getattr__``); a tensor replaced by an inference tensor inside a call is put back by
the outer guard, not refused."""
from __future__ import annotations

import functools
import operator
import threading
from itertools import chain
from typing import Any, Optional

import torch
from torch import nn

from salience._core.errors import SalienceError
from salience._core.fingerprint import end_walk
from salience._core.guard.containers import MISSING
from salience._core.guard.holds import registry
from salience._core.guard.records import EMPTY

_Module = nn.Module


def eval_mode(model: nn.Module, modules: Optional[list] = None) -> None:
    """``model.eval()``, and a refusal of a graph that keeps train mode whatever the flags say
    (``modules``: ``list(model.modules())``).

    ``torch.export``'s ``ExportedProgram.module()`` refuses ``eval()`` (a raw NotImplementedError):
    its graph is fixed in the mode it was exported in, so only the flags are set. A graph exported
    in train mode (that flat module, or ``torch.export.unflatten`` of it, whose ``eval()`` succeeds)
    would compute BatchNorm with the batch's statistics, mixing the images, and draw Dropout.

    Where no class (nor instance) changes how ``train`` / ``eval`` switch the modules, the flags that are
    on are turned off directly, nothing done if none is (``eval()`` cost 0.54 ms on resnet50 in eval mode),
    and only modules that may have a ``graph`` are asked for it (a missing attribute costs a raised
    AttributeError in ``nn.Module.__getattr__``: 0.23 ms)."""
    if modules is None:
        modules = list(model.modules())
    kinds: dict[type, tuple[bool, bool]] = {}
    plain = type(model).eval is _Module.eval and "eval" not in model.__dict__
    training = False
    graphs = []
    for m in modules:
        kind = kinds.get(type(m))
        if kind is None:
            kind = kinds[type(m)] = _kind(type(m))
        attrs = m.__dict__
        if not kind[0] or "train" in attrs:
            plain = False
        if m.training:
            training = True
        if kind[1] or "graph" in attrs:
            graphs.append(m)
    if not plain:
        end_walk()  # the model's own train() runs (the user's code, which may change the model): walks anew after it
        try:
            model.eval()
        except NotImplementedError:
            for m in modules:
                m.training = False
    elif training:
        for m in modules:
            if m.training:
                m.training = False
    for m in graphs:
        graph = getattr(m, "graph", None)  # torch.fx.GraphModule, torch.export.unflatten's modules
        op = train_mode_op(graph) if isinstance(graph, torch.fx.Graph) else None
        if op is not None:
            name = next((n for n, u in model.named_modules() if u is m), "?")
            where = "the model's graph" if name == "" else f"the graph of its submodule {name!r}"
            raise SalienceError(
                f"{where} was exported in train mode ({op} with training on), and an exported graph keeps "
                "that mode: BatchNorm would mix the images of a batch and Dropout draw at random. Export it "
                "after model.eval()")


def _kind(cls: type) -> tuple[bool, bool]:
    """Whether ``cls``'s ``train`` switches its modules as nn.Module's does (no override of ``train``,
    ``children``, ``named_children``, ``__setattr__``), and whether an instance may have a ``graph`` other
    than in its ``__dict__`` (a class attribute or property, a custom ``__getattr__``)."""
    switches = cls.train is _Module.train and cls.children is _Module.children and \
        cls.named_children is _Module.named_children and cls.__setattr__ is _Module.__setattr__
    graph = getattr(cls, "graph", None) is not None or cls.__getattr__ is not _Module.__getattr__ or \
        cls.__getattribute__ is not _Module.__getattribute__
    return switches, graph


def _lists_all_parameters(model: nn.Module) -> bool:
    """Whether the guard's walk of ``model`` lists every parameter of its modules (each then among the objects held,
    looked at when first held): no class changes how ``model`` lists them (one that lists only some, its head's
    for an optimizer, left an inference tensor of the others unrefused by the quick check: a raw RuntimeError)."""
    root = type(model)
    return root.parameters is _Module.parameters and root.named_parameters is _Module.named_parameters and \
        root._named_members is _Module._named_members and "parameters" not in model.__dict__


def refuse_mixed_batches(model: nn.Module, new: list, guarding: dict[int, int]) -> None:
    """A BatchNorm without running statistics (``track_running_stats=False``) normalizes by the
    statistics of the batch it is given, in eval mode too: the images of a pass (a batch, or the
    noisy copies / masked images a method runs together) changed each other's maps, silently. Such
    a layer (among ``new``, the modules no guard held) gets a forward pre-hook for the block that
    refuses a pass of more than one image, in a thread inside a guard (``guarding``: the entry's count of each
    thread's open model_guard blocks, read at each pass)."""
    names: Optional[dict[int, str]] = None
    for m in new:
        # the buffer read from the module's dict (``m.running_mean`` went through nn.Module.__getattr__: 15 us a call
        # on resnet18's 20 layers), the attribute where it is no buffer there (a subclass's property)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _running_mean(m) is None:
            if names is None:
                names = {id(u): n for n, u in model.named_modules()}
            state = registry[id(m)]
            if not state.handles:
                state.handles = []
            state.handles.append(m.register_forward_pre_hook(_one_image_per_pass(names.get(id(m), "?"), guarding)))


def _running_mean(m: nn.Module) -> Any:
    """``m.running_mean``, read from the module's buffers (through nn.Module.__getattr__ it cost 15 us a call on
    resnet18's 20 layers), or as the attribute where it is no buffer there (a subclass's property)."""
    found = m.__dict__.get("_buffers", EMPTY).get("running_mean", MISSING)
    return m.running_mean if found is MISSING else found


def _one_image_per_pass(name: str, guarding: dict[int, int]) -> Any:
    """The forward pre-hook of a BatchNorm without running statistics (``name``): a pass of several images refused."""
    def hook(module: nn.Module, args: tuple) -> None:
        # only the passes of a thread inside a guard (salience's): the user's own batch in another thread is theirs
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] > 1 and threading.get_ident() in guarding:
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


def refuse_inference_tensors(model: nn.Module, new: list, split: int = -1) -> None:
    """A model made (or loaded) under ``torch.inference_mode()`` holds inference tensors, which keep
    no version counter and cannot be saved for a backward pass: every method failed with torch's
    raw RuntimeError ("Inference tensors do not track version counter"). A lazy module's uninitialized
    parameters (torch's raw ValueError before) are refused too. Checked on the modules and
    parameters no guard held yet (``new``): inside a call, a forward run under inference mode may
    replace a buffer with an inference tensor, which the outer guard puts back at its end.

    Only ``new``'s own tensors are looked at (a module's direct parameters and buffers), and nothing
    when all is held already: walking every named parameter and buffer of the model under the lock
    cost each call 0.66 ms on resnet50 even then (each guard of a dataset run's calls, +50%). Looked at first
    once each (a module's buffers and the parameters among ``new``: each parameter of a module is one of the
    objects the guard holds, looked at when first held; resnet18's 62 looked at twice cost 0.05 ms a call), and in
    the order of before (a module's parameters, then its buffers) only where one is refused, to name the same one.
    ``split``: where ``new`` is the modules then the parameters, the number of modules (the tensors then found and
    asked in C: :func:`_none_refused`)."""
    lazy = nn.parameter.UninitializedTensorMixin
    if split >= 0 and _lists_all_parameters(model) and _none_refused(new, split, lazy):
        return
    if split < 0 and _lists_all_parameters(model) and not any(
            t is not None and (isinstance(t, lazy) or t.is_inference())
            for o in new for t in (o._buffers.values() if isinstance(o, nn.Module) else (o,))):
        return
    for o in new:
        for tensors in (o._parameters.values(), o._buffers.values()) if isinstance(o, nn.Module) else ((o,),):
            for t in tensors:  # is_inference() after the lazy check: an uninitialized parameter raises there
                if t is not None and (isinstance(t, lazy) or t.is_inference()):
                    _refuse_tensor(model, t, isinstance(t, lazy))


def _none_refused(new: list, split: int, lazy: type) -> bool:
    """Whether no tensor of ``new`` (its first ``split`` modules' buffers, and the parameters after them) is an
    inference tensor or a lazy module's uninitialized one: found and asked in C (``is_inference`` mapped over them;
    the types looked at once each), 0.06 ms less than a generator on resnet18's 130 objects. False where it cannot
    tell so (a TorchScript module's buffers, a tensor subclass): the caller then looks one by one."""
    try:
        buffers = list(filter(_NOT_NONE, chain.from_iterable(map(_VALUES, map(_BUFFERS, new[:split])))))
        tensors = new[split:] + buffers
        if any(issubclass(t, lazy) or not issubclass(t, torch.Tensor) for t in set(map(type, tensors))):
            return False
        return not any(map(torch.Tensor.is_inference, tensors))
    except Exception:  # noqa: BLE001 - a module made without nn.Module.__init__, a mapping without values()
        return False


_BUFFERS = operator.attrgetter("_buffers")
_VALUES = operator.methodcaller("values")
_NOT_NONE = functools.partial(operator.is_not, None)


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
