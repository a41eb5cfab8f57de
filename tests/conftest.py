"""Shared test helpers: tiny models and a strict check that a model comes back unchanged."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
from torch import nn

from salience._core import cpu as _cpu

# Under pytest-xdist (the README's test command runs two workers) each worker gets one thread, so two
# workers do not fight over the two cores; alone, the tests use up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

# precision="bf16" on a CPU without native bf16 warns once per process (salience._core.cpu): marked as given here, so
# that no test's warnings depend on the CPU and on whether an earlier test in its process used the warning up (a test
# with warnings as errors and bf16 failed first in its process on such a CPU); tests/test_s40_bf16_engine.py, which
# tests the warning, clears the mark for each of its tests.
_cpu._warned = True

# Ray starts its worker processes (the actors explaining, the tasks decoding) at niceness 15, below the other
# xdist worker and everything else on the machine: on two busy cores they waited, and tests/test_runs_ray.py took
# 1,224 s in a full run against 242 s in a worker of its own. At niceness 0 (what Ray's own job manager gives its
# workers) they get their share; no test checks a process's priority. The clusters started here and in the
# commands run as subprocesses inherit it.
os.environ.setdefault("RAY_worker_niceness", "0")

_CHECKOUT = Path(__file__).resolve().parent.parent


def _untracked() -> Optional[set[str]]:
    """The checkout's untracked, not ignored files (``None`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(_CHECKOUT), "status", "--porcelain", "--untracked-files=all"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line[3:] for line in out.stdout.splitlines() if line.startswith("?? ")}


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controlling process checks the checkout once, after every worker has ended
    session.config.stash[_BEFORE] = _untracked()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when the tests left files in the checkout: every path a test writes belongs
    under ``tmp_path`` (a relative output path once wrote ``OUT/c.png`` into the checkout, and it
    was committed with the next ``git add -A``)."""
    before = session.config.stash.get(_BEFORE, None)
    after = _untracked() if before is not None else None
    new = sorted(after - before) if after is not None else []
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("the tests left files in the checkout (write them under tmp_path): "
                   + ", ".join(new[:20]) + (f" and {len(new) - 20} more" if len(new) > 20 else ""))
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[Optional[set]]()

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def model_snapshot(model: nn.Module) -> dict:
    """Everything an explainer could leave changed: modes, flags, grads, hooks, tensors, classes."""
    from torch.nn.modules import module as module_mod

    snap = {
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "grad_ids": [(n, id(p.grad)) for n, p in model.named_parameters()],
        "hooks": [(n, tuple(len(getattr(m, d, {}) or {}) for d in _HOOK_DICTS)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        # storage and strides: a channels-last run must put the user's layout back
        "layout": [(n, p.data_ptr(), p.stride()) for n, p in model.named_parameters()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
        # Python attributes on the tensors (torch.compile marks those it traces, e.g.
        # _dynamo_static_input_type, _is_frozen_param): the values are kept, compared by identity or ==
        "tensor_attrs": [(n, dict(t.__dict__)) for n, t in (*model.named_parameters(), *model.named_buffers())],
        "forwards": [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
        "global_hooks": tuple(
            len(getattr(module_mod, name, {}) or {})
            for name in dir(module_mod)
            if name.startswith("_global_") and name.endswith("hooks")
        ),
        "torch_function_modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
    }
    return snap


def assert_same_snapshot(before: dict, after: dict) -> None:
    for key in before:
        if key == "state":
            assert before[key].keys() == after[key].keys(), "state_dict keys changed"
            for k in before[key]:
                assert torch.equal(before[key][k], after[key][k]), f"state_dict entry {k} changed"
        elif key == "grad":
            for (n, g0), (_, g1) in zip(before[key], after[key]):
                assert (g0 is None) == (g1 is None), f".grad of {n} changed"
                if g0 is not None:
                    assert torch.equal(g0, g1), f".grad of {n} changed"
        elif key == "tensor_attrs":
            for (n, d0), (_, d1) in zip(before[key], after[key]):
                assert d0.keys() == d1.keys(), f"attributes of {n} changed: {sorted(d0)} -> {sorted(d1)}"
                for k in d0:
                    assert d0[k] is d1[k] or (not isinstance(d0[k], torch.Tensor) and d0[k] == d1[k]), \
                        f"attribute {k} of {n} changed: {d0[k]!r} -> {d1[k]!r}"
        else:
            assert before[key] == after[key], f"model {key} changed"


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Assert that ``model`` is exactly as before when the block ends (also if it raises)."""
    before = model_snapshot(model)
    try:
        yield
    finally:
        assert_same_snapshot(before, model_snapshot(model))


class SmallCNN(nn.Module):
    """A tiny conv net with BatchNorm, Dropout and module ReLUs; output (B, 4)."""

    def __init__(self, c: int = 3, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(self.drop(h.mean((2, 3))))


def seeded_small_cnn() -> SmallCNN:
    """:class:`SmallCNN` with seed 0 and non-trivial BatchNorm statistics, so a forward in train mode would
    change them visibly (in train mode, as made)."""
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture
def small_cnn() -> SmallCNN:
    return seeded_small_cnn()


class RandomImages(torch.utils.data.Dataset):
    """``n`` images ``(3, size, size)`` of seeded noise, images only (the predicted class is explained):
    a dataset run's input without files."""

    def __init__(self, n: int, size: int = 8, seed: int = 0):
        self.x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def instances_made(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list:
    """Replace the class ``owner.<name>`` (e.g. the engine's ``MemoryProbe``) for the test with a subclass that
    appends each instance it makes to the list returned: how often salience made one."""
    made: list = []
    real = getattr(owner, name)

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(owner, name, Counted)
    return made


def counting_backend():
    """A torch.compile backend that counts the graphs it is given (dynamo hands a backend each graph
    it compiles, once) with their image batch sizes, and the calls of the compiled graphs:
    ``(backend, graphs, calls)``."""
    graphs: list = []
    calls: list = []

    def backend(gm, inputs):
        graphs.append(sorted({int(t.shape[0]) for t in inputs
                              if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 3 and t.shape[2] > 3}))

        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run

    return backend, graphs, calls


def snapshot_freezing(monkeypatch) -> list:
    """A stand-in for inductor's freezing in ``compile="freeze"`` (the graph's weights copied as it is compiled, as
    freezing takes them as constants), fast on a CPU; the list returned counts the compiles."""
    import copy

    from salience._core import compiled

    compiles: list = []

    def snapshot(gm, inputs):
        compiles.append(1)
        kept = copy.deepcopy(gm)
        return lambda *args: kept.forward(*args)

    monkeypatch.setattr(compiled, "_freeze_compile", snapshot)
    return compiles


@pytest.fixture
def fresh_perf_state():
    """As in a fresh process, before and after the test: the once-per-process "is not applied" warnings of the
    methods and the engine's caches (a file takes it with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    from salience._core import perf
    from salience.methods import _multi

    _multi._UNAPPLIED.clear()
    perf.clear_cache()
    yield
    _multi._UNAPPLIED.clear()
    perf.clear_cache()


def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
    """After a module's last test: close the Chromium its tests shared (tests/explore_helpers.py's
    ``browser_page``), so that no other module runs with it (it refuses ``asyncio.run`` in this thread)."""
    helpers = sys.modules.get("explore_helpers")
    module = getattr(item, "module", None)
    if helpers is not None and (nextitem is None or getattr(nextitem, "module", None) is not module):
        helpers.close_shared_browser()

