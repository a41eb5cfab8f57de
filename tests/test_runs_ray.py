"""The Ray engine on a local cluster of 2 CPUs (started here, shut down after): the same store as
the local engine, and resumable the same way."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import salience
from salience import SalienceError, open_run
from s3_server import s3  # noqa: F401 - a fixture: the S3 server, started before the cluster (its workers see it)

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")

N, SHARD, BATCH = 20, 8, 4
METHODS = ["vanilla", "gradcam"]
RAY_ONLY = {"local": {}, "ray": {"actors": 1}}
"""Ray's options of the tests comparing the two engines, by engine: the local engine refuses them."""
RAY_FLAGS = {"local": [], "ray": ["--actors", "1"]}


@pytest.fixture(scope="module")
def cluster(s3):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("ray")
    imgs, _, _ = salience.data.shapes(N, seed=3)
    (root / "imgs").mkdir()
    for i in range(N):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            root / "imgs" / f"{i:03d}.png")
    (root / "imgs" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _run(root: Path, out: "str | Path", engine: str):
    return salience.explain_dataset("demo:shapes", root / "imgs", METHODS, root / out, top=2, shard_size=SHARD,
                                    batch_size=BATCH, workers=0, engine=engine)


def test_ray_equals_local_and_resumes(cluster, images):
    local = _run(images, "local", "local")
    on_ray = _run(images, "ray", "ray")
    assert ray.is_initialized()  # the caller's cluster is left running
    cols = [c for c in local.table.column_names if c != "shard"]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    assert on_ray.table.column("error").to_pylist()[N] is not None
    for i in range(N):
        for m in METHODS:
            for k in range(2):
                np.testing.assert_array_equal(on_ray.map(i, m, k), local.map(i, m, k))
    # a run stopped before its last shards: the same command on Ray computes only those
    folder = images / "ray"
    kept = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").iterdir()}
    (folder / "shards" / "000000008.parquet").unlink()
    (folder / "index.parquet").unlink()
    again = _run(images, "ray", "ray")
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "shards").iterdir()}
    assert set(after) == set(kept)
    assert [n for n in after if after[n] != kept[n]] == ["000000008.parquet"]
    assert again.table.select(cols).equals(local.table.select(cols))
    np.testing.assert_array_equal(open_run(folder).map(9, "gradcam", 1), local.map(9, "gradcam", 1))


def test_ray_reads_object_storage(cluster, s3, tmp_path):
    """The Ray engine on an s3:// prefix (decoded in Ray tasks): the local engine's store of the
    local copies."""
    if s3 is None:
        pytest.skip("moto[server] (the test extra) is not installed")
    kw = dict(shard_size=4, batch_size=4, workers=0)
    on_ray = salience.explain_dataset("demo:shapes", s3["url"], ["gradcam"], tmp_path / "ray", engine="ray", **kw)
    local = salience.explain_dataset("demo:shapes", s3["local"], ["gradcam"], tmp_path / "local", **kw)
    cols = [c for c in local.table.column_names if c not in ("shard", "path")]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    for i in range(len(local)):
        np.testing.assert_array_equal(on_ray.map(i, "gradcam"), local.map(i, "gradcam"))


# --------------------------------------------------------------------------------- one writer

HOLD = """
import sys, time
from pathlib import Path
from salience.runs.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _lockable(folder: Path) -> bool:
    """Whether another process may lock the whole lock file now (nobody holds any part of it)."""
    from salience.runs.lock import LOCK_NAME

    code = "import fcntl, os, sys; fcntl.lockf(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", code, str(folder / LOCK_NAME)]).returncode == 0


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_ray_run_is_refused_while_another_holds_the_folder_and_resumes_after_it_died(cluster, images, tmp_path):
    """A Ray run on a folder another live process has locked stops at once (SalienceError naming the
    holder's pid and host) and touches nothing; once the holder is killed (kill -9: its lock file
    stays, naming it) the same Ray command resumes the stopped run, computes only the missing shard
    and leaves the folder unlocked."""
    from salience.runs.lock import LOCK_NAME, run_lock

    folder = tmp_path / "run"
    local = _run(images, folder, "local")
    (folder / "shards" / "000000008.parquet").unlink()
    (folder / "index.parquet").unlink()
    kept = _tree(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder_pid = holder.pid
        with pytest.raises(SalienceError, match=rf"being written by another salience process \(pid {holder_pid} "
                                                rf"on host {re.escape(socket.gethostname())}\)"):
            _run(images, folder, "ray")
        assert _tree(folder) == {**kept, LOCK_NAME: _tree(folder)[LOCK_NAME]}
    finally:
        holder.kill()
        holder.wait()
    assert f"pid={holder_pid} " in (folder / LOCK_NAME).read_text()  # stale: the holder is dead
    again = _run(images, folder, "ray")
    changed = {k for k, v in _tree(folder).items() if k.split("/")[0] in ("maps", "shards", "thumbs") and kept.get(k) != v}
    assert changed == {"maps/vanilla/000000008.npy", "maps/gradcam/000000008.npy", "thumbs/000000008.jpg",
                       "shards/000000008.parquet"}, changed
    cols = [c for c in local.table.column_names if c != "shard"]
    assert again.table.select(cols).equals(local.table.select(cols))
    for i in (8, 15):
        for m in METHODS:
            np.testing.assert_array_equal(again.map(i, m, 1), local.map(i, m, 1))
    assert _lockable(folder)  # the Ray run let go of the folder
    with run_lock(folder):  # and so did this process
        pass


def test_a_ray_resume_keeps_a_shard_that_holds_only_some_of_its_images(cluster, images, tmp_path):
    """A committed shard whose rows file lacks its first two images (edited by hand, or written by
    another program), resumed on Ray: no committed file is written again (maps, thumbnails, rows),
    the two missing images go into a shard of their own (``000000000-1``, as the local engine
    names it), and the run is complete with every row, map and thumbnail the uninterrupted run's."""
    import pyarrow.parquet as pq

    from salience.explore.runs import RunSource

    folder = tmp_path / "run"
    whole = _run(images, folder, "local")
    cols = [c for c in whole.table.column_names if c != "shard"]
    reference, source = whole.table.select(cols), RunSource(whole)
    maps = {(i, m): whole.map(i, m, 1) for i in range(N) for m in METHODS}
    thumbs = {(i, t): source.thumbnail(i, tile=t) for i in range(N) for t in (0, 1, 2)}
    shard = folder / "shards" / f"{0:09d}.parquet"
    pq.write_table(pq.read_table(shard).slice(2), shard)  # images 0 and 1 gone; 2-7 keep offsets 2-7
    (folder / "index.parquet").unlink()
    kept = _committed(folder)
    again = _run(images, folder, "ray")
    after = _committed(folder)
    assert all(after[k] == v for k, v in kept.items()), "a committed file was written again"
    added = set(after) - set(kept)
    assert added == {"shards/000000000-1.parquet", "maps/vanilla/000000000-1.npy", "maps/gradcam/000000000-1.npy",
                     "thumbs/000000000-1.jpg"}, added
    assert len(again) == N + 1 and again.complete and again.table.select(cols).equals(reference)
    assert [again.row(i)["shard"] for i in (0, 1, 2)] == ["000000000-1", "000000000-1", "000000000"]
    source = RunSource(again)
    for i in range(N):
        for m in METHODS:
            np.testing.assert_array_equal(again.map(i, m, 1), maps[i, m])
        for t in (0, 1, 2):
            if i > 1:  # the kept shards' own sprites
                assert source.thumbnail(i, tile=t) == thumbs[i, t]
            else:  # a new sprite: the same tiles, JPEG-encoded again
                assert np.abs(_pixels(source.thumbnail(i, tile=t)) - _pixels(thumbs[i, t])).mean() < 2.0, (i, t)


