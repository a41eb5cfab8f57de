"""The caps on a call's work, where session 40 left gaps: every level of SmoothGrad inside SmoothGrad is counted;
Score-CAM's and Ablation-CAM's channels inside SmoothGrad are counted after their first pass (before the many);
faithfulness correlation draws its sets a batch at a time (the same values, no ``subsets x H x W`` at once); the
evaluation's ``n`` is capped by the pixels it holds; SmoothGrad reads signatures with ``engine.signature_of``."""
import functools
import importlib

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience._core import engine
from salience.evidence import evaluate, faithfulness, image_seeds
from salience.methods import options

from test_s49_record import ForwardLog

smoothgrad_module = importlib.import_module("salience.methods.smoothgrad")  # the attribute is the function


class _NoPass(nn.Module):
    def forward(self, x):
        raise AssertionError("a pass ran")


class _Counted(nn.Module):
    """A conv layer of 8 channels and a linear head; more than ``limit`` forward passes is an AssertionError (a call
    the caps let run far past its first passes)."""

    def __init__(self, limit: int = 40) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.calls = ForwardLog([0])  # the guard puts back a plain list: the count would read 0 after a call
        self.limit = limit

    def forward(self, x):
        self.calls[0] += 1
        if self.calls[0] > self.limit:
            raise AssertionError(f"{self.calls[0]} passes ran")
        return self.fc(self.conv(x).relu().mean((2, 3)))


# ----------------------------------------------------------------------------- 1. every level of SmoothGrad


def test_three_levels_of_smoothgrad_multiply_every_count():
    # 200 x 100 x 100 = 2,000,000 passes of each image; the two outer counts alone were 20,000 and let it run
    inner = functools.partial(salience.smoothgrad, method=functools.partial(salience.rise, masks=100), samples=100)
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), 0, method=inner, samples=200)
    said = str(e.value)
    assert "samples=200 of smoothgrad with samples=100 of rise with masks=100 is 2,000,000 passes" in said
    assert "more than the 1,000,000 passes of each image" in said


def test_a_smoothgrad_of_smoothgrad_of_smoothgrad_counts_its_options_inner_count():
    # the innermost integrated gradients' steps come through the outer call's options: 50 x 50 x 500 = 1,250,000
    middle = functools.partial(salience.smoothgrad, method=salience.integrated_gradients, samples=50)
    outer = functools.partial(salience.smoothgrad, method=middle, samples=50)
    with pytest.raises(SalienceError, match="1,250,000 passes of each image"):
        salience.smoothgrad(_NoPass(), torch.rand(1, 3, 8, 8), 0, method=outer, samples=1, steps=500)


def test_a_smoothgrad_inside_a_function_is_counted_by_the_copies_around_it():
    # a wrapper the signature cannot see through: the inner SmoothGrad's check counts the outer copies (1,000 x 2,000)
    def wrapped(model, x, target, **kw):
        return salience.smoothgrad(model, x, target, samples=2000, noise=0.0, reduce=None)

    with pytest.raises(SalienceError, match=r"within 1,000 noisy copies of the SmoothGrad around it is 2,000,000"):
        salience.smoothgrad(_Counted(), torch.rand(1, 3, 8, 8), 0, method=wrapped, samples=1000)


def test_three_levels_within_the_cap_run_and_match_the_method():
    # samples=1, noise=0 at every level is the method itself
    model = _Counted(limit=100)
    x = torch.rand(2, 3, 8, 8)
    inner = functools.partial(salience.smoothgrad, method=salience.vanilla, samples=1, noise=0.0, reduce=None)
    got = salience.smoothgrad(model, x, 1, method=functools.partial(salience.smoothgrad, method=inner, samples=1,
                                                                    noise=0.0, reduce=None), samples=1, noise=0.0)
    torch.testing.assert_close(got, salience.vanilla(model, x, 1))


# ----------------------------------------------------------------------------- 2. Score-CAM's channels


@pytest.mark.parametrize("method, name", [(salience.scorecam, "Score-CAM"), (salience.ablationcam, "Ablation-CAM")])
def test_smoothgrad_of_a_channel_method_counts_its_channels_before_their_passes(method, name):
    model = _Counted(limit=40)  # 200,000 copies x 8 channels = 1,600,000 passes: before, it ran on (and on)
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(model, torch.rand(1, 3, 8, 8), 0, method=method, samples=200_000, layer="conv")
    said = str(e.value)
    assert f"{name}'s 8 channels (a pass each) in each of 200,000 noisy copies" in said
    assert "1,600,000 passes of each image" in said and "layer with fewer channels" in said
    assert model.calls[0] <= 3  # the pass that tells the channels (and the target's), not the channels' passes


@pytest.mark.parametrize("method", [salience.scorecam, salience.ablationcam])
def test_smoothgrad_of_a_channel_method_within_the_cap_runs(method):
    model = _Counted(limit=10_000)
    out = salience.smoothgrad(model, torch.rand(1, 3, 8, 8), 0, method=method, samples=3, layer="conv")
    assert out.shape == (1, 8, 8) and bool(torch.isfinite(out).all())


def test_the_outer_passes_multiply_and_come_back():
    assert engine.outer_passes() == 1
    with engine.passes_within(10):
        with engine.passes_within(7):
            assert engine.outer_passes() == 70
        assert engine.outer_passes() == 10
    assert engine.outer_passes() == 1


# ----------------------------------------------------------------------------- 3. faithfulness correlation's sets


