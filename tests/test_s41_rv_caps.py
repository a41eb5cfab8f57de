"""Review of the session-41 caps (``git diff 377afcd 98bc521``): a SmoothGrad inside SmoothGrad counted with the
keywords its ``functools.partial`` hands on to its method; the evaluation's ``n`` as numpy's int64 capped too; RISE,
occlusion and integrated gradients inside a function SmoothGrad cannot see through counted by the copies around them;
the outer count thread-local and back to 1 after an interrupt."""
import functools
import threading

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine
from salience.evidence import evaluate
from test_s41_caps import _Counted  # 8 channels, a linear head; more than `limit` passes: an AssertionError


# ----------------------------------------------------------------------------- a partial's keywords for its method


def test_an_inner_smoothgrad_is_counted_with_the_masks_its_partial_hands_to_rise():
    # 200 x 100 x 100 = 2,000,000: it said "rise with masks=4000" (RISE's default) and 80,000,000
    inner = functools.partial(salience.smoothgrad, method=salience.rise, masks=100, samples=100)
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_Counted(limit=0), torch.rand(1, 3, 8, 8), 0, method=inner, samples=200)
    assert "samples=200 of smoothgrad with samples=100 of rise with masks=100 is 2,000,000 passes" in str(e.value)


def test_an_inner_smoothgrad_with_few_masks_bound_is_not_refused():
    # 300 x 2 x 2 = 1,200 passes of the image; counted with RISE's default 4,000 masks it was 2,400,000, refused
    torch.manual_seed(0)
    inner = functools.partial(salience.smoothgrad, method=salience.rise, masks=2, samples=2, reduce=None)
    out = salience.smoothgrad(_Counted(limit=10_000), torch.rand(1, 3, 8, 8), 0, method=inner, samples=300)
    assert out.shape == (1, 8, 8) and bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- the evaluation's n as numpy's int


def test_a_numpy_n_past_int64_products_is_refused(monkeypatch):
    # np.int64(2**62) x 64 x 64 wrapped to 0 pixels: let through to draw 2**62 shapes images
    monkeypatch.setattr(evaluate.data, "shapes_batch", lambda *a, **k: 1 / 0)
    with pytest.raises(SalienceError, match=r"n=4.61e\+18 held-out shapes images of 64x64 .*give n at most 12,207"):
        evaluate.check_images(np.int64(2 ** 62), (64, 64), "held-out shapes images")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    with pytest.raises(SalienceError, match="give n at most 12,207"):
        evaluate.evaluation_input(model, n=np.int64(2 ** 62))


def test_one_image_past_the_cap_is_not_told_to_give_n_at_most_0():
    with pytest.raises(SalienceError) as e:
        evaluate.check_images(1, (8000, 8000), "held-out shapes images")
    assert "at most 0" not in str(e.value)
    assert "one of the held-out shapes images is 8000x8000, 64,000,000 pixels" in str(e.value)
    assert "give smaller images" in str(e.value)


# ----------------------------------------------------------------------------- a many-pass method in a function


def _hidden(method, **bound):
    """``method`` inside a function whose signature shows nothing of its count."""
    def wrapped(model, x, target, **kw):
        return method(model, x, target, **bound)
    return wrapped


@pytest.mark.parametrize("method, bound, samples, said", [
    (salience.rise, {"masks": 2000}, 1000, "RISE's 2,000 masks in each of 1,000 noisy copies"),
    (salience.occlusion, {"window": 1, "stride": 1}, 4000, "occlusion's 256 windows in each of 4,000 noisy copies"),
    (salience.integrated_gradients, {"steps": 2000}, 1000, "integrated gradients' 2,000 steps in each of 1,000 noisy"),
])
def test_a_many_pass_method_inside_a_function_is_counted_by_the_copies_around_it(method, bound, samples, said):
    model = _Counted(limit=40)  # over 1,000,000 passes of the image ran on before (the model's 41st pass stops them)
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(model, torch.rand(1, 3, 16, 16), 0, method=_hidden(method, chunk=8, **bound),
                            samples=samples, chunk=1)  # small passes: before, they ran until the 41st
    assert said in str(e.value) and "passes of each image" in str(e.value)
    assert model.calls[0] <= 3


def test_a_many_pass_method_inside_a_function_within_the_cap_runs_as_before():
    torch.manual_seed(0)
    model, x = _Counted(limit=10_000), torch.rand(1, 3, 8, 8)
    got = salience.smoothgrad(model, x, 0, method=_hidden(salience.rise, masks=4, seed=1), samples=3, noise=0.0)
    torch.testing.assert_close(got, salience.rise(model, x, 0, masks=4, seed=1))  # samples of noise 0: RISE itself


def test_rise_alone_is_checked_as_before():
    with pytest.raises(SalienceError, match=r"masks=2000000 is more than the 1,000,000"):
        salience.rise(_Counted(limit=0), torch.rand(1, 3, 8, 8), 0, masks=2_000_000)


# ----------------------------------------------------------------------------- the outer count's state


def test_the_outer_count_is_back_to_one_after_an_interrupt():
    def interrupted(model, x, target, **kw):
        assert engine.outer_passes() == 7
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        salience.smoothgrad(_Counted(), torch.rand(1, 3, 8, 8), 0, method=interrupted, samples=7)
    assert engine.outer_passes() == 1


def test_the_outer_count_is_the_threads_own():
    seen = []
    with engine.passes_within(1000):
        t = threading.Thread(target=lambda: seen.append(engine.outer_passes()))
        t.start()
        t.join()
        assert engine.outer_passes() == 1000
    assert seen == [1]
