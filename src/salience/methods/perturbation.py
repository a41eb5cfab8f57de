"""Perturbation methods: occlusion (Zeiler & Fergus 2014) and RISE (Petsiuk et al. 2018).

Both change the input and watch the target's score; no gradient is taken. Each perturbed copy of an
image is an *item* of :func:`salience._core.engine.accumulate` (item ``j = r * B + b``: perturbation
``r`` of image ``b``), so the copies of all images run together in chunks sized from the memory
budget, under ``torch.inference_mode``, and only running sums ``(B, K, H, W)`` are kept: memory does
not grow with the number of windows or masks. K targets share every forward pass. They need only
the model's output, so TorchScript models work too.
The chunks run under the engine's performance options (``memory_format``, ``compile``,
``precision``: :mod:`salience._core.perf`, docs/performance.md), as SmoothGrad's do.

* **Occlusion**: a ``window`` slides over the image with ``stride``; the pixels under it are
  replaced by ``baseline`` and the drop of the score is credited to them:
  ``A(p) = mean over the windows w that cover p of (S(x) - S(x with w occluded))``, as Captum's
  ``Occlusion`` (windows start at ``0, stride, 2 * stride, ...``, ``ceil((H - window) / stride) + 1``
  positions a side; the last may be cut by the border).
* **RISE**: ``N`` random masks ``M_i`` (a ``cell x cell`` grid of cells kept with probability ``p``,
  bilinearly upsampled to ``(cell + 1)`` cells of ``ceil(H / cell)`` pixels, then cropped to
  ``(H, W)`` at a random shift below one cell); the map is ``sum_i S(x * M_i) M_i / (N * p)``, the
  paper's Monte Carlo estimate of ``E[S(x * M) | M(p) = 1]``.

The score ``S`` is the target's score of the model's output; ``softmax="auto"`` takes it of the
class probabilities for class targets (the papers' choice: RISE scores probabilities) and of the
raw output otherwise (regression, custom functions). Whether the output already is probabilities
(a softmax that ``strip_softmax`` did not remove: ``strip_softmax=False``, a TorchScript model) is
judged once per call, on the clean images' output, and holds for every chunk (:func:`judge`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience import reduce as _reduce
from salience._core import derived as _derived
from salience._core import engine as _engine
from salience._core import perf as _perf
from salience._core.autograd import (check_input, class_probabilities, final_softmax, forward_scores,
                                     looks_like_probabilities, unwrap_output)
from salience._core.errors import SalienceError
from salience._core.guard import Found, model_guard
from salience._core.tensors import baseline_tensor, check_fits, check_int, check_number, gaussian_blur, check_flag, fresh_seed
from salience.methods import _occlusion_local as _local
from salience.methods._multi import checked, several_targets
from salience.reduce import Reduction
from salience.targets import Classes, MultiLabel, Predicted, Target, resolve, split

__all__ = ["occlusion", "rise", "rise_masks", "occlusion_windows", "SOFTMAX", "check_softmax"]

SOFTMAX = ("auto", "classes", "none")
"""How perturbation methods score an output: ``"classes"``: the target's probability, the softmax
over classes of a ``(B, classes)`` output, the sigmoid of a single logit (``(B, 1)`` or ``(B,)``: a
binary classifier, whose softmax would be 1 for every image); ``"none"``: the target of the raw
output; ``"auto"``: ``"classes"`` for class targets (a class, the predicted class, several
classes), ``"none"`` for any other target."""


# --------------------------------------------------------------------------- scoring (shared with Score-CAM)


def check_perturbation_targets(targets: Sequence[Target], method: str) -> None:
    """Perturbation methods score the model's output: a target on an inner layer is refused."""
    for t in targets:
        if t.layer is not None:
            raise SalienceError(
                f"{method} scores the model's output for perturbed inputs; a target on an inner layer "
                f"({t.layer!r}) does not apply. Use a gradient method (vanilla, gradcam) for layer targets"
            )


def check_softmax(softmax: Any, choices: Sequence[str] = SOFTMAX) -> str:
    """``softmax`` checked against ``choices`` before any pass (a dry run of the options stops at the
    first forward pass, so a check after it let a bad name through until the method ran)."""
    if softmax not in choices:
        raise SalienceError(f"softmax must be one of {', '.join(choices)}; got {softmax!r}")
    return softmax


def use_probabilities(softmax: str, targets: Sequence[Target], out: Tensor) -> tuple[bool, ...]:
    """Whether each target is scored on class probabilities (see :data:`SOFTMAX`), one flag per target:
    with ``"auto"`` each target's own kind decides, so a class target's map is the same whatever
    targets are asked beside it (a function in the list made every class target's map raw).

    ``out`` is the model's output on the clean images: probabilities need a class axis, ``(B,
    classes)``, or a single logit per image, ``(B, 1)`` or ``(B,)``, whose probability is its sigmoid
    (its softmax is 1 whatever the image: every perturbed copy scored 1 and the map showed the
    masks, not the model). Other outputs take ``"none"``."""
    check_softmax(softmax)
    has_probabilities = out.dim() in (1, 2)
    if softmax == "classes" and not has_probabilities:
        raise SalienceError(f"softmax='classes' needs a model output of shape (B, classes) or one logit (B,), got "
                            f"{tuple(out.shape)}: there is no class axis; pass softmax='none' (the raw output)")
    if softmax == "auto":
        return tuple(has_probabilities and isinstance(t, (Classes, Predicted, MultiLabel)) for t in targets)
    return tuple(softmax == "classes" for _ in targets)


def judge(out: Tensor, probabilities: Sequence[bool]) -> bool:
    """Whether the model's output already is class probabilities (rows non-negative, summing to 1:
    a final softmax that was not stripped), judged once per call on ``out``, the clean images'
    output, and passed as ``already`` to every chunk's :func:`scores_of`: such rows are scored as
    they are, not softmaxed a second time (their softmax was another, flatter score than the
    model's probability). ``False`` when no target is scored on probabilities."""
    return any(probabilities) and looks_like_probabilities(out)


