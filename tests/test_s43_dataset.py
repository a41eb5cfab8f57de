"""A CPU dataset run in a process that keeps a large freed heap starts its decoding workers from a forkserver (issue 17,
session 43).

Under ``allocator="reuse"`` the run's process keeps the activations its passes freed (about 1 GB for resnet50 at batch
16); a worker forked from it shares that heap copy-on-write, and the run's passes then fault every page of it once more
(session 42: about 255,000 faults a bf16 run of 80 images, the cheap kind after the worker's release, 0.2-0.3 s of
system time). From :data:`salience.runs.dataset.SHARED_HEAP` of free heap (``salience._core.malloc.kept_free_bytes``)
a run's workers start from the process's forkserver instead (started in the background by the first such run, which
forks): nothing is shared, nothing faults. What must not change: the maps (the same bits as with forked workers and
with none), the environment the workers see (a forkserver has the one it started with), a user's DataLoader (its
``worker_init_fn``; its ``multiprocessing_context``, now the run's), and scripts without a main guard or datasets a
forkserver cannot receive (forked, as before)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import salience
import salience.runs.dataset as run_dataset
from salience._core import malloc as _malloc
from test_s40_run_bf16 import images, net

KW = dict(batch_size=2, shard_size=2, target=1, model_spec="net3", overwrite=True)
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")
LARGE = 1 << 30  # the free heap the runs below are told their process keeps


def record_start(worker_id: int) -> None:
    """Salience's worker start stood in for: the worker's parent, pid and one variable of its environment, to a file
    the environment names (pickled by reference to a forkserver's worker, which imports this module)."""
    with open(os.environ["S43_LOG"], "a") as f:
        f.write(json.dumps([os.getppid(), os.getpid(), os.environ.get("S43_SET_LATE")]) + "\n")


def _starts(log: Path) -> list[list]:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return rows


def test_a_cpu_run_keeping_a_large_heap_starts_its_worker_from_a_forkserver_with_the_same_maps(tmp_path, monkeypatch):
    """Told its process keeps 1 GB of freed heap, the second run's worker is no child of the run's process (a
    forkserver's), sees the environment as the run had it when it began (a variable set after the server started),
    and the maps are those of a run with a forked worker and of one with none; with a small heap the worker forks."""
    log = tmp_path / "starts.jsonl"
    monkeypatch.setenv("S43_LOG", str(log))
    monkeypatch.setattr(run_dataset.sources, "worker_init", record_start)
    files, model = images(tmp_path / "imgs", n=4), net()
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "none", workers=0, **KW)
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "small", workers=1, **KW)
    (small,) = _starts(log)
    assert small[0] == os.getpid()  # forked: the run's process is its parent
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: LARGE, raising=False)
    for _ in range(2):  # the first such run forks, the second starts a forkserver and uses it (session 45)
        salience.explain_dataset(model, files, ["vanilla"], tmp_path / "first", workers=1, **KW)
    _starts(log)
    monkeypatch.setenv("S43_SET_LATE", "after the server started")
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "large", workers=1, **KW)
    (large,) = _starts(log)
    assert large[0] != os.getpid() and large[1] != os.getpid(), large
    assert large[2] == "after the server started"
    runs = [salience.open_run(tmp_path / k) for k in ("none", "small", "first", "large")]
    for i in range(4):
        for other in runs[1:]:
            assert np.array_equal(runs[0].map(i, "vanilla"), other.map(i, "vanilla")), i


def test_with_a_small_heap_or_no_workers_the_cpu_run_forks_as_before(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: run_dataset.SHARED_HEAP - 1, raising=False)
    assert run_dataset.loader_context(cpu, 1, [1, 2]) is None
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: LARGE, raising=False)
    assert run_dataset.loader_context(cpu, 0, [1, 2]) is None
    run_dataset.loader_context(cpu, 1, [1, 2])  # where none runs: the second call starts the server
    run_dataset.loader_context(cpu, 1, [1, 2])
    assert run_dataset.loader_context(cpu, 1, [1, 2]) == "forkserver"


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickles, but does not come back (two arguments, one kept)
        super().__init__(a)