def _committed(folder: Path) -> dict[str, tuple[int, int]]:
    """Every committed file of a run (rows, maps, thumbnails) with its inode and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for sub in ("shards", "maps", "thumbs") for p in (folder / sub).rglob("*") if p.is_file()
            and not p.name.startswith(".")}


def _pixels(jpeg: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


def test_a_failed_ray_run_lets_go_of_the_folder_and_its_actors_write_no_more(cluster, images, tmp_path):
    """A Ray run whose actor raises lets go of the folder when the exception reaches the caller, and
    from then on nothing of it writes there: an actor still explaining another batch at that moment
    does not commit its shard afterwards (it did, seconds after the caller had the error and the
    folder was free for another run, e.g. an --overwrite that had cleared it)."""
    import time

    flags = tmp_path / "flags"
    flags.mkdir()

    def boom(model, x, target):
        """The first call (in one actor) waits until told; a call in another actor then raises."""
        try:
            fd = os.open(flags / "waiter", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            while not (waiter := (flags / "waiter").read_text()):  # its pid is written next
                time.sleep(0.01)
            if waiter != str(os.getpid()):
                raise RuntimeError("boom") from None
            return salience.vanilla(model, x, target)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        for _ in range(2400):
            try:
                if (flags / "go").exists():
                    break
                time.sleep(0.05)
            except KeyboardInterrupt:  # Ray's cancel of a failed run's task in flight (a CPU run's tasks), let
                (flags / "cancelled").touch()  # pass here: the batch goes on to its commit, which must be refused
        out = salience.vanilla(model, x, target)
        (flags / "returned").touch()
        return out

    folder = tmp_path / "run"
    files = [images / "imgs" / f"{i:03d}.png" for i in range(16)]
    with pytest.raises(RuntimeError, match="^boom$") as raised:  # the model's own error, as the local engine's
        salience.explain_dataset("demo:shapes", files, {"boom": boom}, folder, shard_size=2, batch_size=2,
                                 workers=0, engine="ray", actors=2)
    assert type(raised.value) is RuntimeError  # not Ray's RayTaskError, its message the actor's traceback
    assert "raise RuntimeError(\"boom\")" in str(raised.value.__cause__)  # the actor's traceback, kept
    assert not (flags / "returned").exists()  # the waiting batch is in flight
    assert _lockable(folder)
    (flags / "go").touch()
    for _ in range(1200):
        if (flags / "returned").exists():
            break
        time.sleep(0.05)
    assert (flags / "returned").exists()
    time.sleep(2)  # the actor's commit, had it been allowed
    assert not [k for k in _tree(folder) if k.split("/")[0] in ("maps", "shards", "thumbs")]


def test_fast_modes_reach_the_ray_actors(cluster, tmp_path):
    """fold_batchnorm and channels-last on Ray: the actors run them (SmoothGrad's maps differ from the
    default run's by rounding, not bit for bit) and every map is within the documented tolerance
    of the local default run's."""
    from test_runs import FAST_KW, FAST_METHODS, assert_fast_maps, bn_net, write_noise

    model = bn_net()
    files = write_noise(tmp_path / "imgs", 4)
    ref = salience.explain_dataset(model, files, FAST_METHODS, tmp_path / "ref", **FAST_KW)
    on_ray = salience.explain_dataset(model, files, FAST_METHODS, tmp_path / "ray", engine="ray",
                                      fold_batchnorm=True, memory_format="channels_last", **FAST_KW)
    assert_fast_maps(on_ray, ref, 4)
    assert not np.array_equal(on_ray.map(3, "smoothgrad"), ref.map(3, "smoothgrad"))


def test_an_item_of_another_shape_on_ray_is_the_local_engines_one_line_error_and_the_run_resumes(cluster, tmp_path):
    """A user's dataset with an item of another shape, on Ray: the local engine's SalienceError and
    one-line message (it was numpy's raw "all input arrays must have the same shape" in a RayTaskError
    whose message is the task's traceback: the shape check never ran); one raising a KeyError: that
    KeyError; the shards before it stay, the folder is let go, and the run resumes to the maps of the
    local engine. Items ``(input, label)``: each label read with its image in the decoding task (not in
    a pass of the driver's), the rows the local engine's."""
    import torch

    class Items(torch.utils.data.Dataset):  # defined here: Ray's workers get it by value
        def __init__(self, bad=None, labelled=False, log=None):
            self.bad, self.labelled, self.log = bad, labelled, log

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i):
            if i == 5 and isinstance(self.bad, Exception):
                raise self.bad  # a user's transform failing (a missing key)
            if i == 5 and self.bad is not None:
                return self.bad
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(f"{os.getpid()} {i}\n")
            x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i))
            return (x, (i * 2) % 3) if self.labelled else x

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    kw = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32")
    errors = {}
    for engine in ("local", "ray"):
        with pytest.raises(SalienceError) as caught:
            salience.explain_dataset(model, Items(torch.zeros(3, 20, 20)), ["vanilla"], tmp_path / engine,
                                     engine=engine, **kw, **RAY_ONLY[engine])
        errors[engine] = caught.value
    assert type(errors["ray"]) is SalienceError and str(errors["ray"]) == str(errors["local"])
    assert str(errors["ray"]).startswith("image Items[5] has shape (3, 20, 20) but image Items[0] had (3, 16, 16)")
    assert "\n" not in str(errors["ray"]) and "Ray task" in str(errors["ray"].__cause__)
    folder = tmp_path / "ray"
    assert _lockable(folder)
    assert {"shards/000000000.parquet", "shards/000000002.parquet"} <= set(_committed(folder))
    assert "shards/000000004.parquet" not in _committed(folder)
    # the user's dataset raising a KeyError: that KeyError (it was a RayTaskError(KeyError) whose message was
    # the task's traceback), a note naming the image, the task's traceback its cause; the shards stay
    with pytest.raises(KeyError) as caught:
        salience.explain_dataset(model, Items(KeyError("label")), ["vanilla"], folder, engine="ray", actors=1, **kw)
    assert type(caught.value) is KeyError and caught.value.args == ("label",)
    assert caught.value.__notes__ == ["raised reading image 5 (Items[5]) in a Ray task decoding images; its "
                                      "traceback there is the cause"]
    assert "raise self.bad" in str(caught.value.__cause__)
    assert {"shards/000000000.parquet", "shards/000000002.parquet"} <= set(_committed(folder))
    assert _lockable(folder)
    resumed = salience.explain_dataset(model, Items(), ["vanilla"], folder, engine="ray", actors=1, **kw)
    local = salience.explain_dataset(model, Items(), ["vanilla"], tmp_path / "local", **kw)
    assert len(resumed) == 8 and resumed.complete
    for i in range(8):
        np.testing.assert_allclose(resumed.map(i, "vanilla"), local.map(i, "vanilla"), rtol=1e-5, atol=1e-7)
    log = tmp_path / "reads.log"
    on_ray = salience.explain_dataset(model, Items(labelled=True, log=str(log)), ["vanilla"], tmp_path / "labelled-ray",
                                      engine="ray", actors=1, **kw)
    reads = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(i) for pid, i in reads if int(pid) == os.getpid()) == [0]  # the driver: the first only
    assert sorted(int(i) for pid, i in reads if int(pid) != os.getpid()) == list(range(8))  # the decoding tasks
    local = salience.explain_dataset(model, Items(labelled=True), ["vanilla"], tmp_path / "labelled-local", **kw)
    assert on_ray.table.column("label").to_pylist() == [(i * 2) % 3 for i in range(8)]
    assert on_ray.table.column("targets").to_pylist() == [[(i * 2) % 3] for i in range(8)]
    cols = [c for c in local.table.column_names if c != "shard"]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    for i in range(8):
        np.testing.assert_allclose(on_ray.map(i, "vanilla"), local.map(i, "vanilla"), rtol=1e-5, atol=1e-7)



