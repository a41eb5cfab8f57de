"""Vanilla gradient saliency: the maths on models whose gradients we know."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

from conftest import instances_made


def linear_model(c=3, h=5, w=4, k=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k))


def test_linear_saliency_is_max_abs_weight_exactly():
    m = linear_model()
    x = torch.rand(3, 3, 5, 4)
    for cls in range(6):
        s = salience.vanilla(m, x, cls)
        w = m[1].weight[cls].view(3, 5, 4)
        assert torch.equal(s, w.abs().amax(0).expand(3, 5, 4))
        raw = salience.vanilla(m, x, cls, reduce=None)
        assert torch.equal(raw, w.expand(3, 3, 5, 4))


def test_one_channel_map_is_abs_grad():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(2, 1, 4, 4)
    s = salience.vanilla(m, x, 1)
    assert torch.equal(s, m[1].weight[1].view(4, 4).abs().expand(2, 4, 4))


class Quadratic(nn.Module):
    def forward(self, x):
        return (x**2).flatten(1).sum(1, keepdim=True)


def test_quadratic_gradient_is_2x():
    x = torch.randn(4, 3, 6, 6)
    g = salience.vanilla(Quadratic(), x, 0, reduce=None)
    assert torch.allclose(g, 2 * x)


def test_default_target_is_predicted_class():
    m = linear_model()
    x = torch.rand(5, 3, 5, 4)
    pred = m(x).argmax(1)
    expected = m[1].weight[pred].view(5, 3, 5, 4)
    assert torch.equal(salience.vanilla(m, x, reduce=None), expected)


@pytest.mark.parametrize("final", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1)])
def test_score_is_taken_before_a_final_softmax_module(final):
    m = linear_model()
    with_softmax = nn.Sequential(m, final)
    x = torch.rand(2, 3, 5, 4)
    assert torch.equal(salience.vanilla(with_softmax, x, 2, reduce=None), salience.vanilla(m, x, 2, reduce=None))
    # The option turns it off: then the gradient is that of the probability, which differs.
    off = salience.vanilla(with_softmax, x, 2, reduce=None, strip_softmax=False)
    assert not torch.allclose(off, salience.vanilla(m, x, 2, reduce=None))
    logits = m(x)
    p = torch.softmax(logits, 1)
    if isinstance(final, nn.Softmax):
        # d p_c / d x = p_c * (w_c - sum_k p_k w_k)
        w = m[1].weight
        expected = p[:, 2:3] * (w[2] - p @ w)
        assert torch.allclose(off.flatten(1), expected, atol=1e-6)


class FunctionalSoftmax(nn.Module):
    def __init__(self, inner, kind):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        z = self.inner(x)
        if self.kind == "F":
            return torch.nn.functional.softmax(z, dim=1)
        if self.kind == "torch":
            return torch.softmax(z, 1)
        return z.log_softmax(1)


@pytest.mark.parametrize("kind", ["F", "torch", "method"])
def test_functional_softmax_is_stripped_too(kind):
    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    wrapped = FunctionalSoftmax(m, kind)
    assert torch.equal(salience.vanilla(wrapped, x, 1, reduce=None), salience.vanilla(m, x, 1, reduce=None))


class Switchable(nn.Module):
    """Ends in a softmax or not by a plain attribute, which the model's structure does not see."""

    def __init__(self, inner, final=torch.softmax):
        super().__init__()
        self.inner, self.probabilities, self.final = inner, False, final

    def forward(self, x):
        z = self.inner(x)
        return self.final(z, 1) if self.probabilities else z


