"""The local engine's writer thread (the store's host work while the model runs the next batch) and
the DataLoader's start method: the store byte for byte as the main thread writes it, an error in the
thread raised in the main thread as it is, a forkserver loader's run equal to a forked one's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import salience
from salience import SalienceError
from salience.runs import dataset as runs_dataset
from salience.runs.store import Store


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a run folder but its manifest (its ``created`` time) and lock, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("run.json", ".salience-run.lock")}


def _pngs(folder: Path, n: int) -> Path:
    from PIL import Image

    imgs, _, _ = salience.data.shapes(n, seed=5)
    folder.mkdir()
    for i in range(n):
        Image.fromarray((imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_the_writer_thread_writes_the_store_byte_for_byte_as_the_main_thread(tmp_path, monkeypatch):
    """10 images in batches of 3 and shards of 4 (a shard's batches cut short, a last short batch), two
    methods, thumbnails and PNG overlays: every file of the store (maps, sprites, rows, index, gallery,
    overlays) the same bytes with the writer thread (queue of 2 batches) and without it (the main
    thread doing the host work between batches, as before the thread)."""
    folder = _pngs(tmp_path / "imgs", 10)
    model = salience.load_model("demo:shapes")
    runs = {}
    for depth in (0, 2):
        monkeypatch.setattr(runs_dataset, "WRITER_QUEUE", depth)
        out = tmp_path / f"q{depth}"
        salience.explain_dataset(model, folder, ["vanilla", "gradcam"], out, batch_size=3, shard_size=4,
                                 workers=0, png=True, model_spec="demo:shapes")
        runs[depth] = _files(out)
    assert any(k.startswith("overlays/") for k in runs[0]) and any(k.startswith("thumbs/") for k in runs[0])
    assert len([k for k in runs[0] if k.startswith("shards/")]) == 3
    assert runs[2].keys() == runs[0].keys()
    assert [k for k in runs[0] if runs[0][k] != runs[2][k]] == []


@pytest.mark.parametrize("error", [SalienceError("the disk is full; free some space and run the same command again"),
                                   OSError(28, "No space left on device")])
def test_an_error_in_the_writer_thread_is_raised_in_the_main_thread_as_it_is(tmp_path, monkeypatch, error):
    """A shard's write that raises in the writer thread: the run raises that error (its type and text)
    in the caller's thread, the shard before it committed, the model exactly as it was."""
    from conftest import RandomImages, SmallCNN, unchanged

    real = Store.write_shard
    calls = []

    def failing(self, shard, *rest):
        calls.append(shard)
        if len(calls) == 2:
            raise error
        return real(self, shard, *rest)

    monkeypatch.setattr(Store, "write_shard", failing)
    model = SmallCNN().train()
    with unchanged(model):
        with pytest.raises(type(error)) as raised:
            salience.explain_dataset(model, RandomImages(12), ["vanilla"], tmp_path / "r", batch_size=2, shard_size=4,
                                     workers=0)
    assert raised.value is error and str(raised.value) == str(error)
    assert [p.name for p in (tmp_path / "r" / "shards").glob("*.parquet")] == ["000000000.parquet"]


def test_the_loader_forks_on_the_cpu_and_starts_a_forkserver_on_cuda():
    """Forking a process that has CUDA initialized (and threads) is unsafe: a CUDA run's decoding workers
    start from a forkserver; a CPU run's fork (the quickest to start); no workers, no context."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert runs_dataset.loader_context(cuda, 2) == "forkserver"
    assert runs_dataset.loader_context(cuda, 0) is None
    assert runs_dataset.loader_context(cpu, 2) is None


def test_a_run_whose_workers_start_from_a_forkserver_equals_one_without_workers(tmp_path, monkeypatch):
    """The forkserver context forced on the CPU (one worker, 4 tiny files): the dataset and the worker's
    start function cross to the worker pickled, and the store is the one a run without workers writes."""
    folder = _pngs(tmp_path / "imgs", 4)
    model = salience.load_model("demo:shapes")
    seen = []

    def forced(device, workers, dataset=None):
        seen.append(workers)
        return "forkserver"

    salience.explain_dataset(model, folder, ["vanilla"], tmp_path / "plain", batch_size=2, workers=0,
                             model_spec="demo:shapes")
    monkeypatch.setattr(runs_dataset, "loader_context", forced)
    salience.explain_dataset(model, folder, ["vanilla"], tmp_path / "forkserver", batch_size=2, workers=1,
                             model_spec="demo:shapes")
    assert seen == [1]
    assert _files(tmp_path / "forkserver") == _files(tmp_path / "plain")


def test_a_ctrl_c_while_the_run_waits_for_its_writer_leaves_no_thread_writing(tmp_path, monkeypatch):
    """A Ctrl-C while the run waits for the writer thread's last commit (a slow disk): the run raises
    KeyboardInterrupt only once the thread has ended, so no shard is committed after the run (and its
    folder's lock) has ended, and no thread of it is left running."""
    import os
    import signal
    import threading
    import time

    from conftest import RandomImages, SmallCNN

    real = Store.write_shard

    def slow(self, shard, *rest):
        if shard == "000000004":  # the last shard: the main thread is waiting in close()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        return real(self, shard, *rest)

    monkeypatch.setattr(Store, "write_shard", slow)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        salience.explain_dataset(SmallCNN(), RandomImages(6), ["vanilla"], out, batch_size=2, shard_size=4, workers=0)
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert shards == ["000000000.parquet", "000000004.parquet"]  # the commit under way finished, then the Ctrl-C
    time.sleep(0.4)
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == shards
    assert not any(t.name == "salience-run-writer" and t.is_alive() for t in threading.enumerate())


def test_a_warning_of_a_batch_written_after_an_error_in_the_main_thread_is_still_given(tmp_path, monkeypatch):
    """The float16 storage's warning of the last batch computed before an item's error (the writer
    thread finishing it while the error is raised): given, as when the main thread did that batch's
    host work itself, and the item's error is the one raised."""
    import time

    from salience.runs import job

    class Cubes(torch.nn.Module):  # gradients 3 x^2 w: the second batch's (x ~ 1e-5) below float16's range
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            return self.head((x ** 3).flatten(1))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise KeyError("image 4")
            return torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) * (1e-5 if i in (2, 3) else 1)

    real = job.finish_items

    def slow(*args, **kwargs):
        time.sleep(0.2)  # the main thread has handed the batch over and gone on to the next
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "finish_items", slow)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="float16") as said, pytest.raises(KeyError, match="image 4"):
        salience.explain_dataset(Cubes(), Images(), ["vanilla"], tmp_path / "r", batch_size=2, shard_size=2,
                                 workers=0)
    assert [w.filename for w in said if "float16" in str(w.message)] == [__file__]
    assert sorted(p.name for p in (tmp_path / "r" / "shards").glob("*.parquet")) == ["000000000.parquet",
                                                                                      "000000002.parquet"]


class _Lambdas(torch.utils.data.Dataset):
    """4 seeded images through a lambda (a user's transform): a dataset that does not pickle."""

    def __init__(self):
        self.transform = lambda t: t * 2

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)))


def test_a_cuda_run_whose_dataset_does_not_pickle_forks_its_workers_as_before(tmp_path, monkeypatch):
    """A forkserver's workers receive the dataset pickled: a CUDA run (its device stood in for) whose
    dataset holds a lambda forks its workers (as before the forkserver), and its store is the one a
    run without workers writes."""
    from conftest import SmallCNN

    real = runs_dataset.loader_context
    assert real(torch.device("cuda", 0), 2, _Lambdas()) is None
    monkeypatch.setattr(runs_dataset, "loader_context", lambda device, *rest: real(torch.device("cuda", 0), *rest))
    model = SmallCNN().eval()
    salience.explain_dataset(model, _Lambdas(), ["vanilla"], tmp_path / "plain", batch_size=2, workers=0)
    salience.explain_dataset(model, _Lambdas(), ["vanilla"], tmp_path / "forked", batch_size=2, workers=1)
    assert _files(tmp_path / "forked") == _files(tmp_path / "plain")
