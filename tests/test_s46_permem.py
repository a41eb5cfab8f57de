"""Session 46, issue 15's "at no more memory than a plain loop" (Score-CAM, Ablation-CAM, RISE).

Live tensors at a call's peak are measured with :class:`salience._core.engine.MemoryProbe` (every storage an operator
makes, until it is freed: deterministic), the salience call's against the same passes written as a plain loop, on
models without buffers (the guard's copies of a model's buffers, BatchNorm's running statistics, are the one thing a
loop does not hold: 0.2 MiB on resnet50).

* RISE summed in float64 (the engine's sums: twice a float32 map) and gathered each item's mask ``(n, H, W)``: float32
  sums mask by mask now, each mask multiplied on its rows.
* Score-CAM held the chunk's masks ``(n, 1, H, W)`` through the pass: one item's mask at a time now.
* The CAMs' clean capture copied the layer's output (alive through the rest of the pass) even where nothing changed it
  in place: the copy only where the version counter moved now (the pass runs again with the copy).
* Ablation-CAM under bf16 + channels-last held float32 channels-last copies of the model's 4-D weights beside the
  user's: the call's bf16 casts are made channels-last now, the weights left as they are.
* ``max_memory`` did not bound the clean passes (all ``B`` images, or half under an autocast): it does now.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience._core import engine
from salience.methods.perturbation import rise_masks
from salience.methods.scorecam import _capture

B, S = 8, 48


def _net(c: int = 4, d: int = 32) -> nn.Module:
    """Two convolutions (``c``, then ``d`` channels at the input's size), no buffers (nothing for the guard to copy):
    the masks, sums and copies at stake are a few percent of a pass, far above the small tensors, and the passes'
    activations the call's peak (Score-CAM's work on the ``c`` channels before its passes is smaller)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, d, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(d, 5)).eval()


def _x(b: int = B, s: int = S) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _peak(fn) -> tuple[int, object]:
    probe = engine.MemoryProbe()
    with warnings.catch_warnings(), probe:
        warnings.simplefilter("ignore")
        out = fn()
    return probe.peak, out


