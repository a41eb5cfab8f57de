"""The explorer's JSON API over bad and edge requests (a generated matrix, Starlette's test client on a
demo:shapes server with two images and a two-image dataset run): every request works or gets a 4xx
``{"error": ...}`` that says what to do (never a 500, a hang or a wrong 200), the server answers
afterwards, and nothing on disk or in the model changes.

Before the fixes: a JSON body nested deeply was a 500 (``RecursionError``); ``api/maps/KEY/ANY.npy``
answered the raw map for any name; ``k=2.5``, ``limit=2.5``, ``offset=0.5``, ``tile=1.5`` and a stored
map's ``k=1.5`` were cut to integers (and a large ``offset`` came back another number, read through a
float); a probability bound outside [0, 1] or a min above its max answered an empty page; a NaN bound
was "must be in [-inf, inf]"; the router's own 404 / 405 said only "Not Found" / "Method Not Allowed"
(a URL with an encoded ``/``, a GET of a POST endpoint); Starlette's multipart errors ("Missing
boundary in multipart.") said nothing to do; and ``steps=10**30`` hung the whole server (integrated
gradients' quadrature built on the event loop by the request's check), ``samples=10**30`` queued a job
that could never end."""
from __future__ import annotations

import hashlib
import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
pytest.importorskip("pyarrow")
from starlette.testclient import TestClient  # noqa: E402

import salience  # noqa: E402
from conftest import assert_same_snapshot, model_snapshot  # noqa: E402
from explore_helpers import forget, npy, shapes_files, wait_job  # noqa: E402
from salience.explore.app import create_app  # noqa: E402
from salience.explore.compute import EXPLORER_MAX_PASSES as MAX_PASSES  # noqa: E402
from salience.explore.server import build_hub  # noqa: E402


