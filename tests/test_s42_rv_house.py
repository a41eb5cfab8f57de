"""Review of session 42's house merge (482cdb7): SmoothGrad's many-pass cap over K targets (``engine.passes_within``
counts the copies and the calls of each apart) and what its refusals say."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_an_inner_smoothgrads_refusal_tells_the_copies_from_the_targets_around_it():
    """A SmoothGrad inside a function (its count hidden from the outer one's signature check) under an outer
    SmoothGrad of 100 copies and 2 targets, a call each: 100 x 2 x 10 x 1,000 = 2,000,000 passes of each image,
    refused by the inner check. It said "within 200 noisy copies of the SmoothGrad around it": the 2 targets'
    calls counted as noisy copies (``outer_passes``, the product), where ``engine.check_copies`` says them apart."""
    def wrapped(model, x, target):
        return salience.smoothgrad(model, x, target, method=salience.rise, samples=10, masks=1000)

    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), torch.tensor([[0, 1]]), method=wrapped, samples=100)
    said = str(e.value)
    assert "2,000,000 passes of each image" in said
    assert "within 100 noisy copies" in said and "200 noisy copies" not in said, said
    assert "for each of 2 targets (a call each)" in said, said


def _slot(size: int = 64):
    from salience._core.info import ModelInfo, attach_info
    from salience.explore import compute

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    attach_info(model, ModelInfo(name="tiny", input_size=(size, size)))
    return compute.ModelSlot("a", model)


@pytest.mark.parametrize("raw, images", [
    ({"method": "rise", "samples": "1000", "masks": "1000"}, "1,001,000"),  # each copy: 1,000 masks and the clean one
    # window 1, stride 1 on the 64 x 64 image: 4,096 windows (within the cap alone) and the clean image, 50 copies
    ({"method": "occlusion", "window": "1", "stride": "1", "samples": "50"}, "204,850"),
])
def test_the_explorer_caps_smoothgrads_copies_times_its_methods_passes(raw, images):
    """The explorer's cap (``EXPLORER_MAX_PASSES``, 100,000 images through the model for a map) counted each option
    alone: SmoothGrad of RISE with 1,000 samples of 1,000 masks (a million passes, ten times the cap) and of occlusion
    with 4,096 windows in 50 copies were taken."""
    from salience.explore import compute

    slot = _slot()
    with pytest.raises(SalienceError) as e:
        compute.check_request(slot, "smoothgrad", 0, raw)
    said = str(e.value)
    assert f"{images} images through the model" in said and "at most 100,000 in the explorer" in said, said


@pytest.mark.parametrize("given", [
    {"samples": 3},  # vanilla, a pass a copy
    {"method": "rise", "samples": 3, "masks": 20},
    {"method": "occlusion", "samples": 2, "window": 16, "stride": 16},
    {"method": "integrated_gradients", "samples": 2, "steps": 5},
])
def test_the_explorers_expected_images_of_smoothgrad_are_those_through_the_model(given):
    """A SmoothGrad job's progress expects the images its map takes through the model (each copy's through its
    inner method), counted here by a forward pre-hook as the job's own ticker counts them; it expected
    ``samples + 1`` (1,001 for RISE's 1,000 masks in 1,000 copies: a bar a thousand times over full)."""
    import functools

    from salience.explore import compute
    from salience.methods import METHODS

    slot = _slot()
    given = {k: METHODS[v] if k == "method" else v for k, v in given.items()}
    x = slot.input(torch.rand(3, 64, 64))
    seen = [0]
    handle = slot.model.register_forward_pre_hook(lambda m, args: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        # counted on a warm call: the first call on a model (a new hook makes it one) also runs the engine's memory
        # probe, a pass thrown away that the job's ticker does not count (engine.discarded; session 45)
        functools.partial(salience.smoothgrad, **given)(slot.model, x, 1)
        seen[0] = 0
        functools.partial(salience.smoothgrad, **given)(slot.model, x, 1)
    finally:
        handle.remove()
    expected = compute._expected_items("smoothgrad", given, x)
    inner = given.get("method")
    # integrated gradients' own count is its steps and the clean image (the explorer's, before): one over, per copy
    assert expected == seen[0] + (given["samples"] if inner is METHODS["integrated_gradients"] else 0), (expected, seen)


def test_the_explorer_takes_a_smoothgrad_within_its_cap():
    from salience.explore import compute
    from salience.methods import METHODS

    slot = _slot()
    given = compute.check_request(slot, "smoothgrad", 0, {"method": "rise", "samples": "99", "masks": "1000"})
    x = torch.zeros(1, 3, 64, 64)
    assert compute._expected_items("smoothgrad", given, x) == 99 * 1001
    # the inner method's default count (RISE's 4,000 masks), SmoothGrad's default 50 copies; occlusion's windows
    assert compute._expected_items("smoothgrad", {"method": METHODS["rise"]}, x) == 50 * 4001
    assert compute._expected_items("smoothgrad", {"method": METHODS["occlusion"], "samples": 2}, x) == 2 * 226
    assert compute._expected_items("smoothgrad", {"method": METHODS["scorecam"]}, x) == 0  # its channels: unknown