# --------------------------------------------------------------------------------- python:FILE.py models

BLOCKS = """
from torch import nn


class Block(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
"""

NETS = """
from torch import nn

from blocks import Block  # a sibling file, as a script imports it


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = Block()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return Net()  # initialised at random: --weights gives the weights


def build_fussy():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))  # takes 8 x 8 images only
"""


def _nets(tmp_path: Path) -> tuple[str, Path]:
    """``nets.py`` (importing ``blocks.py`` beside it) in a folder of its own, and a state dict for it."""
    import torch

    from salience.loading.custom import load_python

    code = tmp_path / "code"
    code.mkdir()
    (code / "blocks.py").write_text(BLOCKS)
    (code / "nets.py").write_text(NETS)
    torch.manual_seed(0)
    weights = tmp_path / "nets.pt"
    torch.save(load_python(f"{code / 'nets.py'}:build").state_dict(), weights)
    return str(code / "nets.py"), weights


def test_a_python_file_model_runs_on_ray_with_its_weights_as_locally(cluster, tmp_path, capsys):
    """``python:FILE.py:build`` (its file importing a sibling, its weights a state dict) on Ray: given
    as the spec or as the module load_model made, and through ``salience explain --engine ray``, the
    maps are the local engine's and ``salience.vanilla``'s on the model (the actors failed at
    creation with ``ModuleNotFoundError: salience_user_nets_...``: the module salience named when it
    ran the file, which no Ray worker has)."""
    import torch
    from PIL import Image

    from salience.cli import main

    nets, weights = _nets(tmp_path)
    spec = f"python:{nets}:build"
    model = salience.load_model(spec, weights=weights)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    want = salience.vanilla(model, x, y).numpy()
    kw = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32", actors=1)
    data = torch.utils.data.TensorDataset(x, y)
    for name, given in (("spec", spec), ("module", model)):
        run = salience.explain_dataset(given, data, ["vanilla"], tmp_path / name, engine="ray",
                                       weights=str(weights) if name == "spec" else None, **kw)
        np.testing.assert_allclose(np.stack([run.map(i, "vanilla") for i in range(4)]), want, rtol=2 ** -10,
                                   atol=6e-8, err_msg=name)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(imgs / f"{i}.png")
    runs = {}
    for engine in ("local", "ray"):
        args = ["explain", str(imgs), "-m", spec, "--weights", str(weights), "--size", "16,16", "--engine", engine,
                "--out", str(tmp_path / f"cli-{engine}"), "--shard-size", "2", "--batch", "2", "--workers", "0",
                "--map-dtype", "float32", *RAY_FLAGS[engine]]
        assert main(args) == 0, capsys.readouterr().err
        runs[engine] = open_run(tmp_path / f"cli-{engine}")
    for i in range(4):
        np.testing.assert_array_equal(runs["ray"].map(i, "vanilla"), runs["local"].map(i, "vanilla"))
    cols = [c for c in runs["local"].table.column_names if c != "shard"]
    assert runs["ray"].table.select(cols).equals(runs["local"].table.select(cols))


