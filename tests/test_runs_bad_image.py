"""Dataset runs with an image the methods refuse (its score NaN: an fp16 overflow, a corrupt image):
only that image's row says the method's error; the other images of its batch keep their maps,
equal to a run without it (the batch is split until the refused images are found). An error of the
whole call still fails the batch, after a bounded number of calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError

MARK = 7.0
"""The value of pixel (0, 0, 0) that makes the model's output NaN."""


class Marked(nn.Module):
    """A tiny classifier whose output is NaN for an image whose pixel (0, 0, 0) is :data:`MARK`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = x[:, 0, 0, 0] == MARK
        return self.body(x) + torch.where(bad, torch.tensor(float("nan")), torch.tensor(0.0))[:, None]


def _images(marked) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.rand(6, 3, 8, 8)
    x[list(marked), 0, 0, 0] = MARK
    return x


METHODS = ["vanilla", "occlusion"]
OPTIONS = {"occlusion": {"window": 4, "stride": 2}}


def _run(model, x, folder, **kw):
    return salience.explain_dataset(model, torch.utils.data.TensorDataset(x), kw.pop("methods", METHODS), folder,
                                    workers=0, map_dtype="float32", batch_size=4,
                                    method_options=kw.pop("method_options", OPTIONS), **kw)


@pytest.mark.parametrize("marked", [(1,), (0, 3)])
def test_the_other_images_keep_their_maps(tmp_path, marked):
    """Images ``marked`` (in the first batch of 4) are refused by vanilla (target score NaN) and
    occlusion (perturbed scores NaN): their rows say each method's error, their maps are NaN; every
    other image's maps and insertion metric equal those of a run of the images without them."""
    model = Marked().eval()
    x = _images(marked)
    run = _run(model, x, tmp_path / "run", metrics=["insertion"])
    others = [i for i in range(6) if i not in marked]
    ref = _run(model, x[others], tmp_path / "ref", metrics=["insertion"])
    for r, i in enumerate(others):
        row, want = run.row(i), ref.row(r)
        assert row["error"] is None
        for m in METHODS:
            np.testing.assert_allclose(run.map(i, m), ref.map(r, m), rtol=1e-5, atol=1e-7)
            assert row[f"{m}.max"] == pytest.approx(want[f"{m}.max"], rel=1e-5, abs=1e-7)
            assert row[f"{m}.insertion"] == pytest.approx(want[f"{m}.insertion"], rel=1e-5, abs=1e-7)
    for i in marked:
        row = run.row(i)
        said = row["error"].split("; method ")
        assert said[0].startswith("method vanilla failed: the target's score is NaN or infinite"), said
        assert said[1].startswith("occlusion failed: the model's scores of the perturbed images are NaN"), said
        for m in METHODS:
            with pytest.raises(SalienceError, match=f"image {i} has no map: method vanilla failed: .*NaN or infinite"):
                run.map(i, m)
            assert row[f"{m}.min"] is None and row[f"{m}.insertion"] is None
    assert (run.table.column("error").null_count, ref.table.column("error").null_count) == (len(others), len(others))


def test_no_extra_call_when_nothing_fails(tmp_path):
    """A batch the method explains whole: one call of it per batch (the first method's pass is also
    the prediction's), nothing rerun."""
    calls = []

    def counted(model, x, target):
        calls.append(x.shape[0])
        return salience.vanilla(model, x, target)

    _run(Marked().eval(), _images(()), tmp_path / "run", methods={"counted": counted}, method_options=None)
    assert calls == [4, 2]


