"""``engine="ray"``: the same job on Ray Data, beyond one machine.

The pending images (those in no committed shard) become a ``ray.data`` dataset of
``(index, path)`` rows; ``map_batches`` tasks decode and resize them (the run's dataset, so the
same preprocessing as the local engine); a second ``map_batches`` explains them: on the CPU in Ray
tasks (:func:`explain`), each worker process holding one model per run (:class:`Explain`, made by
its first task of the run, let go at the run's end); with GPUs in a pool of :class:`Explain`
actors (``num_gpus`` each) started for the run. Each batch of ``shard_size`` images is one shard,
written by its task or actor into the same store layout (a shared folder or mount on a cluster);
the driver merges the index at the end. A stopped run resumes the same way as a local one: only
images that no committed shard holds are read again.

The cluster (:func:`cluster`): the caller's (their ``ray.init()``), used and never shut down; else
one salience joins for the process's first run (a local one it starts, or the one at ``address``)
and keeps, as ``ray.init()`` does, until :func:`shutdown_ray` or the interpreter's exit (session
55: it shut it down at its last run's end, so every run paid ``ray.init`` and fresh workers).

What a run costs beside its batches (``benchmarks/ray-run-cost-s54.md``, ``-s55.md``): Ray keeps the
worker processes of a driver's job between its tasks, so on a kept cluster a CPU run after the
first finds them with torch, salience and Ray Data's code imported and starts no process (about
0.6 s for 20 small images on one core, where an actor pool started for each run cost about 4.5 s
and a cluster started for each run 13-15 s). GPU runs keep the actor pool (Ray pins a GPU worker
process's GPU, and would not reuse it safely for another task's).

Ray's own output (its log lines, Ray Data's progress bars and execution notes, the core worker's
messages) is kept off the terminal while a run goes (:func:`quiet`): the command shows salience's
progress and errors only. ``SALIENCE_RAY_LOGS=1`` lets it through.

Runs in threads of one process share one cluster (:func:`cluster`): the first starts it (unless
the caller joined one first, which salience never shuts down), and it outlives them all.

Ray is optional: ``pip install salience[ray]``.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import ipaddress
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from salience._core import perf as _perf
from salience._core.tensors import copy_model
from salience._core.errors import SalienceError
from salience._core.guard import run_guard
from salience._core.progress import progress
from salience.runs import job
from salience.runs.lock import Writer, commit_fence, run_going
from salience.runs.sources import ImageFiles, Item, Raised, read_once


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SalienceError("engine='ray' needs Ray Data: pip install 'salience[ray]' (or pip install 'ray[data]')"
                            ) from None
    return ray


_HELD: dict[str, tuple[Any, Optional[Writer]]] = {}
"""What the runs under way hold in this Ray worker process, by key, with each run's :class:`Writer`
(and its id in ``_RUN_OF``): the datasets (:func:`_dataset`: fetched and unpickled once per process
and run, not once per decoding task) and, on CPU, the model each worker explains with (:func:`explain`: loaded once per
process and run, not once per batch); let go when their run ends (:func:`_let_go`)."""
_RUN_OF: dict[str, str] = {}
_HELD_LOCK = threading.Lock()
RELEASE_EVERY = 1.0
"""Seconds between two looks, in a worker process holding a run's dataset or model, at whether its run has ended."""
_watching = False


def _dataset(dataset: Any, writer: Optional[Writer] = None, run_id: Optional[str] = None) -> Any:
    """``dataset``, or the object a reference to it (``ray.put`` by the driver: a user's dataset, sent
    once into the object store) names, read once in this process for the run ``writer`` (``run_id``)
    and held while that run holds its folder (:func:`_held`)."""
    ray = _ray()
    if not isinstance(dataset, ray.ObjectRef):
        return dataset
    return _held(dataset.hex(), lambda: ray.get(dataset), writer, run_id)


def _held(key: str, make: Callable[[], Any], writer: Optional[Writer], run_id: Optional[str]) -> Any:
    """The value held under ``key`` in this process, else ``make()``'s, held for the run ``writer``
    (``run_id``) while that run holds its folder (:func:`salience.runs.lock.run_going`): a thread of
    this process lets it go within :data:`RELEASE_EVERY` seconds of the run's end, done or failed, so
    two runs at once keep a copy each and none outlives its run. A run whose folder cannot lock
    (``writer`` ``None``) gives no such sign: what it holds is kept until another run's comes."""
    global _watching
    with _HELD_LOCK:
        held = _HELD.get(key)
    if held is not None:
        return held[0]
    value = make()
    with _HELD_LOCK:
        _let_go(keep=run_id or key)
        _HELD[key] = (value, writer)
        _RUN_OF[key] = run_id or key
        if not _watching:
            _watching = True
            threading.Thread(target=_watch, name="salience-datasets", daemon=True).start()
    return value


def _let_go(keep: Optional[str] = None) -> None:
    """Drop what runs that ended hold, and (when a new run's value comes: its run ``keep``) what runs
    that give no sign of their end hold. Called holding ``_HELD_LOCK``."""
    for key, (_, writer) in list(_HELD.items()):
        if _RUN_OF.get(key, key) != keep and (not run_going(writer) if writer is not None else keep is not None):
            del _HELD[key]
            _RUN_OF.pop(key, None)