def score_items(model: nn.Module, xs: Tensor, targets: Sequence[Target], probabilities: Sequence[bool],
                strip_softmax: bool, *, already: bool, plain: bool = True, owner: Optional[Tensor] = None) -> Tensor:
    """The K targets' scores ``(n, K)`` of the model on ``xs`` ``(n, C, H, W)`` (one forward, no gradient).

    ``already``: the call's :func:`judge` of its clean output (see :func:`scores_of`). ``plain``: no
    hook of the caller's is on the model, so inside an engine run with ``compile`` the pass may run
    the compiled model (Ablation-CAM's passes, which replace a layer's output by a hook, pass
    ``False``). ``owner``: each item's image, where the items are not the engine's chunk in order (Score-CAM's
    live channels): a refusal of NaN scores names those images."""
    out = forward_scores(model, xs, strip_softmax=strip_softmax, compiled=plain)
    return scores_of(out, targets, probabilities, already=already, owner=owner, fp16=half_passes(model))


def half_passes(model: nn.Module) -> bool:
    """Whether ``model``'s passes run under a float16 autocast (``precision="fp16"``, the run in force on it): a refusal
    of their NaN / infinite scores then names float16's overflow as the likely cause."""
    run = _perf.active(model)
    return run is not None and run.dtype is torch.float16


def scores_of(out: Tensor, targets: Sequence[Target], probabilities: Sequence[bool], *, already: bool,
              owner: Optional[Tensor] = None, fp16: bool = False) -> Tensor:
    """The K targets' scores ``(n, K)`` of a model output ``(n, ...)``: target ``k``'s of its class
    probabilities (:func:`salience._core.autograd.class_probabilities`) when ``probabilities[k]``,
    else of ``out``. ``already``: whether ``(n, classes)`` rows are kept as they are or softmaxed,
    the call's one judgement (:func:`judge`), never this chunk's own: a chunk of perturbed images
    whose raw rows happened to be non-negative and sum to 1 would have been read on another scale. ``fp16``: the pass
    ran under ``precision="fp16"`` (:func:`half_passes`): a refusal of NaN / infinite scores says float16's overflow
    (:func:`overflow_advice`)."""
    n = out.shape[0]
    soft = class_probabilities(out, already) if any(probabilities) else None  # use_probabilities checked the shape
    cols = []
    for t, p in zip(targets, probabilities):
        s = t(soft if p else out)
        if not isinstance(s, Tensor) or s.shape != (n,):
            raise SalienceError(
                f"a perturbation method needs the target's score of each perturbed image, shape ({n},); got "
                f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__} (a scalar loss does not apply)"
            )
        if not s.is_floating_point():  # an argmax's classes, a threshold's bools: raw errors, or a map of them
            raise SalienceError(
                f"a perturbation method needs the target's scores as floating-point numbers; the target {t!r} gave "
                f"dtype {s.dtype} (a class index or a comparison is no score): return the output's values, "
                "e.g. target=lambda out: out[:, 3]")
        cols.append(s)
    scores = torch.stack(cols, dim=1)
    scope = _derived.current()
    if scope is not None:  # in the passes: tested with the call's one synchronization at the end
        bad = ~torch.isfinite(scores)  # (n, K), read only for the refusal's message
        scope.note_scores("finite:scores", bad, targets, owner)
        advice = overflow_advice(out, fp16)
        scope.defer("finite:scores", bad.any(), lambda: _refuse_scores(scope, len(targets), advice))
    return scores


# the refusal's advice where the passes ran in float16 (session 56: it named the masked pixels only, while the likely
# cause is float16's range, as integrated gradients' refusal says: _multi.refuse_fp16_overflow)
FP16_SCORES = ("; under precision='fp16' they probably overflow float16 (NaN or infinite values: float16 holds "
               "magnitudes up to 65504): use precision='bf16' (float32's range) or 'fp32'")
# ... and where the model itself gives float16 (its parameters and images made float16 by the user): no precision=
# puts it back (precision='fp32' runs it in float16 still; review of session 56)
FP16_MODEL = ("; the model's output is float16 (its parameters or images are float16): they probably overflow float16 "
              "(NaN or infinite values: float16 holds magnitudes up to 65504): run it in float32 (model.float() and "
              "x.float()), with precision='bf16' where you want a 16-bit pass")


def overflow_advice(out: Tensor, fp16: bool) -> str:
    """The refusal's words on float16 for scores of the model output ``out`` (``fp16``: the pass ran under
    ``precision="fp16"``): :data:`FP16_MODEL` where ``out`` is float16 (an autocast's output is cast back to the images'
    dtype, so this one is the model's own), :data:`FP16_SCORES` under ``precision="fp16"`` unless ``out`` is float64
    (an autocast casts no float64 operator: that pass ran in float64, which float16's range cannot explain), else
    nothing. Reads dtypes only: no cost to a pass."""
    if out.dtype is torch.float16:
        return FP16_MODEL
    return FP16_SCORES if fp16 and out.dtype is not torch.float64 else ""


def _refuse_scores(scope: _derived.Derived, k: int, advice: str = "") -> None:
    raise _derived.refusal(scope, "finite:scores", k, "the model's scores of the perturbed images are NaN or infinite",
                           ", which makes the map NaN" + advice + "; check what the model "
                           "gives for such images (e.g. model(torch.zeros_like(x)) for masked pixels), or use a "
                           "gradient method")


