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
        assert row["error"] is None and all(row[f"{m}.error"] is None for m in METHODS)
        for m in METHODS:
            np.testing.assert_allclose(run.map(i, m), ref.map(r, m), rtol=1e-5, atol=1e-7)
            assert row[f"{m}.max"] == pytest.approx(want[f"{m}.max"], rel=1e-5, abs=1e-7)
            assert row[f"{m}.insertion"] == pytest.approx(want[f"{m}.insertion"], rel=1e-5, abs=1e-7)
    for i in marked:
        row = run.row(i)
        assert row["error"] is None  # the image's own: it was read
        assert row["vanilla.error"].startswith("the target's score is NaN or infinite"), row
        assert row["occlusion.error"].startswith("the model's scores of the perturbed images are NaN"), row
        for m in METHODS:
            with pytest.raises(SalienceError, match=f"image {i} has no {m} map: the .*NaN"):
                run.map(i, m)
            assert row[f"{m}.min"] is None and row[f"{m}.insertion"] is None
    for m in METHODS:
        assert (run.table.column(f"{m}.error").null_count, ref.table.column(f"{m}.error").null_count) == (
            len(others), len(others))


def test_no_extra_call_when_nothing_fails(tmp_path):
    """A batch the method explains whole: one call of it per batch (the first method's pass is also
    the prediction's), nothing rerun."""
    calls = []

    def counted(model, x, target):
        calls.append(x.shape[0])
        return salience.vanilla(model, x, target)

    _run(Marked().eval(), _images(()), tmp_path / "run", methods={"counted": counted}, method_options=None)
    assert calls == [4, 2]


def test_a_whole_call_error_fails_each_batch_after_2_log2n_more_calls(tmp_path):
    """A method that refuses every call (an option the model refuses, say): each batch's rows say its
    error, after the batch's calls (the prediction's pass, then with the classes), the halves and the first
    half's halves (a single image refused as the batch was, nothing passed: the whole call's, ``2 log2(4)``
    more calls, not one per image). The next batch finds it again (its halves: 2 more calls): nothing is
    remembered from one batch to the next, so a continued run writes what an uninterrupted one does."""
    calls = []

    def refuses(model, x, target):
        calls.append(x.shape[0])
        raise SalienceError("this model refuses option z=3")

    run = _run(Marked().eval(), _images(()), tmp_path / "run", methods={"refuses": refuses}, method_options=None)
    assert calls == [4, 4, 2, 2, 1, 1, 1, 2, 2, 1, 1]  # the 1 after the first batch: the NaN maps' shape, once a run
    assert run.table.column("refuses.error").to_pylist() == ["this model refuses option z=3"] * 6
    assert run.table.column("error").to_pylist() == [None] * 6


def test_a_later_batch_refused_in_other_words_is_rerun(tmp_path):
    """A method refusing the first batch whole (``z=3``), then, in the second, only the image with a mark
    (other words), is rerun on the second batch's parts, and the other images of that batch keep their
    maps; another method does the same on its own."""
    calls: dict[str, list[int]] = {"first": [], "second": []}

    def method(key):
        def refusing(model, x, target):
            calls[key].append(x.shape[0])
            if (x[:, 0, 0, 1] == MARK).any():
                raise SalienceError("the model's scores of the perturbed images are NaN")
            if x[:, 0, 0, 2].max() < 2:  # the first batch's images (and the NaN maps' shape's black one)
                raise SalienceError("this model refuses option z=3")
            return salience.vanilla(model, x, target)
        return refusing

    x = _images(())
    x[4:, 0, 0, 2] = 3.0  # the second batch's images: the option is taken
    x[5, 0, 0, 1] = MARK
    run = _run(Marked().eval(), x, tmp_path / "run", methods={k: method(k) for k in calls}, method_options=None)
    assert calls["first"] == [4, 4, 2, 2, 1, 1, 1, 2, 2, 1, 1]  # batch 2: [4, 5], then [4] and [5]
    assert calls["second"] == [4, 2, 2, 1, 1, 1, 2, 1, 1]  # its own first batch's reruns, its shape's call
    errors = run.table.column("first.error").to_pylist()
    assert run.table.column("second.error").to_pylist() == errors
    assert errors[:4] == ["this model refuses option z=3"] * 4
    assert errors[4] is None and errors[5].startswith("the model's scores"), errors
    np.testing.assert_allclose(run.map(4, "first"), salience.vanilla(Marked().eval(), x[4:5])[0], rtol=1e-5, atol=1e-7)


