"""compile="freeze" over the life of a process: graphs per weights change, dynamo's recompile limit,
targets the frozen gradient graph is given (see also test_performance.py's compile="freeze" tests)."""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch

import salience
from salience._core import compiled as _compiled_mod
from salience._core import perf as _perf

from conftest import unchanged
from test_performance import ThreeConv, _rel, _with_statistics


@pytest.fixture
def kept_graphs(monkeypatch):
    """A cheap stand-in for inductor's freezing (the graph's weights copied when compiled, as freezing
    takes them as constants); yields weak references to every graph it compiled."""
    torch._dynamo.reset()
    kept: list = []

    def snapshot(gm, inputs):
        graph = copy.deepcopy(gm)
        kept.append(weakref.ref(graph))
        return lambda *args: graph.forward(*args)

    monkeypatch.setattr(_compiled_mod, "_freeze_compile", snapshot)
    yield kept
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["smoothgrad", "occlusion"])
def test_compile_freeze_follows_many_weight_changes(kept_graphs, method):
    """A model whose weights change between calls (a training loop that explains every epoch): each
    compile="freeze" call compiles a frozen graph for the new weights (the gradient graph for SmoothGrad,
    the forward for occlusion), gives the eager maps without a warning, and the graphs of the old
    weights are freed. Each graph was a new torch.compile of one code object (the `gradient` function,
    the model class's forward) with a new backend: dynamo kept every old graph on that code object (the
    old weights' frozen constants, for the life of the process), and its 9th graph hit dynamo's
    recompile limit (8): from then on every call warned "... failed on this model (FailOnRecompileLimitHit
    ...)" and ran unfrozen (occlusion: not compiled at all). The last, shorter chunk (SmoothGrad's 2 of
    14) runs eagerly: its size recurs, but never in one weights' state (perf.FROZEN_TAILS); before, its
    graph was compiled for every state from the second on and run once (two graphs per state)."""
    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    if method == "smoothgrad":
        def run(**kw):
            return salience.smoothgrad(model, x, [0, 2], samples=7, chunk=6, reduce=None, **kw)
    else:
        def run(**kw):
            return salience.occlusion(model, x, [0, 2], window=3, stride=2, chunk=4, **kw)
    for step in range(11):
        with torch.no_grad():
            model.body[0].weight.mul_(-1.1)
        ref = run()
        with unchanged(model), warnings.catch_warnings():
            warnings.simplefilter("error")
            out = run(compile="freeze")
        assert _rel(out, ref) < 1e-6, (step, _rel(out, ref))
        assert len(kept_graphs) == step + 1, step  # one frozen graph per weights' state
    gc.collect()
    alive = sum(ref() is not None for ref in kept_graphs)
    assert alive == 1, f"{alive} frozen graphs of old weights are kept"