def clean_scores(model: nn.Module, x: Tensor, out: Tensor, targets: Sequence[Target],
                 probabilities: Sequence[bool], strip_softmax: bool, run: _perf.Run, *, already: bool,
                 plain: bool = False, batch: Optional[int] = None, found: Optional["Found"] = None) -> Tensor:
    """The K targets' scores ``(B, K)`` of the clean images, at the precision of the run's passes.

    ``out`` is the model's float32 output on ``x``, ``already`` its :func:`judge`. Under autocast (``precision="bf16"`` /
    ``"fp16"``) the clean scores are taken again under the same autocast: a score's rounding there
    (about 1e-2 of it) can be as large as the drop a perturbation causes, and differences of a
    float32 score and a bf16 one would show the rounding instead of the drop. ``plain``: the passes run no hook of
    their own (occlusion's full passes), so S runs what they run (the folded copy with ``fold_batchnorm``);
    ``batch``: images a pass (the clean output's, :func:`clean_batch`); ``found``: the model's state put back before
    each (:func:`clean_passes`)."""
    if run.dtype is None:
        return scores_of(out, targets, probabilities, already=already)
    # the pass inside the run, which forward_scores enters the autocast of: a caller's autocast around it is turned off
    # by forward_scores' model_guard (salience's passes take its precision= option only), so these "low" scores were
    # float32 (session 45: a float32 pass of all B images, the call's peak, and S in float32 against bf16 S_k)
    if plain and (not strip_softmax or final_softmax(model) is False):
        # ``plain``: the passes run no hook (occlusion's, RISE's): with ``fold_batchnorm`` they run the folded copy
        # once the model is known to end in no softmax (the clean output's pass showed it): so does S (session 45's
        # review: S of the model itself against the folded copy's S_k left bf16 roundings over pixels it ignores)
        run.note_softmax(False)
    with _perf.inside(run):
        low = clean_passes(model, x, strip_softmax, batch, found, compiled=plain)
    return scores_of(low.to(out.dtype), targets, probabilities, already=already)


def clean_passes(model: nn.Module, x: Tensor, strip_softmax: bool, batch: Optional[int], found: Optional[Found],
                 compiled: bool = False) -> Tensor:
    """:func:`~salience._core.autograd.forward_scores` of ``x``, ``batch`` images a pass (``None``: all), with
    ``found``'s state (:class:`Found`) put back before each pass (its ``before_pass`` hook): a clean pass in parts
    scored each part on the state the part before left."""
    return forward_scores(model, x, strip_softmax=strip_softmax, compiled=compiled, batch_size=batch,
                          before_pass=found.before_pass if found is not None else None)


