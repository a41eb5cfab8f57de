"""Review of session 46's issue-15 memory merge (8c445e6): what a model that draws random numbers in its forward
sees of the extra passes the merge added (the capture's rerun where the layer's output was changed in place after
it, ``clean_batch``'s memory probe pass under ``max_memory``)."""
from __future__ import annotations

import torch
from torch import nn

from salience._core import perf as _perf
from salience.methods.perturbation import clean_batch
from salience.methods.scorecam import _capture


class _Noisy(nn.Module):
    """Noise added to the input in its forward (eval mode too), an in-place ReLU after ``conv``: its output is changed
    in place after the layer returns (the capture then runs the pass again, with a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.1 * torch.randn_like(x)
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def _model_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Noisy().eval(), torch.randn(2, 3, 8, 8)


def test_capture_rerun_gives_one_passs_values_and_random_numbers():
    # reference: one plain forward under the same seed, the layer's output copied as it returned
    model, x = _model_and_input()
    kept: list = []
    handle = model.conv.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()))
    torch.manual_seed(1)
    with torch.no_grad():
        ref_out = model(x)
    after_ref = torch.get_rng_state()
    handle.remove()
    torch.manual_seed(1)
    acts, out = _capture(model, x, model.conv, True)
    assert torch.equal(acts, kept[0]) and torch.equal(out, ref_out)  # the merge: the rerun's own draws
    # the generators as one pass leaves them (the call's later passes draw what a plain loop's would)
    assert torch.equal(torch.get_rng_state(), after_ref)


def test_clean_batch_memory_probe_leaves_the_generators_as_they_were():
    model, x = _model_and_input()
    torch.manual_seed(1)
    before = torch.get_rng_state()
    assert clean_batch(x, _perf.Performance(), None, 10 ** 9, model, True) == 2  # a budget that fits both images
    assert torch.equal(torch.get_rng_state(), before)  # the merge: the probe's pass drew from them


def test_scorecam_blank_channels_take_a_target_that_changes_its_output_in_place():
    """The blank channels' scores (one zero image for all, session 46) were read off an expanded view of its output,
    where a target's in-place operation raised torch's RuntimeError: each image's row is its own again. Against the
    paper's formula, one row per channel (zeros for a constant channel's mask), softmax over the channels."""
    import torch.nn.functional as F

    import salience

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = -1  # channel 0 is 0 after the ReLU on every image: a blank mask
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def target(out: torch.Tensor) -> torch.Tensor:
        out.mul_(2).add_(1)  # changes the rows it is given
        return out[:, 1]

    ours = salience.scorecam(model, x, target, layer=model[1], softmax="channels")
    with torch.no_grad():
        acts = model[1](model[0](x))
        ref = []
        for b in range(2):
            up = F.interpolate(acts[b].unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
            lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
            masks = torch.where(hi > lo, (up - lo) / (hi - lo), torch.zeros_like(up))
            assert not bool((hi > lo)[0]) and bool((hi > lo)[1:].all())  # channel 0 blank, the rest live
            s = model(x[b:b + 1] * masks)[:, 1] * 2 + 1
            ref.append(torch.einsum("k,khw->hw", s.softmax(0), F.interpolate(
                acts[b:b + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]).clamp(min=0))
    torch.testing.assert_close(ours, torch.stack(ref), rtol=1e-5, atol=1e-6)


class _ShiftsItsInput(_Noisy):
    """Changes its input in place in its forward (``x -= 0.5``, no noise), an in-place ReLU after ``conv``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.5)
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def test_capture_refuses_to_run_again_on_an_input_the_model_changed_in_place():
    """The capture's rerun (its layer's output changed in place after it) ran on the input the first pass had changed:
    the layer's values of ``x - 1``, not ``x - 0.5`` (a plain loop's), and the user's ``x`` shifted twice."""
    import pytest

    from salience import SalienceError

    torch.manual_seed(0)
    model, x = _ShiftsItsInput().eval(), torch.rand(2, 3, 8, 8)
    mine = x.clone()
    with pytest.raises(SalienceError, match="changed its input in place"):
        _capture(model, mine, model.conv, True)
    assert torch.equal(mine, x - 0.5)  # one pass's change, as a plain loop's
    # the layer's own output, not changed after it: no rerun, the values of one pass
    torch.manual_seed(0)
    model, x = _ShiftsItsInput().eval(), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model.relu(model.conv(x - 0.5))
    acts, _ = _capture(model, x.clone(), model.relu, True)
    assert torch.equal(acts, ref)
