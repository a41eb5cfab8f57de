"""Models of your own: ``python:MODULE:FUNC`` specs, ``torch.export`` programs (``.pt2``), and
:func:`select_output`, which says where in what a model returns its scores are.

``python:mypkg.nets:build`` imports ``mypkg.nets`` (the current folder is searched too) and
``python:path/to/file.py:build`` runs that file as a module; ``build()`` is called with no
argument and must return an ``nn.Module``. A ``.pt2`` file is loaded with ``torch.export.load``
and unflattened back into its module tree (``torch.export.unflatten``), so that Grad-CAM can
hook a named submodule; where unflattening fails the flat ``ExportedProgram.module()`` is used.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from salience._core.errors import SalienceError, first_line, suggest
from salience._core.guard import train_mode_op
from salience._core.info import ModelInfo, attach_info, model_info
from salience.loading.models import PathLike, expand_home, load_state, read_state_dict

__all__ = ["select_output", "load_python", "load_exported", "user_modules", "size_bounds_problem",
           "sides_out_of_bounds"]

OutputPick = Union[str, int, Callable[[Any], Tensor]]


def select_output(model: nn.Module, output: Optional[OutputPick]) -> nn.Module:
    """Say which part of what ``model`` returns holds its scores; returns the same model.

    ``output``: a dict key (or a ``ModelOutput`` field) such as ``"aux"``, an index into a
    returned tuple or list such as ``1``, a function of the returned value such as
    ``lambda o: o["x"]`` that gives the scores tensor ``(B, K)``, or ``None`` for the default rule
    (:func:`salience._core.autograd.unwrap_output`). It is stored in the model's
    :class:`~salience._core.info.ModelInfo` (``output``), so every method and metric honours it;
    no wrapper module is made. A wrong pick is a :class:`SalienceError` naming what the model
    returned, at its first forward pass.
    """
    if not isinstance(model, nn.Module):
        raise SalienceError(f"select_output needs a torch.nn.Module, got {type(model).__name__}")
    if output is not None and not (callable(output) or isinstance(output, (str, int))) or isinstance(output, bool):
        raise SalienceError(f"output must be a key (str), an index (int) or a function, got {output!r}")
    return attach_info(model, dataclasses.replace(model_info(model), output=output))


# --------------------------------------------------------------------------------- python:MODULE:FUNC


def load_python(ref: str, weights: Optional[PathLike] = None, trust_pickle: bool = False) -> nn.Module:
    """The model that ``FUNC()`` of ``ref`` = ``"MODULE:FUNC"`` or ``"FILE.py:FUNC"`` returns,
    with ``weights`` (a state-dict file: ``.pt`` / ``.pth`` / ``.safetensors``) loaded into it."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise SalienceError(f"python:{ref}: expected python:MODULE:FUNC, e.g. python:mypkg.nets:build or "
                            "python:path/to/file.py:build")
    module = _import(target)
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise SalienceError(f"python:{ref}: {target} has no {attr!r}{suggest(attr, names)}")
    if not callable(fn):
        raise SalienceError(f"python:{ref}: {attr} is a {type(fn).__name__}, not a function that builds the model")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - the user's code can raise anything; one line says what
        raise SalienceError(f"python:{ref}: {attr}() raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise SalienceError(f"python:{ref}: {attr}() returned an object of type {type(model).__name__}, "
                            "expected a torch.nn.Module")
    if weights is not None and str(weights) != "random":
        load_state(model, read_state_dict(weights, trust_pickle=trust_pickle), weights, f"python:{ref}")
    if not isinstance(getattr(model, "salience_info", None), ModelInfo):
        attach_info(model, ModelInfo(name=f"python:{ref}"))
    return model