def _watch() -> None:
    """This worker process's thread: every :data:`RELEASE_EVERY` seconds, lets go of what the runs
    that ended held; ends when it holds nothing of a run that can end (those of runs whose folder
    cannot lock wait for the next run's, which starts it again: it polled for them, every second, for
    the life of the process)."""
    global _watching
    while True:
        time.sleep(RELEASE_EVERY)
        with _HELD_LOCK:
            _let_go()
            if all(writer is None for _, writer in _HELD.values()):
                _watching = False
                return


def _some(plan: job.Plan, batch: dict[str, np.ndarray]) -> job.Plan:
    """The plan a task or actor was sent (without the run's per-image lists: :func:`_rows`) with the
    ``paths`` (and given ``labels``) of ``batch``'s images, from its columns, by index: what
    :func:`job.explain_items` and the refusals read of them."""
    if not isinstance(plan.paths, dict):  # the run's whole list (not sent so by :func:`run`)
        return plan
    indices = [int(i) for i in batch["index"]]
    some: dict[str, Any] = {"paths": {**plan.paths, **{i: str(p) for i, p in zip(indices, batch["path"])}}}
    if plan.labels is not None and "given" in batch:
        some["labels"] = {i: int(v) if has else None for i, v, has in zip(indices, batch["given"], batch["has_given"])}
    return dataclasses.replace(plan, **some)


def _read(dataset: Any, batch: dict[str, np.ndarray], j: int, at: int) -> Item:
    """Row ``j`` (image ``at``) of ``batch`` read: an image file from the row's own ``file`` and ``mask``
    columns (the decoder holds no paths: :meth:`ImageFiles.without_files`), else the dataset's item."""
    if isinstance(dataset, ImageFiles) and "file" in batch:
        return dataset.read(at, str(batch["file"][j]), str(batch["mask"][j]) if batch["has_mask_file"][j] else None)
    return dataset[at]


def decode(batch: dict[str, np.ndarray], dataset: Any, plan: Optional[job.Plan] = None,
           begun_in: Optional[str] = None, writer: Optional[Writer] = None,
           run_id: Optional[str] = None) -> dict[str, np.ndarray]:
    """Ray task: a batch of ``index`` rows -> decoded inputs (the run's dataset, as the local engine).
    The rows carry what the task needs of each of their images (:func:`_rows`: its path, its file and
    mask, its given and begun labels); ``dataset`` is a decoder without the run's paths, or a reference
    to the user's dataset (:func:`_dataset`: held in this process while the run ``writer``, ``run_id``,
    goes on).
    An image the run refuses (a user's item that is no image tensor; one whose shape is not the run's
    first image's, ``plan.first_input``; one whose item carries another label than the ``begun``
    column, the label the run in ``begun_in`` was begun with: :func:`job.begun_label_refusal`) or whose
    reading raises (a ``KeyError`` of the user's transform) makes the batch placeholders that carry the
    error (``raised``: :func:`_raised`), which the actor passes on and the driver raises as it was (Ray
    would raise its ``RayTaskError`` with the traceback as text, or numpy's "all input arrays must have
    the same shape")."""
    indices = [int(i) for i in batch["index"]]
    dataset = _dataset(dataset, writer, run_id)
    if plan is not None and "path" in batch:
        plan = _some(plan, batch)
    raised = ""
    items: list[Item] = []
    at = None
    try:
        for j, at in enumerate(indices):  # at: the image being read when it raises
            items.append(_read(dataset, batch, j, at))
            if plan is not None and (refusal := job.shape_refusal(plan, items[-1])) is not None:
                raise refusal
            if plan is not None and begun_in is not None and "begun" in batch:
                was = int(batch["begun"][j]) if batch["has_begun"][j] else None
                refusal = job.begun_label_refusal(begun_in, at, plan.paths[at], was, items[-1].label,
                                                  plan.labels_given)
                if refusal is not None:
                    raise refusal
    except Exception as e:  # noqa: BLE001 - the user's dataset's own error (a KeyError) too: the driver raises it
        if plan is None or plan.first_input is None:
            raise
        path = plan.paths.get(at) if isinstance(plan.paths, dict) else (  # type: ignore[union-attr]
            plan.paths[at] if at is not None and at < len(plan.paths) else None)
        raised = _raised(e, "Ray task decoding images", at, path)
        items = [Item(i, torch.zeros(plan.first_input[1]), -1, -1, None) for i in indices]
    out = {"index": np.asarray([it.index for it in items], dtype=np.int64),
           "x": np.stack([it.x.numpy() for it in items]),
           "width": np.asarray([it.width for it in items], dtype=np.int64),
           "height": np.asarray([it.height for it in items], dtype=np.int64),
           "error": np.asarray([it.error or "" for it in items], dtype=object),
           "mask_error": np.asarray([it.mask_error or "" for it in items], dtype=object),
           # each item's label, read with its image (a user's dataset of (image, label)): has_label False for none
           "label": np.asarray([it.label if it.label is not None else -1 for it in items], dtype=np.int64),
           "has_label": np.asarray([it.label is not None for it in items], dtype=bool),
           "raised": np.asarray([raised] * len(items), dtype=object)}
    for name in ("path", "given", "has_given"):  # the rows' own, for the actor
        if name in batch:
            out[name] = np.asarray(batch[name])
    # every block has the same columns; an image without a mask travels as zeros with has_mask False
    # (each image with a mask is scored, whatever the others of its block have)
    blank = np.zeros(tuple(items[0].x.shape[-2:]), dtype=bool) if items else np.zeros((0, 0), dtype=bool)
    out["mask"] = np.stack([it.mask.numpy() if it.mask is not None else blank for it in items])
    out["has_mask"] = np.asarray([it.mask is not None for it in items], dtype=bool)
    return out


