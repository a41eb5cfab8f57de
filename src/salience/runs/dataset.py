"""``salience.explain_dataset``: a whole dataset explained into a store (:mod:`salience.runs.store`),
streamed, resumable, with DataLoader workers decoding while the model runs.

The images are numbered ``0..N-1`` in a stable order. Shards hold the images whose maps were
computed together (at most ``shard_size``); a shard is named after its first image (another name
when a committed shard has it: :meth:`Store.shard_name`). A run that
stops (a crash, ``kill -9``, Ctrl-C) and is started again with the same command computes only
the images that no committed shard holds, in the same batches as before, so the finished store
equals an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from salience._core import perf as _perf
from salience._core.errors import ArgumentError, SalienceError
from salience._core.files import atomic_write, folder_name, one_name
from salience.loading.custom import size_bounds_problem
from salience._core.guard import run_guard
from salience._core.malloc import kept_free_bytes, release_shared_heap
from salience._core.info import ModelInfo, max_batch, model_info
from salience._core.progress import progress
from salience._core.tensors import check_flag, check_int, copy_model, model_device
from salience.evidence._checks import check_count
from salience.evidence.evaluate import STEPS_MEANING
from salience.loading import load_model, remote
from salience.loading.images import DEFAULT_MAX_PIXELS, preprocessing_record
from salience.loading.models import name_classes, resolve_device
from salience.methods import METHODS, as_method
from salience.methods._multi import bound_problem, shape_problem
from salience.methods.options import check_bound_values, with_options
from salience.render import viz
from salience.runs import gallery, job, sources
from salience.runs.lock import run_lock
from salience.runs.store import FORMAT, ITEM_LABELS, Planned, Run, Store, check_folder, done_indices

PathLike = Union[str, "os.PathLike[str]"]
METRICS = ("insertion", "deletion", "pointing", "energy")
ENGINES = ("local", "ray")


@dataclass
class Job:
    """Everything a run needs, checked: the model, the plan of each batch, the dataset, the store."""

    model: nn.Module
    plan: job.Plan
    dataset: Dataset
    store: Store
    batch: int
    workers: int
    spec: Any  # what the Ray actors load the model from: a spec string or the module itself
    worker_init: Optional[Callable[[int], None]] = None  # a given DataLoader's worker_init_fn (the local engine's)
    worker_context: Any = None  # a given DataLoader's multiprocessing_context (the local engine's; None: the run's)


def explain_dataset(  # long: the documented keywords, checked one by one, then one call per step
    model: Union[nn.Module, str],
    images: Any,
    methods: Union[str, Sequence[str], Mapping[str, Callable[..., Any]]] = ("vanilla",),
    out: PathLike = "salience-run",
    *,
    target: Optional[int] = None,
    top: Optional[int] = None,
    mode: str = "increase",
    labels: Union[None, PathLike, Sequence[Optional[int]]] = None,
    masks: Optional[PathLike] = None,
    metrics: Union[bool, Sequence[str]] = False,
    metric_steps: int = 32,
    batch_size: Optional[int] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    shard_size: int = 256,
    png: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    num_gpus: float = 0,
    actors: Optional[int] = None,
    address: Optional[str] = None,
    map_dtype: str = "float16",
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    weights: Optional[str] = None,
    method_options: Optional[Mapping[str, Any]] = None,
    show_progress: bool = False,
    model_spec: Optional[str] = None,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable[..., Any]] = None,
    precision: Optional[str] = None,
    fold_batchnorm: Optional[bool] = None,
) -> Run:
    """Explain every image of ``images`` with ``methods`` into the run folder ``out``; returns the run
    (:func:`salience.open_run`).

    ``model``: a module, or a spec (``"torchvision:resnet50"``, ``"demo:shapes"``). ``images``: a
    folder, a glob, a ``.txt`` list, a list of paths, a ``torch.utils.data.Dataset`` (or a
    ``DataLoader`` of one) whose items are the model's input ``(C, H, W)`` or ``(input, label)``.
    Targets: the predicted class (default), the ``top`` K classes, one fixed ``target`` class, or
    the label of each image (``labels``: a CSV ``path,label`` or one label per image, a class
    index or name; labels also fill the ``label`` / ``correct`` columns; a dataset's own labels are
    read with its images, or from its ``samples`` / ``targets`` where it has them: docs/datasets.md). A regression model
    (``task="regression"``) or a model with one output: ``target`` is the output to explain (default 0) and ``mode`` what the
    map shows (``"increase"``, ``"decrease"``, ``"maintain"``: :func:`salience.targets.regression`),
    and the rows hold the output's ``value`` instead of a class. ``metrics``: ``True`` for insertion and deletion AUC
    (and pointing game / energy in mask when ``masks``, a folder of masks by file stem, is
    given) or a list of those names; ``metric_steps``: points of the insertion / deletion curves.
    ``batch_size``: default from memory. ``workers``: DataLoader
    processes decoding images (default: up to 4, one core left to the model; forked, or from a forkserver on CUDA
    and from the second run of a process that keeps a large freed heap, where a fresh worker decodes alike, or as a
    given DataLoader's ``multiprocessing_context`` says: docs/datasets.md). ``engine``:
    ``"local"`` or ``"ray"`` (``num_gpus`` per actor, ``actors`` in the pool, ``address`` of the
    cluster). ``method_options``: keyword options per method, e.g. ``{"smoothgrad": {"samples": 8}}``
    (part of the run's command). ``model_spec``: the name of a given module in the run's command (default: its class
    and a digest of its weights). Running it again with the same arguments continues a stopped run (the same
    images named by other paths too: ``imgs``, ``./imgs/``, an absolute path); different arguments on
    an existing run raise, saying what differs, unless ``overwrite``; while a run writes ``out``,
    another one on it raises at once (a lock the system releases when the process ends). ``memory_format``, ``compile``,
    ``precision`` and ``fold_batchnorm``: how the methods' passes run (``None``: the settings of
    :func:`salience.set_performance`; docs/performance.md), on both engines. ``memory_format``, ``compile`` and
    ``fold_batchnorm`` change how the maps are computed, not what (float rounding), so they are not part of the
    run's command (a run started without them may be continued with them); ``precision`` is (bf16 maps differ
    from fp32's beyond rounding: the pixel-gradient maps by 0.1-0.6 in relative L2, docs/performance.md): a run is
    continued in the precision it was begun in, another one refused unless ``overwrite``. SmoothGrad gives image
    ``i`` the seed ``(seed * 1_000_003 + i) % 2**63`` (:func:`salience.runs.job.image_seed`), so its map does not
    depend on the batch (docs/datasets.md); ``seed=None`` of SmoothGrad or RISE is the run's seed, drawn
    once when the run begins and kept in its ``run.json``, so a continued run equals an uninterrupted one.
    """
    png, overwrite, show_progress = (check_flag(v, n) for v, n in ((png, "png"), (overwrite, "overwrite"),
                                                                   (show_progress, "show_progress")))
    if engine not in ENGINES:
        raise SalienceError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    _check_local(engine, num_gpus, actors, address)
    # the checked values kept (numpy's ints as ints: run.json is written from them)
    shard_size = check_int(shard_size, "shard_size", minimum=1)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", minimum=1)
    if max_pixels is not None:
        max_pixels = check_int(max_pixels, "max_pixels", minimum=1, what="the largest image in pixels; None for no "
                               "limit")
    if map_dtype not in ("float16", "float32"):
        raise SalienceError(f"map_dtype must be float16 or float32, got {map_dtype!r}")
    perf = _perf.resolve(memory_format, compile, precision, fold_batchnorm)
    folder = _out_folder(out)
    spec = model if isinstance(model, str) else model_spec
    device = resolve_device(device)
    module = _model(model, device, weights)
    fns, options = _methods(methods, method_options)
    dataset, paths, loader = _dataset(images, module)
    first = _first_pending(folder, len(paths), overwrite)  # the one item read before the run: its first to do
    info, n_out = _info(module, dataset, first)
    regression = info.task == "regression" or n_out == 1
    given_labels = _dataset_labels(dataset, first) if labels is None else None
    label_list = _labels(labels, given_labels, paths, info, None if regression else n_out)
    item_labels = isinstance(label_list, str)  # ITEM_LABELS: each read with its image, in the run
    known_labels = None if item_labels else label_list
    if regression:
        target_mode, k = _regression_mode(target, top, label_list, mode, n_out, info)
    else:
        target_mode, k = _mode(target, top, label_list, info, n_out, mode)
    mask_list = sources.mask_files(paths, masks) if masks is not None else None
    if isinstance(dataset, sources.ImageFiles):
        dataset = sources.ImageFiles(paths, info, max_pixels, mask_list)
    _check_option_values(module, dataset, first, info, fns, method_options)  # before any file is written
    metric_names = _metric_names(metrics, masks is not None)
    metric_steps = check_int(metric_steps, "metric_steps", minimum=1)
    if metric_names and info.input_size is not None:  # its passes, once: not every row's metric error
        check_count(metric_steps, "metric_steps", 1, STEPS_MEANING, info.input_size[0] * info.input_size[-1])
    if regression and target is None:
        target = 0
    plan = job.Plan(fns, info, paths, mode=target_mode, k=k, fixed=target, labels=known_labels, metrics=metric_names,
                    metric_options={"steps": metric_steps}, direction=mode, item_labels=item_labels,
                    classes=None if regression else n_out)
    planned = Planned(paths, known_labels, mask_list, files=isinstance(dataset, sources.ImageFiles))
    command = {
        "model": spec or _module_id(module), "weights": weights, "methods": list(fns), "method_options": options,
        "targets": {"mode": target_mode, "k": k, "class": target, **({"direction": mode} if regression else {})},
        "labels": ITEM_LABELS if item_labels else sources.digest(label_list) if label_list is not None else None,
        "masks": sources.digest(planned.canonical(mask_list)) if mask_list is not None else None,
        "metrics": metric_names, "metric_steps": metric_steps if metric_names else None, "preprocessing": preprocessing_record(info), "map_dtype": map_dtype,
        "shard_size": shard_size, "png": bool(png), "max_pixels": max_pixels,
        "precision": perf.precision,  # bf16 / fp16 maps differ from fp32's beyond rounding: one precision a run
        "inputs": {"count": len(paths), "digest": sources.digest(planned.canonical(paths)), "form": "absolute"},
        **({"per_image_seeds": seeded} if (seeded := job.per_image_seeds(fns)) else {}),
    }
    # the command as a salience before canonical paths wrote it (a run it began is continued)
    legacy = {**command, "inputs": {"count": len(paths), "digest": sources.digest(paths)},
              "masks": sources.digest(mask_list) if mask_list is not None else None}
    manifest = {"format": FORMAT, "command": command, "task": "regression" if regression else "classification",
                "methods": list(fns), "labels": label_list is not None,
                "metrics": metric_names, "k": k, "map_dtype": map_dtype, "png": bool(png),
                "class_names": list(info.class_names or ()), "thumb": job.THUMB,
                "sprite_columns": job.SPRITE_COLUMNS, "seed": job.draw_seed(),  # a continued run keeps its own
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cwd": os.getcwd()}  # where the relative paths of inputs.parquet are from
    if workers is None:
        workers = loader.num_workers if loader is not None else min(4, max((os.cpu_count() or 1) - 1, 0))
    workers = check_int(workers, "workers", minimum=0)
    check_folder(folder, overwrite)
    with run_lock(folder) as writer:  # one writer: a second run on this folder is refused while this one lives
        store = Store(folder, manifest, overwrite=overwrite, legacy=legacy, planned=planned)
        if known_labels is not None and store.manifest["command"].get("labels") == ITEM_LABELS:
            # begun reading its labels with each item, continued with labels given up front that its committed
            # rows hold (Store checked them): still a run of the labels its items carry, and each item still to
            # explain must carry its given label (a run's rows are one set of labels, whichever call wrote them)
            plan.labels, plan.item_labels = None, True
            plan.begun_labels, plan.labels_given = (str(store.folder), list(known_labels)), True
            item_labels, known_labels = True, None  # its inputs.parquet holds no labels (the rows do)
        store.write_inputs(paths, known_labels, mask_list)
        plan.paths = store.input_paths()  # a continued run's rows keep the paths its first command gave
        plan.map_dtype = store.manifest.get("map_dtype", map_dtype)  # a continued run's: its shards are stored so
        plan.seed = store.manifest["seed"]  # what seed=None stands for, drawn when the run began
        if item_labels and (begun := store.begun_labels()) is not None:  # begun with labels up front: kept
            plan.begun_labels = (str(store.folder), begun)
        if item_labels and first not in store.done():
            # the first image still to explain, read before the run anyway: its label checked now (one of the
            # model's classes, the one the run was begun with), not when its batch comes; the others when read
            plan.label(sources.read_once(dataset, first))
        run = Job(module, plan, dataset, store, batch_size or 0, workers, model if isinstance(model, str) else module,
                  *((loader.worker_init_fn, loader.multiprocessing_context) if loader is not None else ()))
        if engine == "ray":  # the driver holds the lock; the actors write shards while it holds it (writer)
            from salience.runs import ray_engine

            ray_engine.run(run, num_gpus=num_gpus, actors=actors, address=address, show=show_progress, png=png,
                           weights=weights, performance=perf, writer=writer)
        else:
            with _perf.performance(**vars(perf)):
                run_local(run, show=show_progress, png=png)
        store.merge_index()
        gallery.write(store.folder)
    return Run(store.folder)


# --------------------------------------------------------------------------------- checks


def _out_folder(out: PathLike) -> Path:
    """The run folder: a local path (or a mounted one); an object storage URL is refused, and an empty name (the
    current folder, where a run was written among the user's files)."""
    text = os.fspath(out)
    folder_name(text)  # an empty name refused (not as a Path: s3://b/r would be s3:/b/r)
    if remote.is_remote(text):
        raise SalienceError(f"out={text}: a run folder must be a local (or mounted) folder, not object storage "
                            "(resuming needs atomic renames and a lock); write it locally, then copy it "
                            "(e.g. aws s3 sync)")
    return Path(text)


def _model(model: Union[nn.Module, str], device: Optional[torch.device], weights: Optional[str]) -> nn.Module:
    if isinstance(model, str):
        return load_model(model, weights=weights, device=device)
    if not isinstance(model, nn.Module):
        raise SalienceError(f"model must be an nn.Module or a spec string, got {type(model).__name__}")
    if device is not None and model_device(model) != device:
        return copy_model(model).to(device)  # the caller's model stays where it is
    return model


def _module_id(model: nn.Module) -> str:
    """A module's name in the command: its class and a digest of its weights (a module's extra state that is not a
    tensor, ``get_extra_state``'s any object, by its ``repr``)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.detach().float().cpu().numpy().tobytes())
    return f"module:{type(model).__name__}:{h.hexdigest()[:16]}"


def _methods(methods: Any, options: Optional[Mapping[str, Any]]) -> tuple[dict[str, Callable[..., Any]], dict]:
    """Names -> functions, and a JSON record of the options (for the command)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    elif callable(methods) or not isinstance(methods, (Mapping, Iterable)):  # any iterable of names: METHODS.keys()
        raise SalienceError(f"methods must be names or a dict of name: function, e.g. {{'mine': fn}}; got "
                            f"{type(methods).__name__}")
    if options is not None and not isinstance(options, Mapping):
        raise SalienceError(f"method_options must be a dict of method name: options, e.g. {{'smoothgrad': "
                            f"{{'samples': 8}}}}; got {type(options).__name__}")
    if isinstance(methods, Mapping):  # the registry's contract (a target-free function takes the target too)
        fns = {name: as_method(fn) for name, fn in methods.items()}
    else:
        fns = {}
        for name in methods:
            if callable(name):
                raise SalienceError(f"a method given as a function needs a name: methods={{"
                                    f"{getattr(name, '__name__', 'mine')!r}: fn}} (a dict of name: function)")
            if name not in METHODS:
                raise SalienceError(f"unknown method {name!r} (available: {', '.join(METHODS)})")
            fns[name] = METHODS[name]
    if not fns:
        raise SalienceError("no method given; e.g. methods=['vanilla', 'gradcam']")
    for name in fns:
        if not one_name(name):  # its maps are in maps/<name>/: one folder inside the run's (what its readers check)
            raise SalienceError(f"method name {name!r} cannot name a folder of the store (no '/', NUL, or leading "
                                "'.'; on Windows no ':', which names a file's data stream); rename it")
    for name, fn in fns.items():  # a keyword a user's functools.partial binds that its function does not take
        problem = bound_problem(fn)
        if problem is not None:
            raise ArgumentError(f"methods[{name!r}]: {problem}")
    for name, given in (options or {}).items():
        fns[name] = with_options(fns, name, given)
    for name, fn in fns.items():  # with its options bound: a user's function that takes no target, or a keyword-only
        problem = shape_problem(fn)  # argument without a default, was the TypeError at the first image
        if problem is not None:
            raise ArgumentError(f"methods[{name!r}]: {problem}")
    record = {n: {k: repr(v) for k, v in getattr(fn, "keywords", {}).items()} for n, fn in fns.items()}
    return fns, record


def _dataset(images: Any, model: nn.Module) -> tuple[Dataset, list[str], Optional[DataLoader]]:
    """The dataset, a path per index, and the DataLoader given (its workers and ``worker_init_fn`` are the run's).
    No item is read."""
    loader = None
    if isinstance(images, DataLoader):
        loader = images
        images = images.dataset
    if isinstance(images, Dataset) and not isinstance(images, (str, Path)):
        wrapped = sources.Wrapped(images)
        return wrapped, [f"{type(images).__name__}[{i}]" for i in range(len(wrapped))], loader
    if isinstance(images, torch.Tensor) or isinstance(images, np.ndarray) and images.dtype.kind not in "USO":
        raise SalienceError(f"images is a {type(images).__name__} of shape {tuple(images.shape)}; give a dataset of "
                            "its images, e.g. torch.utils.data.TensorDataset(images) for (N, C, H, W) tensors")
    try:
        specs = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    except TypeError:  # not iterable
        specs = [None]
    if not all(isinstance(p, (str, os.PathLike)) for p in specs):
        raise SalienceError("images must be a folder, a glob, a .txt list, a list of image paths, or a "
                            "torch.utils.data.Dataset (or DataLoader) of (C, H, W) tensors; got "
                            f"{type(images).__name__}")
    paths = sources.expand(specs)
    return sources.ImageFiles(paths, model_info(model)), paths, None


def _first_pending(folder: Path, n: int, overwrite: bool) -> int:
    """The first of the ``n`` images that the run in ``folder`` has still to explain (0 for a new run,
    and when every image is done): the item the run reads before it starts (:meth:`Wrapped.probe`)."""
    if overwrite or not (folder / "run.json").is_file():
        return 0
    try:
        done = done_indices(folder)
    except (OSError, ValueError, SalienceError):
        return 0
    return next((i for i in range(n) if i not in done), 0)


def _check_option_values(model: nn.Module, dataset: Dataset, first: int, info: ModelInfo,
                         fns: Mapping[str, Callable[..., Any]], given: Optional[Mapping[str, Any]]) -> None:
    """Each ``method_options`` value checked by its method (:func:`salience.methods.options.check_bound_values`,
    as ``salience explain DIR`` and ``run_evaluation`` check them) on the first image the run reads
    (item ``first``), or, where it cannot be read, a blank image of the model's input size; neither (an
    empty dataset): nothing to check, nothing explained. The run folder is not made yet."""
    if not given or not any(given.values()) or not len(dataset):
        return
    item = sources.read_once(dataset, first)
    if item.error is None:
        x = item.x[None]
    elif info.input_size is not None:
        x = torch.zeros(1, info.channels, *info.input_size)
    else:
        return
    from salience._core.autograd import model_input

    check_bound_values(model, model_input(model, x), fns, given)


def _dataset_labels(dataset: Dataset, first: int) -> Union[None, list, str]:
    """The labels a user's dataset carries: all of them where it says them without reading its items
    (:func:`sources.dataset_labels`: an ``ImageFolder``'s ``samples``, CIFAR's ``targets``, ...);
    else :data:`ITEM_LABELS` when its items are ``(image, label)`` (item ``first`` is read to know),
    each label then read with its image in the run; ``None``: no labels."""
    if not isinstance(dataset, sources.Wrapped) or not len(dataset):
        return None
    known = dataset.known_labels()
    if known is not None:
        return known
    return ITEM_LABELS if dataset.probe(first).label is not None else None


def _info(model: nn.Module, dataset: Dataset, first: int = 0) -> tuple[ModelInfo, int]:
    """The model's info, with class names (ImageNet's for 1000 outputs without names), and its
    number of outputs (a model without class names run on a user's dataset's item ``first``)."""
    info = model_info(model)
    problem = size_bounds_problem(info, info.input_size) if info.input_size is not None else None
    if problem is not None:  # every image is read at this size: a .pt2 program's Dim(min=, max=), not torch's guard
        raise SalienceError(f"the run's input size: {problem}")
    out = _num_outputs(model, dataset, info, first)
    named, _ = name_classes(info, out, None)
    if named.task not in ("classification", "regression"):
        raise SalienceError(f"{info.name} is a {named.task} model; dataset runs explain classifiers and regression "
                            "models")
    return named, out


def _num_outputs(model: nn.Module, dataset: Dataset, info: ModelInfo, first: int = 0) -> int:
    if info.class_names:
        return len(info.class_names)
    from salience._core.autograd import forward_scores, model_input

    c = info.channels
    h, w = info.input_size or (64, 64)
    x = model_input(model, torch.zeros(1, c, h, w))
    if isinstance(dataset, sources.Wrapped) and len(dataset):
        x = model_input(model, dataset.probe(first).x[None])
    return int(forward_scores(model, x, strip_softmax=False).reshape(1, -1).shape[1])


def _labels(labels: Any, given: Union[None, list, str], paths: Sequence[str], info: ModelInfo,
            n_classes: Optional[int]) -> Union[None, list, str]:
    """Each image's label (``None``: none), each checked against the ``n_classes`` classes (a
    regression run: ``None``, no check; its labels are refused later); :data:`ITEM_LABELS` (the
    dataset's items carry them) as it is: each is checked when its image is explained
    (:meth:`job.Plan.label`)."""
    if labels is None:
        if isinstance(given, str):
            return given
        out = given
    elif isinstance(labels, (str, Path)):
        return sources.read_labels_csv(labels, paths, info.class_names, n_classes)
    else:
        out = [_label(v, i, paths, info) for i, v in enumerate(labels)]
        if len(out) != len(paths):
            raise SalienceError(f"labels has {len(out)} entries for {len(paths)} images; give one per image")
    for i, v in enumerate(out or ()):
        if v is not None and n_classes is not None and not 0 <= v < n_classes:
            raise SalienceError(f"label {v} of image {i} ({paths[i]}) is out of range for the model's {n_classes} "
                                f"classes (0..{n_classes - 1}); fix the labels")
    return out


def _label(value: Any, i: int, paths: Sequence[str], info: ModelInfo) -> Optional[int]:
    """One given label: ``None``, a class index (an int, or its digits) or a class name."""
    if value is None:
        return None
    if isinstance(value, str):
        names = {n.lower(): c for c, n in enumerate(info.class_names or ())}
        if value.strip().lstrip("-").isdigit():
            return int(value)
        if value.strip().lower() in names:
            return names[value.strip().lower()]
        raise SalienceError(f"label {value!r} of image {i} ({paths[i] if i < len(paths) else '?'}) is neither a class "
                            f"index nor a class name of {info.name}")
    if (c := sources.class_index(value)) is not None:  # as a dataset's own labels: 2.0, an (N, 1) tensor's rows
        return c
    # int() made 0.5 class 0, silently
    raise SalienceError(f"label of image {i} must be an int, got {value!r}: a class index (2.0 is one, 0.5 is not) "
                        "or a class name")


def _mode(target: Optional[int], top: Optional[int], labels: Union[None, list, str], info: ModelInfo,
          n_out: int, mode: str = "increase") -> tuple[str, int]:
    """How targets are chosen and how many per image, ``target`` and ``top`` checked against the
    classes (the model's ``n_out`` outputs when it names none); ``mode`` is a regression model's only."""
    from salience.targets import REGRESSION_MODES

    if mode not in REGRESSION_MODES:
        raise SalienceError(f"mode must be one of {', '.join(REGRESSION_MODES)}, got {mode!r}")
    if mode != "increase":  # "decrease" on a classifier was ignored: the maps of the class's increase, silently
        raise SalienceError(f"mode {mode!r} is for a regression model or a model with one output; {info.name} is a "
                            f"classifier with {n_out} outputs: leave mode out (its maps show what raises the class)")
    if target is not None and top is not None:
        raise SalienceError("give target or top, not both")
    n = len(info.class_names or ()) or n_out
    if target is not None:
        check_int(target, "target", minimum=0)
        if n is not None and target >= n:
            raise SalienceError(f"target class {target} is out of range for {info.name} with {n} classes")
        return "target", 1
    if top is not None:
        check_int(top, "top", minimum=1)
        if n is not None and top > n:
            raise SalienceError(f"top {top} is more than the model's {n} classes; use top {n} or less")
        return "top", top
    return ("label", 1) if labels is not None else ("predicted", 1)


def _check_local(engine: str, num_gpus: float, actors: Optional[int], address: Optional[str]) -> None:
    """Ray's options refused on the local engine, which has no actors, GPUs per actor nor cluster: silently
    ignored, ``num_gpus=1`` would run on the CPU (or ``num_gpus=-1`` pass) as if it had been understood."""
    if engine != "local":
        return
    given = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in (("num_gpus", num_gpus), ("actors", actors), ("address", address))
             if v is not None and not (k == "num_gpus" and isinstance(v, (int, float)) and v == 0)]
    if given:
        raise SalienceError(f"{', '.join(given)} given, but the local engine runs no Ray actors: give engine='ray' "
                            "(pip install 'salience[ray]') or leave them out (device= picks the local engine's "
                            "device)")


def _regression_mode(target: Optional[int], top: Optional[int], labels: Union[None, list, str], mode: str, n_out: int,
                     info: ModelInfo) -> tuple[str, int]:
    """A regression (or one-output) model: one target, the output ``target`` (default 0) in ``mode``. On a model
    with one output that is no regression model ``top=1`` is that one target (as ``target=0``, the map a run of image
    files gives for ``--top 1``), a larger ``top`` refused in a run of files' words (:func:`one_output_top`)."""
    from salience.targets import REGRESSION_MODES

    what = "a regression model" if info.task == "regression" else "a model with one output"
    if top is not None and info.task != "regression":
        check_int(top, "top", minimum=1)
        if target is not None:
            raise SalienceError("give target or top, not both")
        if top > 1:  # refused as a run of image files refuses --top 2 (the lead's decision, session 54)
            raise SalienceError(one_output_top(top, info))
    elif top is not None:
        raise SalienceError(f"top ranks classes, but {info.name} is {what}; give target=OUTPUT and "
                            "mode=MODE (increase, decrease or maintain)")
    if labels is not None:
        raise SalienceError(f"labels are classes, but {info.name} is {what}; leave out labels=")
    if mode not in REGRESSION_MODES:
        raise SalienceError(f"mode must be one of {', '.join(REGRESSION_MODES)}, got {mode!r}")
    if target is not None:
        check_int(target, "target", minimum=0)
        if target >= n_out:
            raise SalienceError(f"output {target} is out of range for {info.name} with {n_out} output(s)")
    return "regression", 1


def one_output_top(top: int, info: ModelInfo, *, flags: bool = False) -> str:
    """The refusal of ``top`` (> 1) on a model with one output that is no regression model: its one output (named
    where the model names it) is the one target there is; ``top=1`` is that target. ``flags``: said with the command
    line's flags (``--top``, ``--target 0``) rather than the keywords, for a run of image files (a dataset run's
    refusals are said so by the command, :func:`salience.cli.common.with_flags`)."""
    name = info.class_name(0)
    output = "output 0" + (f", {name}" if name != "0" else "")
    said, target = ("--top", "--target 0") if flags else ("top", "target=0")
    return (f"{said} {top} ranks classes, but {info.name} has one output ({output}): it is the one target there is; "
            f"leave {said} out (or give {target})")


def _metric_names(metrics: Union[bool, Sequence[str]], masks: bool) -> list[str]:
    if metrics is None or isinstance(metrics, np.bool_):  # None: no metrics; numpy's bools are bools
        metrics = bool(metrics)
    if not isinstance(metrics, (bool, str, Sequence)):
        raise SalienceError(f"metrics must be True, False or metric names, e.g. ['deletion', 'insertion']; got "
                            f"{metrics!r}")
    if metrics is True:
        return ["insertion", "deletion"] + (["pointing", "energy"] if masks else [])
    if not metrics:
        return []
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    for m in names:
        if m not in METRICS:
            raise SalienceError(f"unknown metric {m!r} (available: {', '.join(METRICS)})")
        if m in ("pointing", "energy") and not masks:
            raise SalienceError(f"metric {m} needs masks=DIR (a folder of masks by file stem)")
    return names


# --------------------------------------------------------------------------------- the local engine


def pending_shards(store: Store, n: int) -> list[list[int]]:
    """The images still to explain, grouped in shards: the index range ``[s*S, (s+1)*S)`` less the
    images already stored."""
    size = int(store.manifest["command"]["shard_size"])
    done = store.done()
    shards = []
    for start in range(0, n, size):
        todo = [i for i in range(start, min(start + size, n)) if i not in done]
        if todo:
            shards.append(todo)
    return shards


def resolve_batch(run: Job, first: int) -> int:
    """The batch size: given, or the run's earlier one, or chosen from memory (then kept in run.json)."""
    manifest = run.store.manifest
    size = int(manifest["command"]["shard_size"])
    if run.batch:
        batch = run.batch
    elif manifest.get("batch"):
        batch = int(manifest["batch"])
    else:
        cap = 256 if model_device(run.model).type == "cuda" else 64
        item = sources.read_once(run.dataset, first)
        batch = job.choose_batch(run.model, item, run.plan, cap) if item.error is None else 16
    batch = min(batch, size, max_batch(run.model) or batch)  # a program exported with Dim("batch", max=N)
    if manifest.get("batch") != batch:
        manifest["batch"] = batch
        import json

        atomic_write(run.store.folder / "run.json", json.dumps(manifest, indent=2).encode("utf-8"))
    return batch


def _batches(shards: list[list[int]], batch: int) -> Iterator[tuple[int, list[int]]]:
    for s, shard in enumerate(shards):
        for b in range(0, len(shard), batch):
            yield s, shard[b:b + batch]


def run_local(run: Job, *, show: bool = False, png: bool = False) -> None:
    """Explain the pending shards: a DataLoader decodes batches in its workers while the model runs;
    a shard is written when its last batch is done. The model is held by one guard for the whole run
    (:func:`salience._core.guard.run_guard`: saved and restored once, each method call put back to the
    run's state when it leaves), not saved and restored by every method call of every batch; under
    ``memory_format="channels_last"`` the weights' channels-last copies are made once for the run
    (by the same guard, :func:`salience._core.layouts.open_copies`), each call swapping them in and out."""
    shards = pending_shards(run.store, len(run.plan.paths))
    if not shards:
        return
    with run_guard(run.model):  # channels-last weights copied once a run, not a call, too
        _run_shards(run, shards, show, png)


WRITER_QUEUE = 2
"""Batches the local engine's writer thread may hold while the model runs the next (memory stays
flat: the queue is bounded); ``0``: the store's work runs in the main thread, between batches."""


SHARED_HEAP = 256 << 20
"""Free heap, in bytes, from which a CPU run's decoding workers start from a forkserver rather than forking the run's
process (:func:`loader_context`): under ``allocator="reuse"`` the process keeps the activations its passes freed, a
forked worker shares them copy-on-write, and the run's passes then fault every page of them once more (0.2-0.3 s of
system time per GB, docs/performance.md, session 42)."""


def loader_context(device: torch.device, workers: int, dataset: Any = None) -> Optional[str]:
    """The DataLoader's multiprocessing start method: ``"forkserver"`` when workers decode and either the run's device
    is CUDA (forking a process that has CUDA and threads running is unsafe: Python 3.12 warns; ``"spawn"`` where there
    is no forkserver) or the process keeps at least :data:`SHARED_HEAP` bytes of freed heap (``allocator="reuse"``,
    :func:`kept_free_bytes`) and a forkserver runs for it (:func:`_forkserver_ready`: the first such run forks and
    starts none, the second starts the server and uses it, as the runs after it do); else ``None``, the platform's default (fork on
    Linux: the quickest to start). On either device the workers fork as before where a worker started afresh could
    not get the same ``dataset`` (with the ``worker_init_fn`` of the user's DataLoader, :func:`_loader`) or decode it
    the same way (:func:`_afresh_decodes_alike`: one check for both devices since session 44; a CUDA run checked only
    that the dataset pickles before, and its workers read images as error rows that the run's own process, under
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` or a third-party opener, maps; a CUDA run's dataset over the pickle limit
    keeps the forkserver)."""
    import multiprocessing

    if workers <= 0:
        return None
    cuda = device.type == "cuda"
    if not cuda and kept_free_bytes() < SHARED_HEAP:
        return None
    if not _afresh_decodes_alike(dataset, cuda):
        return None
    if cuda:
        return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return "forkserver" if _forkserver_ready() else None


def _afresh_decodes_alike(dataset: Any, cuda: bool = False) -> bool:
    """Whether a worker started afresh (from a forkserver, or spawned) gets ``dataset`` and decodes it as a forked one
    would: it comes back from its pickle within :data:`PICKLE_LIMIT` bytes naming nothing only this process can import
    (:func:`_sendable`), the script's top level would not run again (:func:`_main_guarded`: a fresh worker imports the
    script), and PIL decodes here as in a fresh process (:func:`_pil_fresh`). On ``cuda`` a dataset over the limit
    that pickles whole still counts: the limit is the CPU's cost rule (a fork shares the data for free), while on
    CUDA a fork is what a worker that touches CUDA (a dataset of CUDA tensors) cannot survive, torch's "Cannot
    re-initialize CUDA in forked subprocess"; such a dataset got a forkserver before session 44 too."""
    return _main_guarded() and _pil_fresh() and _sendable(dataset, PICKLE_LIMIT, whole=cuda)


PICKLE_LIMIT = 64 << 20
"""The largest pickle of a CPU run's dataset that a forkserver's workers are sent (each receives a copy); a bigger
one (its data in memory) is forked, which shares it for free."""


class _Limited(io.BytesIO):
    """A buffer that stops the pickle written to it past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise _OverLimit("over the limit")
        return super().write(data)


class _OverLimit(ValueError):
    """A pickle stopped by :class:`_Limited`."""


class _Sink:
    """A file that keeps nothing written to it: a pickle's whole length checked without its bytes."""

    def write(self, data: Any) -> int:
        return len(data)


def _sendable(dataset: Any, limit: int, whole: bool = False) -> bool:
    """Whether a forkserver's worker can receive ``dataset``: it pickles, within ``limit`` bytes (where ``whole``, a
    pickle over it is run to its end instead, neither kept nor unpickled: a CUDA run's, :func:`_afresh_decodes_alike`),
    names nothing of an interactive ``__main__`` (no file to import it from) nor of a ``python:FILE.py`` model's file
    (a module name only this process has, :func:`salience.loading.custom.user_modules`: a function its
    ``select_output`` stored in the ModelInfo the run's images carry), and unpickles (an object whose class's ``__init__`` takes other arguments than
    it keeps, e.g. an exception, pickles but does not come back: the worker would die)."""
    import pickle
    import types

    from salience.loading.custom import user_modules

    interactive = getattr(sys.modules.get("__main__"), "__file__", None) is None
    local = {m.__name__ for m in user_modules()} | ({"__main__"} if interactive else set())

    class Checker(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) in local:
                raise pickle.PicklingError(f"{obj.__qualname__} is defined in {obj.__module__}, which only this "
                                           "process can import")
            return NotImplemented

    buffer = _Limited(limit)
    try:
        Checker(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(dataset)
        pickle.loads(buffer.getbuffer())
    except _OverLimit:  # ``whole``: over the limit is fine where all of it pickles (not unpickled: no second copy)
        if not whole:
            return False
        try:
            Checker(_Sink(), protocol=pickle.HIGHEST_PROTOCOL).dump(dataset)
        except Exception:  # noqa: BLE001 - as below
            return False
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle: the worker is forked
        return False
    return True


def _pil_fresh() -> bool:
    """Whether PIL decodes in this process as in a fresh one (a forkserver's worker): ``ImageFile.LOAD_TRUNCATED_IMAGES``
    not set, and no opener registered from outside PIL (``pillow_heif.register_heif_opener()``); a forked worker
    inherits them, a forkserver's would read those images as error rows where the run without workers maps them."""
    image_file, image = sys.modules.get("PIL.ImageFile"), sys.modules.get("PIL.Image")
    if image_file is None or image is None:
        return True
    if getattr(image_file, "LOAD_TRUNCATED_IMAGES", False):
        return False
    return all(str(getattr(factory, "__module__", "")).startswith("PIL.") for factory, _ in image.OPEN.values())


def _main_guarded() -> bool:
    """Whether a forkserver may import ``__main__``: it has no file (a notebook, ``python -c``), was run with ``-m``
    (not imported by path), or the script's body stands inside its ``if __name__ == "__main__":`` block (or a
    function it calls: the top level then ran to the block that called it): the body of this thread's stack, or
    from another thread the main thread's (a ``ThreadPoolExecutor`` at an unguarded top level is not guarded; a
    main thread past its body, or none, is not either: its whole top level would run again)."""
    import ast
    import inspect

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True
    frame = _body(inspect.currentframe(), main)
    if frame is None and threading.current_thread() is not threading.main_thread():
        frame = _body(sys._current_frames().get(threading.main_thread().ident or -1), main)
    if frame is None:
        return False
    line = frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in
               ast.unparse(node.test) and node.lineno <= line <= (node.end_lineno or 0) for node in tree.body)


def _body(frame: Any, main: Any) -> Any:
    """The frame of ``main``'s (the script's) body in the stack that ``frame`` tops, ``None`` where there is none."""
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    return frame


_SERVER_ASKED = 0
"""How many runs of this process have asked :func:`_forkserver_ready` while no forkserver ran."""


def _forkserver_ready() -> bool:
    """Whether this process's forkserver runs for this run's workers. If not, it is started now when an earlier run of
    this process asked too (this is its second such run), and this run's workers start from it (their first start
    waits for the server's imports), with ``salience.runs.dataset`` added to the modules it imports once (its workers
    then import nothing; the default ``__main__`` kept); a process's first such run starts nothing (until session 44
    it did: a process with one run, a notebook's after some explained images, started a server it never used, a fresh
    interpreter of about 0.5 GB resident and 1.7 CPU s, docs/performance.md). Until session 45 the second run started
    the server in the background and forked its own workers, so a process with exactly two such runs forked both and
    paid for a server no run used. ``False`` where there is no forkserver (macOS's and Windows' spawn) or it could not
    be started (the workers fork)."""
    import multiprocessing
    from multiprocessing import forkserver

    global _SERVER_ASKED
    server = getattr(forkserver, "_forkserver", None)
    if "forkserver" not in multiprocessing.get_all_start_methods() or server is None:
        return False
    if getattr(server, "_forkserver_pid", None) is not None:
        return True
    _SERVER_ASKED += 1
    if _SERVER_ASKED < 2:
        return False
    preload = list(getattr(server, "_preload_modules", ["__main__"]))
    forkserver.set_forkserver_preload(preload + [m for m in ("salience.runs.dataset",) if m not in preload])
    try:
        with _sigint_ignored():
            forkserver.ensure_running()
    except OSError:  # no process or socket to be had: this run's workers fork, as the first run's did
        return False
    return getattr(server, "_forkserver_pid", None) is not None


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the forkserver is started (its process starts with SIGINT ignored, which Python then
    leaves as it is, and so do the workers it forks): a Ctrl-C while the server imported its modules (``__main__``,
    torch, salience: seconds) printed its ``KeyboardInterrupt`` traceback, harmless but alarming (session 46). A
    signal's mask would not do: the server's imports unblock it. The workers are stopped by the run's process (the
    DataLoader's shutdown as the Ctrl-C leaves the run). A Ctrl-C in the run's own process during the start itself
    (a fork and exec: milliseconds) is lost. Only in the main thread (elsewhere Python sets no handler): else as
    before."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _run_shards(run: Job, shards: list[list[int]], show: bool, png: bool) -> None:
    batch = resolve_batch(run, shards[0][0])
    plan_batches = list(_batches(shards, batch))
    # an error in a worker (a user's item that is no image tensor, a KeyError of the user's transform) comes
    # back as Raised and is raised here as it is; torch would re-raise it in its wrapping, the traceback its message
    # with workers=0 the error is raised as it is, a note naming the image (sources.Noted)
    loader = _decoded(run, plan_batches)
    total = sum(len(s) for s in shards)
    writer = _Writer(run, shards, png)
    try:
        with progress(total, "explain", enabled=show, unit="img") as bar:
            for (s, indices), items in zip(plan_batches, loader):
                for it in items:
                    if isinstance(it, sources.Raised):
                        it.reraise()
                writer.put(s, job.compute_items(run.model, items, run.plan))
                bar.update(len(items))
    except BaseException:
        loader.close()  # its workers stop now, not when the error's traceback (its frames: a notebook keeps it) goes
        writer.close(stopped=True)
        raise
    writer.close()


def _decoded(run: Job, plan_batches: list[tuple[int, list[int]]]) -> Iterator[list[Any]]:
    """The items of each planned batch, in order, from :func:`_loader`'s workers; where the run reads image files
    (its own dataset: no user's ``worker_init_fn`` or worker state to honour) and has a second batch, the first batch
    is decoded in this process while the workers start and decode the next: no batch can hide the first one's
    decoding, and this process would wait for it anyway (a worker's start and a busy decoding core on top). The same
    items either way (the same code reads them; an error that escapes it is raised as without workers,
    :class:`sources.Noted`: its note says the run's process, not a worker)."""
    head = bool(run.workers) and len(plan_batches) > 1 and isinstance(run.dataset, sources.ImageFiles)
    rest = iter(_loader(run, plan_batches[1:] if head else plan_batches))  # the workers start (and the second
    try:  # batch's indices are sent) before the first batch is decoded here
        if head:
            read = sources.Noted(run.dataset, run.plan.paths)  # an error raised as without workers (a note)
            yield sources.collate([read[i] for i in plan_batches[0][1]])
        yield from rest
    finally:  # closed by the run on an error or a Ctrl-C: the workers end with it
        stop = getattr(rest, "_shutdown_workers", None)
        if stop is not None:
            stop()


def _loader(run: Job, plan_batches: list[tuple[int, list[int]]]) -> DataLoader:
    """The run's DataLoader over its pending batches; each worker starts with :func:`_worker_start` (a forked one
    gives back the heap's free pages it shares with this process; one from a forkserver or spawn takes this process's
    environment; the user's DataLoader's ``worker_init_fn`` last). The start method: the user's DataLoader's
    ``multiprocessing_context`` when it has one, else :func:`loader_context`'s; a user's ``worker_init_fn`` that does
    not pickle forks the workers, as a dataset that does not."""
    dataset = (sources.Guarded if run.workers else sources.Noted)(run.dataset, run.plan.paths)
    user = run.worker_init if run.workers else None
    context = run.worker_context if run.workers else None
    if context is None:
        context = loader_context(model_device(run.model), run.workers, dataset if user is None else (dataset, user))
    forks = _forks(context)
    # salience's own start bound now (sent pickled to a forkserver's worker, which imports sources afresh); under
    # allocator="system" a forked worker gives nothing back either (its malloc_trim is the C allocator touched, after
    # an earlier pass under the default or "reuse" found glibc: session 49's review)
    release = forks and _perf.current().allocator != "system"
    init = functools.partial(_worker_start, release, user, sources.worker_init, None if forks else dict(os.environ),
                             parent=None if forks else os.getpid()) if run.workers else None
    return DataLoader(dataset, batch_sampler=[b for _, b in plan_batches], num_workers=run.workers,
                      collate_fn=sources.collate, worker_init_fn=init, persistent_workers=False,
                      multiprocessing_context=context)


def _forks(context: Any) -> bool:
    """Whether a DataLoader's workers of start method ``context`` (a name or a multiprocessing context) start by
    forking this process (``None``: the default's, ``"fork"`` on Linux before Python 3.14)."""
    import multiprocessing

    if context is not None:
        return (context if isinstance(context, str) else context.get_start_method()) == "fork"
    return (multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]) == "fork"