def _state(model: nn.Module) -> list:
    return [(n, p.data_ptr(), p.stride(), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()]


def _same_model(model: nn.Module, before: list) -> None:
    after = _state(model)
    assert [a[:4] for a in after] == [b[:4] for b in before]
    assert all(torch.equal(a[4], b[4]) for a, b in zip(after, before))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training


SMALL = 8 << 10  # the calls' small tensors (indices, per-item scores, the clean output): a few hundred bytes here


def test_rise_live_tensors_at_most_the_loops():
    model, x = _net(), _x()
    target = torch.arange(B) % 5
    before = _state(model)
    ours_peak, ours = _peak(lambda: salience.rise(model, x, target, masks=3, chunk=B))
    _same_model(model, before)

    def loop():  # the same passes (one mask on the 8 images a pass), a float32 map
        sal = torch.zeros(B, S, S)
        rows = torch.arange(B)
        with torch.no_grad():
            for i in range(3):
                m = rise_masks(i, i + 1, (S, S))[0]
                sal += model(x * m).softmax(1)[rows, target].view(-1, 1, 1) * m
        return sal / (3 * 0.5)

    loop_peak, ref = _peak(loop)
    # before: float64 sums (B, 1, S, S) and the gathered masks (B, S, S) beside the loop's float32 map: +B*S*S*8 bytes
    assert ours_peak <= loop_peak + SMALL, (ours_peak, loop_peak)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # the paper's sum, as the loop writes it


def test_rise_float32_sums_do_not_depend_on_the_chunking():
    """Summed mask by mask in mask order: the same map whatever the chunks, up to the scores' own rounding (a
    kernel's choice per batch size), as the float64 reference of the paper's sum."""
    model, x = _net(), _x(3, 24)
    maps = [salience.rise(model, x, 1, masks=7, chunk=c) for c in (1, 2, 3, 5, 21)]
    m = rise_masks(0, 7, (24, 24)).double()
    with torch.no_grad():
        s = torch.stack([model(x * m[i].float()).softmax(1)[:, 1] for i in range(7)]).double()  # (7, 3)
    ref = torch.einsum("nb,nhw->bhw", s, m) / (7 * 0.5)
    for got in maps:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def test_scorecam_holds_one_mask_not_the_chunks():
    model, x = _net(), _x()
    target = torch.arange(B) % 5
    layer = model[0]  # a convolution: no channel constant on an image, all live, none sharing a mask
    before = _state(model)
    ours_peak, ours = _peak(lambda: salience.scorecam(model, x, target, layer=layer, chunk=B, softmax="none"))
    _same_model(model, before)

    def loop():  # pytorch-grad-cam's loop: channel k on the 8 images a pass
        store: list = []
        h = layer.register_forward_hook(lambda m, i, o: store.append(o))
        with torch.no_grad():
            model(x)
            h.remove()
            acts = store.pop()
            rows, w = torch.arange(B), []
            for k in range(acts.shape[1]):
                m = F.interpolate(acts[:, k:k + 1], size=(S, S), mode="bilinear", align_corners=False)
                lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
                m = (m - lo) / (hi - lo)
                w.append(model(x * m)[rows, target])
        return torch.einsum("kb,bkhw->bhw", torch.stack(w), acts).clamp(min=0)

    loop_peak, ref = _peak(loop)
    masks = B * S * S * 4  # a chunk's masks (B, 1, S, S): held through every pass before, one item's now
    assert ours_peak <= loop_peak - masks // 2, (ours_peak, loop_peak, masks)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)  # the layer at the input's size: no upsampling


def test_capture_keeps_the_layers_output_without_a_copy():
    model, x = _net(), _x()
    peak, (acts, out) = _peak(lambda: _capture(model, x, model[0], True))

    def loop():
        store: list = []
        h = model[0].register_forward_hook(lambda m, i, o: store.append(o))
        with torch.no_grad():
            y = model(x)
        h.remove()
        return store[0], y

    loop_peak, (ref, y) = _peak(loop)
    # before: a copy of the layer's output (B, 16, S, S) alive through the rest of the pass
    assert peak <= loop_peak + SMALL, (peak, loop_peak)
    assert torch.equal(acts, ref) and torch.equal(out, y)


class InPlaceAfter(nn.Module):
    """The layer's output changed in place after it returned (``relu_``): the capture must give the layer's values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a.relu_()
        return self.head(a.mean((2, 3)))


@pytest.mark.parametrize("batch", [None, 2])
def test_capture_of_an_output_changed_in_place_is_the_layers(batch):
    model, x = InPlaceAfter().eval(), _x(4, 12)
    seen: list = []
    h = model.conv.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    acts, out = _capture(model, x, model.conv, True, batch)
    h.remove()
    # the first part's pass again with the copy, the next parts with it at once
    assert seen == ([4, 4] if batch is None else [2, 2, 2]), seen
    with torch.no_grad():
        ref = model.conv(x)
        y = model(x)
    assert bool((ref < 0).any())  # the in-place ReLU would have changed them
    torch.testing.assert_close(acts, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-6)
    with torch.inference_mode():  # no version counter: the copy at once
        acts_inf, _ = _capture(model, x, model.conv, True, batch)
    torch.testing.assert_close(acts_inf, ref, rtol=0, atol=1e-6)


def _wide() -> nn.Module:
    """3x3 convolutions of 96 channels: their float32 weights (1 MB) dwarf 2 images' activations at 8 px."""
    torch.manual_seed(0)
    layers: list = [nn.Conv2d(3, 96, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(96, 96, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 5)).eval()


def test_ablationcam_bf16_channels_last_holds_no_float32_weight_copies():
    model, x = _wide(), _x(2, 8)
    w = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 4)
    before = _state(model)
    opts = dict(layer=model[6], precision="bf16", memory_format="channels_last", chunk=4)
    peak, ours = _peak(lambda: salience.ablationcam(model, x, 1, **opts))
    _same_model(model, before)
    # before: float32 channels-last copies (w) beside the bf16 casts (w / 2); now the casts, channels-last (w / 2)
    assert peak < 0.9 * w, (peak, w)
    # the same casts' values: autocast's own (its cache off: a cast of the contiguous weights each pass)
    with warnings.catch_warnings(), torch.autocast("cpu", enabled=False, cache_enabled=False):
        warnings.simplefilter("ignore")
        ref = salience.ablationcam(model, x, 1, **opts)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-5)
    _same_model(model, before)


def _per_image(model: nn.Module, x: torch.Tensor) -> int:
    probe = engine.MemoryProbe()
    with probe, torch.no_grad():
        model(x[:1])
    return probe.peak


CALLS = {
    "scorecam": lambda m, x, **kw: salience.scorecam(m, x, 1, layer=m[2], **kw),
    "ablationcam": lambda m, x, **kw: salience.ablationcam(m, x, 1, layer=m[2], **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 1, masks=4, **kw),
    "occlusion": lambda m, x, **kw: salience.occlusion(m, x, 1, window=16, stride=16, **kw),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CALLS))
def test_max_memory_bounds_the_clean_passes(name, precision, monkeypatch):
    """Every clean forward of the call (those before the engine's passes) takes at most the images ``max_memory``
    allows (80 % of it over one image's float32 pass, as the engine's chunks): 2 here; they took all 8 (4 under
    bf16) before."""
    model, x = _net(), _x()
    budget = int(2.5 * _per_image(model, x) / 0.8)
    sizes: list = []
    clean: list = []
    accumulate = engine.accumulate

    def spy(*args, **kwargs):  # the clean passes are those before the engine's
        clean.append(len(sizes)) if not clean else None
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(engine, "accumulate", spy)
    h = model[0].register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours = CALLS[name](model, x, max_memory=budget, precision=precision)
        finally:
            h.remove()
        free = CALLS[name](model, x, precision=precision)
    _same_model(model, before)
    seen = sizes[:clean[0]]
    assert sum(seen) >= B and max(seen) <= 2, seen  # every image's clean pass, 2 images at most in each
    # the same map as the call without the budget (independent images; bf16: the rounding of kernels per batch size)
    tol = dict(rtol=1e-4, atol=1e-6) if precision == "fp32" else dict(rtol=5e-2, atol=5e-2 * float(free.abs().max()))
    torch.testing.assert_close(ours, free, **tol)
