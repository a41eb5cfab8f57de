"""Guided backprop and deconvnet: every form of ReLU, references, Captum, hygiene, threads."""
from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience
from salience import SalienceError, rules

from conftest import SmallCNN, unchanged


# ----------------------------------------------------------------------------- references
class RefGuided(torch.autograd.Function):
    """Hand-written guided ReLU (capped at ``cap`` if given): g_in = max(g, 0) * 1[0 < x < cap]."""

    @staticmethod
    def forward(ctx, x, cap):
        ctx.save_for_backward(x)
        ctx.cap = cap
        return x.clamp(min=0) if cap is None else x.clamp(0, cap)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gate = x > 0
        if ctx.cap is not None:
            gate = gate & (x < ctx.cap)
        return torch.where(gate, g.clamp(min=0), torch.zeros_like(g)), None


class RefDeconv(torch.autograd.Function):
    """Hand-written deconvnet ReLU: g_in = max(g, 0), forward sign ignored."""

    @staticmethod
    def forward(ctx, x, cap):
        return x.clamp(min=0) if cap is None else x.clamp(0, cap)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0), None


RELU6 = {"relu6_module", "relu6_module_inplace", "F.relu6", "F.relu6_inplace", "hardtanh06", "hardtanh06_"}


def apply_form(form: str, h: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """Rectify ``h`` the way ``form`` says (``mod``: the model's own activation module)."""
    if form in ("module", "module_reused", "module_inplace", "relu6_module", "relu6_module_inplace"):
        return mod(h)
    return {
        "F.relu": lambda: F.relu(h),
        "F.relu_inplace": lambda: F.relu(h, inplace=True),
        "F.relu_": lambda: F.relu_(h),
        "torch.relu": lambda: torch.relu(h),
        "torch.relu_": lambda: torch.relu_(h),
        "method": lambda: h.relu(),
        "method_": lambda: h.relu_(),
        "F.relu6": lambda: F.relu6(h),
        "F.relu6_inplace": lambda: F.relu6(h, inplace=True),
        "hardtanh06": lambda: F.hardtanh(h, 0.0, 6.0),
        "hardtanh06_": lambda: F.hardtanh_(h, 0.0, 6.0),
        "clamp0": lambda: h.clamp(min=0),
        "clamp_min0_": lambda: h.clamp_min_(0),
        "threshold": lambda: F.threshold(h, 0.0, 0.0),
        "aten.relu": lambda: torch.ops.aten.relu(h),
    }[form]()


FORMS = ["module", "module_reused", "module_inplace", "F.relu", "F.relu_inplace", "F.relu_", "torch.relu",
         "torch.relu_", "method", "method_", "relu6_module", "relu6_module_inplace", "F.relu6", "F.relu6_inplace",
         "hardtanh06", "hardtanh06_", "clamp0", "clamp_min0_", "threshold", "aten.relu"]


class FormNet(nn.Module):
    """conv -> BN -> act -> conv -> act -> (DenseNet-like concat) -> act -> pool -> linear; act in one form.

    With ``ref`` (an autograd.Function), every act is ``ref.apply(h, cap)`` instead: the reference.
    """

    def __init__(self, form: str, ref=None, scale: float = 1.0):
        super().__init__()
        self.form, self.ref, self.scale = form, ref, scale
        self.cap = 6.0 if form in RELU6 else None
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.head = nn.Linear(11, 4)
        inplace = form.endswith("_inplace")
        if form.startswith("relu6_module"):
            self.act1, self.act2, self.act3 = nn.ReLU6(inplace), nn.ReLU6(inplace), nn.ReLU6(inplace)
        elif form == "module_reused":
            self.act1 = nn.ReLU()
            self.act2 = self.act3 = self.act1
        else:
            self.act1, self.act2, self.act3 = nn.ReLU(inplace), nn.ReLU(inplace), nn.ReLU(inplace)

    def act(self, h: torch.Tensor, mod: nn.Module) -> torch.Tensor:
        if self.ref is not None:
            return self.ref.apply(h, self.cap)
        return apply_form(self.form, h, mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn(self.conv1(x)) * self.scale, self.act1)
        b = self.act(self.conv2(a) * self.scale - 0.5, self.act2)
        c = self.act(torch.cat([a, b], 1) - 0.2, self.act3)
        return self.head(c.mean((2, 3)))


def _pair(form: str, ref):
    torch.manual_seed(1)
    scale = 6.0 if form in RELU6 else 1.0  # so that the cap at 6 is crossed
    m = FormNet(form, scale=scale)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.3, 0.3)
    r = FormNet(form, ref=ref, scale=scale)
    r.load_state_dict(m.state_dict())
    return m.eval(), r.eval()


