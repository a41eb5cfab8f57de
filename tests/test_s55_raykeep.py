"""The Ray cluster salience starts for a dataset run (no ``address=``, no cluster of the caller's) is kept for the
life of the process (session 55): a second run finds it, its worker processes warm; ``salience.runs.shutdown_ray()``
shuts it down (and never a cluster the caller started or joined), so does the interpreter's exit, also by Ctrl-C,
leaving no Ray process behind. Before, the last run to leave shut it down: every run paid ``ray.init`` and fresh
workers (13-15 s for 20 small images on one core, ``benchmarks/ray-run-cost-s54.md``). One cluster in this process
(the first test's), and one in each of two subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import salience

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("ray.data")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

from salience.runs import ray_engine  # noqa: E402

KW = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32")
SRC = Path(salience.__file__).resolve().parents[1]


def _descendants(root: int) -> dict[int, str]:
    """The processes under ``root`` (children, theirs, ...), by pid, each with its command line; not Python's own
    multiprocessing helpers (``multiprocessing.forkserver`` / ``resource_tracker``, which the local engine's worker
    pool starts in this process and keeps for its life: another test of the same pytest worker may have started
    them, and they are no Ray process)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except OSError:
                pass
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            cmd = _cmdline(c)
            if "from multiprocessing." not in cmd:
                out[c] = cmd
                todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _left(procs: dict[int, str], seconds: float = 30) -> dict[int, str]:
    """Those of ``procs`` still running (the same command line, not a zombie) after at most ``seconds``."""
    def running() -> dict[int, str]:
        left = {}
        for pid, cmd in procs.items():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z" and _cmdline(pid) == cmd:
                        left[pid] = cmd
            except OSError:
                pass
        return left

    until = time.monotonic() + seconds
    while running() and time.monotonic() < until:
        time.sleep(0.2)
    return running()


def _cluster_of(procs: dict[int, str]) -> set[str]:
    """Which of a local cluster's head processes are among ``procs``."""
    return {name for name in ("gcs_server", "raylet") for cmd in procs.values() if f"/{name} " in cmd + " "}


def _model(log: Path):
    """A seeded linear model whose forward appends its process's pid to ``log`` (Ray's workers get it by value)."""
    import torch

    class Logged(torch.nn.Sequential):
        def forward(self, x):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return super().forward(x)

    torch.manual_seed(0)
    model = Logged(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    model.log = str(log)
    return model.eval()


def _data():
    import torch

    return torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def _pids(log: Path) -> set[int]:
    return {int(ln) for ln in log.read_text().split()} - {os.getpid()} if log.exists() else set()


def test_a_second_run_uses_the_cluster_of_the_first_and_shutdown_ray_leaves_no_process(tmp_path, monkeypatch):
    """Two runs, no cluster of the caller's: the first starts one, still running after it (its GCS and raylet
    children of this process); the second runs on the same one (the same GCS address, node and connection, no
    ``ray.init``), explained by worker processes of the first; both runs' rows and maps are the local engine's,
    bit for bit. ``shutdown_ray()`` then leaves no process the cluster had (its workers included) and no Ray
    connection; called again it does nothing."""
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already joined in this process")
    local = salience.explain_dataset(_model(tmp_path / "l.log"), _data(), ["vanilla"], tmp_path / "local", **KW)
    try:
        first = salience.explain_dataset(_model(tmp_path / "1.log"), _data(), ["vanilla"], tmp_path / "1",
                                         engine="ray", **KW)
        assert ray.is_initialized() and ray_engine._CLUSTER["ours"]
        context = ray.get_runtime_context()
        gcs, node, connection = context.gcs_address, context.get_node_id(), ray._private.worker._global_node
        inits: list = []
        monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(k))
        second = salience.explain_dataset(_model(tmp_path / "2.log"), _data(), ["vanilla"], tmp_path / "2",
                                          engine="ray", **KW)
        monkeypatch.undo()
        context = ray.get_runtime_context()
        assert (context.gcs_address, context.get_node_id()) == (gcs, node) and not inits
        assert ray._private.worker._global_node is connection
        one, two = _pids(tmp_path / "1.log"), _pids(tmp_path / "2.log")
        assert one and two and two <= one, (one, two)
        procs = _descendants(os.getpid())
        assert _cluster_of(procs) == {"gcs_server", "raylet"}, procs
        assert one <= set(procs), (one, procs)
    finally:
        salience.runs.shutdown_ray()
    assert not ray.is_initialized() and not ray_engine._CLUSTER["ours"]
    assert _left(procs) == {}
    salience.runs.shutdown_ray()  # nothing to shut down: nothing done
    cols = [c for c in local.table.column_names if c != "shard"]
    for run in (first, second):
        assert run.complete and run.table.select(cols).equals(local.table.select(cols))
        for i in range(4):
            np.testing.assert_array_equal(run.map(i, "vanilla"), local.map(i, "vanilla"))


