"""Session 48: occlusion's kept trace and the folded copy's bookkeeping (issue 15's occlusion, issue 19's folding).
Each test fails on session 47's code (a6129eb) but where said; the references: a hand-written occlusion loop (each
window's drop of the target score, averaged over the windows covering a pixel: Zeiler & Fergus), Captum's
``Occlusion`` where installed, the model itself, and the ``torch.fx`` traces counted.

1. Occlusion's kept trace keyed on every plain attribute: a forward keeping ``self.last = y`` (a counter) traced the
   model again (two traces and the shapes' propagation) at every call after a call of the user's.
2. A recurrent state (``self.h = ...`` written by the forward, read by the next call) was left out of what the
   folded copy is kept for (stored as a ``Proxy`` in the trace, it was not probed): the copy ran the state it was
   traced with for good. Occlusion's kept trace, now keyed as the copy, needs the same.
3. A submodule or parameter the forward makes on its first call, made by occlusion's trace of the user's model,
   stayed on it.
4. A copy's failure (``folding.fold_failed``) was forgotten once other models' entries pushed its entry out: the
   model was folded again (two traces) and its copy failed again.
5. The fingerprint named a module by ``id``: a module freed and another made at its address matched, and the folded
   copy of the old one ran.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import fingerprint, folding
from salience.methods import _occlusion_local as local
from salience.methods.perturbation import occlusion_windows
from test_s47_loose import X, Writes, _Stem, traces as _traces

traces = _traces  # a fixture (test_s46_loose's): the torch.fx traces made, counted

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

WINDOW, STRIDE, TARGET = 4, 4, 1


def by_hand(model: nn.Module, x: torch.Tensor, state=None) -> torch.Tensor:
    """Occlusion ``(B, C, H, W)`` by its definition: each window set to 0, the drop of the target's score spread over
    the window, averaged over the windows covering each pixel. ``state()`` puts the model's own state back before
    each pass (a recurrent forward: every pass sees the model as the user left it)."""
    b, c, h, w = x.shape
    total, count = torch.zeros(b, 1, h, w, dtype=torch.float64), torch.zeros(1, 1, h, w, dtype=torch.float64)

    def score(inp: torch.Tensor) -> torch.Tensor:
        if state is not None:
            state()
        with torch.no_grad():
            return model(inp)[:, TARGET].double()

    clean = score(x)
    for y0 in range(0, h - WINDOW + 1, STRIDE):
        for x0 in range(0, w - WINDOW + 1, STRIDE):
            occluded = x.clone()
            occluded[:, :, y0:y0 + WINDOW, x0:x0 + WINDOW] = 0
            total[:, :, y0:y0 + WINDOW, x0:x0 + WINDOW] += (clean - score(occluded))[:, None, None, None]
            count[:, :, y0:y0 + WINDOW, x0:x0 + WINDOW] += 1
    if state is not None:
        state()
    return (total / count).float().expand(b, c, h, w)


def captum(model: nn.Module, x: torch.Tensor) -> "torch.Tensor | None":
    try:
        from captum.attr import Occlusion
    except ImportError:
        return None
    return Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], WINDOW, WINDOW),
                                      strides=(x.shape[1], STRIDE, STRIDE), target=TARGET, baselines=0.0)


def occ(model: nn.Module, x: torch.Tensor = X, local: bool = True, **options) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with salience.performance(**options):
            return salience.occlusion(model, x, TARGET, window=WINDOW, stride=STRIDE, reduce=None, local=local)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def as_found(model: nn.Module, contents: bool = True) -> dict:
    """Every module's ``__dict__`` entries by identity, with ``contents`` a container's contents too: the model
    exactly as it is. (A public call's own eager passes append to a list the forward fills: the guard puts back the
    attributes one level deep, its documented limit, so those checks leave contents out.)"""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for k, v in m.__dict__.items():
            out[(name, k)] = (id(v), tuple(map(id, v.values())) if isinstance(v, dict) else
                              tuple(map(id, v)) if isinstance(v, list) and contents else None)
    return out


# 1. -------------------------------------------------------------------------------------------------------------
def test_occlusion_after_a_users_call_is_not_traced_again(traces):
    model = Writes().eval()
    first = occ(model)
    assert len(traces) == 2  # fx_traced: as it is and under the autocast
    for _ in range(2):
        with torch.no_grad():
            model(X)  # the user runs the model: a new self.last, the counter up, the list longer
        found = as_found(model, contents=False)
        again = occ(model)
        assert as_found(model, contents=False) == found  # the model as the user left it
    assert len(traces) == 2, len(traces)  # session 47: 4, then 6 (traced again after each user call)
    ref = by_hand(model, X)
    close(first, ref)
    close(again, ref)
    theirs = captum(model, X)
    if theirs is not None:
        close(again, theirs)


class Counted(Writes):
    """:class:`Writes` whose forward also reads a plain number (``self.k``): a setting is still what the trace is
    kept for, written attributes or not."""

    def __init__(self) -> None:
        super().__init__()
        self.k = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.k


def test_a_flag_the_forward_reads_still_keys_occlusions_trace(traces):
    """Not a session 47 failure: the session 48 key (settings but the written attributes) still follows a flag."""
    model = Counted().eval()
    occ(model)
    model.k = -2.0
    with torch.no_grad():
        model(X)
    got = occ(model)
    assert len(traces) == 4  # traced again for the flag
    close(got, by_hand(model, X))


# 2. -------------------------------------------------------------------------------------------------------------
class Recurrent(_Stem):
    """The stem with a state: each call adds the state the previous call left (``self.h``, the mean activation of
    its batch) and leaves its own (a recurrent cell's hidden state)."""

    def __init__(self) -> None:
        super().__init__()
        self.h = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(self.c1(x)))
        y = a if self.h is None else a + self.h
        self.h = a.detach().mean(0, keepdim=True)
        y = torch.relu(self.c2(y))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def output_now(model: Recurrent, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` in its state now, the state left as it was."""
    h = model.h
    with torch.no_grad():
        out = model(x)
    model.h = h
    return out


def user_runs(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize("first_state", ["none", "a state"])
def test_a_recurrent_state_keys_the_folded_copy(first_state):
    copy_follows_the_state(Recurrent().eval(), output_now, first_state)


def copy_follows_the_state(model: nn.Module, output_now, first_state: str) -> None:
    """The folded copy gives the model's output in the state a user's call leaves, the first state ``"none"`` (as
    made) or ``"a state"`` (a call's); also test_s48_rvoctrace's, a state held in a dict."""
    if first_state == "a state":
        user_runs(model, X.flip(0))
    with torch.no_grad():
        copy, why = folding.folded_model(model)
        assert copy is not None, why
        first = output_now(model, X)
        close(copy(X), first)
        user_runs(model, X * 0.5)  # another state
        copy, why = folding.folded_model(model)
        assert copy is not None, why
        ref = output_now(model, X)
        assert (ref - first).abs().max() > 1e-2  # the state changes the output
        close(copy(X), ref)  # session 47: the copy of the first state


def test_a_recurrent_state_keys_occlusions_kept_trace():
    """The split checked against the model's output in its state now: with the state left out of the key (session
    48's key without the probe of stored activations), the kept trace of the first state failed the check, and
    occlusion ran full passes for good. (Session 47 keyed every attribute: not a failure there.)"""
    kept_trace_follows_the_state(Recurrent().eval(), output_now)


def kept_trace_follows_the_state(model: nn.Module, output_now) -> None:
    """``_local.plan``'s split gives the model's output in each state the user's calls leave (``output_now``: the
    output in the state now, the state left as it was); also test_s48_rvoctrace's, a state held in a dict."""
    corners, _ = occlusion_windows((16, 16), (WINDOW, WINDOW), (STRIDE, STRIDE))
    user_runs(model, X.flip(0))
    for state in (X * 0.5, X + 1):
        out = output_now(model, X)
        p = local.plan(model, X, (WINDOW, WINDOW), (STRIDE, STRIDE), corners, False, out, lambda o: o)
        assert p.why == "", p.why
        with torch.no_grad():
            close(p.suffix(p.prefix(X.clone())), out)
        user_runs(model, state)


# 3. -------------------------------------------------------------------------------------------------------------
class Grows(_Stem):
    """The stem; its first call makes a layer and a parameter of its own (a lazily built head). ``called``: the layer
    is called (``torch.fx`` cannot trace a call of a module made during the trace), else its weights are used."""

    def __init__(self, called: bool) -> None:
        super().__init__()
        self.called = called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "post" not in self._modules:
            self.post = nn.Conv2d(8, 8, 1)
            with torch.no_grad():
                self.post.weight.copy_(torch.eye(8)[:, :, None, None] * 0.5)
                self.post.bias.fill_(0.1)
        if "gain" not in self._parameters:
            self.gain = nn.Parameter(torch.full((1,), 2.0))
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        y = self.post(y) if self.called else F.conv2d(y, self.post.weight, self.post.bias)
        y = torch.relu(y) * self.gain
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


@pytest.mark.parametrize("called", [False, True], ids=["weights used", "layer called"])
def test_occlusions_trace_leaves_no_module_the_forward_made(called):
    model = Grows(called).eval()
    found, children = as_found(model), dict(model.named_children())
    corners, _ = occlusion_windows((16, 16), (WINDOW, WINDOW), (STRIDE, STRIDE))
    with torch.no_grad():
        out = Grows(called).eval()(X)
    p = local.plan(model, X, (WINDOW, WINDOW), (STRIDE, STRIDE), corners, False, out, lambda o: o)
    assert dict(model.named_children()) == children and "gain" not in model._parameters  # session 47: post, gain
    assert as_found(model) == found
    # refused, full passes: a module made in the trace cannot be called; one whose weights the graph reads is made on
    # the trace's shadow only (session 48's putback), which the model does not have
    assert p.why.startswith("torch.fx cannot trace it (NameError" if called else "its forward makes what the trace reads")
    # the public call: the loop's maps, and the model as found (the guard's part: not a session 47 failure)
    model = Grows(called).eval()
    found = as_found(model, contents=False)
    got = occ(model)
    assert as_found(model, contents=False) == found
    close(got, by_hand(Grows(called).eval(), X))


# 4. -------------------------------------------------------------------------------------------------------------
class Plain(nn.Module):
    """No BatchNorm: its fold is refused ("the model has no BatchNorm layer"), an entry of reasons."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x).mean((2, 3))


def _break(copy: nn.Module, runs: list) -> None:
    """``copy`` (a folded copy) raises when run, each run noted in ``runs``."""
    def broken(*a, **kw):
        runs.append(1)
        raise RuntimeError("the copy broke")
    copy.forward = broken


def test_a_copys_failure_is_kept_when_other_models_push_its_entry_out(traces):
    model, runs = Writes().eval(), []
    copy, why = folding.folded_model(model)
    assert copy is not None, why
    _break(copy, runs)
    ref = by_hand(model, X)
    close(occ(model, local=False, fold_batchnorm=True), ref)  # full passes: the copy itself runs, fails
    assert len(runs) == 1 and len(traces) == 2, (runs, traces)
    for other in [Plain() for _ in range(folding._REASONS_KEEP + folding._FOLDED_KEEP + 1)]:
        assert folding.folded_model(other)[0] is None  # other models' refusals push the failed entry out
    assert (id(model), None) not in folding._folded
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with salience.performance(fold_batchnorm=True):
            got = salience.occlusion(model, X, TARGET, window=WINDOW, stride=STRIDE, reduce=None, local=False)
    close(got, ref)
    assert len(traces) == 2, len(traces)  # session 47: 4, folded again
    assert any("the folded copy failed (RuntimeError: the copy broke)" in str(w.message) for w in seen)
    # a new state of the weights: folded again (the failure is kept for the state it was made in)
    with torch.no_grad():
        model.head.bias.add_(0.25)
    close(occ(model, local=False, fold_batchnorm=True), by_hand(model, X))
    assert len(runs) == 1 and len(traces) == 4, (runs, traces)


# 5. -------------------------------------------------------------------------------------------------------------
class Scaler(nn.Module):
    """A layer whose setting is a dict (no plain attribute: nothing of it is in ``folding.settings``)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cfg["k"]


class Scaled(_Stem):
    def __init__(self) -> None:
        super().__init__()
        self.scale = Scaler({"k": 1.0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def _at_the_same_address(model: Scaled, cfg: dict) -> bool:
    """``model.scale`` freed and a new :class:`Scaler` of ``cfg`` put there, made at the old one's address if the
    allocator hands its block back (whether it did). Everything else is made first: an object made after the old
    layer's death (a list, a dict) took its block at times."""
    keep: list = [None] * 2000
    old, model.scale = id(model.scale), None
    for i in range(len(keep)):
        new = Scaler(cfg)
        if id(new) == old:
            model.scale = new
            return True
        keep[i] = new
    model.scale = keep[0]
    return False


def test_a_module_made_at_a_dead_ones_address_is_another_module():
    model = Scaled().eval()
    for _ in range(20):
        model.scale = Scaler({"k": 1.0})
        close(occ(model, fold_batchnorm=True), by_hand(model, X))  # the folded copy made, kept
        before = fingerprint.structure(model)
        if _at_the_same_address(model, {"k": -3.0}):
            break
    else:
        pytest.skip("the allocator gave no new layer the old one's address")
    ref = by_hand(model, X)
    got = occ(model, fold_batchnorm=True)
    close(got, ref)  # session 47: the old layer's copy ran (k = 1)
    assert fingerprint.structure(model) != before  # session 47: the same fingerprint
    theirs = captum(model, X)
    if theirs is not None:
        close(got, theirs)


def test_the_fingerprint_holds_no_module_alive():
    import gc
    import weakref

    model = Scaled().eval()
    kept = fingerprint.structure(model), fingerprint._fold_key(model)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None and kept[0] is not None