def test_a_dataset_a_forkserver_cannot_receive_is_forked(monkeypatch):
    """Over the pickle limit (its data in memory: a fork shares it), not coming back from its pickle, or a lambda."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: LARGE, raising=False)
    run_dataset.loader_context(cpu, 1, [0])
    run_dataset.loader_context(cpu, 1, [0])
    assert run_dataset.loader_context(cpu, 1, [0]) == "forkserver"
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 1 << 10, raising=False)
    assert run_dataset.loader_context(cpu, 1, np.zeros(4096)) is None
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 64 << 20, raising=False)
    assert run_dataset.loader_context(cpu, 1, [_Unpicklable(1, 2)]) is None
    assert run_dataset.loader_context(cpu, 1, [lambda: 0]) is None


def test_a_script_calling_from_its_top_level_outside_a_main_guard_is_forked(tmp_path, monkeypatch):
    """A forkserver imports the script: its body would run again there. Inside ``if __name__ == "__main__":`` (or in
    a function) it may; a ``-m`` module or no file (a notebook) too."""
    script = tmp_path / "script.py"
    script.write_text("import salience.runs.dataset as d\nOUT = d._main_guarded()\nif __name__ == '__main__':\n"
                      "    IN = d._main_guarded()\n")
    main = types.ModuleType("__main__")
    main.__file__, main.__spec__, main.__name__ = str(script), None, "__main__"
    monkeypatch.setitem(sys.modules, "__main__", main)
    exec(compile(script.read_text(), str(script), "exec"), vars(main))
    assert main.OUT is False and main.IN is True
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: LARGE, raising=False)
    monkeypatch.setattr(run_dataset, "_forkserver_ready", lambda: True, raising=False)
    exec(compile("import torch\nCTX = d.loader_context(torch.device('cpu'), 1, [0])\n", str(script), "exec"),
         vars(main))
    assert main.CTX is None
    del main.__file__  # a notebook's __main__
    assert run_dataset._main_guarded() is True


def test_a_given_dataloaders_multiprocessing_context_is_the_runs(tmp_path):
    """A DataLoader given with ``multiprocessing_context="spawn"``: the run's DataLoader starts its workers so too
    (the run chose its own before), with the user's ``worker_init_fn``; without one, the run's choice."""
    data = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))
    for context, expected in (("spawn", "spawn"), (None, None)):
        given = torch.utils.data.DataLoader(data, num_workers=1, multiprocessing_context=context,
                                            worker_init_fn=record_start)
        dataset, paths, loader = run_dataset._dataset(given, torch.nn.Identity())
        run = SimpleNamespace(dataset=dataset, plan=SimpleNamespace(paths=paths), model=torch.nn.Identity(),
                              workers=1, worker_init=loader.worker_init_fn,
                              worker_context=loader.multiprocessing_context)
        made = run_dataset._loader(run, [(0, [0, 1]), (0, [2, 3])])
        got = made.multiprocessing_context
        assert (got.get_start_method() if got is not None else None) == expected
        assert made.worker_init_fn.args[1] is record_start


def record_inherited(worker_id: int) -> None:
    """A user's ``worker_init_fn``: whether the worker inherited the parent's memory (a module attribute set there)."""
    with open(os.environ["S43_LOG"], "a") as f:
        f.write(json.dumps([hasattr(run_dataset, "_S43_SET_IN_PARENT")]) + "\n")


def test_a_run_given_a_dataloader_with_a_spawn_context_spawns_its_worker_and_gets_its_maps(tmp_path, monkeypatch):
    """The whole run, one worker: spawned as the given DataLoader says (a fresh interpreter: nothing of this process's
    memory; before, the run forked it), its ``worker_init_fn`` run there, the same maps as without workers."""
    log = tmp_path / "starts.jsonl"
    monkeypatch.setenv("S43_LOG", str(log))
    monkeypatch.setattr(run_dataset, "_S43_SET_IN_PARENT", True, raising=False)
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    model = net()
    salience.explain_dataset(model, data, ["vanilla"], tmp_path / "none", workers=0, **KW)
    given = torch.utils.data.DataLoader(data, num_workers=1, multiprocessing_context="spawn",
                                        worker_init_fn=record_inherited)
    salience.explain_dataset(model, given, ["vanilla"], tmp_path / "spawn", **KW)
    assert _starts(log) == [[False]]
    a, b = salience.open_run(tmp_path / "none"), salience.open_run(tmp_path / "spawn")
    for i in range(4):
        assert np.array_equal(a.map(i, "vanilla"), b.map(i, "vanilla")), i


FREE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("m", sys.argv[1]); malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
before = malloc.kept_free_bytes()
malloc.keep_freed_memory()
blocks = [bytearray(8 << 20) for _ in range(16)]  # 128 MiB in heap blocks (under the 32 MiB threshold)
held = bytearray(1 << 20)  # the heap's top held
blocks.clear()
print(json.dumps({"before": before, "after": malloc.kept_free_bytes()}))
"""


@glibc_only
def test_kept_free_bytes_counts_the_heap_freed_under_fixed_thresholds():
    """0 before ``keep_freed_memory`` (the thresholds move; nothing is kept); 128 MiB freed after it: at least that."""
    out = subprocess.run([sys.executable, "-c", FREE, _malloc.__file__], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["before"] == 0 and got["after"] >= 128 << 20, got


def test_a_files_run_decodes_its_first_batch_in_its_own_process_while_the_worker_starts(tmp_path, monkeypatch):
    """Image files, one worker, three batches: the first batch's images are read in the run's process (nothing can
    hide that batch's decoding; the run would wait for it), the others in the worker; the maps are those of a run
    without workers (and an image's error row is the same)."""
    from salience.runs import sources

    log = tmp_path / "reads.jsonl"
    real = sources.ImageFiles.__getitem__

    def reading(self, index):
        with open(log, "a") as f:
            f.write(json.dumps([index, os.getpid()]) + "\n")
        return real(self, index)

    files, model = images(tmp_path / "imgs", n=6), net()
    (tmp_path / "imgs" / "5.png").write_bytes(b"not a png")  # a bad image in the last batch: its row's error
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "none", workers=0, **KW)
    monkeypatch.setattr(sources.ImageFiles, "__getitem__", reading)
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "one", workers=1, **KW)
    reads = _starts(log)
    assert sorted(i for i, pid in reads if pid == os.getpid()) == [0, 1], reads
    assert sorted(i for i, pid in reads if pid != os.getpid()) == [2, 3, 4, 5], reads
    a, b = salience.open_run(tmp_path / "none"), salience.open_run(tmp_path / "one")
    for i in range(5):
        assert np.array_equal(a.map(i, "vanilla"), b.map(i, "vanilla")), i
    errors = [r.table["error"].to_pylist() for r in (a, b)]
    assert errors[0] == errors[1] and sum(e is not None for e in errors[1]) == 1, errors