class _Ray:
    """Ray as ``ray_engine.cluster`` sees it, without a cluster: each ``init`` a new connection (its ``Node``)."""

    def __init__(self, joined: bool = False):
        self.node = object() if joined else None
        self.util = SimpleNamespace(client=SimpleNamespace(ray=None))
        self._private = SimpleNamespace(worker=SimpleNamespace(_global_node=self.node))
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return self.node is not None

    def init(self, **kwargs) -> None:
        self.node = self._private.worker._global_node = object()

    def shutdown(self) -> None:
        self.node = self._private.worker._global_node = None
        self.shutdowns += 1

    def get_runtime_context(self):
        return SimpleNamespace(gcs_address="192.0.2.5:6379")


def test_shutdown_ray_never_shuts_down_the_callers_cluster():
    """The caller's own cluster (joined before salience's run, or after salience's was shut down by the caller's
    ``ray.shutdown()``: a new connection) is not shut down by ``shutdown_ray()``; salience's own is, once: not
    while a run of this process uses it (a SalienceError, the run untouched), nor twice."""
    callers = _Ray(joined=True)
    with ray_engine.cluster(callers):
        pass
    ray_engine._shutdown(callers)
    assert callers.is_initialized() and callers.shutdowns == 0
    fake = _Ray()
    with ray_engine.cluster(fake):
        with pytest.raises(salience.SalienceError, match=r"1 run\(s\) of this process still use salience's Ray "
                                                         r"cluster; call it once they end"):
            ray_engine._shutdown(fake)
        assert fake.is_initialized()
    assert fake.is_initialized() and ray_engine._CLUSTER["ours"]  # kept after the run
    fake.shutdown(), fake.init()  # the caller's ray.shutdown() of it, then their own ray.init()
    ray_engine._shutdown(fake)
    assert fake.is_initialized() and fake.shutdowns == 1 and not ray_engine._CLUSTER["ours"]
    with ray_engine.cluster(fake):  # a run on it: theirs, left running
        pass
    ray_engine._shutdown(fake)
    assert fake.is_initialized() and fake.shutdowns == 1
    fake = _Ray()
    with ray_engine.cluster(fake):
        pass
    ray_engine._shutdown(fake), ray_engine._shutdown(fake)
    assert not fake.is_initialized() and fake.shutdowns == 1 and ray_engine._CLUSTER["runs"] == 0
    assert not [t for t in threading.enumerate() if t.name == "salience-ray-cluster"]


CHILD = """
import json, os, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's KeyboardInterrupt, also where the test's
# own process was started with SIGINT ignored (a background job of a shell: inherited, Python then sets no handler)
import ray

from salience.runs import ray_engine
from test_s55_raykeep import _cluster_of, _descendants


def pid():
    return os.getpid()


with ray_engine.cluster(ray):  # a run's own entry and exit (explain_dataset's work left out: test 1 does it)
    worker = ray.get(ray.remote(pid).remote())
procs = _descendants(os.getpid())
assert _cluster_of(procs) == {"gcs_server", "raylet"} and worker in procs, (worker, procs)  # kept after the run
print(json.dumps(procs), flush=True)
if sys.argv[1] == "sigint":
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["exit", "sigint"])
def test_a_process_that_ran_on_salience_s_cluster_leaves_no_ray_process_at_its_exit(tmp_path, how):
    """A Python process enters and leaves a run's cluster (``ray_engine.cluster``, as ``explain_dataset(...,
    engine="ray")`` does, with no cluster of its own) and has a task run on it: the cluster salience started is
    still up after it (its GCS and raylet among the process's children, the task's worker too); once the process
    exits, at its end or by Ctrl-C (SIGINT) while it waits, none of those processes (GCS, raylet, workers, agents)
    is left. (A whole run in each child cost 24-37 s under load; test 1 checks a run's workers end with the
    cluster.)"""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": "1"}
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        child = subprocess.Popen([sys.executable, str(script), how], env=env,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = child.stdout.readline()
        assert line, (child.wait(60), err.read_text()[-3000:])
        procs = {int(k): v for k, v in json.loads(line).items()}
        if how == "sigint":
            child.send_signal(signal.SIGINT)
        rc = child.wait(120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    said = err.read_text()
    assert rc == 0 if how == "exit" else rc in (1, -signal.SIGINT) and "KeyboardInterrupt" in said, said[-3000:]
    assert _cluster_of(procs) == {"gcs_server", "raylet"} and _left(procs) == {}