def _worker_start(forked: bool, user: Optional[Callable[[int], None]], own: Optional[Callable[[int], None]] = None,
                  env: Optional[dict[str, str]] = None, worker_id: int = 0, parent: Optional[int] = None) -> None:
    """A decoding worker's start: a ``forked`` one first gives back the heap's free pages it shares with the run's
    process (:func:`salience._core.malloc.release_shared_heap`, on glibc; ``forked`` is ``False`` under
    ``allocator="system"``, :func:`_loader`); one started afresh (a
    forkserver's, spawn's) takes ``env``, the run's environment when its DataLoader was made (a forkserver has the
    one it started with) and watches the run's process ``parent`` (:func:`_end_with`); then salience's own start
    (``own``: :func:`sources.worker_init` as it was then), then ``user``, the ``worker_init_fn`` of the DataLoader the
    run was given."""
    if forked:
        release_shared_heap()
    if parent is not None:
        _end_with(parent)
    if env is not None and env != os.environ:
        os.environ.clear()
        os.environ.update(env)
    (own or sources.worker_init)(worker_id)
    if user is not None:
        user(worker_id)


def _end_with(pid: int) -> None:
    """End this worker (``os._exit``) when the run's process ``pid`` ends, whatever way. A forkserver's worker is the
    server's child, not the run's: torch's watchdog (the worker's parent changed) never fires, and the server, which
    ends when its last client does, waits for the workers (each holds its "alive" pipe, as every child of the server
    does): a run's process killed (``SIGKILL``, an out-of-memory kill) left the server and its workers for good
    (session 46's review, so before the Ctrl-C change too; the Ctrl-C ignored by those workers since then leaves the
    run's process alone to stop them). A thread waits on a pidfd (Linux 5.3; else polls the pid each second)."""
    import select

    try:
        fd: Optional[int] = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable when the process has ended
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except OSError:
                    pass
        os._exit(1)

    threading.Thread(target=watch, name="salience-run-parent", daemon=True).start()


