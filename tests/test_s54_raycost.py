"""A CPU run on a Ray cluster the caller keeps (their ``ray.init()``: a notebook, a service) does not pay Ray's
start-up per run (session 54): it explains in Ray tasks, in the worker processes Ray keeps for this
process's job, which a second run reuses with torch, salience and its decoder imported; an actor pool
started for each run (a process, ``import torch``, the model) cost about 4.5 s a run on one core
(benchmarks/ray-run-cost-s54.md). The module's cluster is started and stopped here (2 CPUs), and its
shutdown is checked to leave none of its processes, the workers kept between runs included."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import salience

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("ray.data")

from test_runs_ray import _alive  # noqa: E402 - whether a process runs (read in /proc)

KW = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32", top=1)
METHODS = ["vanilla", "gradcam"]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 CPUs started here (the caller's: salience uses it and leaves it running), and
    once stopped (``ray.shutdown()``): none of its processes (its GCS, its raylet, the workers that
    explained) left running within 10 s. Yields the set the tests add their workers' pids to."""
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already joined in this process")
    workers: set = set()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        node = ray._private.worker._global_node
        ours = {p.process.pid for procs in node.all_processes.values() for p in procs}
        yield workers
        ours |= workers
        assert ours and all(_alive(p) for p in ours), ours
    finally:
        ray.shutdown()
    until = time.monotonic() + 10
    while [p for p in ours if _alive(p)] and time.monotonic() < until:
        time.sleep(0.1)
    assert not [p for p in ours if _alive(p)], ours


def _model(log: Path):
    """A small CNN (seeded) whose forward appends its process's pid to ``log``. Defined here: Ray's
    workers get it by value."""
    import torch

    class Logged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
            self.log = str(log)

        def forward(self, x):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return self.net(x)

    torch.manual_seed(0)
    return Logged().eval()


def _data(n: int = 4):
    import torch

    return torch.utils.data.TensorDataset(torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def _pids(log: Path) -> set:
    """The processes other than this one that ran the model (its forward) into ``log``."""
    return {int(ln) for ln in log.read_text().split()} - {os.getpid()} if log.exists() else set()


def _same(run, local, n: int = 4) -> None:
    """``run``'s rows and maps are ``local``'s, bit for bit."""
    cols = [c for c in local.table.column_names if c != "shard"]
    assert run.complete and run.table.select(cols).equals(local.table.select(cols))
    for i in range(n):
        for m in METHODS:
            np.testing.assert_array_equal(run.map(i, m), local.map(i, m))


def test_a_second_run_is_explained_by_the_processes_of_the_first_and_both_equal_local(cluster, tmp_path):
    """Two runs of one process on the cluster: the worker processes that explained the first are still
    running after it, and the second is explained by them (no process started for it); both runs' rows
    and maps equal the local engine's bit for bit. Before, each run started a pool of actors (new
    processes, each importing torch and salience and loading the model) that ended with the run."""
    local = salience.explain_dataset(_model(tmp_path / "local.log"), _data(), METHODS, tmp_path / "local", **KW)
    first = salience.explain_dataset(_model(tmp_path / "1.log"), _data(), METHODS, tmp_path / "1", engine="ray",
                                     **KW)
    one = _pids(tmp_path / "1.log")
    cluster |= one
    assert one and all(_alive(p) for p in one), one  # the run's processes outlive it, ready for the next
    second = salience.explain_dataset(_model(tmp_path / "2.log"), _data(), METHODS, tmp_path / "2", engine="ray",
                                      **KW)
    two = _pids(tmp_path / "2.log")
    cluster |= two
    assert two and two <= one, (one, two)
    _same(first, local)
    _same(second, local)


def test_a_run_whose_model_raises_leaves_the_processes_usable_for_the_next(cluster, tmp_path):
    """A run whose method raises on Ray (its own error, raised as it was) leaves the worker processes
    usable: the next run is explained by processes that explained this module's runs before it (the
    failed run's tasks ended, Ray's cancel of a task in flight included, not their processes: none is
    started for the next run) and equals the local engine's run."""
    local = salience.explain_dataset(_model(tmp_path / "local.log"), _data(), METHODS, tmp_path / "local", **KW)
    salience.explain_dataset(_model(tmp_path / "0.log"), _data(), METHODS, tmp_path / "0", engine="ray", **KW)
    before = _pids(tmp_path / "0.log")
    cluster |= before

    def boom(model, x, target):  # a method raising on Ray: Ray's workers get it by value
        with open(tmp_path / "boom.log", "a") as f:
            f.write(f"{os.getpid()}\n")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        salience.explain_dataset(_model(tmp_path / "b.log"), _data(), {"boom": boom}, tmp_path / "boom",
                                 engine="ray", **KW)
    failed = _pids(tmp_path / "boom.log")
    cluster |= failed
    assert failed  # it raised on Ray, not in this process
    seen = set(cluster)  # the processes that explained this module's runs so far
    after = salience.explain_dataset(_model(tmp_path / "3.log"), _data(), METHODS, tmp_path / "3", engine="ray",
                                     **KW)
    three = _pids(tmp_path / "3.log")
    cluster |= three
    assert before and three and three <= seen, (seen, three)
    _same(after, local)
