"""The run gallery's rows (salience.explore.runs.RunSource.rows) on synthetic run indexes written
directly as Parquet: every sort and filter equals a hand-written Python reference (rows without a
value last, by index; ties by index), and a run of 200,000 rows answers a page without turning its
rows into Python objects (only the page's rows become dicts; Python's memory stays small)."""
from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from salience import SalienceError  # noqa: E402
from salience.explore.runs import RunSource  # noqa: E402
from salience.runs.store import FORMAT  # noqa: E402

NAMES = ["circle", "square", "triangle", "cross", "ring"]


def _write_run(folder, columns: dict, labels: bool = True) -> RunSource:
    folder.mkdir()
    n = len(columns["index"])
    (folder / "run.json").write_text(json.dumps({
        "format": FORMAT, "methods": ["vanilla"], "labels": labels, "metrics": ["deletion"],
        "command": {"model": "demo:shapes", "inputs": {"count": n}}}))
    pq.write_table(pa.table(columns), folder / "index.parquet")
    return RunSource(folder)


def _small(tmp_path, n: int = 240, seed: int = 3) -> tuple[RunSource, list[dict]]:
    """A run with every kind of missing value (null, NaN, inf), many ties, and gaps in the index."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    predicted = [None if rng.random() < 0.05 else int(rng.integers(5)) for _ in range(n)]
    prob = [None if rng.random() < 0.08 else float(round(rng.random(), 1)) for _ in range(n)]
    for i in (3, 17):
        prob[i] = math.nan
    prob[30] = math.inf
    label = [int(rng.integers(5)) for _ in range(n)]
    metric = [None if rng.random() < 0.1 else float(round(rng.random(), 1)) for _ in range(n)]
    metric[5] = math.nan
    cols = {
        "index": pa.array(index, pa.int64()),
        "path": pa.array([f"img{int(rng.integers(20)):02d}.png" for _ in range(n)]),
        "predicted": pa.array(predicted, pa.int64()),
        "predicted_name": pa.array([None if p is None else NAMES[p] for p in predicted]),
        "probability": pa.array(prob, pa.float64()),
        "label": pa.array(label, pa.int64()),
        "correct": pa.array([None if p is None else p == lb for p, lb in zip(predicted, label)], pa.bool_()),
        "error": pa.array([None] * n, pa.string()),
        "vanilla.deletion": pa.array(metric, pa.float64()),
    }
    source = _write_run(tmp_path / "small", cols)
    return source, pa.table(cols).to_pylist()


def _value(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _reference(table: list[dict], sort="index", descending=False, cls=None, correct=None, pmin=None, pmax=None,
               metric=None, low=None, high=None) -> list[int]:
    """The gallery's order written out by hand: the rows' indexes."""
    kept = []
    for r in table:
        if cls is not None and cls != str(r["predicted"]) and cls != r["predicted_name"]:
            continue
        if correct is not None and r["correct"] is not correct:
            continue
        p = _value(r["probability"])
        if (pmin is not None or pmax is not None) and (p is None or (pmin is not None and p < pmin)
                                                       or (pmax is not None and p > pmax)):
            continue
        if metric is not None and (low is not None or high is not None):
            v = _value(r[metric])
            if v is None or (low is not None and v < low) or (high is not None and v > high):
                continue
        kept.append(r)
    present = sorted((r for r in kept if _value(r[sort]) is not None), key=lambda r: (r[sort], r["index"]),
                     reverse=descending)
    missing = sorted((r for r in kept if _value(r[sort]) is None), key=lambda r: r["index"])
    return [r["index"] for r in present + missing]


def _got(source, **q) -> list[int]:
    found = source.rows(**q, offset=0, limit=10_000)
    assert found["total"] == len(found["rows"])
    return [r["index"] for r in found["rows"]]


def test_every_sort_equals_the_reference(tmp_path):
    source, table = _small(tmp_path)
    assert source.sortable() == ["index", "predicted", "predicted_name", "probability", "label", "correct", "path",
                                 "vanilla.deletion"]
    for sort in source.sortable():
        for descending in (False, True):
            assert _got(source, sort=sort, descending=descending) == _reference(table, sort, descending), \
                (sort, descending)


@pytest.mark.parametrize("q", [
    {"cls": "square"}, {"cls": "2"}, {"cls": "nothing"}, {"correct": True}, {"correct": False},
    {"min_probability": 0.3}, {"max_probability": 0.6}, {"min_probability": 0.2, "max_probability": 0.7},
    {"metric": "vanilla.deletion", "low": 0.4}, {"metric": "vanilla.deletion", "high": 0.3},
    {"metric": "vanilla.deletion"},  # no bounds: no filter
    {"cls": "1", "correct": True, "min_probability": 0.1, "metric": "vanilla.deletion", "high": 0.8},
])
def test_each_filter_equals_the_reference(tmp_path, q):
    source, table = _small(tmp_path)
    ref = {"pmin": q.get("min_probability"), "pmax": q.get("max_probability"), "cls": q.get("cls"),
           "correct": q.get("correct"), "metric": q.get("metric"), "low": q.get("low"), "high": q.get("high")}
    for sort, descending in (("probability", True), ("vanilla.deletion", False), ("path", True)):
        want = _reference(table, sort, descending, **ref)
        assert _got(source, sort=sort, descending=descending, **q) == want, (q, sort)
    if q.get("cls") == "nothing":
        assert want == []


def test_pages_cut_the_same_order_also_across_the_missing_rows(tmp_path):
    source, table = _small(tmp_path)
    want = _reference(table, "probability", True)
    n_present = sum(_value(r["probability"]) is not None for r in table)
    for offset, limit in ((0, 7), (n_present - 3, 7), (n_present, 5), (n_present + 2, 100), (len(table), 10),
                          (len(table) + 50, 10)):
        page = source.rows(sort="probability", descending=True, offset=offset, limit=limit)
        assert page["total"] == len(table)
        assert [r["index"] for r in page["rows"]] == want[offset:offset + limit], (offset, limit)
    row = page = source.rows(offset=4, limit=1)["rows"][0]
    assert row["id"] == f"r0-{table[4]['index']}" and row["image"] is False  # no such file: not openable
    assert source.row(table[4]["index"]) == row
    with pytest.raises(KeyError):
        source.row(table[4]["index"] + 1 if table[5]["index"] != table[4]["index"] + 1 else -1)
    assert math.isnan(table[3]["probability"]) and source.row(table[3]["index"])["probability"] is None
    assert {c["name"] for c in source.describe()["classes"]} == {r["predicted_name"] for r in table} - {None}
    with pytest.raises(SalienceError, match="sort must be"):
        source.rows(sort="error")
    with pytest.raises(SalienceError, match="metric must be"):
        source.rows(metric="probability", low=0.1)


def test_a_run_without_labels_has_no_right_or_wrong(tmp_path):
    source = _write_run(tmp_path / "nolabels", {"index": pa.array([0, 1], pa.int64()), "path": ["a", "b"],
                                                 "probability": pa.array([0.5, 0.2])}, labels=False)
    assert [r["index"] for r in source.rows(sort="probability")["rows"]] == [1, 0]
    with pytest.raises(SalienceError, match="no labels"):
        source.rows(correct=True)


LARGE = 200_000
PYTHON_PEAK_BYTES = 8 * 2**20
"""Most Python memory (tracemalloc: Python objects and NumPy arrays, not Arrow's buffers) that one
page of the 200,000-row run may take. The page's 50 dicts take a few kB; the row dicts of the whole
run would take over 100 MB (a dict of 9 keys is ~650 bytes alone), a Python list of one column
~7 MB, the index column as NumPy 1.6 MB. Measured: 44 kB."""


def test_a_large_run_answers_a_page_without_its_rows_in_python(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    predicted = rng.integers(0, 5, LARGE)
    label = rng.integers(0, 5, LARGE)
    prob = np.round(rng.random(LARGE), 3)
    prob[rng.random(LARGE) < 0.05] = np.nan
    source = _write_run(tmp_path / "large", {
        "index": pa.array(np.arange(LARGE, dtype=np.int64)),
        "path": pa.array(np.char.add("img", np.arange(LARGE).astype(str)).astype(object)),
        "predicted": pa.array(predicted), "predicted_name": pa.array(np.array(NAMES, dtype=object)[predicted]),
        "probability": pa.array(prob), "label": pa.array(label), "correct": pa.array(predicted == label),
        "vanilla.deletion": pa.array(rng.random(LARGE)),
        "shard": pa.array(np.char.add("s", (np.arange(LARGE) // 256).astype(str)).astype(object)),
        "offset": pa.array(np.arange(LARGE, dtype=np.int64) % 256)})
    source.run.table  # read the Parquet file first: Arrow's memory, not what is measured
    converted = []
    dicts = RunSource._dicts
    monkeypatch.setattr(RunSource, "_dicts", lambda self, t: converted.append(t.num_rows) or dicts(self, t))
    tracemalloc.start()
    try:
        found = source.rows(sort="probability", descending=True, correct=False, min_probability=0.2,
                            offset=1000, limit=50)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(converted) == 50
    assert peak < PYTHON_PEAK_BYTES, peak
    tracemalloc.start()  # opening a row deep in the run (its thumbnail's sprite and place): no per-row objects
    try:
        sprite, offset = source.run.thumbnail(123_456)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sprite.name, offset) == (f"s{123_456 // 256}.jpg", 123_456 % 256)
    assert peak < PYTHON_PEAK_BYTES, peak
    keep = (predicted != label) & (prob >= 0.2)  # NaN >= 0.2 is False: left out, as the gallery does
    idx = np.nonzero(keep)[0]
    order = idx[np.lexsort((-idx, -prob[idx]))]  # probability descending, ties by index descending
    assert found["total"] == int(keep.sum())
    assert [r["index"] for r in found["rows"]] == order[1000:1050].tolist()
    assert all(r["probability"] == prob[r["index"]] for r in found["rows"])
