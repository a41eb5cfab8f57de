"""A map that is one value everywhere (an untrained model's zero-initialised head, a target whose
score ignores the input) is drawn as a flat colour: where a map is shown or written, the command
line and the explorer say so (``viz.constant_map_note``), and the figure's tile says ``constant V``.
The library's methods still return the raw zeros."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience.cli import main
from salience.render import viz

NETS = '''
import torch
import torch.nn as nn

def blind():
    """The output ignores the input: a zero-initialised head after pooling."""
    head = nn.Linear(48, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), head)

def seeing():
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3))

def second_blind():
    """Class 0 first (its bias), class 1 second and blind (a zero row), class 2 last: with --top 2 the
    first target's map sees, the second's is zero."""
    torch.manual_seed(0)
    head = nn.Linear(48, 3)
    with torch.no_grad():
        head.weight[1] = 0
        head.bias.copy_(torch.tensor([100.0, 50.0, -100.0]))
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), head)

def channel_flat():
    """The mean of each channel, then a head: vanilla's gradient at pixel (c, h, w) is W[t, c] / (H W),
    constant over each channel at another value, so with --reduce none the per-channel map's
    max_c |m| (its figure) is one value everywhere while its channels differ."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

def seeing_32():
    """seeing() taking 32 x 32 images (its ModelInfo): salience evaluate draws the demo's shapes at 32."""
    from salience._core.info import ModelInfo, attach_info
    return attach_info(seeing(), ModelInfo(name="seeing_32", input_size=(32, 32)))

def tiny():
    """seeing()'s head scaled by 1e-6: its vanilla maps (the head's weights / 64, ~1e-9) are not constant
    but below float16's smallest value (6e-08)."""
    torch.manual_seed(0)
    head = nn.Linear(48, 3)
    with torch.no_grad():
        head.weight.mul_(1e-6)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), head)
