"""The explorer on a dataset run over object storage (s3://), through its HTTP API, against the
real S3 server on 127.0.0.1 (moto, tests/s3_server.py): a row opens as the same picture, the same
top classes and the same live map as the local copy of its file; a deleted object, refused
credentials and a truncated object are clear JSON errors naming the URL, and the server goes on."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pyarrow")
from starlette.testclient import TestClient  # noqa: E402

import salience  # noqa: E402
from explore_helpers import block_worker, forget, image_endpoints, npy, wait_job  # noqa: E402
from s3_server import BUCKET, jpegs, s3, set_auth  # noqa: E402,F401 - s3 is a fixture
from salience.explore.app import create_app  # noqa: E402
from salience.explore.server import build_hub  # noqa: E402
from salience.loading import load_image, preprocess  # noqa: E402

PREFIX = "explore"  # objects of these tests only: the session's bucket is shared with test_runs_s3
N = 4  # 00..03.jpg, then 04.jpg: a truncated JPEG


@pytest.fixture(scope="module")
def env(s3, tmp_path_factory):
    if s3 is None:
        pytest.skip("moto[server] (the test extra) is not installed")
    import boto3

    root = tmp_path_factory.mktemp("explore-s3")
    (root / "local").mkdir()
    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1")
    for i, data in enumerate(jpegs(N)):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{i:02d}.jpg", Body=data)
        (root / "local" / f"{i:02d}.jpg").write_bytes(data)
    whole = jpegs(1)[0]
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{N:02d}.jpg", Body=whole[:len(whole) // 2])
    run = salience.explain_dataset("demo:shapes", f"s3://{BUCKET}/{PREFIX}/", ["vanilla"], root / "run",
                                   workers=0, batch_size=8, shard_size=8)
    hub = build_hub("demo:shapes", [root / "local", root / "run"])  # local copies f0..f3, rows r0-0..r0-4
    yield {"client": TestClient(create_app(hub)), "hub": hub, "run": run, "root": root, "boto": client, "s3": s3}
    hub.close()


def _pixels(response) -> np.ndarray:
    from PIL import Image

    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_a_remote_row_opens_like_its_local_file(env):
    from PIL import Image

    c, run, local = env["client"], env["run"], env["root"] / "local"
    assert run.table.column("path").to_pylist()[:N] == [f"s3://{BUCKET}/{PREFIX}/{i:02d}.jpg" for i in range(N)]
    rows = c.get("api/runs/r0/rows").json()["rows"]
    assert [r["image"] for r in rows] == [True] * (N + 1)  # an object is opened when clicked, not looked up
    # the picture: the local file's decoded pixels (demo:shapes takes 64x64 as it is)
    expected = np.asarray(Image.open(local / "02.jpg").convert("RGB"))
    np.testing.assert_array_equal(_pixels(c.get("api/images/r0-2/picture.png")), expected)
    assert c.get("api/runs/r0/rows/2/thumb.jpg").status_code == 200
    # the top classes: those of the local copy, and the run's prediction
    top = c.get("api/models/a/top", params={"image": "r0-2", "k": 3}).json()["classes"]
    assert top == c.get("api/models/a/top", params={"image": "f2", "k": 3}).json()["classes"]
    assert top[0]["index"] == run.row(2)["predicted"]
    # a live map on the row: the library's map of the local file
    target = int(run.row(2)["predicted"])
    r = c.post("api/explain", json={"model": "a", "image": "r0-2", "method": "vanilla", "target": target})
    j = wait_job(lambda u: c.get(u).json(), r.json())
    assert j["state"] == "done", j
    model = salience.load_model("demo:shapes")
    x = preprocess(load_image(local / "02.jpg"), model.salience_info).unsqueeze(0)
    np.testing.assert_allclose(npy(c.get(f"api/maps/{j['key']}.npy").content),
                               salience.vanilla(model, x, target)[0].numpy(), rtol=1e-5, atol=1e-7)


def test_a_deleted_object_is_404_and_the_server_goes_on(env):
    """Every endpoint that reads the image answers 404 naming the URL once the object is deleted
    and its decoded pixels and maps are out of the caches, also a map computed again in the
    worker; the row, its thumbnail and its stored map remain."""
    c, hub = env["client"], env["hub"]
    url = f"s3://{BUCKET}/{PREFIX}/03.jpg"
    j = wait_job(lambda u: c.get(u).json(), c.post("api/explain", json={
        "model": "a", "image": "r0-3", "method": "vanilla", "target": 1}).json())
    assert j["state"] == "done", j
    key = j["key"]
    env["boto"].delete_object(Bucket=BUCKET, Key=f"{PREFIX}/03.jpg")
    forget(hub)
    for name, r in image_endpoints(c, "r0-3", key).items():
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"].startswith(f"the image is gone from storage: {url}: no such object"), (name, r.text)
    # in the worker: a job that reads the image gets the 404 too, never "unexpected HTTPException" (500)
    job = hub.submit(hub.slots["a"], "read", lambda t: hub.image("r0-3"))
    assert job.wait(30) and job.state == "error" and job.status_code == 404 and url in job.error, job.error
    assert c.get(f"api/jobs/{job.id}").json()["code"] == 404
    assert c.get(f"api/maps/{key}.npy").status_code == 409  # not cached: POST api/explain again (which says 404)
    assert c.get("api/runs/r0/rows/3").json()["index"] == 3  # the row itself is still listed
    assert c.get("api/runs/r0/rows/3/thumb.jpg").status_code == 200  # the run's own thumbnail and map
    assert c.get("api/runs/r0/rows/3/maps/vanilla.npy").status_code == 200
    assert c.get("api/images/r0-1/picture.png").status_code == 200
    assert c.get("api/status").status_code == 200


def test_a_map_dropped_while_its_curves_wait_is_computed_from_the_pixels_read(env):
    """Curves asked while the image is still decoded, then the object deleted and the image and the
    map dropped from the caches before the worker gets to the job: the job computes the map of the
    pixels the request read (the same map as before), not a 500."""
    c, hub = env["client"], env["hub"]
    env["boto"].put_object(Bucket=BUCKET, Key=f"{PREFIX}/02.jpg", Body=(env["root"] / "local" / "02.jpg").read_bytes())
    j = wait_job(lambda u: c.get(u).json(), c.post("api/explain", json={
        "model": "a", "image": "r0-2", "method": "vanilla", "target": 2}).json())
    key, before = j["key"], npy(c.get(f"api/maps/{j['key']}.npy").content)
    release = block_worker(hub)
    try:
        forget(hub)
        assert c.get("api/images/r0-2/picture.png").status_code == 200  # decoded again, kept
        env["boto"].delete_object(Bucket=BUCKET, Key=f"{PREFIX}/02.jpg")
        asked = c.post(f"api/maps/{key}/curves")
        assert asked.status_code == 202, asked.text
        forget(hub)
    finally:
        release.set()
    j = wait_job(lambda u: c.get(u).json(), asked.json())
    assert j["state"] == "done", j
    np.testing.assert_array_equal(npy(c.get(f"api/maps/{key}.npy").content), before)
    forget(hub)
    assert c.post(f"api/maps/{key}/curves").status_code == 404  # asked now: the image is gone


def test_a_truncated_object_is_400(env):
    r = env["client"].get("api/images/r0-4/picture.png")
    assert r.status_code == 400 and f"s3://{BUCKET}/{PREFIX}/04.jpg" in r.json()["error"]
    assert "corrupt or truncated JPEG" in r.json()["error"]


def test_refused_credentials_are_502_naming_what_to_check(env):
    c, hub = env["client"], env["hub"]
    set_auth(env["s3"]["endpoint"], True)  # the server checks keys from now on: ours are not known to it
    try:
        r = c.get("api/images/r0-0/picture.png")  # not read yet (no decoded copy kept)
        job = hub.submit(hub.slots["a"], "read", lambda t: hub.image("r0-0"))  # and in the worker's thread
        assert job.wait(30) and job.state == "error" and job.status_code == 502, job.error
    finally:
        set_auth(env["s3"]["endpoint"], False)
    assert r.status_code == 502, r.text
    assert f"s3://{BUCKET}/{PREFIX}/00.jpg" in r.json()["error"] and "AWS_ACCESS_KEY_ID" in r.json()["error"]
    assert c.get("api/images/r0-0/picture.png").status_code == 200  # and goes on once it is allowed again


def test_only_the_runs_urls_are_served(env):
    c = env["client"]
    for image_id in (f"s3://{BUCKET}/{PREFIX}/00.jpg", "r0-5", "r0-s3:"):
        assert c.get(f"api/images/{image_id}/picture.png").status_code == 404
        assert c.get("api/models/a/top", params={"image": image_id}).status_code == 404


def test_the_pixel_limit_holds_for_objects(env):
    from salience.explore.images import ImageStore
    from salience.explore.runs import RunSource
    from salience.loading import remote

    store = ImageStore([RunSource(env["root"] / "run")], max_pixels=64 * 63)
    with pytest.raises(salience.SalienceError, match="00.jpg: 64x64 .* over the limit"):
        store.load("r0-0")
    store.close()
    with pytest.raises(salience.SalienceError, match="00.jpg: the object is over"):
        remote.read_bytes(f"s3://{BUCKET}/{PREFIX}/00.jpg", max_bytes=100)
    data = (env["root"] / "local" / "00.jpg").read_bytes()
    assert remote.read_bytes(f"s3://{BUCKET}/{PREFIX}/00.jpg", max_bytes=len(data)) == data  # the limit is inclusive