@pytest.fixture(scope="module")
def x8():
    torch.manual_seed(2)
    return torch.randn(3, 3, 8, 8)


# --------------------------------------------------------------------- every form of ReLU
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method,ref", [(salience.guided_backprop, RefGuided), (salience.deconvnet, RefDeconv)],
                         ids=["guided", "deconvnet"])
def test_rule_equals_hand_written_reference_for_every_relu_form(form, method, ref, x8):
    model, reference = _pair(form, ref)
    target = torch.tensor([0, 2, 3])
    ours = method(model, x8, target, reduce=None)
    expected = salience.vanilla(reference, x8, target, reduce=None)  # the reference's plain gradient
    plain = salience.vanilla(model, x8, target, reduce=None)
    assert not torch.allclose(expected, plain, atol=1e-4), "the rule must matter on this model"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["module_reused", "F.relu", "method_", "F.relu6_inplace", "clamp0"])
def test_every_call_is_rectified_and_forward_unchanged(form, x8):
    model, _ = _pair(form, RefGuided)
    with torch.no_grad():
        expected = model(x8)
    xi = x8.clone().requires_grad_()
    rule = rules.guided()
    with rule:
        out = model(xi)
    assert rule.rectified == 3  # three activation calls per forward, whatever their form
    assert torch.equal(out, expected)


@pytest.mark.parametrize("spelling", ["F.relu_inplace", "F.relu_", "torch.relu_", "method_", "F.relu6_inplace",
                                      "hardtanh06_", "clamp_min0_"])
def test_in_place_forms_keep_in_place_semantics(spelling):
    torch.manual_seed(0)
    leaf = torch.randn(4, 5, requires_grad=True)
    h = leaf * 7.0
    before = h.detach().clone()
    with rules.guided():
        out = apply_form(spelling, h, nn.Identity())
    assert out is h  # the caller's tensor, modified in place, is what comes back
    cap = 6.0 if spelling in RELU6 else None
    assert torch.equal(h.detach(), before.clamp(0, cap) if cap else before.clamp(min=0))
    g = torch.randn(4, 5)
    (grad,) = torch.autograd.grad(out, leaf, g)
    gate = (before > 0) & ((before < cap) if cap else True)
    assert torch.equal(grad, torch.where(gate, g.clamp(min=0), torch.zeros_like(g)) * 7.0)


def test_gradients_shared_with_other_branches_are_left_alone():
    # The rule clamps only the rectifier's own gradient, never a tensor another branch also reads:
    # y = relu(h) + h (a residual around the ReLU; the add's backward hands the same gradient
    # tensor to both branches) and z = relu(h) used twice. By the formula, at h:
    # dy = max(g, 0) * 1[h > 0] + g and dz = max(2g, 0) * 1[h > 0].
    leaf = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    gate = leaf.detach() > 0
    for inplace in (False, True):
        h = leaf * 1.0
        with rules.guided():
            r = F.relu(h.clone() if inplace else h, inplace=inplace)
            y = r + h
            z = r * 1.0 + r
        (dy,) = torch.autograd.grad(y, leaf, g, retain_graph=True)
        (dz,) = torch.autograd.grad(z, leaf, g)
        assert torch.equal(dy, torch.where(gate, g.clamp(min=0), torch.zeros_like(g)) + g)
        assert torch.equal(dz, torch.where(gate, (2 * g).clamp(min=0), torch.zeros_like(g)))


def test_in_place_on_a_view():
    leaf = torch.randn(2, 6, requires_grad=True)
    h = leaf * 1.0
    with rules.guided():
        h[:, :3].relu_()
    g = torch.randn(2, 6)
    (grad,) = torch.autograd.grad(h, leaf, g)
    gate = leaf.detach()[:, :3] > 0
    assert torch.equal(grad[:, 3:], g[:, 3:])  # untouched part: plain gradient
    assert torch.equal(grad[:, :3], torch.where(gate, g[:, :3].clamp(min=0), torch.zeros_like(g[:, :3])))


