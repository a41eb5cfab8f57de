"""The Ray engine on a local cluster of 2 CPUs (started here, shut down after): the same store as
the local engine, and resumable the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import salience
from salience import open_run
from s3_server import s3  # noqa: F401 - a fixture: the S3 server, started before the cluster (its workers see it)

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")

N, SHARD, BATCH = 20, 8, 4
METHODS = ["vanilla", "gradcam"]


@pytest.fixture(scope="module")
def cluster(s3):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("ray")
    imgs, _, _ = salience.data.shapes(N, seed=3)
    (root / "imgs").mkdir()
    for i in range(N):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            root / "imgs" / f"{i:03d}.png")
    (root / "imgs" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _run(root: Path, out: str, engine: str):
    return salience.explain_dataset("demo:shapes", root / "imgs", METHODS, root / out, top=2, shard_size=SHARD,
                                    batch_size=BATCH, workers=0, engine=engine)


def test_ray_equals_local_and_resumes(cluster, images):
    local = _run(images, "local", "local")
    on_ray = _run(images, "ray", "ray")
    assert ray.is_initialized()  # the caller's cluster is left running
    cols = [c for c in local.table.column_names if c != "shard"]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    assert on_ray.table.column("error").to_pylist()[N] is not None
    for i in range(N):
        for m in METHODS:
            for k in range(2):
                np.testing.assert_array_equal(on_ray.map(i, m, k), local.map(i, m, k))
    # a run stopped before its last shards: the same command on Ray computes only those
    folder = images / "ray"
    kept = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").iterdir()}
    (folder / "shards" / "000000008.parquet").unlink()
    (folder / "index.parquet").unlink()
    again = _run(images, "ray", "ray")
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").iterdir()}
    assert set(after) == set(kept)
    assert [n for n in after if after[n] != kept[n]] == ["000000008.parquet"]
    assert again.table.select(cols).equals(local.table.select(cols))
    np.testing.assert_array_equal(open_run(folder).map(9, "gradcam", 1), local.map(9, "gradcam", 1))


def test_ray_reads_object_storage(cluster, s3, tmp_path):
    """The Ray engine on an s3:// prefix (decoded in Ray tasks): the local engine's store of the
    local copies."""
    if s3 is None:
        pytest.skip("moto[server] (the test extra) is not installed")
    kw = dict(shard_size=4, batch_size=4, workers=0)
    on_ray = salience.explain_dataset("demo:shapes", s3["url"], ["gradcam"], tmp_path / "ray", engine="ray", **kw)
    local = salience.explain_dataset("demo:shapes", s3["local"], ["gradcam"], tmp_path / "local", **kw)
    cols = [c for c in local.table.column_names if c not in ("shard", "path")]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    for i in range(len(local)):
        np.testing.assert_array_equal(on_ray.map(i, "gradcam"), local.map(i, "gradcam"))
