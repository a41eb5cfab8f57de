"""The explorer's API through Starlette's test client: every endpoint, and every bad input gets a
clear 4xx while the server goes on. Maps, curves and the sanity check are compared with the
library called directly on the same image file (the server must add nothing and lose nothing)."""
from __future__ import annotations

import io
import struct
import threading
import zlib
from typing import Optional

import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

import salience  # noqa: E402
from conftest import unchanged  # noqa: E402
from explore_helpers import forget, image_endpoints, npy, shapes_files, wait_job  # noqa: E402
from nets import RenamedLayersNet, TanhSpike, WarnsNet  # noqa: E402
from salience.explore.app import Hub, create_app  # noqa: E402
from salience.explore.compute import ModelSlot  # noqa: E402
from salience.explore.images import FileSource, ImageStore  # noqa: E402
from salience.loading import load_image, preprocess  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explore-images")
    paths, labels, masks = shapes_files(folder)
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    model = salience.load_model("demo:shapes")
    hub = Hub([ModelSlot("a", model)], ImageStore([FileSource([folder])]))
    client = TestClient(create_app(hub))
    yield {"client": client, "hub": hub, "model": model, "paths": paths, "labels": labels, "masks": masks,
           "folder": folder}
    hub.close()


def _get(client):
    return lambda url: client.get(url).json()


def _x(env, i=0):
    info = env["model"].salience_info
    return preprocess(load_image(env["paths"][i]), info).unsqueeze(0)


def _map(env, method="vanilla", target=None, options=None, image="f0"):
    c = env["client"]
    target = int(env["labels"][0]) if target is None else target
    r = c.post("api/explain", json={"model": "a", "image": image, "method": method, "target": target,
                                    "options": options or {}})
    assert r.status_code in (200, 202), r.text
    j = wait_job(_get(c), r.json())
    assert j["state"] == "done", j
    return j["key"], npy(c.get(f"api/maps/{j['key']}.npy").content)


def _png_file(width: int, height: int, data: bytes = b"") -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", data) if data else b"") + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------- page, info, colormaps


def test_page_and_static_files_use_relative_urls(env):
    c = env["client"]
    page = c.get("/")
    assert page.status_code == 200 and "salience explore" in page.text
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    js = c.get("static/app.js").text
    # Relative URLs only (no leading slash, no scheme, no CDN): the page works behind a proxy's path.
    assert "fetch(\"/" not in js and "http://" not in js and "https://" not in js and "`/api" not in js
    assert c.get("static/style.css").status_code == 200


def test_the_pages_scripts_are_revalidated_on_every_load(env):
    """An upgraded salience served a new app.js, but without a Cache-Control the browser's
    heuristic cache kept the old one: every static file says no-cache, and an unchanged one
    answers 304 to the browser's revalidation."""
    c = env["client"]
    for name in ("app.js", "style.css"):
        r = c.get(f"static/{name}")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache", name
        again = c.get(f"static/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, name
    assert c.get("/").headers["cache-control"] == "no-cache"


def test_the_map_keys_remembered_are_bounded(env):
    """Every distinct request added an entry (what makes map KEY) for as long as the server ran:
    past ``max_maps`` the least recently used key is forgotten (404, ask again), a key asked for
    again comes back, and a key in use stays."""
    hub = Hub([ModelSlot("a", env["model"])], ImageStore([FileSource([env["folder"]])]), max_maps=2)
    try:
        c = TestClient(create_app(hub))
        target = int(env["labels"][0])

        def ask(reduce):
            r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "vanilla", "target": target,
                                            "options": {"reduce": reduce}})
            return wait_job(_get(c), r.json())["key"]

        first, second = ask("max_abs"), ask("sum_abs")
        assert c.get(f"api/maps/{first}.npy").status_code == 200  # first is now the most recently used
        third = ask("l2")
        assert len(hub.maps) == 2
        assert c.get(f"api/maps/{second}.npy").status_code == 404  # the least recently used, forgotten
        assert c.get(f"api/maps/{first}.npy").status_code == 200
        assert c.get(f"api/maps/{third}.npy").status_code == 200
        assert ask("sum_abs") == second and c.get(f"api/maps/{second}.npy").status_code == 200
    finally:
        hub.close()


def test_info_lists_models_methods_and_option_controls(env):
    info = env["client"].get("api/info").json()
    m = info["models"][0]
    assert (m["slot"], m["name"], m["outputs"]) == ("a", "demo:shapes", 5)
    assert m["classes"] == list(salience.data.CLASSES)
    assert list(info["methods"]) == list(salience.METHODS)
    sg = {o["keyword"]: o for o in info["methods"]["smoothgrad"]}
    assert sg["samples"]["kind"] == "int" and sg["noise"]["kind"] == "float"
    import inspect
    assert sg["samples"]["default"] == str(inspect.signature(salience.smoothgrad).parameters["samples"].default)
    assert "vanilla" in sg["method"]["choices"]
    ig = {o["keyword"] for o in info["methods"]["integrated_gradients"]}
    assert {"steps", "baseline"} <= ig
    assert "layer" in {o["keyword"] for o in info["methods"]["gradcam"]}
    guided = {o["keyword"]: o for o in info["methods"]["guided_backprop"]}
    assert guided["unsupported"]["choices"] == list(salience.rules.UNSUPPORTED)
    assert info["colormaps"] == list(salience.viz.COLORMAPS)


def test_colormap_tables_are_the_librarys(env):
    c = env["client"]
    for name in salience.viz.COLORMAPS:
        assert c.get(f"api/colormaps/{name}").json()["lut"] == salience.viz.colormap(name).tolist()
    r = c.get("api/colormaps/nope")
    assert r.status_code == 404 and "fire" in r.json()["error"]


# --------------------------------------------------------------------------------- images


def test_images_are_the_named_files_only(env):
    c = env["client"]
    images = c.get("api/images").json()["images"]
    assert [i["name"] for i in images] == [p.name for p in env["paths"]]
    assert [i["id"] for i in images] == ["f0", "f1", "f2", "f3"]


@pytest.mark.parametrize("url", [
    "api/images/../../../../etc/passwd/picture.png", "api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/picture.png",
    "api/images/..%2Fnotes.txt/picture.png", "static/../app.py", "static/%2e%2e/app.py", "static/..%2F..%2F__init__.py",
    "api/images/notes.txt/picture.png", "api/images/f9/picture.png",
])
def test_no_path_reaches_another_file(env, url):
    r = env["client"].get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert b"import" not in r.content and b"root:" not in r.content


def test_picture_is_what_the_model_sees(env):
    from PIL import Image
    import io

    c = env["client"]
    r = c.get("api/images/f1/picture.png?slot=a")
    assert r.headers["content-type"] == "image/png"
    pic = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = (load_image(env["paths"][1]).permute(1, 2, 0).numpy() * 255).round()
    assert pic.shape == (64, 64, 3) and np.abs(pic - expected).max() <= 1
    assert c.get("api/images/f1/picture.png?slot=z").status_code == 404


