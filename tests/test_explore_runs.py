"""The explorer on a dataset run (salience explain DIR --out RUN): the gallery's rows, sorted and
filtered, checked against the run's own table; a row opened as an image (the same picture and the
same live map as the file itself); the stored thumbnails and maps; bad row ids get 404 and
nothing outside the run's table is reachable."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pyarrow")
from starlette.testclient import TestClient  # noqa: E402

import salience  # noqa: E402
from explore_helpers import forget, hand_run, image_endpoints, npy, shapes_files, wait_job  # noqa: E402
from salience.explore.server import build_hub  # noqa: E402
from salience.explore.app import create_app  # noqa: E402
from salience.loading import load_image, preprocess  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-runs")
    (root / "imgs").mkdir()
    paths, labels, _ = shapes_files(root / "imgs", N)
    given = labels.clone()
    given[1] = (given[1] + 1) % 5  # a label the model gets wrong
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{p.name},{int(g)}\n" for p, g in zip(paths, given)))
    run = salience.explain_dataset("demo:shapes", paths, ["vanilla"], root / "run", labels=root / "labels.csv",
                                   metrics=["deletion"], shard_size=4, batch_size=4, workers=0)
    other = root / "elsewhere.png"
    other.write_bytes(paths[0].read_bytes())
    hub = build_hub("demo:shapes", [root / "run"])  # the run folder named like any folder of images
    client = TestClient(create_app(hub))
    yield {"client": client, "hub": hub, "run": run, "paths": paths, "root": root}
    hub.close()


def test_runs_are_listed_with_their_columns(env):
    c = env["client"]
    assert c.get("api/info").json()["runs"] == ["r0"]
    (run,) = c.get("api/runs").json()["runs"]
    assert run["id"] == "r0" and run["count"] == N and run["methods"] == ["vanilla"] and run["labels"]
    assert "vanilla.deletion" in run["metrics"] and "vanilla.deletion" in run["sortable"]
    table = env["run"].table
    assert {x["name"] for x in run["classes"]} == set(table.column("predicted_name").to_pylist())
    assert c.get("api/images").json()["images"] == []  # rows are listed by the gallery, not with the files


def _rows(c, **q):
    r = c.get("api/runs/r0/rows", params={k: str(v) for k, v in q.items()})
    assert r.status_code == 200, r.text
    return r.json()


def test_rows_sorted_and_filtered_as_the_table_says(env):
    c, table = env["client"], env["run"].table.to_pylist()
    every = _rows(c)
    assert every["total"] == N and [r["index"] for r in every["rows"]] == list(range(N))
    assert [r["id"] for r in every["rows"]] == [f"r0-{i}" for i in range(N)] and all(r["image"] for r in every["rows"])
    by_p = _rows(c, sort="probability", order="desc")["rows"]
    assert [r["index"] for r in by_p] == [t["index"] for t in sorted(table, key=lambda t: (-t["probability"],
                                                                                          -t["index"]))]
    by_del = _rows(c, sort="vanilla.deletion")["rows"]
    assert [r["vanilla.deletion"] for r in by_del] == sorted(t["vanilla.deletion"] for t in table)
    wrong = _rows(c, correct="false")
    assert [r["index"] for r in wrong["rows"]] == [t["index"] for t in table if not t["correct"]]
    assert 1 in [r["index"] for r in wrong["rows"]]
    right = _rows(c, correct="true")
    assert right["total"] + wrong["total"] == N
    name = table[0]["predicted_name"]
    for q in ({"class": name}, {"class": table[0]["predicted"]}):
        assert [r["index"] for r in _rows(c, **q)["rows"]] == [t["index"] for t in table if t["predicted_name"] == name]
    p_mid = sorted(t["probability"] for t in table)[N // 2]
    assert [r["index"] for r in _rows(c, min_probability=p_mid)["rows"]] == [
        t["index"] for t in table if t["probability"] >= p_mid]
    d_mid = sorted(t["vanilla.deletion"] for t in table)[N // 2]
    assert [r["index"] for r in _rows(c, metric="vanilla.deletion", max=d_mid)["rows"]] == [
        t["index"] for t in table if t["vanilla.deletion"] <= d_mid]
    page = _rows(c, offset=2, limit=3)
    assert page["total"] == N and [r["index"] for r in page["rows"]] == [2, 3, 4]


def test_a_row_opens_as_an_image_with_live_maps(env):
    c, run = env["client"], env["run"]
    path = env["paths"][3]
    row = c.get("api/runs/r0/rows/3").json()
    assert row["index"] == 3 and row["predicted_name"] == run.row(3)["predicted_name"]
    # the same picture and the same live map as the library on the row's image file
    from PIL import Image

    pic = np.asarray(Image.open(io.BytesIO(c.get("api/images/r0-3/picture.png").content)))
    assert pic.shape[:2] == (64, 64)
    top = c.get("api/models/a/top", params={"image": "r0-3", "k": 1}).json()["classes"][0]
    assert top["index"] == run.row(3)["predicted"]
    assert top["probability"] == pytest.approx(run.row(3)["probability"], abs=1e-5)
    target = int(run.row(3)["predicted"])
    r = c.post("api/explain", json={"model": "a", "image": "r0-3", "method": "vanilla", "target": target})
    j = wait_job(lambda u: c.get(u).json(), r.json())
    assert j["state"] == "done", j
    live = npy(c.get(f"api/maps/{j['key']}.npy").content)
    model = salience.load_model("demo:shapes")
    x = preprocess(load_image(path), model.salience_info).unsqueeze(0)
    expected = salience.vanilla(model, x, target)[0].numpy()
    np.testing.assert_allclose(live, expected, rtol=1e-5, atol=1e-7)
    # the stored map (float16 in the store) is the same map, to float16 rounding
    stored = npy(c.get("api/runs/r0/rows/3/maps/vanilla.npy").content)
    np.testing.assert_array_equal(stored, run.map(3, "vanilla"))
    reduced = live if live.ndim == 2 else np.abs(live).max(0)
    np.testing.assert_allclose(stored, reduced, rtol=2**-10, atol=1e-7)


def test_thumbnails_are_the_sprite_tiles(env):
    c = env["client"]
    from PIL import Image

    for tile in (0, 1):
        r = c.get("api/runs/r0/rows/5/thumb.jpg", params={"tile": tile})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (96, 96)
    a = np.asarray(Image.open(io.BytesIO(c.get("api/runs/r0/rows/5/thumb.jpg").content)), dtype=float)
    b = np.asarray(Image.open(io.BytesIO(c.get("api/runs/r0/rows/4/thumb.jpg").content)), dtype=float)
    assert np.abs(a - b).mean() > 1  # two images, two different tiles
    assert c.get("api/runs/r0/rows/5/thumb.jpg", params={"tile": 2}).status_code == 400


@pytest.mark.parametrize("url", [
    "api/runs/r0/rows/99", "api/runs/r0/rows/-1", "api/runs/r0/rows/x", "api/runs/r0/rows/99/thumb.jpg",
    "api/runs/r0/rows/99/maps/vanilla.npy", "api/runs/r0/rows/1/maps/gradcam.npy", "api/runs/r9/rows",
    "api/images/r0-99/picture.png", "api/images/r1-0/picture.png", "api/images/r0-x/picture.png",
    "api/images/r0-/picture.png",
    # one row, one id: not another spelling of row 3 (int() takes leading zeros, a sign, other scripts' digits)
    "api/images/r0-03/picture.png", "api/images/r0-\u0663/picture.png", "api/runs/r0/rows/03",
    "api/runs/r0/rows/+3", "api/runs/r0/rows/03/thumb.jpg",
])
def test_bad_row_ids_are_404(env, url):
    r = env["client"].get(url)
    assert r.status_code == 404 and r.json()["error"]


@pytest.mark.parametrize("query", [{"sort": "nope"}, {"sort": "error"}, {"metric": "path", "min": "1"},
                                   {"order": "up"}, {"correct": "maybe"}, {"min_probability": "x"},
                                   {"limit": "0"}])
def test_bad_queries_are_400(env, query):
    r = env["client"].get("api/runs/r0/rows", params=query)
    assert r.status_code == 400 and r.json()["error"]


def test_explain_on_a_missing_row_is_404(env):
    r = env["client"].post("api/explain", json={"model": "a", "image": "r0-42", "method": "vanilla", "target": 0})
    assert r.status_code == 404


def test_a_deleted_file_is_404_from_every_endpoint_and_from_the_worker(tmp_path):
    """A local row's file deleted after the run (and out of the caches): every endpoint that reads
    the image answers 404 naming the file, as for a deleted object, also a job in the worker; the
    row, its thumbnail and its stored map remain. A Dataset's row (no file) stays "no image"."""
    import torch

    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", 2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], tmp_path / "run", workers=0)
    images, _, _ = salience.data.shapes(2, 7)
    salience.explain_dataset("demo:shapes", torch.utils.data.TensorDataset(images), ["vanilla"], tmp_path / "ds",
                             workers=0)
    hub = build_hub("demo:shapes", [tmp_path / "run", tmp_path / "ds"])
    c = TestClient(create_app(hub))
    try:
        j = wait_job(lambda u: c.get(u).json(), c.post("api/explain", json={
            "model": "a", "image": "r0-1", "method": "vanilla", "target": 1}).json())
        assert j["state"] == "done", j
        paths[1].unlink()
        forget(hub)
        for name, r in image_endpoints(c, "r0-1", j["key"]).items():
            assert r.status_code == 404, (name, r.text)
            assert r.json()["error"].startswith(f"the image is gone from disk: {paths[1].resolve()}: no such file"), \
                (name, r.text)
        job = hub.submit(hub.slots["a"], "read", lambda t: hub.image("r0-1"))
        assert job.wait(30) and job.state == "error" and job.status_code == 404 and "gone" in job.error, job.error
        assert c.get("api/runs/r0/rows/1/thumb.jpg").status_code == 200
        assert c.get("api/runs/r0/rows/1/maps/vanilla.npy").status_code == 200
        assert c.get("api/runs/r0/rows").json()["rows"][1]["image"] is False  # listed again: nothing to open
        assert c.get("api/images/r0-0/picture.png").status_code == 200
        assert c.get("api/runs/r1/rows/0").json()["path"] == "TensorDataset[0]"
        r = c.get("api/images/r1-0/picture.png")
        assert r.status_code == 404 and r.json()["error"].startswith(  # it said "upload it or pick one"
            "no image 'r1-0': row 0 of run 'r1' is the item TensorDataset[0] of a Dataset, not an image file"), r.text
        assert "GET api/runs/r1/rows/0/thumb.jpg" in r.json()["error"], r.text
        assert c.get("api/runs/r1/rows/0/thumb.jpg").status_code == 200
    finally:
        hub.close()


