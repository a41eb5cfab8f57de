"""Review of session 54's Ray tasks for CPU runs on the caller's cluster (``ray_engine.explain``): what a
worker process holds for a run (one :class:`Explain`, a model each) is that run's, never another's, and
is let go by the run's end, done or failed."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import salience

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("ray.data")

from test_runs_ray import _alive  # noqa: E402 - whether a process runs (read in /proc)

KW = dict(shard_size=2, batch_size=2, workers=0, map_dtype="float32", top=1)


def test_explain_given_its_arguments_by_value_never_serves_another_calls_model(monkeypatch):
    """``ray_engine.explain`` (public) with its :class:`Explain`'s arguments by value and no run id
    builds from the arguments it is given: it held the first call's under ``"explain:None"`` and served
    every later call from it (another model, another folder) in that process."""
    from salience.runs import ray_engine

    monkeypatch.setattr(ray_engine, "_HELD", {})
    monkeypatch.setattr(ray_engine, "_RUN_OF", {})
    monkeypatch.setattr(ray_engine, "_explainer", lambda args: (lambda batch: args))  # what it was built from
    assert ray_engine.explain({}, ("model a",)) == ("model a",)
    assert ray_engine.explain({}, ("model b",)) == ("model b",)
    # one run (its id): one Explain, built once, whatever the call
    assert ray_engine.explain({}, ("model c",), run_id="r") == ("model c",)
    assert ray_engine.explain({}, ("model c",), run_id="r") == ("model c",)


@pytest.fixture(scope="module")
def callers():
    """A local cluster of 2 CPUs the test starts (the caller's own: salience explains in tasks there)."""
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already joined in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _model(log: Path, seed: int):
    """A small CNN of seed ``seed`` whose copies log ``made PID`` when unpickled in a process and ``del PID``
    when freed there. Defined here: Ray's workers get it by value."""
    import torch

    class Logged(torch.nn.Sequential):
        def __setstate__(self, state):
            super().__setstate__(state)
            with open(self.log, "a") as f:
                f.write(f"made {os.getpid()}\n")

        def __del__(self):
            with open(self.log, "a") as f:
                f.write(f"del {os.getpid()}\n")

    torch.manual_seed(seed)
    model = Logged(torch.nn.Conv2d(3, 2, 1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 3))
    model.log = str(log)
    return model.eval()


def _data():
    import torch

    return torch.utils.data.TensorDataset(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def _let_go(log: Path) -> None:
    """Every other process that unpickled a model into ``log`` freed it (or ended) within 10 s."""
    def pids(what):
        lines = [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []
        return {int(p) for w, p in lines if w == what} - {os.getpid()}

    until = time.monotonic() + 10
    while [p for p in pids("made") - pids("del") if _alive(p)] and time.monotonic() < until:
        time.sleep(0.1)
    assert pids("made") and not [p for p in pids("made") - pids("del") if _alive(p)], log.read_text()


def test_two_runs_at_once_of_two_models_are_each_their_own_and_let_go_done_or_failed(callers, tmp_path):
    """Two runs at once (threads) of two models (other seeds) on the caller's cluster: each equals its own
    model's local run bit for bit (no worker process explains one with the other's model), and each process
    lets both models go by the runs' end; so does a run whose method raised."""
    models = {s: _model(tmp_path / f"{s}.log", s) for s in (1, 2)}
    local = {s: salience.explain_dataset(m, _data(), ["vanilla"], tmp_path / f"local{s}", **KW) for s, m in
             models.items()}
    barrier, out = threading.Barrier(2), {}

    def job(s: int) -> None:
        barrier.wait(30)
        out[s] = salience.explain_dataset(models[s], _data(), ["vanilla"], tmp_path / f"ray{s}", engine="ray", **KW)

    threads = [threading.Thread(target=job, args=(s,)) for s in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for s in models:
        cols = [c for c in local[s].table.column_names if c != "shard"]
        assert out[s].complete and out[s].table.select(cols).equals(local[s].table.select(cols))
        for i in range(4):
            np.testing.assert_array_equal(out[s].map(i, "vanilla"), local[s].map(i, "vanilla"))
        _let_go(tmp_path / f"{s}.log")

    def boom(model, x, target):  # Ray's workers get it by value
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        salience.explain_dataset(_model(tmp_path / "boom.log", 3), _data(), {"boom": boom}, tmp_path / "boom",
                                 engine="ray", **KW)
    _let_go(tmp_path / "boom.log")