def _raised(e: BaseException, where: str, index: Optional[int] = None, path: Optional[str] = None,
            by: str = "the dataset") -> str:
    """``e`` as a column value (base64 of the pickled :class:`~salience.runs.sources.Raised`): an error in
    a Ray task or actor (a SalienceError, a user's dataset's own) travels to the driver as data, which
    raises it as it was (Ray would raise a ``RayTaskError`` whose message is the traceback)."""
    return base64.b64encode(pickle.dumps(Raised.of(e, where, index, path, by))).decode("ascii")


# An error of the model on an actor is raised there, not returned as data: as data it would reach the
# driver only after the batches ahead of it (Ray gives them in order), which may wait for long. Ray
# keeps a raised error's traceback as text only (its cause does not survive), so the error travels in
# its message: the pickled Raised between these marks, which the driver finds and raises as it was.
_CARRIED = re.compile(r"salience-raised<([A-Za-z0-9+/=]+)>")


class Carried(Exception):
    """The model's error on a Ray actor, the pickled :class:`Raised` in its message (:data:`_CARRIED`)."""

    def __init__(self, payload: str):
        super().__init__(f"salience-raised<{payload}>")


def _carried(error: BaseException) -> Optional[str]:
    """The payload a :class:`Carried` put in the message of Ray's error ``error``, if any."""
    found = _CARRIED.search(str(error))
    return found.group(1) if found else None


def _reraise(column: Any) -> None:
    """Raise the first error a batch's ``raised`` column carries (:func:`_raised`), if any."""
    for value in column:
        if value:
            pickle.loads(base64.b64decode(value)).reraise()


class Explain:
    """Holds one model; explains a batch of decoded images and writes it as one shard: a Ray actor (GPU
    runs), or held by a worker process for a run's tasks (CPU runs: :func:`explain`, ``where`` then
    names them in the errors it sends back)."""

    where = "Ray actor"

    def __init__(self, model: Any, plan: job.Plan, folder: str, batch: int, png: bool, weights: Optional[str],
                 gpu: bool, performance: Optional[_perf.Performance] = None, writer: Optional[Writer] = None):
        from salience.loading import load_model
        from salience.runs.store import Store

        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.model = load_model(model, weights=weights, device=device) if isinstance(model, str) else model.to(device)
        self.plan, self.batch, self.png = plan, batch, png
        self.store = Store.existing(folder)
        self.performance = performance or _perf.Performance()  # the driver's options (an actor has its own process)
        self.writer = writer  # the driver's run: shards are committed only while it holds the folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Explain the batch as one shard; a SalienceError comes back as data (``raised``), not raised."""
        n = len(batch["index"])
        indices = [int(i) for i in batch["index"]]
        if any(batch["raised"]):  # an image its decoding refused: no shard, the driver raises the error
            return {"index": np.asarray(indices, dtype=np.int64), "shard": np.asarray([""] * n),
                    "raised": np.asarray(batch["raised"], dtype=object)}
        try:
            return self._explain(batch, n)
        except SalienceError as e:  # the shape check, a model refusing its input: the driver raises it
            return {"index": np.asarray(indices, dtype=np.int64), "shard": np.asarray([""] * n),
                    "raised": np.asarray([_raised(e, self.where)] * n, dtype=object)}
        except Exception as e:  # noqa: BLE001 - the model's own error (a RuntimeError): raised at once, carried
            raise Carried(_raised(e, self.where, by="the model")) from None

    def _explain(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Explain the batch and commit it as one shard."""
        from salience.runs.dataset import commit, write_overlays

        items = [Item(int(batch["index"][j]), torch.from_numpy(np.array(batch["x"][j])), int(batch["width"][j]),
                      int(batch["height"][j]), str(batch["error"][j]) or None,
                      torch.from_numpy(np.array(batch["mask"][j])) if batch["has_mask"][j] else None,
                      str(batch["mask_error"][j]) or None,
                      int(batch["label"][j]) if batch["has_label"][j] else None) for j in range(n)]
        plan = _some(self.plan, batch) if "path" in batch else self.plan
        parts = []
        # saved and restored once per Ray batch, not per method call; channels-last weights copied once too
        with run_guard(self.model):
            for s in range(0, n, self.batch):
                part = items[s:s + self.batch]
                with _perf.performance(**vars(self.performance)):
                    parts.append(job.explain_items(self.model, part, plan))
                if self.png:
                    write_overlays(self.store.folder, part, parts[-1], plan)
        # what the batches learnt that later ones need (maps' shapes, warnings said once)
        for name in ("shapes", "first_input", "gap_warned", "storage_warned"):
            setattr(self.plan, name, getattr(plan, name))
        indices = [it.index for it in items]
        with commit_fence(self.writer):  # refused once the driver's run has ended (an error, Ctrl-C)
            name = commit(self.store, indices, parts)
        return {"index": np.asarray(indices, dtype=np.int64), "shard": np.asarray([name] * n),
                "raised": np.asarray([""] * n, dtype=object)}


def shipped(ray: Any, run: Any, weights: Optional[str] = None) -> Any:
    """What the actors load the model from: the spec of a library's model (each actor loads it, its
    weights from the library's cache or ``weights``), else the driver's own module (on the CPU: an
    actor puts it on its device). ``weights="random"`` sends the driver's module too: each actor's
    own draw, although seeded (:data:`salience.loading.models.RANDOM_WEIGHTS_SEED`), equals the
    driver's only where torch picks the same CPU kernels and the library the same initialisation
    (a node without AVX2 draws other last bits; another torch or timm version other weights).
    The module is pickled by value where its code is the user's: the code of a ``python:FILE.py``
    spec and of the modules it imported beside it (:func:`salience.loading.custom.user_modules`)
    is registered with Ray's cloudpickle, as no worker can import ``salience_user_...`` (a name made
    in this process), and ``FILE.py`` itself is not read again (nor its ``--weights``): every actor
    explains the driver's model, also when ``build()`` initialises it at random."""
    from salience.loading.custom import user_modules

    for module in user_modules():
        ray.cloudpickle.register_pickle_by_value(module)
    if isinstance(run.spec, str) and not run.spec.startswith("python:") and str(weights) != "random":
        return run.spec
    model = run.model
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy_model(model).cpu()  # a CPU actor cannot unpickle CUDA tensors; the caller's stays put
    return model


