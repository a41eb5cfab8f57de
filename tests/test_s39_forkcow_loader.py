"""A CPU run's DataLoader workers are not forked from the run's process (session 39, issue 17).

A worker forked from the run's process shares its heap copy-on-write for the whole run: every page of it
the model's passes write again is copied at a fault (under ``allocator="reuse"`` the activations' freed
memory is kept: about 320,000 faults and 1 s per 64 images on resnet50). The workers now start from a
forkserver on a CPU too; a dataset a forkserver's worker could not receive is forked as before. Observed
here by the worker's parent process: the run's process when forked, the forkserver otherwise."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import salience
from salience.runs import dataset as runs_dataset

SRC = Path(salience.__file__).resolve().parents[1]  # the salience under test, for the scripts


class ParentLogged(torch.utils.data.Dataset):
    """4 seeded images; each read writes the reading process's parent pid under ``log``."""

    def __init__(self, log: Path):
        self.log = str(log)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        Path(self.log, f"{i}-{os.getpid()}").write_text(str(os.getppid()))
        return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))


class LambdaLogged(ParentLogged):
    """The same through a lambda (a user's transform): it does not pickle."""

    def __init__(self, log: Path):
        super().__init__(log)
        self.transform = lambda t: t * 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(super().__getitem__(i))


def _parents(log: Path) -> set[int]:
    """The parent pids of the processes that read the items (the run's own process left out)."""
    return {int(p.read_text()) for p in log.iterdir() if int(p.name.split("-")[1]) != os.getpid()}


def _run(ds: torch.utils.data.Dataset, out: Path, workers: int) -> np.ndarray:
    from conftest import SmallCNN

    torch.manual_seed(0)
    run = salience.explain_dataset(SmallCNN().eval(), ds, ["vanilla"], out, batch_size=2, workers=workers,
                                   model_spec="small")
    return np.stack([run.map(i, "vanilla") for i in range(len(ds))])


def test_a_cpu_runs_worker_is_not_forked_from_the_runs_process_and_its_maps_are_unchanged(tmp_path):
    """The worker's parent is not the run's process (a forkserver's child; it was the run's process, forked,
    before), and the maps equal those of a run without workers."""
    (tmp_path / "log").mkdir()
    ds = ParentLogged(tmp_path / "log")
    forked = _run(ds, tmp_path / "w1", workers=1)
    parents = _parents(tmp_path / "log")
    assert parents and os.getpid() not in parents
    assert runs_dataset.loader_context(torch.device("cpu"), 1, ds) == "forkserver"
    assert np.array_equal(forked, _run(ParentLogged(tmp_path / "log"), tmp_path / "w0", workers=0))


def test_a_dataset_that_does_not_pickle_is_still_read_by_a_forked_worker(tmp_path):
    """A lambda in the user's transform: the worker is forked from the run's process, as before, and the
    maps equal those of a run without workers."""
    (tmp_path / "log").mkdir()
    ds = LambdaLogged(tmp_path / "log")
    assert runs_dataset.loader_context(torch.device("cpu"), 1, ds) is None
    forked = _run(ds, tmp_path / "w1", workers=1)
    assert _parents(tmp_path / "log") == {os.getpid()}
    assert np.array_equal(forked, _run(LambdaLogged(tmp_path / "log"), tmp_path / "w0", workers=0))


def test_a_dataset_over_the_pickle_limit_or_of_an_interactive_main_is_forked(tmp_path, monkeypatch):
    """Data in memory past the limit (each worker would receive a copy; a fork shares it), and a class of
    a notebook's ``__main__`` (no file: the worker could not import it) are forked; no workers, no context."""
    cpu = torch.device("cpu")
    big = torch.utils.data.TensorDataset(torch.zeros(1000, 3, 8, 8))  # 768,000 bytes of data
    assert runs_dataset.loader_context(cpu, 1, big) == "forkserver"
    monkeypatch.setattr(runs_dataset, "PICKLE_LIMIT", 100_000)
    assert runs_dataset.loader_context(cpu, 1, big) is None
    assert runs_dataset.loader_context(cpu, 0, ParentLogged(tmp_path)) is None
    notebook = types.ModuleType("__main__")  # no __file__
    cls = type("Cells", (ParentLogged,), {"__module__": "__main__"})
    notebook.Cells = cls
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    assert runs_dataset.loader_context(cpu, 1, cls(tmp_path)) is None
    assert runs_dataset.loader_context(cpu, 1, ParentLogged(tmp_path)) == "forkserver"


@pytest.mark.parametrize("guarded", [True, False])
def test_a_script_is_forked_unless_the_run_is_called_from_its_main_block(tmp_path, guarded):
    """A forkserver imports the script that runs: called from its top level outside ``if __name__ ==
    "__main__":`` its body would run again there, so its workers are forked; from inside the block, not."""
    call = "print(loader_context(torch.device('cpu'), 1, None))"
    body = f"if __name__ == '__main__':\n    {call}\n" if guarded else f"{call}\n"
    script = tmp_path / "script.py"
    script.write_text("import torch\nfrom salience.runs.dataset import loader_context\n" + body)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("forkserver" if guarded else "None")


def test_the_guard_is_found_around_a_call_inside_a_function_called_from_the_block(tmp_path):
    """``def main(): ...`` called from the block: the script's top-level frame is at the block's line."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""\
        import torch
        from salience.runs.dataset import loader_context

        def main():
            print(loader_context(torch.device('cpu'), 1, None))

        if __name__ == "__main__":
            main()
        """))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "forkserver"


class _TwoParts(Exception):
    """Pickles (as its class and its one-item args) but does not unpickle: its ``__init__`` takes two."""

    def __init__(self, key: str, table: str):
        super().__init__(f"no {key!r} in {table}")


class HoldsAnError(ParentLogged):
    """A dataset holding such an object: a forkserver's worker could not receive it."""

    def __init__(self, log: Path):
        super().__init__(log)
        self.error = _TwoParts("label", "labels.csv")


def test_a_dataset_that_pickles_but_does_not_unpickle_is_forked(tmp_path):
    """The worker unpickles the dataset: one that pickles but does not come back would kill a forkserver's
    worker (the run failed with "DataLoader worker exited unexpectedly"): it is forked, and runs."""
    (tmp_path / "log").mkdir()
    ds = HoldsAnError(tmp_path / "log")
    assert runs_dataset.loader_context(torch.device("cpu"), 1, ds) is None
    assert runs_dataset.loader_context(torch.device("cuda", 0), 1, ds) is None
    forked = _run(ds, tmp_path / "w1", workers=1)
    assert _parents(tmp_path / "log") == {os.getpid()}
    assert np.array_equal(forked, _run(HoldsAnError(tmp_path / "log"), tmp_path / "w0", workers=0))