def test_a_final_softmax_is_looked_for_once_per_structure_and_found_when_it_appears(monkeypatch):
    """The softmax tap (every torch call of the forward through Python) runs until a pass of the model's
    structure showed whether it ends in a softmax: a second call runs without it. A model that then ends
    in one without a change of structure (a flag its forward reads) is caught by its output's gradient
    function, and its scores are taken before the softmax as before; a model that ends in a softmax keeps
    the tap in every pass, and a new module (a softmax appended) is looked at again."""
    from salience._core import autograd as _autograd

    taps = instances_made(monkeypatch, _autograd, "_SoftmaxTap")
    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    plain = salience.vanilla(m, x, 1, reduce=None)
    assert len(taps) == 1
    model = Switchable(m)
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain) and len(taps) == 2
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain) and len(taps) == 2  # known: none
    model.probabilities = True
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain) and len(taps) == 3  # found, stripped
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain) and len(taps) == 4  # tapped from now on
    appended = nn.Sequential(m, nn.Softmax(1))
    salience.vanilla(m, x, 1)
    before = len(taps)
    m2 = nn.Sequential(m)
    salience.vanilla(m2, x, 1)
    salience.vanilla(m2, x, 1)
    assert len(taps) == before + 1
    m2.append(nn.Softmax(1))  # the structure changed: looked at again, and stripped
    assert torch.equal(salience.vanilla(m2, x, 1, reduce=None), plain) and len(taps) == before + 2
    assert torch.equal(salience.vanilla(appended, x, 1, reduce=None), plain)


