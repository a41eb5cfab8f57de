"""Every method on a CUDA GPU: the maps equal the CPU's, the model comes back as it was (on its device),
many-pass methods keep their memory flat on the device, and the GPU-only options (``precision="bf16"``
/ ``"fp16"``, channels-last, compiled graphs) stay within their stated tolerances.

These run where a GPU is lent (skipped elsewhere; CI has none): ``python -m pytest tests/test_cuda.py``
on the GPU machine (``benchmarks/gpu.sh`` runs them with the GPU benchmarks). ``SALIENCE_TEST_DEVICE``
picks another device (``cpu`` runs the same comparisons CPU against CPU: a check that the module itself
runs, not a test of a GPU).

The comparisons run in full float32 on the GPU: TF32 (on by default for cuDNN's convolutions) keeps 10
bits of mantissa in the products, a relative error of about 1e-3, which :func:`test_tf32_default_is_within_its_tolerance`
measures on its own.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import salience
from salience.methods import ATTENTION_METHODS, METHODS

from conftest import SmallCNN, seeded_small_cnn, unchanged
from tiny_vit import TinyViT

DEVICE = os.environ.get("SALIENCE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")

CHEAP = {"smoothgrad": dict(samples=4), "integrated_gradients": dict(steps=8), "rise": dict(masks=64, cell=4),
         "occlusion": dict(window=4, stride=2), "scorecam": dict(layer="features.3"),
         "ablationcam": dict(layer="features.3")}
TWO = torch.tensor([[1, 2], [2, 0]])  # two targets for each of two images
RTOL = 1e-4  # float32 on two devices: other kernels, other summation orders


@pytest.fixture(autouse=True)
def full_float32():
    """No TF32 in the comparisons (restored afterwards)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest value of ``b`` (maps have no natural scale)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _cnn() -> SmallCNN:
    return seeded_small_cnn().eval()


def _model_and_image(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    if name in ATTENTION_METHODS:
        torch.manual_seed(0)
        return TinyViT(size=(16, 24), patch=4).eval(), torch.rand(2, 3, 16, 24)
    return _cnn(), torch.rand(2, 3, 12, 12)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "smoothgrad"])
def test_every_method_on_the_gpu_equals_the_cpu(name):
    """The same model and image on both devices: the same map (float32 rounding apart), on the input's
    device, in its dtype; the model comes back as it was, on the GPU; several targets per call too."""
    model, x = _model_and_image(name)
    options = CHEAP.get(name, {})
    expected = METHODS[name](model, x, TWO, **options)
    gpu_model, gx = model.to(DEVICE), x.to(DEVICE)
    with unchanged(gpu_model):
        ours = METHODS[name](gpu_model, gx, TWO.to(DEVICE), **options)
    assert ours.device == gx.device and ours.dtype == x.dtype and ours.shape == expected.shape
    assert _rel(ours, expected) <= RTOL, name
    assert all(p.device == gx.device for p in gpu_model.parameters())


