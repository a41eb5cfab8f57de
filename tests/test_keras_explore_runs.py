"""Keras 3 models through the explorer's API and dataset runs (Python and command line): an input the
model cannot take is one clear line (HTTP 400 from the server, which goes on; a dataset run stops
with the SalienceError, writes no shard of the refused batch and continues when run again), and a good
input gives the closed form (a Flatten + Dense model: the vanilla map is the kernel's column of the
target class). Before, an image too small for a Keras model of any size gave PyTorch's words with
Keras's terminal colours (``\\x1b[1m``) and no word of what the Keras model takes; a dataset whose items
changed shape gave torch.stack's raw RuntimeError."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import salience  # noqa: E402
from salience import SalienceError  # noqa: E402

from conftest import unchanged  # noqa: E402

keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test imported keras differently
    pytest.skip("keras was imported with another backend in this process", allow_module_level=True)

from salience.loading.keras import wrap_keras  # noqa: E402
from salience.render import viz  # noqa: E402


def _linear() -> tuple["keras.Model", np.ndarray]:
    """Flatten, Dense(3, softmax) on 4 x 5 RGB images, and its kernel (60, 3)."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((4, 5, 3))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(keras.layers.Flatten()(inp)),
                        name="lin")
    return model, np.asarray(model.get_layer("fc").kernel.numpy())


def _vanilla(kernel: np.ndarray, k: int) -> np.ndarray:
    """The vanilla map (reduction max_abs) of a linear model: |kernel column k| as (H, W, C), max over C."""
    return np.abs(kernel[:, k].reshape(4, 5, 3)).max(-1)


def _any_size() -> "keras.Model":
    """Two 3 x 3 convolutions (valid), global average pool, Dense(5, softmax) on RGB images of any size."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax", name="fc")(h), name="anysize")


def _pngs(folder: Path, n: int, h: int, w: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        viz.save_png(folder / f"im{i}.png", viz.to_uint8_image(torch.rand(3, h, w, generator=torch.Generator()
                                                                          .manual_seed(i))))
    return folder


def _one_line(msg: str, *parts: str) -> None:
    assert "\n" not in msg and "\x1b" not in msg and "Traceback" not in msg, msg
    for part in parts:
        assert part in msg, msg


TOO_SMALL = ("the Keras model 'anysize' cannot take the input of shape (1, 3, 3, 3)",
             "it takes input of shape (None, None, None, 3) (channels-last: any size, 3 channels)",
             "the image is too small for the model's layers", "give it larger images")


# --------------------------------------------------------------------------------- the explorer


@pytest.fixture
def client(tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from salience.explore.app import Hub, create_app
    from salience.explore.compute import ModelSlot
    from salience.explore.images import FileSource, ImageStore

    def make(model, folder):
        hub = Hub([ModelSlot("a", model)], ImageStore([FileSource([folder])]))
        made.append(hub)
        ids = {}
        c = TestClient(create_app(hub), raise_server_exceptions=False)
        for im in c.get("api/images").json()["images"]:
            ids[im["name"]] = im["id"]
        return c, ids
    made: list = []
    yield make
    for hub in made:
        hub.close()


def _explain(c, image_id: str, target: int) -> dict:
    from explore_helpers import wait_job

    r = c.post("api/explain", json={"model": "a", "image": image_id, "method": "vanilla", "target": target})
    assert r.status_code in (200, 202), r.text
    return wait_job(lambda url: c.get(url).json(), r.json())


def test_the_explorer_says_a_keras_model_cannot_take_an_image_too_small(client, tmp_path):
    """An image of 3 x 3 pixels for a Keras model of any size whose two 3 x 3 convolutions need 5 x 5:
    400 with one line naming what the Keras model takes (no terminal colours, no 500); the server goes
    on and explains a good image."""
    folder = tmp_path / "images"
    _pngs(folder, 1, 12, 12)
    viz.save_png(folder / "tiny.png", viz.to_uint8_image(torch.rand(3, 3, 3)))
    c, ids = client(wrap_keras(_any_size()), folder)
    r = c.get("api/models/a/top", params={"image": ids["tiny.png"]})
    assert r.status_code == 400, r.text
    _one_line(r.json()["error"], *TOO_SMALL)
    job = _explain(c, ids["tiny.png"], 0)
    assert job["state"] == "error" and job["code"] == 400, job
    _one_line(job["error"], *TOO_SMALL)
    assert _explain(c, ids["im0.png"], 0)["state"] == "done"
    assert c.get("api/models/a/top", params={"image": ids["im0.png"]}).status_code == 200


def test_the_explorer_gives_the_closed_form_of_a_keras_model(client, tmp_path):
    """The Flatten + Dense model loaded from its .keras file (as ``salience explore -m net.keras``): each
    class's vanilla map is its kernel column, whatever the image."""
    from explore_helpers import npy

    km, kernel = _linear()
    km.save(str(tmp_path / "lin.keras"))
    model = salience.load_model(str(tmp_path / "lin.keras"))
    c, ids = client(model, _pngs(tmp_path / "images", 2, 8, 10))
    for name in ids.values():
        for k in range(3):
            job = _explain(c, name, k)
            assert job["state"] == "done", job
            got = npy(c.get(f"api/maps/{job['key']}.npy").content)
            np.testing.assert_allclose(got, _vanilla(kernel, k), rtol=1e-5, atol=1e-7)


