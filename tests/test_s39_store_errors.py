"""A dataset run's errors in the store: each method's refusal in a column of its own (``METHOD.error``,
``METHOD.metrics_error``), ``error`` the image's own; the explorer and ``index.html`` read those columns
(no parsing of one joined string); each refused image of a batch every image of which is refused says its
own words; a run folder of the older layout (``salience-run/1``: every error joined in ``error``) is read,
and refused when continued."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import salience
from salience import SalienceError
from test_runs_bad_image import Marked, Touchy

pytest.importorskip("pyarrow")

BRIGHT, DARK = 9.0, -9.0
"""Pixel (0, 0, 0) of an image :func:`_choosy` refuses as too bright; pixel (0, 0, 1) of one it refuses as too dark."""


def _choosy(model, x, target):
    """Vanilla, refusing a call that holds a bright image (pixel (0, 0, 0) = BRIGHT) or a dark one (pixel
    (0, 0, 1) = DARK), each in its own words; a call holding both says both."""
    said = []
    if (x[:, 0, 0, 0] == BRIGHT).any():
        said.append("an image is too bright")
    if (x[:, 0, 0, 1] == DARK).any():
        said.append("an image is too dark")
    if said:
        raise SalienceError(" and ".join(said))
    return salience.vanilla(model, x, target)


def _lying(model, x, target):
    """Vanilla, refusing an image marked BRIGHT with words that hold what the old joined ``error`` parsed."""
    if (x[:, 0, 0, 0] == BRIGHT).any():
        raise SalienceError("bad input; method vanilla failed: not really")
    return salience.vanilla(model, x, target)


def _images(n: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, 8, 8)


def _run(x, folder, methods, **kw):
    return salience.explain_dataset(Marked().eval(), torch.utils.data.TensorDataset(x), methods, folder, workers=0,
                                    map_dtype="float32", batch_size=kw.pop("batch_size", 4), **kw)


def test_each_image_of_a_wholly_refused_batch_says_its_own_words(tmp_path):
    """A batch of 2 whose images a method refuses for different reasons: each row says its image's reason
    (both said the batch's joined words), the other method's maps are there."""
    x = _images(2)
    x[0, 0, 0, 0] = BRIGHT
    x[1, 0, 0, 1] = DARK
    run = _run(x, tmp_path / "run", {"choosy": _choosy, "vanilla": salience.vanilla}, batch_size=2)
    assert run.table.column("choosy.error").to_pylist() == ["an image is too bright", "an image is too dark"]
    assert run.table.column("vanilla.error").to_pylist() == [None, None]
    assert run.table.column("error").to_pylist() == [None, None]
    assert np.isfinite(run.map(1, "vanilla")).all()
    with pytest.raises(SalienceError, match="image 1 has no choosy map: an image is too dark"):
        run.map(1, "choosy")


def test_a_batch_of_4_wholly_refused_in_three_ways(tmp_path):
    """Four images, all refused: two bright, one dark, one both; each row its own words."""
    x = _images(4)
    x[[0, 2, 3], 0, 0, 0] = BRIGHT
    x[[1, 3], 0, 0, 1] = DARK
    run = _run(x, tmp_path / "run", {"choosy": _choosy})
    assert run.table.column("choosy.error").to_pylist() == [
        "an image is too bright", "an image is too dark", "an image is too bright",
        "an image is too bright and an image is too dark"]


def test_a_methods_words_that_look_like_another_methods_stay_its_own(tmp_path):
    """Method ``first`` refuses image 1 with words holding ``; method vanilla failed: ``: its column holds them
    whole, vanilla's is null, and ``error`` (the image's own) is null; the explorer's rows and ``index.html``'s
    refusals read the columns (the joined string was split into a refusal of vanilla's that never was)."""
    from salience.runs.gallery import refused_json
    from salience.explore.runs import RunSource

    x = _images(4)
    x[1, 0, 0, 0] = BRIGHT
    run = _run(x, tmp_path / "run", {"first": _lying, "vanilla": salience.vanilla})
    words = "bad input; method vanilla failed: not really"
    assert run.table.column("first.error").to_pylist() == [None, words, None, None]
    assert run.table.column("vanilla.error").to_pylist() == [None] * 4
    assert run.table.column("error").to_pylist() == [None] * 4
    row = RunSource(run).row(1)
    assert (row["method_errors"], row["other_error"], row["error"]) == ({"first": words}, None, None)
    assert json.loads(refused_json(run)) == {"1": [[0, words]]}
    page = (tmp_path / "run" / "index.html").read_text(encoding="utf-8")
    assert "/^method /" not in page  # the page's thumbnails follow the image's own error, not a parse


def test_a_metrics_refusal_has_its_column(tmp_path):
    """The deletion metric refusing image 2 (a perturbed copy's score NaN) is ``vanilla.metrics_error``, the
    method's map kept (``vanilla.error`` null) and ``error`` null; the explorer says it under the method as
    ``metrics failed: ...``, as before."""
    from salience.explore.runs import RunSource

    x = _images(4)
    x[:, 0, 7, 7] = 0.5
    x[2, 2] = 1.0
    run = salience.explain_dataset(Touchy().eval(), torch.utils.data.TensorDataset(x), ["vanilla"], tmp_path / "run",
                                   workers=0, map_dtype="float32", batch_size=4, metrics=["deletion"])
    said = run.table.column("vanilla.metrics_error").to_pylist()
    assert said[:2] == [None, None] and said[3] is None and said[2].startswith("the model's score is nan"), said
    assert run.table.column("vanilla.error").to_pylist() == [None] * 4
    assert run.table.column("error").to_pylist() == [None] * 4
    assert RunSource(run).row(2)["method_errors"] == {"vanilla": f"metrics failed: {said[2]}"}
    assert run.failed() == 1


def test_the_older_layout_is_read_and_refused_when_continued(tmp_path):
    """A run folder an older salience wrote (``salience-run/1``: every method's refusal joined in ``error``):
    ``open_run``, the explorer and the gallery read its refusals per method from ``error`` as it was written
    (and the image's own error apart); the same command on it stops with what to do, writing nothing."""
    from salience.explore.runs import RunSource
    from salience.runs import gallery
    from salience.runs.store import pyarrow

    pa = pyarrow()
    x = _images(4)
    x[1, 0, 0, 0] = BRIGHT
    folder = tmp_path / "run"
    run = _run(x, folder, {"choosy": _choosy, "vanilla": salience.vanilla})
    assert run.failed() == 1  # image 1, which a method refused (its `error` null)
    # the older layout: no METHOD.error columns, their words in `error` as "method M failed: ..."
    manifest = json.loads((folder / "run.json").read_text())
    manifest["format"] = "salience-run/1"
    manifest.pop("seed", None)
    (folder / "run.json").write_text(json.dumps(manifest))
    joined = ["cannot identify image file", "method choosy failed: an image is too bright", None, None]
    for path in [folder / "index.parquet", *(folder / "shards").glob("*.parquet")]:
        t = pa.parquet.read_table(path)
        t = t.drop([c for c in t.column_names if c.endswith(".error")])
        t = t.set_column(t.column_names.index("error"), "error", pa.array(joined[:t.num_rows], pa.string()))
        pa.parquet.write_table(t, path)
    old = salience.open_run(folder)
    assert old.row_errors(1) == ({"choosy": "an image is too bright"}, None)
    assert old.row_errors(0) == ({}, "cannot identify image file")
    row = RunSource(old).row(1)
    assert (row["method_errors"], row["other_error"], row["error"]) == ({"choosy": "an image is too bright"}, None,
                                                                      None)
    assert json.loads(gallery.refused_json(old)) == {"1": [[0, "an image is too bright"]]}
    assert old.failed() == 2
    before = sorted(p.name for p in folder.rglob("*"))
    with pytest.raises(SalienceError, match=r"older salience \(format salience-run/1.*overwrite=True"):
        _run(x, folder, {"choosy": _choosy, "vanilla": salience.vanilla})
    assert sorted(p.name for p in folder.rglob("*")) == before