def _rows(pending: list[int], plan: job.Plan,
          dataset: Any = None) -> tuple[list[dict[str, Any]], job.Plan, Optional[str], Any]:
    """The Ray dataset's rows of the ``pending`` images, the plan the tasks and actors get, the
    folder of the run whose begun labels the rows carry, and the dataset the decoding tasks get.
    What the run holds per image travels with that image's row, never whole to every task and actor
    (what each would hold would grow with the run's images): its ``path`` (the rows' name of it; the
    plan shipped keeps the first image's only, which a shape refusal names), the labels given up
    front (``given``, ``has_given``), an image file's ``file`` and ``mask`` (the decoder is sent
    without its lists: :meth:`ImageFiles.without_files`), and in a continued run of labels read with
    each item checked against others (:attr:`job.Plan.begun_labels`: those it was begun with, or those
    given now) its image's one (``begun``, ``has_begun``), which its decoding task compares with the
    item's. A user's dataset is sent as a reference (:func:`_dataset`): into the object store once,
    fetched once per worker process and run, let go when the run ends."""
    rows: list[dict[str, Any]] = [{"index": i, "path": str(plan.paths[i])} for i in pending]
    shipped_plan = dataclasses.replace(plan, paths={}, begun_labels=None)
    if plan.first_input is not None:
        shipped_plan.paths = {plan.first_input[0]: str(plan.paths[plan.first_input[0]])}  # type: ignore[assignment]
    if plan.labels is not None:
        shipped_plan.labels = {}  # type: ignore[assignment]
        for row in rows:
            v = plan.labels[row["index"]]
            row["given"], row["has_given"] = -1 if v is None else int(v), v is not None
    if isinstance(dataset, ImageFiles):
        for row in rows:
            i = row["index"]
            mask = dataset.masks[i] if dataset.masks is not None else None
            row["file"], row["mask"], row["has_mask_file"] = str(dataset.paths[i]), mask or "", mask is not None
        dataset = dataset.without_files()
    elif dataset is not None:
        dataset = _ray().put(dataset)
    if plan.begun_labels is None:
        return rows, shipped_plan, None, dataset
    folder, was = plan.begun_labels
    for row in rows:
        i = row["index"]
        row["begun"] = -1 if i >= len(was) or was[i] is None else int(was[i])
        row["has_begun"] = i < len(was) and was[i] is not None
    return rows, shipped_plan, folder, dataset


def _pool(ray: Any, size: int, tasks: bool = False) -> dict[str, Any]:
    """``map_batches``'s argument for a pool of ``size`` actors (``tasks``: at most ``size`` tasks at
    once): ``compute=ActorPoolStrategy(size=)`` (``TaskPoolStrategy``) from Ray 2.51 (which logs a
    deprecation warning for ``concurrency=`` at every run), else ``concurrency=`` (Ray 2.9 to 2.50 log
    one for ``compute=``)."""
    try:
        version = tuple(int(p) for p in ray.__version__.split(".")[:2])
    except ValueError:  # a development build ("3.0.0.dev0" parses; anything else is taken as new)
        version = (99, 0)
    if version >= (2, 51):
        return {"compute": (ray.data.TaskPoolStrategy if tasks else ray.data.ActorPoolStrategy)(size=size)}
    return {"concurrency": size}


