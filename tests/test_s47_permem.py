"""Session 47, issue 15's "at no more memory than a plain loop", on models WITH buffers (RISE, Ablation-CAM, fp32).

Session 46's tests (tests/test_s46_permem.py) used models without buffers: the model guard copies a model's buffers
(BatchNorm's running statistics: 0.2 MiB on resnet50), which a plain loop does not, and that put fp32 RISE and
Ablation-CAM 0.24 and 0.20 MiB over the loop's live tensors on resnet50, 8 images at 224 px. Here torchvision
ResNets with their BatchNorm layers (a resnet18: 38 KiB of running statistics; resnet50's blocks, one a stage: 77
KiB), live tensors at the call's peak by
:class:`salience._core.engine.MemoryProbe` (deterministic), against the same passes written as a plain loop:

* RISE held the chunk's masks ``(n, H, W)`` (and the clean output ``(B, classes)``) through each pass: the masks are
  made again after the pass now (each from its own seed: the same values), the clean output dropped.
* Ablation-CAM's float32 clean pass of all ``B`` images, which also keeps the layer's output, was the call's peak:
  a loop's pass plus the guard's copies. It runs as two now (S from a pass keeping nothing of the layer, the layer's
  output from a pass stopped at the layer: the same bits); the peak is the chunks' passes, which run an image's items
  with the layers before the layer on that image's one row.
"""
import torch
import torchvision

import salience
from salience.methods.perturbation import rise_masks
from test_s46_permem import _peak  # live tensors at the peak of a call (MemoryProbe)


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # statistics of their own: the guard's copies hold real values
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _x(b: int, s: int) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _buffer_bytes(model: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _snapshot(model: torch.nn.Module) -> list:
    return [(n, t.data_ptr(), t.detach().clone()) for n, t in list(model.named_parameters()) +
            list(model.named_buffers())]


def _unchanged(model: torch.nn.Module, before: list) -> None:
    after = _snapshot(model)
    assert [a[:2] for a in after] == [b[:2] for b in before]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(after, before))
    assert not model.training


def test_rise_holds_no_mask_through_its_pass_and_stays_under_the_loop_with_the_guards_copies():
    model, x = _resnet18(), _x(1, 48)
    n, s = 16, 48  # one image, 16 masks a pass (the chunk): 16 x 48 x 48 floats of masks, 147 KiB
    assert _buffer_bytes(model) > 30_000  # what the guard copies and the loop does not
    before = _snapshot(model)
    ours_peak, ours = _peak(lambda: salience.rise(model, x, 3, masks=n, chunk=n))
    _unchanged(model, before)

    def loop():  # the same passes: the chunk's masks on the image, one pass, a float32 map
        with torch.no_grad():
            m = rise_masks(0, n, (s, s))
            p = model(x * m[:, None]).softmax(1)[:, 3]
            return torch.einsum("n,nhw->hw", p, m)[None] / (n * 0.5)

    loop_peak, ref = _peak(loop)
    # before: the masks (n, H, W) alive at the pass's peak as in the loop, and the guard's copies (38 KiB) and the
    # clean output beside them: over the loop's by those
    assert ours_peak <= loop_peak, (ours_peak, loop_peak)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # the paper's sum, as the loop writes it


def test_rise_masks_made_again_are_the_same_values():
    """The masks multiplied into the chunk's images and those the scores weigh after the pass are made twice: the
    same bits (each from a generator of its own seed), so the map is the paper's sum over one set of masks."""
    a = rise_masks(5, 21, (37, 29), cell=5, p=0.3, seed=11)
    b = rise_masks(5, 21, (37, 29), cell=5, p=0.3, seed=11)
    assert torch.equal(a, b)
    model, x = _resnet18(), _x(3, 24)
    maps = [salience.rise(model, x, 1, masks=7, chunk=c, cell=5) for c in (1, 4, 21)]
    m = rise_masks(0, 7, (24, 24), cell=5).double()
    with torch.no_grad():
        sc = torch.stack([model(x * m[i].float()).softmax(1)[:, 1] for i in range(7)]).double()  # (7, 3)
    ref = torch.einsum("nb,nhw->bhw", sc, m) / (7 * 0.5)
    for got in maps:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)


