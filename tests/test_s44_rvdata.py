"""Session 44's review of the dataset change (wt-data-s44): what its one forkserver check for CUDA and the CPU
changed that it should not have, and the docs it left describing session 43's rule."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch

import salience.runs.dataset as run_dataset

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_a_cuda_run_over_the_pickle_limit_keeps_its_forkserver(monkeypatch):
    """The 64 MiB limit is the CPU's cost rule (a fork shares the data for free). On CUDA a fork is what a worker
    that touches CUDA (a dataset of CUDA tensors) cannot survive ("Cannot re-initialize CUDA in forked
    subprocess"); before session 44 such a dataset got a forkserver, and the merge forked it. The device stood in for
    (no GPU here): the decision touches no CUDA."""
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 1 << 10)
    big = np.arange(4096, dtype=np.float64)  # 32 KiB: over the limit, pickles whole
    assert run_dataset.loader_context(CUDA, 1, big) == "forkserver"
    monkeypatch.setattr(run_dataset, "kept_free_bytes", lambda: 1 << 30)
    monkeypatch.setattr(run_dataset, "_forkserver_ready", lambda: True)
    assert run_dataset.loader_context(CPU, 1, big) is None  # the CPU's rule unchanged: a fork shares it


def test_a_large_cuda_dataset_that_a_fresh_worker_could_not_get_still_forks(monkeypatch):
    """Past the limit the whole pickle is still checked: something that does not pickle, or a notebook's class,
    after the first kilobyte forks the workers, as under the limit."""
    monkeypatch.setattr(run_dataset, "PICKLE_LIMIT", 1 << 10)
    big = np.zeros(4096)
    assert run_dataset.loader_context(CUDA, 1, [big, lambda: 0]) is None
    main = types.ModuleType("__main__")  # a notebook: no __file__
    cell = type("Cell", (), {"__module__": "__main__"})
    main.Cell = cell
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert run_dataset.loader_context(CUDA, 1, [big, cell()]) is None


def test_the_architecture_table_states_session_44s_start_rule():
    """docs/architecture.md's `runs/` row still said session 43's rule (a forkserver on CUDA and whenever the heap is
    large, the first such run starting it): it names the run that starts the server and the one check now."""
    row = next(line for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
               if line.startswith("| `runs/` |"))
    workers = row[row.index("DataLoader workers"):row.index("shards, resume")]
    # session 45: the second run uses the server it starts (it was the third, the second forking)
    assert "second run on" in workers and "the second starts it and uses it" in workers, workers
    assert "`_afresh_decodes_alike`" in workers and "pickle limit keeps the forkserver" in workers, workers