def test_the_explorer_refuses_a_flat_vector_keras_model_at_start_in_one_line(tmp_path):
    """A Keras model of flat vectors, input (None, 12): salience explains images, so the explorer refuses it at
    start, one line saying it takes vectors, not images, and what to give instead. The model itself (a torch
    module on Keras's backend) gave Keras's raw ValueError, found shape=(1, 3, 224, 224); its .keras file said
    "give it inputs of that shape", which the explorer cannot."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12,))
    flat = keras.Model(inp, keras.layers.Dense(3, name="fc")(inp), name="flat")
    flat.save(str(tmp_path / "flat.keras"))
    folder = _pngs(tmp_path / "images", 1, 8, 8)
    for model in (flat, str(tmp_path / "flat.keras"), wrap_keras(flat)):
        with pytest.raises(SalienceError) as err:
            salience.explore(model, [folder], show=False)
        _one_line(str(err.value), "the Keras model 'flat' cannot take the input of shape (1, 3, 224, 224)",
                  "it takes inputs of shape (None, 12), vectors of 12 values, not images",
                  "salience explains image models", "keras.layers.Flatten()")


# --------------------------------------------------------------------------------- dataset runs


class Tensors(Dataset):
    """Items of the shapes given, each a seeded random image."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(*self.shapes[i], generator=torch.Generator().manual_seed(i))


def _shards(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "shards").glob("*.parquet"))


def _check_closed_form(run, kernel: np.ndarray, n: int, k: int = 1) -> None:
    assert run.complete and len(run) == n
    for i in range(n):
        np.testing.assert_allclose(run.map(i, "vanilla"), _vanilla(kernel, k), rtol=1e-5, atol=1e-7)


def test_a_dataset_run_stops_on_a_keras_models_refusal_and_continues(tmp_path):
    """Images 0-3 RGB, then an RGBA one in the second batch beside an RGB one (torch.stack's raw
    RuntimeError before) and two RGBA ones in the third: the run stops at the second batch with the Keras
    model's words (what it takes, drop the alpha channel); the first shard stays, nothing of the refused
    batch is written, the folder is not locked; the same run on fixed images continues it, and every
    map is the closed form."""
    km, kernel = _linear()
    wm = wrap_keras(km)
    out = tmp_path / "run"
    args = dict(methods=["vanilla"], out=out, target=1, batch_size=2, shard_size=2, workers=0, map_dtype="float32")
    with unchanged(wm), pytest.raises(SalienceError) as err:
        salience.runs.explain_dataset(wm, Tensors([(3, 4, 5)] * 3 + [(4, 4, 5)] * 3), **args)
    _one_line(str(err.value), "the Keras model 'lin' cannot take the input of shape (1, 4, 4, 5)",
              "it takes input of shape (None, 4, 5, 3)", "x[:, :3]")
    assert _shards(out) == ["000000000.parquet"] and not (out / "index.parquet").exists()
    with pytest.raises(SalienceError) as err:  # continued, then a whole batch of RGBA images
        salience.runs.explain_dataset(wm, Tensors([(3, 4, 5)] * 4 + [(4, 4, 5)] * 2), **args)
    _one_line(str(err.value), "'lin' cannot take the input of shape (1, 4, 4, 5)", "x[:, :3]")
    assert _shards(out) == ["000000000.parquet", "000000002.parquet"]
    _check_closed_form(salience.runs.explain_dataset(wm, Tensors([(3, 4, 5)] * 6), **args), kernel, 6)
    assert _shards(out) == ["000000000.parquet", "000000002.parquet", "000000004.parquet"]


def test_a_dataset_run_refuses_an_image_of_another_shape_the_model_would_take(tmp_path):
    """A Keras model of any size takes a 12 x 12 image after 9 x 9 ones, but a run's maps are of one
    size: the run stops naming both images' shapes (torch.stack's raw error before)."""
    wm = wrap_keras(_any_size())
    out = tmp_path / "run"
    with pytest.raises(SalienceError) as err:
        salience.runs.explain_dataset(wm, Tensors([(3, 9, 9)] * 3 + [(3, 12, 12)]), ["vanilla"], out, batch_size=2,
                                      shard_size=2, workers=0)
    _one_line(str(err.value), "image Tensors[3] has shape (3, 12, 12) but image Tensors[0] had (3, 9, 9)",
              "all of one shape")
    assert _shards(out) == ["000000000.parquet"]


def test_the_command_line_dataset_run_of_a_keras_model(tmp_path, capsys):
    """``salience explain DIR -m lin.keras``: ``--channels 1`` and a Keras model of any size given
    ``--size 3`` are one line each, no traceback, no colours, nothing written; the good run's maps are
    the closed form."""
    from salience.cli import main

    km, kernel = _linear()
    km.save(str(tmp_path / "lin.keras"))
    _any_size().save(str(tmp_path / "any.keras"))
    images = _pngs(tmp_path / "images", 3, 8, 10)
    out = tmp_path / "run"
    common = [str(images), "--out", str(out), "--no-progress", "--workers", "0", "--method", "vanilla"]
    for extra, parts in (([ "-m", str(tmp_path / "lin.keras"), "--channels", "1"],
                          ("cannot take the input of shape (1, 1, 4, 5)", "(None, 4, 5, 3)")),
                         (["-m", str(tmp_path / "any.keras"), "--size", "3"], TOO_SMALL)):
        code = main(["explain", *common, *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        _one_line(err.strip(), *parts)
        assert not out.exists()
    code = main(["explain", *common, "-m", str(tmp_path / "lin.keras"), "--target", "1", "--map-dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    _check_closed_form(salience.open_run(out), kernel, 3)
