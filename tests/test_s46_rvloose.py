"""Session 46's review of the loose ends (merge 21bfa4c): each defect found, checked against a reference.

1. ``torch.einsum`` that only views a weight (``"i->i"``, ``"ij->ji"``: no product, no cast) under a CPU bf16
   precision: the first pass's verdict "views and casts only" held (no other operation read the weight), and later
   passes were handed the weight's bf16 copy, so einsum returned rounded values where autocast leaves the fp32 ones.
   The reference: the same call with autocast's cache off (WeightCasts serves nothing), bit for bit.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience


class ViewedScale(nn.Module):
    """A linear layer whose output is scaled by ``torch.einsum(equation, self.scale)``: a view of the weight."""

    def __init__(self, equation: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.equation = equation
        self.lin = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.randn(6, 6) * 0.3 + 1.0000001 if equation == "ij->ji" else
                                  torch.randn(6) * 0.3 + 1.0000001)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.lin(x.flatten(1))
        s = torch.einsum(self.equation, self.scale)
        return self.head(t * s if s.dim() == 1 else t * s.sum(0))


def _ig(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return salience.integrated_gradients(model, x, 1, steps=8, chunk=2, precision="bf16")


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("equation", ["i->i", "ij->ji"])
def test_an_einsum_that_only_views_a_weight_keeps_its_fp32_bits(equation):
    model, x = ViewedScale(equation).eval(), torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    first, again = _ig(model, x), _ig(model, x)  # the second call meets the signature's verdict
    with torch.autocast("cpu", enabled=False, cache_enabled=False):  # WeightCasts off: autocast's own casts
        ref = _ig(model, x)
    assert torch.equal(first, ref)
    assert torch.equal(again, ref), float((again - ref).abs().max())


# 2. The folded copy (and occlusion's kept trace, keyed the same way: folding.kept_for) was kept for the weights'
# state and the modules' plain numbers, flags and strings, not for a tensor that is no parameter or buffer
# (``self.shift = torch.tensor(...)``, a trace's constant: the copy holds its own copy of it), a function the
# forward calls (``self.act = torch.tanh``) or a list (swin's ``shift_size``): one replaced or changed in place, the
# folded copy ran the old one (RISE's map off by 10 % of its range), and occlusion's kept trace failed its check and
# ran full passes for good. The references: the same call unfolded; occlusion's log of its region-limited passes.
class Shifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.shift, self.act, self.roll = torch.tensor(0.0), torch.relu, [0, 0]
        self.head = nn.Linear(8 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.c2(self.act(self.bn(self.c1(x))) + self.shift))
        y = torch.roll(nn.functional.adaptive_avg_pool2d(y, 2), self.roll, (2, 3))
        return self.head(y.flatten(1))


CHANGES = {
    "tensor replaced": lambda m: setattr(m, "shift", torch.tensor(0.5)),
    "tensor in place": lambda m: m.shift.add_(0.5),
    "function replaced": lambda m: setattr(m, "act", torch.tanh),
    "list in place": lambda m: m.roll.__setitem__(0, 1),  # swin's shift_size: a list the forward reads
}


def _rise(model: nn.Module, x: torch.Tensor, fold: bool) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with salience.performance(fold_batchnorm=fold):
            return salience.rise(model, x, 1, masks=16, seed=0)


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("change", list(CHANGES))
def test_the_folded_copy_follows_a_constant_tensor_or_function_of_the_forward(change):
    model, x = Shifted().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    before = _rise(model, x, True)  # the folded copy made, kept for the model
    torch.testing.assert_close(before, _rise(model, x, False), rtol=0, atol=1e-5)
    CHANGES[change](model)
    after, ref = _rise(model, x, True), _rise(model, x, False)
    assert (ref - before).abs().max() > 1e-3  # the change changes the map
    torch.testing.assert_close(after, ref, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("fresh_perf_state")
@pytest.mark.parametrize("change", ["tensor replaced", "function replaced"])
def test_occlusion_traces_again_after_a_constant_tensor_or_function_changed(change, caplog):
    model, x = Shifted().eval(), torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))

    def occlusion() -> list[str]:
        caplog.clear()
        with caplog.at_level("DEBUG", logger="salience.occlusion"):
            salience.occlusion(model, x, 2, window=6, stride=4, reduce=None)
        return [r.getMessage() for r in caplog.records if r.name == "salience.occlusion"]

    assert any("region-limited passes" in m for m in occlusion()), caplog.text
    CHANGES[change](model)
    said = occlusion()
    assert any("region-limited passes" in m for m in said), said  # was: full passes, the kept trace's check failing


# 3. A dataset run whose workers start from the forkserver, its process killed (SIGKILL, an out-of-memory kill): the
# workers are the server's children, so torch's watchdog (the worker's parent changed) never fired, and the server,
# which ends when its last client does, waited for them (each child of the server holds its "alive" pipe): the server
# and the workers stayed for good (also before session 46). Each such worker now ends with the run's process.
SLOW = """
import time, torch
from torch.utils.data import Dataset


class Slow(Dataset):
    def __len__(self):
        return 400

    def __getitem__(self, i):
        time.sleep(0.3)  # a slow decoding
        return torch.rand(3, 32, 32)
"""
KILLED = """
import os, signal, sys, threading, time, warnings
warnings.simplefilter("ignore")
from multiprocessing import forkserver
import salience
import salience.runs.dataset as d
from slow import Slow

if __name__ == "__main__":
    d._SERVER_ASKED = 1  # a second large-heap run of the process: it starts the server
    assert d._forkserver_ready()
    d.loader_context = lambda device, workers, dataset=None: "forkserver"

    def kill():
        server, end = forkserver._forkserver._forkserver_pid, time.monotonic() + 90
        while time.monotonic() < end:  # until both workers decode (the server's imports first: seconds)
            workers = os.popen(f"pgrep -P {server}").read().split()
            if len(workers) == 2:
                break
            time.sleep(0.5)
        time.sleep(1)
        print(server, *workers, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    salience.explain_dataset(salience.load_model("demo:shapes"), Slow(), ["vanilla"], sys.argv[1], batch_size=4,
                             workers=2)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(__import__("os"), "pidfd_open") or __import__("sys").platform != "linux",
                    reason="Linux's forkserver and /proc")
def test_a_killed_runs_forkserver_workers_end_with_it(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "killed.py").write_text(KILLED)
    src = str(Path(salience.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # the output to files: a pipe would be held open by the workers that outlive the script
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        code = subprocess.run([sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "out")], stdout=out,
                              stderr=err, timeout=120, env=env, cwd=tmp_path, start_new_session=True).returncode
    said = (tmp_path / "stdout").read_text()
    server, *workers = [int(p) for p in said.split()] or [0]
    try:
        assert code == -signal.SIGKILL, (tmp_path / "stderr").read_text()
        assert len(workers) == 2, said
        end = time.monotonic() + 15
        while any(_running(p) for p in (server, *workers)) and time.monotonic() < end:
            time.sleep(0.2)
        assert [p for p in (server, *workers) if _running(p)] == []  # was: all three, for good
    finally:
        for p in (*workers, server):  # this test's own processes, by their ids
            if p and _running(p):
                os.kill(p, signal.SIGKILL)
