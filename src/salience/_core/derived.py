"""What the passes of one many-pass call take as already checked, so that they do not wait for the device.

A method that runs many passes (SmoothGrad, Integrated Gradients, the perturbation methods) checks
what the user passed once, on the clean images: ``x`` is finite (:func:`salience._core.autograd.check_input`),
the target classes are in range. The inputs of its passes (noisy copies, path points, masked images) and the
targets of their items (:meth:`salience.targets.Target.for_items`) derive from those. Checking them again in
every pass costs a host-device synchronization per pass (``bool(tensor)``, ``int(tensor)``): on a GPU, whose
passes are launch-bound, the host then waits for each pass before it queues the next, where a loop without them
queues a pass while the device runs the last one (SmoothGrad and IG on resnet50 ran 1.34x / 1.39x the time of
such a loop on an H200).

:func:`run_scope` (entered by :func:`salience._core.engine.accumulate` around its passes) holds, for the call:

- :func:`derived`: the inputs the method made from its checked ``x`` for the chunk that runs; ``check_input``
  skips their finiteness test. Their finiteness is still recorded, on the device (an overflow of
  ``x + noise`` is not ruled out by a finite ``x``), and tested once, when the call's passes end;
- :meth:`Derived.defer`: any such device-side condition and what to do when it holds (raise, warn), all tested
  with one synchronization at the end;
- :meth:`Derived.once`: what is to be done once per call (the range of a target's classes, the look at a
  model's output for probabilities);
- :meth:`Derived.note_scores`: which items' target scores were NaN or infinite (a bool tensor per pass, on the
  device), read only when the call refuses them, to name the images (:meth:`Derived.bad_images`): the engine's
  chunk (:func:`chunk_items`) says which image each item of a pass belongs to.

Per context (a :class:`~contextvars.ContextVar`): another thread's calls have their own. A nested many-pass call
(SmoothGrad of Integrated Gradients) joins the outer call's scope: its inputs derive from the outer ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Derived", "current", "derived", "is_derived", "run_scope", "chunk_items", "target_classes", "refusal",
           "renamed"]


class Derived:
    """The scope of one many-pass call: the chunk's derived inputs, the deferred conditions, the done checks."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []  # the inputs of the chunks that run (a stack: nested calls push theirs)
        self._flags: dict[str, tuple["Tensor | bool", Callable[[], None]]] = {}  # a CPU pass's read at once: a bool
        self._done: dict[Any, Any] = {}
        self.levels: list[tuple[int, int]] = []  # the engine's running chunks (first item, images), outermost first
        self._scores: dict[str, list[tuple[Tensor, Optional[Tensor], tuple[tuple[int, int], ...], list[Any]]]] = {}
        self._cpu: dict[tuple[str, int], _Noted] = {}  # note_scores of CPU passes, by key and number of targets
        self.items: Optional[int] = None  # the call's number of items (the engine's total), the noted buffers' size

    def note_scores(self, key: str, bad: Tensor, targets: Sequence[Any], owner: Optional[Tensor] = None) -> None:
        """``bad`` ``(n, K)`` (on the device): which of a pass's ``n`` items had a NaN or infinite score of each of
        the K targets. ``owner``: the image of each item in the running chunk's images (default: the engine's
        numbering, item ``j`` of image ``j % images``; none running: item ``i`` is image ``i``); ``targets``: the K
        targets of the pass (a class target names its class, ``classes_for``). Kept, not read. On the CPU written
        into buffers of the call (:class:`_Noted`) with each item's image and class: a few small tensors kept per
        pass between its freed activations split glibc's heap, whose peak then grew with the passes (RISE on
        resnet50, 8 images, 64 masks in 85 passes: 160 to 280 MiB, session 43)."""
        if bad.device.type == "cpu" and bad.dim() == 2:
            img = torch.arange(bad.shape[0]) if owner is None else owner.to("cpu", torch.int64)
            img = _call_images(img, owner is not None, self.levels)
            cls = torch.full(bad.shape, -1, dtype=torch.int64)
            for k, t in enumerate(targets[:bad.shape[1]]):
                c = target_classes(t, bad.shape[0])
                if c is not None:
                    cls[:, k] = torch.as_tensor(c).to("cpu", torch.int64).reshape(-1).expand(bad.shape[0])
            batch = _images_in_call(self.levels, bad.shape[0], owner is not None)
            noted = self._cpu.get((key, bad.shape[1]))
            if noted is None:  # made once, for the call's items: no buffer grown (made again) between two passes
                noted = self._cpu[(key, bad.shape[1])] = _Noted(bad.shape[1], self.items or 0)
            noted.add(bad, img, cls, batch)
            return
        self._scores.setdefault(key, []).append((bad, owner, tuple(self.levels), list(targets)))

    def noted(self, key: str, k: int) -> bool:
        """Whether CPU passes' scores of ``k`` targets were noted under ``key`` in the call (:meth:`note_scores`)."""
        return (key, k) in self._cpu

    def bad_images(self, key: str) -> tuple[list[tuple[int, int, Optional[int]]], Optional[int]]:
        """The noted bad scores of ``key`` as sorted ``(image, target, class)`` triples, and the call's number of
        images (``None`` where unknown). Reads the device: for the message of a refusal only."""
        found: set[tuple[int, int, Optional[int]]] = set()
        batch: Optional[int] = None
        for (name, _), noted in self._cpu.items():
            if name == key:
                found |= noted.found()
                batch = noted.batch
        for bad, owner, levels, targets in self._scores.get(key, []):
            rows, ks = bad.nonzero(as_tuple=True)
            img = _call_images(rows if owner is None else owner.to(rows.device)[rows], owner is not None, levels)
            batch = _images_in_call(levels, bad.shape[0], owner is not None)
            classes = [target_classes(t, bad.shape[0]) for t in targets]
            for r, i, k in zip(rows.tolist(), img.tolist(), ks.tolist()):
                c = classes[k] if k < len(classes) else None
                found.add((i, k, None if c is None else int(c[r])))
        return sorted(found, key=lambda t: (t[0], t[1])), batch

    def snapshot(self) -> tuple[dict[str, Any], dict[str, list[Any]], dict[tuple[str, int], int]]:
        """The deferred conditions and noted scores so far, for :meth:`restore`."""
        return dict(self._flags), {k: list(v) for k, v in self._scores.items()}, {k: v.n for k, v in self._cpu.items()}

    def restore(self, saved: tuple[dict[str, Any], dict[str, list[Any]], dict[tuple[str, int], int]]) -> None:
        """Forget the conditions and scores noted since :meth:`snapshot` gave ``saved``: a pass whose scores are
        thrown away (Ablation-CAM's shared pass, where the pass per item replaces it; the engine's memory probe's pass,
        whose items run again) refuses nothing."""
        self._flags, self._scores = dict(saved[0]), {k: list(v) for k, v in saved[1].items()}
        for k, noted in self._cpu.items():  # the buffers kept (made once for the call): their rows forgotten
            noted.n = saved[2].get(k, 0)

    def defer(self, key: str, flag: "Tensor | bool", action: Callable[[], None]) -> None:
        """``flag`` (a 0-d bool tensor, on the device; or a Python bool where the caller read it at no cost, a CPU
        pass's) OR-ed into the call's ``key`` condition; ``action`` (raise, warn) runs once at the end of the call
        when any flag of ``key`` held. No synchronization. A ``False`` still enters ``key`` (the actions run in the
        order their keys were first deferred)."""
        old = self._flags.get(key)
        if old is not None:
            was = old[0]
            if flag is True or was is True:
                flag = True
            elif flag is False:
                flag = was
            elif was is not False:
                flag = was | flag
        self._flags[key] = (flag, action)

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for in the call, then what it returned, kept for the call
        (let it hold the objects whose ``id`` ``key`` holds)."""
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def first(self, key: Any, hold: Any = None) -> bool:
        """Whether ``key`` is asked for the first time in the call (``True`` once, then ``False``). ``hold``: the
        object whose ``id`` ``key`` holds, kept for the call (its ``id`` is not another's while the call runs)."""
        if key in self._done:
            return False
        self._done[key] = hold
        return True

    def finish(self) -> None:
        """The deferred conditions, tested with one synchronization; their actions run in the order given."""
        if not self._flags:
            return
        items = list(self._flags.values())
        self._flags.clear()
        flags = [f for f, _ in items if type(f) is not bool]  # the tensors, read with one synchronization
        if flags:
            device = flags[0].device
            read = iter(torch.stack([f.reshape(()).to(device) for f in flags]).tolist())
            held = [f if type(f) is bool else next(read) for f, _ in items]
        else:  # every flag a Python bool already (a CPU call's): no tensor op
            held = [f for f, _ in items]
        for h, (_, action) in zip(held, items):
            if h:
                action()
        self._scores.clear()


_SCOPE: ContextVar[Optional[Derived]] = ContextVar("salience_derived", default=None)


def current() -> Optional[Derived]:
    """The scope of the many-pass call running in this context, or ``None``."""
    return _SCOPE.get()


@contextmanager
def run_scope(items: Optional[int] = None) -> Iterator[Derived]:
    """The scope of a many-pass call for the block; inside another, that one (a nested call joins it). The
    outermost tests the deferred conditions when the block ends without an error. ``items``: the call's number of
    items (the engine's total), the size the noted scores' buffers are made at (:class:`_Noted`)."""
    outer = _SCOPE.get()
    if outer is not None:
        yield outer
        return
    scope = Derived()
    scope.items = items
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
    scope.finish()


def _call_images(img: Tensor, owned: bool, levels: Sequence[tuple[int, int]]) -> Tensor:
    """Items' images in the running chunk (``img``) numbered as the call's images, through the engine's running chunks
    ``levels`` (first item, images), outermost first; ``owned``: ``img`` came from an owner, which stands for the
    innermost chunk's numbering."""
    for first, n in reversed(levels[:-1] if owned else levels):
        img = (first + img) % n
    return img


def _images_in_call(levels: Sequence[tuple[int, int]], items: int, owned: bool) -> Optional[int]:
    """The call's number of images: the outermost running chunk's, else the pass's ``items`` where no owner numbers
    them; ``None`` where unknown."""
    return levels[0][1] if levels else items if not owned else None


class _Noted:
    """A call's :meth:`Derived.note_scores` of CPU passes with K targets: each item's bad flags ``(K,)``, image and
    classes (-1: none) in three buffers, so that a pass keeps no tensor of its own. Made for ``items`` rows (the
    call's items, :func:`run_scope`'s; at least 64) at the first note, grown by doubling only past them (a nested call's
    passes, a probe's pass noted again): session 56's buffers started at 64 rows and were made again at 128, 256 and
    512 (Ablation-CAM's 512 items on resnet50), each time between two passes' freed activations."""

    def __init__(self, k: int, items: int = 0) -> None:
        with torch.inference_mode(False):  # normal tensors: see add
            self.bad = torch.zeros(max(items, 64), k, dtype=torch.bool)
            self.img = torch.zeros(max(items, 64), dtype=torch.int64)
            self.cls = torch.zeros(max(items, 64), k, dtype=torch.int64)
        self.n = 0
        self.batch: Optional[int] = None

    def add(self, bad: Tensor, img: Tensor, cls: Tensor, batch: Optional[int]) -> None:
        end = self.n + bad.shape[0]
        if end > self.bad.shape[0]:
            cap = max(end, 2 * self.bad.shape[0], 64)
            # grown as normal tensors even in a pass under inference mode (occlusion's, RISE's chunks): the call's
            # next pass outside it (a clean pass of the next occlusion nested in SmoothGrad's chunk) writes them too,
            # and an inference tensor refuses that (session 50 last read)
            with torch.inference_mode(False):
                self.bad, self.img, self.cls = (torch.cat([t[:self.n], t.new_zeros((cap - self.n,) + t.shape[1:])])
                                                for t in (self.bad, self.img, self.cls))
        self.bad[self.n:end], self.img[self.n:end], self.cls[self.n:end] = bad, img, cls
        self.n, self.batch = end, batch

    def found(self) -> set[tuple[int, int, Optional[int]]]:
        """The bad ``(image, target, class)`` triples."""
        rows, ks = self.bad[:self.n].nonzero(as_tuple=True)
        return {(i, k, None if c < 0 else c) for i, k, c in
                zip(self.img[rows].tolist(), ks.tolist(), self.cls[rows, ks].tolist())}


def target_classes(target: Any, n: int) -> Optional[Tensor]:
    """The class each of ``n`` items scores for ``target`` (a class target's ``classes_for``), or ``None``."""
    classes_for = getattr(target, "classes_for", None)
    return classes_for(n) if callable(classes_for) else None


@contextmanager
def chunk_items(first: int, images: int) -> Iterator[None]:
    """The engine's chunk that runs in the block: its items ``first, first + 1, ...``, item ``j`` of image
    ``j % images`` (what :meth:`Derived.bad_images` maps a pass's items to images by)."""
    scope = _SCOPE.get()
    if scope is None:
        yield
        return
    scope.levels.append((first, images))
    try:
        yield
    finally:
        scope.levels.pop()


def _where(found: Sequence[tuple[int, int, Optional[int]]], batch: Optional[int], targets: int) -> str:
    """Where the bad scores ``found`` (``(image, target, class)`` triples of ``batch`` images) are, for a message:
    ``" (image 1 of 4, class 3)"``, ``" (images 0, 2 of 4; target 2 of 3, class 7)"``; ``""`` when none."""
    if not found:
        return ""
    images = sorted({i for i, _, _ in found})
    of = f" of {batch}" if batch is not None else ""
    listed = ", ".join(map(str, images[:8])) + (", ..." if len(images) > 8 else "")
    text = f"image{'s' if len(images) > 1 else ''} {listed}{of}"
    which = []
    for k in sorted({k for _, k, _ in found}):
        classes = sorted({c for _, kk, c in found if kk == k and c is not None})
        part = f"target {k + 1} of {targets}" if targets > 1 else ""
        if classes:
            part += (", " if part else "") + f"class{'es' if len(classes) > 1 else ''} {', '.join(map(str, classes))}"
        if part:
            which.append(part)
    sep = "; " if targets > 1 else ", "
    return f" ({text}{sep + sep.join(which) if which else ''})"


def refusal(scope: Derived, key: str, targets: int, head: str, tail: str) -> Exception:
    """The :class:`~salience.SalienceError` ``head + where + tail`` of the noted bad scores of ``key`` (``where``:
    :func:`_where`'s), which keeps the images it names by their positions in the call (plain data: it
    pickles), so that a caller that knows them by other names (a dataset run: by their ``index``) says those
    (:func:`renamed`)."""
    from salience._core.errors import SalienceError

    found, batch = scope.bad_images(key)
    error = SalienceError(head + _where(found, batch, targets) + tail)
    error.salience_scores = (found, targets, head, tail)  # type: ignore[attr-defined]
    return error


def renamed(error: BaseException, names: Sequence[int]) -> Optional[Exception]:
    """``error`` (a :func:`refusal`) with the images it names called ``names[i]`` instead of ``i`` (a dataset run's
    indices of the call's images; "image 3", not "image 0 of 1" in the row of a rerun's single image), or
    ``None`` when it is no such refusal."""
    kept = getattr(error, "salience_scores", None)
    if kept is None:
        return None
    found, targets, head, tail = kept
    if any(not 0 <= i < len(names) for i, _, _ in found):
        return None
    return type(error)(head + _where([(int(names[i]), k, c) for i, k, c in found], None, targets) + tail)


@contextmanager
def chunk_inputs() -> Iterator[None]:
    """The inputs :func:`derived` marks inside the block are forgotten when it ends (one chunk's)."""
    scope = _SCOPE.get()
    n = len(scope.inputs) if scope is not None else 0
    try:
        yield
    finally:
        if scope is not None:
            del scope.inputs[n:]


def derived(x: Tensor, what: str = "the method's inputs") -> Tensor:
    """``x`` (returned as it is), an input a many-pass method made for the running chunk from its checked,
    finite ``x``: ``check_input`` does not test it again. Its finiteness is recorded on the device and
    tested at the end of the call (a :class:`~salience.SalienceError` naming ``what`` then). Outside a
    many-pass call: nothing is recorded, and ``check_input`` tests ``x`` as any other."""
    scope = _SCOPE.get()
    if scope is None or x.numel() == 0:
        return x
    from salience._core.errors import SalienceError

    try:
        lo, hi = torch.aminmax(x.detach())
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - a backend without aminmax
        bad = ~torch.isfinite(x.detach()).all()

    dtype = x.dtype  # not x: the action waits for the call's end, and would keep the chunk's input alive till then

    def refuse() -> None:
        raise SalienceError(f"{what} contain NaN or infinite values, although x is finite: its values are too "
                            f"large for {dtype} (they overflow); scale x down, or compute in a wider dtype")

    scope.defer(f"finite:{what}", bad, refuse)
    scope.inputs.append(x)
    return x


def is_derived(x: Tensor) -> bool:
    """Whether ``x`` is an input :func:`derived` marked for the chunk that runs."""
    scope = _SCOPE.get()
    return scope is not None and any(t is x for t in scope.inputs)