class _Writer:
    """The store's side of a local run: each batch's host work (:func:`job.finish_items`: summaries,
    float16 check, thumbnails), its PNG overlays, and each shard's commit when its last batch is done
    (float16 cast, sprite, the files), in a thread fed by a queue of :data:`WRITER_QUEUE` batches, so
    that it runs while the model runs the next batch; in order, as the main thread would. An error in
    the thread is raised in the main thread as it is, at its next batch or at the end; warnings are
    given in the main thread. ``WRITER_QUEUE = 0``: no thread, all of it in :meth:`put`."""

    def __init__(self, run: Job, shards: list[list[int]], png: bool):
        self.run, self.shards, self.png = run, shards, png
        self.current: list[job.Result] = []
        self.error: Optional[BaseException] = None
        self.halted = False  # a Ctrl-C while close() waits: the queued batches are dropped
        self.ended = threading.Event()  # set by the thread as it returns
        self.said: list[str] = []
        self.queue: Any = queue.Queue(maxsize=WRITER_QUEUE) if WRITER_QUEUE else None
        self.thread = threading.Thread(target=self._loop, name="salience-run-writer", daemon=True) if WRITER_QUEUE \
            else None
        if self.thread is not None:
            self.thread.start()

    def put(self, s: int, done: job.Computed) -> None:
        """Hand over shard ``s``'s next batch (blocks while the queue is full)."""
        if self.queue is None:
            self._handle(s, done)
        else:
            self._raise()
            self.queue.put((s, done))
        self._warn()

    def close(self, stopped: bool = False) -> None:
        """Wait for the queued batches' host work and the last shards' commits, then raise the
        thread's error, if any. ``stopped``: the main thread is raising an error of its own (Ctrl-C, a
        bad item): the batches it computed are still written, as when it did their host work itself,
        and that error is the one raised. A Ctrl-C while waiting: the thread takes no further batch,
        the one it is on is finished, and then the Ctrl-C is raised, never with the thread still
        writing (it would commit shards after the run, and its folder's lock, had ended)."""
        interrupted: Optional[BaseException] = None
        sent = self.queue is None
        while self.thread is not None and not self.ended.is_set():  # not is_alive(): an interrupted join
            try:  # marks a running thread stopped (Python < 3.13)
                if not sent:
                    self.queue.put(None)
                    sent = True
                self.ended.wait()
            except BaseException as e:  # Ctrl-C (or a SIGINT handler's error) while waiting
                self.halted = True  # the queued batches are dropped, so the put above never blocks for long
                interrupted = interrupted or e
        if self.thread is not None:
            self.thread.join()
        if stopped:  # the warnings of the batches written still given; the caller's error is the one raised
            with contextlib.suppress(Exception):  # (a warnings filter "error")
                self._warn()
            return
        if interrupted is not None:
            raise interrupted
        self._warn()
        self._raise()

    def _loop(self) -> None:
        try:
            while True:
                work = self.queue.get()
                if work is None:
                    return
                if self.error is not None or self.halted:
                    continue  # drained: the main thread's put never blocks on a failed or halted writer
                try:
                    self._handle(*work)
                except BaseException as e:  # raised in the main thread (_raise)
                    self.error = e
                del work  # the batch is not held while the next is awaited
        finally:
            self.ended.set()

    def _handle(self, s: int, done: job.Computed) -> None:
        result = job.finish_items(self.run.plan, done, warn=self.said.append)
        if self.png:
            write_overlays(self.run.store.folder, done.items, result, self.run.plan)
        self.current.append(result)
        if sum(len(r.rows) for r in self.current) == len(self.shards[s]):
            commit(self.run.store, self.shards[s], self.current)
            self.current = []

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _warn(self) -> None:
        import warnings

        from salience._core.errors import user_stacklevel

        while self.said:
            warnings.warn(self.said.pop(0), stacklevel=user_stacklevel())