def _png(width: int, height: int, depth: int = 8, data: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _disk(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-audit")
    (root / "imgs").mkdir()
    paths, _, _ = shapes_files(root / "imgs", 2)
    salience.explain_dataset("demo:shapes", paths, ["vanilla"], root / "run", metrics=["deletion"], shard_size=4,
                             batch_size=2, workers=0)
    hub = build_hub("demo:shapes", [root / "imgs", root / "run"])
    client = TestClient(create_app(hub), raise_server_exceptions=False)
    r = client.post("api/explain", json={"model": "a", "image": "f0", "method": "vanilla", "target": 0})
    key = wait_job(lambda u: client.get(u).json(), r.json())["key"]
    yield {"client": client, "hub": hub, "key": key, "root": root, "paths": paths, "disk": _disk(root),
           "model": model_snapshot(hub.slots["a"].model)}
    hub.close()


def _explain(options=None, **body):
    return {"json": {"image": "f0", "method": "vanilla", "target": 0, **body,
                     **({"options": options} if options is not None else {})}}


def _raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def _multipart(body: bytes, boundary: str = "xx") -> dict:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


ROUTING = r"no endpoint .*docs/explore.md"
WHOLE = r"must be a whole number from"
# (method, url, request keywords, status, what the error says); {key}: a map computed at start
CASES = [
    # the router itself: URLs that are no endpoint (an encoded '/' in an id included), a method not taken
    ("GET", "api/nope", {}, 404, ROUTING),
    ("GET", "api/colormaps/..%2f..%2fetc", {}, 404, ROUTING),
    ("GET", "api/images/..%2f..%2fetc%2fpasswd/picture.png", {}, 404, ROUTING),
    ("GET", "api/images/%2Fetc%2Fpasswd/picture.png", {}, 404, ROUTING),
    ("GET", "api/maps/..%2f{key}.npy", {}, 404, r"no map '\.\.'"),
    ("GET", "api/runs/r0/rows/0/maps/..%2f..%2frun.npy", {}, 404, ROUTING),
    ("POST", "api/info", {}, 405, r"POST is not allowed on '/api/info'; it takes GET$"),
    ("GET", "api/explain", {}, 405, r"it takes POST"),
    ("POST", "api/jobs/j1", {}, 405, r"it takes DELETE or GET$"),
    ("GET", "api/maps/{key}/curves", {}, 405, r"it takes POST"),
    # colormaps, models
    ("GET", "api/colormaps/nope", {}, 404, r"unknown colormap 'nope'; one of fire"),
    ("GET", "api/colormaps/%2e%2e", {}, 404, r"unknown colormap '\.\.'"),
    ("GET", "api/colormaps/方", {}, 404, r"unknown colormap '方'"),
    ("GET", "api/models/zz/layers", {}, 404, r"no model 'zz'; the models are a"),
    ("GET", "api/models/%2e%2e/layers", {}, 404, r"no model '\.\.'"),
    # uploads
    ("POST", "api/images", {"content": b""}, 400, r"the upload is empty"),
    ("POST", "api/images", {"content": b"hello"}, 400, r"not an image file"),
    ("POST", "api/images", {"content": b"hello", "headers": {"content-type": "application/json"}}, 400,
     r"not an image file"),
    ("POST", "api/images", {"content": b"abc", "headers": {"content-length": "-5"}}, 400, r"not an image file"),
    ("POST", "api/images", {"content": _png(100_000, 100_000, data=zlib.compress(b"\0" * 100))}, 400,
     r"10000\.0 megapixels is over the limit of 50 megapixels"),
    ("POST", "api/images", {"files": {"other": ("x.png", b"abc")}}, 400, r"in a field named 'file'"),
    ("POST", "api/images", {"files": {"file": ("x.png", b"")}}, 400, r"the upload is empty"),
    ("POST", "api/images", {"files": [("file", ("x.png", b"a")), ("file", ("y.png", b"b"))]}, 400,
     r"cannot be read \(Too many files.*send one image file in the field 'file'"),
    ("POST", "api/images", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400,
     r"cannot be read \(Missing boundary in multipart\); send one image file"),
    ("POST", "api/images", _multipart(b"abc"), 400, r"cannot be read \(Invalid multipart data\); send one"),
    ("POST", "api/images", _multipart(b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.png"'
                                      b'\r\n\r\nabc'), 400, r"in a field named 'file'"),
    # pictures
    ("GET", "api/images/%2e%2e/picture.png", {}, 404, r"no image '\.\.'; upload it"),
    ("GET", "api/images/方/picture.png", {}, 404, r"no image '方'"),
    ("GET", "api/images/f0/picture.png?slot=zz", {}, 404, r"no model 'zz'"),
    ("GET", "api/images/f0/picture.png?slot=", {}, 404, r"no model ''"),
    ("GET", "api/images/r0-99/picture.png", {}, 404, r"image 99 is not in the run"),
    ("GET", "api/images/r0-abc/picture.png", {}, 404, r"written as a plain number"),
    ("GET", "api/images/r0-99999999999999999999999/picture.png", {}, 404, r"is not in the run"),
    # top classes
    ("GET", "api/models/zz/top?image=f0", {}, 404, r"no model 'zz'"),
    ("GET", "api/models/a/top", {}, 404, r"no image ''; upload it"),
    ("GET", "api/models/a/top?image=f0&k=abc", {}, 400, WHOLE),
    ("GET", "api/models/a/top?image=f0&k=-1", {}, 400, WHOLE + r" 1 to 1000, got '-1'"),
    ("GET", "api/models/a/top?image=f0&k=0", {}, 400, WHOLE),
    ("GET", "api/models/a/top?image=f0&k=nan", {}, 400, WHOLE),
    ("GET", "api/models/a/top?image=f0&k=inf", {}, 400, WHOLE),
    ("GET", "api/models/a/top?image=f0&k=1e309", {}, 400, WHOLE),
    ("GET", "api/models/a/top?image=f0&k=2.5", {}, 400, WHOLE + r" 1 to 1000, got '2\.5'"),
    # explain: the body
    ("POST", "api/explain", {"content": b"not json"}, 400, r"the body must be a JSON object, e\.g\."),
    ("POST", "api/explain", {"json": [1, 2]}, 400, r"the body must be a JSON object"),
    ("POST", "api/explain", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400,
     r"the body must be a JSON object"),
    ("POST", "api/explain", {"content": b"[" * 100_000}, 400, r"the body must be a JSON object"),
    ("POST", "api/explain", {"content": b'{"a":' * 50_000}, 400, r"the body must be a JSON object"),
    ("POST", "api/explain", {"content": b'{"image": "' + b"x" * (2**20 + 10) + b'"}'}, 413,
     r"the JSON body is over 1024 kB"),
    ("POST", "api/explain", {"data": {"image": "f0"}}, 400, r"the body must be a JSON object"),
    ("POST", "api/explain", {"json": {}}, 404, r"no image None"),
    # explain: model, image, method, target
    ("POST", "api/explain", _explain(model="zz"), 404, r"no model 'zz'"),
    ("POST", "api/explain", _explain(model={"x": 1}), 404, r"no model"),
    ("POST", "api/explain", _explain(image=["f0"]), 404, r"no image \['f0'\]"),
    ("POST", "api/explain", _explain(image=None), 404, r"no image None"),
    ("POST", "api/explain", _explain(image="../../etc/passwd"), 404, r"no image '\.\./\.\./etc/passwd'"),
    ("POST", "api/explain", _explain(image="/etc/passwd"), 404, r"no image '/etc/passwd'"),
    ("POST", "api/explain", _explain(method=None), 400, r"method must be a method name"),
    ("POST", "api/explain", _explain(method=123), 400, r"method must be a method name"),
    ("POST", "api/explain", _explain(method="nope"), 400, r"unknown method 'nope'.*available: vanilla"),
    ("POST", "api/explain", _explain(method="方法"), 400, r"unknown method '方法'"),
    ("POST", "api/explain", _explain(target=None), 400, r"target must be an output index 0\.\.4"),
    ("POST", "api/explain", _explain(target="0"), 400, r"target must be an output index"),
    ("POST", "api/explain", _explain(target=1.0), 400, r"target must be an output index"),
    ("POST", "api/explain", _explain(target=-1), 400, r"target must be an output index"),
    ("POST", "api/explain", _explain(target=2**70), 400, r"target must be an output index"),
    ("POST", "api/explain", _explain(target=True), 400, r"target must be an output index"),
    ("POST", "api/explain", _raw('{"image": "f0", "method": "vanilla", "target": NaN}'), 400, r"got nan"),
    ("POST", "api/explain", _raw('{"image": "f0", "method": "vanilla", "target": 1e400}'), 400, r"got inf"),
    # explain: options
    ("POST", "api/explain", _explain([1]), 400, r"options must be an object"),
    ("POST", "api/explain", _explain("x"), 400, r"options must be an object"),
    ("POST", "api/explain", _explain({"nope": 1}), 400, r"unknown option 'nope'"),
    ("POST", "api/explain", _explain({"方": 1}), 400, r"unknown option '方'"),
    ("POST", "api/explain", _explain({"samples": 5}), 400, r"samples is an option of smoothgrad; not of vanilla"),
    ("POST", "api/explain", _explain({"reduce": "nope"}), 400, r"option reduce: must be one of"),
    ("POST", "api/explain", _explain({"samples": "abc"}, method="smoothgrad"), 400, r"option samples: must be an int"),
    ("POST", "api/explain", _explain({"samples": -1}, method="smoothgrad"), 400, r"samples must be an int >= 1"),
    ("POST", "api/explain", _explain({"samples": 0}, method="smoothgrad"), 400, r"samples must be an int >= 1"),
    ("POST", "api/explain", _explain({"samples": 2.5}, method="smoothgrad"), 400, r"must be an int, got '2\.5'"),
    ("POST", "api/explain", _explain({"samples": [1]}, method="smoothgrad"), 400, r"must be a number or a name"),
    ("POST", "api/explain", _explain({"samples": {"a": 1}}, method="smoothgrad"), 400, r"must be a number or a name"),
    ("POST", "api/explain", _explain({"samples": True}, method="smoothgrad"), 400, r"must be a number or a name"),
    ("POST", "api/explain", _explain({"samples": "1e30"}, method="smoothgrad"), 400, r"must be an int"),
    ("POST", "api/explain", _explain({"samples": 10**30}, method="smoothgrad"), 400,
     rf"option samples: at most {MAX_PASSES} in the explorer"),
    ("POST", "api/explain", _explain({"samples": MAX_PASSES + 1}, method="smoothgrad"), 400,
     rf"option samples: at most {MAX_PASSES}"),
    ("POST", "api/explain", _explain({"steps": 10**30}, method="integrated_gradients"), 400,
     rf"option steps: at most {MAX_PASSES} in the explorer.*from Python or salience explain"),
    ("POST", "api/explain", _explain({"masks": 10**12}, method="rise"), 400, rf"option masks: at most {MAX_PASSES}"),
    ("POST", "api/explain", _explain({"noise": "nan"}, method="smoothgrad"), 400, r"must be a finite number"),
    ("POST", "api/explain", _raw('{"image": "f0", "method": "smoothgrad", "target": 0, "options": {"noise": NaN}}'),
     400, r"option noise must be a finite number, got nan"),
    ("POST", "api/explain", _raw('{"image": "f0", "method": "smoothgrad", "target": 0, '
                                 '"options": {"noise": -Infinity}}'), 400, r"must be a finite number, got -inf"),
    ("POST", "api/explain", _explain({"noise": -1}, method="smoothgrad"), 400, r"noise must be a finite number >= 0"),
    ("POST", "api/explain", _explain({"seed": 10**30}, method="smoothgrad"), 400, r"seed must be an int from"),
    ("POST", "api/explain", _explain({"layer": "../x"}, method="gradcam"), 400, r"has no layer named '\.\./x'"),
    ("POST", "api/explain", _explain({"layer": 5}, method="gradcam"), 400, r"has no layer named '5'"),
    ("POST", "api/explain", _explain({"layer": "方"}, method="gradcam"), 400, r"has no layer named '方'"),
    ("POST", "api/explain", _explain({"window": "0"}, method="occlusion"), 400, r"window must be an int >= 1"),
    ("POST", "api/explain", _explain({"window": "100000"}, method="occlusion"), 400, r"larger than the 64x64 image"),
    ("POST", "api/explain", _explain({"stride": "-3"}, method="occlusion"), 400, r"option stride: must be two ints"),
    ("POST", "api/explain", _explain({"masks": "0"}, method="rise"), 400, r"masks must be an int >= 1"),
    ("POST", "api/explain", _explain({"cell": 10**9}, method="rise"), 400, r"more cells than the 64x64 image"),
    # jobs
    ("GET", "api/jobs/nope", {}, 404, r"no job 'nope'"),
    ("DELETE", "api/jobs/nope", {}, 404, r"no job 'nope'"),
    ("GET", "api/jobs/%2e%2e", {}, 404, r"no job '\.\.'"),
    # maps
    ("GET", "api/maps/nope.npy", {}, 404, r"no map 'nope'; ask for it with POST api/explain"),
    ("GET", "api/maps/{key}/nope.npy", {}, 404, r"no 'nope' map; GET api/maps/KEY\.npy .* api/maps/KEY/display\.npy"),
    ("GET", "api/maps/{key}/raw.npy", {}, 404, r"no 'raw' map"),
    ("GET", "api/maps/{key}.png?cmap=nope", {}, 400, r"unknown colormap 'nope'"),
    ("GET", "api/maps/{key}.png?percentile=nan", {}, 400, r"percentile must be a finite number, got 'nan'"),
    ("GET", "api/maps/{key}.png?percentile=inf", {}, 400, r"percentile must be a finite number"),
    ("GET", "api/maps/{key}.png?percentile=10", {}, 400, r"percentile must be in \[50, 100\]"),
    ("GET", "api/maps/{key}.png?percentile=abc", {}, 400, r"percentile must be a number"),
    ("GET", "api/maps/{key}.png?signed=x", {}, 400, r"signed must be auto, signed or abs"),
    ("POST", "api/maps/{key}/nope", {}, 404, r"no 'nope' for a map; curves or sanity"),
    ("POST", "api/maps/nope/curves", {}, 404, r"no map 'nope'"),
    ("POST", "api/maps/nope/sanity", {}, 404, r"no map 'nope'"),
    # figures
    ("GET", "api/figure.png", {}, 400, r"keys must name one or more maps"),
    ("GET", "api/figure.png?keys=,", {}, 400, r"keys must name one or more maps"),
    ("GET", "api/figure.png?keys=nope", {}, 404, r"no map 'nope'"),
    ("GET", "api/figure.png?keys={key}&alpha=nan", {}, 400, r"alpha must be a finite number"),
    ("GET", "api/figure.png?keys={key}&alpha=2", {}, 400, r"alpha must be in \[0, 1\]"),
    ("GET", "api/figure.png?keys={key}&cmap=x", {}, 400, r"unknown colormap 'x'"),
    # a run's rows: sort, filters, page
    ("GET", "api/runs/nope/rows", {}, 404, r"no run 'nope'; the runs are GET api/runs"),
    ("GET", "api/runs/r0/rows?sort=nope", {}, 400, r"sort must be a column of the run \(index"),
    ("GET", "api/runs/r0/rows?sort=vanilla.error", {}, 400, r"sort must be a column of the run"),
    ("GET", "api/runs/r0/rows?sort=vanilla.constant", {}, 400, r"sort must be a column of the run"),
    ("GET", "api/runs/r0/rows?order=x", {}, 400, r"order must be asc or desc"),
    ("GET", "api/runs/r0/rows?correct=maybe", {}, 400, r"correct must be true \(right\) or false"),
    ("GET", "api/runs/r0/rows?correct=true", {}, 400, r"this run has no labels.*--labels-csv"),
    ("GET", "api/runs/r0/rows?metric=nope", {}, 400, r"metric must be a metric column of the run"),
    ("GET", "api/runs/r0/rows?metric=vanilla.constant", {}, 400, r"metric must be a metric column"),
    ("GET", "api/runs/r0/rows?metric=vanilla.error", {}, 400, r"metric must be a metric column"),
    ("GET", "api/runs/r0/rows?min_probability=nan", {}, 400, r"min_probability must be a finite number"),
    ("GET", "api/runs/r0/rows?min_probability=abc", {}, 400, r"min_probability must be a number"),
    ("GET", "api/runs/r0/rows?min_probability=2", {}, 400, r"min_probability must be a probability from 0 to 1"),
    ("GET", "api/runs/r0/rows?max_probability=-0.5", {}, 400, r"max_probability must be a probability from 0 to 1"),
    ("GET", "api/runs/r0/rows?min_probability=0.9&max_probability=0.1", {}, 400,
     r"min_probability 0\.9 is above max_probability 0\.1: swap them"),
    ("GET", "api/runs/r0/rows?metric=vanilla.deletion&min=nan", {}, 400, r"min must be a finite number"),
    ("GET", "api/runs/r0/rows?metric=vanilla.deletion&min=2&max=1", {}, 400, r"min 2 is above max 1"),
    ("GET", "api/runs/r0/rows?offset=-1", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows?offset=1e30", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows?offset=inf", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows?offset=0.5", {}, 400, WHOLE + r" 0 to 4611686018427387904, got '0\.5'"),
    ("GET", "api/runs/r0/rows?offset=4611686018427387905", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows?limit=0", {}, 400, WHOLE + r" 1 to 1000"),
    ("GET", "api/runs/r0/rows?limit=100000", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows?limit=2.5", {}, 400, WHOLE),
    # a run's row, thumbnails, stored maps
    ("GET", "api/runs/r0/rows/abc", {}, 404, r"no row 'abc' in run 'r0' \(it has 2 rows"),
    ("GET", "api/runs/r0/rows/-1", {}, 404, r"no row '-1'"),
    ("GET", "api/runs/r0/rows/01", {}, 404, r"no row '01'"),
    ("GET", "api/runs/r0/rows/99", {}, 404, r"no row '99'"),
    ("GET", "api/runs/r0/rows/99999999999999999999999", {}, 404, r"no row '9+'"),
    ("GET", "api/runs/r0/rows/9223372036854775808", {}, 404, r"no row"),
    ("GET", "api/runs/r0/rows/١", {}, 404, r"no row '١'"),
    ("GET", "api/runs/r0/rows/99/thumb.jpg", {}, 404, r"no row '99'"),
    ("GET", "api/runs/r0/rows/0/thumb.jpg?tile=-1", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows/0/thumb.jpg?tile=99", {}, 400, r"tile must be 0 \(the image\) to 1"),
    ("GET", "api/runs/r0/rows/0/thumb.jpg?tile=abc", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows/0/thumb.jpg?tile=nan", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows/0/thumb.jpg?tile=1.5", {}, 400, WHOLE + r" 0 to 1000, got '1\.5'"),
    ("GET", "api/runs/r0/rows/0/maps/nope.npy", {}, 404, r"the run has no method 'nope'; its methods are vanilla"),
    ("GET", "api/runs/r0/rows/0/maps/%2e%2e.npy", {}, 404, r"the run has no method '\.\.'"),
    ("GET", "api/runs/r0/rows/0/maps/方.npy", {}, 404, r"the run has no method '方'"),
    ("GET", "api/runs/r0/rows/99/maps/vanilla.npy", {}, 404, r"no row '99'"),
    ("GET", "api/runs/r0/rows/0/maps/vanilla.npy?k=-1", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows/0/maps/vanilla.npy?k=abc", {}, 400, WHOLE),
    ("GET", "api/runs/r0/rows/0/maps/vanilla.npy?k=1", {}, 400, r"target k=1 out of range: the run explains 1"),
    ("GET", "api/runs/r0/rows/0/maps/vanilla.npy?k=1.5", {}, 400, WHOLE + r" 0 to 1000000, got '1\.5'"),
]


@pytest.mark.parametrize("method, url, kwargs, status, said", CASES,
                         ids=[f"{m} {u} {i}" for i, (m, u, *_) in enumerate(CASES)])
def test_a_bad_request_gets_a_4xx_saying_what_to_do(env, method, url, kwargs, status, said):
    """Each request of the matrix: its 4xx, JSON ``{"error"}`` naming what was wrong and what to do, at once."""
    start = time.monotonic()
    r = env["client"].request(method, url.format(key=env["key"]), **kwargs)
    assert time.monotonic() - start < 60  # a hang is what fails (a loaded 2-core CI takes seconds)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    assert re.search(said, r.json()["error"]), r.json()["error"]


def test_a_huge_count_never_holds_the_server(env):
    """``steps=10**30`` hung the server in the request's check (on the event loop: no other request was
    answered); refused at once, and a count within the limit is a job that can be cancelled."""
    c = env["client"]
    start = time.monotonic()
    r = c.post("api/explain", **_explain({"steps": 10**30}, method="integrated_gradients"))
    assert r.status_code == 400 and time.monotonic() - start < 60  # refused, not run: a hang is what fails
    r = c.post("api/explain", **_explain({"samples": MAX_PASSES}, method="smoothgrad"))
    assert r.status_code == 202
    job = r.json()["job"]
    ended = wait_job(lambda u: c.get(u).json(), c.delete(f"api/jobs/{job}").json(), 30)
    assert ended["state"] == "cancelled"
    again = c.delete(f"api/jobs/{job}")  # cancelled twice: the same answer, nothing else
    assert again.status_code == 200 and again.json()["state"] == "cancelled"


def test_the_edges_that_work(env):
    """What is not an error works exactly: a 16-bit PNG, an upload named with '../' and other scripts,
    ``k`` above the model's outputs, an exact large ``offset``, a map's ``display.npy``, the same key twice."""
    from PIL import Image

    c = env["client"]
    gray = (np.arange(48 * 40).reshape(40, 48) * 27 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    r = c.post("api/images", content=buf.getvalue())
    assert r.status_code == 201 and (r.json()["width"], r.json()["height"]) == (48, 40)
    picture = np.asarray(Image.open(io.BytesIO(c.get(f"api/images/{r.json()['id']}/picture.png").content)))
    assert picture.shape == (64, 64, 3)
    r = c.post("api/images?name=../../etc/passwd", content=env["paths"][0].read_bytes())
    assert r.status_code == 201 and r.json()["name"] == "passwd"
    r = c.post("api/images", params={"name": "方.png"}, content=env["paths"][0].read_bytes())
    assert r.status_code == 201 and r.json()["name"] == "_.png"
    top = c.get("api/models/a/top?image=f0&k=999")
    assert top.status_code == 200 and len(top.json()["classes"]) == 5  # every output, once
    page = c.get("api/runs/r0/rows?offset=4611686018427387903").json()
    assert page["offset"] == 4611686018427387903 and page["rows"] == []  # read exactly, not through a float
    assert [r["index"] for r in c.get("api/runs/r0/rows?limit=1&offset=1").json()["rows"]] == [1]
    key = env["key"]
    raw, shown = npy(c.get(f"api/maps/{key}.npy").content), npy(c.get(f"api/maps/{key}/display.npy").content)
    assert raw.shape == shown.shape == (64, 64) and np.array_equal(raw, shown)
    assert c.get(f"api/figure.png?keys={key},{key}").headers["content-type"] == "image/png"


def test_a_job_of_another_kind_and_an_evicted_map(env):
    """A top-classes job's id answers as that job (cancelling it when ended changes nothing); a map
    dropped from the cache is a 409 saying to ask again, and its curves compute it again."""
    c, hub, key = env["client"], env["hub"], env["key"]
    assert c.get("api/models/a/top?image=f1&k=3").status_code == 200
    top = next(j for j, (job, _) in hub.jobs.items() if job.kind == "top")
    assert c.get(f"api/jobs/{top}").json()["state"] == "done"
    assert c.delete(f"api/jobs/{top}").json()["state"] == "done"
    forget(hub)
    for url in (f"api/maps/{key}.npy", f"api/maps/{key}.png", f"api/figure.png?keys={key}"):
        r = c.get(url)
        assert r.status_code == 409 and "POST api/explain again" in r.json()["error"], url
    curves = wait_job(lambda u: c.get(u).json(), c.post(f"api/maps/{key}/curves").json())
    assert curves["state"] == "done" and c.get(f"api/maps/{key}.npy").status_code == 200


def test_the_server_answers_after_and_nothing_changed(env):
    """After the matrix: the server answers, no job failed unexpectedly, the run folder and the image
    files are byte for byte as before, and the model is as it was."""
    c, hub = env["client"], env["hub"]
    assert c.get("api/status").status_code == 200
    r = c.post("api/explain", **_explain(target=1))
    assert wait_job(lambda u: c.get(u).json(), r.json())["state"] == "done"
    assert not [j.error for j, _ in hub.jobs.values() if j.status_code >= 500 and j.state == "error"]
    assert _disk(env["root"]) == env["disk"]
    assert_same_snapshot(env["model"], model_snapshot(hub.slots["a"].model))


def test_a_missing_static_file_is_not_called_an_api_endpoint(env):
    """The router's 404 wording (no endpoint; the API is ...) was given to a page file that is not there too."""
    r = env["client"].get("static/nope.js")
    assert r.status_code == 404
    assert "page's own files" in r.json()["error"] and "no endpoint" not in r.json()["error"]
