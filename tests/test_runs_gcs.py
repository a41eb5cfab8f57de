"""Dataset runs and the explorer on images in Google Cloud Storage (gs://), through pyarrow's
GcsFileSystem, against a real storage emulator on 127.0.0.1 (the PyPI package gcp-storage-emulator,
a JSON API server in a thread, started and stopped here; ``STORAGE_EMULATOR_HOST`` points salience
at it, as it does Google's own client libraries): the same store as a run over local copies."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

import salience
from salience import SalienceError
from s3_server import jpegs

BUCKET, PREFIX, N = "salience-gcs", "val/sub", 4


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server_mod = pytest.importorskip("gcp_storage_emulator.server", reason="gcp-storage-emulator (test extra)")
    pafs = pytest.importorskip("pyarrow.fs")
    from salience.loading import remote

    server = server_mod.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    port = server._api._httpd.server_address[1]
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    remote._CACHE.clear()
    root = tmp_path_factory.mktemp("gcs")
    (root / "local").mkdir()
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}")
    for i, data in enumerate(jpegs(N)):
        with fs.open_output_stream(f"{BUCKET}/{PREFIX}/{i:02d}.jpg") as f:
            f.write(data)
        (root / "local" / f"{i:02d}.jpg").write_bytes(data)
    try:
        yield {"url": f"gs://{BUCKET}/{PREFIX}/", "root": root}
    finally:
        server.stop()
        remote._CACHE.clear()
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


def test_gs_prefix_equals_local_copies_and_opens_in_the_explorer(gcs, tmp_path):
    root = gcs["root"]
    local = salience.explain_dataset("demo:shapes", root / "local", ["vanilla"], tmp_path / "local", workers=0)
    run = salience.explain_dataset("demo:shapes", gcs["url"], ["vanilla"], tmp_path / "gs", workers=0)
    assert run.table.column("path").to_pylist() == [f"gs://{BUCKET}/{PREFIX}/{i:02d}.jpg" for i in range(N)]
    cols = [c for c in run.table.column_names if c != "path"]
    assert run.table.select(cols).equals(local.table.select(cols))
    for i in range(N):
        np.testing.assert_array_equal(run.map(i, "vanilla"), local.map(i, "vanilla"))
    # a list naming a missing object: a row with its error
    (tmp_path / "list.txt").write_text(f"gs://{BUCKET}/{PREFIX}/01.jpg\ngs://{BUCKET}/{PREFIX}/gone.jpg\n")
    listed = salience.explain_dataset("demo:shapes", tmp_path / "list.txt", ["vanilla"], tmp_path / "list", workers=0)
    # this image ran in a batch of one (its neighbour is missing), the local run's in a batch of N: the
    # convolutions may pick other kernels by batch size and round differently (seen: one pixel of 4096
    # one float16 step apart, on one pinned core), so equal up to float16 rounding, not bit for bit
    np.testing.assert_allclose(listed.map(0, "vanilla"), local.map(1, "vanilla"), rtol=2 ** -10, atol=1e-6)
    assert "no such object" in listed.row(1)["error"]
    # the explorer opens a gs:// row as the local file's pixels
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from PIL import Image
    from starlette.testclient import TestClient

    from salience.explore.app import create_app
    from salience.explore.server import build_hub

    hub = build_hub("demo:shapes", [tmp_path / "gs"])
    try:
        r = TestClient(create_app(hub)).get("api/images/r0-2/picture.png")
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")),
                                      np.asarray(Image.open(root / "local" / "02.jpg").convert("RGB")))
    finally:
        hub.close()


def test_gs_missing_prefix_says_so(gcs, tmp_path):
    with pytest.raises(SalienceError, match="no such prefix"):
        salience.explain_dataset("demo:shapes", f"gs://{BUCKET}/nothing/", ["vanilla"], tmp_path / "a", workers=0)