RAY_LOGS = "SALIENCE_RAY_LOGS"
"""The environment variable that lets Ray's own output through (``SALIENCE_RAY_LOGS=1``)."""
_LOGGERS = ("ray", "ray.data")  # ray.data's does not propagate to ray's: it has a console handler of its own
_QUIET_CONTEXT = {"enable_progress_bars": False, "print_on_execution_start": False}
"""The Ray Data settings that print (its progress bars; the note at each execution's start)."""


def _loud() -> bool:
    return os.environ.get(RAY_LOGS, "").strip().lower() not in ("", "0", "false", "no")


_QUIET_LOCK = threading.Lock()
_QUIET: dict[str, Any] = {"runs": 0, "put_back": None}
"""The runs inside :func:`quiet` in this process and how to put back what the first one changed."""


@contextlib.contextmanager
def quiet(ray: Any) -> Iterator[None]:
    """Ray's own output off inside (unless ``SALIENCE_RAY_LOGS=1``): the ``ray`` and ``ray.data``
    loggers at ``CRITICAL`` (ray.init's notes, Ray Data's execution lines and warnings; salience says
    the errors itself), Ray Data's progress bars and start notes off in the current ``DataContext``
    (the workers' output stays in their log files: ``ray.init(log_to_driver=False)``). Ray Data's
    ``preserve_order`` is on inside (shards of consecutive images). The loggers and the context are
    the process's, not the thread's: the first of overlapping runs (threads of one process) changes
    them, the last one to end puts every setting back as it was before the first, also after an error
    or Ctrl-C (each run putting back what it saw on entry left Ray quiet for good when two overlapped)."""
    with _QUIET_LOCK:
        if _QUIET["runs"] == 0:
            _QUIET["put_back"] = _quieten(ray.data.DataContext.get_current())
        _QUIET["runs"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["runs"] -= 1
            if _QUIET["runs"] == 0:
                _QUIET["put_back"]()


def _quieten(ctx: Any) -> Callable[[], None]:
    """:func:`quiet`'s settings made in ``ctx`` and the loggers; returns what puts them back (called
    here too if one of them cannot be made)."""
    settings = {k: v for k, v in _QUIET_CONTEXT.items() if hasattr(ctx, k)} if not _loud() else {}
    saved = {k: getattr(ctx, k) for k in settings}
    order = ctx.execution_options.preserve_order
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}

    def put_back() -> None:
        ctx.execution_options.preserve_order = order
        for k, v in saved.items():
            setattr(ctx, k, v)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    try:
        ctx.execution_options.preserve_order = True
        for k, v in settings.items():
            setattr(ctx, k, v)
        if not _loud():
            for name in _LOGGERS:
                logging.getLogger(name).setLevel(logging.CRITICAL)
    except BaseException:
        put_back()
        raise
    return put_back


