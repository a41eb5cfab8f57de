"""Review of the merge of wt-leftlib-s40 (9da0435): occlusion's coverage counted per row and column (a window that
starts past the image, stride > window + 1, was an IndexError); SmoothGrad's precision / memory_format / compile
not given over a wrapped method's own (a functools.partial binding them); SmoothGrad of occlusion counting samples
times windows; DEFAULT_MAX_PIXELS's docstring."""
from __future__ import annotations

import ast
import functools
import inspect
import itertools

import pytest
import torch
from torch import nn

import salience
from salience.methods.perturbation import occlusion_windows


def _brute_cover(size, window, corners):
    """The old loop: every window's pixels (clipped to the image) counted."""
    cover = torch.zeros(size)
    for y, x in corners.tolist():
        cover[y:y + window[0], x:x + window[1]] += 1
    return cover


def test_occlusion_coverage_counts_every_window_when_the_stride_leaves_the_last_window_past_the_image():
    # side 5, window 1, stride 3: windows start at 0, 3, 6; the one at 6 covers no pixel (was an IndexError)
    for h, w in [(5, 7), (9, 4), (23, 17)]:
        for wh, ww, sh, sw in itertools.product((1, 2, 3, h), (1, 2, w), (1, 2, 3, 4, h), (1, 3, 4, w)):
            if wh > h or sh > h:
                continue
            corners, cover = occlusion_windows((h, w), (wh, ww), (sh, sw))
            assert torch.equal(cover, _brute_cover((h, w), (wh, ww), corners)), (h, w, wh, ww, sh, sw)


def test_occlusion_with_a_stride_more_than_one_past_the_window_runs_and_matches_a_hand_occlusion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(1, 3, 11, 7)
    got = salience.occlusion(model, x, target=1, window=2, stride=4, baseline=0.0)  # rows start 0,4,8,12: 12 > 11
    with torch.no_grad():
        full = model(x)[0, 1]
        total, count = torch.zeros(11, 7), torch.zeros(11, 7)
        for y, c in itertools.product(range(0, 13, 4), range(0, 9, 4)):
            xo = x.clone()
            xo[..., y:y + 2, c:c + 2] = 0
            total[y:y + 2, c:c + 2] += full - model(xo)[0, 1]
            count[y:y + 2, c:c + 2] += 1
    want = torch.where(count > 0, total / count.clamp_min(1), torch.zeros(()))
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)


def test_smoothgrad_does_not_override_a_precision_bound_to_the_wrapped_method():
    # functools.partial(integrated_gradients, precision="fp32") (method_options binds the same way) is the user's
    # choice for the inner passes: SmoothGrad's precision="bf16" went to it all the same, the map was bf16's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 5)).eval()
    x = torch.rand(2, 3, 16, 16)
    dtypes: list = []
    model[0].register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    fp32_ig = functools.partial(salience.integrated_gradients, precision="fp32")
    got = salience.smoothgrad(model, x, 1, method=fp32_ig, samples=3, seed=3, steps=4, precision="bf16")
    assert torch.bfloat16 not in dtypes
    want = salience.smoothgrad(model, x, 1, method=salience.integrated_gradients, samples=3, seed=3, steps=4)
    assert torch.equal(got, want)


def test_the_image_size_constants_keep_their_docstrings():
    # MAX_INPUT_PIXELS was put between DEFAULT_MAX_PIXELS and its docstring, which ended up dead code after _count
    from salience._core import tensors
    from salience.loading import images

    body = ast.parse(inspect.getsource(images)).body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            docs[node.targets[0].id] = (after.value.value if isinstance(after, ast.Expr)
                                        and isinstance(after.value, ast.Constant) else None)
    assert "load_image" in (docs["DEFAULT_MAX_PIXELS"] or "")
    assert "model's input size" in (docs["MAX_INPUT_PIXELS"] or "")
    for fn in ast.walk(ast.parse(inspect.getsource(tensors.count_text))):
        if isinstance(fn, ast.FunctionDef):
            assert len(fn.body) == 2  # its docstring and its return: no stray string after it


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


def test_smoothgrad_of_occlusion_counts_samples_times_windows():
    # 50 samples x 50,176 windows (window 1, stride 1 on 224 px) = 2,508,800 passes an image: each count alone was
    # within the cap, their product ran (42 minutes an image at 1 ms a pass)
    x = torch.zeros(1, 3, 224, 224)
    for method, kw in [(salience.occlusion, {"window": 1, "stride": 1}),
                       (functools.partial(salience.occlusion, window=1, stride=1), {})]:
        with pytest.raises(salience.SalienceError, match=r"samples=50 of occlusion with 50,176 windows .* is 2,508,800 "
                                                         r"passes of each image, more than the 1,000,000"):
            salience.smoothgrad(_NoPass(), x, 0, method=method, **kw)
    with pytest.raises(AssertionError, match="a pass ran"):  # 50 x 3,136 windows: taken
        salience.smoothgrad(_NoPass(), x, 0, method=salience.occlusion, window=4, stride=4)
