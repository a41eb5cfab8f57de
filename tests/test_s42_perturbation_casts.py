"""Every gradient-free many-pass method under precision="bf16" casts each weight once per call, not once per pass
(issue 15): perf.Run.casts_kept, entered by the engine for the whole call."""
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import salience


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


CALLS = {
    "scorecam": lambda m, x, **kw: salience.scorecam(m, x, 1, layer=m[0], **kw),  # 8 channels x 2 images
    "ablationcam": lambda m, x, **kw: salience.ablationcam(m, x, 1, layer=m[0], **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 1, masks=16, **kw),  # 16 masks x 2 images
    "occlusion": lambda m, x, **kw: salience.occlusion(m, x, 1, window=6, stride=6, **kw),  # 4 windows x 2
}


def _casts(name: str, model: nn.Module, x: torch.Tensor, **kw) -> tuple[int, torch.Tensor]:
    """The bf16 copies of the second conv's weight (16, 8, 3, 3) made in one call (chunks of 2 items), and the map."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            m = CALLS[name](model, x, chunk=2, precision="bf16", **kw)
    n = sum(e.count for e in p.key_averages(group_by_input_shape=True)
            if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0] == [16, 8, 3, 3])
    return n, m


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name", list(CALLS))
def test_bf16_passes_cast_each_weight_once_per_call(name, fold):
    model, x = _model(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with salience.performance(fold_batchnorm=fold):
        _casts(name, model, x)  # the folded copy made (a copy of each weight), kept for the model
        n, m = _casts(name, model, x)
        # the reference: autocast's cache off (each pass's block inherits it), so every pass casts every weight,
        # as before the fix; the same casts, so the same bits
        with torch.autocast("cpu", enabled=False, cache_enabled=False):
            again, ref = _casts(name, model, x)
    # the passes (at least 4 chunks of 2 items) each cast the weight without the cache; those of the folded copy do
    # not: under bf16 it holds its convolutions' weights in bf16 (session 43), the probe's pass of the model casts
    # (Score-CAM's and RISE's probe runs the folded copy too since session 44: tests/test_s44_mem_passes.py; occlusion's
    # region-limited passes run the run's bf16 folded copy since session 45, not a float32 one cast by the autocast)
    assert again >= (0 if fold and name in ("rise", "scorecam", "occlusion") else 1 if fold and name != "ablationcam"
                     else 4), again
    # the clean pass's cast and the passes' one; occlusion's region-limited passes unfolded: also the clean cut's at the
    # passes' precision (its clean scores ran in float32 until session 45, no cast: forward_scores turned the
    # autocast off)
    assert n <= (3 if name == "occlusion" and not fold else 2), n
    assert torch.equal(m, ref)


@pytest.mark.parametrize("name", list(CALLS))
def test_model_comes_back_after_an_error_in_a_pass(name):
    model, x = _model(), torch.rand(2, 3, 12, 12)
    model[3].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) >= 4:  # inside the passes (every one from there: Ablation-CAM's shared pass that fails falls
            raise RuntimeError("boom")  # back to a pass per item; its capture runs one pass per image since session 44)

    h = model[4].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        _casts(name, model, x)
    h.remove()
    assert [p.requires_grad for p in model.parameters()] == before
    assert not torch.is_autocast_enabled("cpu")
    n, _ = _casts(name, model, x)  # the next call's cache starts empty: its casts only
    assert n <= (3 if name == "occlusion" else 2), n  # occlusion: its clean scores' bf16 pass too (session 45)
    assert [p.requires_grad for p in model.parameters()] == before


def _scenario(model: nn.Module) -> None:
    """A run keeping the casts (perf.Run.casts_kept) around two passes, inside the model's guard."""
    from salience._core import perf
    from salience._core.guard import model_guard

    x = torch.rand(1, 3, 8, 8)
    with model_guard(model):
        run = perf.Run(model, x, perf.resolve(precision="bf16"))
        with run.casts_kept(), torch.no_grad():
            for _ in range(2):
                with run.autocast():
                    model(x)


def test_ctrl_c_at_each_point_of_casts_kept_leaves_the_model_and_autocast_as_they_were():
    """SIGINT (Ctrl-C) at each point where Python may raise it in casts_kept's entry and exit (the k-th time it
    passes there): the model's requires_grad as before, autocast's nesting closed (its cache dropped with it)."""
    import signal
    import sys

    from salience._core import perf
    from test_hygiene import _interruption_points

    model = _model()
    model[3].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    codes = {perf.Run.casts_kept.__wrapped__.__code__}  # session 43: no requires_grad flip, no nesting left
    passed: list = []

    def record(frame, event, arg):
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        points = _interruption_points(frame.f_code)

        def local(frame, event, arg):
            if event in ("opcode", "call") and frame.f_lasti in points:
                passed.append((frame.f_code, frame.f_lasti))
            return local
        return local(frame, event, arg)

    sys.settrace(record)
    try:
        _scenario(model)
    finally:
        sys.settrace(None)
    assert len(passed) > 3
    for i in range(len(passed)):
        seen = [0]

        def inject(frame, event, arg, i=i):
            if frame.f_code not in codes:
                return None
            frame.f_trace_opcodes = True

            def local(frame, event, arg):
                if event in ("opcode", "call") and (frame.f_code, frame.f_lasti) in passed:
                    seen[0] += 1
                    if seen[0] == i + 1:
                        sys.settrace(None)
                        signal.raise_signal(signal.SIGINT)
                return local
            return local(frame, event, arg)

        sys.settrace(inject)
        try:
            with pytest.raises(KeyboardInterrupt):
                _scenario(model)
        finally:
            sys.settrace(None)
        assert [p.requires_grad for p in model.parameters()] == before, passed[i]
        assert torch.autocast_increment_nesting() == 1, passed[i]  # no nesting left open
        torch.autocast_decrement_nesting()