def _actors(ray: Any, num_gpus: float, actors: Optional[int]) -> int:
    """The pool's size: ``actors``, else as many actors as the cluster's GPUs take, else (CPU tasks)
    half its CPUs."""
    if actors is not None:
        return actors
    res = ray.cluster_resources()
    if num_gpus:
        return max(1, int(res.get("GPU", 0) // num_gpus))
    return max(1, int(res.get("CPU", 1)) // 2)  # the other half decodes


def run(run: Any, *, num_gpus: float = 0, actors: Optional[int] = None, address: Optional[str] = None,
        show: bool = False, png: bool = False, weights: Optional[str] = None,
        performance: Optional[_perf.Performance] = None, writer: Optional[Writer] = None) -> None:
    """Explain the run's pending images on Ray (a cluster at ``address``, ``RAY_ADDRESS``, the one
    this process joined, or a new local one: :func:`cluster`, which keeps what salience started for
    the process's later runs until :func:`shutdown_ray` or the exit). Actors of ``num_gpus`` each
    explain on CUDA when ``num_gpus`` > 0, else Ray tasks on the CPU (:func:`_explaining`), at most
    ``actors`` at once; they
    commit shards only while the run ``writer`` (from :func:`salience.runs.lock.run_lock`) holds the
    folder. Safe to call from several threads at once."""
    ray = _ray()
    with quiet(ray), cluster(ray, address, num_gpus):
        _explain(ray, run, num_gpus, actors, png, weights, performance, writer, show)


_CLUSTER_LOCK = threading.Lock()
_CLUSTER: dict[str, Any] = {"runs": 0, "ours": False, "asked": None, "keeper": None, "node": None}
"""This process's runs on Ray now (``runs``, inside :func:`cluster`), whether salience joined the
cluster (``ours``: ``ray.init`` by its first run, kept for the process until :func:`shutdown_ray`
or the interpreter's exit), the address that run asked for (``asked``), the event that lets the
thread that started it end once it is shut down (``keeper``: :func:`_start`), and Ray's connection
salience made (``node``: :func:`_connection`), which tells it from one the caller made after
shutting salience's down."""
_ANY = (None, "", "auto")
"""``address`` values that take the cluster this process is joined to, whichever it is."""
_EXIT_HOOKED = False


@contextlib.contextmanager
def cluster(ray: Any, address: Optional[str] = None, num_gpus: float = 0) -> Iterator[None]:
    """The Ray cluster of a run, shared by the runs of this process (threads: a notebook, a service,
    runs one after another): a run joined to none joins one (``ray.init(address=)``: a new local
    cluster without ``address`` nor ``RAY_ADDRESS``) and salience keeps it for the life of the
    process, as ``ray.init()`` does, so that later runs find it and its worker processes warm; it is
    shut down by :func:`shutdown_ray` or at the interpreter's exit. A cluster the caller joined
    (their own ``ray.init()``) is used and never shut down. A run in a thread other than the main one
    starts the cluster from a thread that lives until it is shut down (:func:`_start`). A run asking
    for another cluster (an ``address`` that is not the joined one's) is refused
    (:class:`SalienceError`), unless the joined one is salience's and no run uses it (then salience
    leaves it and joins the one asked for); so is, on a cluster started in this process (which
    cannot grow), more GPUs per actor than it has."""
    _join(ray, address)
    try:
        _check_gpus(ray, num_gpus)
        yield
    finally:
        with _CLUSTER_LOCK:
            _CLUSTER["runs"] -= 1


def _join(ray: Any, address: Optional[str]) -> None:
    """:func:`cluster`'s entry: ``ray.init`` if this process is joined to no cluster (or only to
    salience's, idle, and another is asked for), else the joined one checked against ``address``;
    the run counted (not counted if it raises)."""
    with _CLUSTER_LOCK:
        if ray.is_initialized() and _CLUSTER["runs"] == 0:
            if not _is_ours(ray):  # joined before salience's first run, or after it left: the caller's
                _forget()
            elif address not in _ANY and not _same_cluster(str(address), _joined_address(ray), _CLUSTER["asked"]):
                _shut_ours(ray)  # salience's own, idle, and another cluster is asked for
        if not ray.is_initialized():
            _forget()  # the cluster salience started was shut down under it (its thread waited for ever)
            keeper = _start(ray, address)
            _CLUSTER.update(ours=True, asked=address, keeper=keeper, node=_connection(ray))
            _hook_exit()
        else:
            _check_address(ray, address)
        _CLUSTER["runs"] += 1


def _connection(ray: Any) -> Any:
    """Ray's object for this process's connection to its cluster (its ``Node``, or a Ray client's
    worker): a new one at each ``ray.init``. Not the client's context, which Ray keeps for the
    process (the same object across ``ray.shutdown()`` and a new ``ray.init("ray://...")``)."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    if node is not None:
        return node
    try:
        return ray.util.client.ray.get_context().client_worker
    except Exception:  # noqa: BLE001 - no client connection, or a Ray that keeps it otherwise
        return None


def _is_ours(ray: Any) -> bool:
    """Whether the cluster this process is joined to is the one salience joined (not the caller's,
    made after a ``ray.shutdown()`` of theirs). Called holding the lock."""
    return bool(_CLUSTER["ours"]) and ray.is_initialized() and _connection(ray) is _CLUSTER["node"]


def _forget() -> None:
    """Salience holds no cluster: the thread that started its last one (if any) ends. Called holding the lock."""
    if _CLUSTER["keeper"] is not None:
        _CLUSTER["keeper"].set()
    _CLUSTER.update(ours=False, asked=None, keeper=None, node=None)


def _shut_ours(ray: Any) -> None:
    """Shut down the cluster salience joined (``ray.shutdown()``: a local one's processes end, a
    remote one is left) and forget it. Called holding the lock."""
    try:
        if _is_ours(ray):
            ray.shutdown()
    finally:
        _forget()


def shutdown_ray() -> None:
    """Shut down the Ray cluster salience started (or the connection it made to ``address=``) for its
    dataset runs (``engine="ray"``), which it keeps for the life of the process so that each run after
    the first finds it and its worker processes warm (about 0.6 s for 20 small images on one core
    where starting a cluster costs 13-15 s: ``benchmarks/ray-run-cost-s55.md``). It goes at the
    interpreter's exit anyway; call this to free its processes and memory sooner. Does nothing if
    salience holds no cluster; never touches one the caller started or joined (their
    ``ray.init()``). A :class:`SalienceError` while runs of this process use it."""
    ray = sys.modules.get("ray")
    if ray is not None:
        _shutdown(ray)


def _shutdown(ray: Any, force: bool = False) -> None:
    """:func:`shutdown_ray` on ``ray``; ``force`` (the interpreter's exit): also under runs still going."""
    with _CLUSTER_LOCK:
        if not _CLUSTER["ours"]:
            return
        if _CLUSTER["runs"] and not force and _is_ours(ray):
            raise SalienceError(f"shutdown_ray(): {_CLUSTER['runs']} run(s) of this process still use salience's "
                                "Ray cluster; call it once they end")
        _shut_ours(ray)


def _hook_exit() -> None:
    """Salience's cluster shut down at the interpreter's exit, also after a Ctrl-C (registered after Ray's
    own hook, made when Ray is imported, so it runs first; Ray's then finds nothing to shut down). Called
    holding the lock."""
    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        atexit.register(_at_exit)
        _EXIT_HOOKED = True


def _at_exit() -> None:
    """The interpreter's exit: salience's cluster shut down, also under runs of daemon threads still going."""
    ray = sys.modules.get("ray")
    if ray is not None:
        _shutdown(ray, force=True)


def _init(ray: Any, address: Optional[str]) -> None:
    """``ray.init`` as salience calls it; nothing left joined if it raises (or is interrupted)."""
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except BaseException:
        if ray.is_initialized():
            ray.shutdown()
        raise


def _start(ray: Any, address: Optional[str]) -> Optional[threading.Event]:
    """Join a cluster (:func:`_init`) from the main thread, or from a thread of salience's that lives
    until the cluster is shut down (``None``, or the event that lets that thread end). A local
    cluster's processes (its GCS, its raylet) are killed by Linux when the *thread* that started them
    ends (Ray starts them with ``PR_SET_PDEATHSIG``): started from a run's own thread, the cluster
    died under the other runs as soon as that thread ended (``tests/test_ray_shared.py``)."""
    if threading.current_thread() is threading.main_thread():
        _init(ray, address)  # the main thread lives as long as the process (and Ray sets its SIGTERM handler)
        return None
    done, stop, raised = threading.Event(), threading.Event(), []

    def keep() -> None:
        try:
            _init(ray, address)
        except BaseException as e:  # noqa: BLE001 - raised in the run's thread, below
            raised.append(e)
        finally:
            done.set()
        if not raised:
            stop.wait()

    threading.Thread(target=keep, name="salience-ray-cluster", daemon=True).start()
    try:
        done.wait()
    except BaseException:  # interrupted while Ray starts: let it end, then shut it down
        done.wait()
        if not raised and ray.is_initialized():
            ray.shutdown()
        stop.set()
        raise
    if raised:
        raise raised[0]
    return stop


def _joined_address(ray: Any) -> Optional[str]:
    """The address of the cluster this process is joined to (its GCS's ``host:port``), if Ray says."""
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a Ray client connection (ray://) has none to give
        return None


def _client_address(ray: Any) -> Optional[str]:
    """The ``host:port`` of the Ray client server (``ray://``) this process is connected to, if it is."""
    try:
        client = ray.util.client.ray
        return str(client.get_context().client_worker._conn_str) if client.is_connected() else None
    except Exception:  # noqa: BLE001 - no client connection, or a Ray that keeps it otherwise
        return None


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """``host:port`` (``[IPv6]:port`` as Ray writes it) as (the host's IP, written one way, the port), or
    ``None`` where it is no such address."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])), int(port)
    except (OSError, ValueError):
        return None


def _same_cluster(address: str, joined: Optional[str], asked: Optional[str]) -> bool:
    """Whether ``address`` names the cluster joined at ``joined`` (asked for as ``asked``): the same
    text, or the same port on the same host (``localhost``, ``127.0.0.1`` and this machine's own
    addresses being one host)."""
    if address in (joined, asked):
        return True
    a, b = _host_port(address), _host_port(joined) if joined is not None else None
    if a is None or b is None or a[1] != b[1]:
        return False
    return a[0] == b[0] or (_here(a[0]) and _here(b[0]))


def _here(ip: str) -> bool:
    """Whether ``ip`` is one of this machine's addresses (a socket can be bound to it)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _check_address(ray: Any, address: Optional[str]) -> None:
    """Refuse ``address`` unless it names the cluster this process is joined to (or is none, or
    ``"auto"``; a ``ray://`` address: the Ray client server this process is connected to): a process is
    joined to one Ray cluster at a time. Called holding the lock."""
    if address in _ANY:
        return
    joined, client = _joined_address(ray), _client_address(ray)
    if _same_cluster(str(address), joined, _CLUSTER["asked"]):
        return
    if client is not None and str(address).startswith("ray://") and _same_cluster(str(address)[6:], client, None):
        return  # the Ray client server this process is connected to (the GCS's address is another port)
    whose = ("salience joined it for the runs of this process, some still going" if _CLUSTER["ours"]
             else "the caller's own ray.init()")
    raise SalienceError(f"address={address!r}: this process is already joined to the Ray cluster at "
                        f"{joined or _CLUSTER['asked']} ({whose}), and a process joins one Ray cluster at a "
                        "time; give that address (or none) to run there, or run this one after the other runs "
                        "end, or in a process of its own")


def _check_gpus(ray: Any, num_gpus: float) -> None:
    """Refuse ``num_gpus`` per actor above the GPUs of a cluster started in this process (by salience or
    the caller's ``ray.init()``): it cannot grow, and the actors would wait for ever. A cluster joined
    at an address may add GPU nodes (its autoscaler): left to Ray."""
    if not num_gpus:
        return
    try:
        started_here = bool(ray._private.worker._global_node.head)  # None.head: a Ray client connection
    except AttributeError:
        return
    if not started_here:
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    if have < num_gpus:
        raise SalienceError(f"num_gpus={num_gpus:g} per actor, but the local Ray cluster of this process has "
                            f"{have:g} GPU(s); give num_gpus={have:g} or less (0: CPU actors), or a cluster with "
                            "GPUs (address=, RAY_ADDRESS)")


def _explain(ray: Any, run: Any, num_gpus: float, actors: Optional[int], png: bool, weights: Optional[str],
             performance: Optional[_perf.Performance], writer: Optional[Writer], show: bool) -> None:
    """:func:`run`'s work on the cluster joined: the pending images through the decoding tasks and the
    explaining tasks (CPU) or actors (GPU), the progress bar, a model's error raised as it was."""
    from salience.runs.dataset import resolve_batch

    done = run.store.done()
    pending = [i for i in range(len(run.plan.paths)) if i not in done]
    if not pending:
        return
    batch = resolve_batch(run, pending[0])
    if run.plan.first_input is None:  # every image is checked against the run's first, in every task
        run.plan.first_input = (pending[0], tuple(read_once(run.dataset, pending[0]).x.shape))
    size = int(run.store.manifest["command"]["shard_size"])
    rows, plan, begun_in, dataset = _rows(pending, run.plan, run.dataset)
    run_id = uuid.uuid4().hex  # what this run's tasks hold in a worker process is let go by its end
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(decode, fn_kwargs={"dataset": dataset, "plan": plan, "begun_in": begun_in,
                                           "writer": writer, "run_id": run_id},
                        batch_size=batch, batch_format="numpy", num_cpus=1)
    args = (shipped(ray, run, weights), plan, str(run.store.folder), batch, png, weights, bool(num_gpus),
            performance, writer)
    tasks = not num_gpus  # CPU, on a cluster this process stays joined to (the caller's, or salience's: kept)
    ds = _explaining(ray, ds, args, size, tasks, num_gpus, _actors(ray, num_gpus, actors), writer, run_id)
    with progress(len(pending), "explain (ray)", enabled=show, unit="img") as bar:
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                _reraise(out["raised"])
                bar.update(len(out["index"]))
        except Exception as e:  # noqa: BLE001 - Ray's wrapping of a model's error: that error, as it was
            payload = _carried(e)
            if payload is None:
                raise
            _reraise([payload])


def _explaining(ray: Any, ds: Any, args: tuple, size: int, tasks: bool, num_gpus: float, pool: int,
                writer: Optional[Writer], run_id: str) -> Any:
    """``ds`` (decoded batches) explained in batches of ``size`` (a shard each) by ``pool`` workers at
    once: with ``tasks`` (a CPU run: the cluster outlives it, the caller's or salience's, kept for
    the process), Ray tasks (:func:`explain`) in Ray's pooled worker processes, which the process's
    later runs reuse with torch and salience imported; else a pool of :class:`Explain` actors
    (``num_gpus`` each) started for the run. An actor pool's start (a process, ``import torch``, the
    model) cost each run about 4.5 s on one core (benchmarks/ray-run-cost-s54.md), the tasks' about
    0.2 s once their processes are warm; a first run's tasks may land in two fresh processes that
    both import torch (2.8 s more than one actor on one core), paid once per process. GPU runs keep
    actors: Ray pins a GPU worker process's GPU, and would not safely reuse it for another task's.
    The actors' arguments ``args`` go once into the object store for the tasks, which build one
    :class:`Explain` per worker process and run (:func:`_held`)."""
    if not tasks:
        return ds.map_batches(Explain, fn_constructor_args=args, batch_size=size, batch_format="numpy",
                              **_pool(ray, pool), num_gpus=num_gpus or None, num_cpus=1)
    return ds.map_batches(explain, fn_kwargs={"args": ray.put(args), "writer": writer, "run_id": run_id},
                          batch_size=size, batch_format="numpy", **_pool(ray, pool, tasks=True), num_cpus=1)


def explain(batch: dict[str, np.ndarray], args: Any, writer: Optional[Writer] = None,
            run_id: Optional[str] = None) -> dict[str, np.ndarray]:
    """Ray task of a CPU run: ``batch`` (decoded images, a shard's worth) explained and committed by
    the :class:`Explain` this worker process holds for the run ``run_id`` (made from ``args``, a
    reference to its constructor's arguments, by the process's first task of the run: the model
    fetched or loaded once per process and run, as an actor did once per run; let go by the run's
    end: :func:`_held`). ``args`` by value without ``run_id``: an :class:`Explain` for this call only
    (held under one key, it served every later call, another model's included)."""
    ray = _ray()
    if not isinstance(args, ray.ObjectRef):
        if run_id is None:
            return _explainer(args)(batch)
        return _held("explain:run:" + run_id, lambda: _explainer(args), writer, run_id)(batch)
    return _held("explain:" + args.hex(), lambda: _explainer(ray.get(args)), writer, run_id)(batch)


def _explainer(args: tuple) -> Explain:
    """The :class:`Explain` of a CPU run's tasks in this process, its errors said to come from a Ray task."""
    made = Explain(*args)
    made.where = "Ray task explaining images"
    return made


__all__ = ["run", "cluster", "shutdown_ray", "decode", "explain", "Explain", "shipped", "quiet", "RAY_LOGS"]