def test_a_gray_models_picture_is_gray(env):
    """A 1-channel model sees the luma of an RGB image (0.299 R + 0.587 G + 0.114 B): its picture
    (the image panel and what the page lays its maps on) is that gray, R == G == B (it was the
    colour original, as if the model saw colour); a 3-channel model's is the image unchanged."""
    import io

    from PIL import Image
    from torch import nn

    from salience._core.info import ModelInfo, attach_info

    gray = attach_info(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(4, 3)), ModelInfo(name="gray", channels=1))
    hub = Hub([ModelSlot("a", gray), ModelSlot("b", env["model"])], ImageStore([FileSource(env["paths"][:1])]))
    c = TestClient(create_app(hub))
    original = np.asarray(Image.open(env["paths"][0]).convert("RGB")).astype(np.float64)
    assert np.abs(original[..., 0] - original[..., 1]).max() > 50  # a colour image
    try:
        pics = {}
        for slot in ("a", "b"):
            r = c.get(f"api/images/f0/picture.png?slot={slot}")
            assert r.status_code == 200, r.text
            pics[slot] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(np.float64)
        luma = original @ np.array([0.299, 0.587, 0.114])
        a = pics["a"]
        assert a.shape == original.shape and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
        assert np.abs(a[..., 0] - luma).max() <= 1
        assert np.array_equal(pics["b"], original)
    finally:
        hub.close()


def test_upload_raw_and_multipart(env):
    c = env["client"]
    data = env["paths"][2].read_bytes()
    r = c.post("api/images?name=my%20shape.png", content=data)
    assert r.status_code == 201, r.text
    j = r.json()
    assert j["id"].startswith("u") and (j["width"], j["height"]) == (64, 64) and j["name"] == "my shape.png"
    r2 = c.post("api/images", files={"file": ("again.png", data, "image/png")})
    assert r2.status_code == 201 and r2.json()["id"] == j["id"]  # same bytes, same image
    assert j["id"] in [i["id"] for i in c.get("api/images").json()["images"]]
    top_u = c.get(f"api/models/a/top?image={j['id']}").json()["classes"]
    top_f = c.get("api/models/a/top?image=f2").json()["classes"]
    assert top_u == top_f


@pytest.mark.parametrize("body, status, words", [
    (b"hello, I am text", 400, "not an image"),
    (b"", 400, "empty"),
    ("truncated", 400, "truncated"),
    ("huge", 400, "over the limit"),
])
def test_bad_uploads_get_a_4xx_and_the_server_goes_on(env, body, status, words):
    c = env["client"]
    if body == "truncated":
        body = env["paths"][0].read_bytes()[:300]
    elif body == "huge":
        body = _png_file(20_000, 20_000, zlib.compress(b"\0" * 64))  # 400 megapixels, refused before decoding
    r = c.post("api/images?name=bad.png", content=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert "/tmp" not in r.json()["error"] and "salience-explore-" not in r.json()["error"]
    assert c.get("api/info").status_code == 200


def test_upload_over_the_byte_limit_is_413(env):
    c, store = env["client"], env["hub"].images
    old = store.max_upload_bytes
    store.max_upload_bytes = 1000
    try:
        r = c.post("api/images", content=b"\0" * 5000)
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = c.post("api/images", files={"file": ("big.png", b"\0" * 5000, "image/png")})
        assert r.status_code == 413
    finally:
        store.max_upload_bytes = old


def test_max_pixels_is_the_servers_limit(env, tmp_path):
    store = ImageStore([], max_pixels=64 * 64 - 1)
    try:
        with pytest.raises(salience.SalienceError, match="over the limit"):
            store.add_upload(env["paths"][0].read_bytes(), "x.png")
    finally:
        store.close()


# --------------------------------------------------------------------------------- models


def test_top_classes_are_the_models_probabilities(env):
    c = env["client"]
    j = c.get("api/models/a/top?image=f0&k=3").json()
    with torch.no_grad():
        p = env["model"](_x(env)).softmax(1)[0]
    order = p.argsort(descending=True)[:3]
    assert [x["index"] for x in j["classes"]] == order.tolist()
    assert np.allclose([x["probability"] for x in j["classes"]], p[order].numpy(), atol=1e-6)
    assert j["classes"][0]["name"] == salience.data.CLASSES[int(order[0])]
    assert c.get("api/models/a/top?image=nope").status_code == 404
    assert c.get("api/models/b/top?image=f0").status_code == 404
    assert c.get("api/models/a/top?image=f0&k=abc").status_code == 400
    assert c.get("api/models/a/top?image=f0&k=0").status_code == 400


def test_layer_tree_and_default_layer(env):
    from salience.methods.gradcam import default_layer

    j = env["client"].get("api/models/a/layers").json()
    model = env["model"]
    assert [x["name"] for x in j["layers"]] == [n for n, _ in model.named_modules() if n]
    assert j["default"] == default_layer(model, _x(env))



def test_a_refused_default_layer_says_why(env):
    """A model with no default layer (two patch embeddings, as CrossViT's branches): the layer menu's data said
    only default: null, which the page showed as "default (auto)", a default that every CAM then refused. Now
    the refusal's words come with it (the page: "default: none, pick a layer", the words as its tooltip)."""
    from torch import nn

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 4, stride=4), nn.Conv2d(3, 4, 8, stride=8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.cat([self.a(x).mean((2, 3)), self.b(x).mean((2, 3))], 1))

    hub = Hub([ModelSlot("a", TwoBranches().eval())], ImageStore([FileSource(env["paths"][:1])]))
    c = TestClient(create_app(hub))
    try:
        for _ in range(2):  # found once, then kept
            j = c.get("api/models/a/layers").json()
            assert j["default"] is None and "embeds the image in patches 2 times ('a', 'b'" in j["default_error"]
            assert [x["name"] for x in j["layers"]] == ["a", "b", "head"]
        assert env["client"].get("api/models/a/layers").json()["default_error"] is None  # a default found
    finally:
        hub.close()


# --------------------------------------------------------------------------------- explain


def test_maps_equal_the_library_called_directly(env):
    model, t = env["model"], int(env["labels"][0])
    x = _x(env)
    key, m = _map(env, "vanilla", t)
    assert m.dtype == np.float32 and m.shape == (64, 64)
    np.testing.assert_allclose(m, salience.vanilla(model, x, t)[0].numpy(), rtol=1e-5, atol=1e-7)
    _, m = _map(env, "smoothgrad", t, {"samples": 3, "noise": "0.2"})
    np.testing.assert_allclose(m, salience.smoothgrad(model, x, t, samples=3, noise=0.2)[0].numpy(), rtol=1e-5,
                               atol=1e-7)
    _, m = _map(env, "gradcam", t, {"layer": "features.3"})
    np.testing.assert_allclose(m, salience.gradcam(model, x, t, layer="features.3")[0].numpy(), rtol=1e-5, atol=1e-7)
    _, m = _map(env, "vanilla", t, {"reduce": "colored"})
    assert m.shape == (3, 64, 64)
    d = npy(env["client"].get(f"api/maps/{_map(env, 'vanilla', t, {'reduce': 'colored'})[0]}/display.npy").content)
    np.testing.assert_allclose(d, np.abs(m).max(0))