def _reference(model, x, maps, subsets, subset_size, seed, base):
    """Faithfulness correlation as the formula (Bhatt et al.), every set drawn at once as before session 41."""
    b, _, h, w = x.shape
    k = round(subset_size * h * w)
    keys = torch.stack([torch.rand((subsets, h * w), generator=torch.Generator().manual_seed(s))
                        for s in image_seeds(x, seed)])
    chosen = torch.zeros(b, subsets, h * w, dtype=torch.bool).scatter_(2, keys.topk(k, dim=2).indices, True)
    chosen = chosen.reshape(b, subsets, h, w)
    with torch.no_grad():
        clean = model(x)
        cls = clean.argmax(1)
        rows = torch.arange(b)
        images = torch.where(chosen[:, :, None], base[:, None], x[:, None]).flatten(0, 1)
        scores = model(images).reshape(b, subsets, -1)[rows, :, cls]
    drops = (clean[rows, cls][:, None] - scores).double()
    sums = (maps[:, None].double() * chosen).sum((2, 3))
    a, s = drops - drops.mean(1, keepdim=True), sums - sums.mean(1, keepdim=True)
    return ((a * s).sum(1) / (a.square().sum(1) * s.square().sum(1)).sqrt()).float()


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_faithfulness_correlation_is_the_formula_whatever_the_batch(batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, 4)).eval()
    x, maps = torch.rand(3, 3, 6, 5), torch.randn(3, 6, 5)
    got = salience.evidence.faithfulness_correlation(model, x, maps, subsets=20, subset_size=0.2, substrate="zero",
                                                     batch_size=batch_size, seed=3)
    torch.testing.assert_close(got, _reference(model, x, maps, 20, 0.2, 3, torch.zeros_like(x)), rtol=1e-5, atol=1e-6)


def test_faithfulness_correlation_does_not_hold_every_set_at_once():
    # 3,000 sets of a 32 x 32 image: 12 MB of keys and 25 MB of float64 products at once before
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).eval()
    x, maps = torch.rand(1, 3, 32, 32), torch.randn(1, 32, 32)
    with engine.MemoryProbe() as probe:
        salience.evidence.faithfulness_correlation(model, x, maps, subsets=3000, substrate="zero", batch_size=64)
    assert probe.peak < 8 * 2 ** 20, probe.peak  # 38 MiB before, 3.1 MiB now (a batch of 64 images and sets)


def test_faithfulness_sets_asked_out_of_order_are_an_error():
    sets = faithfulness._RandomSets(torch.zeros(1, 4, 4), [0], 5, 2)
    sets(0, 3)
    with pytest.raises(RuntimeError, match="out of order"):
        sets(1, 2)


# ----------------------------------------------------------------------------- 4. the evaluation's n


def test_the_evaluation_refuses_absurd_n_before_drawing_any_image(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(evaluate.data, "shapes_batch", lambda *a, **k: drawn.append(a) or 1 / 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    for call in (lambda: evaluate.run_evaluation(model, tmp_path / "out", n=10 ** 9, progress=False),
                 lambda: evaluate.evaluation_input(model, n=10 ** 9)):
        with pytest.raises(SalienceError) as e:
            call()
        assert "n=1,000,000,000 held-out shapes images of 64x64" in str(e.value)
        assert "give n at most 12,207" in str(e.value)
    assert drawn == [] and not (tmp_path / "out").exists()


def test_the_evaluations_first_image_is_drawn_alone(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    sizes = []
    real = evaluate.data.shapes_batch
    monkeypatch.setattr(evaluate.data, "shapes_batch", lambda n, *a, **k: sizes.append(n) or real(n, *a, **k))
    x = evaluate.evaluation_input(model, n=12_000)
    assert sizes == [1] and x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x, evaluate._demo_inputs(model, 3, 10_000)[0][:1])


def test_the_evaluation_refuses_a_folder_too_large_after_its_first_image(tmp_path, monkeypatch):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (40, 40)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(evaluate, "MAX_PIXELS", 2 * 40 * 40)
    decoded = []
    real = evaluate.load_image
    monkeypatch.setattr(evaluate, "load_image", lambda p: decoded.append(p) or real(p))
    with pytest.raises(SalienceError, match="n=3 images .* of 40x40 are 4,800 pixels.*give n at most 2 "):
        evaluate._folder_inputs(nn.Identity(), tmp_path, None, 10 ** 12)
    assert len(decoded) == 1
    assert evaluate._folder_inputs(nn.Identity(), tmp_path, None, 2)[0].shape[0] == 2


# ----------------------------------------------------------------------------- 5. one reading of signatures


def test_smoothgrad_reads_signatures_through_the_engine():
    assert not hasattr(smoothgrad_module, "_names")  # the twin of options.signature_of is gone
    assert options.signature_of is engine.signature_of
    assert engine.signature_of(max).parameters == {}  # a builtin without a signature: no options
    assert list(engine.signature_of(functools.partial(salience.rise, masks=3)).parameters)[:3] == ["model", "x",
                                                                                                    "target"]


def test_an_option_smoothgrad_hands_on_is_read_from_the_inner_signature():
    # SmoothGrad's precision goes to a many-pass method that names it, not to one that does not
    raw = smoothgrad_module._raw_options(salience.rise, {}, True, {"precision": "bf16"})
    assert raw["precision"] == "bf16"
    raw = smoothgrad_module._raw_options(salience.vanilla, {}, True, {"precision": "bf16"})
    assert "precision" not in raw