def _ablation_reference(model, layer, x, target, copy=False):
    """The paper's formula by hand: w_k = (S - S_k) / S, S_k with channel k of the layer's output set to 0 (all
    images a pass), the map ReLU(sum_k w_k A_k) upsampled bilinearly; also the loop whose memory is compared.
    ``copy``: A copied when the layer returns (a model that changes it in place after; not the loop's memory)."""
    store: list = []
    rows = torch.arange(x.shape[0])
    with torch.no_grad():
        h = layer.register_forward_hook(lambda m, i, o: store.append(o.clone() if copy else o))
        y = model(x)[rows, target]
        h.remove()
        acts = store.pop()
        w = []
        for k in range(acts.shape[1]):
            def zero(mod, i, o, k=k):
                o = o.clone()
                o[:, k] = 0
                return o
            h = layer.register_forward_hook(zero)
            w.append((y - model(x)[rows, target]) / y)
            h.remove()
        cam = torch.einsum("kb,bkhw->bhw", torch.stack(w), acts).clamp(min=0)
        return torch.nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear",
                                               align_corners=False)[:, 0]


def _bottleneck_resnet() -> torch.nn.Module:
    """resnet50's blocks, one a stage (torchvision's Bottleneck, a downsample in each first block): the layer's
    output kept by a pass that peaks in ``layer1.0``'s downsample, as on resnet50 (resnet18's blocks peak elsewhere,
    where the loop's clone of the layer's output counts too), 77 KiB of BatchNorm buffers."""
    torch.manual_seed(0)
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10).eval()


def test_ablationcam_fp32_live_tensors_under_the_loops_with_the_guards_copies():
    model, x = _bottleneck_resnet(), _x(8, 32)
    target = torch.arange(8) % 10
    layer = "layer1.0.conv1"
    before = _snapshot(model)
    ours_peak, ours = _peak(lambda: salience.ablationcam(model, x, target, layer=layer, chunk=8))
    _unchanged(model, before)
    loop_peak, ref = _peak(lambda: _ablation_reference(model, model.get_submodule(layer), x, target))
    # before: the clean pass of the 8 images with the layer's output kept (the loop's pass) and the guard's copies of
    # the BatchNorm buffers (77 KiB) beside it: 75 KB over the loop's
    assert ours_peak <= loop_peak, (ours_peak, loop_peak)
    scale = ref.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(ours / scale, ref / scale, rtol=1e-4, atol=1e-4)


def test_ablationcam_fp32_clean_pass_keeps_no_layer_output_through_the_layers_after_it():
    """fp32, all B images a clean pass: the model's output from a pass of its own, then the layer's output from a
    pass of the layers before it only (stopped at the layer); before, one pass kept the layer's output through the
    rest of the model. At an early layer (scorecam._split_pays) and with no user hook (a hook pair would be
    unbalanced by the stopped pass: tests/test_s47_split.py): the passes seen by the modules' own forward."""
    model, x = _resnet18(), _x(5, 32)
    events: list = []

    class Logged(torch.nn.Module):
        def __init__(self, name: str, inner: torch.nn.Module) -> None:
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            events.append((self.name, int(t.shape[0])))
            return self.inner(t)

    model.conv1, model.fc = Logged("conv1", model.conv1), Logged("fc", model.fc)
    salience.ablationcam(model, x, 1, layer="layer1.0.conv1")
    assert events[:3] == [("conv1", 5), ("fc", 5), ("conv1", 5)], events[:6]
    assert events[3] != ("fc", 5), events[:6]  # the second pass stopped at the layer


class InPlaceInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x -= 0.5
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_ablationcam_of_a_model_that_changes_its_input_in_place_takes_both_from_one_pass():
    """``x -= 0.5`` in the forward: the layer's output and S from one pass (the second, on the input the first pass
    changed), not from two passes on different inputs: the layer's output is the conv of that pass's input, and the
    map is finite (session 46's tests/test_s46_lastread.py runs such a model with and without max_memory)."""
    model, x = InPlaceInput().eval(), _x(2, 8)
    seen: list = []
    hooks = [model.conv.register_forward_pre_hook(lambda m, a: seen.append(("in", a[0].clone()))),
             model.conv.register_forward_hook(lambda m, a, o: seen.append(("out", o.detach().clone()))),
             model.head.register_forward_pre_hook(lambda m, a: seen.append(("head", None)))]
    try:
        maps = salience.ablationcam(model, x, 1, layer="conv", upsample=False)
    finally:
        for h in hooks:
            h.remove()
    kinds = [k for k, _ in seen]
    # full passes of both images, none stopped (the user hooks keep the one pass, tests/test_s47_split.py; without
    # them the split's first pass, then the one pass): the last of them gave the layer's output and S
    full = 0
    while kinds[3 * full:3 * full + 3] == ["in", "out", "head"] and seen[3 * full][1].shape[0] == 2:
        full += 1
    assert full >= 1 and kinds[3 * full] == "in" and seen[3 * full][1].shape[0] != 2, kinds[:8]
    assert torch.isfinite(maps).all()
    last = 3 * (full - 1)
    with torch.no_grad():
        acts = model.conv(seen[last][1])  # that pass's input: its conv output is the captured layer output
    assert torch.equal(acts, seen[last + 1][1])