def test_a_maps_warnings_come_with_it(tmp_path):
    """Integrated gradients on ``f = tanh(1e4 sum(x))`` (model a) from the black baseline: the
    trapezoid weighs the baseline's gradient 1e4 by 1/62, so sum(IG) ~ 160 sum(x) against
    f(x) - f(x') = +-1: its CompletenessWarning comes with the map, as the job ends and when the cached
    map is asked again, and for a second image too (not only the first warning of its place in the
    code). ``b = 1e-6`` (model b): f is linear where IG looks, the map is exact and carries none; model
    a's vanilla map carries only the note that it is constant. Each computation's warnings are its own (the two workers at once)."""
    paths, _, _ = shapes_files(tmp_path, n=2)
    hub = Hub([ModelSlot("a", TanhSpike(1.0, 1e4)), ModelSlot("b", TanhSpike(1.0, 1e-6))],
              ImageStore([FileSource([tmp_path])]))
    c = TestClient(create_app(hub))
    try:
        def ask(model, method, image="f0"):
            r = c.post("api/explain", json={"model": model, "image": image, "method": method, "target": 0})
            assert r.status_code in (200, 202), r.text
            return r.json()

        first = [ask("a", "integrated_gradients"), ask("b", "integrated_gradients"), ask("a", "vanilla"),
                 ask("a", "integrated_gradients", "f1")]
        ended = [wait_job(_get(c), j) for j in first]
        assert all(j["state"] == "done" for j in ended), ended
        ig_a, ig_b, vanilla_a, ig_a1 = ended
        for j in (ig_a, ig_a1):
            assert len(j["warnings"]) == 1, j
            assert j["warnings"][0].startswith("integrated_gradients: the attributions do not sum to f(x) - f(x')")
            assert "relative gap" in j["warnings"][0] and "cannot be trusted" in j["warnings"][0]
        assert ig_b["warnings"] == []
        # vanilla's gradient a b sech^2(b s) is the same at every pixel: its one warning is that the map is
        # constant (its picture a flat colour), not integrated gradients' gap
        assert len(vanilla_a["warnings"]) == 1 and vanilla_a["warnings"][0].startswith("the map is constant (")
        again = ask("a", "integrated_gradients")
        assert again["state"] == "done" and again["warnings"] == ig_a["warnings"]
        assert ask("b", "integrated_gradients")["warnings"] == []
    finally:
        hub.close()


def test_each_threads_warnings_are_its_own():
    """The two models' workers capture at once, overlapping (b enters after a, a leaves first): each
    gets exactly its own warnings, each text once; the process's warning machinery is as before after."""
    import warnings

    from salience.explore.compute import caught_warnings

    before = (warnings.showwarning, list(warnings.filters))
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    got: dict[str, list[str]] = {}

    def work(name: str, enter_after: Optional[threading.Event], leave_after: threading.Event,
             entered: threading.Event) -> None:
        if enter_after is not None:
            enter_after.wait(10)
        with caught_warnings() as said:
            entered.set()
            warnings.warn(f"{name} one")
            leave_after.wait(10)
            warnings.warn(f"{name} one")
            warnings.warn(f"{name} two")
        got[name] = said

    ta = threading.Thread(target=work, args=("a", None, b_in, a_in))
    tb = threading.Thread(target=work, args=("b", a_in, a_out, b_in))
    ta.start(); tb.start()
    ta.join(10); a_out.set(); tb.join(10)
    assert got == {"a": ["a one", "a two"], "b": ["b one", "b two"]}
    assert (warnings.showwarning, list(warnings.filters)) == before


MARKUP = '<img src=x onerror="window.pwned=1"> <b>bold</b> & co'
"""A warning's text holding markup: the page must show it as these characters, never as HTML."""


@pytest.mark.filterwarnings("ignore::UserWarning")  # said on purpose (also outside the captures)
def test_curves_and_sanity_come_with_their_warnings(tmp_path):
    """Model a warns at each forward pass: its map, its curves and its sanity check each come with
    that warning (``result.warnings``; the curves and the test had only the server's log), as the job
    ends and from the cache. Model b, ``f = tanh(1e4 sum(x))``: integrated gradients' map warns of its
    completeness gap, its curves warn of nothing; once the map is dropped from the cache the curves
    compute it again, and its warning comes with them (the map's own is the same text)."""
    paths, _, _ = shapes_files(tmp_path, n=1)
    hub = Hub([ModelSlot("a", WarnsNet(MARKUP)), ModelSlot("b", TanhSpike(1.0, 1e4))],
              ImageStore([FileSource(paths)]))
    c = TestClient(create_app(hub))
    try:
        def ask(model, method):
            r = c.post("api/explain", json={"model": model, "image": "f0", "method": method, "target": 0})
            assert r.status_code in (200, 202), r.text
            return wait_job(_get(c), r.json())

        def on(key, what):
            r = c.post(f"api/maps/{key}/{what}")
            assert r.status_code in (200, 202), r.text
            j = wait_job(_get(c), r.json())
            assert j["state"] == "done", j
            return j["result"]

        a = ask("a", "vanilla")
        assert a["warnings"] == [MARKUP]
        for what in ("curves", "sanity"):
            assert on(a["key"], what)["warnings"] == [MARKUP]
            assert on(a["key"], what)["warnings"] == [MARKUP]  # the cached result too
        b = ask("b", "integrated_gradients")
        assert len(b["warnings"]) == 1 and "do not sum to f(x) - f(x')" in b["warnings"][0]
        assert on(b["key"], "curves")["warnings"] == []
        forget(hub)
        assert on(b["key"], "curves")["warnings"] == b["warnings"]
        assert ask("b", "integrated_gradients")["warnings"] == b["warnings"]  # the map's, kept when computed again
    finally:
        hub.close()


