"""Review of session 43's dataset change (forkserver workers, the first batch decoded in the run's process)."""
from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from torch.utils.data import Dataset

import salience
import salience.runs.dataset as run_dataset
from test_s40_run_bf16 import images, net

KW = dict(batch_size=2, shard_size=2, target=1, model_spec="net3", overwrite=True)


def _alive_workers() -> list:
    """This process's live multiprocessing children (a DataLoader's workers), after a moment to exit."""
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return multiprocessing.active_children()


class Failing(Dataset):
    """Eight images; item 4 raises (a user's transform's KeyError)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        if index == 4:
            raise KeyError("no such key")
        return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(index))


def test_a_run_that_raises_mid_run_stops_its_workers_while_its_error_is_kept(tmp_path):
    """A user's dataset raising in the third batch: the run raises its error, and its decoding workers have ended
    by then, even while the error (its traceback: the run's frames) is kept, as a notebook or REPL keeps the last
    one (sys.last_exc) after an error or a Ctrl-C."""
    assert not _alive_workers()
    with pytest.raises(KeyError) as info:
        salience.explain_dataset(net(), Failing(), ["vanilla"], tmp_path / "run", workers=2, **KW)
    assert info.value is not None  # kept, as sys.last_exc keeps it
    assert not _alive_workers()


def test_a_files_run_interrupted_in_a_later_batch_stops_its_workers(tmp_path, monkeypatch):
    """Image files (the first batch read in the run's process): a Ctrl-C during the second batch's passes leaves no
    worker running while the KeyboardInterrupt is kept."""
    real, calls = run_dataset.job.compute_items, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    files = images(tmp_path / "imgs", n=8)
    monkeypatch.setattr(run_dataset.job, "compute_items", interrupted)
    assert not _alive_workers()
    with pytest.raises(KeyboardInterrupt) as info:
        salience.explain_dataset(net(), files, ["vanilla"], tmp_path / "run", workers=2, **KW)
    assert info.value is not None
    assert not _alive_workers()


SCRIPT = """import threading
import salience.runs.dataset as d
got = {}
def call(key):
    got[key] = d._main_guarded()
t = threading.Thread(target=call, args=("out",)); t.start(); t.join()
if __name__ == '__main__':
    t = threading.Thread(target=call, args=("in",)); t.start(); t.join()
"""


def test_a_run_from_a_thread_of_an_unguarded_script_forks_its_workers(tmp_path, monkeypatch):
    """A script that runs its dataset runs in a thread (a ThreadPoolExecutor at its top level, no main guard): a
    forkserver's worker imports the script, whose body runs again there (it raised: 'An attempt has been made to
    start a new process before the current process has finished its bootstrapping phase', and the run failed with
    'DataLoader worker exited unexpectedly'); where the main thread waits is what counts, not the calling thread."""
    import sys
    import types

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    main = types.ModuleType("__main__")
    main.__file__, main.__spec__, main.__name__ = str(script), None, "__main__"
    monkeypatch.setitem(sys.modules, "__main__", main)
    exec(compile(script.read_text(), str(script), "exec"), vars(main))
    assert main.got == {"out": False, "in": True}


def test_a_dataset_naming_a_python_file_models_function_is_forked(tmp_path, monkeypatch):
    """A model of ``python:FILE.py:build`` whose scores a function of that file picks (``select_output``): the run's
    ImageFiles carry its ModelInfo, the function pickled by the name ``salience_user_...`` that only this process
    has. A forkserver's worker could not import it ('No module named salience_user_net_...', then 'DataLoader
    worker exited unexpectedly': the second run of a process keeping a large heap failed); it is forked, as before."""
    import dataclasses

    from salience._core.info import ModelInfo
    from salience.loading.custom import load_python
    from salience.runs import sources

    (tmp_path / "net.py").write_text("import torch.nn as nn\nfrom salience._core.info import ModelInfo, attach_info\n"
                                     "from salience.loading.custom import select_output\n"
                                     "def pick(out):\n    return out\n"
                                     "def build():\n    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))\n"
                                     "    attach_info(m, ModelInfo(name='net', input_size=(4, 4)))\n"
                                     "    return select_output(m, pick)\n")
    model = load_python(f"{tmp_path / 'net.py'}:build")
    info = model.salience_info
    files = sources.Guarded(sources.ImageFiles(["a.png"], info))
    plain = sources.Guarded(sources.ImageFiles(["a.png"], dataclasses.replace(info, output=None)))
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: 1 << 30)
    monkeypatch.setattr(run_dataset, "_forkserver_ready", lambda: True)
    cpu = torch.device("cpu")
    assert run_dataset.loader_context(cpu, 1, plain) == "forkserver"
    assert run_dataset.loader_context(cpu, 1, files) is None
    assert isinstance(info, ModelInfo)