def _import(target: str) -> types.ModuleType:
    """A module by dotted name (the current folder searched too) or a ``.py`` file."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        return _import_file(Path(expand_home(target)))
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise SalienceError(f"python:{target}: no module named {target!r} (not on sys.path nor in the current "
                                "folder); give a file instead: python:path/to/file.py:FUNC") from None
        raise SalienceError(f"python:{target}: importing it failed: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the module's own code raised while importing
        raise SalienceError(f"python:{target}: importing it raised {type(e).__name__}: {first_line(e)}") from None
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def _import_file(path: Path) -> types.ModuleType:
    """``path`` run as a module named ``salience_user_STEM_N``, its folder first on ``sys.path``
    while it runs (as Python runs a script: ``import blocks`` finds ``blocks.py`` beside it). The
    module and the sibling modules it imported are recorded (:func:`user_modules`)."""
    if path.is_dir():  # it said "no such file" of a folder that is there
        raise SalienceError(f"python:{path}: is a folder, not a Python file; give the .py file that defines the "
                            "function (python:FILE.py:FUNC), or a package's module as python:MODULE:FUNC")
    if not path.is_file():
        raise SalienceError(f"python:{path}: no such file; check the path")
    name = f"salience_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SalienceError(f"python:{path}: not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    folder = str(path.resolve().parent)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the file's own code raised
        sys.modules.pop(name, None)
        raise SalienceError(f"python:{path}: running it raised {type(e).__name__}: {first_line(e)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    _USER_MODULES[name] = None
    for top in sorted({n.partition(".")[0] for n in set(sys.modules) - before} - {n.partition(".")[0] for n in before}):
        if _lies_in(sys.modules.get(top), Path(folder)):
            _USER_MODULES.update((n, None) for n in list(sys.modules) if n == top or n.startswith(top + "."))
    return module


_USER_MODULES: dict[str, None] = {}
"""Names of the modules :func:`_import_file` made (``salience_user_...``) and of the sibling
modules they imported from their folder, in order."""


def user_modules() -> list[types.ModuleType]:
    """The modules of ``python:FILE.py`` specs loaded in this process and the modules they imported
    from their own folder. No other process can import them by name (``salience_user_...`` is a
    name made here; the folder may not be on another machine), so whatever is defined in them must
    be pickled by value to reach another process: the Ray engine registers them with Ray's
    cloudpickle (``register_pickle_by_value``)."""
    return [sys.modules[n] for n in _USER_MODULES if n in sys.modules]


def _lies_in(module: Optional[types.ModuleType], folder: Path) -> bool:
    """Whether top-level ``module`` was found directly in ``folder``: ``folder/NAME.py``, the package
    ``folder/NAME/__init__.py`` or the namespace package ``folder/NAME/``."""
    if module is None:
        return False
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None)
    if not where:
        return False
    here = Path(where).resolve()
    return here.parent == folder or (here.name == "__init__.py" and here.parent.parent == folder)


# --------------------------------------------------------------------------------- .pt2 (torch.export)


class _Held(logging.Filter):
    """A logger filter that keeps the records logged while it is on, and lets none through."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def load_exported(path: PathLike) -> nn.Module:
    """A ``torch.export.save`` program as a module: unflattened into its module tree (so Grad-CAM
    can hook ``layer="features"``), or flat where that fails. The graph is fixed in the mode it
    was exported in, so a program exported in train mode (BatchNorm batch statistics, Dropout on)
    or with a fixed batch size is refused, with how to export it instead."""
    p = Path(path)
    # torch.export.load logs a corrupt archive's traceback as a warning, then raises "... check the warnings
    # above": the records are held, the error below says the logged cause, a plain warning is let through
    logger = logging.getLogger("torch.export")
    held = _Held()
    logger.addFilter(held)
    try:
        ep = torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001 - torch.export.load raises many types on a foreign file
        causes = [r.exc_info[1] for r in held.records if r.exc_info and r.exc_info[1] is not None]
        said = first_line(causes[-1] if causes else e)
        raise SalienceError(f"{p}: not a torch.export program torch.export.load can read ({said})") from None
    finally:
        logger.removeFilter(held)
    for record in held.records:  # a load that worked: its warnings (e.g. an older format's) said, no traceback
        if not record.exc_info:
            logger.handle(record)
    _check_exported(p, ep)
    try:
        model: nn.Module = torch.export.unflatten(ep)
    except Exception:  # noqa: BLE001 - unflatten is best-effort: fall back to the flat module
        model = ep.module()
        # ExportedProgram.module() refuses .eval(); its graph is fixed in eval mode (checked above),
        # so eval() only sets the flags.
        object.__setattr__(model, "eval", types.MethodType(_flags_eval, model))
    shape = _input_shape(ep)
    size = (int(shape[2]), int(shape[3])) if shape and len(shape) == 4 and all(isinstance(v, int) for v in shape[2:]) \
        else None
    channels = int(shape[1]) if shape and len(shape) == 4 and isinstance(shape[1], int) else 3
    most = _batch_limit(ep, shape)
    extra: dict[str, Any] = {} if most is None else {"max_batch": most}
    if shape and len(shape) == 4 and any(isinstance(v, int) for v in shape[1:]):
        # the program refuses another channel count or size with torch's raw guard error: the command checks its
        # preprocessing against this (C, H, W), an int where fixed, None where dynamic
        extra["static_input"] = tuple(int(v) if isinstance(v, int) else None for v in shape[1:])
    bounds = _size_bounds(ep, shape)
    if bounds is not None:  # Dim("h", min=8, max=64): a size outside was torch's raw guard error (exit 3)
        extra["size_bounds"] = bounds
    return attach_info(model, ModelInfo(name=p.name, input_size=size, channels=channels, extra=extra))


def _batch_limit(ep: Any, shape: Optional[tuple]) -> Optional[int]:
    """The upper bound of the program's dynamic batch (``Dim("batch", max=N)``: the program refuses
    a larger batch), or ``None`` when unbounded or unknown."""
    if not shape:
        return None
    symbol = getattr(getattr(shape[0], "node", None), "expr", None)  # the batch's SymInt's symbol
    bound = getattr(ep.range_constraints.get(symbol), "upper", None)
    try:
        return int(bound) if bound is not None and bound < 2 ** 62 else None
    except (TypeError, ValueError, OverflowError):  # int_oo, a symbolic bound: no limit known
        return None