def test_a_run_without_stored_thumbnails_or_maps_is_404_saying_what_is_missing(tmp_path, caplog):
    """A run folder whose table lacks shard / offset, whose sprite or map file is missing, or is
    damaged: the row's thumbnail and stored map are 404 with what is missing (no 500 with a
    traceback), said once in the log as a one-line warning; the rows and the row still answer.
    A table without paths lists its rows with no image."""
    where = {"path": ["a.png", "b.png"], "shard": ["s0", "s0"], "offset": [0, 1]}
    folders = [hand_run(tmp_path / "noshard", path=["a.png", "b.png"]),
               hand_run(tmp_path / "gone", **where), hand_run(tmp_path / "bad", **where),
               hand_run(tmp_path / "nopath")]
    (tmp_path / "bad" / "thumbs").mkdir()
    (tmp_path / "bad" / "thumbs" / "s0.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad" / "maps" / "vanilla").mkdir(parents=True)
    (tmp_path / "bad" / "maps" / "vanilla" / "s0.npy").write_bytes(b"not an npy")
    hub = build_hub("demo:shapes", folders)
    c = TestClient(create_app(hub))
    want = {"r0": ("lacks the columns 'shard' and 'offset'", "lacks the columns 'shard' and 'offset'"),
            "r1": ("s0.jpg is missing", "s0.npy is missing"), "r2": ("damaged", "damaged"),
            "r3": ("lacks the columns 'shard' and 'offset'", "lacks the columns 'shard' and 'offset'")}
    try:
        for run, (thumb, stored) in want.items():
            assert c.get(f"api/runs/{run}/rows").status_code == 200
            row = c.get(f"api/runs/{run}/rows/1")
            assert row.status_code == 200 and row.json()["image"] is False, row.text
            for _ in range(2):
                for url, says in ((f"api/runs/{run}/rows/1/thumb.jpg", thumb),
                                  (f"api/runs/{run}/rows/1/maps/vanilla.npy", stored)):
                    r = c.get(url)
                    assert r.status_code == 404 and says in r.json()["error"], (url, r.status_code, r.text)
        warned = [rec for rec in caplog.records if rec.name == "salience.explore"]
        assert len(warned) == 8 and all(rec.levelname == "WARNING" and rec.exc_info is None
                                        and "\n" not in rec.getMessage() for rec in warned), warned
        assert c.get("api/runs/r3/rows").json()["rows"][0] == {"index": 0, "id": "r3-0", "image": False, "constant": {},
                                                               "method_errors": {}, "other_error": None}
    finally:
        hub.close()


