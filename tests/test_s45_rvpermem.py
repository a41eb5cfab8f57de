"""Session 45's review of the perturbation-memory merge (f791696).

* Occlusion under ``precision="bf16"`` with ``fold_batchnorm``: the passes (region-limited and full) run the bf16
  folded copy, the clean scores S ran the model itself (unfolded) under the autocast: S - S_k was a bf16 rounding, not
  0, for a window over pixels the model ignores (a quarter of the map's max on the model below). S now comes from the
  function the passes run: the plan's prefix and suffix (region-limited), the folded copy (full passes).
* ``_occlusion_local.moved``'s fallback (the cut is no node of the folded graph): the float32 fold's split.
"""
import warnings

import pytest
import torch
from torch import nn

import salience
from salience.methods import _occlusion_local as local


class LeftColumns(nn.Module):
    """Two convolutions with BatchNorm (3x3, field 5 px), then only the left 8 columns of 32 are read: a window at
    column 16 or more changes no score, so its drop is exactly 0 in any precision where S and S_k are one function."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        for m in self.f.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(x)[..., :8].mean((2, 3)))


def _x(b: int = 4) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("local_", [True, False])
@pytest.mark.parametrize("layout", [None, "channels_last"])
@pytest.mark.parametrize("chunk", [None, 1, 5, 100])
def test_occlusion_bf16_fold_ignored_pixels_drop_exactly_zero(local_, layout, chunk):
    model = LeftColumns().eval()
    x = _x()
    with warnings.catch_warnings(), salience.performance(precision="bf16", fold_batchnorm=True, memory_format=layout):
        warnings.simplefilter("ignore")
        m = salience.occlusion(model, x, 1, window=4, stride=4, local=local_, chunk=chunk)
    assert float(m[..., :8].abs().max()) > 0  # the read columns do drop
    assert float(m[..., 16:].abs().max()) == 0.0, float(m[..., 16:].abs().max())


@pytest.mark.parametrize("fold", [False, True])
def test_occlusion_bf16_close_to_fp32_on_the_read_columns(fold):
    """The bf16 map is the float32 one up to bf16 rounding of the scores (2^-8 of a score: the drops here are a few
    percent of the score, so a tenth of the map's max), and 0 where float32 says 0. Over the columns the model never
    reads, float32's map is exactly 0 where the model's float32 score of an image does not depend on the batch it runs
    in, and within that dependence where it does (oneDNN's AVX-512 convolutions pick kernels by batch size: the same
    image's score differs by 2^-26 between a batch of 1 and of 4 on a Xeon with AMX; the occluded copies run in
    chunks of another size than the clean pass)."""
    model = LeftColumns().eval()
    x = _x()
    ref = salience.occlusion(model, x, 1, window=4, stride=4)
    with warnings.catch_warnings(), salience.performance(precision="bf16", fold_batchnorm=fold):
        warnings.simplefilter("ignore")
        got = salience.occlusion(model, x, 1, window=4, stride=4)
    assert float(ref[..., 16:].abs().max()) <= _batch_spread(model, x)
    assert float((got - ref).abs().max()) <= 0.35 * float(ref.abs().max())
    assert float(got[..., 16:].abs().max()) == 0.0


def _batch_spread(model: nn.Module, x: torch.Tensor) -> float:
    """Twice the most the model's float32 score of target 1 for an image moves with the batch it runs in (alone, in
    ``x``, in 2, 4 and 16 copies of ``x``, in 2, 8 and 64 copies of itself: sizes of occlusion's passes here): a clean
    and an occluded score may each move, either way. 0.0 on a CPU whose kernels do not depend on the batch size."""
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])[:, 1]
        moved = [(model(x.repeat(n, 1, 1, 1))[:len(x), 1] - alone).abs().max() for n in (1, 2, 4, 16)]
        moved += [(model(x[i:i + 1].repeat(k, 1, 1, 1))[:, 1] - alone[i]).abs().max()
                  for i in range(len(x)) for k in (2, 8, 64)]
    return 2.0 * float(max(moved))


def test_moved_fallback_runs_the_float32_folds_split(monkeypatch):
    """A cut that is no node of the bf16 folded graph (``moved`` gives None): the split is found again on the float32
    folded copy, and the map is the full passes' of the same run up to bf16 rounding."""
    calls: list = []
    real = local.moved

    def refused(p, gm, strip_softmax):
        calls.append(p.cut)
        assert real(p, gm, strip_softmax) is not None  # the real one moves this cut (a renamed node would not)
        return None

    monkeypatch.setattr(local, "moved", refused)
    model = LeftColumns().eval()
    x = _x(2)
    maps = {}
    for loc in (True, False):
        with warnings.catch_warnings(), salience.performance(precision="bf16", fold_batchnorm=True):
            warnings.simplefilter("ignore")
            maps[loc] = salience.occlusion(model, x, 1, window=4, stride=4, local=loc)
    assert calls, "the bf16 + fold split was not moved"
    scale = float(maps[False].abs().max())
    assert scale > 0 and float((maps[True] - maps[False]).abs().max()) <= 0.05 * scale


def test_moved_gives_none_for_a_cut_absent_from_the_folded_graph():
    """``moved`` by node name: a name the folded graph lacks (a BatchNorm folded away) is None, not a wrong cut."""
    from salience._core import folding
    from salience.methods.perturbation import occlusion_windows, unwrap_output

    model = LeftColumns().eval()
    x = _x(2)
    corners, _ = occlusion_windows((32, 32), (4, 4), (4, 4))
    with torch.no_grad():
        out = model(x)
    plan = local.plan(model, x, (4, 4), (4, 4), corners, True, out, lambda o: unwrap_output(o, model), torch.bfloat16)
    assert not plan.why, plan.why
    low = folding.folded_model(model, dtype=torch.bfloat16)[0]
    assert low is not None
    assert local.moved(plan, low, True) is not None
    from dataclasses import replace
    assert local.moved(replace(plan, cut="no_such_node"), low, True) is None


from test_s45_permem import SeqFirst  # noqa: E402  (a token-first (N, B, D) layer "mix")


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "gradcam"])
@pytest.mark.parametrize("b", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sequence_first_layer_is_a_salience_error_not_an_index_error(method, b, precision):
    """A sequence-first layer (N, B, D) with N != B: a raw IndexError / einsum RuntimeError (or, B = 3, a message
    about 3 tokens, the images read as tokens) before; a SalienceError naming batch_first now."""
    torch.manual_seed(0)
    model, x = SeqFirst().eval(), torch.rand(b, 3, 8, 8)
    kw = {} if method == "gradcam" else {"precision": precision}
    if method == "gradcam" and precision == "bf16":
        pytest.skip("one precision is enough for Grad-CAM's layout")
    with warnings.catch_warnings(), pytest.raises(salience.SalienceError, match="batch_first"):
        warnings.simplefilter("ignore")
        getattr(salience, method)(model, x, 1, layer="mix", **kw)


def _strides(model: nn.Module) -> list:
    return [(p.data_ptr(), p.stride(), p.dtype) for p in model.parameters()] + [b.stride() for b in model.buffers()]


@pytest.mark.parametrize("method", ["occlusion", "rise", "scorecam", "ablationcam"])
def test_model_layout_unchanged_after_a_call_and_after_an_error(method):
    """bf16 + channels-last + fold: the model's parameters keep their storage and strides (the run converts the folded
    copy only), also when a pass raises mid-call (a target that fails from its third call on)."""
    model = LeftColumns().eval()
    x = _x(2)
    before = _strides(model)
    kw = {"occlusion": dict(window=8, stride=8), "rise": dict(masks=4), "scorecam": dict(layer="f.3"),
          "ablationcam": dict(layer="f.3")}[method]
    perf = dict(precision="bf16", memory_format="channels_last", fold_batchnorm=True)
    with warnings.catch_warnings(), salience.performance(**perf):
        warnings.simplefilter("ignore")
        getattr(salience, method)(model, x, 1, chunk=2, **kw)
        assert _strides(model) == before
        calls = [0]

        def target(out):
            calls[0] += 1
            if calls[0] > 2:
                raise RuntimeError("boom")
            return out[:, 1]

        with pytest.raises(Exception, match="boom"):
            getattr(salience, method)(model, x, target, chunk=2, **kw)
    assert _strides(model) == before
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["occlusion", "rise", "scorecam", "ablationcam"])
def test_fp32_maps_equal_across_chunk_values(method):
    """chunk bounds the clean passes too: chunk=1, 3 and more than B give the map of the default chunks (fp32, up to
    float rounding of a kernel's choice per batch size)."""
    model = LeftColumns().eval()
    x = _x(3)
    kw = {"occlusion": dict(window=8, stride=8), "rise": dict(masks=4), "scorecam": dict(layer="f.3"),
          "ablationcam": dict(layer="f.3")}[method]
    ref = getattr(salience, method)(model, x, 1, **kw)
    for chunk in (1, 3, 100):
        got = getattr(salience, method)(model, x, 1, chunk=chunk, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method,kw", [("occlusion", dict(window=8, stride=8, local=False)),
                                       ("occlusion", dict(window=8, stride=8)),
                                       ("scorecam", dict(layer="f.3")),
                                       ("rise", dict(masks=4))])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_pass_over_chunk_images(method, kw, precision):
    """``chunk`` bounds every pass of whole images, the clean ones included (the clean scores' bf16 pass ran all B at
    once on f791696: occlusion's full passes). Not Ablation-CAM: its clean scores' bf16 pass still takes all B (in parts
    it cast each weight once a part, tests/test_s42_perturbation_casts.py)."""
    model = LeftColumns().eval()
    x = _x(4)
    sizes: list = []
    h = model.f[0].register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(salience, method)(model, x, 1, chunk=2, precision=precision, **kw)
    finally:
        h.remove()
    assert sizes and max(sizes) <= 2, sizes


def test_occlusion_bf16_fold_refused_runs_the_model_split(monkeypatch):
    """A model whose fold is refused (``folded_model`` gives ``(None, why)``): the split stays on the model's own
    trace, the run warns and runs the model; the map is the full passes' (bf16, the same unfolded function: ignored
    pixels drop exactly 0)."""
    from salience._core import perf as _perf

    monkeypatch.setattr(_perf, "folded_model", lambda model, key=None, dtype=None, passes=None: (None, "refused for the test"))
    model = LeftColumns().eval()
    x = _x(2)
    maps = {}
    for loc in (True, False):
        with warnings.catch_warnings(record=True) as w, salience.performance(precision="bf16", fold_batchnorm=True):
            warnings.simplefilter("always")
            maps[loc] = salience.occlusion(model, x, 1, window=4, stride=4, local=loc)
        assert any("refused for the test" in str(m.message) for m in w)
    assert float(maps[True][..., 16:].abs().max()) == 0.0 == float(maps[False][..., 16:].abs().max())
    scale = float(maps[False].abs().max())
    assert scale > 0 and float((maps[True] - maps[False]).abs().max()) <= 0.05 * scale
