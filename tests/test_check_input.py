"""Every method refuses an input with NaN or infinite values, saying how many (``check_input``, run on
every call: judged from the batch's least and greatest value, not a boolean tensor of its size)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core.autograd import check_input


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_input_refuses_each_non_finite_value_wherever_it_is(dtype):
    x = torch.zeros(3, 2, 5, 7, dtype=dtype)
    assert check_input(x) is x
    for where, bad in [((0, 0, 0, 0), float("nan")), ((2, 1, 4, 6), float("inf")), ((1, 0, 2, 3), -float("inf")),
                       ((2, 1, 4, 5), float("nan"))]:
        y = torch.rand(3, 2, 5, 7).to(dtype) * 100 - 50
        y[where] = bad
        with pytest.raises(SalienceError, match=r"^x contains 1 NaN or infinite values; saliency needs finite input$"):
            check_input(y)
    y = torch.rand(3, 2, 5, 7).to(dtype)
    y[0, 0, 0, :3] = float("nan")
    y[2, 1] = float("inf")
    with pytest.raises(SalienceError, match=r"^x contains 38 NaN or infinite values"):  # 3 + 5 * 7
        check_input(y)
    big = torch.full((1, 1, 2, 2), torch.finfo(dtype).max, dtype=dtype)
    big[0, 0, 0, 0] = torch.finfo(dtype).min
    assert check_input(big) is big  # the largest finite values are finite
    assert check_input(torch.zeros(2, 0, 4, 4, dtype=dtype)).shape == (2, 0, 4, 4)  # no value: nothing to refuse


def test_a_method_refuses_a_batch_with_one_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(4, 3, 16, 16)
    assert torch.isfinite(salience.vanilla(model, x, 0)).all()
    x[3, 2, 15, 15] = float("nan")
    with pytest.raises(SalienceError, match="x contains 1 NaN or infinite values"):
        salience.vanilla(model, x, 0)