def test_other_clamps_are_left_alone(x8):
    class ClampNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x).clamp(min=0.1)  # not a ReLU: plain gradient
            h = h.clamp(max=0.8)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    m = ClampNet()
    rule = rules.guided()
    with rule:
        m(x8.clone().requires_grad_())
    assert rule.rectified == 0
    # no rectifier at all: the plain gradient, taken with unsupported="ignore" (refused by default)
    torch.testing.assert_close(salience.guided_backprop(m, x8, reduce=None, unsupported="ignore"),
                               salience.vanilla(m, x8, reduce=None))


def test_relu_free_model_guided_equals_vanilla(x8):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Sigmoid(), nn.Flatten(),
                      nn.Linear(64, 3))
    for method in (salience.guided_backprop, salience.deconvnet):  # refused by default (no ReLU), taken with "ignore"
        assert torch.equal(method(m, x8, reduce=None, unsupported="ignore"), salience.vanilla(m, x8, reduce=None))


# ------------------------------------------------------------------------------- Captum
@pytest.fixture(scope="module")
def tv_models():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return {"resnet18": torchvision.models.resnet18(weights=None).eval(),
            "vgg11": torchvision.models.vgg11(weights=None).eval()}


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_equals_captum_on_module_relu_models(arch, tv_models):
    captum_attr = pytest.importorskip("captum.attr")
    m = tv_models[arch]
    torch.manual_seed(3)
    x = torch.rand(2, 3, 64, 64)
    t = [1, 7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gb_ref = captum_attr.GuidedBackprop(m).attribute(x, target=t)
        dc_ref = captum_attr.Deconvolution(m).attribute(x, target=t)
    with unchanged(m):
        gb = salience.guided_backprop(m, x, t, reduce=None)
        dc = salience.deconvnet(m, x, t, reduce=None)
    plain = salience.vanilla(m, x, t, reduce=None)
    assert not torch.allclose(gb, plain, atol=1e-4 * plain.abs().max().item())
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(dc, dc_ref, rtol=1e-5, atol=1e-8)


def test_resnet_reused_relu_module_rectified_at_every_call(tv_models):
    m = tv_models["resnet18"]
    rule = rules.guided()
    with rule:
        m(torch.rand(1, 3, 32, 32, requires_grad=True))
    assert rule.rectified == 17  # stem + 2 per BasicBlock x 8, although each block has one nn.ReLU


@pytest.mark.parametrize("method,captum_name,ref", [(salience.guided_backprop, "GuidedBackprop", RefGuided),
                                                    (salience.deconvnet, "Deconvolution", RefDeconv)])
def test_captum_gives_plain_gradients_on_functional_relus_salience_does_not(method, captum_name, ref, x8):
    """A documented fact: hook-based Captum misses F.relu; salience matches the reference."""
    captum_attr = pytest.importorskip("captum.attr")
    model, reference = _pair("F.relu", ref)
    t = [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(captum_attr, captum_name)(model).attribute(x8, target=t)
    plain = salience.vanilla(model, x8, t, reduce=None)
    expected = salience.vanilla(reference, x8, t, reduce=None)
    torch.testing.assert_close(theirs, plain)  # Captum: just the plain gradient
    assert not torch.allclose(theirs, expected, atol=1e-4)
    torch.testing.assert_close(method(model, x8, t, reduce=None), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ unsupported activations
class MixedNet(nn.Module):
    def __init__(self, ref=None):
        super().__init__()
        self.ref = ref
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gelu = nn.GELU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv1(x)
        h = self.ref.apply(h, None) if self.ref else F.relu(h)
        h = F.silu(self.gelu(self.conv2(h)))
        return self.head(self.gelu(h).mean((2, 3)))


def test_unsupported_activation_errors_by_default(x8):
    m = MixedNet()
    with unchanged(m):
        with pytest.raises(SalienceError, match=r"gelu.*unsupported='warn'"):
            salience.guided_backprop(m, x8)
        with pytest.raises(SalienceError, match="gelu"):
            salience.deconvnet(m, x8)


def test_unsupported_activation_warn_counts_and_ignore_is_silent(x8):
    torch.manual_seed(0)
    m = MixedNet()
    r = MixedNet(ref=RefGuided)
    r.load_state_dict(m.state_dict())
    expected = salience.vanilla(r, x8, reduce=None)  # guided at the ReLU, plain through GELU / SiLU
    with pytest.warns(UserWarning, match=r"3 activation call\(s\).*gelu x2, silu x1") as rec:
        warned = salience.guided_backprop(m, x8, reduce=None, unsupported="warn")
    assert rec[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ignored = salience.guided_backprop(m, x8, reduce=None, unsupported="ignore")
    torch.testing.assert_close(warned, expected)
    assert torch.equal(warned, ignored)
    with pytest.raises(SalienceError, match="unsupported must be one of"):
        salience.guided_backprop(m, x8, unsupported="maybe")


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.ELU(), nn.Hardswish(), nn.Mish(), nn.SELU(), nn.CELU(),
                                 nn.Softplus(), nn.PReLU(), nn.Hardtanh(), nn.RReLU()])
def test_each_unsupported_activation_is_detected(act, x8):
    m = nn.Sequential(nn.Conv2d(3, 2, 3), act, nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(SalienceError, match="defined for ReLU-type activations only"):
        salience.guided_backprop(m, x8)


def test_torchscript_is_refused(small_cnn, x8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(small_cnn.eval())
        sub = SmallCNN()
        sub.features = torch.jit.script(sub.features)
    for model in (scripted, sub):
        for method in (salience.guided_backprop, salience.deconvnet):
            with pytest.raises(SalienceError, match="TorchScript"):
                method(model, x8)


# ----------------------------------------------------------------------- hygiene, threads
def test_model_unchanged_after_success_error_and_interrupt(small_cnn, x8):
    small_cnn.train()
    small_cnn.head.weight.grad = torch.ones_like(small_cnn.head.weight)
    with unchanged(small_cnn):
        salience.guided_backprop(small_cnn, x8)
        salience.deconvnet(small_cnn, x8, 1, reduce="colored")

    def boom(module, inp, out):
        raise KeyboardInterrupt

    for exc, target in ((KeyboardInterrupt, None), (ValueError, lambda out: (_ for _ in ()).throw(ValueError()))):
        with unchanged(small_cnn):
            handle = small_cnn.features[3].register_forward_hook(boom) if exc is KeyboardInterrupt else None
            try:
                with pytest.raises(exc):
                    salience.guided_backprop(small_cnn, x8, target)
            finally:
                if handle is not None:
                    handle.remove()
    assert torch._C._len_torch_function_stack() == 0


class SlowCNN(SmallCNN):
    """Sleeps between layers so that two threads interleave inside the forward pass."""

    def forward(self, x):
        h = x
        for layer in self.features:
            h = layer(h)
            time.sleep(0.001)
        return self.head(h.mean((2, 3)))


def test_two_threads_guided_and_vanilla_get_their_own_results():
    torch.manual_seed(0)
    m = SlowCNN()
    x = torch.randn(2, 3, 8, 8)
    alone = {"guided": salience.guided_backprop(m, x, reduce=None), "vanilla": salience.vanilla(m, x, reduce=None)}
    assert not torch.allclose(alone["guided"], alone["vanilla"])
    fns = {"guided": salience.guided_backprop, "vanilla": salience.vanilla}
    results: dict[str, list] = {"guided": [], "vanilla": []}
    barrier = threading.Barrier(2)

    def work(name):
        barrier.wait()
        for _ in range(15):
            results[name].append(fns[name](m, x, reduce=None))

    threads = [threading.Thread(target=work, args=(n,)) for n in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in fns:
        assert len(results[name]) == 15
        assert all(torch.equal(r, alone[name]) for r in results[name]), name


@pytest.mark.parametrize("method", [salience.guided_backprop, salience.deconvnet])
def test_batch_equals_one_image_at_a_time(method, small_cnn, x8):
    t = torch.tensor([0, 3, 1])
    batch = method(small_cnn, x8, t, reduce=None)
    single = torch.cat([method(small_cnn, x8[i:i + 1], t[i:i + 1], reduce=None) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-7)


def test_densenet_functional_relu_is_rectified_captum_misses_it():
    """torchvision's DenseNet ends with F.relu(features, inplace=True) in forward: no module to hook."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.densenet121(weights=None).eval()
    x = torch.rand(1, 3, 32, 32)
    n_modules = sum(isinstance(mod, nn.ReLU) for mod in m.modules())
    rule = rules.guided()
    with rule:
        m(x.clone().requires_grad_())
    assert rule.rectified == n_modules + 1
    captum_attr = pytest.importorskip("captum.attr")  # the peer's part (the count above runs without it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_attr.GuidedBackprop(m).attribute(x, target=5)
    ours = salience.guided_backprop(m, x, 5, reduce=None)
    assert not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * ours.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(x8):
    model, _ = _pair("F.relu_inplace", RefGuided)
    cpu = salience.guided_backprop(model, x8, reduce=None)
    gpu = salience.guided_backprop(model.cuda(), x8.cuda(), reduce=None)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
