"""``set_performance(allocator="default")`` after ``allocator="reuse"`` fixed glibc's thresholds: ``mallopt`` has no
way back, so the call changed what ``current()`` says and nothing else, without a word (docs/performance.md said
so). Now the call warns that the process keeps the setting and to start a new process for the C allocator as it
is. A warning, not a SalienceError: the call still sets the options it names, and ``set_performance(**vars(prev))``
must go on restoring the others.

Read in a fresh process (the setting cannot be undone), as tests/test_malloc.py does: the warning comes only once the
thresholds were set (a CPU pass under the option), only from a setter that turns ``reuse`` into ``default`` (a
dataset run's ``performance(**vars(current()))`` names ``default`` without switching anything); and what it says is
true: after it, blocks a pass frees are still kept (no page faults on the next round)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = r"""
import ctypes, json, resource, warnings
import torch
import salience
from salience._core import malloc, perf

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 24 << 20

def faults():
    out = []
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(N) for _ in range(2)]
        for b in blocks:
            ctypes.memset(b, 1, N)
        for b in reversed(blocks):
            libc.free(b)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out

def said(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message) for x in w]

out = {}
prev = salience.set_performance(allocator="reuse")
out["before_a_pass"] = said(lambda: salience.set_performance(**vars(prev)))  # nothing set yet: nothing to say
salience.set_performance(allocator="reuse")
salience.vanilla(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.rand(1, 3, 2, 2), 0)
out["fixed"] = malloc.thresholds_fixed()
def in_a_run():
    with perf.performance(**vars(perf.current())):  # a dataset run's block: reuse stays reuse
        pass
out["same_setting"] = said(in_a_run) + said(lambda: salience.set_performance(allocator="reuse"))
out["undo"] = said(lambda: salience.set_performance(**vars(prev)))
out["now"] = perf.current().allocator
def block():
    salience.set_performance(allocator="reuse")
    with salience.performance(allocator="default"):
        pass
out["block"] = said(block)
out["faults_after"] = faults()
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_default_after_reuse_says_the_process_keeps_glibcs_thresholds():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["before_a_pass"] == [] and got["same_setting"] == [], got
    assert got["fixed"] is True and got["now"] == "default", got
    for said in (got["undo"], got["block"]):
        assert len(said) == 1, got
        assert "allocator='default' cannot undo allocator='reuse' in this process" in said[0], said
        assert "start a new Python process" in said[0], said
    assert max(got["faults_after"][1:]) < 100, got  # what it says: the freed blocks are still kept (4 KiB: ~12,288)