def test_a_nested_capture_sees_the_inner_ones_warnings(monkeypatch):
    """The curves compute their map again inside their own capture: the enclosing capture gets the
    warnings raised inside the inner one too, the inner one only its own, and the log has each once."""
    import warnings

    from salience.explore.compute import caught_warnings

    logged: list[str] = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: logged.append(str(message)))
    with caught_warnings() as outer:
        warnings.warn("before")
        with caught_warnings() as inner:
            warnings.warn("inside")
        warnings.warn("after")
    assert inner == ["inside"]
    assert outer == ["before", "inside", "after"]
    assert logged == ["before", "inside", "after"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # said on purpose (also outside the captures)
def test_a_gallery_page_comes_with_its_warnings(tmp_path, monkeypatch):
    """A warning raised while a run is described or a page of its rows is read comes with the
    answer (``warnings``), which the page shows under the gallery; none: an empty list."""
    import warnings

    pytest.importorskip("pyarrow")
    from explore_helpers import hand_run
    from salience.explore.runs import RunSource

    run = RunSource(hand_run(tmp_path / "run"))
    hub = Hub([ModelSlot("a", RenamedLayersNet())], ImageStore([run]), runs=[run])
    c = TestClient(create_app(hub))
    try:
        assert c.get("api/runs/r0/rows").json()["warnings"] == []
        assert c.get("api/runs").json()["runs"][0]["warnings"] == []
        rows, describe = RunSource.rows, RunSource.describe
        monkeypatch.setattr(RunSource, "rows", lambda self, **k: warnings.warn(MARKUP) or rows(self, **k))
        monkeypatch.setattr(RunSource, "describe", lambda self: warnings.warn("described") or describe(self))
        found = c.get("api/runs/r0/rows", params={"sort": "index", "order": "desc"}).json()
        assert found["warnings"] == [MARKUP] and [r["index"] for r in found["rows"]] == [1, 0]
        assert c.get("api/runs").json()["runs"][0]["warnings"] == ["described"]
    finally:
        hub.close()


def test_a_cached_map_answers_at_once_and_the_model_is_unchanged(env):
    c, t = env["client"], int(env["labels"][1])
    with unchanged(env["model"]):
        key, _ = _map(env, "integrated_gradients", t, {"steps": 8}, image="f1")
        r = c.post("api/explain", json={"model": "a", "image": "f1", "method": "integrated_gradients",
                                        "target": t, "options": {"steps": "8"}})
    assert r.status_code == 200 and r.json()["state"] == "done" and r.json()["key"] == key
    # The same bytes uploaded are the same image for the cache.
    up = c.post("api/images", content=env["paths"][1].read_bytes()).json()["id"]
    r = c.post("api/explain", json={"model": "a", "image": up, "method": "integrated_gradients", "target": t,
                                    "options": {"steps": 8}})
    assert r.json()["state"] == "done"


@pytest.mark.parametrize("body, status, words", [
    ({"method": "nope"}, 400, "unknown method 'nope'"),
    ({"method": "vanila"}, 400, "vanilla"),
    ({"method": 3}, 400, "method must be"),
    ({"method": "smoothgrad", "options": {"samples": "abc"}}, 400, "samples"),
    ({"method": "smoothgrad", "options": {"samples": 0}}, 400, "samples"),
    ({"method": "smoothgrad", "options": {"noise": "-1"}}, 400, "noise"),
    ({"method": "smoothgrad", "options": {"noise": "nan"}}, 400, "finite"),
    ({"method": "smoothgrad", "options": {"noise": [1]}}, 400, "noise"),
    ({"method": "smoothgrad", "options": {"variant": "nope"}}, 400, "variant"),
    ({"method": "integrated_gradients", "options": {"steps": "1e9x"}}, 400, "steps"),
    ({"method": "vanilla", "options": {"samples": 4}}, 400, "samples"),
    ({"method": "vanilla", "options": {"bogus": 1}}, 400, "unknown option"),
    ({"method": "vanilla", "options": [1]}, 400, "options must be"),
    ({"method": "gradcam", "options": {"layer": "zzz"}}, 400, "zzz"),
    ({"method": "guided_backprop", "options": {"unsupported": "maybe"}}, 400, "unsupported"),
    ({"method": "vanilla", "target": 99}, 400, "0..4"),
    ({"method": "vanilla", "target": -1}, 400, "0..4"),
    ({"method": "vanilla", "target": "cat"}, 400, "target"),
    ({"method": "vanilla", "target": True}, 400, "target"),
    ({"method": "vanilla", "target": None}, 400, "target"),
    ({"method": "vanilla", "image": "nope"}, 404, "no image"),
    ({"method": "vanilla", "image": "../../etc/passwd"}, 404, "no image"),
    ({"method": "vanilla", "model": "b"}, 404, "no model"),
])
def test_bad_explain_requests_get_a_4xx(env, body, status, words):
    c = env["client"]
    r = c.post("api/explain", json={"model": "a", "image": "f0", "target": 0, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert c.get("api/info").status_code == 200


def test_a_body_that_is_not_a_json_object_is_400(env):
    c = env["client"]
    for content in (b"{nope", b"[1, 2]", b"\xff\xfe"):
        r = c.post("api/explain", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_a_model_error_ends_the_job_not_the_server(env):
    """A method that fails on this model (attention rollout on a CNN) ends its job with the message."""
    c = env["client"]
    r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "attention_rollout", "target": 0})
    j = wait_job(_get(c), r.json())
    assert j["state"] == "error" and j["code"] == 400 and "attention" in j["error"]
    assert c.get("api/status").status_code == 200


# --------------------------------------------------------------------------------- jobs: queue, progress, cancel


def _block(hub):
    """Occupy model a's worker until the returned event is set."""
    gate, started = threading.Event(), threading.Event()

    def run(ticker):
        started.set()
        gate.wait(30)
    hub.submit(hub.slots["a"], "block", run)
    assert started.wait(10)
    return gate


def test_queue_positions_and_cancel_of_a_waiting_job(env):
    c, hub = env["client"], env["hub"]
    gate = _block(hub)
    try:
        jobs = [c.post("api/explain", json={"model": "a", "image": "f2", "method": "vanilla", "target": k}).json()
                for k in range(3)]
        assert [j["state"] for j in jobs] == ["queued"] * 3
        assert [j["position"] for j in jobs] == [1, 2, 3]
        assert c.get("api/status").json()["models"]["a"] == {"queue": 3, "busy": True}
        r = c.delete(f"api/jobs/{jobs[1]['job']}").json()
        assert r["state"] == "cancelled"
        assert c.get(f"api/jobs/{jobs[2]['job']}").json()["position"] == 2
    finally:
        gate.set()
    ends = [wait_job(_get(c), j) for j in jobs]
    assert [e["state"] for e in ends] == ["done", "cancelled", "done"]
    assert c.get("api/status").json()["models"]["a"]["queue"] == 0


def test_a_cancel_stops_a_joined_job_only_when_every_request_gave_up(env):
    """Two tabs ask for the same map: the second joins the first's job. One tab cancelling must not
    take the map from the other: the job goes on until both have cancelled; and a request after
    the last cancel gets a job of its own, not the cancelled one."""
    c, hub = env["client"], env["hub"]
    body = {"model": "a", "image": "f1", "method": "vanilla", "target": 4, "options": {"reduce": "l2"}}
    gate = _block(hub)
    try:
        first, second = c.post("api/explain", json=body).json(), c.post("api/explain", json=body).json()
        assert first["job"] == second["job"] and first["state"] == "queued"
        assert c.delete(f"api/jobs/{first['job']}").json()["state"] == "queued"  # the other tab still waits
    finally:
        gate.set()
    assert wait_job(_get(c), second)["state"] == "done"

    body["target"] = 3
    gate = _block(hub)
    try:
        first, second = c.post("api/explain", json=body).json(), c.post("api/explain", json=body).json()
        assert c.delete(f"api/jobs/{first['job']}").json()["state"] == "queued"
        assert c.delete(f"api/jobs/{second['job']}").json()["state"] == "cancelled"
        third = c.post("api/explain", json=body).json()
        assert third["job"] != first["job"] and third["state"] == "queued"
    finally:
        gate.set()
    assert wait_job(_get(c), third)["state"] == "done"


def _long_job_in_progress(c, image: str) -> tuple[dict, Optional[dict]]:
    """A SmoothGrad job far too long to finish: its first answer, and its state once it shows
    progress (``None`` if it never did within about 30 s)."""
    r = c.post("api/explain", json={"model": "a", "image": image, "method": "smoothgrad", "target": 0,
                                    "options": {"samples": 100000, "chunk": 8}}).json()
    for _ in range(3000):
        j = c.get(f"api/jobs/{r['job']}").json()
        if j["state"] == "running" and j["progress"]:
            return r, j
        threading.Event().wait(0.01)
    return r, None


def test_a_long_job_shows_progress_and_stops_when_cancelled(env):
    c = env["client"]
    with unchanged(env["model"]):
        r, seen = _long_job_in_progress(c, "f3")
        assert seen is not None and 0 < seen["progress"] < 0.5
        c.delete(f"api/jobs/{r['job']}")
        end = wait_job(_get(c), seen, timeout=20)
    assert end["state"] == "cancelled"
    assert c.get("api/jobs/nope").status_code == 404
    assert c.delete("api/jobs/nope").status_code == 404


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_jobs_show_progress_and_stop_when_cancelled(env):
    """A TorchScript model takes no forward hook of its own: its jobs are counted by a global
    pre-hook, so they show progress, count every image, and stop when cancelled."""
    from salience._core.info import attach_info

    scripted = attach_info(torch.jit.script(env["model"]), env["model"].salience_info)
    hub = Hub([ModelSlot("a", scripted)], ImageStore([FileSource([env["folder"]])]))
    try:
        c = TestClient(create_app(hub))
        r = c.post("api/explain", json={"model": "a", "image": "f1", "method": "occlusion", "target": 0,
                                        "options": {"window": 16, "stride": 12}}).json()
        end = wait_job(_get(c), r)
        # 16-pixel windows every 12 pixels on 64 x 64: ceil((64 - 16) / 12) + 1 = 5 per side; 5 * 5
        # windows and the clean image
        assert end["state"] == "done" and end["done"] == 5 * 5 + 1
        r, seen = _long_job_in_progress(c, "f1")
        assert seen is not None and 0 < seen["progress"] < 0.5 and seen["done"] >= 8 and "note" not in seen
        c.delete(f"api/jobs/{r['job']}")
        assert wait_job(_get(c), seen, timeout=20)["state"] == "cancelled"
        key = wait_job(_get(c), c.post("api/explain", json={"model": "a", "image": "f1", "method": "vanilla",
                                                             "target": 0}).json())["key"]
        bad = c.post(f"api/maps/{key}/sanity")
        assert bad.status_code == 400 and "TorchScript" in bad.json()["error"]
    finally:
        hub.close()


# --------------------------------------------------------------------------------- maps: files, curves, sanity, figure


def test_map_files(env):
    from PIL import Image
    import io

    c = env["client"]
    key, m = _map(env, "gradcam", int(env["labels"][0]))
    r = c.get(f"api/maps/{key}.npy")
    assert r.headers["content-disposition"].startswith("attachment") and ".npy" in r.headers["content-disposition"]
    png = c.get(f"api/maps/{key}.png?cmap=gray&percentile=99.5&signed=abs")
    img = np.asarray(Image.open(io.BytesIO(png.content)))
    assert img.shape == (64, 64, 3)
    expected = salience.viz.heatmap(m, cmap="gray", percentile=99.5, signed=False)
    np.testing.assert_array_equal(img, expected)
    for bad in ("cmap=nope", "percentile=abc", "percentile=10", "signed=maybe"):
        assert c.get(f"api/maps/{key}.png?{bad}").status_code == 400, bad
    assert c.get("api/maps/nope.npy").status_code == 404
    assert c.get("api/maps/nope.png").status_code == 404


def test_curves_and_sanity_equal_the_evidence_functions(env):
    from salience import evidence

    c, model, t = env["client"], env["model"], int(env["labels"][0])
    key, m = _map(env, "gradcam", t)
    x, maps = _x(env), torch.from_numpy(m)[None]
    j = wait_job(_get(c), c.post(f"api/maps/{key}/curves").json())
    res = j["result"]
    ins = evidence.insertion_curves(model, x, maps, t, steps=res["steps"])
    dele = evidence.deletion_curves(model, x, maps, t, steps=res["steps"])
    np.testing.assert_allclose(res["insertion"], ins[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(res["deletion"], dele[0].numpy(), atol=1e-6)
    assert res["insertion_auc"] == pytest.approx(float(evidence.auc(ins)[0]), abs=1e-6)
    assert c.post(f"api/maps/{key}/curves").json()["state"] == "done"  # cached
    j = wait_job(_get(c), c.post(f"api/maps/{key}/sanity").json(), timeout=120)
    s = j["result"]
    r = evidence.randomization(model, x, salience.gradcam, t, seed=0)
    assert s["spearman_all"] == pytest.approx(r["spearman_abs"][-1], abs=1e-6)
    assert s["spearman_top"] == pytest.approx(r["spearman_abs"][0], abs=1e-6)
    assert s["passed"] == (s["spearman_all"] < s["threshold"])
    assert c.post("api/maps/nope/curves").status_code == 404
    assert c.post(f"api/maps/{key}/bogus").status_code == 404


def test_a_dropped_map_is_computed_again_for_its_curves(env):
    c, hub = env["client"], env["hub"]
    key, m = _map(env, "vanilla", 2, image="f3")
    hub.cache._items.pop(key)
    hub.cache.bytes = sum(s for _, s in hub.cache._items.values())
    assert c.get(f"api/maps/{key}.npy").status_code == 409
    j = wait_job(_get(c), c.post(f"api/maps/{key}/curves").json())
    assert j["state"] == "done"
    np.testing.assert_array_equal(npy(c.get(f"api/maps/{key}.npy").content), m)


def test_ended_jobs_hold_neither_the_image_nor_the_map(tmp_path, monkeypatch):
    """The server keeps thousands of ended jobs for polling: they must not keep what their
    computation used (each decoded image, up to 600 MB at the pixel limit) nor the maps (those are
    in the cache, within its budget). 20 uploads and a map of each, with a cache that keeps no map:
    the images left in memory are at most the 16 decoded ones the image store keeps, and no map is."""
    import gc
    import weakref

    from salience.explore import compute

    seen = []
    real = compute.explain

    def spy(slot, image, *args):
        m = real(slot, image, *args)
        seen.append((weakref.ref(image), weakref.ref(m)))
        return m

    monkeypatch.setattr(compute, "explain", spy)
    hub = Hub([ModelSlot("a", salience.load_model("demo:shapes"))], ImageStore(), cache_bytes=1)
    c = TestClient(create_app(hub))
    rng = np.random.default_rng(0)
    try:
        for i in range(20):
            png = _png_file(8, 8, zlib.compress(b"".join(b"\0" + rng.bytes(24) for _ in range(8))))
            up = c.post(f"api/images?name=u{i}.png", content=png)
            assert up.status_code == 201, up.text
            j = wait_job(_get(c), c.post("api/explain", json={"model": "a", "image": up.json()["id"],
                                                               "method": "vanilla", "target": 0}).json())
            assert j["state"] == "done", j
        assert len(hub.jobs) == 20
        gc.collect()
        assert len(seen) == 20
        assert sum(image() is not None for image, _ in seen) <= 16
        assert sum(m() is not None for _, m in seen) == 0
    finally:
        hub.close()


def test_decoded_images_are_kept_within_a_budget_of_bytes():
    """Decoded images are kept for the last used, at most 16, within the store's budget of bytes
    (1 GB by default: 16 images at the 50-megapixel limit would be 9.6 GB). Six uploads of 120 kB
    decoded each, with a budget of 300 kB: at most two stay in memory, always the last one."""
    import gc
    import weakref

    from PIL import Image

    store = ImageStore()
    default = getattr(store, "decoded_bytes", None)
    store.decoded_bytes = 300_000
    alive = []
    try:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (100, 100), (40 * i, 0, 0)).save(buf, format="PNG")
            entry = store.add_upload(buf.getvalue(), f"u{i}.png")
            alive.append(weakref.ref(store.load(entry.id)[0]))
        gc.collect()
        kept = [ref() for ref in alive if ref() is not None]
        assert 1 <= len(kept) <= 2 and alive[-1]() is not None
        assert sum(t.nbytes for t in kept) <= 300_000
        assert default is not None and default <= 2**30
    finally:
        store.close()


def test_uploads_are_kept_on_disk_within_a_budget_of_bytes():
    """The uploads' files are kept within the store's budget on disk (2 GB by default; 256 uploads
    of 64 MB were 16 GB), the oldest removed first: six uploads of about 40 kB with a budget of
    100 kB leave at most two files, the last one among them, and the older ones are gone (404)."""
    import os

    from PIL import Image

    store = ImageStore()
    default = getattr(store, "uploads_bytes", None)
    store.uploads_bytes = 100_000
    rng = np.random.default_rng(1)
    ids = []
    try:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (120, 110, 3), dtype=np.uint8)).save(buf, format="PNG")
            ids.append(store.add_upload(buf.getvalue(), f"u{i}.png").id)
        folder = store._tmp.name
        sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)]
        assert 1 <= len(sizes) <= 2 and sum(sizes) <= 100_000 and all(s > 35_000 for s in sizes)
        assert [e.id for e in store.entries()][-1] == ids[-1]
        with pytest.raises(KeyError):
            store.load(ids[0])
        assert default is not None and default <= 4 * 2**30
    finally:
        store.close()