'''


def _two_pictures(folder):
    """Two 32x32 RGB noise pictures (seeded) in ``folder``: their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = folder / f"pic{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def setup(tmp_path):
    """Two image files and a ``python:`` spec module with a blind and a seeing model."""
    paths = _two_pictures(tmp_path)
    nets = tmp_path / "zero_nets.py"
    nets.write_text(NETS)
    return paths, nets


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _blind() -> nn.Module:
    head = nn.Linear(48, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), head)


# --------------------------------------------------------------------------------- the criterion


def test_constant_means_every_value_equal():
    assert viz.constant_value(np.zeros((4, 5))) == 0.0
    assert viz.constant_value(-np.zeros((3, 4, 5))) == 0.0 and str(viz.constant_value(-np.zeros((2, 2)))) == "0.0"
    assert viz.constant_value(torch.full((6, 6), 2.5)) == 2.5
    m = np.zeros((4, 5))
    m[2, 3] = 1e-30  # the smallest difference is a picture (min-max stretches it)
    assert viz.constant_value(m) is None and viz.constant_map_note(m) is None
    assert viz.constant_value(np.full((3, 3), np.nan)) is None  # NaN maps are errors of their own
    zero = viz.constant_map_note(np.zeros((4, 5)))
    assert zero.startswith("the map is constant (zero) everywhere")
    assert "does not depend on the input" in zero and "zero-initialised head" in zero
    assert "another layer or target" in zero and "check the weights" in zero
    assert viz.constant_map_note(np.full((4, 5), 2.5)).startswith("the map is constant (2.5) everywhere")


def test_the_library_returns_the_raw_zeros_and_says_nothing(recwarn):
    x = torch.rand(2, 3, 32, 32)
    m = salience.vanilla(_blind(), x, 0)
    assert torch.equal(m, torch.zeros_like(m))
    assert not [w for w in recwarn if "constant" in str(w.message)]


# --------------------------------------------------------------------------------- the picture


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_a_constant_map_is_one_flat_colour_with_a_note(value):
    """heatmap / overlay / figure of a constant map: finite, one colour (no 0 / 0); the figure's tile
    says ``constant V`` (labels on) and is flat without labels; the other row is untouched."""
    m = np.full((16, 16), value)
    heat = viz.heatmap(m)
    assert len(np.unique(heat.reshape(-1, 3), axis=0)) == 1
    assert np.isfinite(viz.scale(m)).all()
    image = np.full((3, 16, 16), 0.5)
    assert len(np.unique(viz.overlay(image, m).reshape(-1, 3), axis=0)) == 1
    maps = {"vanilla": np.stack([m, np.arange(256.0).reshape(16, 16)])}
    images = np.stack([image, image])
    bare = viz.figure(images, maps, labels=False, overlay=False, pad=0)  # columns: image, map
    tile = bare[:16, 16:32]
    assert (tile == heat).all()
    noted = viz.figure(images, maps, overlay=False, pad=4, scale_to=64)
    plain = viz.figure(images, {"vanilla": maps["vanilla"] + np.stack([np.eye(16), np.zeros((16, 16))])},
                       overlay=False, pad=4, scale_to=64)
    assert noted.shape == plain.shape
    header = noted.shape[0] - 2 * 64 - 3 * 4
    first = noted[header + 4:header + 4 + 64, 4 + 64 + 4:4 + 2 * 64 + 4]
    colours = np.unique(first.reshape(-1, 3), axis=0)
    assert len(colours) > 2  # the note's text on its white box, over the flat colour
    assert (first[-20:] == heat[0, 0]).all()  # below the note: the flat colour
    second = slice(header + 4 + 64 + 4, header + 4 + 2 * 64 + 4)
    assert (noted[second] == plain[second]).all()  # the row with a real map has no note


# --------------------------------------------------------------------------------- the command line


def test_explain_warns_of_each_constant_map(setup, tmp_path, capsys):
    paths, nets = setup
    rc, out, err = _run(["explain", *paths, "-m", f"python:{nets}:blind", "--size", "32", "--method",
                         "vanilla,gradcam", "--layer", "0", "--top", "2", "-o", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln]
    assert len(lines) == 2 * 2 * 2, err  # 2 images x 2 methods x 2 targets
    for ln in lines:
        assert ln.startswith("salience: warning: ") and "the map is constant (zero) everywhere" in ln, ln
        assert "does not depend on the input" in ln and "check the weights" in ln, ln
    assert f"salience: warning: {paths[1]} (gradcam, top2: " in err
    # the raw maps are written as computed: zeros; the figure is a picture (no NaN reached it)
    for npy in (tmp_path / "o").glob("*.npy"):
        assert not np.load(npy).any()
    png = np.asarray(Image.open(tmp_path / "o" / "pic0.png"))
    assert png.dtype == np.uint8 and png.ndim == 3


def test_explain_of_a_model_that_sees_says_nothing(setup, tmp_path, capsys):
    paths, nets = setup
    rc, out, err = _run(["explain", *paths, "-m", f"python:{nets}:seeing", "--size", "32", "-o", tmp_path / "o",
                         "--no-progress"], capsys)
    assert rc == 0 and err == "", err


def test_a_dataset_run_warns_once_a_method(setup, tmp_path, capsys):
    """A dataset run: one line per method (and constant value), naming the images; none for the
    model that sees."""
    paths, nets = setup
    common = [*paths, "--size", "32", "--dataset", "--workers", "0", "--no-progress"]
    rc, out, err = _run(["explain", *common, "-m", f"python:{nets}:blind", "-o", tmp_path / "run"], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "constant" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("salience: warning: vanilla, 2 of 2 image(s) (")
    assert str(paths[0]) in lines[0] and str(paths[1]) in lines[0]
    assert "the map is constant (zero) everywhere" in lines[0] and "check the weights" in lines[0]
    rc, out, err = _run(["explain", *common, "-m", f"python:{nets}:seeing", "-o", tmp_path / "run2"], capsys)
    assert rc == 0 and "constant" not in err, err


def test_a_dataset_run_warns_of_every_targets_constant_maps(setup, tmp_path, capsys):
    """--top 2: the first target's maps see, the second's (class 1, a zero row of the head) are zero:
    the run says so, naming the class, from the table's ``METHOD.constant`` column (per target: the
    constant value, else null), which equals the rule on the stored maps."""
    from salience.runs import open_run

    paths, nets = setup
    rc, out, err = _run(["explain", *paths, "--size", "32", "--dataset", "--workers", "0", "--no-progress",
                         "-m", f"python:{nets}:second_blind", "--top", "2", "-o", tmp_path / "run"], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "constant" in ln]
    assert lines == [f"salience: warning: vanilla, 2 of 2 image(s) ({paths[0]} (class 1), {paths[1]} (class 1); "
                     f"2 map(s)): {viz.constant_map_note(np.zeros(2))}"], err
    run = open_run(tmp_path / "run")
    table = run.table
    assert table.column("targets").to_pylist() == [[0, 1], [0, 1]]
    assert table.column("vanilla.constant").to_pylist() == [[None, 0.0], [None, 0.0]]
    for row in table.to_pylist():
        stored = np.load(tmp_path / "run" / "maps" / "vanilla" / f"{row['shard']}.npy")[row["offset"]]
        assert [viz.constant_value(stored[k]) for k in range(2)] == row["vanilla.constant"]


def _tiny_run(setup, tmp_path, capsys, *extra):
    paths, nets = setup
    rc, out, err = _run(["explain", *paths, "--size", "32", "--dataset", "--workers", "0", "--no-progress",
                         "-m", f"python:{nets}:tiny", *extra, "-o", tmp_path / "run"], capsys)
    assert rc == 0, err
    return paths, err


def _tiny_reference(path) -> np.ndarray:
    """tiny()'s vanilla map of one image by hand: d score / d pixel = W[c, cell] / 64 (the 8 x 8 pooled
    cell of the pixel), c the predicted class, the same for every pixel of a cell."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_nets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiny()[2].weight.detach().double().numpy()


def test_a_tiny_map_is_not_constant_and_float16_storage_says_it_loses_it(setup, tmp_path, capsys, recwarn):
    """A map of values ~1e-9 (below float16's smallest value, 6e-08) is not constant: the run's
    ``.constant`` column says so (judged on the float32 map), its stored float16 map is all zero, and
    the run says that the storage lost it and what to do (map_dtype float32), never the constant-map
    note ("untrained model ..."). With --map-dtype float32 the stored map is the map, and nothing is said."""
    from salience.runs import open_run
    from salience.runs.store import float16_note

    paths, nets = setup
    weight = _tiny_reference(nets)
    assert 0 < np.abs(weight).max() / 64 < 3e-8 and np.ptp(weight) > 0  # the map's values: below float16's range
    _, err = _tiny_run(setup, tmp_path, capsys)
    assert "untrained" not in err and "constant (zero)" not in err, err
    said = [str(w.message) for w in recwarn if "float16" in str(w.message)]  # printed by the command, recorded here
    assert not [w for w in recwarn if "constant (zero)" in str(w.message)]
    assert len(said) == 1 and "map_dtype=\"float32\"" in said[0] and "--map-dtype" not in said[0], err  # Python's
    # words: the command prints it with its flag (tests/test_api_keywords.py)
    assert str(paths[0]) in said[0] and str(paths[1]) in said[0]
    assert float16_note(0.0) in said[0]
    run = open_run(tmp_path / "run")
    rows = run.table.to_pylist()
    assert [r["vanilla.constant"] for r in rows] == [[None], [None]]  # not constant: judged before storage
    for r in rows:
        stored = np.load(tmp_path / "run" / "maps" / "vanilla" / f"{r['shard']}.npy")[r["offset"]]
        assert stored.dtype == np.float16 and not stored.any()  # what float16 keeps of it
        assert r["vanilla.max"] > 0  # the float32 map's extremes (the first target's, |.| not taken: vanilla is signed)

    (tmp_path / "f32").mkdir()
    recwarn.clear()
    _, err = _tiny_run(setup, tmp_path / "f32", capsys, "--map-dtype", "float32")
    assert "float16" not in err and "constant" not in err, err
    assert not [w for w in recwarn if "float16" in str(w.message) or "constant" in str(w.message)]
    run = open_run(tmp_path / "f32" / "run")
    for r in run.table.to_pylist():
        stored = np.load(tmp_path / "f32" / "run" / "maps" / "vanilla" / f"{r['shard']}.npy")[r["offset"], 0]
        want = np.kron(np.abs(weight[r["predicted"]].reshape(3, 4, 4)).max(0), np.ones((8, 8))) / 64  # max_c |g|
        assert stored.dtype == np.float32 and np.allclose(stored, want, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------- the explorer


def test_the_explorer_shows_the_warning_under_the_cell(tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from explore_helpers import npy, shapes_files, wait_job
    from salience.explore.app import Hub, create_app
    from salience.explore.compute import ModelSlot
    from salience.explore.images import FileSource, ImageStore

    shapes_files(tmp_path, n=1)
    torch.manual_seed(0)
    seeing = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3))
    hub = Hub([ModelSlot("a", _blind()), ModelSlot("b", seeing)], ImageStore([FileSource([tmp_path])]))
    c = TestClient(create_app(hub))
    try:
        def ask(model):
            r = c.post("api/explain", json={"model": model, "image": "f0", "method": "vanilla", "target": 0})
            assert r.status_code in (200, 202), r.text
            return wait_job(lambda url: c.get(url).json(), r.json())

        blind, sees = ask("a"), ask("b")
        assert blind["state"] == "done" and sees["state"] == "done"
        assert len(blind["warnings"]) == 1 and blind["warnings"][0] == viz.constant_map_note(np.zeros(2))
        assert sees["warnings"] == []
        assert ask("a")["warnings"] == blind["warnings"]  # the cached map keeps it
        assert not npy(c.get(f"api/maps/{blind['key']}.npy").content).any()  # raw zeros served as they are
        png = c.get(f"api/maps/{blind['key']}.png")
        assert png.status_code == 200
        pic = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
        assert len(np.unique(pic.reshape(-1, 3), axis=0)) == 1
    finally:
        hub.close()


# --------------------------------------------------------------------------------- stored maps: gallery, explorer


def _blind_run(setup, tmp_path, capsys, name: str = "x<i>&__ROWS__.png"):
    """A --top 2 run of ``second_blind`` (each image's second map zero) on the two images, the first
    renamed ``name`` (markup and a placeholder of the gallery's page in it)."""
    paths, nets = setup
    odd = paths[0].with_name(name)
    paths[0].rename(odd)
    rc, out, err = _run(["explain", odd, paths[1], "--size", "32", "--dataset", "--workers", "0", "--no-progress",
                         "-m", f"python:{nets}:second_blind", "--top", "2", "-o", tmp_path / "run"], capsys)
    assert rc == 0, err
    return [odd, paths[1]], [ln[len("salience: warning: "):] for ln in err.splitlines() if "constant" in ln]


def test_the_gallery_page_says_the_constant_maps_as_text(setup, tmp_path, capsys):
    import html

    paths, said = _blind_run(setup, tmp_path, capsys)
    assert len(said) == 1 and f"{paths[0]} (class 1)" in said[0]
    page = (tmp_path / "run" / "index.html").read_text(encoding="utf-8")
    assert f'<p class="warn">{html.escape("warning: " + said[0])}</p>' in page
    assert "<i>" not in page  # the file name's markup is text: escaped, in the note as in the rows' JSON
    assert page.count("const ROWS = [[") == 1  # the name's __ROWS__ was not taken for the page's placeholder


def test_the_explorer_says_a_runs_constant_maps_and_a_stored_maps_note_in_a_header(setup, tmp_path, capsys):
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import json

    from PIL import Image as PILImage
    from starlette.testclient import TestClient

    from explore_helpers import npy
    from salience.explore.app import WARNINGS_HEADER, create_app
    from salience.explore.server import build_hub

    paths, said = _blind_run(setup, tmp_path, capsys, name="first.png")
    hub = build_hub(_blind(), runs=[tmp_path / "run"])
    c = TestClient(create_app(hub))
    try:
        (run,) = c.get("api/runs").json()["runs"]
        assert run["warnings"] == said  # under the gallery's table, the command line's text
        assert "vanilla.constant" not in run["metrics"] and "vanilla.max" in run["metrics"]
        rows = c.get("api/runs/r0/rows").json()
        assert rows["total"] == 2 and all("vanilla.constant" not in r for r in rows["rows"])
        # each row says its flat maps for the page (its thumbnails cannot): class 1's (k=1), zero
        note = viz.constant_map_note(np.zeros(2))
        assert [r["constant"] for r in rows["rows"]] == [
            {"vanilla": [{"k": 1, "class": 1, "name": None, "value": 0.0, "note": note}]}] * 2
        flat = c.get("api/runs/r0/rows/0/maps/vanilla.npy", params={"k": "1"})
        assert flat.status_code == 200 and not npy(flat.content).any()
        assert json.loads(flat.headers[WARNINGS_HEADER]) == [viz.constant_map_note(np.zeros(2))]
        seen = c.get("api/runs/r0/rows/0/maps/vanilla.npy", params={"k": "0"})
        assert npy(seen.content).std() > 0 and WARNINGS_HEADER not in seen.headers
        thumb = c.get("api/runs/r0/rows/0/thumb.jpg", params={"tile": "1"})
        assert thumb.status_code == 200 and WARNINGS_HEADER not in thumb.headers
    finally:
        hub.close()
    # a warning raised while a thumbnail is read (PIL: a sprite over MAX_IMAGE_PIXELS) comes in the header
    hub = build_hub(_blind(), runs=[tmp_path / "run"])
    c = TestClient(create_app(hub))
    before = PILImage.MAX_IMAGE_PIXELS
    try:
        PILImage.MAX_IMAGE_PIXELS = 20_000  # the sprite: 2 images x (image + 1 method) tiles of 96 x 96 = 36,864
        thumb = c.get("api/runs/r0/rows/1/thumb.jpg", params={"tile": "0"})
        assert thumb.status_code == 200, thumb.text
        (text,) = json.loads(thumb.headers[WARNINGS_HEADER])
        assert "decompression bomb" in text.lower()
    finally:
        PILImage.MAX_IMAGE_PIXELS = before
        hub.close()


def test_evaluate_says_a_methods_constant_maps_on_the_command_line_and_in_the_report(setup, tmp_path, capsys):
    """salience evaluate of the blind model: its vanilla maps are zero on both images, said as a
    warning line, in results.json and as text at the top of report.html; the model that sees: nothing."""
    import html
    import json

    paths, nets = setup
    common = ["evaluate", "--images", paths[0].parent, "--method", "vanilla", "--n", "2", "--deletion-steps", "2",
              "--randomization-images", "1"]
    rc, out, err = _run([*common, "-m", f"python:{nets}:blind", "-o", tmp_path / "ev"], capsys)
    assert rc == 0, err
    want = [f"vanilla, 2 of 2 image(s) (images 0, 1): {viz.constant_map_note(np.zeros(2))}"]
    assert [ln for ln in err.splitlines() if "constant" in ln] == [f"salience: warning: {w}" for w in want], err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["warnings"] == want
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert f'<p class="bad">{html.escape("warning: " + want[0])}</p>' in page
    rc, out, err = _run([*common, "-m", f"python:{nets}:seeing", "-o", tmp_path / "ev2"], capsys)
    assert rc == 0 and "constant" not in err, err
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["warnings"] == []


def test_evaluate_says_a_constant_oracle_or_baseline_and_nothing_of_good_ones(setup, tmp_path, capsys):
    """The oracle and the baselines are the table's ceiling and floor: an empty mask (image 1), a full
    one (image 2) and a flat grey image (image 1: spectral residual and Sobel edges 0) make theirs
    constant, said as the method's are (warning line, results.json, top of report.html), with the mask
    or the image to check; image 0 (noise, a square mask) is not named. Noise images with square
    masks: nothing."""
    import html
    import json

    from salience.evidence import evaluate as E

    paths, nets = setup
    square = np.zeros((32, 32), np.uint8)
    square[8:20, 10:24] = 255
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(paths[0].parent / "pic2_grey.png")
    paths[1].rename(paths[0].parent / "pic1.bak")  # image 1 (sorted): the grey one; image 2: noise
    (paths[0].parent / "pic1.bak").rename(paths[0].parent / "pic3.png")
    for name, mask in (("pic0", square), ("pic2_grey", np.zeros_like(square)), ("pic3", np.full_like(square, 255))):
        Image.fromarray(mask).save(masks / f"{name}.png")
    common = ["evaluate", "--images", paths[0].parent, "--masks", masks, "--method", "vanilla", "--n", "3",
              "--deletion-steps", "2", "--randomization-images", "1", "-m", f"python:{nets}:seeing"]
    rc, out, err = _run([*common, "-o", tmp_path / "ev"], capsys)
    assert rc == 0, err
    oracle = ("the map (the mask) is constant ({}) everywhere: the mask marks {}, so the oracle ranks no pixel above "
              "another and its row is no ceiling for the methods. Check the mask file {!r} in {!r}: the object is "
              "where its brightest channel is at least half its maximum "
              "(in a file whose alpha is below half its largest alpha somewhere: where its alpha is at least half its largest alpha)")
    want = [f"{E.ORACLE}, 1 of 3 image(s) (image 1): {oracle.format('zero', 'no pixel', 'pic2_grey.png', str(masks))}",
            f"{E.ORACLE}, 1 of 3 image(s) (image 2): {oracle.format('1', 'every pixel', 'pic3.png', str(masks))}"]
    want += [f"{name}, 1 of 3 image(s) (image 1): the map is constant (zero) everywhere: the image holds nothing "
             "this baseline responds to (e.g. one flat colour), so it ranks no pixel above another and its row is no "
             "floor for the methods. Check the image" for name in ("spectral_residual", "sobel_edges")]
    assert [ln for ln in err.splitlines() if "constant" in ln] == [f"salience: warning: {w}" for w in want], err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["warnings"] == want
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    top = page.index("Methods and metrics")
    for w in want:
        assert page.index(f'<p class="bad">{html.escape("warning: " + w)}</p>') < top
    for p in (paths[0].parent / "pic2_grey.png", masks / "pic2_grey.png", masks / "pic3.png"):
        p.unlink()
    Image.fromarray(square.T.copy()).save(masks / "pic3.png")
    rc, out, err = _run([*common, "--n", "2", "-o", tmp_path / "ev2"], capsys)
    assert rc == 0 and "constant" not in err and "warning" not in err, err
    res = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert res["warnings"] == [] and [r["name"] for r in res["rows"]][1:] == [E.ORACLE, *E.BASELINES]
    assert 'class="bad"' not in (tmp_path / "ev2" / "report.html").read_text(encoding="utf-8")


def test_evaluate_with_mask_tensors_names_the_masks_to_check_not_a_file(tmp_path):
    """A Python caller of ``evaluate_methods`` gives the masks as a tensor: there is no mask file. A
    constant oracle (image 1's mask empty, images 2 and 3's full) is said naming those images' masks
    (``masks[i]``) and what a mask should be; the text said for masks read from files names the file
    (``constant_notes(..., mask_files=)``), several files in one folder once with the folder."""
    from salience.evidence import evaluate as E

    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 3))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[0, 8:20, 10:24] = True  # image 0 marks a square; 1 nothing; 2 and 3 everything
    masks[2:] = True
    rows, maps = E.evaluate_methods(model, x, masks, methods=["vanilla"], steps=2, randomization_images=1)
    assert [r.name for r in rows][:2] == ["vanilla", E.ORACLE] and not any(r.error for r in rows)
    said = [t for t in E.constant_notes(maps) if t.startswith(E.ORACLE)]
    base = ("the map (the mask) is constant ({}) everywhere: the mask marks {}, so the oracle ranks no pixel above "
            "another and its row is no ceiling for the methods. ")
    assert said == [
        f"{E.ORACLE}, 1 of 4 image(s) (image 1): {base.format('zero', 'no pixel')}Check the mask of image 1 "
        "(masks[1]): it should be true on the object and false elsewhere",
        f"{E.ORACLE}, 2 of 4 image(s) (images 2, 3): {base.format('1', 'every pixel')}Check the masks of images "
        "2, 3 (masks[2], masks[3]): each should be true on the object and false elsewhere"], said
    assert all("file" not in t for t in said)
    files = [tmp_path / "m" / f"{n}.png" for n in ("a", "b", "c", "d")]
    by_file = E.constant_notes({E.ORACLE: maps[E.ORACLE]}, mask_files=files)
    check = ("the object is where its brightest channel is at least half its maximum "
             "(in a file whose alpha is below half its largest alpha somewhere: where its alpha is at least half its largest alpha)")
    assert by_file == [
        f"{E.ORACLE}, 1 of 4 image(s) (image 1): {base.format('zero', 'no pixel')}Check the mask file 'b.png' in "
        f"'{tmp_path / 'm'}': {check}",
        f"{E.ORACLE}, 2 of 4 image(s) (images 2, 3): {base.format('1', 'every pixel')}Check the mask files 'c.png', "
        f"'d.png' in '{tmp_path / 'm'}': {check}"], by_file
    apart = [tmp_path / d / "m.png" for d in "wxyz"]  # masks in several folders: each named by its path
    assert E.constant_notes({E.ORACLE: maps[E.ORACLE]}, mask_files=apart)[1].endswith(
        f"Check the mask files '{apart[2]}', '{apart[3]}': {check}")


def test_evaluate_names_mask_files_in_the_current_folder_plainly_and_each_quoted(setup, tmp_path, capsys,
                                                                                 monkeypatch):
    """salience evaluate --masks . (run in the masks' folder): two empty masks, one of a file whose name
    holds ", ". Before, the text read "Check the mask files pic1, grey.png, pic2.png in ." (three names
    or two? and "in ." for the current folder); now each name is quoted as Python writes a string and
    the current folder is not named."""
    import json

    from salience.evidence import evaluate as E

    paths, nets = setup
    imgs = paths[0].parent
    paths[0].rename(imgs / "pic1, grey.png")
    paths[1].rename(imgs / "pic2.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("pic1, grey", "pic2"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / f"{name}.png")
    monkeypatch.chdir(masks)
    rc, out, err = _run(["evaluate", "--images", imgs, "--masks", ".", "--method", "vanilla", "--n", "2", "--deletion-steps",
                         "2", "--randomization-images", "1", "-m", f"python:{nets}:seeing", "-o", tmp_path / "ev"],
                        capsys)
    assert rc == 0, err
    want = (f"{E.ORACLE}, 2 of 2 image(s) (images 0, 1): the map (the mask) is constant (zero) everywhere: the mask "
            "marks no pixel, so the oracle ranks no pixel above another and its row is no ceiling for the methods. "
            "Check the mask files 'pic1, grey.png', 'pic2.png': the object is where its brightest channel is at "
            "least half its maximum "
            "(in a file whose alpha is below half its largest alpha somewhere: where its alpha is at least half its largest alpha)")
    assert [ln for ln in err.splitlines() if ln.startswith(f"salience: warning: {E.ORACLE}")] == [
        f"salience: warning: {want}"], err
    assert want in json.loads((tmp_path / "ev" / "results.json").read_text())["warnings"]


def test_evaluate_on_the_demos_shapes_says_a_constant_mask_is_the_demos_not_a_tensor_given(setup, tmp_path, capsys,
                                                                                          monkeypatch):
    """salience evaluate without --images uses the demo's generated shapes and masks: no file, and no
    ``masks`` tensor of the user's. Before, a constant one was said as "Check the mask of image 1
    (masks[1]): ..."; now the text says these are the demo's generated masks, by image index and the
    call that made them, and what to do. (The demo's masks are never constant: one is emptied here.)"""
    from salience.demo import data
    from salience.evidence import evaluate as E

    _, nets = setup
    shapes_batch = data.shapes_batch

    def emptied(n, seed=0, **kw):
        b = shapes_batch(n, seed, **kw)
        b.masks[1] = False
        return b

    monkeypatch.setattr(data, "shapes_batch", emptied)
    rc, out, err = _run(["evaluate", "--method", "vanilla", "--n", "2", "--deletion-steps", "2", "--randomization-images", "1",
                         "-m", f"python:{nets}:seeing_32", "-o", tmp_path / "ev"], capsys)
    assert rc == 0, err
    said = [ln for ln in err.splitlines() if ln.startswith(f"salience: warning: {E.ORACLE}")]
    assert said == [
        f"salience: warning: {E.ORACLE}, 1 of 2 image(s) (image 1): the map (the mask) is constant (zero) everywhere: "
        "the mask marks no pixel, so the oracle ranks no pixel above another and its row is no ceiling for the "
        "methods. These are the demo's generated masks, not files: image index 1 of "
        "salience.demo.data.shapes_batch(2, seed=10000, size=32), which draws each image's shape into its mask, "
        "so a constant one is salience's fault: report it with that call, and evaluate on images with masks of "
        "your own (salience evaluate --images DIR --masks DIR; run_evaluation(images=, masks=))"], err
    assert "masks[" not in err


def test_constant_notes_refuses_mask_files_that_are_not_one_per_image():
    """``constant_notes(maps, mask_files=)`` (public: docs/evaluation.md) names image i's mask file as
    ``mask_files[i]``: a list of another length than the maps' images is refused with one line saying
    both counts, whatever the maps hold (before: an IndexError when a constant mask's image had no
    file, or the wrong files named when the list was longer; nothing said when no mask was constant)."""
    from salience import SalienceError
    from salience.evidence import evaluate as E

    masks = torch.zeros(3, 8, 8)
    masks[0, 2:4, 2:4] = 1  # image 0 marks a square; images 1 and 2 nothing (constant)
    for files in (["a.png"], ["a.png", "b.png", "c.png", "d.png"]):
        for maps in ({E.ORACLE: masks}, {E.ORACLE: masks[:2]}):
            with pytest.raises(SalienceError, match=r"^mask_files: " + str(len(files)) + r" file\(s\) for "
                               + str(maps[E.ORACLE].shape[0]) + r" image\(s\) of the oracle's maps; give one mask "
                               r"file per image, image i's at mask_files\[i\]$"):
                E.constant_notes(maps, mask_files=files)
    with pytest.raises(SalienceError, match=r"^constant_notes: give mask_files= \(masks read from files\) or "
                       r"demo_masks= \(the demo's generated masks\), not both$"):
        E.constant_notes({E.ORACLE: masks}, mask_files=["a.png", "b.png", "c.png"], demo_masks="shapes_batch(3)")
    assert E.constant_notes({E.ORACLE: masks}, mask_files=["m/a.png", "m/b.png", "m/c.png"])[0].endswith(
        "Check the mask files 'b.png', 'c.png' in 'm': the object is where its brightest channel is at least half its "
        "maximum (in a file whose alpha is below half its largest alpha somewhere: where its alpha is at least half its largest alpha)")


def test_visualize_says_a_class_model_image_left_flat(setup, tmp_path, capsys):
    """salience visualize of the blind model: no gradient reaches the image, which stays at its flat
    start (all black): a warning line says so, the constant-map text naming the image; the model that
    sees gets a picture and no line."""
    paths, nets = setup
    common = ["visualize", "--target", "0", "--size", "32", "--steps", "5"]
    rc, out, err = _run([*common, "-m", f"python:{nets}:blind", "-o", tmp_path / "c.png"], capsys)
    assert rc == 0, err
    assert len(np.unique(np.asarray(Image.open(tmp_path / "c.png")).reshape(-1, 3), axis=0)) == 1
    said = f"salience: warning: {tmp_path / 'c.png'}: the class model image is constant (zero) everywhere"
    assert err.startswith(said), err
    assert err.splitlines() == [f"salience: warning: {tmp_path / 'c.png'}: "
                                + viz.constant_map_note(np.zeros(2), what="class model image")], err
    rc, out, err = _run([*common, "-m", f"python:{nets}:seeing", "-o", tmp_path / "d.png"], capsys)
    assert rc == 0 and err == "", err
    assert len(np.unique(np.asarray(Image.open(tmp_path / "d.png")).reshape(-1, 3), axis=0)) > 1


def test_the_explorer_says_float16_lost_a_stored_map_that_is_not_constant(setup, tmp_path, capsys, recwarn):
    """The tiny run's stored maps are all zero (float16), its maps are not constant (its ``.constant``
    column): the stored map's header says float16 storage lost it and what to do, not the constant-map
    note's causes (an untrained model ...); the run's gallery says nothing of constant maps (a map the
    run records as constant still gets the constant-map note: the test above)."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import json

    from starlette.testclient import TestClient

    from explore_helpers import npy
    from salience.explore.app import WARNINGS_HEADER, create_app
    from salience.explore.server import build_hub
    from salience.runs.store import float16_note

    _tiny_run(setup, tmp_path, capsys)
    hub = build_hub(_blind(), runs=[tmp_path / "run"])
    c = TestClient(create_app(hub))
    try:
        (run,) = c.get("api/runs").json()["runs"]
        assert run["warnings"] == []
        for row in (0, 1):
            got = c.get(f"api/runs/r0/rows/{row}/maps/vanilla.npy")
            assert got.status_code == 200 and not npy(got.content).any()  # what float16 kept
            assert json.loads(got.headers[WARNINGS_HEADER]) == [float16_note(0.0, command=True)]
            assert "untrained" not in got.headers[WARNINGS_HEADER]
    finally:
        hub.close()


def _channels(model, x, target):
    """A per-channel "method": channel 0 is +1, channel 1 is -2, channel 2 is 0.5 everywhere (the
    image's pixel (0, 0) of channel 2 0.25 when its class is odd: a map that is not flat)."""
    n, _, h, w = x.shape
    m = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1).repeat(n, 1, h, w)
    if target is not None:
        t = torch.as_tensor(target).reshape(n, -1)[:, 0]
        m[t % 2 == 1, 0, 0, 0] = 3.0
    return m


def test_a_per_channel_map_is_judged_as_it_is_shown(tmp_path, recwarn):
    """A per-channel map whose channels are each constant (+1, -2, 0.5) is shown as ``max_c |m|``: 2
    everywhere, one flat colour. Its ``.constant`` says so (2.0, equal to ``.min`` and ``.max``, the
    stored map as read, and the run's note), as every picture of it; before, ``.constant`` counted
    the raw channels (not constant) while ``.min`` = ``.max`` = 2 and the thumbnail was flat. A map
    whose ``max_c |m|`` is not flat (pixel (0, 0) is 3) is not constant in any of them."""
    pytest.importorskip("pyarrow")
    from salience._core.info import ModelInfo, attach_info
    from salience.runs.job import constant_notes

    paths = _two_pictures(tmp_path)
    for name, target, flat in (("even", 0, True), ("odd", 1, False)):
        model = attach_info(_blind(), ModelInfo(name="blind", input_size=(32, 32)))
        run = salience.explain_dataset(model, paths, {"channels": _channels}, tmp_path / name, target=target,
                                       workers=0)
        for r in run.table.to_pylist():
            shown = run.map(r["index"], "channels", 0)  # max_c |m|, as the explorer serves it
            if flat:
                assert r["channels.constant"] == [2.0] and r["channels.min"] == r["channels.max"] == 2.0
                assert viz.constant_value(shown) == 2.0
            else:
                assert r["channels.constant"] == [None] and r["channels.max"] == 3.0 and r["channels.min"] == 2.0
                assert viz.constant_value(shown) is None
        notes = constant_notes(run.table, ["channels"])
        assert notes == ([f"channels, 2 of 2 image(s) ({paths[0]}, {paths[1]}): "
                          f"{viz.constant_map_note(np.full(2, 2.0))}"] if flat else [])


def _near_thousand(model, x, target):
    """1000 + 1e-4 * (row + column): not constant in float32 (its spacing at 1000 is 6e-05), one value in
    float16 (its spacing at 1000 is 0.5: every value rounds to 1000)."""
    n, _, h, w = x.shape
    grid = torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)
    return (1000.0 + 1e-4 * grid.float()).expand(n, h, w).clone()


def test_a_map_closer_than_float16s_precision_is_said_lost_by_the_storage(tmp_path, recwarn):
    """A map whose values differ by less than float16's precision is stored as one value (1000): the
    run's ``.constant`` is null (the float32 map is not constant), the run warns that float16 storage
    made it constant (its value said, map_dtype float32 the remedy), and the explorer's header on the
    stored map says the same, never the constant-map note."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import json

    from starlette.testclient import TestClient

    from explore_helpers import npy
    from salience._core.info import ModelInfo, attach_info
    from salience.explore.app import WARNINGS_HEADER, create_app
    from salience.explore.server import build_hub
    from salience.runs.store import float16_note

    m = _near_thousand(None, torch.zeros(1, 3, 32, 32), None)[0].double().numpy()
    assert np.ptp(m) > 0 and np.ptp(m.astype(np.float16)) == 0 and m.astype(np.float16)[0, 0] == 1000
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    model = attach_info(_blind(), ModelInfo(name="blind", input_size=(32, 32)))
    run = salience.explain_dataset(model, [tmp_path / "pic.png"], {"near": _near_thousand}, tmp_path / "run",
                                   workers=0)
    (row,) = run.table.to_pylist()
    assert row["near.constant"] == [None] and row["near.max"] > row["near.min"]
    said = [str(w.message) for w in recwarn if "float16" in str(w.message)]
    assert len(said) == 1 and float16_note(1000.0) in said[0], said
    assert "differ by less than float16's precision" in said[0] and "constant (1000)" in said[0]
    hub = build_hub(model, runs=[tmp_path / "run"])
    c = TestClient(create_app(hub))
    try:
        got = c.get("api/runs/r0/rows/0/maps/near.npy")
        assert got.status_code == 200 and (npy(got.content) == 1000).all()
        assert json.loads(got.headers[WARNINGS_HEADER]) == [float16_note(1000.0, command=True)]
    finally:
        hub.close()


def test_explain_judges_a_per_channel_map_as_its_figure_draws_it(setup, tmp_path, capsys):
    """salience explain --reduce none of channel_flat(): each channel's map is constant at W[t, c] / 1024,
    the channels differ, the figure draws max_c |m| = max_c |W[t, c]| / 1024, one flat colour (its tile
    says "constant"): the command says so, with that value (before: nothing, as the raw channels differ)."""
    import importlib.util

    paths, nets = setup
    spec = importlib.util.spec_from_file_location("channel_nets", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    w = mod.channel_flat()[2].weight.detach().double().numpy()
    assert len(set(np.abs(w[0]))) == 3  # the channels' values differ
    rc, out, err = _run(["explain", paths[0], "-m", f"python:{nets}:channel_flat", "--size", "32", "--method",
                         "vanilla", "--reduce", "none", "--target", "0", "-o", tmp_path / "o", "--no-progress"], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "constant" in ln]
    assert len(lines) == 1, err
    assert viz.constant_map_note(np.full(2, np.abs(w[0]).max() / 1024)) in lines[0]
    assert viz.constant_map_note(np.full(2, np.abs(w[0]).max() / 1024)) == \
        viz.constant_map_note(np.full(2, np.float32(np.abs(w[0]).max() / 1024)))  # said at the note's 4 digits


def test_the_explorer_judges_a_per_channel_map_as_the_page_draws_it(tmp_path):
    """The explorer's vanilla map of a mean-of-channels model with reduce none: channels constant at
    W[t, c] / (H W), which differ; the page draws max_c |m|, one flat colour: the cell's warnings say
    the map is constant (that value), as the command line does (before: nothing). reduce max_abs:
    the same note (the same picture)."""
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from explore_helpers import npy, shapes_files, wait_job
    from salience.explore.app import Hub, create_app
    from salience.explore.compute import ModelSlot
    from salience.explore.images import FileSource, ImageStore

    shapes_files(tmp_path, n=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    w = model[2].weight.detach().double().numpy()
    hub = Hub([ModelSlot("a", model)], ImageStore([FileSource([tmp_path])]))
    c = TestClient(create_app(hub))
    try:
        def ask(reduce):
            r = c.post("api/explain", json={"model": "a", "image": "f0", "method": "vanilla", "target": 0,
                                            "options": {"reduce": reduce}})
            assert r.status_code in (200, 202), r.text
            return wait_job(lambda url: c.get(url).json(), r.json())

        raw, reduced = ask("none"), ask("max_abs")
        assert raw["state"] == "done" and reduced["state"] == "done"
        m = npy(c.get(f"api/maps/{raw['key']}.npy").content)
        assert m.ndim == 3 and len({float(v) for v in m.reshape(3, -1)[:, 0]}) == 3  # the channels differ
        h, wd = m.shape[1:]
        want = viz.constant_map_note(np.full(2, np.abs(w[0]).max() / (h * wd)))
        assert raw["warnings"] == [want] and reduced["warnings"] == [want]
    finally:
        hub.close()


def test_the_static_gallery_says_a_runs_constant_maps_under_their_thumbnails(tmp_path):
    """``RUN/index.html`` opened from disk in Chromium. Two runs of demo:shapes with --top 2: r0 with its
    head's row of class 1 zero (class 1's maps zero, class 0's, the thumbnail's, see), r1 with the whole
    last layer zero (every map zero). A thumbnail is a tile of a sprite, a flat colour that says
    nothing of why: the page says it as text under the method's thumbnail, as the explorer's gallery
    does (``constant map (0)``, ``class NAME: constant map (0)`` for a later target, the whole note on
    hover); the image's tile and a map that sees have none. Class 1 is named with markup: said as
    text. (Before: only the run-level note above the table.) The table's ``constant`` column marks the rows
    (a warning sign, the maps named), and the "maps" filter keeps the rows with a constant map, or those
    without."""
    import dataclasses

    from explore_helpers import browser_api, browser_context, shapes_files

    browser_api()  # skips here without Playwright or Chromium
    pytest.importorskip("pyarrow")
    (tmp_path / "imgs").mkdir()
    paths, _, _ = shapes_files(tmp_path / "imgs", n=2)
    model = salience.load_model("demo:shapes")
    names = list(model.salience_info.class_names)
    names[1] = "<b>tri&amp;</b>"  # markup in a class name: text on the page
    model.salience_info = dataclasses.replace(model.salience_info, class_names=tuple(names))
    with torch.no_grad():
        model.head.weight[1] = 0
        model.head.bias.copy_(torch.tensor([100.0, 50.0, -100.0, -100.0, -100.0]))  # top 2: classes 0, 1
    salience.explain_dataset(model, paths, ["vanilla", "input_x_gradient"], tmp_path / "r0", top=2, workers=0)
    with torch.no_grad():
        model.head.weight.zero_()
    salience.explain_dataset(model, paths, ["vanilla"], tmp_path / "r1", top=2, workers=0)
    note = viz.constant_map_note(np.zeros(2))
    errors: list[str] = []
    shown = {}
    with browser_context() as context:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        for run in ("r0", "r1"):
            page.goto((tmp_path / run / "index.html").resolve().as_uri())
            page.wait_for_function("document.querySelectorAll('#body tr').length === 2")
            for row in (0, 1):
                tr = page.locator("#body tr").nth(row)
                assert tr.locator("td").nth(1).inner_text() == str(row)  # the index column
                tiles = {}
                for t in range(tr.locator(".tile").count()):
                    flat = tr.locator(f".tile[data-tile='{t}'] .flat")
                    tiles[t] = {"texts": flat.all_inner_texts(),
                                "titles": [flat.nth(i).get_attribute("title") for i in range(flat.count())],
                                "visible": all(flat.nth(i).is_visible() for i in range(flat.count())),
                                "markup": flat.locator("b").count()}
                shown[run, row] = tiles
            # the table's constant column: a marker on each row with a constant map, and a filter by it
            shown[run, "cells"] = page.evaluate("""() => {
              const i = [...document.querySelectorAll('#head th')].findIndex(th => th.dataset.col === 'constant');
              return [...document.querySelectorAll('#body tr')].map(tr => [tr.children[i].textContent,
                                                                           tr.children[i].className]); }""")
            page.select_option("#fl", "varying")
            page.wait_for_function("document.querySelectorAll('#body tr').length === 0")
            page.select_option("#fl", "constant")
            page.wait_for_function("document.querySelectorAll('#body tr').length === 2")
    assert not errors, errors
    none = {"texts": [], "titles": [], "visible": True, "markup": 0}
    for row in (0, 1):
        # r0: tiles image, vanilla, input_x_gradient: class 1's maps flat (said with its name), class 0's see
        said = {"texts": [f"class {names[1]}: constant map (0)"], "titles": [note], "visible": True, "markup": 0}
        assert shown["r0", row] == {0: none, 1: said, 2: said}, shown
        # r1: both targets' maps flat, the thumbnail's first
        assert shown["r1", row] == {0: none, 1: {"texts": ["constant map (0)", f"class {names[1]}: constant map (0)"],
                                                 "titles": [note, note], "visible": True, "markup": 0}}, shown
    assert shown["r0", "cells"] == [[f"\u26a0 vanilla (class {names[1]}); input_x_gradient (class {names[1]})", "warn"]] * 2
    assert shown["r1", "cells"] == [[f"\u26a0 vanilla; vanilla (class {names[1]})", "warn"]] * 2


def _red_green_run(tmp_path, methods=("vanilla",)):
    """A --top 2 run on a red and a green picture of a model that pools each channel to its mean (a linear head,
    class 0 "red" = R - G, class 1 "green" = G - R): the red picture is predicted red, the green one green, and
    every vanilla map is constant (the gradient at pixel (c, h, w) is W[t, c] / (H W), the same at every pixel)."""
    import json

    from salience._core.info import ModelInfo, attach_info

    paths = []
    for name, rgb in (("red", (255, 0, 0)), ("green", (0, 255, 0))):
        paths.append(tmp_path / f"{name}.png")
        Image.new("RGB", (16, 16), rgb).save(paths[-1])
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]))
        model[2].bias.zero_()
    attach_info(model, ModelInfo(name="rg", input_size=(16, 16), class_names=("red", "green")))
    folder = tmp_path / "run"
    salience.explain_dataset(model, paths, list(methods), folder, top=2, workers=0)
    return folder, json


def _page_data(folder):
    import json
    import re

    page = (folder / "index.html").read_text(encoding="utf-8")
    about = json.loads(re.search(r"const ABOUT = (.*);\n", page).group(1))
    rows = json.loads(re.search(r"const ROWS = (.*);\n", page).group(1))
    flats = json.loads(re.search(r"const FLATS = (.*), FLAT = ", page).group(1))
    return about["columns"], rows, flats


def test_the_static_gallery_names_a_later_targets_class_as_the_explorer_does(tmp_path):
    """A run without class names in its manifest (one an earlier salience began: its rows' predicted_name still
    name the classes): ``index.html`` said a later target's constant map as ``class 1``, while the explorer's
    gallery names it by the rows' predicted names (``class green``). Now the page does too; its table's
    ``constant`` column names it the same way."""
    from salience.runs import gallery

    folder, json = _red_green_run(tmp_path)
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["class_names"] == ["red", "green"]
    cols, rows, flats = _page_data(folder)
    assert [r[cols.index("predicted_name")] for r in rows] == ["red", "green"]
    assert [[f[:3] for f in flats["rows"][str(i)]] for i in range(2)] == [[[0, 0, "red"], [0, 1, "green"]],
                                                                          [[0, 0, "green"], [0, 1, "red"]]]
    del manifest["class_names"]
    (folder / "run.json").write_text(json.dumps(manifest))
    gallery.write(folder)
    cols, rows, flats = _page_data(folder)
    assert [[f[:3] for f in flats["rows"][str(i)]] for i in range(2)] == [[[0, 0, "red"], [0, 1, "green"]],
                                                                          [[0, 0, "green"], [0, 1, "red"]]]
    assert [r[cols.index("constant")] for r in rows] == ["vanilla; vanilla (class green)",
                                                         "vanilla; vanilla (class red)"]


def test_the_static_gallery_marks_the_rows_whose_maps_are_constant_in_its_table(setup, tmp_path, capsys):
    """The ``METHOD.constant`` column (per target, the map's one value, else null) was said only as notes
    (above the table, under the thumbnails): nothing in the table to sort or filter the rows by. Now the page's
    own ``constant`` column says which of the row's maps are constant (``METHOD``: the thumbnail's target,
    ``METHOD (class NAME)``: a later one), null on a row whose maps all vary; a run with no constant map has no
    such column."""
    _blind_run(setup, tmp_path, capsys)  # second_blind, --top 2: each image's second target (class 1) zero
    cols, rows, _ = _page_data(tmp_path / "run")
    assert [r[cols.index("constant")] for r in rows] == ["vanilla (class 1)"] * 2
    assert cols.index("error") < cols.index("constant") < cols.index("vanilla.min")
    paths, nets = setup
    rc, _, err = _run(["explain", paths[1], "--size", "32", "--dataset", "--workers", "0", "--no-progress",
                       "-m", f"python:{nets}:seeing", "-o", tmp_path / "sees"], capsys)
    assert rc == 0, err
    cols, rows, _ = _page_data(tmp_path / "sees")
    assert "constant" not in cols and len(rows) == 1


def _stored_picture_constant(m: np.ndarray, dtype: str):
    """The reference: map ``m`` (float32, ``(H, W)`` or per channel ``(C, H, W)``) cast as the store writes
    it (float16: clipped to +-65504, then rounded), shown as a picture (``max_c |m|``), judged by
    ``viz.constant_value``."""
    s = m.astype(np.float32)
    if dtype == "float16":
        s = np.clip(s, -65504.0, 65504.0).astype(np.float16)
    return viz.constant_value(np.abs(s).max(0) if s.ndim == 3 else s)


def test_stored_constants_is_the_constant_of_the_cast_map():
    """The float16 loss of a run's maps is judged from each picture's float32 extremes, without a second
    cast of the maps (``store.stored_constants``): on maps made to sit on float16's edges (below its
    smallest value, between two of its values, around its rounding ties and its largest value, signed
    zeros, inf, NaN, per channel) it says what casting the whole map and judging its picture says."""
    from salience.runs.store import stored_constants

    f16 = np.float16
    tie = float(f16(1000)) + 0.25  # halfway between 1000 and 1000.5: rounds to the even one, 1000
    maps = [
        np.full((4, 4), 3.0), np.full((4, 4), 1e-9), np.linspace(-2e-8, 2e-8, 16).reshape(4, 4),
        np.linspace(1e-9, 6e-8, 16).reshape(4, 4), 1000 + 1e-4 * np.arange(16.0).reshape(4, 4),
        np.array([[1000.0, tie], [1000.0, 1000.0]]), np.array([[1000.0, np.nextafter(tie, 2e3, dtype=np.float32)],
                                                               [1000.0, 1000.0]]),
        np.array([[-0.0, 0.0], [1e-9, -1e-9]]), np.array([[7e4, np.inf], [65504.0, 65520.0]]),
        np.array([[-np.inf, 7e4], [1.0, 2.0]]), np.array([[np.nan, 1e-9], [1e-9, 1e-9]]),
        np.array([[65519.0, 65520.0], [1e5, 65504.0]]), np.array([[1.0, 1.0 + 2 ** -12], [1.0, 1.0]]),
        np.array([[1.0, 1.0 + 2 ** -10], [1.0, 1.0]]),
        np.stack([np.full((3, 3), 1e-9), -np.full((3, 3), 2e-9), np.linspace(0, 1e-8, 9).reshape(3, 3)]),
        np.stack([np.full((3, 3), 1.0), -np.full((3, 3), 2.0), np.linspace(-2.0005, 2.0005, 9).reshape(3, 3)]),
        np.stack([np.full((2, 2), 1.0), np.array([[np.nan, 0.0], [0.0, 0.0]])]),
    ]
    rng = np.random.default_rng(0)
    for scale in (1e-9, 1e-7, 1.0, 1e3, 6e4):  # random maps a few float16 steps wide at several scales
        for _ in range(40):
            base = scale * rng.uniform(-2, 2)
            maps.append(base + scale * 2e-3 * rng.integers(-1, 2, (3, 3)) * rng.uniform(0, 1, (3, 3)))
    for dtype in ("float16", "float32"):
        for m in maps:
            m = m.astype(np.float32)
            pic = np.abs(m).max(0) if m.ndim == 3 else m
            got = stored_constants(np.array([pic.min()]), np.array([pic.max()]), dtype)
            want = _stored_picture_constant(m, dtype)
            assert got == [want], (dtype, m, got, want)
            assert want is None or str(want) != "-0.0"
    assert stored_constants(np.array([1e-9, 1.0]), np.array([2e-9, 1.0 + 2 ** -12]), "float16") == [0.0, 1.0]


@pytest.mark.parametrize("resize,mode", [(256, "bilinear"), (None, "bicubic"), ("any size", "bilinear")])
def test_a_flat_image_resized_for_the_model_stays_flat_and_its_baselines_are_zero(tmp_path, resize, mode):
    """salience evaluate resizes every image for a model with an input size (a torchvision model:
    shorter side 256, centre crop 224), and for a model of any size a file of another size to the
    first's. A flat colour resized is that colour (the interpolation of a constant is the constant),
    but the weights' sums left rounding noise (spread 2e-7): the image was no longer flat, its spectral
    residual was that noise scaled to [0, 1] (maximum 1.0) and its Sobel edges 3e-6, so evaluate's
    check of a constant baseline named nothing for any such model. Each channel one value: exactly
    that value after the resize, and both baselines exactly 0; the noise image as torchvision resizes it."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from salience._core.info import ModelInfo
    from salience.evidence import evaluate as E
    from salience.evidence.baselines import sobel_edges, spectral_residual
    from salience.loading.images import normalize_input

    stats = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    anysize = resize == "any size"
    info = ModelInfo(**stats) if anysize else ModelInfo(input_size=(224, 224), resize=resize, interpolation=mode, **stats)
    size = (300, 400) if anysize else (224, 224)
    colour = (128, 200, 77)
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "n.png")
    for i, (h, w) in enumerate(((375, 500), (480, 640))):
        Image.fromarray(np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()).save(tmp_path / f"g{i}.png")
    raw = E._pictures([tmp_path / "n.png", tmp_path / "g0.png", tmp_path / "g1.png"], info)
    want = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
    for i in (1, 2):
        assert torch.equal(raw[i], want.expand(3, *size)), (i, float(raw[i].amax() - raw[i].amin()))
    x = normalize_input(raw, info)
    assert torch.equal(sobel_edges(x)[1:], torch.zeros(2, *size))
    sr = spectral_residual(x)
    assert torch.equal(sr[1:], torch.zeros(2, *size)) and float(sr[0].max()) == 1.0
    pic = torch.from_numpy(noise).permute(2, 0, 1).float() / 255
    how = dict(interpolation=InterpolationMode(mode), antialias=True)
    ref = (pic if anysize else TF.center_crop(TF.resize(pic, 256, **how), [224, 224]) if resize
           else TF.resize(pic, [224, 224], **how))
    torch.testing.assert_close(raw[0], ref.clamp(0, 1), rtol=0, atol=1e-5)
