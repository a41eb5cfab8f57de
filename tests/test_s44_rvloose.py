"""Review of session 44's loose ends (merge 774cc5a).

fold_batchnorm and an autocast block that the trace never enters: ``torch.fx`` traces the forward outside any
autocast, but the folded copy runs the passes under one (``precision="bf16"`` and ``"bf16-mixed"``). A float32
island that a forward takes only under an autocast (``if torch.is_autocast_enabled(): with torch.autocast(...,
enabled=False): ...``, or a custom autograd function under ``torch.amp.custom_fwd(cast_inputs=torch.float32)``, which
disables autocast for its body only when autocast is on) was traced down its no-autocast branch, none of it seen: the
copy ran the island in bf16 and the maps were off, with no warning. The trace is now made under the passes' autocast
too, and a forward whose graph depends on the autocast is not folded."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import salience
from salience._core import folding
from test_s44_loose_fold_autocast import Island as _Stem


class _ToFp32(torch.autograd.Function):
    """``x @ w.T + b`` in float32 whatever the autocast (what ``custom_fwd(cast_inputs=...)`` is for)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        return x @ w.t() + b

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ w, None, None


class Island(_Stem):
    """session 44's conv + BatchNorm stem, float32 island (a bias of 1000: in bf16 its output's step is 4, the signal
    below it rounded away) and head, the island taken only when an autocast is on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        if self.spelling == "custom_fwd":
            h = _ToFp32.apply(h, self.fc.weight, self.fc.bias)
        elif torch.is_autocast_enabled("cpu"):  # the island only where there is an autocast to leave
            with torch.autocast("cpu", enabled=False):
                h = self.fc(h.float())
        else:
            h = self.fc(h)
        return self.head(h - 1000.0)


X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
SPELLINGS = ["is_autocast_enabled", "custom_fwd"]


def _rise(model, precision, fold):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with salience.performance(fold_batchnorm=fold):
            out = salience.rise(model, X, 1, masks=32, seed=0, precision=precision)
    return out, [str(w.message) for w in caught if str(w.message).startswith("fold_batchnorm")]


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_island_taken_only_under_autocast_is_not_folded(spelling, precision):
    model = Island(spelling)
    ref, _ = _rise(model, precision, False)
    out, notes = _rise(model, precision, True)
    # 774cc5a: off by 4e-3 (is_autocast_enabled), 3e-5 (custom_fwd) of maps about 0.4, and no warning
    assert torch.equal(out, ref), (spelling, precision, (out - ref).abs().max())
    assert any("running the model as it is" in n for n in notes), notes


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_island_is_float32_under_autocast(spelling):
    """What the test above rests on: under a bf16 autocast the model's island differs from the same model run in
    bf16 all through (what the folded copy ran) by far more than rounding."""
    model = Island(spelling)

    class Dropped(Island):
        def forward(self, x):
            return self.head(self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3))) - 1000.0)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(X).float(), Dropped(spelling)(X).float()
    assert (a - b).abs().max() > 0.01, (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_fold_refuses_a_forward_that_reads_the_autocast(spelling, dtype):
    made = folding._fold(Island(spelling), dtype)
    # custom_fwd casts its arguments only under an autocast, which a trace's proxies cannot go through: a trace error
    assert isinstance(made, str) and ("autocast" if spelling == "is_autocast_enabled" else "cannot trace") in made, made
    # the autocast the trace ran under is left, also after that error
    assert not torch.is_autocast_enabled("cpu") and folding._autocast_state() == (0, (False, torch.bfloat16),
                                                                                    (False, torch.float16))
