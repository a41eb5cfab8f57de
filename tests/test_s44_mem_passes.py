"""Issue 15 (memory), session 44: Score-CAM, RISE and Ablation-CAM hold no more tensors at once than a plain loop
under a bf16 autocast, whatever the number of masks.

Measured with deterministic quantities, not the process's resident memory (which glibc's heap makes vary by tens of
MiB from run to run): the bytes of tensors alive at the peak (salience._core.engine.MemoryProbe, a dispatch mode
that counts every storage an operator makes until it is freed), the bf16 casts of a weight (the profiler's copies
of its shape), and the batch of each float32 pass (a forward pre-hook)."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import salience
from salience._core.engine import MemoryProbe
from salience.methods.perturbation import rise_masks

B, S = 4, 32


def _model() -> nn.Module:
    """Activations much larger than the weights and the images: the passes' tensors are the peak."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


def _x() -> torch.Tensor:
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(1))


CALLS = {
    "scorecam": lambda m, x, **kw: salience.scorecam(m, x, 1, layer=m[0], **kw),  # conv output: no constant channel
    "ablationcam": lambda m, x, **kw: salience.ablationcam(m, x, 1, layer=m[0], **kw),
    "rise": lambda m, x, **kw: salience.rise(m, x, 1, masks=8, **kw),
}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.mark.parametrize("name", ["scorecam", "rise"])
def test_folded_passes_never_cast_the_models_weights(name):
    """precision="bf16" + fold_batchnorm: every pass, the engine's first (probing) one too, runs the folded copy,
    whose convolutions hold bf16 weights: no bf16 copy of the model's own weights is made. Before, the probing chunk
    ran the model itself under the autocast (to see whether a final softmax was to be stripped) and its casts (49
    MiB on resnet50) were held beside the folded copy (49 MiB more): the call's peak. At 16 px (32 before): a
    weight's cast is made per pass whatever the image's size, and Score-CAM's bf16 passes (one per channel and image,
    twice, the second under the profiler) were most of the test's time."""
    model, x = _model(), _x()[..., :16, :16]
    with salience.performance(fold_batchnorm=True):
        _quiet(CALLS[name], model, x, chunk=B, precision="bf16")  # the folded copy made, kept for the model
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            m = _quiet(CALLS[name], model, x, chunk=B, precision="bf16")
    casts = sum(e.count for e in p.key_averages(group_by_input_shape=True)
                if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0] == [32, 32, 3, 3])
    assert casts == 0, casts
    assert torch.isfinite(m).all()


@pytest.mark.parametrize("name", list(CALLS))
def test_float32_clean_pass_takes_half_the_images_under_bf16(name):
    """Under a 16-bit autocast the float32 clean pass (the targets, the map's scale, the layer's output) runs half
    the images at a time: the chunks are sized for 16-bit activations, and a float32 pass of all the images held
    twice a chunk's. In float32 the clean pass is one pass of all of them, as before (the same bits)."""
    model, x = _model(), _x()
    seen: list[tuple[int, torch.dtype]] = []  # each pass's images and the first convolution's output dtype
    h = model[0].register_forward_hook(lambda mod, args, out: seen.append((out.shape[0], out.dtype)))
    try:
        _quiet(CALLS[name], model, x, chunk=B, precision="bf16")
        fp32 = [n for n, dtype in seen if dtype == torch.float32]
        assert seen[0] == (math.ceil(B / 2), torch.float32), seen  # the clean pass (Ablation-CAM's capture)
        if name != "ablationcam":  # (whose clean scores are taken again, all B images: not changed here)
            assert max(fp32) == math.ceil(B / 2), seen
        seen.clear()
        _quiet(CALLS[name], model, x, chunk=B)
        assert seen[0][0] == B
    finally:
        h.remove()


def _loop_peak(model: nn.Module, x: torch.Tensor, masks: int) -> int:
    """The peak tensor bytes of a plain RISE loop under the same bf16 autocast: B images a pass."""
    probe = MemoryProbe()
    rows = torch.arange(B)
    with probe, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        target = model(x).argmax(1)  # its clean pass, as salience's (which takes the class from it)
        sal = torch.zeros(B, S, S)
        for i in range(masks):
            m = rise_masks(i, i + 1, (S, S))[0]
            sal += model(x * m).float().softmax(1)[rows, target].view(-1, 1, 1) * m
    return probe.peak


def _rise_peak(model: nn.Module, x: torch.Tensor, masks: int) -> tuple[int, torch.Tensor]:
    probe = MemoryProbe()
    with probe:
        m = _quiet(salience.rise, model, x, None, masks=masks, chunk=B, precision="bf16")
    return probe.peak, m


def test_rise_bf16_peak_is_the_loops_and_does_not_grow_with_the_masks():
    """RISE under bf16, B items a chunk (the loop's batch): its peak of live tensors is at most the plain loop's
    (plus 10 %: the sums in float64 and the reused input buffer), where the float32 clean pass of all B images held
    about twice a bf16 pass's; and 8 times the masks add only the NaN notes of the items (17 bytes an item)."""
    model, x = _model(), _x()
    few, m8 = _rise_peak(model, x, 8)
    many, _ = _rise_peak(model, x, 64)
    loop = _loop_peak(model, x, 8)
    assert few <= 1.1 * loop, (few, loop)
    assert many - few <= 64 * B * 17 + 4096, (few, many)
    assert torch.isfinite(m8).all()


def test_bf16_folded_copy_never_holds_every_fused_float32_weight():
    """The bf16 folded copy casts each fused layer's weight as it is made: at no time are all the fused float32
    weights alive (torch's fuse made them all before any was cast: 94 MiB on resnet50, whose freed holes glibc kept).
    Eight conv + BatchNorm pairs: the peak of live tensors while folding is the copy's bf16 weights and biases plus a
    layer's float32 transients (its deep copy and its fused weight), not the eight float32 fused weights."""
    from salience._core.folding import _fold

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    one = 64 * 64 * 9 * 4  # a conv's float32 weight, bytes
    probe = MemoryProbe()
    with probe:
        folded = _fold(model, torch.bfloat16)
    assert isinstance(folded, nn.Module), folded
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.weight.dtype == torch.bfloat16 for c in convs)
    bf16 = sum(p.numel() * p.element_size() for p in folded.parameters())
    assert probe.peak <= bf16 + 3 * one, (probe.peak, bf16, one)
    x = torch.rand(2, 64, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # the same values as the model's autocast pass up to the fold's rounding (bf16 a layer, eight layers)
        torch.testing.assert_close(folded(x).float(), model(x).float(), rtol=0.1, atol=0.1)
