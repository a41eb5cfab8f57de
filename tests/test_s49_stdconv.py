"""Session 49: timm's StdConv2d (its weight standardised in each forward) under salience's channels-last passes.

The forward makes its weight from the parameter each call (``F.batch_norm`` of ``weight.reshape(1, out, -1)``): with
the parameter made channels-last by the run (``Run.set_layout``) the reshape copies it to a contiguous weight, which
the convolution gets beside a channels-last input. The maps must be the contiguous passes' (within float rounding) and
the passes must stay channels-last (the convolution's output too: no silent fall back to the contiguous kernels).
Speed: benchmarks/stdconv-cl-s49.txt (the forward alone).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import salience

try:
    from timm.layers import StdConv2d
except ImportError:  # the same module as timm's (timm.layers.std_conv.StdConv2d, timm 1.0)
    class StdConv2d(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1, eps=1e-6):
            super().__init__(cin, cout, k, stride=stride, padding=((stride - 1) + (k - 1)) // 2, bias=False)
            self.eps = eps

        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.,
                             eps=self.eps).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BiTLike(nn.Module):
    """StdConv2d and GroupNorm, as BiT's ResNet-V2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.n1 = StdConv2d(3, 16, 3, stride=2), nn.GroupNorm(4, 16)
        self.b, self.n2 = StdConv2d(16, 32, 3), nn.GroupNorm(4, 32)
        self.c = StdConv2d(32, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.n1(self.a(x)))
        x = torch.relu(self.n2(self.b(x)))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


CALLS = {
    "smoothgrad": lambda m, x, t: salience.smoothgrad(m, x, t, samples=6, seed=0),
    "occlusion": lambda m, x, t: salience.occlusion(m, x, t, window=8, stride=4),
    "rise": lambda m, x, t: salience.rise(m, x, t, masks=16, cell=4),
    "scorecam": lambda m, x, t: salience.scorecam(m, x, t, layer="b"),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_stdconv_maps_channels_last_equal_contiguous(method):
    m = BiTLike().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 3])
    weights = [p.detach().clone() for p in m.parameters()]
    with salience.performance(memory_format="contiguous"):
        want = CALLS[method](m, x, t)
    layouts = []
    hook = m.b.register_forward_hook(lambda mod, i, o: layouts.append(
        (i[0].is_contiguous(memory_format=torch.channels_last), o.is_contiguous(memory_format=torch.channels_last))))
    with salience.performance(memory_format="channels_last"):
        got = CALLS[method](m, x, t)
    hook.remove()
    # float32 rounding of other kernels: about 1e-7 of the map's largest value (measured 2e-10 to 7e-6 relative)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the layer ran channels-last in the passes, in and out (gradient passes: the layer's output in the forward)
    assert (True, True) in layouts, layouts
    assert all(o for i, o in layouts if i), layouts  # a channels-last input never gave a contiguous output
    # the user's parameters come back as they were: values and layout
    for p, w in zip(m.parameters(), weights):
        assert torch.equal(p, w) and p.is_contiguous()