class _LogitsAndProbabilities(nn.Module):
    """Returns ``{"logits": z, "probs": softmax(z)}``: the default rule reads the logits, ``select_output(model,
    "probs")`` the softmax's output (a plain attribute, ``salience_info``: the model's structure stays the same)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        z = self.inner(x)
        return {"logits": z, "probs": torch.softmax(z, 1)}


def test_a_final_softmax_is_looked_for_again_for_another_output_pick():
    """Whether the output is a final softmax's is kept per output pick too: after a call on the logits (no softmax),
    ``select_output(model, "probs")`` gives the softmax's output, whose scores are taken before it, in the
    gradient passes and in the passes without gradients (no gradient function there to tell)."""
    from salience._core.autograd import forward_scores
    from salience.loading import select_output

    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    model = _LogitsAndProbabilities(m)
    plain = salience.vanilla(m, x, 1, reduce=None)
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain)  # the logits: no final softmax
    select_output(model, "probs")
    assert torch.equal(forward_scores(model, x), forward_scores(m, x))
    assert torch.equal(salience.vanilla(model, x, 1, reduce=None), plain)


@pytest.mark.parametrize("final", [torch.softmax, torch.log_softmax])
def test_a_final_softmax_that_appears_is_stripped_in_passes_without_gradients(final):
    """A model that ends in a softmax by a flag its forward reads (no change of structure), after a call that showed
    none: a pass without gradients (forward_scores: the predicted class, Score-CAM, occlusion) has no gradient
    function on its output to say so; its output, probabilities (or their logarithms), says it, and the pass runs
    again with the tap."""
    from salience._core.autograd import forward_scores

    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    model = Switchable(m, final)
    salience.vanilla(model, x, 1)  # no final softmax
    model.probabilities = True
    assert torch.equal(forward_scores(model, x), forward_scores(m, x))
    ref = salience.occlusion(m, x, 1, window=2, stride=2)
    assert torch.equal(salience.occlusion(model, x, 1, window=2, stride=2), ref)


def test_softmax_in_the_middle_is_not_stripped():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Softmax(1), nn.Linear(4, 3))
    x = torch.rand(2, 3, 2, 2)
    g = salience.vanilla(m, x, 0, reduce=None)
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(m(xr)[:, 0].sum(), xr)
    assert torch.allclose(g, gr)


def test_batch_equals_one_at_a_time(small_cnn):
    small_cnn.train()  # BatchNorm in train mode would mix samples; salience explains in eval mode
    x = torch.rand(5, 3, 8, 8)
    batch = salience.vanilla(small_cnn, x, reduce=None)
    for i in range(5):
        one = salience.vanilla(small_cnn, x[i : i + 1], reduce=None)
        assert torch.allclose(batch[i : i + 1], one, atol=1e-6)
    assert small_cnn.training


def test_matches_autograd_in_eval_mode(small_cnn):
    x = torch.rand(3, 3, 8, 8)
    small_cnn.eval()
    xr = x.clone().requires_grad_()
    out = small_cnn(xr)
    (g,) = torch.autograd.grad(out[torch.arange(3), out.argmax(1)].sum(), xr)
    assert torch.allclose(salience.vanilla(small_cnn, x, reduce=None), g)


def test_reductions_on_known_gradient():
    # With the quadratic model the raw gradient is 2x, so each reduction has a closed form.
    x = torch.randn(2, 3, 4, 4)
    q = Quadratic()
    g = 2 * x
    assert torch.allclose(salience.vanilla(q, x, 0), g.abs().amax(1))
    assert torch.allclose(salience.vanilla(q, x, 0, reduce="colored"), g.abs())
    assert torch.allclose(salience.vanilla(q, x, 0, reduce="grayscale"), g.abs().sum(1))
    assert torch.allclose(salience.vanilla(q, x, 0, reduce="l2"), g.norm(dim=1))
    assert torch.allclose(salience.vanilla(q, x, 0, reduce="max"), g.amax(1))
    assert torch.allclose(salience.vanilla(q, x, 0, reduce=lambda t: t.mean(1)), g.mean(1))


def test_grad_modifiers_by_name_and_function():
    x = torch.randn(2, 3, 4, 4)
    q = Quadratic()
    g = 2 * x
    raw = dict(reduce=None)
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="absolute", **raw), g.abs())
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="negate", **raw), -g)
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="relu", **raw), g.clamp(min=0))
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="small_values", **raw), 1 / (g.abs() + torch.finfo(g.dtype).eps))
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier=None, **raw), g)
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="none", **raw), g)
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier=lambda t: 3 * t, **raw), 3 * g)
    # keras-vis order: modifier first, then reduction: negate + signed max is -min.
    assert torch.allclose(salience.vanilla(q, x, 0, grad_modifier="negate", reduce="max"), (-g).amax(1))


def test_small_values_is_finite_at_zero():
    x = torch.zeros(1, 3, 2, 2)
    s = salience.vanilla(Quadratic(), x, 0, grad_modifier="small_values", reduce=None)
    assert torch.isfinite(s).all() and (s > 0).all()


def test_only_input_gradients_and_dtype_device_of_x():
    m = linear_model().double()
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    s = salience.vanilla(m, x, 0)
    assert s.dtype == torch.float64 and s.device == x.device and not s.requires_grad
    assert all(p.grad is None for p in m.parameters())
    assert x.grad is None and not x.requires_grad


def test_works_under_no_grad_and_inference_mode():
    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    ref = salience.vanilla(m, x, 1)
    with torch.no_grad():
        assert torch.equal(salience.vanilla(m, x, 1), ref)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.equal(salience.vanilla(m, xi, 1), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(small_cnn):
    x = torch.rand(2, 3, 8, 8)
    cpu = salience.vanilla(small_cnn, x)
    gpu = salience.vanilla(small_cnn.cuda(), x.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(3, 5, 4), r"\(B, C, H, W\).*unsqueeze"),
        (torch.rand(1, 1, 3, 5, 4), r"\(B, C, H, W\)"),
        (torch.randint(0, 255, (1, 3, 5, 4)), "floating-point"),
        (torch.full((1, 3, 5, 4), float("nan")), "NaN"),
        (torch.tensor([[[[float("inf")]]]]).expand(1, 3, 5, 4), "NaN or infinite"),
        ([[1.0]], "torch.Tensor"),
        (torch.rand(0, 3, 5, 4), "empty"),
        (torch.rand(1, 3, 5, 4).to_sparse(), r"sparse_coo tensor.*x\.to_dense\(\)"),  # was a raw NotImplementedError
    ],
)
def test_bad_inputs_raise_clear_errors(x, match):
    with pytest.raises(SalienceError, match=match):
        salience.vanilla(linear_model(), x, 0)


def test_target_out_of_range():
    with pytest.raises(SalienceError, match=r"target class 6 is out of range .* 6 outputs \(valid: 0..5\)"):
        salience.vanilla(linear_model(), torch.rand(1, 3, 5, 4), 6)
    with pytest.raises(SalienceError, match="class -1 is out of range"):
        salience.vanilla(linear_model(), torch.rand(2, 3, 5, 4), torch.tensor([0, -1]))
    with pytest.raises(SalienceError, match="3 target classes for a batch of 2"):
        salience.vanilla(linear_model(), torch.rand(2, 3, 5, 4), [0, 1, 2])


class NoPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return self.lin(torch.ones(x.shape[0], 2))


class Detached(nn.Module):
    def forward(self, x):
        return x.detach().flatten(1)[:, :3] * 2


@pytest.mark.parametrize("model", [NoPath(), Detached()])
def test_no_gradient_path(model):
    with pytest.raises(SalienceError, match="does not depend on the input"):
        salience.vanilla(model, torch.rand(2, 3, 4, 4), 0)


def test_partly_unused_input_is_not_an_error():
    # The score depends on one pixel only: a valid map that is zero elsewhere.
    class OnePixel(nn.Module):
        def forward(self, x):
            return x[:, :, 0, 0]

    s = salience.vanilla(OnePixel(), torch.rand(1, 3, 4, 4), 1, reduce=None)
    assert s[0, 1, 0, 0] == 1 and s.sum() == 1


def test_bad_reduce_and_modifier_names():
    with pytest.raises(SalienceError, match="unknown reduce 'maxx'"):
        salience.vanilla(linear_model(), torch.rand(1, 3, 5, 4), 0, reduce="maxx")
    with pytest.raises(SalienceError, match="unknown grad_modifier 'negative'.*negate"):
        salience.vanilla(linear_model(), torch.rand(1, 3, 5, 4), 0, grad_modifier="negative")


def test_model_returning_tuple_or_dict_or_logits():
    m = linear_model()
    x = torch.rand(2, 3, 5, 4)
    ref = salience.vanilla(m, x, 1)

    class Tup(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x), "aux"

    class Dict(Tup):
        def forward(self, x):
            return {"logits": self.m(x)}

    assert torch.equal(salience.vanilla(Tup(), x, 1), ref)
    assert torch.equal(salience.vanilla(Dict(), x, 1), ref)

    class Weird(Tup):
        def forward(self, x):
            return "nothing"

    with pytest.raises(SalienceError, match="returned str"):
        salience.vanilla(Weird(), x, 1)


def test_probabilities_without_a_softmax_call_warn():
    class Manual(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = linear_model()

        def forward(self, x):
            e = self.m(x).exp()
            return e / e.sum(1, keepdim=True)

    with pytest.warns(UserWarning, match="looks like probabilities"):
        salience.vanilla(Manual(), torch.rand(2, 3, 5, 4), 0)


class _Normalized(nn.Module):
    """Probabilities without a softmax call (``exp(z) / sum exp(z)``): no tap sees them made."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        e = self.inner(x).exp()
        return e / e.sum(1, keepdim=True)


def test_probabilities_made_without_a_softmax_call_run_one_pass_each(recwarn):
    """Such a model is never taken for one known to end in no softmax: its passes without gradients keep the tap
    (a fraction of a pass) rather than running twice to look for a softmax that appeared."""
    from salience._core.autograd import forward_scores

    model = _Normalized(linear_model())
    passes = []
    handle = model.register_forward_pre_hook(lambda m, args: passes.append(1))
    try:
        x = torch.rand(2, 3, 5, 4)
        salience.vanilla(model, x, 1)  # warns: probabilities, no softmax seen
        out = forward_scores(model, x)
        passes.clear()
        assert torch.equal(forward_scores(model, x), out) and len(passes) == 1
    finally:
        handle.remove()