def commit(store: Store, indices: Sequence[int], parts: Sequence[job.Result]) -> str:
    """Write a shard from its batches' results; its name (:meth:`Store.shard_name`: never a
    committed shard's)."""
    rows = [r for p in parts for r in p.rows]
    maps = {m: np.concatenate([p.maps[m] for p in parts]) for m in parts[0].maps}
    tiles = [p.tiles for p in parts if p.tiles is not None]
    thumbs = job.sprite(np.concatenate(tiles)) if tiles else None
    name = store.shard_name(indices)
    store.write_shard(name, rows, maps, thumbs)
    return name


def write_overlays(folder: Path, items: Sequence[sources.Item], result: job.Result, plan: job.Plan) -> None:
    """``overlays/<index>_<method>_k<k>.png``: each map on its image, at the model's input size."""
    from salience.loading.images import unnormalize

    for j, it in enumerate(items):
        if it.error is not None:
            continue
        picture = unnormalize(it.x.float().cpu(), plan.info)
        for name, arr in result.maps.items():
            for k in range(arr.shape[1]):
                m = arr[j, k]
                if np.isnan(m).all():
                    continue
                m = np.abs(m).max(0) if m.ndim == 3 else m
                viz.save_png(folder / "overlays" / f"{it.index:09d}_{name}_k{k}.png", viz.overlay(picture, m))


def log(msg: str) -> None:
    print(f"salience: {msg}", file=sys.stderr)