def test_the_grid_option_takes_two_ints(env):
    """A transformer's patch grid (``grid``, (h, w)) from the page's text field: "8,8", "8x8",
    "(8, 8)" and "8" (for 8,8) give the map of ``salience.gradcam(..., grid=(8, 8))``; it was read
    as one int, so no value could pass (an int is not (h, w), "8,8" is not an int)."""
    vit = salience.load_model("demo:shapes-vit")
    hub = Hub([ModelSlot("a", vit)], ImageStore([FileSource(env["paths"][:1])]))
    c = TestClient(create_app(hub))
    target = int(env["labels"][0])
    x = preprocess(load_image(env["paths"][0]), vit.salience_info).unsqueeze(0)
    want = salience.gradcam(vit, x, target, grid=(8, 8))[0].numpy()
    try:
        for text in ("8,8", "8x8", "(8, 8)", "8"):
            r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "gradcam", "target": target,
                                            "options": {"grid": text}})
            assert r.status_code in (200, 202), r.text
            j = wait_job(_get(c), r.json())
            assert j["state"] == "done", (text, j)
            np.testing.assert_allclose(npy(c.get(f"api/maps/{j['key']}.npy").content), want, rtol=1e-5, atol=1e-6)
        r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "gradcam", "target": target,
                                        "options": {"grid": "eight"}})
        assert r.status_code == 400 and "two ints H,W" in r.json()["error"]
        for options, said in (({"grid": "0,0"}, "option grid: grid must be (h, w), two positive ints"),
                              ({"prefix_tokens": -1}, "option prefix_tokens: prefix_tokens must be a non-negative")):
            r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "gradcam", "target": target,
                                            "options": options})  # refused before a job starts, named as the page
            assert r.status_code == 400 and said in r.json()["error"], r.text
    finally:
        hub.close()


