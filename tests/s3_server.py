"""A real S3 server on 127.0.0.1 for the object storage tests: moto's ThreadedMotoServer, started
once per session and stopped after, a bucket of JPEG shape images (and the same files on disk)."""
from __future__ import annotations

import io
import os
import urllib.request

import numpy as np
import pytest

import salience

BUCKET, PREFIX, N = "salience-test", "val/sub", 6
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def jpegs(n: int) -> list[bytes]:
    from PIL import Image

    imgs, _, _ = salience.data.shapes(n, seed=5)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG",
                                                                                                  quality=90)
        out.append(buf.getvalue())
    return out


def set_auth(endpoint: str, on: bool) -> None:
    """moto checks credentials only when asked (``/moto-api/reset-auth``: 0 = from now on, inf = never)."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """``{"endpoint", "url" (s3://bucket/prefix/), "local" (a folder of the same files)}``; ``None``
    when moto is not installed (the tests that need it skip)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import boto3

    from salience.loading import remote

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    remote._CACHE.clear()
    local = tmp_path_factory.mktemp("s3copy")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for i, data in enumerate(jpegs(N)):
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{i:02d}.jpg", Body=data)
        (local / f"{i:02d}.jpg").write_bytes(data)
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/notes.txt", Body=b"not an image, not listed")
    try:
        yield {"endpoint": endpoint, "url": f"s3://{BUCKET}/{PREFIX}/", "local": local}
    finally:
        server.stop()
        remote._CACHE.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