def test_smoothgrad_on_the_gpu_is_seeded_and_has_its_closed_form():
    """SmoothGrad draws its noise on the input's device (the CPU's and CUDA's generators give other
    numbers for one seed), so the devices are compared where the noise cannot matter: on a linear model
    the gradient is the target's weights whatever the noise; and one seed gives the same map twice."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).to(DEVICE).eval()
    x = torch.rand(2, 3, 8, 8, device=DEVICE)
    with unchanged(lin):
        ours = salience.smoothgrad(lin, x, 3, samples=8, reduce=None)
    expected = lin[1].weight[3].reshape(1, 3, 8, 8).expand(2, 3, 8, 8)
    assert _rel(ours[:, 0] if ours.dim() == 5 else ours, expected) <= 1e-5
    model = _cnn().to(DEVICE)
    gx = torch.rand(2, 3, 12, 12, device=DEVICE)
    a = salience.smoothgrad(model, gx, 1, samples=8, seed=3)
    b = salience.smoothgrad(model, gx, 1, samples=8, seed=3, chunk=3)
    assert _rel(a, b) <= 1e-5  # the same noise whatever the chunking, on the device too
    assert _rel(a, salience.smoothgrad(model, gx, 1, samples=8, seed=4)) > 1e-3


def test_rise_and_occlusion_memory_stays_flat_with_the_number_of_passes():
    """Many-pass methods keep running sums only: their peak device memory does not grow with the number
    of masks or windows (the chunk is fixed here, so the peaks compare like for like)."""
    if DEVICE != "cuda":
        pytest.skip("measures CUDA memory")
    torch.manual_seed(0)
    model = _cnn().cuda()
    x = torch.rand(2, 3, 32, 32, device="cuda")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    few = peak(lambda: salience.rise(model, x, 1, masks=64, cell=4, chunk=32))
    many = peak(lambda: salience.rise(model, x, 1, masks=1024, cell=4, chunk=32))
    assert many <= few * 1.25 + (1 << 20), (few, many)
    few = peak(lambda: salience.occlusion(model, x, 1, window=16, stride=16, chunk=4))
    many = peak(lambda: salience.occlusion(model, x, 1, window=4, stride=1, chunk=4))
    assert many <= few * 1.25 + (1 << 20), (few, many)


def test_default_memory_budget_reads_the_gpu():
    """Without ``chunk=`` / ``max_memory=``, the chunk comes from the GPU's free memory (half of it, at
    most 4 GiB): on a GPU with gigabytes free, a small model's SmoothGrad runs the memory probe's pass (one copy
    of each image, whose memory is measured, thrown away: session 45) and then all the copies in one pass."""
    if DEVICE != "cuda":
        pytest.skip("reads CUDA memory")
    from salience._core import engine

    free, _ = torch.cuda.mem_get_info()
    assert abs(engine.default_budget(torch.device("cuda")) - min(free // 2, 4 << 30)) <= 64 << 20
    model = _cnn().cuda()
    calls = []
    handle = model.features[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        salience.smoothgrad(model, torch.rand(2, 3, 12, 12, device="cuda"), 1, samples=16)
    finally:
        handle.remove()
    assert calls == [2, 32], calls


def _l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` over the whole map (the largest difference alone is one pixel's rounding)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# Measured on the H200 (torch 2.11, resnet18 random weights, 64 px; benchmarks/engine-speed-cuda.md
# for resnet50 at 224 px): bf16 maps within 0.15-0.3 of fp32 in L2, correlation 0.97-0.98; fp16
# within 0.05-0.1, correlation 0.998-0.999. Eight bits of mantissa (bf16) through fifty layers.
@pytest.mark.parametrize("precision,tol,corr", [("bf16", 0.35, 0.95), ("fp16", 0.12, 0.99)])
@pytest.mark.parametrize("name", ["vanilla", "gradcam", "integrated_gradients", "rise", "scorecam"])
def test_reduced_precision_is_within_its_tolerance(name, precision, tol, corr):
    """``precision="bf16"`` / ``"fp16"``: the forward pass under autocast; the map in float32, within the
    tolerance docs/performance.md states of the float32 map on resnet18, and the model unchanged."""
    if DEVICE != "cuda":
        pytest.skip("autocast precision is for CUDA")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    options = {"integrated_gradients": dict(steps=8), "rise": dict(masks=128, cell=4)}.get(name, {})
    ref = METHODS[name](model, x, TWO.cuda(), **options)
    with unchanged(model):
        ours = METHODS[name](model, x, TWO.cuda(), precision=precision, **options) \
            if name not in ("vanilla", "gradcam") \
            else _under(dict(precision=precision), lambda: METHODS[name](model, x, TWO.cuda(), **options))
    assert ours.dtype == torch.float32
    assert _l2(ours, ref) <= tol, (name, precision, _l2(ours, ref))
    assert torch.corrcoef(torch.stack([ours.flatten().float(), ref.flatten().float()]))[0, 1] >= corr


def _under(options: dict, fn):
    with salience.performance(**options):
        return fn()


@pytest.mark.parametrize("memory_format", ["channels_last", "auto"])
def test_channels_last_on_the_gpu_equals_the_default_layout(memory_format):
    """The engine's layout choice on the GPU: the same maps (cuDNN picks other kernels: float rounding),
    the parameters' strides back afterwards."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().to(DEVICE)
    x = torch.rand(2, 3, 64, 64, device=DEVICE)
    ref = salience.integrated_gradients(model, x, [1, 2], steps=8, memory_format="contiguous")
    with unchanged(model):
        ours = salience.integrated_gradients(model, x, [1, 2], steps=8, memory_format=memory_format)
    assert _rel(ours, ref) <= 1e-3
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("mode", [True, "freeze"])
def test_compiled_graphs_on_the_gpu_equal_eager(mode):
    """``compile=True`` and ``compile="freeze"`` with inductor on the GPU (Triton kernels): the maps of
    eager, within float32 rounding of fused kernels."""
    from salience._core.perf import compile_unavailable

    why = compile_unavailable("inductor", torch.device(DEVICE))
    if why:
        pytest.skip(why)
    model = _cnn().to(DEVICE)
    x = torch.rand(2, 3, 12, 12, device=DEVICE)
    ref = salience.integrated_gradients(model, x, 1, steps=8, chunk=4)
    with unchanged(model):
        ours = [salience.integrated_gradients(model, x, 1, steps=8, chunk=4, compile=mode) for _ in range(2)]
        sg_ref = salience.rise(model, x, 1, masks=64, cell=4, chunk=16)
        sg = salience.rise(model, x, 1, masks=64, cell=4, chunk=16, compile=mode)
    for out in ours:
        assert _rel(out, ref) <= 1e-4
    assert _rel(sg, sg_ref) <= 1e-4


