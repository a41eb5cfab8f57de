"""Session 40, the run's own work cut (issue 17): the float16 cast of a shard's maps clips in place on
the float16 copy (no float32 copy of the maps), and a batch whose items all decoded keeps its maps'
float32 array as it is (no NaN-filled copy). Neither may change a bit of the store: checked against the
implementations they replace (kept here as the references), on the whole store of a tiny run (maps,
sprites, rows, index, gallery) in bf16 + channels-last, and on the cast's edge values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import salience
from salience.runs import job, store


def _reference_cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The cast as it was: the float32 maps clipped to float16's finite range, then cast."""
    if dtype == np.float16:
        big = float(np.finfo(np.float16).max)
        arr = np.clip(arr, -big, big)
    return arr.astype(dtype, copy=False)


def test_the_float16_cast_gives_the_bits_of_clip_then_cast():
    """Edge values (float16's largest 65504, values rounding to it or past it, float32's extremes,
    infinities, NaN, -0.0, subnormals and values below float16's range) and 200,000 values over 15
    decades: the same float16 bits as clipping the float32 values first."""
    edges = [0.0, -0.0, 1e-8, -1e-8, 2.98e-8, 2.99e-8, 5.96e-8, 6.1e-5, 65504.0, 65519.99, 65520.0, -65520.0,
             7e4, -7e4, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, 1.0009765625, 0.1]
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)
    a = np.concatenate([np.array(edges), spread]).astype(np.float32)
    with np.errstate(over="raise", invalid="raise"):  # no warning of the overflow the clip handles
        got = store._cast(a, np.dtype(np.float16))
    want = _reference_cast(a, np.dtype(np.float16))
    assert got.dtype == np.float16 and got.tobytes() == want.tobytes()
    assert np.isfinite(got[~np.isnan(a)]).all()  # past the range, infinities too: +-65504
    assert a.dtype == np.float32 and a[8] == 65504.0  # the caller's array untouched


def _reference_finish(plan, done, warn=None):
    """finish_items as it was for the maps: every batch's maps copied into a NaN-filled float32 array."""
    result = _finish(plan, done, warn)
    for name, m in done.maps.items():
        full = np.full((len(done.items), *m.shape[1:]), np.nan, dtype=np.float32)
        full[done.good] = m.numpy()
        result.maps[name] = full
    return result


_finish = job.finish_items


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("run.json", ".salience-run.lock")}


@pytest.mark.parametrize("bad", [False, True])
def test_the_store_is_byte_for_byte_the_one_the_replaced_code_writes(tmp_path, monkeypatch, bad):
    """8 images (with ``bad``: one unreadable file, a batch with a NaN row) in batches of 3, shards of 4,
    float16 maps, thumbnails, bf16 + channels-last: every file the same bytes as with the replaced cast and
    finish_items."""
    from PIL import Image

    imgs, _, _ = salience.data.shapes(8, seed=3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    if bad:
        (folder / "4.png").write_bytes(b"not a png")
    model = salience.load_model("demo:shapes")
    runs = {}
    for which in ("reference", "now"):
        if which == "reference":
            monkeypatch.setattr(store, "_cast", _reference_cast)
            monkeypatch.setattr(job, "finish_items", _reference_finish)
        else:
            monkeypatch.undo()
        out = tmp_path / which
        salience.explain_dataset(model, folder, ["vanilla", "gradcam"], out, batch_size=3, shard_size=4, workers=0,
                                 model_spec="demo:shapes", precision="bf16", memory_format="channels_last")
        runs[which] = _files(out)
    assert any(k.startswith("maps/") for k in runs["now"]) and any(k.startswith("thumbs/") for k in runs["now"])
    assert runs["now"].keys() == runs["reference"].keys()
    assert [k for k in runs["now"] if runs["now"][k] != runs["reference"][k]] == []