def test_a_table_without_an_index_column_addresses_its_rows_by_position(tmp_path):
    """A run table written without the ``index`` column (by hand, by another program): its rows are
    addressed by their position everywhere, the gallery (sorted by it, ids), a row, its image, its
    stored map (it answered "no row" for every row, and the gallery a 400 or a 500)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs.store import FORMAT

    paths, _, _ = shapes_files(tmp_path, 3)
    folder = tmp_path / "run"
    (folder / "maps" / "vanilla").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": FORMAT, "methods": ["vanilla"], "labels": False,
                                                 "metrics": [], "command": {"model": "demo:shapes",
                                                                            "inputs": {"count": 3}}}))
    pq.write_table(pa.table({"path": [str(p) for p in paths], "probability": [0.5, 0.9, 0.1],
                             "shard": ["s0"] * 3, "offset": pa.array([2, 1, 0], pa.int32())}),
                   folder / "index.parquet")
    maps = np.stack([np.full((1, 4, 4), v, np.float16) for v in (7.0, 8.0, 9.0)])  # by offset
    np.save(folder / "maps" / "vanilla" / "s0.npy", maps)
    hub = build_hub("demo:shapes", [folder])
    c = TestClient(create_app(hub))
    try:
        (run,) = c.get("api/runs").json()["runs"]
        assert run["count"] == 3 and run["sortable"][0] == "index"
        assert [r["id"] for r in _rows(c)["rows"]] == ["r0-0", "r0-1", "r0-2"]
        by_p = _rows(c, sort="probability", order="desc")["rows"]
        assert [(r["id"], r["probability"]) for r in by_p] == [("r0-1", 0.9), ("r0-0", 0.5), ("r0-2", 0.1)]
        row = c.get("api/runs/r0/rows/2")
        assert row.status_code == 200, row.text
        assert row.json()["path"] == str(paths[2]) and row.json()["image"] is True
        assert c.get("api/runs/r0/rows/3").status_code == 404
        picture = c.get("api/images/r0-2/picture.png")
        assert picture.status_code == 200
        from PIL import Image

        shown = np.asarray(Image.open(io.BytesIO(picture.content)).convert("RGB"))
        assert np.array_equal(shown, np.asarray(Image.open(paths[2]).convert("RGB")))
        for index, value in ((0, 9.0), (2, 7.0)):  # row 0 is at offset 2
            m = c.get(f"api/runs/r0/rows/{index}/maps/vanilla.npy")
            assert m.status_code == 200, m.text
            assert np.array_equal(npy(m.content), np.full((4, 4), value, np.float32))
    finally:
        hub.close()


def _rewritten(env, tmp_path, order):
    """A copy of the module's run whose ``index.parquet`` holds the rows at ``order`` (positions in
    the sorted table, in that order: shuffled, some left out, some twice), as pandas or a merge of
    shards in another order writes it; its explorer's client and hub, and the run read back."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "run"
    shutil.copytree(env["root"] / "run", folder)
    table = pq.read_table(folder / "index.parquet")
    pq.write_table(table.take(pa.array(order)), folder / "index.parquet")
    hub = build_hub("demo:shapes", [folder])
    return TestClient(create_app(hub)), hub, salience.open_run(folder)