def test_a_deleted_file_or_upload_is_404_naming_it(tmp_path):
    """A file named on the command line deleted while serving (was 400, "no such file") and an
    upload whose stored copy is gone: 404 from every endpoint, naming the file (the upload by its
    name, never the server's temporary folder), once out of the caches."""
    paths, _, _ = shapes_files(tmp_path, 2)
    hub = Hub([ModelSlot("a", salience.load_model("demo:shapes"))], ImageStore([FileSource([tmp_path])]))
    c = TestClient(create_app(hub))
    try:
        up = c.post("api/images?name=mine.png", content=paths[1].read_bytes()).json()
        for image_id, shown in (("f0", str(paths[0].resolve())), (up["id"], "mine.png")):
            j = wait_job(_get(c), c.post("api/explain", json={"model": "a", "image": image_id, "method": "vanilla",
                                                               "target": 0}).json())
            assert j["state"] == "done", j
            hub.images.entry(image_id).path.unlink()
            forget(hub)
            for name, r in image_endpoints(c, image_id, j["key"]).items():
                assert r.status_code == 404, (name, r.text)
                error = r.json()["error"]
                assert error.startswith(f"the image is gone from disk: {shown}: no such file"), (name, error)
                assert "salience-explore-" not in error
        assert c.get("api/images/f1/picture.png").status_code == 200
    finally:
        hub.close()