def test_tf32_default_is_within_its_tolerance():
    """With torch's defaults (TF32 allowed for cuDNN's convolutions), the maps are those of full float32
    within about 1e-2 relative: what a user comparing against the CPU should expect."""
    if DEVICE != "cuda":
        pytest.skip("TF32 is a CUDA setting")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval().cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    ref = salience.gradcam(model, x, [1, 2])
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    ours = salience.gradcam(model, x, [1, 2])
    assert _rel(ours, ref) <= 1e-2


def test_a_hugging_face_vit_on_the_gpu_equals_the_cpu():
    """A Hugging Face ViT (small random config, SDPA attention on the GPU): Grad-CAM on its default layer,
    attention rollout and transformer attribution equal the CPU's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.rand(2, 3, 32, 32)
    for name in ("gradcam", "attention_rollout", "transformer_attribution", "integrated_gradients"):
        expected = METHODS[name](model, x, [0, 2])
        model.to(DEVICE)
        with unchanged(model):
            ours = METHODS[name](model, x.to(DEVICE), [0, 2])
        model.cpu()
        assert _rel(ours, expected) <= 1e-4, name


def test_a_model_on_the_gpu_with_an_image_on_the_cpu_is_a_clear_error():
    """The model's device and the image's differ: a SalienceError that says how to move one, the model
    untouched (a raw "Expected all tensors to be on the same device" from inside the model before)."""
    if DEVICE == "cpu":
        pytest.skip("needs two devices")
    model = _cnn().to(DEVICE)
    with unchanged(model), pytest.raises(salience.SalienceError, match=r"x is on cpu but the model is on cuda.*x\.to\("):
        salience.gradcam(model, torch.rand(2, 3, 12, 12), 1)


def test_a_dataset_run_on_the_gpu_equals_the_cpu_run(tmp_path):
    """``explain_dataset(..., device=...)``: the model is moved for the run (and the caller's model left
    where it was), the stored maps equal those of a CPU run."""
    pytest.importorskip("pyarrow")
    from conftest import RandomImages

    model = _cnn()
    data = RandomImages(6, size=12)
    cpu = salience.explain_dataset(model, data, ["vanilla", "gradcam"], tmp_path / "cpu", batch_size=4,
                                   device="cpu", map_dtype="float32")
    with unchanged(model):
        gpu = salience.explain_dataset(model, data, ["vanilla", "gradcam"], tmp_path / "gpu", batch_size=4,
                                       device=DEVICE, map_dtype="float32")
    assert all(p.device.type == "cpu" for p in model.parameters())
    for i in range(6):
        for m in ("vanilla", "gradcam"):
            a, b = torch.tensor(gpu.map(i, m)), torch.tensor(cpu.map(i, m))
            assert _rel(a, b) <= 1e-4, (i, m)