def test_a_model_refusing_its_input_on_ray_is_one_error_line_exit_2(cluster, tmp_path, capsys):
    """A model that cannot take the images (a Linear for 8 x 8 images given 16 x 16 ones; with class
    names and a batch size, so that the driver does not run it), on Ray through the command line:
    one ``salience: error:`` line (Ray's own log lines aside), the local engine's, exit 2 (it was
    ``unexpected ActorDiedError``, exit 3: the actors could not unpickle the model, see above)."""
    from PIL import Image

    from salience.cli import main

    nets, _ = _nets(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(imgs / f"{i}.png")
    said = {}
    for engine in ("local", "ray"):
        rc = main(["explain", str(imgs), "-m", f"python:{nets}:build_fussy", "--size", "16,16", "--labels",
                   str(tmp_path / "classes.txt"), "--engine", engine, "--out", str(tmp_path / engine), "--workers",
                   "0", *RAY_FLAGS[engine], "--batch", "2"])
        err = capsys.readouterr().err
        said[engine] = [line for line in err.splitlines() if line.startswith("salience")]
        assert rc == 2, (engine, rc, err[-3000:])  # the end of stderr: what a failure under load needs said
    assert said["ray"] == said["local"] and len(said["ray"]) == 1, said
    # a batch of 2: the actor's pass (the driver runs no image through this model)
    assert said["ray"][0].startswith("salience: error: the model cannot take the input of shape (2, 3, 16, 16)")


# --------------------------------------------------------------------------------- random weights, Ray's arguments

def test_random_library_weights_on_ray_are_the_drivers_model(cluster, tmp_path, monkeypatch):
    """``torchvision:resnet18`` with ``weights="random"`` on Ray: the maps are the driver's model's
    (``salience.vanilla`` on the module load_model gives in this process). Each actor loaded the spec
    again and drew its own weights: seeded, the same only where the worker's torch draws as the
    driver's (measured: under ``ATEN_CPU_CAPABILITY=default``, as on a node without AVX2, 37% of
    resnet18's weights differ in their last bit; another torch or torchvision version may initialise
    otherwise). The driver's seed, changed here, stands for such a worker."""
    import torch

    from salience.loading import models

    monkeypatch.setattr(models, "RANDOM_WEIGHTS_SEED", 1)  # the driver's draw; a worker's module keeps 0
    model = salience.load_model("torchvision:resnet18", weights="random")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 7, 11, 5])
    want = salience.vanilla(model, x, y).numpy()
    run = salience.explain_dataset("torchvision:resnet18", torch.utils.data.TensorDataset(x, y), ["vanilla"],
                                   tmp_path / "run", engine="ray", weights="random", actors=1, shard_size=2,
                                   batch_size=2, workers=0, map_dtype="float32")
    got = np.stack([run.map(i, "vanilla") for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=2 ** -10, atol=1e-7)


def test_the_actor_pool_is_given_as_the_installed_ray_wants_it(cluster, tmp_path, monkeypatch):
    """Ray 2.51+ logs "The argument ``concurrency`` is deprecated" at every ``map_batches(...,
    concurrency=N)`` (Ray 2.9 to 2.50 log the same of ``compute=``): the actors' map_batches is given
    ``compute=ActorPoolStrategy(size=N)`` from 2.51, ``concurrency=N`` before, and the run's log
    has no such warning."""
    import logging

    import torch

    from salience.runs import ray_engine

    calls = []
    original = ray.data.Dataset.map_batches

    def spy(self, fn, *args, **kwargs):
        calls.append((fn, kwargs))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    said = []

    class Catch(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger("ray.data").addHandler(handler)
    try:
        x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        salience.explain_dataset(model, torch.utils.data.TensorDataset(x, torch.tensor([0, 1])), ["vanilla"],
                                 tmp_path / "run", engine="ray", actors=1, shard_size=2, batch_size=2, workers=0)
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    (kwargs,) = [kw for fn, kw in calls if fn is ray_engine.explain]  # a CPU run: tasks (GPU runs: actors)
    gpu = ray_engine._pool(ray, 3)  # what a GPU run's Explain actors are given
    if tuple(int(p) for p in ray.__version__.split(".")[:2]) >= (2, 51):
        assert "concurrency" not in kwargs and list(gpu) == ["compute"]
        assert type(kwargs["compute"]) is ray.data.TaskPoolStrategy and kwargs["compute"].size == 1
        assert isinstance(gpu["compute"], ray.data.ActorPoolStrategy)
        assert gpu["compute"].min_size == gpu["compute"].max_size == 3
    else:
        assert kwargs["concurrency"] == 1 and "compute" not in kwargs and gpu == {"concurrency": 3}
    assert not [m for m in said if "deprecated" in m], said


def _eight(tmp_path: Path) -> tuple:
    """The Ray label-resume tests' setup: a small CNN seeded with 0, the run's keywords (shards and
    batches of 2, float32 maps), the labels their 8 items carry (``(i * 2) % 3``) and the run's
    folder ``tmp_path / "run"``: ``(model, kw, labels, folder)``."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    kw = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32")
    return model, kw, [(i * 2) % 3 for i in range(8)], tmp_path / "run"


def test_a_ray_resume_checks_the_begun_labels_in_its_decoding_tasks_without_shipping_them_all(cluster, tmp_path,
                                                                                            monkeypatch):
    """A run of a Dataset of ``(input, label)`` begun with ``labels=`` (given up front), cut short and
    continued on Ray without them: each decoding task gets the begun labels of its own images only (a
    column of the rows), and no task or actor gets the run's list of every image's label (before, the
    plan sent to every decoding task and actor held all N). An item whose label differs stops the run
    with the local engine's message; the agreeing items resume to the uninterrupted run's rows."""
    import torch

    class Items(torch.utils.data.Dataset):  # defined here: Ray's workers get it by value
        def __init__(self, bad=None):
            self.bad = dict(bad or {})

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i):
            x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i))
            return x, self.bad.get(i, (i * 2) % 3)

    model, kw, labels, folder = _eight(tmp_path)
    first = salience.explain_dataset(model, Items(), ["vanilla"], folder, labels=labels, **kw).table
    shipped = []
    map_batches = ray.data.Dataset.map_batches

    def spy(self, fn, *args, **kwargs):
        shipped.extend(v for v in _given(kwargs) if isinstance(v, salience.runs.job.Plan))
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    for name in ("000000004", "000000006"):
        (folder / "shards" / f"{name}.parquet").unlink()
    (folder / "index.parquet").unlink()
    with pytest.raises(SalienceError, match=r"^" + re.escape(
            f"{folder} holds a run of a different command (labels: image 6 (Items[6]): label 0 -> 1, the label its "
            "item carries; the run was begun with its labels given up front)")):
        salience.explain_dataset(model, Items(bad={6: 1}), ["vanilla"], folder, engine="ray", actors=1, **kw)
    assert len(shipped) == 2 and all(plan.begun_labels is None for plan in shipped)
    assert "shards/000000006.parquet" not in _committed(folder)
    resumed = salience.explain_dataset(model, Items(), ["vanilla"], folder, engine="ray", actors=1, **kw)
    cols = [c for c in first.column_names if c != "shard"]
    assert resumed.complete and resumed.table.select(cols).equals(first.select(cols))


def _given(kwargs: dict) -> list:
    """What the tasks or actors of a ``map_batches(**kwargs)`` call get: its ``fn_kwargs``' values and its
    ``fn_constructor_args``, a reference (``ray.put``) read: the CPU run's explaining tasks get one to the
    arguments of the :class:`ray_engine.Explain` each worker process makes (its elements listed)."""
    out = []
    for v in [*(kwargs.get("fn_kwargs") or {}).values(), *(kwargs.get("fn_constructor_args") or ())]:
        got = ray.get(v) if isinstance(v, ray.ObjectRef) else v
        out.extend(got if isinstance(v, ray.ObjectRef) and isinstance(got, tuple) else [got])
    return out


class _Stop(Exception):
    """Raised by a spy of ``map_batches`` once it has what a run sends its tasks and actors."""


def _sent(monkeypatch, stop: bool = False) -> dict:
    """Spy on ``ray.data.Dataset.map_batches``: the bytes each decoding task (``fn_kwargs``) and each
    actor (``fn_constructor_args``) of the next run is sent, as Ray's cloudpickle writes them; ``stop``:
    stop the run there (:class:`_Stop`), before any image is decoded."""
    sizes: dict = {}
    map_batches = getattr(ray.data.Dataset.map_batches, "unspied", ray.data.Dataset.map_batches)  # not an earlier spy

    def spy(self, fn, *args, **kwargs):
        from salience.runs import ray_engine

        if fn is ray_engine.decode:
            sizes["task"] = len(ray.cloudpickle.dumps(kwargs["fn_kwargs"]))
        else:  # the explaining tasks (CPU; what each is sent: a reference to what each process reads once) or actors
            sizes["actor"] = len(ray.cloudpickle.dumps(tuple(_given(kwargs))))
            sizes["sent"] = len(ray.cloudpickle.dumps((kwargs.get("fn_kwargs"), kwargs.get("fn_constructor_args"))))
            if stop:
                raise _Stop
        return map_batches(self, fn, *args, **kwargs)

    spy.unspied = map_batches
    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    return sizes


def test_what_each_ray_task_and_actor_is_sent_does_not_grow_with_the_runs_images(cluster, images, tmp_path,
                                                                                monkeypatch):
    """Each decoding task and each actor was sent the run's whole per-image lists: the plan's paths
    (and labels given up front), the image decoder's paths and masks, a user's dataset (before: 2,000
    more paths made each task's payload 3.9 kB -> 342 kB and each actor's 2.8 kB -> 173 kB; with 10,000
    paths, 782 kB a task and 402 kB an actor). Now each row of the Ray dataset carries its own image's path, file, mask and label, and
    a user's dataset goes once into the object store (a reference sent, fetched once per worker
    process): what each is sent is the same for 21 images and for 2,021. The run itself is
    unchanged: its rows and maps are the local engine's (labels given up front, masks, pointing game)."""
    import torch
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for stem in ("000", "003", "011"):
        Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).save(masks / f"{stem}.png")
    files = sorted(str(p) for p in (images / "imgs").iterdir())  # 20 images and a broken one
    kw = dict(shard_size=SHARD, batch_size=BATCH, workers=0, masks=masks, metrics=["pointing"])
    labels = [i % 2 for i in range(len(files))]
    local = salience.explain_dataset("demo:shapes", files, METHODS, tmp_path / "loc", labels=labels, **kw)
    small = _sent(monkeypatch)
    on_ray = salience.explain_dataset("demo:shapes", files, METHODS, tmp_path / "ray", labels=labels, engine="ray",
                                      **kw)
    cols = [c for c in local.table.column_names if c != "shard"]
    assert on_ray.table.select(cols).equals(local.table.select(cols))
    assert on_ray.table.column("label").to_pylist() == labels
    assert on_ray.table.column("vanilla.pointing").null_count == len(files) - 3  # the 3 masked images are scored
    for i in range(len(files) - 1):
        for m in METHODS:
            np.testing.assert_array_equal(on_ray.map(i, m), local.map(i, m))
    more = files + [str(tmp_path / f"missing_{i:05d}.png") for i in range(2000)]
    big = _sent(monkeypatch, stop=True)
    with pytest.raises(_Stop):
        salience.explain_dataset("demo:shapes", more, METHODS, tmp_path / "big", labels=[i % 2 for i in
                                 range(len(more))], engine="ray", **kw)
    assert abs(big["task"] - small["task"]) <= 16 and abs(big["actor"] - small["actor"]) <= 16, (small, big)
    # the actors' arguments (the plan, the writer) go by reference: what each task is sent is less than they are
    assert small["sent"] < small["actor"] and abs(big["sent"] - small["sent"]) <= 16, (small, big)

    class Named(torch.utils.data.Dataset):  # a user's dataset holding a name per item; Ray's workers get it by value
        def __init__(self, n):
            self.names = [f"/data/some/folder/image_{i:06d}.png" for i in range(n)]

        def __len__(self):
            return len(self.names)

        def __getitem__(self, i):
            return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), i % 3

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    sent = []
    for n, out in ((20, "u20"), (2000, "u2k")):
        sent.append(_sent(monkeypatch, stop=True))
        with pytest.raises(_Stop):
            salience.explain_dataset(model, Named(n), ["vanilla"], tmp_path / out, shard_size=SHARD, batch_size=BATCH,
                                     workers=0, engine="ray", actors=1)
    assert abs(sent[1]["task"] - sent[0]["task"]) <= 16 and abs(sent[1]["actor"] - sent[0]["actor"]) <= 16, sent


