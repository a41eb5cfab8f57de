"""The Ray engine writes what the local engine writes of a run's errors and seeds: the ``METHOD.error``
columns (each image of a wholly refused batch its own words), and ``seed=None`` as the run's seed drawn by
the driver (every actor explains with it). A local cluster of 2 CPUs, started here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import salience

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("pyarrow")
import s3_server  # noqa: E402
import test_runs_ray  # noqa: E402

s3, cluster = s3_server.s3, test_runs_ray.cluster  # the fixtures: a local cluster of 2 CPUs (after the S3 server)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("s39ray")
    imgs, _, _ = salience.data.shapes(6, seed=5)
    for i in range(6):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_seed_none_on_ray_is_the_drivers_run_seed(cluster, images, tmp_path):
    """RISE and SmoothGrad with ``seed=None`` on Ray (2 actors, batches of 2): the maps of a local run given
    the Ray run's seed (``run.json``)."""
    options = {"rise": {"masks": 16, "cell": 4, "seed": None}, "smoothgrad": {"samples": 2, "seed": None}}
    kw = dict(workers=0, map_dtype="float32", batch_size=2, shard_size=2)
    on_ray = salience.explain_dataset("demo:shapes", images, ["rise", "smoothgrad"], tmp_path / "ray", engine="ray",
                                      actors=2, method_options=options, **kw)
    seed = json.loads((tmp_path / "ray" / "run.json").read_text())["seed"]
    given = {m: {**o, "seed": seed} for m, o in options.items()}
    local = salience.explain_dataset("demo:shapes", images, ["rise", "smoothgrad"], tmp_path / "local",
                                     method_options=given, **kw)
    for i in range(6):
        for m in ("rise", "smoothgrad"):
            np.testing.assert_allclose(on_ray.map(i, m), local.map(i, m), rtol=1e-5, atol=1e-6)


def test_each_refused_images_own_words_on_ray(cluster, tmp_path):
    """The batch of 2 whose images are refused for two reasons (tests/test_s39_store_errors.py) on Ray: the
    same ``METHOD.error`` columns as the local engine's, each row its own image's words."""
    import test_runs_bad_image
    import test_s39_store_errors as here

    x = here._images(2)
    x[0, 0, 0, 0] = here.BRIGHT
    x[1, 0, 0, 1] = here.DARK
    data = torch.utils.data.TensorDataset(x)
    methods = {"choosy": here._choosy, "vanilla": salience.vanilla}
    kw = dict(workers=0, map_dtype="float32", batch_size=2)
    for module in (here, test_runs_bad_image):  # the actors cannot import the tests' modules
        ray.cloudpickle.register_pickle_by_value(module)
    try:
        on_ray = salience.explain_dataset(here.Marked().eval(), data, methods, tmp_path / "ray", engine="ray",
                                          actors=1, **kw)
    finally:
        for module in (here, test_runs_bad_image):
            ray.cloudpickle.unregister_pickle_by_value(module)
    local = salience.explain_dataset(here.Marked().eval(), data, methods, tmp_path / "local", **kw)
    said = ["error", "choosy.error", "vanilla.error"]
    assert on_ray.table.select(said).to_pylist() == local.table.select(said).to_pylist() == [
        {"error": None, "choosy.error": "an image is too bright", "vanilla.error": None},
        {"error": None, "choosy.error": "an image is too dark", "vanilla.error": None}]
