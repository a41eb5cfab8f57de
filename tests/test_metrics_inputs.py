"""What the metrics do with inputs they cannot use: a model that cannot take ``x`` (issue: the metrics'
own model calls raised the model's raw RuntimeError), an image too small for the blurred substrate,
and one scale of probabilities per metric call."""
from __future__ import annotations

import re

import pytest
import torch

from salience import SalienceError
from salience import evidence as M
from salience.cli import main
from salience.evidence import evaluate

from conftest import SmallCNN, unchanged


def _maps(x: torch.Tensor) -> torch.Tensor:
    return torch.rand(x.shape[0], *x.shape[-2:], generator=torch.Generator().manual_seed(0))


# Every public function of salience.evidence that calls a model, with a target given (where the
# metrics ran the model without salience's rule) and with the predicted class (where they did not).
CALLS = {
    "deletion": lambda m, x, t: M.deletion(m, x, _maps(x), t, steps=2),
    "insertion": lambda m, x, t: M.insertion(m, x, _maps(x), t, steps=2),
    "deletion_curves": lambda m, x, t: M.deletion_curves(m, x, _maps(x), t, steps=2),
    "insertion_curves": lambda m, x, t: M.insertion_curves(m, x, _maps(x), t, steps=2),
    "faithfulness_correlation": lambda m, x, t: M.faithfulness_correlation(m, x, _maps(x), t, subsets=2),
    "road": lambda m, x, t: M.road(m, x, _maps(x), t, fractions=(0.5,)),
    "road_curves": lambda m, x, t: M.road_curves(m, x, _maps(x), t, fractions=(0.5,)),
    "max_sensitivity": lambda m, x, t: M.max_sensitivity(m, x, "vanilla", t, samples=1),
    "randomization": lambda m, x, t: M.randomization(m, x, "vanilla", t),
    "randomization_layers": lambda m, x, t: M.randomization_layers(m, x),
    "random_logit": lambda m, x, t: M.random_logit(m, x, "vanilla", t),
    "data_randomization": lambda m, x, t: M.data_randomization(lambda i, y: m, x, torch.arange(x.shape[0]), x,
                                                               "vanilla", t),
    "evaluate_methods": lambda m, x, t: evaluate.evaluate_methods(m, x, methods=["vanilla"], steps=2,
                                                                  baselines=False),
}


@pytest.mark.parametrize("target", [0, None])
@pytest.mark.parametrize("name", list(CALLS))
def test_a_model_that_cannot_take_x_is_a_clear_error_from_every_metric(name, target):
    """RGBA images into a 3-channel model: every metric raises the SalienceError the methods raise
    (salience._core.autograd.model_call: the input's shape, the channels the model takes, the
    conversion), the model's own error kept as the cause, the model unchanged. Deletion, insertion,
    ROAD and faithfulness correlation with a target given, and the randomization test's layer probe,
    raised the raw "expected input[6, 4, 8, 8] to have 3 channels" from inside the model before."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(2, 4, 8, 8)
    with unchanged(model), pytest.raises(SalienceError) as info:
        CALLS[name](model, x, target)
    msg = str(info.value)
    assert re.search(r"\((1|2), 4, 8, 8\)", msg) and "takes 3 channels" in msg and "x[:, :3]" in msg, msg
    assert isinstance(info.value.__cause__, RuntimeError) and "\n" not in msg


@pytest.mark.parametrize("name", ["deletion", "faithfulness_correlation", "road", "randomization_layers"])
def test_a_vit_given_another_size_is_a_clear_error_from_the_metrics(name):
    """A ViT whose position embedding fixes its input size, given 32 x 32 images where it takes
    24 x 40: the metrics' own passes name the size it takes (a raw "must match the size of tensor"
    before)."""
    from tiny_vit import TinyViT

    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    model = attach_info(TinyViT(), ModelInfo(input_size=(24, 40)))
    with unchanged(model), pytest.raises(SalienceError, match=r"\(2, 3, 32, 32\).*takes 24 x 40 images"):
        CALLS[name](model, torch.rand(2, 3, 32, 32), 0)