def test_a_ray_run_begun_reading_labels_with_each_item_continues_with_labels_that_agree(cluster, tmp_path):
    """A run of a Dataset of ``(input, label)`` begun reading each label with its item, continued on Ray
    with ``labels=``: the labels its items carry continue it to the uninterrupted rows; a given label
    that an item still to explain does not carry stops the run in its decoding task with the local
    engine's message (before: refused whatever the labels)."""
    import torch

    class Items(torch.utils.data.Dataset):  # defined here: Ray's workers get it by value
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i):
            return torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), (i * 2) % 3

    model, kw, items, folder = _eight(tmp_path)
    first = salience.explain_dataset(model, Items(), ["vanilla"], folder, **kw).table
    for name in ("000000004", "000000006"):
        (folder / "shards" / f"{name}.parquet").unlink()
    (folder / "index.parquet").unlink()
    other = items[:6] + [2, items[7]]  # image 6 carries 0
    with pytest.raises(SalienceError, match=r"^" + re.escape(
            f"{folder} holds a run of a different command (labels: image 6 (Items[6]): label 0 -> 2, given up front "
            "(labels=); the run was begun reading the labels with each item, and its item carries 0)")):
        salience.explain_dataset(model, Items(), ["vanilla"], folder, labels=other, engine="ray", actors=1, **kw)
    assert "shards/000000006.parquet" not in _committed(folder)
    resumed = salience.explain_dataset(model, Items(), ["vanilla"], folder, labels=items, engine="ray", actors=1, **kw)
    cols = [c for c in first.column_names if c != "shard"]
    assert resumed.complete and resumed.table.select(cols).equals(first.select(cols))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_users_dataset_on_ray_is_let_go_by_each_process_when_its_run_ends(cluster, tmp_path, monkeypatch):
    """A user's dataset on Ray is fetched once per worker process and run (``ray_engine._dataset``), and
    each process that read it lets it go within a second or so of the run's end, done or failed (an
    item raising): the dataset's ``__del__`` runs there (or the process has ended: a failed run's
    actors may be killed). Before, each process kept the last run's
    dataset in a module-level copy until a next run replaced it (so two runs at once from one
    process fetched each other's again and again). The decoding runs in Ray's pooled worker processes,
    as it does beside GPU actors (here, with CPU actors, Ray Data would fuse it into the actors)."""
    import time

    import torch

    class Logged(torch.utils.data.Dataset):  # defined here: Ray's workers get it by value
        def __init__(self, log, bad=False):
            self.log, self.bad = str(log), bad

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i):
            if self.bad and i == 3:
                raise KeyError("label")
            with open(self.log, "a") as f:
                f.write(f"read {os.getpid()}\n")
            return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i))

        def __del__(self):
            with open(self.log, "a") as f:
                f.write(f"del {os.getpid()}\n")

    def pids(log, what):
        return {int(p) for w, p in (ln.split() for ln in log.read_text().splitlines()) if w == what} - {os.getpid()}

    from salience.runs import ray_engine

    map_batches = ray.data.Dataset.map_batches

    def apart(self, fn, *args, **kwargs):  # decoding in tasks of their own (as beside GPU actors), not fused
        if fn is ray_engine.decode:        # into the CPU actors
            kwargs["num_cpus"] = 0.99
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", apart)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    kw = dict(engine="ray", actors=1, shard_size=2, batch_size=2, workers=0)
    for bad in (False, True):
        log = tmp_path / f"reads-{bad}.log"
        if bad:
            with pytest.raises(KeyError):
                salience.explain_dataset(model, Logged(log, bad), ["vanilla"], tmp_path / f"run-{bad}", **kw)
        else:
            assert salience.explain_dataset(model, Logged(log), ["vanilla"], tmp_path / f"run-{bad}", **kw).complete
        readers = pids(log, "read")
        assert readers, "no process of Ray's read the dataset"
        until = time.monotonic() + 10
        while [p for p in readers - pids(log, "del") if _alive(p)] and time.monotonic() < until:
            time.sleep(0.1)
        assert not [p for p in readers - pids(log, "del") if _alive(p)], (bad, log.read_text())


