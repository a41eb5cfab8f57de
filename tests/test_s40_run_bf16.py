"""bf16 and channels-last in a dataset run (issue 17 / 19, session 40): the run's passes run under both, the stored
maps are float16 and within bf16's tolerance of an fp32 run's (relative L2, ``|a - b| / |b|``, at most 0.1), and the precision is part of the run's command (a run
is continued in the precision it was begun in; another one is refused unless overwrite)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.cli import main

METHODS = ["vanilla", "integrated_gradients"]


def net() -> nn.Module:
    """Three convolutions (Grad-CAM's default layer the last), random weights, 4 classes."""
    from salience._core.info import ModelInfo, attach_info

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    attach_info(model, ModelInfo(name="net3", input_size=(16, 16)))
    return model


def images(folder: Path, n: int = 4, size: int = 16) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
    return paths


KW = dict(batch_size=2, shard_size=2, workers=0, target=1, model_spec="net3",
          method_options={"integrated_gradients": {"steps": 8}})


def test_a_bf16_channels_last_run_runs_its_passes_so_and_stores_float16_maps_near_fp32(tmp_path):
    """Every batch's pass of the run: the convolutions' input channels-last, their output bfloat16 (autocast);
    the shards hold float16 (the documented store), and each map is within bf16's tolerance of the fp32 run's (a
    relative L2 distance of at most 0.1, correlation at least 0.99: measured 0.003-0.05 and 0.993 here;
    docs/datasets.md); the model comes back as it was (contiguous weights, float32)."""
    from conftest import unchanged

    model = net()
    files = images(tmp_path / "imgs")
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(
        (i[0].shape[0], i[0].is_contiguous(memory_format=torch.channels_last) and not i[0].is_contiguous(), o.dtype)))
    ref = salience.explain_dataset(model, files, METHODS, tmp_path / "fp32", **KW)
    # the batches' passes (2 images, or integrated gradients' chunks of 16 image-steps); the 1-image ones are the
    # run's probes (its output size), run with the defaults
    passes = lambda: [s for s in seen if s[0] > 1]  # noqa: E731
    assert len(passes()) >= 6 and {s[1:] for s in passes()} == {(False, torch.float32)}, seen
    seen.clear()
    with unchanged(model):
        run = salience.explain_dataset(model, files, METHODS, tmp_path / "bf16", precision="bf16",
                                       memory_format="channels_last", **KW)
    # per batch: the prediction pass (the rows' predicted class), vanilla's pass, then integrated gradients' 16
    # image-steps in one chunk; in the first batch before them the engine's memory probe, a pass of its own (one item
    # per image, thrown away: session 45, docs/performance.md), cached for the second; the probe runs in the forced
    # channels-last layout too (Run.probe_layout: every run without a folded copy, docs/performance.md)
    assert [s[:2] for s in passes()] == [(2, True), (2, True), (2, True), (16, True), (2, True), (2, True),
                                         (16, True)], passes()
    assert {s[2] for s in passes()} == {torch.bfloat16}, seen
    for m in METHODS:
        for shard in sorted((tmp_path / "bf16" / "maps" / m).glob("*.npy")):
            assert np.load(shard).dtype == np.float16
        for i in range(len(files)):
            a, b = run.map(i, m), ref.map(i, m)
            assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b), (m, i)
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99, (m, i)
            assert not np.array_equal(a, b)  # computed in bf16, not the fp32 maps again
    assert run.options["precision"] == "bf16" and ref.options["precision"] == "fp32"


def _stopped(run: Path) -> None:
    """The run as a kill after its first shard leaves it: the second shard and the index gone."""
    (run / "shards" / "000000002.parquet").unlink()
    (run / "index.parquet").unlink()


def test_a_run_is_continued_in_its_precision_and_another_is_refused_unless_overwrite(tmp_path):
    """Begun in bf16, continued in fp32 (or the reverse, or fp16): refused, saying the precision differs; the same
    precision continues it (channels-last may change: layout is rounding, not another function); overwrite starts
    again in the new precision."""
    model, files = net(), images(tmp_path / "imgs")
    out = tmp_path / "run"
    salience.explain_dataset(model, files, METHODS, out, precision="bf16", **KW)
    _stopped(out)
    with pytest.raises(SalienceError, match=r"different command \(precision: 'bf16' -> 'fp32'\)"):
        salience.explain_dataset(model, files, METHODS, out, **KW)
    with pytest.raises(SalienceError, match=r"precision: 'bf16' -> 'fp16'"):
        salience.explain_dataset(model, files, METHODS, out, precision="fp16", **KW)
    with salience.performance(precision="fp32"):  # the process's setting is the run's precision too
        with pytest.raises(SalienceError, match=r"precision: 'bf16' -> 'fp32'"):
            salience.explain_dataset(model, files, METHODS, out, **KW)
    done = salience.explain_dataset(model, files, METHODS, out, precision="bf16", memory_format="channels_last", **KW)
    assert done.complete and done.options["precision"] == "bf16"
    again = salience.explain_dataset(model, files, METHODS, out, overwrite=True, **KW)
    assert again.complete and again.options["precision"] == "fp32"

def test_a_run_begun_before_the_command_held_its_precision_is_continued_in_the_one_given(tmp_path):
    """A run.json written before session 40 holds no precision, whichever the run was begun in (an older salience
    ran ``--precision bf16`` runs too): the same command continues it, with ``precision="bf16"`` as without (the
    older salience's rule), and its run.json is kept as it was (no precision claimed for the shards already
    written)."""
    model, files = net(), images(tmp_path / "imgs")
    for given in ("bf16", "fp32"):
        out = tmp_path / given
        salience.explain_dataset(model, files, METHODS, out, precision=given, **KW)
        manifest = json.loads((out / "run.json").read_text())
        del manifest["command"]["precision"]  # as an older salience wrote it
        (out / "run.json").write_text(json.dumps(manifest))
        _stopped(out)
        run = salience.explain_dataset(model, files, METHODS, out, precision=given, **KW)
        assert run.complete and "precision" not in run.options
        assert "precision" not in json.loads((out / "run.json").read_text())["command"]


def test_the_command_line_records_its_precision_and_refuses_another_on_the_run(tmp_path, capsys):
    """``salience explain DIR --precision bf16 --memory-format channels_last --out RUN``: run.json's command says bf16;
    the same command without ``--precision`` on the stopped run is refused (exit 2, the difference said); with
    ``--overwrite`` it runs in fp32."""

    images(tmp_path / "imgs", 4, 32)
    out = tmp_path / "run"
    base = ["explain", str(tmp_path / "imgs"), "--model", "demo:shapes", "--out", str(out), "--workers", "0",
            "--batch", "2", "--shard-size", "2", "--method", "vanilla"]
    assert main(base + ["--precision", "bf16", "--memory-format", "channels_last"]) == 0
    assert json.loads((out / "run.json").read_text())["command"]["precision"] == "bf16"
    _stopped(out)
    capsys.readouterr()
    assert main(base) != 0
    assert "precision: 'bf16' -> 'fp32'" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["command"]["precision"] == "fp32"
    shutil.rmtree(out)
