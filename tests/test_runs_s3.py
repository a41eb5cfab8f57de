"""Dataset runs reading images from object storage (s3://) on a real S3 server on 127.0.0.1
(moto, started and stopped by the session fixture in tests/s3_server.py): the same store as a run
over local copies of the files; bad credentials and a missing bucket are a clear SalienceError."""
from __future__ import annotations

import numpy as np
import pytest

import salience
from salience import SalienceError
from salience.cli import main
from s3_server import BUCKET, N, PREFIX, s3, set_auth  # noqa: F401 - s3 is a fixture

METHODS = ["vanilla", "gradcam"]


def _same(a, b, n):
    cols = [c for c in a.table.column_names if c != "path"]
    assert a.table.select(cols).equals(b.table.select(cols))
    for i in range(n):
        for m in METHODS:
            np.testing.assert_array_equal(a.map(i, m), b.map(i, m))


def test_s3_prefix_and_list_equal_local_copies(s3, tmp_path, capsys):
    if s3 is None:
        pytest.skip("moto[server] (the test extra) is not installed")
    local = salience.explain_dataset("demo:shapes", s3["local"], METHODS, tmp_path / "local", workers=0,
                                     batch_size=4, shard_size=4)
    # the command line on the prefix, a DataLoader worker reading the objects
    assert main(["explain", s3["url"], "-m", "demo:shapes", "--method", ",".join(METHODS), "--out",
                 str(tmp_path / "s3"), "--workers", "1", "--batch", "4", "--shard-size", "4"]) == 0
    capsys.readouterr()
    run = salience.open_run(tmp_path / "s3")
    assert run.table.column("path").to_pylist() == [f"s3://{BUCKET}/{PREFIX}/{i:02d}.jpg" for i in range(N)]
    assert run.image_path(2) == f"s3://{BUCKET}/{PREFIX}/02.jpg"
    _same(run, local, N)
    # a local list naming URLs (a missing object is a row with its error), and a URL glob
    (tmp_path / "list.txt").write_text(f"s3://{BUCKET}/{PREFIX}/03.jpg\n# a comment\ns3://{BUCKET}/{PREFIX}/05.jpg\n"
                                       f"s3://{BUCKET}/{PREFIX}/gone.jpg\n")
    listed = salience.explain_dataset("demo:shapes", tmp_path / "list.txt", ["vanilla"], tmp_path / "list", workers=0)
    for j, i in enumerate((3, 5)):  # in a batch of 2, not 4: equal up to float16 rounding (see test_runs_gcs)
        np.testing.assert_allclose(listed.map(j, "vanilla"), local.map(i, "vanilla"), rtol=2 ** -10, atol=1e-6)
    assert "no such object" in listed.row(2)["error"]
    globbed = salience.explain_dataset("demo:shapes", f"s3://{BUCKET}/val/**/0[12].jpg", ["vanilla"],
                                       tmp_path / "glob", workers=0)
    assert globbed.table.column("path").to_pylist() == [f"s3://{BUCKET}/{PREFIX}/0{i}.jpg" for i in (1, 2)]


def test_s3_missing_bucket_and_bad_credentials(s3, tmp_path):
    if s3 is None:
        pytest.skip("moto[server] (the test extra) is not installed")
    with pytest.raises(SalienceError, match="(?s)no-such-bucket.*bucket does not exist.*AWS_ENDPOINT_URL"):
        salience.explain_dataset("demo:shapes", "s3://no-such-bucket/val/", ["vanilla"], tmp_path / "a", workers=0)
    with pytest.raises(SalienceError, match="no such prefix"):
        salience.explain_dataset("demo:shapes", f"s3://{BUCKET}/nothing/", ["vanilla"], tmp_path / "b", workers=0)
    set_auth(s3["endpoint"], True)  # from now on the server checks keys: ours are not known to it
    try:
        with pytest.raises(SalienceError, match="(?s)cannot list it.*credentials"):
            salience.explain_dataset("demo:shapes", s3["url"], ["vanilla"], tmp_path / "c", workers=0)
    finally:
        set_auth(s3["endpoint"], False)