def test_pils_truncated_images_setting_reaches_every_batch_of_a_forkserver_run(tmp_path, monkeypatch):
    """``ImageFile.LOAD_TRUNCATED_IMAGES = True`` set in the run's process (a notebook's cell, a script's guarded
    block): a forked worker inherits it, a forkserver's does not. The run of a process keeping a large heap read the
    truncated JPEG of its third batch as an error row ('corrupt or truncated') where the run without workers (and
    its own first batch, read in the process) made its map; now every image is read as without workers."""
    import numpy as np
    from PIL import Image, ImageFile

    files = images(tmp_path / "imgs", n=6)
    rng = np.random.default_rng(1)
    jpeg = tmp_path / "imgs" / "4.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:-600])
    files[4] = jpeg
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: 1 << 30)
    model = net()
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "none", workers=0, **KW)
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "first", workers=1, **KW)  # starts the server
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "later", workers=1, **KW)
    a, b = salience.open_run(tmp_path / "none"), salience.open_run(tmp_path / "later")
    assert a.table["error"].to_pylist() == [None] * 6
    assert b.table["error"].to_pylist() == a.table["error"].to_pylist()
    for i in range(6):
        assert np.array_equal(a.map(i, "vanilla"), b.map(i, "vanilla")), i


class _Opener:
    """A third-party image opener (what ``pillow_heif.register_heif_opener()`` registers)."""


def test_an_opener_registered_from_outside_pil_forks_the_workers(monkeypatch):
    from PIL import Image

    Image.init()
    assert run_dataset._pil_fresh()
    monkeypatch.setitem(Image.OPEN, "S43FAKE", (_Opener, None))
    assert not run_dataset._pil_fresh()
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: 1 << 30)
    monkeypatch.setattr(run_dataset, "_forkserver_ready", lambda: True)
    assert run_dataset.loader_context(torch.device("cpu"), 1, [0]) is None


def test_an_error_reading_the_first_batch_in_the_process_says_so_as_without_workers(tmp_path, monkeypatch):
    """An error that escapes the reading of an image of the first batch (a RuntimeError of torch's allocator in the
    resize) is read in the run's process: its note says so, as the run without workers says (it said 'in a
    DataLoader worker; its traceback there is the cause', and its cause was that process's traceback)."""
    from salience.runs import sources

    real = sources.ImageFiles.read

    def failing(self, index, path, mask=None):
        if index == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(self, index, path, mask)

    files = images(tmp_path / "imgs", n=6)
    monkeypatch.setattr(sources.ImageFiles, "read", failing)
    notes = []
    for workers in (0, 1):
        with pytest.raises(RuntimeError, match="allocate memory") as info:
            salience.explain_dataset(net(), files, ["vanilla"], tmp_path / f"w{workers}", workers=workers, **KW)
        notes.append(getattr(info.value, "__notes__", None))
    assert notes[0] == notes[1] and "in the run's process" in notes[1][0], notes
    assert not _alive_workers()