def _same_row_everywhere(env, c, run, index):
    """Row ``index`` of the rewritten run is the module's row ``index``: its row (the library's and
    the explorer's), stored map, thumbnails and picture."""
    ref, sorted_c = env["run"], env["client"]
    assert run.row(index) == ref.row(index)
    np.testing.assert_array_equal(run.map(index, "vanilla"), ref.map(index, "vanilla"))
    assert run.image_path(index) == ref.image_path(index)
    for url in (f"api/runs/r0/rows/{index}", f"api/runs/r0/rows/{index}/maps/vanilla.npy",
                f"api/runs/r0/rows/{index}/thumb.jpg", f"api/runs/r0/rows/{index}/thumb.jpg?tile=1",
                f"api/images/r0-{index}/picture.png"):
        got, want = c.get(url), sorted_c.get(url)
        assert got.status_code == 200, (url, got.text)
        assert got.content == want.content, url


def test_a_shuffled_table_gives_each_index_its_own_row_map_and_picture(env, tmp_path):
    """``index.parquet`` with its rows in another order (pandas after a sort, shards merged in
    another order): each index has the same row, stored map, thumbnails and picture as in the
    sorted table (they were looked up by a binary search as if sorted: "no row" for most rows),
    and the gallery lists them by index as before."""
    order = [3, 0, 5, 1, 4, 2]
    c, hub, run = _rewritten(env, tmp_path, order)
    try:
        assert run.table.column("index").to_pylist() == order  # read in its own order
        for index in range(N):
            _same_row_everywhere(env, c, run, index)
        assert _rows(c) == _rows(env["client"])
        assert _rows(c, sort="probability", order="desc") == _rows(env["client"], sort="probability", order="desc")
    finally:
        hub.close()