def test_a_whole_call_error_fails_the_batch_after_two_more_calls(tmp_path):
    """A method that refuses every call (an option the model refuses, say): each batch's rows say its
    error, after the batch's calls (the prediction's pass, then with the classes) and the two halves'
    only, not one call per image."""
    calls = []

    def refuses(model, x, target):
        calls.append(x.shape[0])
        raise SalienceError("this model refuses option z=3")

    run = _run(Marked().eval(), _images(()), tmp_path / "run", methods={"refuses": refuses}, method_options=None)
    assert calls == [4, 4, 2, 2, 1, 2, 2, 1, 1]  # the 1 after the first batch: the NaN maps' shape, once a run
    assert run.table.column("error").to_pylist() == ["method refuses failed: this model refuses option z=3"] * 6


def test_a_model_refusing_batches_explains_image_by_image(tmp_path):
    """A method that refuses more than one image a call: refused whole by a batch's halves of two, so
    the batch of 4 fails after two more calls; the last batch's halves are single images: explained."""
    calls = []

    def one_at_a_time(model, x, target):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise SalienceError("one image a call")
        return salience.vanilla(model, x, target)

    run = _run(Marked().eval(), _images(()), tmp_path / "run", methods={"one": one_at_a_time}, method_options=None)
    assert calls == [4, 4, 2, 2, 1, 2, 2, 1, 1]  # the 1 after the first batch: the NaN maps' shape, once a run
    assert run.table.column("error").to_pylist() == ["method one failed: one image a call"] * 4 + [None] * 2
    x = _images(())
    for i in (4, 5):
        np.testing.assert_allclose(run.map(i, "one"), salience.vanilla(Marked().eval(), x[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-7)


def test_completeness_reports_of_the_reruns_name_their_images(tmp_path):
    """Integrated Gradients' completeness report of a rerun part names the part's images by their
    positions in the batch: here the method reports the last image of each call; the batch
    [0, 1 (marked), 2, 3] is rerun as [1] and [0, 2, 3], whose last image is image 3 (not image 2)."""
    from salience.methods.integrated import CompletenessWarning, GapReport, report_gaps

    def reporting(model, x, target):
        m = salience.vanilla(model, x, target)
        report_gaps(GapReport([x.shape[0] - 1], [1.0], 8, "riemann_trapezoid"))
        return m

    with pytest.warns(CompletenessWarning) as said:
        run = _run(Marked().eval(), _images((1,)), tmp_path / "run", methods={"ig": reporting}, method_options=None)
    assert [w.message.images for w in said if isinstance(w.message, CompletenessWarning)] == [[run.row(3)["path"]]]
    assert run.row(1)["error"].startswith("method ig failed")


def test_an_image_refused_with_a_finite_prediction_beside_a_suspect(tmp_path):
    """A batch [0, 1 (its prediction NaN), 2, 3 (its prediction finite, refused all the same: a NaN
    perturbed score, say)]: the suspect [1] and the rest [0, 2, 3] are both refused, which is no whole
    call's error (the suspect's part was meant to be refused): images 0 and 2 keep their maps."""
    def picky(model, x, target):
        if (x[:, 0, 0, 1] == MARK).any():
            raise SalienceError("the model's scores of the perturbed images are NaN")
        return salience.vanilla(model, x, target)

    x = _images((1,))
    x[3, 0, 0, 1] = MARK
    run = _run(Marked().eval(), x, tmp_path / "run", methods={"picky": picky}, method_options=None)
    errors = run.table.column("error").to_pylist()
    assert [e is None for e in errors] == [True, False, True, False, True, True], errors
    for i in (0, 2):
        np.testing.assert_allclose(run.map(i, "picky"), salience.vanilla(Marked().eval(), x[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-7)


def test_a_whole_call_error_beside_a_suspect_stops_after_the_rests_halves(tmp_path):
    """A method that refuses every call, in a batch with an image whose prediction is NaN: after the
    suspect's part and the rest's, the rest's two halves (the whole call's error), not one call per image."""
    calls = []

    def refuses(model, x, target):
        calls.append(x.shape[0])
        raise SalienceError("this model refuses option z=3")

    run = _run(Marked().eval(), _images((1,)), tmp_path / "run", methods={"refuses": refuses}, method_options=None)
    assert calls == [4, 4, 1, 3, 1, 2, 1, 2, 2, 1, 1]  # batch 1: [1], [0, 2, 3], [0], [2, 3]; then the NaN maps' shape
    assert run.table.column("error").to_pylist() == ["method refuses failed: this model refuses option z=3"] * 6


def test_a_metric_refusing_an_image_the_method_explained_costs_only_its_row(tmp_path):
    """SmoothGrad explains image 1 whose prediction is NaN (its noisy copies' scores are finite), but
    its insertion curve is NaN (the metric refuses it): only image 1's row says that; the others'
    insertion equals a run where image 1 is an ordinary image (their seeds unchanged)."""
    kw = dict(methods=["smoothgrad"], method_options={"smoothgrad": {"samples": 2}}, metrics=["insertion"])
    x = _images((1,))
    run = _run(Marked().eval(), x, tmp_path / "run", **kw)
    x[1, 0, 0, 0] = 0.5
    ref = _run(Marked().eval(), x, tmp_path / "ref", **kw)
    assert run.row(1)["error"].startswith("method smoothgrad's metrics failed: the model's score is nan on image")
    assert run.row(1)["smoothgrad.insertion"] is None
    for i in (0, 2, 3, 4, 5):
        assert run.row(i)["error"] is None
        assert run.row(i)["smoothgrad.insertion"] == pytest.approx(ref.row(i)["smoothgrad.insertion"], rel=1e-5)


def test_the_refused_images_thumbnail_is_blank_the_others_are_overlays(tmp_path):
    """The gallery's sprite: image 1's vanilla tile (refused) is the blank grey (235) of a failed map,
    image 0's an overlay (not flat)."""
    from PIL import Image

    from salience.runs.job import THUMB

    run = _run(Marked().eval(), _images((1,)), tmp_path / "run", methods=["vanilla"], method_options=None)
    path, offset = run.thumbnail(1)
    canvas = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    tile = canvas[THUMB:2 * THUMB, offset * THUMB:(offset + 1) * THUMB]  # the method's row, image 1's column
    assert abs(tile.mean() - 235) < 2 and tile.std() < 5  # a flat grey, but for the JPEG's edges
    assert canvas[THUMB:2 * THUMB, :THUMB].std() > 10  # image 0's overlay


def test_the_gallery_shows_a_refused_images_thumbnails(tmp_path):
    """``RUN/index.html`` in Chromium: the row of an image a method refused shows its tiles (the image, the
    refused method's blank one, the others'); the page showed none for any row with an error, so an image only
    vanilla refused hid occlusion's map too."""
    from explore_helpers import ARGS, CHROMIUM, browser_api

    sync_api = browser_api()
    pytest.importorskip("pyarrow")
    _run(Marked().eval(), _images((1,)), tmp_path / "run", methods=["vanilla"], method_options={})
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto((tmp_path / "run" / "index.html").resolve().as_uri())
            page.wait_for_function("document.querySelectorAll('#body tr').length === 6")
            tiles = page.evaluate("() => [...document.querySelectorAll('#body tr')].map("
                                  "tr => [tr.children[1].textContent, tr.querySelectorAll('.tile').length])")
        finally:
            browser.close()
    assert sorted(tiles) == [[str(i), 2] for i in range(6)], tiles


def test_a_refused_images_row_names_it_by_its_index_in_the_run(tmp_path):
    """A refusal of NaN scores names the images of the call: the rerun of a batch's refused image alone said
    "image 0 of 1" in the row of image 3 (and of image 5, in the second batch); the row names the run's image."""
    run = _run(Marked().eval(), _images((3, 5)), tmp_path / "run")
    for i in (3, 5):
        said = run.row(i)["error"].split("; method ")
        assert "is NaN or infinite (image %d, class 0)" % i in said[0], said
        assert "are NaN or infinite (image %d, class 0)" % i in said[1], said
        assert " of 1" not in run.row(i)["error"]
