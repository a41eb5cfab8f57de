"""salience.evaluate: the report of every method through the metrics, and the Clever Hans demo."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience.demo import data, zoo
from salience import evidence as M
from salience.demo import clever_hans as CH
from salience.evidence import evaluate as E
from salience.render import plots
from salience.methods import vanilla

from conftest import SmallCNN, unchanged


@pytest.fixture(scope="module")
def shapes_model():
    return zoo.load_demo("shapes")


def test_run_evaluation_on_demo_shapes(tmp_path, shapes_model):
    with unchanged(shapes_model):
        path = E.run_evaluation(shapes_model, tmp_path, methods=["vanilla", "gradcam"], n=4, steps=4,
                                randomization_images=2, progress=False)
    assert path == tmp_path / "report.html"
    for name in ("report.html", "report.md", "results.json", "curves.png", "randomization.png", "examples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["vanilla", "gradcam", E.ORACLE, "spectral_residual", "sobel_edges", "center", "random"]
    # The numbers in the report are the metrics of the same maps, recomputed here. The tolerances
    # cover float32 rounding only (the report may compute the maps and the scores in other batch
    # sizes than this direct call): 1e-6 for means of 0/1 values and of Gini values, 1e-5 for
    # scores that go through the model again (float32 sums over 64x64 pixels, relative 1e-6 each).
    x, _, masks = data.shapes(4, 10_000)
    maps = vanilla(shapes_model, x)
    assert rows["vanilla"]["pointing"] == pytest.approx(M.pointing_game(maps, masks).mean().item(), abs=1e-6)
    assert rows["vanilla"]["energy"] == pytest.approx(M.energy_in_mask(maps, masks).mean().item(), abs=1e-5)
    assert rows["vanilla"]["deletion"] == pytest.approx(M.deletion(shapes_model, x, maps, steps=4).mean().item(),
                                                        abs=1e-5)
    assert rows["vanilla"]["road_morf"] == pytest.approx(M.road(shapes_model, x, maps).mean().item(), abs=1e-5)
    assert rows["vanilla"]["faith_corr"] == pytest.approx(
        M.faithfulness_correlation(shapes_model, x, maps).nanmean().item(), abs=1e-5)
    assert rows["vanilla"]["sparseness"] == pytest.approx(M.sparseness(maps).mean().item(), abs=1e-6)
    assert rows["vanilla"]["max_sens"] == pytest.approx(M.max_sensitivity(shapes_model, x[:2], "vanilla").mean().item(),
                                                        abs=1e-5)
    sr = M.spectral_residual(x)
    assert rows["spectral_residual"]["energy"] == pytest.approx(M.energy_in_mask(sr, masks).mean().item(), abs=1e-5)
    assert rows[E.ORACLE]["energy"] == pytest.approx(1.0) and rows[E.ORACLE]["pointing"] == pytest.approx(1.0)
    for name in (E.ORACLE, "random", "center"):  # no method: no randomization, sensitivity, random logit
        assert rows[name]["rand_top"] is None and rows[name]["max_sens"] is None and rows[name]["random_logit"] is None
    assert rows["vanilla"]["rand_top"] is not None and rows["vanilla"]["random_logit"] is not None
    md = (tmp_path / "report.md").read_text()
    assert "| vanilla |" in md and "| spectral_residual |" in md and "| oracle (mask) |" in md and "pointing game" in md
    page = (tmp_path / "report.html").read_text()
    assert 'src="curves.png"' in page and "<table>" in page


def test_failing_method_is_reported_and_others_go_on(tmp_path, shapes_model):
    def broken(model, x, target=None):
        raise RuntimeError("boom")

    rows, maps = E.evaluate_methods(shapes_model, data.shapes(4, 1)[0], None, methods=["vanilla", broken],
                                    baselines=False, steps=2, randomization_images=1)
    assert [r.name for r in rows] == ["vanilla", "broken"]
    assert rows[1].error == "RuntimeError: boom" and rows[0].error is None
    assert rows[0].pointing is None  # no masks: no localization
    assert "failed: RuntimeError: boom" in E.markdown_table(rows)


def _write_shapes_folder(tmp_path, n=3, size=32, mask_scale=255):
    from PIL import Image

    imgs, _, masks = data.shapes(n, 7, size=size)
    (tmp_path / "im").mkdir()
    (tmp_path / "mk").mkdir()
    for i in range(n):
        a = (imgs[i].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "im" / f"s{i}.png")
        suffix = ".jpg" if i == 0 and mask_scale == 255 else ".png"  # one lossy white-on-black mask
        Image.fromarray(masks[i].numpy().astype(np.uint8) * mask_scale).save(tmp_path / "mk" / f"s{i}{suffix}")
    return imgs, masks


def test_folder_of_images_and_masks(tmp_path):
    imgs, masks = _write_shapes_folder(tmp_path)
    torch.manual_seed(0)
    model = SmallCNN()
    x, raw, m, source = E._folder_inputs(model, tmp_path / "im", tmp_path / "mk", 10)
    # One mask is a JPEG (compression noise around the edges): thresholding at half still gives it back.
    assert torch.equal(m, masks) and torch.allclose(x, imgs, atol=1 / 255) and torch.equal(raw, x)
    assert "3 images" in source
    with unchanged(model):
        path = E.run_evaluation(model, tmp_path / "out", images=tmp_path / "im", masks=tmp_path / "mk",
                                methods=["vanilla"], steps=2, randomization_images=1, progress=False)
    rows = {r["name"]: r for r in json.loads((path.parent / "results.json").read_text())["rows"]}
    maps = vanilla(model, x)
    assert rows["vanilla"]["energy"] == pytest.approx(M.energy_in_mask(maps, masks).nanmean().item(), abs=1e-5)
    with pytest.raises(SalienceError, match="masks need their images"):
        E.run_evaluation(model, tmp_path / "o2", masks=tmp_path / "mk")
    with pytest.raises(SalienceError, match="not a folder"):
        E.run_evaluation(model, tmp_path / "o2", images=tmp_path / "nothing")


def test_label_masks_with_values_0_and_1(tmp_path):
    _, masks = _write_shapes_folder(tmp_path, mask_scale=1)
    _, _, m, _ = E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "mk", 10)
    assert torch.equal(m, masks)  # a 1/255 object on a 0 background is the object, not "empty"


def test_images_without_masks_are_an_error_naming_them(tmp_path):
    from PIL import Image

    _write_shapes_folder(tmp_path)
    for name in ("zz_a.png", "zz_b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "im" / name)
    with pytest.raises(SalienceError, match=r"2 of 5 images .* no mask .*zz_a\.png, zz_b\.png"):
        E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "mk", 10)
    # Only the first n images (by name) are used, and only they need masks.
    _, _, m, _ = E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "mk", 3)
    assert m.shape[0] == 3
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "other" / "zzz.png")
    with pytest.raises(SalienceError, match="no mask of the same name"):
        E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "other", 10)


def test_unreadable_image_is_an_error(tmp_path):
    _write_shapes_folder(tmp_path)
    (tmp_path / "im" / "s1.png").write_bytes(b"not a png")
    with pytest.raises(SalienceError, match=r"1 of 3 images could not be read.*s1\.png"):
        E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "mk", 10)


def test_images_of_different_sizes_for_a_model_of_any_size(tmp_path):
    from PIL import Image

    (tmp_path / "im").mkdir()
    (tmp_path / "mk").mkdir()
    for name, (h, w) in (("a", (20, 30)), ("b", (40, 24))):
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / "im" / f"{name}.png")
        mk = np.zeros((h, w), np.uint8)
        mk[: h // 2] = 255
        Image.fromarray(mk).save(tmp_path / "mk" / f"{name}.png")
    x, raw, m, _ = E._folder_inputs(SmallCNN(), tmp_path / "im", tmp_path / "mk", 10)
    assert x.shape == (2, 3, 20, 30) and raw.shape == x.shape and m.shape == (2, 20, 30)
    assert m[1, :10].all() and not m[1, 10:].any()  # the top half stays the top half


def test_nice_ticks_label_the_gridlines_exactly():
    assert plots.nice_ticks(-0.2, 1.0) == pytest.approx([-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert plots.nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert plots.nice_ticks(0.0, 25.0) == pytest.approx([0.0, 5.0, 10.0, 15.0, 20.0, 25.0])
    assert plots.nice_ticks(0.13, 0.9) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [f"{v:g}" for v in plots.nice_ticks(-0.2, 1.0)][:2] == ["-0.2", "0"]


def test_line_plot_draws_each_series():
    a = plots.line_plot({"up": [0.0, 0.5, 1.0], "flat": [0.5, 0.5, 0.5]}, title="t", size=(300, 200))
    assert a.shape == (200, 300, 3) and a.dtype == np.uint8
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert tuple(plots.PALETTE[0]) in colours and tuple(plots.PALETTE[1]) in colours


def test_clever_hans_report(tmp_path):
    frag = CH.clever_hans_report(tmp_path, n=20, n_maps=4)
    assert (tmp_path / "clever_hans.png").stat().st_size > 0
    assert 'src="clever_hans.png"' in frag and frag.count("<table>") == 2
    assert "<td>none (the image alone)</td><td>spectral_residual</td>" in frag  # the baseline row
    r = CH.clever_hans(n=50, n_maps=8, methods=("vanilla",))
    acc = r["accuracy"]
    assert acc["shapes-cue"]["train"] > 0.95 and acc["shapes-cue"]["moved"] < 0.2
    assert acc["shapes"]["moved"] > 0.9  # the clean model does not care about the mark
    e = r["energy"]["shapes-cue"]["vanilla"]
    assert e["cue"] / e["cue_area"] > 5 * e["shape"] / e["shape_area"]
    sr = r["energy"]["none"]["spectral_residual"]  # the same for any model: computed from the images
    assert sr["cue"] == pytest.approx(M.energy_in_mask(M.spectral_residual(r["images"]),
                                                       data.shapes_batch(8, 10_000, cue="train").cue_masks
                                                       ).nanmean().item(), abs=1e-6)


# The oracle as a standing test of the metrics' defaults: the ground-truth mask used as the map
# must beat a random map on every faithfulness and localization metric, with each metric's
# default settings (those `salience evaluate` uses). With black deletion it did not (the random
# map's scattered black pixels break the CNN faster, docs/evaluation.md "Choosing the substrate").
_ORACLE_METRICS = ("pointing", "energy", "box_iou", "deletion", "insertion", "road_morf", "road_lerf", "faith_corr",
                   "sparseness", "complexity")


@pytest.mark.parametrize("demo", ["shapes", "shapes-vit"])
def test_the_mask_beats_a_random_map_on_every_metric_with_the_defaults(demo):
    model = zoo.load_demo(demo)
    x, _, masks = data.shapes(8, 10_000)  # held out: the demo models were trained on seeds < 10000
    target = model(x).argmax(1)
    oracle = E.score_maps(E.MetricRow(E.ORACLE), model, x, masks.float(), masks, target, steps=16)
    rand = E.score_maps(E.MetricRow("random"), model, x, M.random_maps(masks.shape, seed=0), masks, target, steps=16)
    for key in _ORACLE_METRICS:
        if demo == "shapes-vit" and key in ("road_lerf", "faith_corr"):
            # The two exceptions, measured and reported in docs/evaluation.md ("Choosing the
            # substrate, and the oracle"): ROAD LeRF ranks random above the mask on the ViT (0.687
            # vs 0.713 on 32 images), and faithfulness correlation does not separate them (0.085 vs
            # 0.020 on 32 images; -0.042 vs 0.024 on these 8).
            continue
        o, r = getattr(oracle, key), getattr(rand, key)
        better = o > r if E.BETTER[key] == "higher" else o < r
        assert better, (demo, key, o, r)


def test_results_json_is_strict_json_with_null_for_missing_values(tmp_path, shapes_model):
    # A constant map has no rank correlation (NaN): results.json held the token NaN, which strict
    # JSON readers (JSON.parse, jq) refuse. Such a value is null; the finite numbers are kept.
    def flat(model, x, target=None):
        return torch.ones(x.shape[0], *x.shape[-2:])

    E.run_evaluation(shapes_model, tmp_path, methods=[flat], n=2, steps=2, randomization_images=2, progress=False)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    row = {r["name"]: r for r in res["rows"]}["flat"]
    assert row["rand_top"] is None and row["randomization"]["spearman_abs"][0] is None  # constant maps: no ranks
    assert row["sparseness"] == pytest.approx(0.0) and row["energy"] > 0  # a flat map: Gini 0, mass everywhere


class _NaNOnCopiesWhilePoisoned(torch.nn.Module):
    """The shapes model, but NaN on every image that is not one of ``x`` (a perturbed copy) while
    ``state["poisoned"]``: the scoring of one method's maps fails, the other's not."""

    def __init__(self, inner, x, state):
        super().__init__()
        self.inner, self.state = inner, state
        self.register_buffer("originals", x.clone())

    def forward(self, images):
        out = self.inner(images)
        if not self.state["poisoned"]:
            return out
        same = (images[:, None] == self.originals[None]).flatten(2).all(-1).any(-1)
        return torch.where(same[:, None], out, torch.full_like(out, float("nan")))


def test_a_method_whose_maps_cannot_be_scored_fails_its_row_only(shapes_model):
    """A model that gives NaN on one method's perturbed copies (an error naming the image and the
    copy) stopped the whole evaluation: the scoring ran outside the per-method handling. Now that
    method's row carries the error and the other method's row is the one a separate evaluation of
    it gives."""
    x = data.shapes(2, 5)[0]
    state = {"poisoned": False}
    model = _NaNOnCopiesWhilePoisoned(shapes_model, x, state).eval()

    def ramp_poisoning(model, x, target=None):  # a map made without the model; its scoring meets NaN
        state["poisoned"] = True
        return torch.linspace(0, 1, x.shape[-1]).expand(x.shape[0], x.shape[-2], x.shape[-1]).clone()

    def clean_vanilla(model, x, target=None):
        state["poisoned"] = False
        return vanilla(model, x, target)

    kw = dict(baselines=False, steps=2, randomization_images=1)
    rows, maps = E.evaluate_methods(model, x, None, methods=[ramp_poisoning, clean_vanilla], **kw)
    assert [r.name for r in rows] == ["ramp_poisoning", "clean_vanilla"]
    bad, good = rows
    assert bad.error.startswith("scoring its maps: SalienceError:") and "NaN" in bad.error, bad.error
    assert bad.deletion is None and bad.insertion is None and bad.faith_corr is None
    assert "on image 0 at step 1 of 2 of its deletion curve" in bad.error, bad.error  # names the image and copy
    assert "failed: scoring its maps" in E.markdown_table(rows)
    (alone,), _ = E.evaluate_methods(model, x, None, methods=[clean_vanilla], **kw)
    assert good.error is None and alone.error is None
    for key in ("deletion", "insertion", "road_morf", "road_lerf", "faith_corr", "sparseness", "complexity",
                "max_sens", "random_logit", "rand_top", "rand_all"):
        assert getattr(good, key) == getattr(alone, key), key
    assert good.curves == alone.curves