def test_figure(env):
    from PIL import Image
    import io

    c, t = env["client"], int(env["labels"][0])
    k1, m1 = _map(env, "vanilla", t)
    k2, m2 = _map(env, "gradcam", t)
    r = c.get(f"api/figure.png?keys={k1},{k2}&cmap=fire&alpha=0.3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    fig = np.asarray(Image.open(io.BytesIO(r.content)))
    pic = load_image(env["paths"][0])[None]
    expected = salience.viz.figure(pic, {f"vanilla {salience.data.CLASSES[t]}": m1[None],
                                         f"gradcam {salience.data.CLASSES[t]}": m2[None]},
                                   scale_to=160, cmap="fire", alpha=0.3, percentile=99.0)
    assert fig.shape == expected.shape
    assert np.abs(fig.astype(int) - expected.astype(int)).max() <= 1
    k3, _ = _map(env, "vanilla", t, image="f1")
    assert c.get(f"api/figure.png?keys={k1},{k3}").status_code == 400
    assert c.get("api/figure.png").status_code == 400
    assert c.get("api/figure.png?keys=nope").status_code == 404
    assert c.get(f"api/figure.png?keys={k1}&alpha=7").status_code == 400


def test_status_and_runs(env):
    c = env["client"]
    s = c.get("api/status").json()
    assert s["models"]["a"]["queue"] == 0 and s["cache"]["items"] >= 1
    assert c.get("api/runs").json()["runs"] == []
    assert c.get("api/nothing").status_code == 404


def test_compare_two_models_side_by_side(tmp_path):
    paths, labels, _ = shapes_files(tmp_path, n=1)
    a, b = salience.load_model("demo:shapes"), salience.load_model("demo:shapes-cue")
    hub = Hub([ModelSlot("a", a), ModelSlot("b", b)], ImageStore([FileSource(paths)]))
    try:
        c = TestClient(create_app(hub))
        assert [m["name"] for m in c.get("api/info").json()["models"]] == ["demo:shapes", "demo:shapes-cue"]
        x = preprocess(load_image(paths[0]), a.salience_info).unsqueeze(0)
        t = int(labels[0])
        for slot, model in (("a", a), ("b", b)):
            r = c.post("api/explain", json={"model": slot, "image": "f0", "method": "vanilla", "target": t}).json()
            j = wait_job(_get(c), r)
            m = npy(c.get(f"api/maps/{j['key']}.npy").content)
            np.testing.assert_allclose(m, salience.vanilla(model, x, t)[0].numpy(), rtol=1e-5, atol=1e-7)
        assert c.get(f"api/figure.png?keys={j['key']}").status_code == 200
    finally:
        hub.close()


def test_a_compared_models_maps_are_drawn_on_its_own_picture(tmp_path):
    """With --compare, a model that sees the image otherwise (another input size, a centre crop)
    has its maps laid on its own picture in the figure: a row per model, each its own picture
    (model b's map on model a's picture was stretched over pixels it does not explain)."""
    import dataclasses
    from PIL import Image

    from salience._core.info import attach_info
    from salience.loading import resize_crop

    paths, labels, _ = shapes_files(tmp_path, n=1)
    a = salience.load_model("demo:shapes")
    b = attach_info(RenamedLayersNet(), dataclasses.replace(a.salience_info, name="other", input_size=(32, 32),
                                                            resize=40, default_layer=None))
    hub = Hub([ModelSlot("a", a), ModelSlot("b", b)], ImageStore([FileSource(paths)]))
    try:
        c = TestClient(create_app(hub))
        t = int(labels[0])
        keys, maps = [], []
        for slot in ("a", "b"):
            r = c.post("api/explain", json={"model": slot, "image": "f0", "method": "vanilla", "target": t}).json()
            keys.append(wait_job(_get(c), r)["key"])
            maps.append(npy(c.get(f"api/maps/{keys[-1]}/display.npy").content))
        assert maps[1].shape == (32, 32)
        r = c.get(f"api/figure.png?keys={','.join(keys)}&alpha=0.5&cmap=gray")
        assert r.status_code == 200, r.text
        fig = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    finally:
        hub.close()
    image = load_image(paths[0])
    name = salience.data.CLASSES[t]
    rows = [salience.viz.figure(resize_crop(image, m.salience_info)[None], {f"vanilla {name} ({s})": mp[None]},
                                scale_to=160, cmap="gray", alpha=0.5, percentile=99.0)
            for s, m, mp in ((("a", a, maps[0]), ("b", b, maps[1])))]
    assert fig.shape == (rows[0].shape[0] + rows[1].shape[0], max(r.shape[1] for r in rows), 3)
    top, bottom = fig[:rows[0].shape[0]], fig[rows[0].shape[0]:]
    assert np.abs(top.astype(int) - rows[0]).max() <= 1
    assert np.abs(bottom.astype(int) - rows[1]).max() <= 1


def test_each_model_of_a_comparison_has_its_own_layers(tmp_path):
    import dataclasses

    from salience._core.info import attach_info

    paths, labels, _ = shapes_files(tmp_path, n=1)
    a = salience.load_model("demo:shapes")
    b = attach_info(RenamedLayersNet(), dataclasses.replace(a.salience_info, name="other", default_layer=None))
    hub = Hub([ModelSlot("a", a), ModelSlot("b", b)], ImageStore([FileSource(paths)]))
    try:
        c = TestClient(create_app(hub))
        la, lb = (c.get(f"api/models/{s}/layers").json() for s in ("a", "b"))
        assert [x["name"] for x in lb["layers"]] == ["body", "body.0", "body.1", "top"]
        assert lb["default"] in ("body", "body.1")  # the last block with a spatial output (the ReLU's, either name)
        assert "features.6" in [x["name"] for x in la["layers"]]
        t = int(labels[0])
        bad = c.post("api/explain", json={"model": "b", "image": "f0", "method": "gradcam", "target": t,
                                          "options": {"layer": "features.6"}})
        assert bad.status_code == 400
        said = bad.json()["error"]
        assert "model b (other) has no layer named 'features.6'" in said and "api/models/b/layers" in said, said
        r = c.post("api/explain", json={"model": "b", "image": "f0", "method": "gradcam", "target": t,
                                        "options": {"layer": "body.0"}}).json()
        m = npy(c.get(f"api/maps/{wait_job(_get(c), r)['key']}.npy").content)
        x = preprocess(load_image(paths[0]), a.salience_info).unsqueeze(0)
        np.testing.assert_allclose(m, salience.gradcam(b, x, t, layer="body.0")[0].numpy(), rtol=1e-5, atol=1e-7)
        # each model's own top classes: b's are its own probabilities
        top_b = c.get("api/models/b/top", params={"image": "f0", "k": 5}).json()["classes"]
        with torch.no_grad():
            probs = b(x).softmax(1)[0]
        assert [k["index"] for k in top_b] == probs.argsort(descending=True).tolist()
        assert top_b[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    finally:
        hub.close()


# --------------------------------------------------------------------------------- server, Python, CLI


def test_hosts_ports_and_the_remote_warning(capsys):
    from salience.explore import server

    assert server.is_local("127.0.0.1") and server.is_local("localhost") and server.is_local("::1")
    assert not server.is_local("0.0.0.0") and not server.is_local("192.168.1.4")
    with pytest.raises(salience.SalienceError, match="port"):
        server.bind_socket("127.0.0.1", 70000)
    s = server.bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(salience.SalienceError, match="cannot listen"):
            server.bind_socket("127.0.0.1", s.getsockname()[1])
    finally:
        s.close()
    ex = salience.explore("demo:shapes", host="0.0.0.0", show=False)
    try:
        err = capsys.readouterr()
        assert "anyone who can reach port" in err.err and str(ex.port) in err.err
        assert ex.url in err.out
    finally:
        ex.stop()


def test_only_localhost_names_and_the_page_itself_are_answered(tmp_path):
    """Another site's page in the user's browser can post to http://127.0.0.1:PORT (uploads,
    computations), and a domain re-pointed at 127.0.0.1 (DNS rebinding) reads the answers as its
    own origin: the server answers only loopback Host names, and takes POSTs only from its own
    origin (or none, as scripts send), unless the user allows a host."""
    import httpx

    model = salience.load_model("demo:shapes")
    ex = salience.explore(model, [tmp_path], show=False)
    try:
        port, info = ex.port, ex.url + "api/info"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"app.localhost:{port}", f"[::1]:{port}", "127.0.0.2"):
            assert httpx.get(info, headers={"Host": host}).status_code == 200, host
        for host in (f"rebound.example:{port}", "rebound.example", "", f"127.0.0.1.evil.example:{port}"):
            r = httpx.get(info, headers={"Host": host})
            assert r.status_code == 403 and "--allow-host" in r.json()["error"], host
        assert httpx.get(ex.url, headers={"Host": "rebound.example"}).status_code == 403  # the page too
        body = {"model": "a", "image": "nope", "method": "vanilla"}
        for origin in ("http://evil.example", "null", f"http://evil.example:{port}", "http://127.0.0.1.evil.example"):
            r = httpx.post(ex.url + "api/explain", json=body, headers={"Origin": origin})
            assert r.status_code == 403 and "another site" in r.json()["error"], origin
        r = httpx.post(ex.url + "api/images", content=b"x", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        # the page's own origin, a loopback origin and a script without Origin reach the app (which
        # answers this unknown image with its own 4xx)
        for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Origin": f"http://localhost:{port}"}, {}):
            r = httpx.post(ex.url + "api/explain", json=body, headers=headers)
            assert r.status_code != 403 and 400 <= r.status_code < 500, (headers, r.status_code)
    finally:
        ex.stop()
    ex = salience.explore(model, [tmp_path], show=False, allow_hosts=["Proxy.Example"])
    try:
        assert httpx.get(ex.url + "api/info", headers={"Host": "proxy.example:443"}).status_code == 200
        r = httpx.post(ex.url + "api/explain", json=body, headers={"Origin": "https://proxy.example",
                                                                   "Host": "proxy.example"})
        assert r.status_code != 403
        assert httpx.get(ex.url + "api/info", headers={"Host": "other.example"}).status_code == 403
    finally:
        ex.stop()
    ex = salience.explore(model, [tmp_path], show=False, allow_hosts=["*"])
    try:
        assert httpx.get(ex.url + "api/info", headers={"Host": "any.example"}).status_code == 200
    finally:
        ex.stop()


def test_a_remote_bind_answers_any_name_but_not_other_sites_posts(capsys):
    import httpx

    ex = salience.explore("demo:shapes", host="0.0.0.0", show=False)
    try:
        url = f"http://127.0.0.1:{ex.port}/"
        assert httpx.get(url + "api/info", headers={"Host": f"workstation.lan:{ex.port}"}).status_code == 200
        body = {"model": "a", "image": "nope", "method": "vanilla"}
        r = httpx.post(url + "api/explain", json=body, headers={"Host": f"workstation.lan:{ex.port}",
                                                                "Origin": "http://evil.example"})
        assert r.status_code == 403
        r = httpx.post(url + "api/explain", json=body, headers={"Host": f"workstation.lan:{ex.port}",
                                                                "Origin": f"http://workstation.lan:{ex.port}"})
        assert r.status_code != 403
    finally:
        ex.stop()


def test_explore_from_python_shows_an_iframe_in_a_notebook(monkeypatch, tmp_path):
    import sys
    import types

    shown = []
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: types.SimpleNamespace(kernel=object())
    display = types.ModuleType("IPython.display")
    display.IFrame = lambda src, width, height: ("iframe", src, width, height)
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    model = salience.load_model("demo:shapes")
    ex = salience.explore(model, [tmp_path])
    try:
        assert shown == [("iframe", ex.url, "100%", 800)]
        import httpx
        assert httpx.get(ex.url + "api/info").json()["models"][0]["outputs"] == 5
    finally:
        ex.stop()
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/me/")
    ex = salience.explore(model)
    try:
        assert shown[-1][1] == f"/user/me/proxy/{ex.port}/"
        # behind the hub's proxy the kernel's loopback is answered for the proxy's names
        assert httpx.get(ex.url + "api/info", headers={"Host": "hub.example.org"}).status_code == 200
    finally:
        ex.stop()
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(serve_kernel_port_as_iframe=lambda **kw: shown.append(("colab", kw)))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    ex = salience.explore(model, height=500)
    try:
        assert shown[-1] == ("colab", {"port": ex.port, "path": "/", "width": "100%", "height": 500})
    finally:
        ex.stop()


def test_compare_weights_and_performance_settings_reach_the_models(monkeypatch):
    from salience._core import perf
    from salience.explore import server
    from salience.explore.jobs import Job

    seen = []
    real = server.load_model
    monkeypatch.setattr(server, "load_model", lambda spec, **kw: seen.append(kw) or real("demo:shapes"))
    with salience.performance(memory_format="channels_last"):  # as the command's --memory-format
        hub = server.build_hub("demo:shapes", compare="demo:shapes", load={"weights": "a.pt", "device": "cpu"},
                               compare_load={"weights": "random"})
    try:
        assert seen == [{"weights": "a.pt", "device": "cpu"}, {"weights": "random", "device": "cpu"}]
        job = hub.slots["b"].worker.submit(Job("probe", lambda t: perf.current().memory_format))
        assert job.wait(30) and job.result == "channels_last"
    finally:
        hub.close()
    from salience.cli import main

    assert main(["explore", "--model", "demo:shapes", "--compare-weights", "random"]) == 2


def test_several_models_to_compare(tmp_path):
    """``compare`` a list of models: slots b, c, ... in order, each model's maps its own (equal to the
    library called on it); one ``compare_load`` for all or one per model, else a clear error."""
    import dataclasses

    from salience._core.info import attach_info
    from salience.explore import server

    paths, labels, _ = shapes_files(tmp_path, n=1)
    a, b = salience.load_model("demo:shapes"), salience.load_model("demo:shapes-cue")
    c_model = attach_info(RenamedLayersNet(), dataclasses.replace(a.salience_info, name="other", default_layer=None))
    hub = server.build_hub(a, paths, compare=[b, c_model])
    try:
        c = TestClient(create_app(hub))
        assert [(m["slot"], m["name"]) for m in c.get("api/info").json()["models"]] == \
            [("a", "demo:shapes"), ("b", "demo:shapes-cue"), ("c", "other")]
        x = preprocess(load_image(paths[0]), a.salience_info).unsqueeze(0)
        t = int(labels[0])
        keys = []
        for slot, model in (("a", a), ("b", b), ("c", c_model)):
            r = c.post("api/explain", json={"model": slot, "image": "f0", "method": "vanilla", "target": t}).json()
            j = wait_job(_get(c), r)
            keys.append(j["key"])
            m = npy(c.get(f"api/maps/{j['key']}.npy").content)
            np.testing.assert_allclose(m, salience.vanilla(model, x, t)[0].numpy(), rtol=1e-5, atol=1e-7)
        assert c.get("api/figure.png", params={"keys": ",".join(keys)}).status_code == 200
    finally:
        hub.close()
    assert server.compared("demo:shapes") == [("demo:shapes", {})]  # one model, as before
    assert server.compared(["x", "y"], {"weights": "random"}) == [("x", {"weights": "random"}), ("y", {"weights": "random"})]
    assert server.compared(["x", "y"], [None, {"weights": "w.pt"}]) == [("x", {}), ("y", {"weights": "w.pt"})]
    with pytest.raises(salience.SalienceError, match="one for all, or one per model"):
        server.compared(["x", "y"], [{"weights": "a"}, {"weights": "b"}, {"weights": "c"}])


def test_cli_explore_takes_several_compare(monkeypatch):
    """``--compare`` repeated: every model reaches the server, in order; ``--compare-weights`` once for
    all, or once per ``--compare``; another count is refused (exit 2), as is a weight without a model."""
    from salience.cli import main
    from salience.explore import server

    seen: list[dict] = []

    class Served:
        url = "http://127.0.0.1:1/"

        class hub:
            computing = staticmethod(lambda: False)

        def serve_forever(self) -> None:
            pass

    monkeypatch.setattr(server, "start", lambda model, images, **kw: seen.append({"model": model, **kw}) or Served())
    base = ["explore", "--model", "demo:shapes"]
    assert main(base + ["--compare", "demo:shapes-cue"]) == 0
    assert main(base + ["--compare", "demo:shapes-cue", "--compare", "demo:shapes", "--compare-weights", "random"]) == 0
    assert main(base + ["--compare", "x", "--compare", "y", "--compare-weights", "a.pt", "--compare-weights",
                        "random"]) == 0
    assert [(s["compare"], s["compare_load"]) for s in seen] == [
        (["demo:shapes-cue"], None), (["demo:shapes-cue", "demo:shapes"], {"weights": "random"}),
        (["x", "y"], [{"weights": "a.pt"}, {"weights": "random"}])]
    assert main(base + ["--compare", "x", "--compare-weights", "a", "--compare-weights", "b",
                        "--compare-weights", "c"]) == 2
    assert main(base + ["--compare-weights", "random"]) == 2
    assert len(seen) == 3


def test_cli_explore_bad_arguments():
    from salience.cli import main

    assert main(["explore", "--model", "demo:nope"]) == 2
    assert main(["explore", "--model", "demo:shapes", "/no/such/image.png"]) == 2
    assert main(["explore", "--model", "demo:shapes", "--port", "99999"]) == 2
    assert main(["explore", "--model", "demo:shapes", "--host", "no.such.host.invalid"]) == 2


def test_an_image_decoded_in_another_thread_does_not_undo_a_capture_of_warnings(tmp_path):
    """Image decoding hides PIL's metadata notes for a moment; it did so with ``catch_warnings``, whose
    filters are the process's: entered before a map's capture began (an upload or a picture asked while
    a worker computes), its end restored the filters from before the capture, and the map's warnings
    said after that were lost (CI: a CompletenessWarning missing from its job, 1 of 1,933). Now a
    capture waits for such a block, and none undoes it: both warnings of the capturing thread are its."""
    import threading
    import warnings

    from salience._core.errors import quiet_warnings
    from salience.explore import compute

    inside, leave = threading.Event(), threading.Event()

    def decode():
        with quiet_warnings():
            inside.set()
            leave.wait(5)

    got: list = []

    def capture():
        with compute.caught_warnings() as said:
            warnings.warn("first", UserWarning)
            leave.set()  # the decoding block ends while the capture is held
            decoder.join(5)
            warnings.warn("second", UserWarning)
        got.extend(said)

    decoder = threading.Thread(target=decode)
    decoder.start()
    assert inside.wait(5)
    capturer = threading.Thread(target=capture)
    capturer.start()
    if not leave.wait(0.5):  # with the fix the capture waits for the block: let the block end
        leave.set()
    capturer.join(10)
    decoder.join(5)
    assert got == ["first", "second"]
