"""Session 44: a process's first CPU dataset run that keeps a large freed heap starts no forkserver (until then it
started one in the background for later runs: a process with one run, a notebook's, paid for a server it never used,
about 0.5 GB resident and 1.7 CPU s); its second such run starts it, the third uses it. Each in a fresh process: the
test process may have a forkserver running already."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import salience

HERE = Path(__file__).resolve().parent
PRELUDE = """
import json, torch
from multiprocessing import forkserver
import salience, salience.runs.dataset as d
d.kept_free_bytes = lambda: 1 << 30  # the process keeps 1 GiB of freed heap (allocator="reuse" after passes)
def server():
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None) is not None
"""


def _fresh(code: str) -> object:
    """The JSON that ``code`` prints, run after :data:`PRELUDE` in a fresh interpreter (this salience, these tests)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(salience.__file__).resolve().parents[1]), str(HERE)])}
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_first_run_starts_no_server_the_second_starts_it_the_third_uses_it():
    got = _fresh("""
cpu, seen = torch.device("cpu"), []
for _ in range(3):
    seen.append([d.loader_context(cpu, 1, [0]), server()])
print(json.dumps(seen))
""")
    # session 45: the second run uses the server it starts (it forked its own workers: a process with exactly two
    # such runs forked both, tests/test_s45_loose.py)
    assert got == [[None, False], ["forkserver", True], ["forkserver", True]]


def test_a_process_with_one_dataset_run_starts_no_forkserver(tmp_path):
    """One run over six files with a worker, the large heap stood in for: the worker forks (as before), and after the
    run no forkserver runs; the maps equal those of the run without workers."""
    got = _fresh(f"""
import numpy as np
from test_s40_run_bf16 import images, net
files, model = images(__import__("pathlib").Path({str(tmp_path)!r}) / "imgs", n=6), net()
kw = dict(batch_size=2, shard_size=2, target=1, model_spec="net3")
salience.explain_dataset(model, files, ["vanilla"], {str(tmp_path / "none")!r}, workers=0, **kw)
salience.explain_dataset(model, files, ["vanilla"], {str(tmp_path / "one")!r}, workers=1, **kw)
a, b = salience.open_run({str(tmp_path / "none")!r}), salience.open_run({str(tmp_path / "one")!r})
same = all(np.array_equal(a.map(i, "vanilla"), b.map(i, "vanilla")) for i in range(6))
print(json.dumps([server(), same]))
""")
    assert got == [False, True]