# --------------------------------------------------------------------------------- what the terminal shows

RAY_LINE = re.compile(r"(INFO|WARNING|ERROR|DEBUG)\b|\[\d{4}-\d\d-\d\d .*\] |[A-Za-z_]+\.py:\d+ -- |Running \d+|"
                      r"Dataset |Progress bars|Token authentication|\(MapWorker|\(raylet\)|\(pid=")
"""The marks of Ray's own output: a logging record (level, ``file.py:N --``), a C++ log prefix
(``[2026-12-05 01:22:13,459 E ...]``), Ray Data's progress bars and notes, a worker's forwarded line."""
KNOWN = re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
                   r"and max_restarts > 0\.")
"""The one line of Ray's left (docs/datasets.md): its C++ core worker's note of ray-project/ray#53727 on
Ray Data's actor pool (restarts without limit, its constructor arguments in the object store), which
no Ray setting turns off but ``RAY_BACKEND_LOG_LEVEL``, whose own note is then printed instead."""


def _cli_on_ray(args: list, env: "dict | None" = None) -> subprocess.CompletedProcess:
    """``salience explain ... --engine ray`` in a process of its own, joined to the module's cluster."""
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([sys.executable, "-m", "salience", "explain", *map(str, args), "--engine", "ray",
                           "--address", address, "--workers", "0", "--actors", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_the_command_on_ray_shows_salience_s_lines_only_and_its_errors(cluster, images, tmp_path):
    """``salience explain DIR --engine ray``: stdout holds the command's summary line, stderr nothing of
    Ray's own (it printed Ray Data's "Progress bars disabled" warning and its "execution finished"
    INFO line); a model's error on the actors is still the one ``salience: error:`` line (exit 2).
    ``SALIENCE_RAY_LOGS=1`` lets Ray's lines through."""
    r = _cli_on_ray([images / "imgs", "-m", "demo:shapes", "--batch", "4", "--shard-size", "8",
                     "--out", tmp_path / "run"])
    assert r.returncode == 1, r.stderr  # the broken image: one failed, said in the summary line
    assert r.stdout.splitlines() == [f"explained {N} of {N + 1} image(s) into {tmp_path / 'run'}/ (index.parquet, "
                                     "index.html); 1 image(s) failed: see the 'error' column"], r.stdout
    assert not [ln for ln in r.stderr.splitlines() if RAY_LINE.search(ln) and not KNOWN.search(ln)], r.stderr
    nets, _ = _nets(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    r = _cli_on_ray([images / "imgs", "-m", f"python:{nets}:build_fussy", "--size", "16,16", "--labels",
                     tmp_path / "classes.txt", "--batch", "2", "--out", tmp_path / "fussy"])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if not KNOWN.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("salience: error: the model cannot take the input"), r.stderr
    r = _cli_on_ray([images / "imgs", "-m", "demo:shapes", "--batch", "4", "--shard-size", "8",
                     "--out", tmp_path / "loud"], env={"SALIENCE_RAY_LOGS": "1"})
    assert r.returncode == 1 and any(RAY_LINE.search(ln) for ln in r.stderr.splitlines()), r.stderr


def test_the_ray_engine_puts_back_the_logging_levels_and_data_context_it_changed(cluster, images, tmp_path,
                                                                                  capsys):
    """A run quiets Ray's loggers and Ray Data's progress bars while it goes, and puts every setting
    back after, also after a failed run."""
    import logging

    ctx = ray.data.DataContext.get_current()
    before = (logging.getLogger("ray").level, logging.getLogger("ray.data").level, ctx.enable_progress_bars,
              ctx.execution_options.preserve_order)
    _run(images, "restore", "ray")
    nets, _ = _nets(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    from salience.cli import main

    rc = main(["explain", str(images / "imgs"), "-m", f"python:{nets}:build_fussy", "--size", "16,16", "--labels",
               str(tmp_path / "classes.txt"), "--engine", "ray", "--out", str(tmp_path / "bad"), "--workers", "0",
               "--actors", "1", "--batch", "2"])  # the model's error raised from the actors' pass
    assert rc == 2 and "cannot take the input" in capsys.readouterr().err
    after = (logging.getLogger("ray").level, logging.getLogger("ray.data").level, ctx.enable_progress_bars,
             ctx.execution_options.preserve_order)
    assert after == before


# --------------------------------------------------------------------------------- runs in threads

def test_runs_in_threads_use_the_callers_cluster_leave_it_running_and_another_cluster_is_refused(cluster, tmp_path):
    """Two runs started together (threads, a Barrier) on the caller's cluster: both give the local
    engine's maps and rows, and the caller's cluster runs on after them (the same node), also after
    ``salience.runs.shutdown_ray()``. A run asking
    for another cluster while this process is joined to one (``address=`` of another port) is a
    SalienceError naming the joined one (it ran on the joined cluster, silently); the joined one's
    address written another way (``localhost:PORT``) runs there; ``num_gpus`` above the GPUs of this
    local cluster is a SalienceError (the actors waited for ever). The shared cluster of runs that
    salience starts: tests/test_ray_shared.py."""
    import threading

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    kw = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32")
    local = salience.explain_dataset(model, data, ["vanilla"], tmp_path / "local", **kw)
    node, address = ray.get_runtime_context().get_node_id(), ray.get_runtime_context().gcs_address
    barrier, out = threading.Barrier(2), {}

    def job(name: str, **more) -> None:
        barrier.wait(30)
        try:
            out[name] = salience.explain_dataset(model, data, ["vanilla"], tmp_path / name, engine="ray", actors=1,
                                                 **kw, **more)
        except Exception as e:  # noqa: BLE001 - asserted below
            out[name] = e

    threads = [threading.Thread(target=job, args=("a",)),
               threading.Thread(target=job, args=("b",), kwargs={"address": f"localhost:{address.rsplit(':', 1)[1]}"})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node
    cols = [c for c in local.table.column_names if c != "shard"]
    for name in "ab":
        assert not isinstance(out[name], Exception), out[name]
        assert out[name].table.select(cols).equals(local.table.select(cols))
        for i in range(4):
            np.testing.assert_array_equal(out[name].map(i, "vanilla"), local.map(i, "vanilla"))
    other = f"127.0.0.1:{int(address.rsplit(':', 1)[1]) + 1}"
    with pytest.raises(SalienceError, match=rf"address='{other}': this process is already joined to the Ray "
                                            rf"cluster at {re.escape(address)} \(the caller's own ray.init\(\)\)"):
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "other", engine="ray", address=other, **kw)
    gpus = ray.cluster_resources().get("GPU", 0)
    with pytest.raises(SalienceError, match=rf"num_gpus={gpus + 1:g} per actor, but the local Ray cluster of this "
                                            rf"process has {gpus:g} GPU\(s\)"):
        salience.explain_dataset(model, data, ["vanilla"], tmp_path / "gpus", engine="ray", num_gpus=gpus + 1, **kw)
    salience.runs.shutdown_ray()  # salience's own cluster only: never the caller's
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node


def test_an_image_the_methods_refuse_costs_only_its_row_on_ray(cluster, tmp_path):
    """On Ray, as locally (test_runs_bad_image): the image whose score is NaN gets the methods' errors,
    the other images of its batch their maps, equal to the local engine's run."""
    import torch

    import test_runs_bad_image
    from test_runs_bad_image import METHODS, OPTIONS, Marked, _images

    model, x = Marked().eval(), _images((1,))
    kw = dict(workers=0, map_dtype="float32", batch_size=4, shard_size=4, method_options=OPTIONS)
    data = torch.utils.data.TensorDataset(x)
    local = salience.explain_dataset(model, data, METHODS, tmp_path / "local", **kw)
    ray.cloudpickle.register_pickle_by_value(test_runs_bad_image)  # the actors cannot import the tests' module
    try:
        on_ray = salience.explain_dataset(model, data, METHODS, tmp_path / "ray", engine="ray", actors=1, **kw)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(test_runs_bad_image)
    said = [c for c in local.table.column_names if c == "error" or c.endswith(".error")]  # the same columns on Ray
    assert said == ["error", "vanilla.error", "occlusion.error"]
    assert on_ray.table.select(said).to_pylist() == local.table.select(said).to_pylist()
    assert local.row(1)["vanilla.error"].startswith("the target's score is NaN") and local.row(0)["vanilla.error"] is None
    assert local.row(1)["occlusion.error"].startswith("the model's scores of the perturbed images are NaN")
    assert local.table.column("error").to_pylist() == [None] * 6
    for i in (0, 2, 3, 4, 5):
        for m in METHODS:
            np.testing.assert_allclose(on_ray.map(i, m), local.map(i, m), rtol=1e-5, atol=1e-7)
