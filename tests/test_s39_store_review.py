"""Review of the run store's salience-run/2 layout (the errors in a column per method, the run's seed): a run
folder of a format this salience does not know is not called an older salience's when continued; the metrics'
refusals name the image by its index in the run, each row its own; index.html shows the thumbnails of a row whose
image was read though its mask was not."""
from __future__ import annotations

import json

import pytest
import torch

import salience
from salience import SalienceError
from test_runs_bad_image import Marked

pytest.importorskip("pyarrow")


def _images(n: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, 8, 8)


def _run(x, folder, methods=("vanilla",), **kw):
    return salience.explain_dataset(Marked().eval(), torch.utils.data.TensorDataset(x), list(methods), folder,
                                    workers=0, map_dtype="float32", batch_size=kw.pop("batch_size", 4), **kw)


def test_a_run_of_an_unknown_format_is_not_called_older_when_continued(tmp_path):
    """A run folder whose run.json says a format this salience does not know (a newer salience's,
    ``salience-run/3``) is refused as unknown, with "upgrade salience": it said the run was begun by an older
    salience whose errors were joined in ``error``, which open_run and the explorer still read (open_run
    refuses it), and offered overwrite=True, which deletes the newer run. Nothing is written."""
    folder = tmp_path / "run"
    _run(_images(), folder)
    manifest = json.loads((folder / "run.json").read_text())
    manifest["format"] = "salience-run/3"
    (folder / "run.json").write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != ".salience-run.lock"}
    with pytest.raises(SalienceError) as caught:
        _run(_images(), folder)
    said = str(caught.value)
    assert "'salience-run/3'" in said and "upgrade salience" in said, said
    assert "older" not in said and "still read" not in said, said
    with pytest.raises(SalienceError, match="unknown run format 'salience-run/3'.*upgrade salience"):
        salience.open_run(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != ".salience-run.lock"} == before


def test_the_metrics_refusals_name_each_image_by_its_index_in_the_run(tmp_path):
    """SmoothGrad explains images 0-3 of a batch of 4 whose predictions are all NaN (its noisy copies are finite);
    their insertion curves are NaN at the end (the image put back): each row's ``smoothgrad.metrics_error`` names
    its own image by its index in the run, as the methods' refusals do (every row said the batch's words, "image 0
    at step 20", images 1-3 too: only images whose prediction is not finite were not bisected). Image 4, in the
    second batch and refused alone, says "image 4" (it said "image 0", its position in the call); image 5 keeps
    its metric."""
    from test_runs_bad_image import MARK

    x = _images(6)
    x[[0, 1, 2, 3, 4], 0, 0, 0] = MARK
    run = _run(x, tmp_path / "run", ["smoothgrad"], method_options={"smoothgrad": {"samples": 3}},
               metrics=["insertion"])
    said = run.table.column("smoothgrad.metrics_error").to_pylist()
    for i in range(5):
        assert said[i] is not None and f"the model's score is nan on image {i} at step " in said[i], (i, said[i])
        assert run.row(i)["smoothgrad.error"] is None and run.row(i)["smoothgrad.insertion"] is None
    assert said[5] is None and run.row(5)["smoothgrad.insertion"] is not None
    assert run.failed() == 5


def test_the_gallery_shows_the_thumbnails_of_an_image_whose_mask_was_not_read(tmp_path):
    """``RUN/index.html`` in Chromium: image 1, whose mask file cannot be read (its row's ``error``: ``mask not
    read: ...``), was read and explained (its map is stored): its row shows its tiles, as the explorer's run table
    does; only the row of an image that could not be read has none (the page hid them for any row with an
    ``error``, the mask's too)."""
    import numpy as np
    from PIL import Image

    from test_runs_bad_image import gallery_rows

    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
        Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(masks / f"{i:03d}.png")
    (masks / "001.png").write_bytes(b"not a png")
    (imgs / "zz_broken.png").write_bytes(b"not an image")  # image 3: not read, no thumbnails
    run = salience.explain_dataset("demo:shapes", imgs, ["vanilla"], tmp_path / "run", masks=masks,
                                   metrics=["pointing"], batch_size=4, workers=0)
    assert run.row(1)["error"].startswith("mask not read:") and np.isfinite(run.map(1, "vanilla")).all()
    tiles, = gallery_rows(tmp_path / "run", 4, "tr.querySelectorAll('.tile').length")
    assert sorted(tiles) == [["0", 2], ["1", 2], ["2", 2], ["3", 0]], tiles


_TOUCHY = '''
import torch
from torch import nn
from salience._core.info import ModelInfo, attach_info
from salience.loading.images import with_preprocessing


class Touchy(nn.Module):
    """Finite on its images; NaN for one blue everywhere once its pixel (7, 7)'s red is no longer 128 (a deleted
    pixel: deletion's blurred copy)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, 3))

    def forward(self, x):
        bad = (x[:, 2].amin((1, 2)) > 0.99) & ((x[:, 0, 7, 7] - 128 / 255).abs() > 1e-3)
        return self.body(x) + torch.where(bad, torch.tensor(float("nan")), torch.tensor(0.0))[:, None]


def build():
    model = Touchy().eval()
    info = with_preprocessing(ModelInfo(name="touchy", class_names=["a", "b", "c"]), size=(8, 8), mean=[0.0] * 3,
                              std=[1.0] * 3)
    return attach_info(model, info)
'''


def test_the_command_names_the_columns_that_say_why_images_failed(tmp_path, capsys):
    """``salience explain DIR --metrics deletion``: the deletion of image 1 is refused (a perturbed copy's score
    NaN), its map kept; the summary line sends the reader to ``vanilla.metrics_error``, the one column that says
    why (it named ``error`` and ``METHOD.error``, both null on that row), and exits 1."""
    import numpy as np
    from PIL import Image

    from salience.cli import main

    (tmp_path / "touchy.py").write_text(_TOUCHY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        a = rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)
        if i == 1:
            a[..., 2], a[7, 7, 0] = 255, 128
        Image.fromarray(a).save(imgs / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["explain", str(imgs), "-m", f"python:{tmp_path / 'touchy.py'}:build", "--method", "vanilla",
               "--metrics", "deletion", "--out", str(out), "--workers", "0", "--no-progress"])
    said = capsys.readouterr().out.strip().splitlines()[-1]
    run = salience.open_run(out)
    assert run.row(1)["vanilla.metrics_error"] is not None and run.row(1)["vanilla.error"] is None, run.row(1)
    assert rc == 1 and said.endswith("; 1 image(s) failed: see the 'vanilla.metrics_error' column"), said
