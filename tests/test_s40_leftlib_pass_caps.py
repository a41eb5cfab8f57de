"""Many-pass counts past :data:`salience._core.engine.MAX_PASSES` (a million passes of each image, integrated
gradients' own ceiling) are refused at once with a ``SalienceError`` naming the count, the cap and why, before any
pass runs or anything is built: ``smoothgrad(samples=10**12)``, ``rise(masks=10**12)``, ``class_model(steps=10**12)``
and occlusion's windows (counted from the window, the stride and the image) ran for ever, and occlusion built two
``(windows, side)`` indicator tensors and looped over every window first (stride 1 on a 4000 px image: 16 million
windows, 256 GB). Each call is guarded by a timer: a hang fails the test, not the suite. The explorer keeps its own
lower cap (100,000)."""
from __future__ import annotations

import contextlib
import signal

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core.engine import MAX_PASSES
from salience.methods import perturbation
from salience.methods.integrated import MAX_STEPS


class _NoPass(nn.Module):
    """A model that must not run: the refusal comes first."""

    def forward(self, x):
        raise AssertionError("a pass ran before the count was refused")


@contextlib.contextmanager
def _within(seconds: float):
    def expired(signum, frame):
        raise TimeoutError(f"not refused within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


X = torch.rand(1, 3, 8, 8)
CALLS = {
    "smoothgrad": (lambda n: salience.smoothgrad(_NoPass(), X, 0, samples=n), "samples"),
    "rise": (lambda n: salience.rise(_NoPass(), X, 0, masks=n), "masks"),
    "class_model": (lambda n: salience.class_model(_NoPass(), 0, shape=(3, 8, 8), steps=n), "steps"),
    "integrated_gradients": (lambda n: salience.integrated_gradients(_NoPass(), X, 0, steps=n), "steps"),
}


def test_the_cap_is_integrated_gradients_ceiling():
    assert MAX_PASSES == MAX_STEPS == 1_000_000


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("n", [MAX_PASSES + 1, 10 ** 12, 10 ** 30])
def test_absurd_counts_are_refused_at_once(name, n):
    call, option = CALLS[name]
    with _within(10), pytest.raises(SalienceError, match=rf"{option}={n}\b.* more than the 1,000,000") as e:
        call(n)
    assert "pass" in str(e.value)


@pytest.mark.parametrize("name", ["smoothgrad", "rise", "class_model"])
def test_the_cap_itself_is_taken(name):
    """At the cap the call is not refused for its count: it gets to the model's first pass."""
    call, _ = CALLS[name]
    with _within(10), pytest.raises(AssertionError, match="a pass ran"):
        call(MAX_PASSES)


@pytest.mark.parametrize("window, stride, side", [(1, 1, 4000), (2, 1, 1200), ((1, 3), (1, 1), 3000)])
def test_occlusion_refuses_too_many_windows_before_building_them(window, stride, side, monkeypatch):
    def built(*args):
        raise AssertionError("the windows were built before the count was refused")

    monkeypatch.setattr(perturbation, "occlusion_windows", built)
    x = torch.zeros(1, 1, side, side)  # 16 MB at most: the image is not the problem, its windows are
    with _within(10), pytest.raises(SalienceError, match=r"windows, more than the 1,000,000 passes") as e:
        salience.occlusion(_NoPass(), x, 0, window=window, stride=stride)
    assert f"on the {side}x{side} image" in str(e.value) and "stride" in str(e.value)


def test_occlusion_windows_are_counted_as_the_map_runs_them():
    """The count refused is the count run: 1000 x 1000 windows of a 1000 px image at stride 1 is the cap, taken (the
    map's first pass is reached, its windows' masks not built for all windows at once: at most a chunk's)."""
    x = torch.zeros(1, 1, 1000, 1000)
    corners, cover = perturbation.occlusion_windows((1000, 1000), (1, 1), (1, 1))
    assert corners.shape == (MAX_PASSES, 2) and torch.equal(cover, torch.ones(1000, 1000))
    with _within(30), pytest.raises(AssertionError, match="a pass ran"):
        salience.occlusion(_NoPass(), x, 0, window=1, stride=1)


@pytest.mark.parametrize("size, window, stride", [((9, 7), (3, 2), (2, 3)), ((16, 16), (4, 4), (4, 4)),
                                                  ((5, 11), (5, 4), (1, 3))])
def test_occlusion_windows_cover_as_before(size, window, stride):
    """Each pixel's count of windows, from the windows one by one (the loop it replaces)."""
    corners, cover = perturbation.occlusion_windows(size, window, stride)
    ref = torch.zeros(size)
    for y, x in corners.tolist():
        ref[y:y + window[0], x:x + window[1]] += 1
    assert torch.equal(cover, ref)


def test_occlusion_maps_are_as_before():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.rand(2, 3, 12, 10)
    got = salience.occlusion(net, x, 1, window=(3, 4), stride=(2, 3), reduce=None)
    ref = torch.zeros(2, 12, 10)
    with torch.no_grad():
        clean = net(x)[:, 1]
        corners, cover = perturbation.occlusion_windows((12, 10), (3, 4), (2, 3))
        for y, c in corners.tolist():
            xo = x.clone()
            xo[:, :, y:y + 3, c:c + 4] = 0
            ref[:, y:y + 3, c:c + 4] += (clean - net(xo)[:, 1])[:, None, None]
    ref = ref / cover.clamp(min=1)
    torch.testing.assert_close(got, ref[:, None].expand(-1, 3, -1, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags", [["--method", "smoothgrad", "--samples", "1000000000000"],
                                   ["--method", "rise", "--rise-masks", "1000000000000"],
                                   ["--method", "occlusion", "--window", "1", "--stride", "1", "--size", "4000"]])
def test_the_command_line_refuses_them_too(flags, tmp_path, capsys):
    """In process (``salience.cli.main``, as ``python -m salience`` runs it): a usage error naming the cap."""
    from PIL import Image

    from salience.cli import main
    from salience.cli.common import EXIT_USAGE

    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(img)
    code = main(["explain", "--model", "demo:shapes", str(img), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "more than the 1,000,000" in err, err[-2000:]


@pytest.mark.parametrize("call", [
    lambda: salience.smoothgrad(_NoPass(), X, 0, method=salience.rise, samples=1000),  # 1000 x RISE's 4000 masks
    lambda: salience.smoothgrad(_NoPass(), X, 0, method=salience.integrated_gradients, samples=10 ** 6, steps=10 ** 6),
    lambda: salience.smoothgrad(_NoPass(), X, 0, method=salience.integrated_gradients, samples=40_000),  # x 32
], ids=["rise_default_masks", "ig_given_steps", "ig_default_steps"])
def test_smoothgrad_of_a_many_pass_method_counts_both(call):
    """Each count within the cap, their product not: refused at once, naming both."""
    with _within(10), pytest.raises(SalienceError, match=r"samples=\d+ of \w+ with (masks|steps)=\d+ is [\d,]+ passes "
                                                          r"of each image, more than the 1,000,000"):
        call()


def test_smoothgrad_of_a_many_pass_method_within_the_cap_runs():
    with _within(10), pytest.raises(AssertionError, match="a pass ran"):
        salience.smoothgrad(_NoPass(), X, 0, method=salience.rise, samples=250)  # 250 x 4000: the cap