def _size_bounds(ep: Any, shape: Optional[tuple]) -> Optional[tuple]:
    """The ranges of the program's dynamic height and width, ``((h_min, h_max), (w_min, w_max))`` (``None`` for a
    bound it has not: ``Dim("h")``'s own minimum of 2 and no maximum are none), or ``None`` when neither is
    bounded or the shape is not ``(N, C, H, W)``."""
    if not shape or len(shape) != 4:
        return None
    ranges = []
    for v in shape[2:]:
        constraint = ep.range_constraints.get(getattr(getattr(v, "node", None), "expr", None))
        lo = hi = None
        if constraint is not None and not isinstance(v, int):
            try:
                lo = int(constraint.lower) if 2 < constraint.lower < 2 ** 62 else None
            except (TypeError, ValueError, OverflowError, AttributeError):
                lo = None
            try:
                hi = int(constraint.upper) if constraint.upper < 2 ** 62 else None
            except (TypeError, ValueError, OverflowError, AttributeError):  # int_oo: no maximum
                hi = None
        ranges.append((lo, hi))
    return tuple(ranges) if any(b is not None for r in ranges for b in r) else None


def sides_out_of_bounds(info: ModelInfo, size: tuple[int, int]) -> Optional[str]:
    """The sides of ``size`` ``(H, W)`` outside the ranges of ``info``'s ``.pt2`` program's bounded dynamic height and
    width (``info.extra["size_bounds"]``, :func:`_size_bounds`), said (``"height 100 (it takes 8..64)"``); ``None``
    when both fit or the program has no bounds. What :func:`size_bounds_problem` and the commands' checks of their
    size flags say."""
    bounds = (info.extra or {}).get("size_bounds")
    if not bounds:
        return None
    wrong = [(what, int(v), lo, hi) for what, v, (lo, hi) in zip(("height", "width"), size, bounds)
             if (lo is not None and v < lo) or (hi is not None and v > hi)]
    if not wrong:
        return None
    return ", ".join(f"{what} {v} (it takes {'any' if lo is None else lo}..{'any' if hi is None else hi})"
                     for what, v, lo, hi in wrong)


def size_bounds_problem(info: ModelInfo, size: tuple[int, int]) -> Optional[str]:
    """What is wrong with feeding ``info``'s model an image of ``size`` ``(H, W)`` when it is a ``.pt2`` program with
    bounded dynamic height and width (``info.extra["size_bounds"]``, :func:`_size_bounds`): which side is outside
    which range, and the flags that resize (the program refuses it with torch's guard error); ``None`` when it fits
    or the program has no bounds. What a command checks each image it read with (``--resize-mode none``, a model
    with no size of its own: each image at its own size)."""
    said = sides_out_of_bounds(info, size)
    if said is None:
        return None
    return (f"{info.name} was exported with bounded dynamic sizes and takes no input of {int(size[0])} x "
            f"{int(size[1])}: {said}; resize the images into its range (--size H,W with --resize-mode, or size= of "
            "with_preprocessing), or export it again with wider Dim(min=, max=)")


def _flags_eval(self: nn.Module) -> nn.Module:
    for m in self.modules():
        m.training = False
    return self


def _input_shape(ep: Any) -> Optional[tuple]:
    """The first user input's shape, ints where static (``None`` when unknown)."""
    names = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            if isinstance(val, Tensor):
                return tuple(int(v) if isinstance(v, int) else v for v in val.shape)
    return None


def _check_exported(p: Path, ep: Any) -> None:
    """Refuse a program that salience cannot run as exported: more inputs than the image batch, train mode,
    or a fixed batch."""
    inputs = list(ep.graph_signature.user_inputs)
    if len(inputs) > 1:  # it loaded, then every method stopped with torch's raw "Trying to flatten user inputs"
        raise SalienceError(
            f"{p}: exported with {len(inputs)} inputs ({', '.join(inputs)}); salience calls the model with the image "
            "batch alone: export a module whose forward(x) takes the image batch alone and gives the model the rest")
    name = train_mode_op(ep.graph)
    if name is not None:
        raise SalienceError(
            f"{p}: exported in train mode ({name} with training on), and an exported graph keeps that mode: "
            "BatchNorm would mix the images of a batch. Export it after model.eval()")
    shape = _input_shape(ep)
    if shape and isinstance(shape[0], int):
        raise SalienceError(
            f"{p}: exported with a fixed batch size of {shape[0]}; salience runs batches of other sizes (noisy "
            "copies, path points). Export with a dynamic batch: torch.export.export(model, (x,), "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) with x of batch 2 or more")
