"""Session 46's loose ends of session 45, each checked against a reference.

1. ``torch.einsum`` over a weight under a CPU bf16 precision: einsum is not on autocast's list; it runs as views and
   ``bmm`` (autocast casts a view of the weight every pass: never cached) or, with nothing contracted or a label
   summed out of one operand, as ``mul`` / ``sum`` in fp32. :class:`salience._core.casts.WeightCasts` now serves the
   weight's bf16 copy where einsum only views and casts it (seen on its first run), so each weight is cast once per
   call. The reference: the same call with autocast's cache off (every pass casts), bit for bit; the bf16 copies
   counted by the profiler; an einsum that multiplies without contracting keeps its fp32 bits.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from test_s43_casts import CALLS, _casts, _uncached

X = torch.rand(2, 1, 5, 4, generator=torch.Generator().manual_seed(1))


class Einsum(nn.Module):
    """A token model whose weight ``w`` (4 x 24) meets the tokens by ``torch.einsum(equation, x, w)``."""

    def __init__(self, equation: str, shape=(4, 24), spelling: str = "args") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w, self.equation, self.spelling = nn.Parameter(torch.randn(*shape) * 0.3), equation, spelling
        self.head = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x[:, 0]
        if self.spelling == "list":
            y = torch.einsum(self.equation, [t, self.w])
        elif self.spelling == "sublist":
            y = torch.einsum(t, [0, 1, 2], self.w, [2, 3], [0, 1, 3])
        else:
            y = torch.einsum(self.equation, t, self.w)
        return self.head(y.relu().flatten(1))


def _ig(model: nn.Module, shapes: list[list[int]]) -> tuple[int, torch.Tensor, int, torch.Tensor]:
    """IG of 8 steps (chunks of 2), its bf16 casts of the weight (profiler copies of any of ``shapes``), and the
    same for the uncached passes."""
    model(X[:1, 0:1].expand(1, 1, 5, 4))  # the lazy head's shape
    CALLS["ig_s46"] = lambda m, x, **kw: salience.integrated_gradients(m, x, 1, steps=8, **kw)
    try:
        n = [_casts("ig_s46", model, X, shape=s) for s in shapes]
        u = [_uncached("ig_s46", model, X, shape=s) for s in shapes]
        return sum(c for c, _ in n), n[0][1], sum(c for c, _ in u), u[0][1]
    finally:
        del CALLS["ig_s46"]


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("spelling", ["args", "list", "sublist"])
def test_a_weight_contracted_by_einsum_is_cast_once_per_call(spelling):
    n, m, again, ref = _ig(Einsum("bti,ij->btj", spelling=spelling).eval(), [[4, 24], [1, 4, 24]])
    assert again >= 4, again  # every pass casts a view of the weight (main: so with the cache on too)
    assert n == 1, n
    assert torch.equal(m, ref)


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("equation,shape", [("bti,i->bti", (4,)), ("bti,ij->bt", (4, 24))],
                         ids=["mul", "summed-out"])
def test_an_einsum_that_does_arithmetic_on_the_weight_keeps_its_bits(equation, shape):
    """No contraction (einsum multiplies in fp32) or a label only the weight has, summed in fp32 first: a bf16 copy
    would round the weight where autocast does not; the map stays the bits of the uncached passes."""
    model = Einsum(equation, shape).eval()
    n, m, again, ref = _ig(model, [list(shape)])
    assert torch.equal(m, ref)


# 2. A keys-first softmax (over dim 1 of (B, S, heads, L)) taken in float64 and cast back to the values' dtype before
# its product (``.to(dtype)``, ``.type_as(v)``, ``.float()``): the cast is a copy on its way to the product, followed
# as ``.contiguous()`` is (session 45 and before: no attention seen). The reference: the model's own attention
# matrices (B, heads, L, S), recorded by the model.
import test_s45_loose as s45  # noqa: E402

CASTS = ("to", "type_as", "float", "to permuted")


class CastBlock(s45.Block):
    def _keys_first(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        f = torch.einsum("bhld,bhsd->bshl", q, k).softmax(dim=1, dtype=torch.float64)  # (B, S, heads, L)
        if self.spelling == "to":
            a = f.to(v.dtype).permute(0, 2, 3, 1)
        elif self.spelling == "type_as":
            a = f.permute(0, 2, 3, 1).type_as(v)
        elif self.spelling == "float":
            a = f.float().permute(0, 2, 3, 1)
        else:
            a = f.permute(0, 2, 3, 1).to(dtype=v.dtype)
        if self.record:
            self.seen.append(a.detach().clone())
        return a @ v


def _cast_vit(spelling: str) -> nn.Module:
    model = s45.TinyViT("keys-first", "@").eval()
    for blk in model.blocks:
        blk.__class__, blk.spelling = CastBlock, spelling
    return model


@pytest.mark.parametrize("spelling", CASTS)
def test_a_keys_first_softmax_cast_before_its_product_is_captured(spelling):
    from salience.attention import attention_maps
    from conftest import unchanged

    own = _cast_vit(spelling)
    for blk in own.blocks:
        blk.record = True
    with torch.no_grad():
        own(s45.X)
    want = [a for blk in own.blocks for a in blk.seen]
    model = _cast_vit(spelling)
    with unchanged(model):
        got = attention_maps(model, s45.X)
    assert len(got) == 2, len(got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spelling", CASTS)
def test_the_default_layer_search_sees_a_cast_keys_first_softmax(spelling):
    from salience.methods.gradcam import default_layer

    assert default_layer(_cast_vit(spelling), s45.X) == default_layer(s45.TinyViT("keys-first", "@").eval(), s45.X)


def test_a_factorized_attention_whose_keys_are_cast_is_recognized():
    """CoaT's ``q @ (softmax(k)^T v)`` with the keys softmaxed in float64 and cast back (``.to(v.dtype)``): the same
    factorized attention as the ``@`` spelling."""
    from salience.methods.gradcam import default_layer
    from test_default_layers import _CoaTLike, _Factorized

    class CastFactorized(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            keys = k.softmax(dim=2, dtype=torch.float64).to(v.dtype).transpose(-1, -2)
            return self.proj((q @ (keys @ v)).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    model = _CoaTLike(CastFactorized).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), _CoaTLike(_Factorized).eval()(x))  # one model, the keys' softmax rounded otherwise
    assert default_layer(model, x) == "blocks.1.norm1"  # the @ spelling's (tests/test_default_layers.py)


# 3. A cached folded copy (``fold_batchnorm=True``) traced before a flag of the forward changed: torch.fx bakes the
# flag's branch into the copy, whose key (the structure and the weights' state) did not see a plain attribute, so with
# ``strip_softmax=False`` (nothing looks at the copy's output) the map stayed the old branch's. The copy is now kept
# for the modules' plain attributes too. The reference: the input gradient of the model's output by hand.
from test_s45_rvchunks import _model as _flagged  # noqa: E402


def _grad(m: nn.Module, xb: torch.Tensor, cls: int) -> torch.Tensor:
    xg = xb.unsqueeze(0).clone().requires_grad_(True)
    return torch.autograd.grad(m(xg)[0, cls], xg)[0][0]


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("first", [False, True], ids=["turned-on", "turned-off"])
@pytest.mark.parametrize("method", ["vanilla", "integrated_gradients"])
def test_a_folded_copy_follows_a_flag_of_the_forward_with_strip_softmax_off(method, first):
    m, x, cls = _flagged(), torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), 1
    m.probs = first

    def call() -> torch.Tensor:
        if method == "vanilla":
            return salience.vanilla(m, x, cls, reduce=None, strip_softmax=False)
        return salience.integrated_gradients(m, x, cls, steps=4, baseline=torch.zeros_like(x), reduce=None,
                                             strip_softmax=False)

    with salience.performance(fold_batchnorm=True):
        call()
        call()  # warm: the folded copy made with the flag as it was
        m.probs = not first
        got = call()
    if method == "vanilla":
        ref = torch.stack([_grad(m, x[b], cls) for b in range(2)])
    else:  # trapezoid IG from zeros, 4 steps
        ref = torch.stack([x[b] * sum((0.5 if i in (0, 3) else 1.0) / 3 * _grad(m, x[b] * (i / 3), cls)
                                      for i in range(4)) for b in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


# 4. precision="bf16-mixed" (a float32 folded copy, its passes under the bf16 autocast only, the islands turning it
# off themselves) and an autocast block of the forward at bf16: the block changes nothing under those passes, yet the
# copy was refused (the float32 copy is shared with float32 runs, where the block is the model's math). Now a float32
# copy of its own is traced for those passes. The reference: the same model without the block, folded, bit for bit;
# a float32 run of the blocked model is still refused and gives the model's own map.
from test_s45_loose import Blocked, _rise_notes  # noqa: E402


@pytest.mark.usefixtures("fresh_perf_state")
def test_bf16_mixed_folds_a_model_with_a_bf16_block():
    blocked, plain = Blocked(torch.bfloat16), Blocked(None)
    folded, notes = _rise_notes(blocked, "bf16-mixed", True)
    assert notes == []  # was: "fold_batchnorm: its forward runs 'conv' in a torch.autocast block ..."
    assert torch.equal(folded, _rise_notes(plain, "bf16-mixed", True)[0])
    from salience._core import folding

    assert isinstance(folding._folded[(id(blocked), None, torch.bfloat16)][2], nn.Module)  # its own copy ran
    unfolded, _ = _rise_notes(blocked, "bf16-mixed", False)
    assert (folded - unfolded).abs().max() <= 0.1 * unfolded.abs().max()  # the documented bf16 bound
    # the float32 run of the same model after it: the block is its math, the shared float32 copy still refused
    ref, _ = _rise_notes(blocked, "fp32", False)
    out, notes = _rise_notes(blocked, "fp32", True)
    assert torch.equal(out, ref)
    assert any("torch.autocast block" in n and "running the model as it is" in n for n in notes), notes
    # and bf16-mixed again takes its own copy (kept), a float16 block is still refused under it
    assert torch.equal(_rise_notes(blocked, "bf16-mixed", True)[0], folded)
    ref16, _ = _rise_notes(Blocked(torch.float16), "bf16-mixed", False)
    out16, notes = _rise_notes(Blocked(torch.float16), "bf16-mixed", True)
    assert torch.equal(out16, ref16) and any("torch.autocast block" in n for n in notes), notes


# 5. Occlusion's region-limited passes traced the model twice per call (torch.fx, under and without the autocast),
# uncached: the trace and what the plan reads of it are now kept per model (structure, weights' state, plain
# attributes), passes' dtype and image shape. The reference: the traces counted; the maps Captum's Occlusion's.
import gc  # noqa: E402
import threading  # noqa: E402

from test_s44_occlusion_local import captum_map, close, scale, vgg_like  # noqa: E402


@pytest.fixture
def traces(monkeypatch):
    """The torch.fx traces made, counted (every trace of salience goes through this tracer class)."""
    from salience._core import folding

    seen = []
    real = folding._AutocastSeeingTracer.trace

    def counted(self, *a, **kw):
        seen.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(folding._AutocastSeeingTracer, "trace", counted)
    return seen


def _occlusion(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return salience.occlusion(m, x, 2, window=6, stride=4, reduce=None)


@pytest.mark.usefixtures("fresh_perf_state")
def test_occlusion_traces_a_model_once_per_structure_and_image_shape(traces):
    m, x = vgg_like(), torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    first = _occlusion(m, x)
    assert len(traces) == 2  # fx_traced: as it is and under the autocast
    again = _occlusion(m, x * 0.5)
    assert len(traces) == 2, len(traces)  # was 4: traced again every call
    close(first, captum_map(m, x, 2, 6, 4), scale(m, x))
    close(again, captum_map(m, x * 0.5, 2, 6, 4), scale(m, x * 0.5))
    _occlusion(m, torch.randn(1, 3, 48, 48))
    assert len(traces) == 4  # another image shape: its own trace (the shapes on its nodes)
    torch.manual_seed(5)
    m[0] = nn.Conv2d(3, 8, 3, padding=1)  # a module replaced: traced again, the new weights' map
    assert len(traces) == 4
    close(_occlusion(m, x), captum_map(m, x, 2, 6, 4), scale(m, x))
    assert len(traces) == 6


@pytest.mark.usefixtures("fresh_perf_state")
def test_the_kept_trace_serves_threads_and_goes_with_its_model():
    from salience.methods import _occlusion_local

    held = [vgg_like()]  # the model, dropped at the end
    xs = [torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in (40, 48, 40, 48)]
    _occlusion(held[0], xs[0])
    got: dict = {}

    def work(i: int) -> None:
        try:
            got[i] = _occlusion(held[0], xs[i])
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            got[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        assert isinstance(got[i], torch.Tensor), repr(got[i])
        close(got[i], captum_map(held[0], x, 2, 6, 4), scale(held[0], x))
    assert len(_occlusion_local._TRACES._entries) == 2
    del held[0], threads, t, work
    gc.collect()
    assert len(_occlusion_local._TRACES._entries) == 0  # the traces held the model's modules


# 6. A Ctrl-C while the forkserver of a dataset run's workers starts (it imports __main__, torch and salience:
# seconds) printed the server's KeyboardInterrupt traceback; the server now starts with SIGINT ignored (its workers
# too: the run's process stops them), and the run's process still gets the Ctrl-C.
CTRL_C = """
import os, signal, sys, time
import salience.runs.dataset as d
from multiprocessing import forkserver
d._SERVER_ASKED = 1  # a second large-heap run of the process: it starts the server
assert d._forkserver_ready()
time.sleep(0.3)  # the server imports its modules
try:
    os.killpg(0, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted", flush=True)
time.sleep(3)  # the server's imports end
os.kill(forkserver._forkserver._forkserver_pid, 0)  # still running
print("server alive", flush=True)
"""


def test_a_ctrl_c_while_the_forkserver_starts_prints_no_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    src = str(Path(salience.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path, start_new_session=True)  # its own process group: the Ctrl-C stays there
    assert done.stdout.split("\n")[:2] == ["interrupted", "server alive"], (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr


class _Paused(nn.Module):
    """A convolution whose forward (traced too: fx runs it) calls ``pause()`` first."""

    def __init__(self, pause) -> None:
        super().__init__()
        self.conv, self.pause = nn.Conv2d(3, 4, 3), pause

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pause()
        return self.conv(x)


def test_two_threads_tracing_at_once_leave_torch_as_it_was():
    """Thread A's trace begins and waits; B's begins (finding A's patch of ``nn.Module.__call__``), then A's ends
    (putting torch's back) before B's (putting back what it found: A's patch, for good, so a later thread with A's id
    got proxies from its model). One trace at a time now: B waits for A (A's wait times out), torch as it was."""
    from salience._core.folding import fx_traced

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def pause_a() -> None:
        a_in.set()
        b_in.wait(3)

    def pause_b() -> None:
        b_in.set()
        a_out.wait(3)

    def trace_a() -> None:
        fx_traced(_Paused(pause_a), None)
        a_out.set()

    ta = threading.Thread(target=trace_a)
    ta.start()
    a_in.wait(3)
    tb = threading.Thread(target=fx_traced, args=(_Paused(pause_b), None))
    tb.start()
    ta.join()
    tb.join()
    try:
        assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_
