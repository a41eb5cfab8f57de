"""Session 51 (guard): a call's cost with a large plain tensor attribute (a constant lookup table) before and after
``guard.Found`` keeps its copy across calls, and the model guard's cost on TorchScript before and after it records a
scripted module's attributes.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/found-s51.py --old /tmp/old-guard/src --new src \
        --rounds 3 --repeats 5 --out benchmarks/found-s51.json
    taskset -c 0 python benchmarks/found-s51.py --memory --old /tmp/old-guard/src --new src

The harness is benchmarks/guard_s48.py's, as benchmarks/found_s50.py's (each round one process per salience tree, the
order turned every round, one thread; each process times its units interleaved in a rotating order, per call,
``time.thread_time``, the median of its repeats). Models, random weights, eval mode: ``table`` a small CNN (conv 3->8,
ReLU, mean pool, linear 8->10; 32 px, one image) holding a 100 MiB float tensor (``self.table``, 26,214,400 floats) its
forward reads (``self.table[:10]`` added to the logits) and never writes; ``plain`` the same without the table;
``r50`` torchvision's resnet50, ``script_r18`` ``torch.jit.script`` of its resnet18. The units:

- ``sg_table`` / ``sg_plain``: ``salience.smoothgrad(model, x, 1, samples=4)``, a call;
- ``ig_table`` / ``ig_plain``: ``salience.integrated_gradients(model, x, 1, steps=4)``, a call;
- ``found_table``: ``Found(model)`` and its exit, the record once a call;
- ``guard_r50`` / ``guard_script_r18``: ``with model_guard(model): pass``, the guard alone per call.

``--memory``: one fresh process per tree, the resident set (``/proc/self/statm``) after building the table model,
then after each of 3 SmoothGrad calls, and the peak (``ru_maxrss``), MiB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guard_s48  # noqa: E402 - the harness

CPU = "AMD EPYC (AVX2, no AVX512), core 1, one thread"


def _models() -> tuple:
    import torch
    from torch import nn

    class Small(nn.Module):
        def __init__(self, table: bool) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)
            self.table = torch.randn(25 * 2 ** 20) if table else torch.zeros(10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3))) + self.table[:10]

    torch.manual_seed(0)
    return Small(True).eval(), Small(False).eval(), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def child(repeats: int) -> dict:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import torch
    import torchvision

    import salience
    from salience._core.guard import Found, model_guard

    torch.set_num_threads(1)
    table, plain, x = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r50 = torchvision.models.resnet50().eval()
        script = torch.jit.script(torchvision.models.resnet18().eval())

    def guard_only(m) -> None:
        with model_guard(m):
            pass

    def found_call(m) -> None:
        with Found(m):
            pass

    units = {
        "sg_table": (lambda: salience.smoothgrad(table, x, 1, samples=4), 3),
        "sg_plain": (lambda: salience.smoothgrad(plain, x, 1, samples=4), 3),
        "ig_table": (lambda: salience.integrated_gradients(table, x, 1, steps=4), 3),
        "ig_plain": (lambda: salience.integrated_gradients(plain, x, 1, steps=4), 3),
        "found_table": (lambda: found_call(table), 3),
        "guard_r50": (lambda: guard_only(r50), 20),
        "guard_script_r18": (lambda: guard_only(script), 20),
    }
    return guard_s48.timed(units, repeats, salience.__file__)


UNITS = ("sg_table", "sg_plain", "ig_table", "ig_plain", "found_table", "guard_r50", "guard_script_r18")


def memory_child() -> None:
    """The resident set after the model is built and after each of 3 SmoothGrad calls, and the peak (MiB)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import resource

    import torch

    import salience

    torch.set_num_threads(1)

    def rss() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

    table, _, x = _models()
    out = {"built": rss()}
    for i in range(3):
        salience.smoothgrad(table, x, 1, samples=4)
        out[f"after call {i + 1}"] = rss()
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["salience"] = str(Path(salience.__file__).resolve())
    print(json.dumps(out))


def memory(old: str, new: str) -> None:
    for name, tree in (("old", old), ("new", new)):
        env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
        got = subprocess.run([sys.executable, __file__, "--memory-child"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        print(name, got)


if __name__ == "__main__":
    if "--memory-child" in sys.argv:
        memory_child()
    elif "--memory" in sys.argv:
        memory(sys.argv[sys.argv.index("--old") + 1], sys.argv[sys.argv.index("--new") + 1])
    else:
        rc = guard_s48.main(__file__, child, UNITS, __doc__)
        if "--out" in sys.argv and "--child" not in sys.argv:  # this session's CPU (the harness names session 48's)
            out = Path(sys.argv[sys.argv.index("--out") + 1])
            table = json.loads(out.read_text())
            table["cpu"] = CPU
            out.write_text(json.dumps(table, indent=1) + "\n")
        sys.exit(rc)
