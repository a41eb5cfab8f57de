"""Session 47's loose ends of session 46, each checked against a reference (each fails on session 46's code but
where said).

1. The folded copy (``fold_batchnorm=True``) is kept for the modules' plain attributes (``folding.settings``), which
   a ``torch.fx`` trace bakes in. It ignored an enum member (a forward branching on ``self.mode = Mode.TANH`` ran the
   old branch) and keyed a function or a non-parameter tensor by ``id`` alone: a new one made where the old one died
   took its id, and the copy ran the old one. An attribute the forward itself sets (``self.last = y``, a counter)
   changed at every call of the user's, and the copy was made again at every salience call after one. The reference:
   the same call unfolded; the ``torch.fx`` traces counted.
"""
from __future__ import annotations

import enum
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import folding
from test_s49_record import ForwardLog

pytestmark = pytest.mark.usefixtures("fresh_perf_state")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


class Mode(enum.Enum):
    RELU = "relu"
    TANH = "tanh"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


def _scaled(k: float):
    """A Python function the forward calls (fx traces through it: the copy holds nothing of it)."""
    return lambda t: torch.tanh(t) * k


class _Stem(nn.Module):
    """conv + BatchNorm + conv (a BatchNorm to fold) and a head, seeded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
        self.head = nn.Linear(8 * 4, 3)


class Settable(_Stem):
    """The stem; the forward reads an enum flag, an IntEnum, a tuple of enums, a function and a constant tensor (none
    a parameter or buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.mode, self.level, self.modes = Mode.RELU, Level.LOW, (Mode.RELU,)
        self.act, self.shift = _scaled(1.0), torch.tensor(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.c1(x))
        y = torch.relu(y) if self.mode is Mode.RELU else torch.tanh(y)
        y = y * 2.0 if self.level == Level.HIGH else y
        y = y - 0.3 if Mode.TANH in self.modes else y
        y = self.act(self.c2(y) + self.shift)
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def _rise(model: nn.Module, fold: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with salience.performance(fold_batchnorm=fold):
            return salience.rise(model, X, 1, masks=16, seed=0)


def _dead(m: Settable, name: str) -> int:
    """The address of ``m.<name>``, dropped and dead: a cycle holding it (a traceback, a frame of an earlier test
    under pytest-xdist) is collected first, so its block is free before :func:`_same_id` looks for it; if anything
    still holds it, that is said (salience keeping a user's attribute alive would be a leak)."""
    ref = weakref.ref(getattr(m, name))
    old = id(ref())
    setattr(m, name, None)
    gc.collect()
    if ref() is not None:
        holders = [type(r).__name__ for r in gc.get_referrers(ref())]
        pytest.fail(f"the dropped {name} is still alive, held by {holders}")
    return old


def _same_id(old: int, make):
    """A new object from ``make()`` at the address ``old`` (a dead object's): the others made meanwhile are kept
    alive until then, so the allocator reaches the free block."""
    keep = []
    for _ in range(200_000):
        new = make()
        if id(new) == old:
            return new
        keep.append(new)
    pytest.fail("no new object took the dead one's id")


def _new_function(m: Settable) -> None:
    m.act = _same_id(_dead(m, "act"), lambda: _scaled(3.0))


def _new_tensor(m: Settable) -> None:
    m.shift = _same_id(_dead(m, "shift"), lambda: torch.tensor(0.7))


CHANGES = {
    "enum": lambda m: setattr(m, "mode", Mode.TANH),
    "int enum": lambda m: setattr(m, "level", Level.HIGH),
    "tuple of enums": lambda m: setattr(m, "modes", (Mode.RELU, Mode.TANH)),
    "function at the dead one's id": _new_function,
    "tensor at the dead one's id": _new_tensor,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_folded_copy_follows_enums_and_objects_made_at_a_dead_ones_id(change):
    model = Settable().eval()
    before = _rise(model, True)  # the folded copy made, kept for the model
    torch.testing.assert_close(before, _rise(model, False), rtol=0, atol=1e-5)
    CHANGES[change](model)
    after, ref = _rise(model, True), _rise(model, False)
    assert (ref - before).abs().max() > 1e-3  # the change changes the map
    torch.testing.assert_close(after, ref, rtol=0, atol=1e-5)  # session 46: the old copy's map, 0.016-0.099 off


class Writes(_Stem):
    """The stem; its forward keeps its last activation and counts its calls (``self.last = y``, ``self.calls += 1``),
    and appends to a list."""

    def __init__(self) -> None:
        super().__init__()
        self.last, self.calls, self.sizes = None, 0, [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        self.last = y
        self.calls += 1
        self.sizes.append(7)
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


import test_s46_loose  # noqa: E402

traces = test_s46_loose.traces  # a fixture: the torch.fx traces made, counted


def test_attributes_the_forward_writes_do_not_fold_again(traces):
    model = Writes().eval()
    first = _rise(model, True)
    assert len(traces) == 2  # fx_traced: as it is and under the autocast
    for _ in range(2):
        model(X)  # the user runs the model: a new self.last, the counter up
        again = _rise(model, True)
    assert len(traces) == 2, len(traces)  # session 46: 6, folded again at every call
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again, _rise(model, False), rtol=0, atol=1e-5)
    assert model.calls == 2 and type(model.last) is torch.Tensor  # the user's model as the user left it (the guard)


def test_a_trace_puts_back_what_the_forward_wrote():
    model = Writes().eval()
    last, sizes = model.last, model.sizes
    gm = folding.fx_traced(model, None)  # occlusion's trace is of the user's model itself
    assert isinstance(gm, torch.fx.GraphModule)
    assert model.last is last and model.calls == 0 and model.sizes is sizes and sizes == [0]  # session 46: a Proxy
    written: set = set()
    folding.fx_traced(model, None, written=written)
    assert written == {(0, "last"), (0, "calls"), (0, "sizes")}
    assert "last" not in str(folding.settings(model, frozenset(written)))
    torch.testing.assert_close(gm(X), model(X), rtol=0, atol=0)


# 4. bf16-mixed's own float32 folded copy (a model with a bf16 autocast block: the float32 copy the float32 runs share
# is refused for it) failing in a pass: its failure was written in the float32 copy's entry, so a float32 run then
# warned "the folded copy failed" (bf16-mixed's error) instead of naming the block, and bf16-mixed took the failing
# copy again. The reference: the warnings' causes; the maps the unfolded model's.
from test_s45_loose import Blocked  # noqa: E402
from test_s44_rvloose import _rise as _rise_notes  # noqa: E402


def test_bf16_mixed_copy_failing_is_kept_in_its_own_entry(monkeypatch):
    real, runs = folding._fold, []

    def failing(model, *a, **kw):
        made = real(model, *a, **kw)
        passes = a[1] if len(a) > 1 else kw.get("passes")
        if passes is not None and isinstance(made, nn.Module):  # bf16-mixed's own copy only: it fails when run
            def broken(*a, **kw):
                runs.append(1)
                raise RuntimeError("the copy broke")
            made.forward = broken
        return made

    monkeypatch.setattr(folding, "_fold", failing)
    blocked = Blocked(torch.bfloat16)
    ref, _ = _rise_notes(blocked, "bf16-mixed", False)
    out, notes = _rise_notes(blocked, "bf16-mixed", True)
    assert torch.equal(out, ref) and any("the folded copy failed (RuntimeError: the copy broke)" in n for n in notes)
    # a float32 run: told why its own copy is refused (session 46: bf16-mixed's RuntimeError)
    fp32_ref, _ = _rise_notes(blocked, "fp32", False)
    out, notes = _rise_notes(blocked, "fp32", True)
    assert torch.equal(out, fp32_ref)
    assert any("torch.autocast block" in n for n in notes) and not any("copy broke" in n for n in notes), notes
    # bf16-mixed again: its copy's failure kept, the copy not run again
    out, notes = _rise_notes(blocked, "bf16-mixed", True)
    assert torch.equal(out, ref) and any("copy broke" in n for n in notes) and len(runs) == 1, (notes, runs)


def test_two_bf16_block_models_in_turn_keep_their_copies(traces):
    """Each keeps two entries (its float32 copy's refusal, its bf16-mixed copy): with at most two entries kept, two
    such models explained in turn evicted each other's, and every call folded again (two traces, a copy of the
    weights). Reasons no longer count towards the copies kept."""
    a, b = Blocked(torch.bfloat16), Blocked(torch.bfloat16)
    with torch.no_grad():
        b.conv.weight.mul_(-1)
    first = {m: _rise_notes(m, "bf16-mixed", True)[0] for m in (a, b)}
    made = len(traces)
    for _ in range(2):
        for m in (a, b):
            assert torch.equal(_rise_notes(m, "bf16-mixed", True)[0], first[m])
    assert len(traces) == made, (made, len(traces))  # session 46: 4 traces more a call
    for m in (a, b):  # and the maps are the model's under bf16-mixed (the documented bf16 bound)
        unfolded, _ = _rise_notes(m, "bf16-mixed", False)
        assert (first[m] - unfolded).abs().max() <= 0.1 * unfolded.abs().max()


def test_a_folded_copy_goes_with_its_model():
    model = Settable().eval()
    _rise(model, True)
    assert any(e[0]() is model for e in folding._folded.values())
    n = len(folding._folded)
    del model
    import gc

    gc.collect()
    assert len(folding._folded) == n - 1  # session 46: kept (a copy of its weights) until two other folds


# 3. A compiled call (``compile=True``, ``"freeze"``, a backend) took the last memory probe of ANY number of images,
# while the chunks depend on the probe's bytes per item (gradient_chunk_cap compares them with the model's weights:
# 32 items a CPU gradient pass where the weights weigh 16 items' bytes, else 16). A model whose weights lie between
# 16 items' bytes by a 1-image probe and by a 4-image one ran a 4-image call in chunks of 32 in a fresh process and of
# 16 after a 1-image call: other bits for the same call. The probe is now reused for the same number of images only.
# The reference: the chunk sizes and bits of the call in a fresh state; integrated gradients by hand.
from salience._core import engine as _engine  # noqa: E402
from salience._core import perf as _perf  # noqa: E402


class Padded(nn.Module):
    """A small conv net whose parameters weigh ``pad`` float32 values more (unused by the forward)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16 * 16, 3)
        self.pad = nn.Parameter(torch.zeros(max(pad, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.c(x)).flatten(1))


def _per_item(model: nn.Module, n: int) -> int:
    _perf.clear_cache()
    salience.integrated_gradients(model, torch.rand(n, 3, 16, 16), 1, steps=32)
    (rec,) = [r for r in _perf._records.values() if r.probes]
    return rec.probes[n]


def test_a_compiled_call_takes_a_probe_of_its_own_number_of_images(monkeypatch):
    p1, p4 = _per_item(Padded(0), 1), _per_item(Padded(0), 4)
    assert p1 > p4  # a pass's fixed temporaries weigh more per item in a 1-item probe
    base = _engine.weight_bytes(Padded(0)) - 4
    # the weights between CPU_WEIGHTY_ITEMS (8; 16 before session 60) items' bytes of each probe; the small-pass rule
    # (session 60: these items are small, 64 a pass) off, so that the weighty rule alone sets the cap
    monkeypatch.setattr(_engine, "CPU_SMALL_PASS_BYTES", 0)
    model = Padded((_engine.CPU_WEIGHTY_ITEMS * (p1 + p4) // 2 - base) // 4).eval()
    assert (_per_item(model, 1), _per_item(model, 4)) == (p1, p4)  # unused weights: the same probes
    assert _engine.gradient_chunk_cap(p4, _engine.weight_bytes(model)) == 32
    assert _engine.gradient_chunk_cap(p1, _engine.weight_bytes(model)) == 16
    sizes: list[int] = []
    real = _engine.planned_chunk
    monkeypatch.setattr(_engine, "planned_chunk", lambda *a, **kw: sizes.append(real(*a, **kw)) or sizes[-1])
    x4, x1 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.rand(1, 3, 16, 16)

    def call(x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return salience.integrated_gradients(model, x, 1, steps=32, baseline=torch.zeros_like(x), reduce=None,
                                                 compile="eager")

    torch._dynamo.reset()
    _perf.clear_cache()
    fresh = call(x4)
    fresh_sizes = sizes[-1]
    _perf.clear_cache()
    call(x1)  # another history: a 1-image call probes first
    call(x1)
    after = call(x4)
    assert sizes[-1] == fresh_sizes == 32, sizes  # session 46: 16 after the 1-image call
    assert torch.equal(after, fresh)
    # and the map is integrated gradients (trapezoid, 32 steps from zeros) by hand
    ref = []
    for b in range(4):
        a = torch.linspace(0, 1, 32).view(-1, 1, 1, 1)
        xs = (a * x4[b]).requires_grad_(True)
        g = torch.autograd.grad(model(xs)[:, 1].sum(), xs)[0]
        w = torch.full((32, 1, 1, 1), 1 / 31)
        w[0] = w[-1] = 0.5 / 31
        ref.append(x4[b] * (w * g).sum(0))
    torch.testing.assert_close(fresh, torch.stack(ref), rtol=1e-4, atol=1e-5 * float(fresh.abs().max()))


# 2. The compiled path and plain attributes. A compiled graph (``compile=True``, ``"freeze"``) follows a flag of the
# forward by dynamo's own guards (the graph is traced again: a guard, passes on session 46's code too), and a softmax a
# flag turns on is seen by the first compiled output (session 45). A softmax a flag turned OFF was not: the record's
# answer "stripped" was kept for the structure, and every later ``compile`` / ``fold_batchnorm`` call ran eagerly
# (right maps, the option unused). The first eager pass of a call now says the answer anew. The reference: the
# logits' input gradient by hand; the frozen graph's runs and the model's own eager forwards counted.
import copy  # noqa: E402

from salience._core import compiled as _compiled_mod  # noqa: E402
from test_s45_rvchunks import _Flagged, _model as _flagged, _smoothgrad_by_hand  # noqa: E402


@pytest.fixture
def frozen_runs(monkeypatch):
    """A cheap stand-in for inductor's freezing (the graph copied when compiled); counts the frozen graphs' runs."""
    torch._dynamo.reset()
    runs: list = []

    def snapshot(gm, inputs):
        graph = copy.deepcopy(gm)

        def run(*args):
            runs.append(1)
            return graph.forward(*args)
        return run

    monkeypatch.setattr(_compiled_mod, "_freeze_compile", snapshot)
    yield runs
    torch._dynamo.reset()


class _Counted(_Flagged):
    """The flagged model, its eager forwards counted (a list the forward appends to: a folded copy's trace does not;
    a :class:`ForwardLog`, which the model guard leaves as the passes left it)."""

    def __init__(self) -> None:
        super().__init__()
        self.eager: list = ForwardLog()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.eager.append(1)
        return super().forward(x)


def _counted() -> _Counted:
    m = _Counted()
    m.load_state_dict(_flagged().state_dict())
    return m.eval()


@pytest.mark.parametrize("option", ["freeze", "fold"])
@pytest.mark.parametrize("first", [True, False], ids=["turned-off", "turned-on"])
def test_a_softmax_flag_changed_between_compiled_or_folded_calls(frozen_runs, option, first):
    m, x, cls = _counted(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 1
    m.probs = first
    kw = {"compile": "freeze"} if option == "freeze" else {}

    def call() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with salience.performance(fold_batchnorm=option == "fold"):
                return salience.smoothgrad(m, x, cls, samples=8, noise=0.1, seed=[3, 4], reduce=None, **kw)

    call()
    call()
    m.probs = not first
    call()  # its first eager pass sees the softmax gone (or the compiled output shows it)
    del frozen_runs[:], m.eager[:]
    got = call()
    frozen, eager = len(frozen_runs), len(m.eager)
    ref = _smoothgrad_by_hand(m, x, cls, [3, 4], 8, 0.1)  # the logits' gradient (strip_softmax)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    if not first:  # a softmax now: the passes run the model itself, to strip it
        assert eager and not frozen
    elif option == "freeze":
        assert frozen, (frozen, eager)  # session 46: no frozen run, the model eagerly (dynamo replays the append)
    else:
        assert not eager, eager  # the folded copy ran (session 46: the model, eagerly)


# 6. With ``max_memory``, the clean passes of a perturbation method are sized by a one-image probe pass of the model,
# which ran in every call (uncached): it is now kept per model (structure), item shape, dtype and device, as the
# engine's probes are. The reference: the model's forwards counted by batch size; the maps those of the first call.
class Sized(nn.Module):
    """A small conv net that notes each forward's batch size (a list the forward appends to: a :class:`ForwardLog`)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c, self.h, self.batches = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3), ForwardLog()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.h(torch.relu(self.c(x)).mean((2, 3)))


@pytest.mark.parametrize("method", ["rise", "occlusion", "scorecam"])
def test_the_clean_passes_probe_runs_once_per_model_and_shape(method):
    model, x = Sized().eval(), torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def call(xs: torch.Tensor) -> torch.Tensor:
        model.batches.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "rise":
                return salience.rise(model, xs, 1, masks=8, seed=0, max_memory=2**30)
            if method == "occlusion":
                return salience.occlusion(model, xs, 1, window=8, stride=8, max_memory=2**30)
            return salience.scorecam(model, xs, 1, layer="c", max_memory=2**30)

    first = call(x)
    probes = model.batches.count(1)
    assert probes >= 1  # the probe's one-image pass (the chunks' passes are of more items)
    again = call(x)
    assert model.batches.count(1) == probes - 1, model.batches  # session 46: the probe again
    assert torch.equal(again, first)
    call(x[:, :, :8, :8])  # another image shape: probed
    assert model.batches.count(1) == probes, model.batches


# 5. Run.casts_kept entered with the run already channels-last (no caller does so today): set_layout had converted
# every 4-D weight, and inside the block returned at once (the same layout), so the float32 channels-last copies of
# the weights the casts serve stayed beside the casts (what session 46 removed for a contiguous entry). Now the block
# puts them back and sets the layout through the cache. The reference: the user's own tensors; the pass's output
# against torch's own bf16 autocast of the model (no salience).
class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_casts_kept_entered_channels_last_keeps_the_users_weights():
    model, x = Convs().eval().requires_grad_(False), torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x.contiguous(memory_format=torch.channels_last)).float()
    weights = {n: (p, p.data_ptr()) for n, p in model.named_parameters() if p.dim() == 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = _perf.Run(model, x, _perf.resolve(precision="bf16"), tag="s47-cl")
    try:
        run.set_layout(True)  # entered channels-last
        with run.casts_kept():
            for name, (p, ptr) in weights.items():  # session 46: channels-last float32 copies
                assert p.data_ptr() == ptr and p.is_contiguous(), name
            with run.chunk(True, False), run.autocast():
                out = model(run.prepare(x)).float()
            for name, (p, _) in weights.items():
                copy = run._casts.copies[id(p)][2]
                assert copy.dtype == torch.bfloat16 and copy.is_contiguous(memory_format=torch.channels_last), name
        assert not run.channels_last and all(p.data_ptr() == ptr for p, ptr in weights.values())
    finally:
        _perf.close_run(run)
    assert all(p.data_ptr() == ptr and p.is_contiguous() for p, ptr in weights.values())
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * float(ref.abs().max()))  # bf16 rounding
