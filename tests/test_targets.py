"""Each target kind on a model whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, targets

from test_s49_record import ForwardLog


def linear(k=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, k))


def w_of(m, *classes):
    return sum(m[1].weight[c] for c in classes).view(3, 4, 4)


def test_int_tensor_list_and_numpy_class_targets():
    m = linear()
    x = torch.rand(3, 3, 4, 4)
    per_sample = torch.tensor([4, 0, 2])
    expected = torch.stack([w_of(m, c) for c in per_sample.tolist()])
    assert torch.equal(salience.vanilla(m, x, per_sample, reduce=None), expected)
    assert torch.equal(salience.vanilla(m, x, [4, 0, 2], reduce=None), expected)
    assert torch.equal(salience.vanilla(m, x, np.int64(3), reduce=None), w_of(m, 3).expand(3, 3, 4, 4))
    assert torch.equal(salience.vanilla(m, x, torch.tensor(1), reduce=None), w_of(m, 1).expand(3, 3, 4, 4))


def test_multilabel_is_sum_of_scores():
    m = linear()
    x = torch.rand(2, 3, 4, 4)
    g = salience.vanilla(m, x, targets.multilabel([1, 3]), reduce=None)
    assert torch.allclose(g, w_of(m, 1, 3).expand(2, 3, 4, 4))
    per = salience.vanilla(m, x, targets.multilabel(torch.tensor([[0, 1], [2, 4]])), reduce=None)
    assert torch.allclose(per[0], w_of(m, 0, 1)) and torch.allclose(per[1], w_of(m, 2, 4))
    with pytest.raises(SalienceError, match="out of range"):
        salience.vanilla(m, x, targets.multilabel([1, 7]))
    with pytest.raises(SalienceError, match="non-empty list"):
        targets.multilabel([])


def test_regression_increase_decrease_maintain():
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    x = torch.rand(2, 3, 4, 4)
    w = reg[1].weight[1].view(3, 4, 4)
    inc = salience.vanilla(reg, x, targets.regression(1, "increase"), reduce=None)
    dec = salience.vanilla(reg, x, targets.regression(1, "decrease"), reduce=None)
    keep = salience.vanilla(reg, x, targets.regression(1, "maintain"), reduce=None)
    assert torch.equal(inc, w.expand_as(inc))
    assert torch.equal(dec, -w.expand_as(dec))
    assert torch.allclose(keep, 1 / (w.abs() + torch.finfo(w.dtype).eps).expand_as(keep))
    # maintain highlights the least sensitive pixel: where |w| is smallest, the map is largest
    assert keep[0].argmax() == w.abs().argmin()
    with pytest.raises(SalienceError, match="increase, decrease, maintain"):
        targets.regression(0, "grow")
    with pytest.raises(SalienceError, match="regression output 2 is out of range"):
        salience.vanilla(reg, x, targets.regression(2))


def test_regression_on_single_output_model():
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Flatten(), nn.Linear(48, 1), nn.Flatten(0))  # output (B,)
    x = torch.rand(2, 3, 4, 4)
    g = salience.vanilla(reg, x, targets.regression(0), reduce=None)
    assert torch.equal(g, reg[1].weight[0].view(3, 4, 4).expand_as(g))


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1, bias=False)
        self.block = nn.Sequential(nn.Conv2d(4, 5, 1, bias=False))
        # appended to in place: a ForwardLog, which the guard leaves as the passes left it (it puts back a plain
        # list's contents: the assertion that the forward stops at the target could not fail)
        self.calls_after: list = ForwardLog()
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.block(self.conv1(x))
        self.calls_after.append(1)
        return self.head(h.mean((2, 3)))


def test_activation_target_is_mean_filter_activation_and_stops_forward():
    torch.manual_seed(0)
    m = TwoConv()
    x = torch.rand(2, 3, 4, 4)
    # mean over H, W of a 1x1 conv channel c: grad = W_c / (H*W) at every pixel
    for layer in ("conv1", m.conv1):
        g = salience.vanilla(m, x, targets.activation(layer, 2), reduce=None)
        assert torch.allclose(g, (m.conv1.weight[2, :, 0, 0] / 16).view(1, 3, 1, 1).expand(2, 3, 4, 4))
    # dotted name of a nested layer: composition of the two 1x1 convs
    g = salience.vanilla(m, x, targets.activation("block.0", 4), reduce=None)
    w = (m.block[0].weight[4, :, 0, 0] @ m.conv1.weight[:, :, 0, 0]) / 16
    assert torch.allclose(g, w.view(1, 3, 1, 1).expand(2, 3, 4, 4))
    assert not m.calls_after, "the forward pass should stop at the target layer"


def test_activation_target_errors():
    m = TwoConv()
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(SalienceError, match=r"no layer named 'conv2'; did you mean 'conv1'"):
        salience.vanilla(m, x, targets.activation("conv2", 0))
    with pytest.raises(SalienceError, match=r"channel 4 is out of range .* 4 channels \(valid: 0..3\)"):
        salience.vanilla(m, x, targets.activation("conv1", 4))
    with pytest.raises(SalienceError, match="not a submodule"):
        salience.vanilla(m, x, targets.activation(nn.Conv2d(3, 4, 1), 0))

    class Unused(TwoConv):
        def __init__(self):
            super().__init__()
            self.spare = nn.Conv2d(3, 3, 1)

    with pytest.raises(SalienceError, match="was not called"):
        salience.vanilla(Unused(), x, targets.activation("spare", 0))


def test_custom_function_and_loss():
    m = linear()
    x = torch.rand(2, 3, 4, 4)
    g = salience.vanilla(m, x, lambda out: out[:, 0] - out[:, 1], reduce=None)
    assert torch.allclose(g, (w_of(m, 0) - w_of(m, 1)).expand(2, 3, 4, 4))
    y = torch.tensor([2, 3])
    loss = salience.vanilla(m, x, targets.custom(lambda out: nn.functional.cross_entropy(out, y, reduction="sum")), reduce=None)
    p = torch.softmax(m(x), 1)
    onehot = nn.functional.one_hot(y, 5).float()
    expected = ((p - onehot) @ m[1].weight).view(2, 3, 4, 4)
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(SalienceError, match=r"one score per sample, shape \(2,\)"):
        salience.vanilla(m, x, lambda out: out)


def test_custom_target_on_a_layer():
    torch.manual_seed(0)
    m = TwoConv()
    x = torch.rand(1, 3, 4, 4)
    g = salience.vanilla(m, x, targets.custom(lambda a: a[:, 1, 0, 0], layer="conv1"), reduce=None)
    expected = torch.zeros(1, 3, 4, 4)
    expected[0, :, 0, 0] = m.conv1.weight[1, :, 0, 0]
    assert torch.allclose(g, expected)


@pytest.mark.parametrize("bad", [1.5, "cat", True, torch.tensor([0.5]), torch.zeros(2, 2, 2, dtype=torch.long),
                                 torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 2)])
def test_bad_targets(bad):
    with pytest.raises(SalienceError):
        salience.vanilla(linear(), torch.rand(2, 3, 4, 4), bad)


def test_class_target_needs_2d_output():
    class Seg(nn.Module):
        def forward(self, x):
            return x * 2  # (B, C, H, W)

    with pytest.raises(SalienceError, match=r"\(B, K\).*custom target"):
        salience.vanilla(Seg(), torch.rand(1, 3, 4, 4), 0)


def test_regression_maps_keep_the_direction():
    """Reduced maps: increase = max_c of the gradient's positive part, decrease = the same of the
    negated gradient (keras-vis keeps the sign), maintain = max_c |1/g|; increase and decrease differ."""
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.rand(2, 3, 6, 6)
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(reg(x_)[:, 1].sum(), x_)  # the raw gradient of output 1, by hand
    inc = salience.vanilla(reg, x, targets.regression(1, "increase"))
    dec = salience.vanilla(reg, x, targets.regression(1, "decrease"))
    keep = salience.vanilla(reg, x, targets.regression(1, "maintain"))
    torch.testing.assert_close(inc, g.clamp(min=0).amax(1))
    torch.testing.assert_close(dec, (-g).clamp(min=0).amax(1))
    torch.testing.assert_close(keep, (1 / (g.abs() + torch.finfo(g.dtype).eps)).amax(1))
    assert not torch.allclose(inc, dec)
    # Integrated gradients' default grayscale map: the positive part of the attributions, summed.
    ig_inc = salience.integrated_gradients(reg, x, targets.regression(1, "increase"), steps=4)
    ig_raw = salience.integrated_gradients(reg, x, targets.regression(1, "increase"), steps=4, reduce=None)
    torch.testing.assert_close(ig_inc, ig_raw.clamp(min=0).sum(1))
    # SmoothGrad averages the signed gradients, then takes the direction's part.
    sg = salience.smoothgrad(reg, x, targets.regression(1, "decrease"), samples=3, seed=2)
    sg_raw = salience.smoothgrad(reg, x, targets.regression(1, "decrease"), samples=3, seed=2, reduce=None)
    torch.testing.assert_close(sg, sg_raw.clamp(min=0).amax(1))


@pytest.mark.parametrize("name", ["vanilla", "smoothgrad", "occlusion", "rise", "scorecam"])
def test_numpy_label_arrays_are_class_targets(name):
    """Labels as a numpy array (a dataset's labels, ``np.argmax`` of logits): ``(B,)`` is one class per
    image and ``(B, K)`` K targets, as the same tensor. A 1-D array raised a raw "TypeError: only
    0-dimensional arrays can be converted to Python scalars" (numpy's ``__index__``)."""
    m = linear()
    x = torch.rand(3, 3, 4, 4)
    fn = salience.METHODS[name]
    opts = {"smoothgrad": dict(samples=2), "occlusion": dict(window=2), "rise": dict(masks=4, cell=2)}.get(name, {})
    if name == "scorecam":  # a layer with channels to mask with
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5))
        opts = dict(layer=m[1])
    labels = np.array([4, 0, 2])
    torch.testing.assert_close(fn(m, x, labels, **opts), fn(m, x, torch.tensor([4, 0, 2]), **opts))
    pairs = np.array([[4, 1], [0, 0], [2, 3]])
    torch.testing.assert_close(fn(m, x, pairs, **opts), fn(m, x, torch.from_numpy(pairs), **opts))
    if name == "vanilla":  # the closed form of a linear model
        assert torch.equal(fn(m, x, labels, reduce=None), torch.stack([w_of(m, c) for c in (4, 0, 2)]))
    with pytest.raises(SalienceError, match="integer class indices"):
        fn(m, x, np.array([4.0, 0.0, 2.0]), **opts)


def test_a_layer_target_on_a_torchscript_submodule_is_refused_by_name():
    """A Python model holding a scripted backbone: a layer target on it (or inside it) cannot be hooked.
    It raised torch's raw "register_forward_hook is not supported on ScriptModules"; and the CAMs' default
    layer search, which cannot look inside it, said only that it found no layer."""
    backbone = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))
    m = nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 3, 8, 8)
    for layer in ("0", "0.0", backbone):
        with pytest.raises(SalienceError, match=r"the layer '0(\.0)?' is a TorchScript module, which does not "
                                                r"support forward hooks"):
            salience.vanilla(m, x, targets.activation(layer, 1))
    with pytest.raises(SalienceError, match=r"found no layer with a 4-D map.*its submodule '0' is TorchScript"):
        salience.gradcam(m, x, 0)
    assert salience.vanilla(m, x, 0).shape == (2, 8, 8)  # what needs no hook works