def test_a_table_with_a_gap_answers_no_row_for_the_missing_index(env, tmp_path):
    """A row left out (a filter), the others shuffled: the missing index is "no row" (404) as any
    index the run does not have, the others their own rows."""
    c, hub, run = _rewritten(env, tmp_path, [5, 0, 3, 1, 4])
    try:
        for index in (0, 1, 3, 4, 5):
            _same_row_everywhere(env, c, run, index)
        with pytest.raises(salience.SalienceError, match="image 2 is not in the run"):
            run.row(2)
        for url in ("api/runs/r0/rows/2", "api/runs/r0/rows/2/maps/vanilla.npy", "api/images/r0-2/picture.png"):
            assert c.get(url).status_code == 404, url
        assert [r["index"] for r in _rows(c)["rows"]] == [0, 1, 3, 4, 5]
    finally:
        hub.close()


def _index_3_repeated(env, tmp_path):
    """The run rewritten with row 5's copy relabelled index 3 ahead of the table (as a bad merge
    writes): ``(client, hub, run)``, the hub to close."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c, hub, run = _rewritten(env, tmp_path, list(range(N)))
    hub.close()
    table = pq.read_table(tmp_path / "run" / "index.parquet")
    copy = table.slice(5, 1).set_column(0, "index", pa.array([3], pa.int64()))
    pq.write_table(pa.concat_tables([copy, table]), tmp_path / "run" / "index.parquet")
    hub = build_hub("demo:shapes", [tmp_path / "run"])
    return TestClient(create_app(hub)), hub, salience.open_run(tmp_path / "run")


def test_a_repeated_index_is_refused_naming_it_and_what_to_do(env, tmp_path):
    """Two rows with index 3 (another row's copy relabelled, as a bad merge writes): which one is
    meant cannot be known, so row 3 is refused, by the library (a SalienceError) and the explorer
    (409), naming the index, the table and what to do (the first of the two was taken silently);
    the other rows are still their own."""
    c, hub, run = _index_3_repeated(env, tmp_path)
    try:
        said = r"image 3 has 2 rows in the run's table \(.*index\.parquet: rows 0, 4\).*drop_duplicates"
        for call in (lambda: run.row(3), lambda: run.map(3, "vanilla"), lambda: run.thumbnail(3)):
            with pytest.raises(salience.SalienceError, match=said):
                call()
        for url in ("api/runs/r0/rows/3", "api/runs/r0/rows/3/maps/vanilla.npy", "api/runs/r0/rows/3/thumb.jpg",
                    "api/images/r0-3/picture.png"):
            r = c.get(url)
            assert r.status_code == 409 and "image 3 has 2 rows" in r.json()["error"], (url, r.status_code, r.text)
        r = c.post("api/explain", json={"model": "a", "image": "r0-3", "method": "vanilla", "target": 0})
        assert r.status_code == 409, r.text
        for index in (0, 1, 2, 4, 5):
            _same_row_everywhere(env, c, run, index)
    finally:
        hub.close()


def test_the_gallery_leaves_out_a_repeated_index_naming_it_and_what_to_do(env, tmp_path):
    """Two rows with index 3 (row 5's copy relabelled, as a bad merge writes): both were listed with
    the id ``r0-3``, whose every URL answers 409; now the gallery offers only rows that open (every
    sort and filter), and ``left_out`` says the rows, the image and why: index 3, and what to do. The
    run counts 6 images (``len(run)``: index 3 once), the gallery 5 plus the image left out, and
    the run is not complete."""
    c, hub, run = _index_3_repeated(env, tmp_path)
    try:
        assert len(run) == N and not run.complete
        (described,) = c.get("api/runs").json()["runs"]
        assert described["count"] == N and described["complete"] is False
        name = env["run"].row(5)["predicted_name"]  # the copy's class: a filter that kept it
        for q in ({}, {"sort": "probability", "order": "desc"}, {"class": name}, {"limit": 2, "offset": 2}):
            page = _rows(c, **q)
            assert 3 not in [r["index"] for r in page["rows"]], q
            for r in page["rows"]:
                assert c.get(f"api/runs/r0/rows/{r['index']}").status_code == 200, (q, r["id"])
            assert page["left_out"]["rows"] == 2 and page["left_out"]["images"] == 1
            said = page["left_out"]["reason"]
            assert "1 index value(s) to more than one row (2 rows; index 3)" in said, said
            assert "df.drop_duplicates('index')" in said and "delete index.parquet" in said, said
        every = _rows(c)
        assert [r["index"] for r in every["rows"]] == [0, 1, 2, 4, 5]
        assert every["total"] + every["left_out"]["images"] == len(run) == described["count"]
        assert [r["index"] for r in _rows(c, **{"class": name})["rows"]] == [
            i for i in (0, 1, 2, 4, 5) if env["run"].row(i)["predicted_name"] == name]
        assert list(run.repeated()) == [3]
    finally:
        hub.close()


def _live_map(c, image_id):
    """The explorer's live vanilla map of ``image_id`` for class 0."""
    j = wait_job(lambda u: c.get(u).json(), c.post("api/explain", json={
        "model": "a", "image": image_id, "method": "vanilla", "target": 0}).json())
    assert j["state"] == "done", j
    return npy(c.get(f"api/maps/{j['key']}.npy").content)


def test_rows_without_an_index_leave_the_others_their_own(env, tmp_path):
    """A shuffled table whose row 2 (image 5) has an empty (null) index: every lookup was refused
    (409 "which row is which is then unknown"), so the gallery listed rows whose every link could
    only fail; now each row with an index is its own image everywhere (row, map, thumbnails,
    picture, a live map), the empty one is no image's (index 5 is "not in the run", 404, saying
    it may be a row without an index and what to do), the run is not complete, and running the
    same command again mends it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c, hub, run = _rewritten(env, tmp_path, [3, 0, 5, 1, 4, 2])
    hub.close()
    table = pq.read_table(tmp_path / "run" / "index.parquet")
    pq.write_table(table.set_column(0, "index", pa.array([3, 0, None, 1, 4, 2], pa.int64())),
                   tmp_path / "run" / "index.parquet")
    hub = build_hub("demo:shapes", [tmp_path / "run"])
    c, run = TestClient(create_app(hub)), salience.open_run(tmp_path / "run")
    try:
        assert len(run) == N - 1 and not run.complete and not len(run.repeated())
        assert "1 row(s) without an index (the first: row 2)" in str(run.index_error())
        for index in range(N - 1):
            _same_row_everywhere(env, c, run, index)
            assert run.thumbnail(index)[1] == env["run"].thumbnail(index)[1]
        said = r"image 5 is not in the run.*may be one of the rows without an index.*1 row\(s\) without an index " \
               r"\(the first: row 2\); every row needs its image's index"
        for call in (lambda: run.row(5), lambda: run.map(5, "vanilla"), lambda: run.thumbnail(5)):
            with pytest.raises(salience.SalienceError, match=said) as caught:
                call()
            assert not isinstance(caught.value, salience.runs.store.BadIndex)
        for url in ("api/runs/r0/rows/5", "api/runs/r0/rows/5/maps/vanilla.npy", "api/runs/r0/rows/5/thumb.jpg",
                    "api/images/r0-5/picture.png"):
            assert c.get(url).status_code == 404, url
        assert "may be one of the rows without an index" in c.get("api/runs/r0/rows/5").json()["error"]
        # the picture (and a live map) of image r0-5 said "no image 'r0-5'; upload it or pick one of GET
        # api/images": now which it is (no row with index 5, maybe a row without one) and what to do
        for r in (c.get("api/images/r0-5/picture.png"),
                  c.post("api/explain", json={"model": "a", "image": "r0-5", "method": "vanilla", "target": 0})):
            said = r.json()["error"]
            assert r.status_code == 404 and said.startswith("no image 'r0-5': image 5 is not in the run"), said
            assert "may be one of the rows without an index: " in said and "(the first: row 2)" in said, said
            assert "fill them in, or write the table without the index column" in said, said
        np.testing.assert_array_equal(_live_map(c, "r0-4"), _live_map(env["client"], "r0-4"))
    finally:
        hub.close()
    again = salience.explain_dataset("demo:shapes", env["paths"], ["vanilla"], tmp_path / "run",
                                     labels=env["root"] / "labels.csv", metrics=["deletion"], shard_size=4,
                                     batch_size=4, workers=0)
    assert again.complete and again.index_error() is None and again.row(5) == env["run"].row(5)


def test_iterating_a_run_gives_each_images_row_as_run_row_does(env, tmp_path, monkeypatch):
    """``for row in run`` gave the table's raw rows in the table's order: with a shuffled table and a
    row without an index, ``len(run) + 1`` rows, one of them no image's (``run.map(None, ...)`` fails);
    now each image once, by index, the dict ``run.row(i)`` gives, its map read by its index (read a
    few rows at a time: 2 here); a repeated index raises the run's BadIndex before any row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salience.runs import store

    monkeypatch.setattr(store, "ITER_ROWS", 2, raising=False)
    assert list(env["run"]) == [env["run"].row(i) for i in range(N)]  # the sorted table salience writes
    c, hub, run = _rewritten(env, tmp_path, [3, 0, 5, 1, 4, 2])
    hub.close()
    table = pq.read_table(tmp_path / "run" / "index.parquet")
    pq.write_table(table.set_column(0, "index", pa.array([3, 0, None, 1, 4, 2], pa.int64())),
                   tmp_path / "run" / "index.parquet")
    run = salience.open_run(tmp_path / "run")
    rows = list(run)
    assert len(rows) == len(run) == N - 1
    assert rows == [env["run"].row(i) for i in range(N - 1)]
    for row in rows:
        np.testing.assert_array_equal(run.map(row["index"], "vanilla"), env["run"].map(row["index"], "vanilla"))
    c, hub, repeated = _index_3_repeated(env, tmp_path / "repeated")
    hub.close()
    with pytest.raises(salience.runs.store.BadIndex, match=r"more than one row \(2 rows; index 3\)"):
        next(iter(repeated))


def test_explore_takes_the_run_that_explain_dataset_returns(env):
    """``salience.explore(model, run=salience.explain_dataset(...))``: ``list(run)`` made the run its
    rows, each refused as no folder; now a Run is one run, alone or in a list, as its folder is."""
    import httpx

    for given in (env["run"], [env["run"], env["root"] / "run"]):
        ex = salience.explore("demo:shapes", run=given, show=False)
        try:
            runs = httpx.get(ex.url + "api/runs").json()["runs"]
            assert [(r["id"], r["count"], r["folder"]) for r in runs] == [
                (f"r{n}", N, str(env["run"].folder)) for n in range(len(runs))]
            assert len(runs) == (1 if given is env["run"] else 2)
            assert httpx.get(ex.url + "api/images/r0-3/picture.png").status_code == 200
        finally:
            ex.stop()


def test_a_repeated_index_beside_rows_without_one_names_its_own_rows(env, tmp_path):
    """Rows without an index and a repeated one: the repeated index's refusal names its rows'
    positions in the table as it is (the rows without an index counted), and the others are theirs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c, hub, run = _rewritten(env, tmp_path, [3, 0, 5, 1, 4, 2, 3])
    hub.close()
    table = pq.read_table(tmp_path / "run" / "index.parquet")
    pq.write_table(table.set_column(0, "index", pa.array([None, 0, 5, None, 4, 2, 5], pa.int64())),
                   tmp_path / "run" / "index.parquet")
    run = salience.open_run(tmp_path / "run")
    with pytest.raises(salience.runs.store.BadIndex, match=r"image 5 has 2 rows .*rows 2, 6\)"):
        run.row(5)
    assert list(run.repeated()) == [5] and len(run) == 4 and not run.complete
    for index in (0, 2, 4):
        assert run.row(index) == env["run"].row(index)
        np.testing.assert_array_equal(run.map(index, "vanilla"), env["run"].map(index, "vanilla"))


def test_a_repeated_index_hiding_a_missing_image_is_not_complete_and_a_rerun_mends_it(env, tmp_path):
    """``index.parquet`` with row 3 twice and image 4 gone (a bad merge), its shard of images 4-5
    lost: as many rows as images, so ``run.complete`` said True and ``len(run)`` 6 while image 4
    has no row; now ``len(run)`` counts the distinct indices (5), ``complete`` is False (the
    library, the explorer's run and the CLI's "run the same command again"), and running the same
    command again recomputes images 4 and 5: complete, row 4 the module's own."""
    c, hub, run = _rewritten(env, tmp_path, [0, 1, 2, 3, 3, 5])
    try:
        assert run.table.num_rows == N
        assert len(run) == N - 1 and not run.complete
        (described,) = c.get("api/runs").json()["runs"]
        assert described["count"] == N - 1 and described["complete"] is False
    finally:
        hub.close()
    (tmp_path / "run" / "shards" / f"{4:09d}.parquet").unlink()  # images 4 and 5 never stored
    again = salience.explain_dataset("demo:shapes", env["paths"], ["vanilla"], tmp_path / "run",
                                     labels=env["root"] / "labels.csv", metrics=["deletion"], shard_size=4,
                                     batch_size=4, workers=0)
    assert again.complete and len(again) == N
    assert again.table.column("index").to_pylist() == list(range(N))
    for index in range(N):
        assert again.row(index)["predicted"] == env["run"].row(index)["predicted"]
        np.testing.assert_allclose(again.map(index, "vanilla"), env["run"].map(index, "vanilla"), rtol=1e-3, atol=1e-6)


def test_the_gallery_leaves_out_rows_without_an_index_saying_why(env, tmp_path):
    """A row whose index is null was listed as id ``r0-None``, which cannot be opened; now it is
    left out, the page says how many and why (the table's refusal), the run counts the images with
    an index and is not complete; the rows it lists open (each answered 409 while any row lacked
    an index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c, hub, run = _rewritten(env, tmp_path, list(range(N)))
    hub.close()
    table = pq.read_table(tmp_path / "run" / "index.parquet")
    pq.write_table(table.set_column(0, "index", pa.array([0, None, 2, 3, 4, 5], pa.int64())),
                   tmp_path / "run" / "index.parquet")
    hub = build_hub("demo:shapes", [tmp_path / "run"])
    c, run = TestClient(create_app(hub)), salience.open_run(tmp_path / "run")
    try:
        assert len(run) == N - 1 and not run.complete
        for q in ({}, {"sort": "probability", "order": "desc"}):
            page = _rows(c, **q)
            assert sorted(r["index"] for r in page["rows"]) == [0, 2, 3, 4, 5] and page["total"] == N - 1
            assert all(r["id"] != "r0-None" for r in page["rows"])
            for r in page["rows"]:
                assert c.get(f"api/runs/r0/rows/{r['index']}").status_code == 200, (q, r["id"])
            assert page["left_out"]["rows"] == 1
            assert "1 row(s) without an index (the first: row 1)" in page["left_out"]["reason"]
        (described,) = c.get("api/runs").json()["runs"]
        assert described["count"] == N - 1 and described["complete"] is False
    finally:
        hub.close()
