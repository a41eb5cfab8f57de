"""Review of the merge that made a dataset run's forked decoding worker give back the heap it shares (session 42).

* A ``DataLoader`` given to ``explain_dataset`` had its ``num_workers`` kept but its ``worker_init_fn`` dropped
  silently: a dataset that opens a per-worker handle there (an HDF5 / LMDB file) read without it. It is now called in
  each decoding worker after salience's own start (and the release), forked or started from a forkserver (where it
  crosses pickled: one that does not pickle forks the workers, as a dataset that does not).
* The forked worker's release looked glibc up again in the worker (``ldconfig -p`` run as a process by
  ``ctypes.util.find_library``, a ``dlopen``), in a process forked from a threaded one: it now uses the C library
  ``keep_freed_memory`` found in the run's process.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import salience
import salience.runs.dataset as run_dataset
from salience._core import malloc as _malloc
from test_s42_fork_release import SCRIPT

ROOT = Path(__file__).resolve().parent.parent
forking = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods()
                             or multiprocessing.get_all_start_methods()[0] != "fork", reason="workers that fork")
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


class Recorder:
    """A user's ``worker_init_fn`` (picklable): appends ``worker_id pid torch-threads`` to ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __call__(self, worker_id: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{worker_id} {os.getpid()} {torch.get_num_threads()}\n")


def _data(n: int = 8) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4)


@forking
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 2 workers on the one core of taskset -c 0
def test_a_user_loaders_worker_init_fn_runs_in_each_decoding_worker_after_salience_s_start(tmp_path):
    """A DataLoader of 2 workers with a ``worker_init_fn``: it runs once in each worker (ids 0 and 1, not this
    process), after salience's own start (one thread); the maps are those of the run without workers."""
    from conftest import SmallCNN

    model = SmallCNN().eval()
    log = tmp_path / "init.txt"
    loader = torch.utils.data.DataLoader(_data(), num_workers=2, worker_init_fn=Recorder(log))
    run = salience.explain_dataset(model, loader, ["vanilla"], tmp_path / "w2", batch_size=2)
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    assert sorted(int(r[0]) for r in rows) == [0, 1], rows
    assert all(r[1] != str(os.getpid()) and r[2] == "1" for r in rows), rows
    plain = salience.explain_dataset(model, _data(), ["vanilla"], tmp_path / "w0", batch_size=2, workers=0)
    for i in range(8):
        np.testing.assert_array_equal(run.map(i, "vanilla"), plain.map(i, "vanilla"))


SALIENCE_STARTS: list[int] = []


def _salience_start(worker_id: int) -> None:
    """Stands in for ``sources.worker_init`` (which sets this process's threads): picklable, records."""
    SALIENCE_STARTS.append(worker_id)


def _loader_on_cuda(monkeypatch, init) -> torch.utils.data.DataLoader:
    """The run's DataLoader (not iterated) for a user's DataLoader with ``init``, its device stood in for CUDA."""
    monkeypatch.setattr(run_dataset, "model_device", lambda model: torch.device("cuda", 0))
    dataset, paths, _ = run_dataset._dataset(torch.utils.data.DataLoader(_data(4), num_workers=1,
                                                                         worker_init_fn=init), torch.nn.Identity())
    run = SimpleNamespace(dataset=dataset, plan=SimpleNamespace(paths=paths), model=None, workers=1, worker_init=init,
                          worker_context=None)
    return run_dataset._loader(run, [(0, [0, 1]), (0, [2, 3])])


def test_a_cuda_runs_forkserver_workers_get_the_users_worker_init_fn_pickled_or_fork_when_it_does_not_pickle(
        tmp_path, monkeypatch):
    """CUDA (stood in for): the workers start from a forkserver, and the start the loader sends them pickled calls
    salience's own start then the user's; a user's ``worker_init_fn`` that does not pickle (a lambda) forks them, as a
    dataset that does not pickle does (it would fail to start them)."""
    monkeypatch.setattr(run_dataset.sources, "worker_init", _salience_start)
    SALIENCE_STARTS.clear()
    log = tmp_path / "init.txt"
    loader = _loader_on_cuda(monkeypatch, Recorder(log))
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    start = pickle.loads(pickle.dumps(loader.worker_init_fn))
    start(3)
    assert SALIENCE_STARTS == [3]
    assert log.read_text().split()[:2] == ["3", str(os.getpid())]
    assert _loader_on_cuda(monkeypatch, lambda i: None).multiprocessing_context is None


RELEASE = SCRIPT.replace("released = malloc.release_shared_heap()", """import ctypes, ctypes.util, platform, subprocess
looked = []
def refuse(*a, **k):
    looked.append(repr(a[:1]))
    raise RuntimeError("looked up again")
subprocess.Popen = ctypes.CDLL = ctypes.util.find_library = platform.libc_ver = refuse
try:
    released = malloc.release_shared_heap()
except RuntimeError as e:
    released = str(e)
print(json.dumps({"looked": looked}))""")
"""``test_s42_fork_release``'s fresh process (128 MiB freed under the fixed thresholds), every lookup of a C library
refused just before the release."""


@glibc_only
def test_the_workers_release_uses_the_c_library_found_before_the_fork():
    """After ``keep_freed_memory``, the release looks nothing up (``find_library`` runs ``ldconfig -p`` as a
    process; a ``dlopen`` in a worker forked from a threaded process): it gives at least 100 MiB back all the same."""
    assert RELEASE != SCRIPT
    out = subprocess.run([sys.executable, "-c", RELEASE, _malloc.__file__], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    looked, got = (json.loads(line) for line in out.stdout.splitlines())
    assert looked["looked"] == [] and got["released"] is True, (looked, got)
    assert got["kept"] - got["after"] >= 100 << 20, got


ROW = re.compile(r"^(.+?)\s+wall\s+([\d.]+) s\s+CPU\s+([\d.]+) s \(sys\s+([\d.]+)\)\s+([\d,]+) minor faults$", re.M)
STEPS = ("run, forked, no release", "run, forked, release", "run, workers=0")


@pytest.mark.parametrize("doc", ["docs/datasets.md", "docs/performance-log.md"])  # the measurement log
def test_the_docs_rounds_2_and_3_of_the_committed_script_are_the_output_files(doc):
    """The paragraph on the committed script's rounds 2 and 3 (the output file's third part) gives, per step, the
    range of those two rounds' system s and faults (its first round, disturbed, left out as it says)."""
    text = (ROOT / "benchmarks/dataset-fork-faults-s42-1thread.md").read_text()
    third = text.split("```")[5]
    rows: dict[str, list[tuple[float, int]]] = {}
    for name, _, _, sys_s, faults in ROW.findall(third):
        rows.setdefault(name.strip(), []).append((float(sys_s), int(faults.replace(",", ""))))
    said = (ROOT / doc).read_text().split("The committed script at 1cb2c1c")[1].split("\n\n")[0]
    system = re.search(r"system s (\S+) / (\S+) / (\S+);", said).groups()
    faults = re.search(r"faults\s+(\S+) / (\S+) / ([\d,-]+)", said).groups()
    for k, step in enumerate(STEPS):
        later = rows[step][1:3]
        s = sorted(r[0] for r in later)
        f = sorted(r[1] for r in later)
        assert system[k] == f"{s[0]:.2f}-{s[1]:.2f}", (step, system[k])
        assert faults[k] == f"{f[0]:,}-{f[1]:,}", (step, faults[k])