def _pair(value: Any, name: str, what: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise SalienceError(f"{name} must be an int or (h, w), got {value!r}")
        return check_int(value[0], name, minimum=1, what=what), check_int(value[1], name, minimum=1, what=what)
    v = check_int(value, name, minimum=1, what=what)
    return v, v


# --------------------------------------------------------------------------- occlusion


def occlusion_windows(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The windows' top-left corners ``(n, 2)`` (row-major, Captum's order transposed: rows first)
    and how many windows cover each pixel ``(H, W)``."""
    starts = []
    for i in range(2):
        starts.append(torch.arange(_windows_along(size[i], window[i], stride[i])) * stride[i])
    ys, xs = torch.meshgrid(starts[0], starts[1], indexing="ij")
    corners = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    # the windows are a grid of rows x columns: a pixel's count is its row's count times its column's
    along = []
    for i in range(2):  # +1 where a window starts, -1 past its end: the running sum counts the windows over a pixel
        # clamped: where the stride does not divide, the last window may start past the image (stride > window + 1:
        # it covers no pixel, index size[i] is dropped below; unclamped it was an IndexError)
        steps = torch.zeros(size[i] + 1)
        steps.index_add_(0, starts[i].clamp(max=size[i]), torch.ones(len(starts[i])))
        steps.index_add_(0, (starts[i] + window[i]).clamp(max=size[i]), -torch.ones(len(starts[i])))
        along.append(steps.cumsum(0)[:-1])
    return corners, along[0][:, None] * along[1][None, :]


def check_window(x: Tensor, window: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Occlusion's ``(window, stride, windows)``: the window and stride as ``(h, w)`` pairs for ``x``'s images, the
    defaults (an eighth of the shorter side, half the window) filled in, a value larger than the image refused (a
    :class:`SalienceError`), and how many windows they make (:func:`window_count`, within
    :data:`~salience._core.engine.MAX_PASSES`); also what the explorer and SmoothGrad count before the windows."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if window is None:
        side = max(1, round(min(h, w) / 8))
        win = (side, side)
    else:
        win = _pair(window, "window", "pixels, e.g. window=16 or (16, 16)")
    st = (max(1, win[0] // 2), max(1, win[1] // 2)) if stride is None else _pair(
        stride, "stride", "pixels, e.g. stride=8 or (8, 8)")
    for name, v in (("window", win), ("stride", st)):
        if v[0] > h or v[1] > w:
            raise SalienceError(f"{name} {v[0]}x{v[1]} is larger than the {h}x{w} image; pass a {name} of at most "
                                f"({h}, {w})")
    n = window_count(h, w, win, st)
    _engine.check_passes(n, f"window {win[0]}x{win[1]} with stride {st[0]}x{st[1]} on the {h}x{w} image is {n:,} "
                         "windows,", "give a larger stride (each window is a pass of the image; at most the window, so that the windows "
                         f"cover the image), e.g. {_stride_for(h, w, win)}")
    return win, st, n


def window_count(h: int, w: int, win: tuple[int, int], st: tuple[int, int]) -> int:
    """How many windows (passes of each image) occlusion runs on an ``h`` x ``w`` image: :func:`occlusion_windows`'
    count."""
    return _windows_along(h, win[0], st[0]) * _windows_along(w, win[1], st[1])


def _windows_along(side: int, window: int, stride: int) -> int:
    """How many windows start along one side: one at 0, then one a stride, the last possibly past the image's end."""
    return math.ceil((side - window) / stride) + 1


def _stride_for(h: int, w: int, win: tuple[int, int]) -> str:
    """The options to suggest: the smallest square stride ``s`` whose windows are within the cap and still cover the
    image (stride at most the window: ``stride=s``, or ``window=s, stride=s`` where ``s`` is past the window; window 1
    with stride 2 left 3 of 4 pixels never occluded)."""
    s = 1
    while window_count(h, w, (max(win[0], s), max(win[1], s)), (s, s)) > _engine.MAX_PASSES:
        s += 1
    if s <= min(win):
        return f"stride={s}"
    a, b = max(win[0], s), max(win[1], s)
    return f"window={a if a == b else (a, b)}, stride={s}"


BASELINE_WORDS = "a number, 'blur' or a tensor"
"""The ``baseline`` values :func:`occlusion` takes, as its refusal of a name says them; :data:`BASELINE_VALUES` as
its refusal of a number that is not finite says them (the command line says both in its words,
:data:`salience.cli.options.COMMAND_WORDS`)."""
BASELINE_VALUES = "a pixel value, 'blur' or a tensor"


def _baseline(x: Tensor, baseline: Any) -> Tensor:
    """What occluded pixels become: ``(B, C, H, W)`` (a broadcast view for a number)."""
    if isinstance(baseline, str):
        if baseline != "blur":
            raise SalienceError(f"baseline must be {BASELINE_WORDS}; got {baseline!r}")
        return gaussian_blur(x, sigma=max(1.0, min(x.shape[-2:]) / 16))
    if isinstance(baseline, Tensor):
        return baseline_tensor(baseline, x)
    v = check_fits(check_number(baseline, "baseline", what=BASELINE_VALUES), x.dtype, "baseline")
    return torch.full((1, 1, 1, 1), v, dtype=x.dtype, device=x.device).expand_as(x)


class _Occluded:
    """Items of occlusion: item ``j`` is image ``j % B`` with window ``j // B`` replaced by the baseline."""

    def __init__(self, x: Tensor, base: Tensor, corners: Tensor, window: tuple[int, int]) -> None:
        self.x, self.base, self.window = x, base, window
        self.corners = corners.to(x.device)
        h, w = x.shape[-2:]
        self.rows = torch.arange(h, device=x.device)
        self.cols = torch.arange(w, device=x.device)

    def masks(self, win: Tensor) -> Tensor:
        """The windows ``win`` ``(n,)`` as masks ``(n, 1, H, W)`` (1 inside): the outer product of their row and
        column indicators, made for these windows only (for all at once they were ``(windows, H + W)`` floats)."""
        return self.masks_on(win, self.rows, self.cols)

    def masks_on(self, win: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """The windows ``win`` ``(n,)`` on the pixels at ``rows`` and ``cols`` (``(h,)`` / ``(w,)``, or per window
        ``(n, h)`` / ``(n, w)``: a crop's) as masks ``(n, 1, h, w)``."""
        c = self.corners[win]
        r = ((rows >= c[:, :1]) & (rows < c[:, :1] + self.window[0])).to(self.x.dtype)
        k = ((cols >= c[:, 1:]) & (cols < c[:, 1:] + self.window[1])).to(self.x.dtype)
        return (r[:, :, None] * k[:, None, :]).unsqueeze(1)

    def __call__(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        b = self.x.shape[0]
        idx = torch.arange(start, stop, device=self.x.device)
        owner, win = idx % b, idx // b
        m = self.masks(win)
        xs = self.x[owner] * (1 - m) + self.base[owner] * m
        return xs, owner, m


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def occlusion(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    window: Union[None, int, tuple[int, int]] = None,
    stride: Union[None, int, tuple[int, int]] = None,
    baseline: Union[float, str, Tensor] = 0.0,
    softmax: str = "none",
    reduce: Union[None, str, Reduction] = "max",
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
    local: bool = True,
) -> Tensor:
    """Occlusion: the drop of the target's score when a window over each pixel is blanked out.

    ``x``: ``(B, C, H, W)``. ``window`` and ``stride``: ints or ``(h, w)`` in pixels (default: an
    eighth of the shorter side, and half the window); all channels are occluded together.
    ``baseline``: the value occluded pixels take: a number (default 0), ``"blur"`` (the image
    blurred with a Gaussian of sigma = side / 16, at least 1 pixel) or a tensor broadcastable to ``x``.
    Each pixel gets the mean of ``S(x) - S(occluded x)`` over the windows that cover it (Captum's
    ``Occlusion``). ``softmax``: score the raw output (default, as Captum) or class probabilities
    (see :data:`SOFTMAX`).

    The raw map is ``(B, C, H, W)``, equal in every channel; ``reduce`` (default ``"max"``, the channel maximum)
    gives the signed ``(B, H, W)``, ``reduce=None`` the ``(B, C, H, W)`` Captum returns. Several
    targets give ``(B, K, ...)`` and share every forward pass. ``chunk`` (occluded copies per pass),
    ``max_memory`` (bytes or ``"2GiB"``), ``progress``, ``memory_format``, ``compile`` and
    ``precision`` (how the passes run; ``None``: the settings) as in :func:`salience.smoothgrad`.
    ``local`` (default ``True``): region-limited passes where the model allows them: its leading local layers
    (convolutions, eval-mode batch norm, elementwise activations, pooling, sums of such branches) run on a crop
    around each window only and the rest of the model from a copy of the clean activation with the crop's exact
    part pasted in (:mod:`salience.methods._occlusion_local`); the same maps as full passes up to float rounding.
    A forward ``torch.fx`` cannot trace (a Hugging Face model's ``**kwargs``, a check of the channel count) is
    traced as the call ``model(x)`` with the images' channel count known (session 52); models that cannot be
    traced even so (a branch on the image's size or values), have hooks, an autocast block in their forward or no
    such prefix, and ``compile`` or ``precision="bf16-mixed"`` runs, take full passes (a debug log line of
    ``salience.occlusion`` says why);
    ``False``: always full passes.
    """
    progress = check_flag(progress, "progress")
    local = check_flag(local, "local")
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    check_perturbation_targets(targets, "occlusion")
    check_softmax(softmax)
    win, st, n_windows = check_window(x, window, stride)
    _engine.check_copies(n_windows, f"occlusion's {n_windows:,} windows", "fewer samples or a larger stride")
    red = _reduce.get_reduction(reduce)
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    base = _baseline(x, baseline)
    corners, cover = occlusion_windows((int(x.shape[-2]), int(x.shape[-1])), win, st)
    items = _Occluded(x, base, corners, win)
    b = x.shape[0]
    with model_guard(model), Found(model) as found:  # the model's own state, put back before each pass (session 49)
        # as Score-CAM's / RISE's (all B at once in float32: the bf16 call's peak), within max_memory
        batch = clean_batch(x, perf, chunk, budget, model, strip_softmax)
        out = clean_passes(model, x, strip_softmax, batch, found)
        resolved = resolve(targets, model, x, strip_softmax=strip_softmax, output=out)
        probs = use_probabilities(softmax, resolved, out)
        already = judge(out, probs)  # once, on the clean images: every chunk on one scale
        split_plan = _split(model, x, win, st, corners, strip_softmax, out, perf, batch, found) if local else None
        tag = f"occlusion{'-local' if split_plan is not None else ''}:{win}:{st}:{probs}:{strip_softmax}"
        # region-limited passes never run the model's forward: with a folded copy the run makes channels-last weights
        found.before_pass()  # of that copy only (session 45); the copy traced with the state found, not the clean pass's
        run = _perf.Run(model, x, perf, tag=tag, **({"plain_passes": True, "strip_softmax": False} if split_plan else {}))
        if split_plan is None:
            clean = clean_scores(model, x, out, resolved, probs, strip_softmax, run, already=already, plain=True,
                                 batch=batch, found=found)  # (B, K), ``batch`` images a pass as the clean output's
        else:
            plan, spans = split_plan
            spans_host = spans.tolist()  # (windows, 2, 3) as lists: the pastes' slices, read once
            clean_cut, clean = _local_clean(plan, x, out, run, model, batch, resolved, probs, already)  # (B, .), (B, K)

        def compute(start: int, stop: int) -> Tensor:  # the found state put back before each: the engine's (found=)
            if split_plan is None:
                xs, owner, m = items(start, stop)
                scores = None
            else:
                idx = torch.arange(start, stop, device=x.device)
                owner, w_idx = idx % b, idx // b
                m = items.masks(w_idx)
                sp = [spans_host[j // b] for j in range(start, stop)]
                scores = _local_scores(plan, spans[w_idx], sp, items, owner, w_idx, clean_cut, run, model)
            tg = [t.for_items(owner) for t in resolved]
            if scores is None:
                scores = score_items(model, xs, tg, probs, strip_softmax, already=already)
            else:
                scores = scores_of(scores, tg, probs, already=already, fp16=run.dtype is torch.float16)
            drop = clean[owner] - scores  # (n, K)
            return drop[:, :, None, None] * m  # (n, K, H, W)

        sums = _engine.accumulate(compute, len(corners) * b, b, chunk=chunk, max_memory=budget,
                                  progress=progress, desc="occlusion", device=x.device, inference=True, run=run,
                                  found=found)
    cov = cover.to(device=x.device, dtype=sums.total.dtype).clamp(min=1)
    maps = (sums.total / cov).to(x.dtype)  # (B, K, H, W)
    maps = maps.unsqueeze(2).expand(-1, -1, x.shape[1], -1, -1)  # (B, K, C, H, W)
    return _finish(maps, red, multi)


def _split(model: nn.Module, x: Tensor, win: tuple[int, int], st: tuple[int, int], corners: Tensor,
           strip_softmax: bool, out: Tensor, perf: _perf.Performance, batch: Optional[int] = None,
           found: Optional[Found] = None) -> Optional[tuple[Any, Tensor]]:
    """The region-limited passes' plan and each window's spans (:func:`salience.methods._occlusion_local.spans`), or
    ``None`` (full passes; a debug log line says why). ``batch``: images a pass of the plan's check on the clean
    images; ``found``: the model's state, put back first (the trace reads a stored state as a constant: the one the
    call found, not the clean pass's)."""
    if found is not None:
        found.before_pass()
    why = ""
    if perf.backend is not None:
        why = "compile runs the whole model compiled"
    elif perf.precision == "bf16-mixed":
        why = "bf16-mixed chooses float32 layers by the input's size, which a crop changes"
    else:
        dtype = _perf.autocast_dtype(perf)
        # fold_batchnorm in float32: the crops and the rest run the process's float32 folded copy (the passes' own).
        # Under an autocast the split is found and checked on the model itself (its trace shares the model's
        # weights) and then run on the folded copy the run holds in the autocast's dtype (:func:`_local.moved`):
        # before, the float32 copy (98 MiB on resnet50, kept for the process) was held beside the run's (49 MiB)
        def planned(on: Optional[nn.Module]) -> Any:  # the split found and checked on ``on`` (None: the model)
            return _local.plan(on if on is not None else model, x, win, st, corners, strip_softmax, out,
                               lambda o: unwrap_output(o, model), dtype, batch)

        plan = planned(_perf.folded_model(model)[0] if perf.fold_batchnorm and dtype is None else None)
        why = plan.why
        if not why and perf.fold_batchnorm and dtype is not None:
            low = _perf.folded_model(model, dtype=dtype)[0]  # the run's copy (cached: perf.Run takes the same)
            if low is not None:
                moved = _local.moved(plan, low, strip_softmax)
                if moved is None:  # the cut is not a node of the folded graph (a folded BatchNorm): as before
                    plan = planned(_perf.folded_model(model)[0])
                    why = plan.why
                else:
                    plan = moved
    if why:
        _local.log.debug("occlusion: full passes: %s", why)
        return None
    _local.log.debug("occlusion: region-limited passes, cut at %s, crops %s, about %.0f %% of a pass saved",
                     plan.cut, plan.crop, 100 * plan.saved)
    return plan, _local.spans(plan, corners, win, (int(x.shape[-2]), int(x.shape[-1]))).to(x.device)


def _local_clean(plan: Any, x: Tensor, out: Tensor, run: _perf.Run, model: nn.Module, batch: int,
                 targets: Sequence[Target], probabilities: Sequence[bool], already: bool) -> tuple[Tensor, Tensor]:
    """The clean cut ``(B, C', H', W')`` every pass's cut starts from (held once) and the clean scores ``(B, K)`` of
    region-limited passes: in float32 the check's activation and ``out``'s scores; under an autocast the prefix and
    the suffix of the plan (the copy the passes run: the bf16 folded one with ``fold_batchnorm``) on the clean images,
    ``batch`` images a pass (the check's float32 activation dropped first). S and S_k then come from one function at
    one precision: a window that changes nothing drops exactly 0 (session 45's review: the clean scores of the model
    itself, unfolded, against the folded copy's S_k left bf16 roundings, a quarter of the map's max, over pixels the
    model ignores)."""
    clean_cut, plan.clean = plan.clean, None
    if run.dtype is None:
        return clean_cut, scores_of(out, targets, probabilities, already=already)
    del clean_cut
    b = int(x.shape[0])
    cut: Optional[Tensor] = None
    outs = []
    with torch.no_grad(), run.autocast():
        for i in range(0, b, batch):
            part = plan.prefix(run.prepare(x[i:i + batch].clone()))  # a copy: the prefix may start in place
            cut = _local.rows_into(cut, part, i, b)
            outs.append(unwrap_output(plan.suffix(part.clone()), model).detach().to(x.dtype))  # a copy, as the passes
            del part
    assert cut is not None
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return cut, scores_of(out, targets, probabilities, already=already)


def _local_scores(plan: Any, sp: Tensor, sp_host: list, items: _Occluded, owner: Tensor, win: Tensor,
                  clean_cut: Tensor, run: _perf.Run, model: nn.Module) -> Tensor:
    """The model's output ``(n, ...)`` for the occluded items: the prefix on their crops ``(n, C, h, w)`` (the
    window occluded there as :class:`_Occluded` does on the whole image), pasted into the clean cut, the suffix.
    ``sp``: the items' spans on the device, ``sp_host`` the same as lists."""
    x, base = items.x, items.base
    xc = _local.crops(x, owner, sp, plan.crop)
    bc = _local.crops(base, owner, sp, plan.crop)
    dev = x.device
    m = items.masks_on(win, sp[:, 0, 0, None] + torch.arange(plan.crop[0], device=dev),
                       sp[:, 1, 0, None] + torch.arange(plan.crop[1], device=dev))
    xc = xc * (1 - m) + bc * m
    with torch.no_grad(), run.autocast():
        act = plan.prefix(run.prepare(xc))
        cut = _local.paste(plan, clean_cut[owner], act, sp_host)
        out = unwrap_output(plan.suffix(cut), model)
    return out.detach().to(x.dtype)


def _finish(maps: Tensor, red: Optional[Reduction], multi: bool) -> Tensor:
    """``(B, K, C, H, W)`` -> reduced per target; the K axis dropped unless ``multi``."""
    if red is not None:
        maps = torch.stack([red(maps[:, k]) for k in range(maps.shape[1])], dim=1)
    return maps if multi else maps[:, 0]


# --------------------------------------------------------------------------- RISE


def rise_masks(start: int, stop: int, size: tuple[int, int], *, cell: int = 7, p: float = 0.5, seed: int = 0,
               device: Union[None, str, torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """RISE masks ``start..stop-1`` ``(n, H, W)`` for images of ``size`` ``(H, W)``.

    Mask ``i`` is drawn from a generator of its own seeded with ``seed * 1_000_003 + i`` (a function
    of ``(seed, i)`` only), so the same seed gives the same masks whatever the chunking: a
    ``cell x cell`` grid, each cell 1 with probability ``p``, upsampled bilinearly
    (``align_corners=False``) to ``(cell + 1) * ceil(H / cell)`` by ``(cell + 1) * ceil(W / cell)``
    pixels and cropped to ``(H, W)`` at a shift drawn uniformly in ``[0, ceil(H / cell))`` x
    ``[0, ceil(W / cell))`` (Petsiuk et al.'s construction).
    """
    h, w = size
    ch, cw = math.ceil(h / cell), math.ceil(w / cell)
    grids, shifts = [], []
    for i in range(start, stop):
        # modulo 2**64, as torch takes a negative seed: a large one does not overflow its 64 bits, the others unchanged
        g = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2 ** 64)
        grids.append((torch.rand(cell, cell, generator=g, dtype=torch.float32) < p).to(dtype))  # whatever the default dtype
        shifts.append((int(torch.randint(0, ch, (1,), generator=g)), int(torch.randint(0, cw, (1,), generator=g))))
    grid = torch.stack(grids)
    if device is not None and torch.device(device).type == "cuda":  # a blocking copy waits for the device
        grid = grid.pin_memory().to(device, non_blocking=True)
    else:
        grid = grid.to(device)
    grid = grid.unsqueeze(1)
    up = F.interpolate(grid, size=((cell + 1) * ch, (cell + 1) * cw), mode="bilinear", align_corners=False)[:, 0]
    return torch.stack([up[k, dy:dy + h, dx:dx + w] for k, (dy, dx) in enumerate(shifts)])


class _Reused:
    """Rows of ``x`` gathered into one buffer that every chunk reuses (:meth:`rows`; the next call overwrites it).
    A fresh ``(n, C, H, W)`` per chunk, freed between the small tensors the call keeps (each chunk's scores), grew
    glibc's heap by about its size a chunk (Score-CAM's masked images: 4.6 MB a chunk for 8 images at 224 px, session
    42; RISE's peak did not change measurably with it: its masks and maps are fresh per chunk still).

    The buffer is handed to the model (a contiguous run's input): one that something still holds when the next
    chunk comes (a hook of the user's that keeps the model's input, a view of it) is left to its holder and a fresh
    one is taken (:func:`_held_elsewhere`), else every input kept became the last chunk's."""

    def __init__(self, x: Tensor, model: Optional[nn.Module] = None) -> None:
        self.x, self.model = x, model
        self._buffer: Optional[Tensor] = None

    def rows(self, owner: Tensor) -> Tensor:
        """``x[owner]`` ``(n, C, H, W)``, in the buffer, laid out as the chunk's pass takes its input: channels-last in
        a channels-last chunk of ``model``'s run (the pass's :meth:`~salience._core.perf.Run.prepare` then makes no
        copy: a contiguous buffer and its channels-last copy, 4.6 MiB each for 8 images at 224 px, were both alive at
        the call's peak under bf16 + channels-last, session 45)."""
        n = len(owner)
        run = _perf.active(self.model) if self.model is not None and self.x.dim() == 4 else None
        fmt = torch.channels_last if run is not None and run.channels_last else torch.contiguous_format
        buf = self._buffer
        if (buf is None or buf.shape[0] < n or not buf.is_contiguous(memory_format=fmt) or _held_elsewhere(buf)):
            self._buffer = buf = None  # the smaller one (the probe's) goes first
            self._buffer = torch.empty((n,) + tuple(self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device,
                                       memory_format=fmt)
        return torch.index_select(self.x, 0, owner, out=self._buffer[:n])


def _held_elsewhere(buffer: Tensor) -> bool:
    """Whether a tensor other than ``buffer`` (a view, the same tensor kept elsewhere counts through its storage)
    refers to ``buffer``'s storage: its storage's use count, ``buffer``'s and the storage object's asked for here
    apart (``True`` where this torch cannot say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return True
    return count(buffer.untyped_storage()._cdata) > 2


# clean_batch's probe: bytes of one image's float32 clean pass, per model (its structure), item shape, dtype, device
# and strip_softmax, as the engine keeps its memory probes (perf.Run.known_probe)
_CLEAN_PROBES = _perf.ModelCache(16)


def clean_batch(x: Tensor, perf: _perf.Performance, chunk: Optional[int] = None, budget: Optional[int] = None,
                model: Optional[nn.Module] = None, strip_softmax: bool = True) -> int:
    """The images per float32 clean pass of a many-pass call on ``x`` ``(B, ...)``: all ``B``, but half of them (at
    least one) where the passes run under a 16-bit autocast (``precision``), and at most ``chunk`` (the caller's
    items per pass: a clean image costs what an item of the passes costs, in float32 more). The engine's chunks are
    sized for the passes' 16-bit activations, about ``B`` items a chunk on resnet50 at 224 px: the clean pass, in
    float32 (the map's scale, the targets, the layer's output), held twice a chunk's activations at once, the call's
    peak (92 MiB of tensors against 46-60 MiB a chunk on 8 images, session 44). Images are independent in an
    eval-mode pass: the same values up to the rounding of a kernel's choice per batch size.

    ``budget``: the call's ``max_memory`` in bytes (``None``: not given), which bounds the clean passes as it bounds
    the engine's chunks (80 % of it, :func:`~salience._core.engine.chunk_size`): the bytes of one image's float32
    pass of ``model`` measured by a pass of the first image under :class:`~salience._core.engine.MemoryProbe`, in the
    first call with ``max_memory`` and more than one image a pass per model (its
    :func:`~salience._core.fingerprint.structure`), item shape, dtype, device and ``strip_softmax``, kept for the
    later ones (``_CLEAN_PROBES``: the same measure, so the same passes; before session 47 every call ran it, a pass
    more that the model's hooks saw); the random generators are left as it found them (before session 46
    ``max_memory`` left the clean passes at all ``B`` images)."""
    b = int(x.shape[0])
    n = b if perf.precision == "fp32" else max(1, -(-b // 2))  # the others are 16-bit autocasts (perf.PRECISIONS)
    if chunk is not None:
        n = max(1, min(n, int(chunk)))
    if budget is not None and model is not None and n > 1:
        key, shape = (tuple(x.shape[1:]), x.dtype, str(x.device), strip_softmax), _perf.structure(model)
        peak = _CLEAN_PROBES.get(model, key, shape)
        if peak is None:
            probe = _engine.MemoryProbe()
            # the generators as they were after it (a model with noise in its forward: the call's random numbers the
            # same with max_memory as without, as the engine's own probe pass keeps them; the review of session 46)
            # a copy, made outside the probe: a model that changes its input in place (x -= mean) wrote the user's
            # first image once more than the others, and the call's maps with max_memory were not those without it
            # (session 46's last read)
            first = x[:1].clone()
            with _engine.generators_kept(x.device), probe:
                forward_scores(model, first, strip_softmax=strip_softmax)
            del first
            peak = probe.peak
            _CLEAN_PROBES.put(model, key, shape, peak)
        n = max(1, min(n, int(0.8 * budget) // max(1, peak)))
    return n


def softmax_known(run: _perf.Run, known: Optional[bool]) -> _perf.Run:
    """``run``, told what the call's clean pass of ``model`` (before the run, eager, in float32) showed of a final
    softmax (:func:`~salience._core.autograd.final_softmax`), so that its first chunk, the engine's memory probe, runs
    the folded copy (``fold_batchnorm``) as every later chunk does. Before, that chunk ran the model itself, under the
    autocast, to see whether a softmax was to be stripped: with ``precision="bf16"`` its bf16 casts of the model's
    weights (49 MiB on resnet50) were made and held beside the folded copy (49 MiB more), the call's peak (session 44).
    The clean pass is the model's own structure, as the first chunk's would be: the same answer, one pass sooner.
    ``known``: what the clean pass showed (``final_softmax`` read after it; ``None``: nothing, the first chunk looks)."""
    if known is not None:
        run.note_softmax(known)
    return run


@checked  # the public method: a call its signature refuses is an ArgumentError
@several_targets
def rise(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    masks: int = 4000,
    cell: int = 7,
    p: float = 0.5,
    seed: Union[None, int] = 0,
    softmax: str = "auto",
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
    memory_format: Optional[str] = None,
    compile: Union[None, bool, str, Callable] = None,
    precision: Optional[str] = None,
) -> Tensor:
    """RISE: the target's score averaged over random masks, as a map ``(B, H, W)``.

    ``x``: ``(B, C, H, W)``; the map is ``sum_i S(x * M_i) M_i / (masks * p)`` over random masks
    ``M_i`` (:func:`rise_masks`), the same for all images. ``masks`` is the number of random masks
    (forward passes per image; the paper used 4000 on 224 x 224 images). ``cell`` is the grid's
    number of cells a side (the paper's s). ``p`` is the probability of keeping a cell. ``seed``
    fixes the masks: the same seed gives the same masks whatever the chunking (and the global RNG is neither
    used nor changed); ``None`` draws a fresh seed, so each call has masks of its own (as SmoothGrad's
    ``seed=None`` has noise of its own).
    ``softmax="auto"`` scores class probabilities for class targets (the paper), the raw output
    otherwise (see :data:`SOFTMAX`). Several targets give ``(B, K, H, W)`` and share every forward
    pass. ``chunk``, ``max_memory``, ``progress``, ``memory_format``, ``compile`` and ``precision``
    (how the passes run; ``None``: the settings) as in :func:`salience.smoothgrad`.
    """
    progress = check_flag(progress, "progress")
    check_input(x, model)
    targets, multi = split(target, x.shape[0])
    check_perturbation_targets(targets, "rise")
    check_softmax(softmax)
    n_masks = check_int(masks, "masks", minimum=1, what="random masks per image, e.g. 4000")
    _engine.check_passes(n_masks, f"masks={n_masks} is", "RISE's paper uses 4,000 to 8,000 masks")
    _engine.check_copies(n_masks, f"RISE's {n_masks:,} masks", "fewer samples or fewer masks")
    cell = check_int(cell, "cell", minimum=1, what="grid cells a side, e.g. 7")
    p = check_number(p, "p", what="the probability of keeping a cell, in (0, 1]")
    if not 0 < p <= 1:
        raise SalienceError(f"p must be in (0, 1] (the probability of keeping a cell), got {p}")
    seed = fresh_seed() if seed is None else check_int(seed, "seed", minimum=None,
                                                      what="it fixes the masks, e.g. 0; None: fresh masks")
    if cell > min(x.shape[-2:]):
        raise SalienceError(f"cell={cell} is more cells than the {x.shape[-2]}x{x.shape[-1]} image has pixels a side")
    budget = _engine.check_memory_options(chunk, max_memory)
    perf = _perf.resolve(memory_format, compile, precision)
    b = x.shape[0]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    with model_guard(model), Found(model) as found:  # the model's own state, put back before each pass (session 49)
        out = clean_passes(model, x, strip_softmax, clean_batch(x, perf, chunk, budget, model, strip_softmax), found)
        resolved = resolve(targets, model, x, strip_softmax=strip_softmax, output=out)
        probs = use_probabilities(softmax, resolved, out)
        already = judge(out, probs)  # once, on the clean images: every chunk on one scale
        del out  # not held through the passes (B x classes floats: 31 KiB of the call's peak, session 47)

        inputs = _Reused(x, model)
        total = torch.zeros((b, len(resolved)) + size, dtype=_rise_sum_dtype(x), device=x.device)

        def compute(start: int, stop: int) -> Tensor:
            first, last = start // b, (stop - 1) // b
            def masks() -> Tensor:  # the chunk's masks (n, H, W): each drawn from its own seed, the same values each time
                return rise_masks(first, last + 1, size, cell=cell, p=p, seed=seed, device=x.device, dtype=x.dtype)

            owner = torch.arange(start, stop, device=x.device) % b
            runs = _mask_runs(start, stop, b)
            xs = inputs.rows(owner)
            m = masks()
            for r, lo, hi, _ in runs:  # each mask on its items' rows (a view each: no (n, H, W) gather of the masks)
                xs[lo:hi].mul_(m[r - first])
            # not held through the pass, made again after it (about 1 ms a mask at 224 px against a pass of B images):
            # alive at the pass's peak they put the call's live tensors over a plain loop's, session 47
            del m
            s = score_items(model, xs, [t.for_items(owner) for t in resolved], probs, strip_softmax, already=already)
            if not _engine.discarded():  # the engine's thrown-away memory probe adds nothing
                m = masks()
                for r, lo, hi, image in runs:  # mask by mask, in mask order: the same sums whatever the chunking
                    total[image:image + hi - lo].addcmul_(s[lo:hi, :, None, None], m[r - first])
            return s  # (n, K): the engine's sums of them are unused (small)

        found.before_pass()  # the folded copy (fold_batchnorm, made by the run) traced with the state the call found
        _engine.accumulate(compute, n_masks * b, b, chunk=chunk, max_memory=budget, progress=progress,
                           desc="rise", device=x.device, inference=True,
                           run=softmax_known(_perf.Run(model, x, perf, tag=f"rise:{probs}:{strip_softmax}",
                                                       plain_passes=True, strip_softmax=strip_softmax),
                                             final_softmax(model)), found=found)  # put back before each chunk
    maps = total.div_(n_masks * p).to(x.dtype)
    return maps if multi else maps[:, 0]


def _rise_sum_dtype(x: Tensor) -> torch.dtype:
    """RISE's running sums' dtype: ``x``'s, at least float32. Summed mask by mask in mask order (float32 for float32
    images, as a plain loop's map), not the engine's float64 sums (twice the bytes, held through every pass: the
    call's live tensors then were 1.5 MiB over the loop's for 8 images at 224 px, session 46). The rounding of 8,000
    masks summed in float32 is about 1e-6 of the map (benchmarks/perturbation-resnet50-8images-s46-mem.md), far below
    the Monte Carlo spread of the estimate itself (about 1/sqrt(masks): 1e-2)."""
    return torch.promote_types(x.dtype, torch.float32)


def _mask_runs(start: int, stop: int, b: int) -> list[tuple[int, int, int, int]]:
    """The items ``start..stop-1`` (item ``j``: mask ``j // b`` on image ``j % b``) as runs of one mask:
    ``(mask, lo, hi, first image)``, ``lo:hi`` the run's positions in the chunk (its images consecutive)."""
    runs = []
    j = start
    while j < stop:
        r = j // b
        end = min(stop, (r + 1) * b)
        runs.append((r, j - start, end - start, j % b))
        j = end
    return runs