def test_a_whole_call_error_beside_a_suspect_is_found_in_the_others_part(tmp_path):
    """Batch 2 holds an image whose prediction is NaN, so the batch is refused in other words (its NaN score)
    than the whole call's error of batch 1; the others' part is refused in the whole call's words and
    bisected until a single image is (its halves, 1 and 2 images): the batch's rows say the whole call's
    error."""
    calls = []

    def refuses(model, x, target):
        calls.append(x.shape[0])
        if (x[:, 0, 0, 0] == MARK).any():
            raise SalienceError("the target's score is NaN or infinite")
        raise SalienceError("this model refuses option z=3")

    x = torch.cat([_images(()), _images(())[:2]])
    x[5, 0, 0, 0] = MARK
    run = salience.explain_dataset(Marked().eval(), torch.utils.data.TensorDataset(x), {"refuses": refuses},
                                   tmp_path / "run", workers=0, map_dtype="float32", batch_size=4)
    assert calls == [4, 4, 2, 2, 1, 1, 1, 4, 4, 1, 3, 1, 2]  # batch 1, the NaN maps' shape, batch 2: [5], [4, 6, 7], [4], [6, 7]
    assert run.table.column("refuses.error").to_pylist() == ["this model refuses option z=3"] * 8


def test_a_model_refusing_batches_explains_image_by_image(tmp_path):
    """A method that refuses more than one image a call: refused by a batch's halves of two, it explains
    the halves' halves, single images (something passed: no whole call's error), so every image gets its
    map, at ``2n - 1`` calls for ``n`` images (it failed each batch of 4 whole before)."""
    calls = []

    def one_at_a_time(model, x, target):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise SalienceError("one image a call")
        return salience.vanilla(model, x, target)

    run = _run(Marked().eval(), _images(()), tmp_path / "run", methods={"one": one_at_a_time}, method_options=None)
    assert calls == [4, 4, 2, 2, 1, 1, 1, 1, 2, 2, 1, 1]
    assert run.table.column("one.error").to_pylist() == [None] * 6
    x = _images(())
    for i in range(6):
        np.testing.assert_allclose(run.map(i, "one"), salience.vanilla(Marked().eval(), x[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-7)


def _picky(calls: list):
    """vanilla, refusing a call with an image whose pixel (0, 0, 1) is :data:`MARK` (its prediction finite)."""
    def picky(model, x, target):
        calls.append(x.shape[0])
        if (x[:, 0, 0, 1] == MARK).any():
            raise SalienceError("the model's scores of the perturbed images are NaN")
        return salience.vanilla(model, x, target)
    return picky


@pytest.mark.parametrize("refused", [(), (0,), (7,), (3,), (3, 4), (0, 7), (1, 2), (0, 4), (2, 5, 6), (0, 1, 7),
                                     (1, 3, 4)])
def test_every_refused_image_is_found_at_most_2k_log2n_more_calls(tmp_path, refused):
    """A batch of 8 whose images ``refused`` (their predictions finite, so no suspects) the method refuses,
    in one half, both, adjacent, first and last: each is a row with the method's error, every other image's
    stored map equals a run of those images alone, and the reruns cost at most ``2 k log2(8)`` calls for
    ``k`` refused images (none without one). Before, two in different halves failed the batch whole."""
    calls: list[int] = []
    x = _images(())
    x = torch.cat([x, x[:2] * 0.5])  # 8 images
    x[list(refused), 0, 0, 1] = MARK
    kw = dict(workers=0, map_dtype="float32", batch_size=8)
    run = salience.explain_dataset(Marked().eval(), torch.utils.data.TensorDataset(x), {"picky": _picky(calls)},
                                   tmp_path / "run", **kw)
    others = [i for i in range(8) if i not in refused]
    ref = salience.explain_dataset(Marked().eval(), torch.utils.data.TensorDataset(x[others]),
                                   {"picky": _picky([])}, tmp_path / "ref", **kw)
    errors = run.table.column("picky.error").to_pylist()
    assert [i for i, e in enumerate(errors) if e is not None] == list(refused), errors
    for i in refused:
        assert errors[i] == "the model's scores of the perturbed images are NaN"
    for r, i in enumerate(others):
        np.testing.assert_allclose(run.map(i, "picky"), ref.map(r, "picky"), rtol=1e-5, atol=1e-7)
    if not refused:
        assert calls == [8]  # the prediction's pass only
    else:  # the prediction's pass, the batch's call, then the reruns
        assert calls[:2] == [8, 8] and len(calls) - 2 <= 2 * len(refused) * 3, calls


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
    assert run.row(1)["ig.error"] is not None


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
    errors = run.table.column("picky.error").to_pylist()
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
    # batch 1: [1], [0, 2, 3], [0], [2, 3]; the NaN maps' shape; batch 2 and its halves
    assert calls == [4, 4, 1, 3, 1, 2, 1, 2, 2, 1, 1]
    assert run.table.column("refuses.error").to_pylist() == ["this model refuses option z=3"] * 6
    assert run.table.column("error").to_pylist() == [None] * 6


def test_a_metric_refusing_an_image_the_method_explained_costs_only_its_row(tmp_path):
    """SmoothGrad explains image 1 whose prediction is NaN (its noisy copies' scores are finite), but
    its insertion curve is NaN (the metric refuses it): only image 1's row says that; the others'
    insertion equals a run where image 1 is an ordinary image (their seeds unchanged)."""
    kw = dict(methods=["smoothgrad"], method_options={"smoothgrad": {"samples": 2}}, metrics=["insertion"])
    x = _images((1,))
    run = _run(Marked().eval(), x, tmp_path / "run", **kw)
    x[1, 0, 0, 0] = 0.5
    ref = _run(Marked().eval(), x, tmp_path / "ref", **kw)
    assert run.row(1)["smoothgrad.metrics_error"].startswith("the model's score is nan on image")
    assert run.row(1)["smoothgrad.insertion"] is None and run.row(1)["smoothgrad.error"] is None
    for i in (0, 2, 3, 4, 5):
        assert run.row(i)["smoothgrad.metrics_error"] is None
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


def gallery_rows(folder, n: int, *scripts: str) -> list:
    """``folder/index.html`` in Chromium, its ``n`` rows shown: per script (a JavaScript expression of a row ``tr``),
    each row's ``[index, value]``."""
    from explore_helpers import browser_context

    with browser_context() as context:
        page = context.new_page()
        page.goto((folder / "index.html").resolve().as_uri())
        page.wait_for_function(f"document.querySelectorAll('#body tr').length === {n}")
        return [page.evaluate(f"() => [...document.querySelectorAll('#body tr')].map("
                              f"tr => [tr.children[1].textContent, {js}])") for js in scripts]


def test_the_gallery_shows_a_refused_images_thumbnails(tmp_path):
    """``RUN/index.html`` in Chromium: the row of an image a method refused shows its tiles (the image, the
    refused method's blank one, the others'); the page showed none for any row with an error, so an image only
    vanilla refused hid occlusion's map too. Under the refused method's blank tile, its error (as the explorer's
    run table says it)."""
    pytest.importorskip("pyarrow")
    _run(Marked().eval(), _images((1,)), tmp_path / "run", methods=["vanilla"], method_options={})
    tiles, said = gallery_rows(tmp_path / "run", 6, "tr.querySelectorAll('.tile').length",
                               "[...tr.querySelectorAll('.tile')].map(t => t.querySelector('.refused')?.textContent)")
    assert sorted(tiles) == [[str(i), 2] for i in range(6)], tiles
    # and under its blank tile, why (it said nothing there)
    refused = {i: ts for i, ts in said if any(ts)}
    assert list(refused) == ["1"] and refused["1"][0] is None, said
    assert refused["1"][1].startswith("failed: the target's score is NaN or infinite"), said


def test_the_explorers_run_table_shows_the_prediction_and_the_refusal_under_its_method(tmp_path):
    """The explorer's run table in Chromium: image 1, which method ``picky`` refused (its prediction finite),
    shows its predicted class (it said ``failed: method picky failed: ...`` in place of it) and the refusal under
    picky's thumbnail, not under vanilla's; the other rows say no refusal."""
    from explore_helpers import browser_page

    from salience._core.info import ModelInfo, attach_info

    pytest.importorskip("starlette")
    pytest.importorskip("pyarrow")
    x = _images(())
    x[1, 0, 0, 1] = MARK
    model = attach_info(Marked().eval(), ModelInfo(name="marked", channels=3, input_size=(8, 8),
                                                   class_names=("ant", "bee", "cat")))
    run = _run(model, x, tmp_path / "run", methods={"picky": _picky([]), "vanilla": salience.vanilla},
               method_options=None)
    explorer = salience.explore(model, run=run, show=False)
    errors: list[str] = []
    try:
        with browser_page(explorer.url, errors) as page:
            page.wait_for_function("document.querySelectorAll('#run-body tr').length === 6")
            seen = page.evaluate("() => [...document.querySelectorAll('#run-body tr')].map(tr => ["
                                 "tr.children[5].textContent, "  # 3 thumbnails, the index, the file, the class
                                 "[1, 2].map(t => [...tr.querySelectorAll(`td[data-tile='${t}'] [data-what=refused]`)]"
                                 ".map(d => d.textContent))])")
    finally:
        explorer.stop()
    assert not errors, errors
    names = [run.row(i)["predicted_name"] for i in range(6)]
    assert all(n in ("ant", "bee", "cat") for n in names), names
    said = "failed: the model's scores of the perturbed images are NaN"
    assert seen == [[names[i], [[said] if i == 1 else [], []]] for i in range(6)], seen
    assert run.row(1)["picky.error"] == "the model's scores of the perturbed images are NaN"
    assert run.row(1)["error"] is None


def test_a_joined_error_of_the_older_layout_is_read_back_per_method():
    """``joined_errors`` reads back a row's ``error`` as salience-run/1 wrote it: each method's refusal (a name
    the start of another's, a text holding ``; ``), its metrics' failure, and the rest (an image not read) apart."""
    from salience.runs.store import joined_errors

    error = ("method grad failed: a; b; method gradcam failed: the target's score is NaN; "
             "method grad's metrics failed: the model's score is nan on image 3")
    assert joined_errors(error, ["grad", "gradcam"]) == (
        {"grad": "a; b; metrics failed: the model's score is nan on image 3", "gradcam": "the target's score is NaN"},
        None)
    assert joined_errors("cannot identify image file x.png", ["grad"]) == ({}, "cannot identify image file x.png")
    assert joined_errors(None, ["grad"]) == ({}, None)


def test_a_continued_run_equals_an_uninterrupted_one_after_a_batch_failed_whole(tmp_path):
    """Batch 1 of 8: a method refuses images 0, 1, 2 and 4 alike (its words name no image), which the bisection
    takes for a whole call's error (a documented limit: the batch's rows all say it). Batch 2: it refuses image 9
    only, in the same words. A run stopped after batch 1 (an error not a ``SalienceError``) and continued writes
    what the uninterrupted run writes: batch 2's other images keep their maps. Before, the uninterrupted run
    remembered batch 1's words as a whole call's error and failed batch 2 whole, the continued one (nothing
    remembered) explained its other seven images; with Ray, an actor's batches depended on which it got first."""
    torch.manual_seed(2)
    x = torch.rand(16, 3, 8, 8)
    x[[0, 1, 2, 4, 9], 0, 0, 1] = MARK
    stop = [True]

    def stopped_once(model, x, target):  # the run's process ends during batch 2 (kill -9, Ctrl-C)
        if stop[0] and len(x) == 8 and x[:, 0, 0, 1].eq(MARK).sum() == 1:  # batch 2's first call
            stop[0] = False
            raise RuntimeError("stopped")
        return _picky([])(model, x, target)

    kw = dict(workers=0, map_dtype="float32", batch_size=8, shard_size=8)
    data = torch.utils.data.TensorDataset(x)
    whole = salience.explain_dataset(Marked().eval(), data, {"picky": _picky([])}, tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="stopped"):
        salience.explain_dataset(Marked().eval(), data, {"picky": stopped_once}, tmp_path / "cut", **kw)
    cut = salience.explain_dataset(Marked().eval(), data, {"picky": stopped_once}, tmp_path / "cut", **kw)
    errors = whole.table.column("picky.error").to_pylist()
    assert cut.table.column("picky.error").to_pylist() == errors
    assert [i for i, e in enumerate(errors) if e is not None] == list(range(8)) + [9], errors
    for i in range(10, 16):
        np.testing.assert_allclose(cut.map(i, "picky"), whole.map(i, "picky"), rtol=0, atol=0)


class Touchy(Marked):
    """Finite on its inputs; NaN for an image whose channel 2 is 1 everywhere (as it stays when blurred) once pixel
    (0, 7, 7) is no longer 0.5 (a perturbed copy of it: deletion's blurred pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = (x[:, 2].amin((1, 2)) > 0.99) & (x[:, 0, 7, 7] != 0.5)
        return self.body(x) + torch.where(bad, torch.tensor(float("nan")), torch.tensor(0.0))[:, None]


def test_an_image_the_metrics_refuse_costs_its_own_metrics_only(tmp_path):
    """vanilla explains image 2 (its prediction finite), whose deletion curve is NaN (a perturbed copy's score):
    its row says the metrics' error, its map is kept, every other image's deletion equals a run without it.
    Before, the metrics refused the whole batch, no image to blame by its prediction: the run stopped there."""
    x = _images(())
    x[:, 0, 7, 7] = 0.5
    x[2, 2] = 1.0
    run = _run(Touchy().eval(), x, tmp_path / "run", methods=["vanilla"], method_options=None, metrics=["deletion"])
    others = [0, 1, 3, 4, 5]
    ref = _run(Touchy().eval(), x[others], tmp_path / "ref", methods=["vanilla"], method_options=None,
               metrics=["deletion"])
    row = run.row(2)
    assert row["vanilla.metrics_error"].startswith("the model's score is nan on image 2 "), row  # the run's index
    assert row["error"] is None and row["vanilla.error"] is None
    assert row["vanilla.deletion"] is None and row["vanilla.max"] is not None
    np.testing.assert_allclose(run.map(2, "vanilla"), salience.vanilla(Touchy().eval(), x[2:3])[0], rtol=1e-5, atol=1e-7)
    for r, i in enumerate(others):
        assert run.row(i)["vanilla.metrics_error"] is None
        assert run.row(i)["vanilla.deletion"] == pytest.approx(ref.row(r)["vanilla.deletion"], rel=1e-5, abs=1e-7)


def test_a_last_batch_of_one_image_the_metrics_refuse_is_its_row(tmp_path):
    """5 images in batches of 4: the last batch is image 4 alone, whose deletion curve is NaN (a copy of image 2
    of the test above): its row says the metrics' error, as a method's refusal of it would be. Before, a batch
    whose metrics refused every image whose prediction is finite stopped the run."""
    x = _images(())[:5]
    x[:, 0, 7, 7] = 0.5
    x[4, 2] = 1.0
    run = _run(Touchy().eval(), x, tmp_path / "run", methods=["vanilla"], method_options=None, metrics=["deletion"])
    errors = run.table.column("vanilla.metrics_error").to_pylist()
    assert errors[:4] == [None] * 4 and errors[4].startswith("the model's score is nan on image 4 "), errors
    assert run.row(4)["vanilla.deletion"] is None and run.row(3)["vanilla.deletion"] is not None


def test_a_refused_images_row_names_it_by_its_index_in_the_run(tmp_path):
    """A refusal of NaN scores names the images of the call: the rerun of a batch's refused image alone said
    "image 0 of 1" in the row of image 3 (and of image 5, in the second batch); the row names the run's image."""
    run = _run(Marked().eval(), _images((3, 5)), tmp_path / "run")
    for i in (3, 5):
        said = [run.row(i)["vanilla.error"], run.row(i)["occlusion.error"]]
        assert "is NaN or infinite (image %d, class 0)" % i in said[0], said
        assert "are NaN or infinite (image %d, class 0)" % i in said[1], said
        assert " of 1" not in said[0] + said[1]
