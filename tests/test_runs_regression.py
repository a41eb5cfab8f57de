"""Dataset runs of regression and one-output models: the explained output and its value in the
rows instead of a class, and the maps equal to the single-image command's on the same image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.cli import main
from salience.targets import regression


def _pngs(folder, n):
    from PIL import Image

    imgs, _, _ = salience.data.shapes(n, seed=3)
    folder.mkdir()
    for i in range(n):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return [folder / f"{i}.png" for i in range(n)]


def test_regression_run_equals_the_single_image_command(tmp_path, capsys):
    """`salience explain DIR` on the regression demo model with --target x_position --mode decrease:
    each map equals `salience explain IMAGE` with the same flags (its .npy), for the first method
    (computed with the prediction) and the second; the rows hold the output's value."""
    paths = _pngs(tmp_path / "imgs", 3)
    flags = ["-m", "demo:shapes-regression", "--method", "vanilla,gradcam", "--target", "x_position",
             "--mode", "decrease"]
    assert main(["explain", str(tmp_path / "imgs"), *flags, "--out", str(tmp_path / "run"), "--workers", "0",
                 "--map-dtype", "float32", "--batch", "2"]) == 0
    assert main(["explain", str(paths[1]), *flags, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    run = salience.open_run(tmp_path / "run")
    row = run.row(1)
    assert (row["output"], row["output_name"], row["targets"]) == (1, "x_position", [1])
    assert "predicted" not in run.table.column_names
    model = salience.load_model("demo:shapes-regression")
    x, _, _ = salience.loading.load_images([paths[1]], salience.loading.models.model_info(model))
    with torch.no_grad():
        out = model(x)[0]
    assert row["value"] == pytest.approx(float(out[1]), rel=1e-6)
    assert row["values"] == pytest.approx(out.tolist(), rel=1e-6)
    for m in ("vanilla", "gradcam"):
        want = np.load(tmp_path / "one" / f"1_{m}_x_position-decrease.npy")
        np.testing.assert_allclose(run.map(1, m), want, rtol=1e-5, atol=1e-7)
    assert "value" in (tmp_path / "run" / "index.html").read_text()
    # --top ranks classes: refused, as for one image
    assert main(["explain", str(tmp_path / "imgs"), "-m", "demo:shapes-regression", "--top", "2", "--out",
                 str(tmp_path / "top")]) == 2
    assert "regression model" in capsys.readouterr().err


def test_one_output_model_is_a_score(tmp_path):
    """A module with one output: explained as regression output 0 (increase by default; decrease
    asked here), its value in the rows; equal to the method with salience.targets.regression."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1))
    x = torch.randn(5, 3, 12, 12)
    run = salience.explain_dataset(model, torch.utils.data.TensorDataset(x), ["vanilla"], tmp_path / "r",
                                   mode="decrease", workers=0, map_dtype="float32", batch_size=2)
    want = salience.vanilla(model, x, regression(0, "decrease")).numpy()
    np.testing.assert_allclose(np.stack([run.map(i, "vanilla") for i in range(5)]), want, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        values = model(x)[:, 0].tolist()
    assert run.table.column("value").to_pylist() == pytest.approx(values, rel=1e-6)
    with pytest.raises(SalienceError, match="one output"):  # top=1 is its one target since session 55, as in a run of
        salience.explain_dataset(model, torch.utils.data.TensorDataset(x), ["vanilla"], tmp_path / "t", top=2)  # files
    with pytest.raises(SalienceError, match="mode must be"):
        salience.explain_dataset(model, torch.utils.data.TensorDataset(x), ["vanilla"], tmp_path / "m", mode="up")