def test_compile_freeze_refuses_a_class_out_of_range_in_a_frozen_chunk(kept_graphs):
    """Per-image classes with one out of range that only a compiled chunk meets (the first, eager chunk
    holds images 0-5 only): the call refuses it with the target's own SalienceError, and
    the frozen gradient graph is not marked as failed. The graph gathered the scores at the bad class
    before the class was checked: the graph's indexing raised (the stand-in's IndexError here; inductor
    emits a bounds check, on a GPU a device-side assert, which breaks the CUDA context), the error was
    taken for a failure of the graph, "compile='freeze':
    the frozen input-gradient graph failed on this model" was warned, and the graph was not used again
    for that model until its weights changed."""
    model, x = _with_statistics(ThreeConv()), torch.rand(8, 3, 8, 8)
    good, bad = [0, 2, 1, 3, 4, 0, 2, 1], [0, 2, 1, 3, 4, 0, 2, 99]  # image 7 first in the 2nd chunk
    ref = salience.smoothgrad(model, x, good, samples=3, chunk=6, reduce=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(salience.SalienceError, match="target class 99 is out of range"):
            salience.smoothgrad(model, x, bad, samples=3, chunk=6, reduce=None, compile="freeze")
        compiled = len(kept_graphs)
        out = salience.smoothgrad(model, x, good, samples=3, chunk=6, reduce=None, compile="freeze")
    assert _rel(out, ref) < 1e-6
    assert compiled == 1 and len(kept_graphs) == 1  # the graph of the first call, not given up


def test_overlapping_frozen_calls_leave_torchs_settings_as_they_were():
    """Inductor's ``freezing`` and dynamo's ``fail_on_recompile_limit_hit`` are process-wide settings that
    salience turns on around each frozen / compiled call. Two threads' calls overlapping (A enters, B
    enters, A leaves, B leaves) must leave them on until the last call leaves and then as the user had
    them. Each call saved and restored the value it found: A's exit turned freezing off under B's running
    call, and B's exit put back the "on" it had found, so freezing stayed on for the process (the user's
    own torch.compile under no_grad froze the weights from then on)."""
    from torch._dynamo import config as dynamo_config
    from torch._inductor import config as inductor_config

    for make, config, name in [(_perf._freezing_on, inductor_config, "freezing"),
                               (_perf._recompile_limit_raises, dynamo_config, "fail_on_recompile_limit_hit")]:
        user = getattr(config, name)
        try:
            a, b = make(), make()
            a.__enter__()
            b.__enter__()
            a.__exit__(None, None, None)
            assert getattr(config, name) is True, name  # B's call still runs
            b.__exit__(None, None, None)
            assert getattr(config, name) == user, name
        finally:
            setattr(config, name, user)


def test_compile_freeze_leaves_a_gradient_pass_under_a_users_mode_to_autograd(kept_graphs):
    """A method that runs vanilla under a backprop rule of its own (``with rules.guided(): vanilla(...)``,
    a TorchFunctionMode) inside SmoothGrad with compile="freeze": the frozen gradient graph (plain
    gradients) is not tried; the maps are the eager guided maps, without a warning, and a plain
    SmoothGrad call afterwards still gets the frozen gradient graph. The graph was tried under the mode,
    dynamo refused it, "the frozen input-gradient graph failed on this model" was warned and the graph
    given up for the model until its weights changed."""
    from salience import rules

    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)

    def guided_vanilla(model, x, target, **kw):
        with rules.guided():
            return salience.vanilla(model, x, target, **kw)

    kw = dict(samples=7, chunk=6, reduce=None)
    ref = salience.smoothgrad(model, x, [0, 2], method=guided_vanilla, **kw)
    plain = salience.smoothgrad(model, x, [0, 2], **kw)
    assert _rel(ref, plain) > 0.1  # the rule matters here
    with unchanged(model), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # (dynamo, tracing the rule in the plain compiled model, warns)
        out = salience.smoothgrad(model, x, [0, 2], method=guided_vanilla, compile="freeze", **kw)
        assert _rel(out, ref) < 1e-6
        assert len(kept_graphs) == 0
        out = salience.smoothgrad(model, x, [0, 2], compile="freeze", **kw)
    assert not [w for w in seen if "compile='freeze'" in str(w.message)], [str(w.message) for w in seen]
    assert _rel(out, plain) < 1e-6 and len(kept_graphs) == 1


def test_compile_freeze_gradient_follows_the_models_output_pick(kept_graphs):
    """A model whose scores are a part of its output tensor (``select_output(model, lambda o: o[:, 1:])``:
    a background column dropped): the class targets index the picked scores. compile="freeze"'s maps
    are the eager maps (autograd of the picked scores). The frozen gradient graph gathered the raw
    output at the class (the column before it): the gradient of another class, silently, 0.85 of the
    largest value off."""
    from salience.loading.custom import select_output

    model, x = _with_statistics(ThreeConv()), torch.rand(2, 3, 8, 8)
    select_output(model, lambda out: out[:, 1:])
    kw = dict(samples=7, chunk=6, reduce=None)
    ref = salience.smoothgrad(model, x, [0, 2], **kw)
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = salience.smoothgrad(model, x, [0, 2], compile="freeze", **kw)
    assert _rel(out, ref) < 1e-6, _rel(out, ref)
