"""Runs on the Ray cluster salience starts itself (no ``address=``, no ``ray.init()`` of the caller's), old code
against new (session 55, helper raykeep55): old shuts the cluster down at each run's end, new keeps it for the
process (``salience.runs.shutdown_ray()``, or the exit). Each round runs, for each code (alternating which goes
first), one fresh process (``PYTHONPATH`` the code's ``src``) that makes tests/test_runs_ray.py's run (demo:shapes,
20 PNG images, vanilla and Grad-CAM, top 2, shards of 8, batches of 4; benchmarks/ray-run-cost-s53.py's ``_run``)
three times, and records:

- ``import``: ``import ray, torch, salience``;
- ``run 1``, ``run 2``, ``run 3``: each run's wall clock (old: each starts and shuts down a cluster; new: run 1
  starts it, runs 2 and 3 find it);
- ``shutdown_ray`` (new only): the call that shuts salience's cluster down;
- ``process``: the whole child process, from its start to its exit (the interpreter's exit hooks included), as
  the parent sees it.

Run under the lock, on one core::

    flock /tmp/bench.lock taskset -c 1 python benchmarks/ray-run-cost-s55.py --old OLD/src --new src --rounds 3 \\
        --json benchmarks/ray-run-cost-s55.json

Seconds of wall clock; min / median / max over the rounds, and each round's figures in the json."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _module(name: str) -> Any:
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), HERE.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child() -> dict:
    """One process's figures (see the module's docstring)."""
    t0 = time.perf_counter()
    importlib.import_module("ray")
    import torch

    import salience

    torch.set_num_threads(1)
    out = {"import": time.perf_counter() - t0}
    root = Path(tempfile.mkdtemp())
    s53 = _module("ray-run-cost-s53")
    folder = s53._images(root)
    for k in (1, 2, 3):
        out[f"run {k}"] = s53._run(folder, root / f"r{k}", "ray")
    stop = getattr(salience.runs, "shutdown_ray", None)
    if stop is not None:
        start = time.perf_counter()
        stop()
        out["shutdown_ray"] = time.perf_counter() - start
    return out


def _spawn(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE), "--child"], env=env, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"{src} failed:\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "process": took}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child()))
        return
    load = os.getloadavg()
    rounds = []
    for k in range(a.rounds):
        order = [("old", a.old), ("new", a.new)][:: 1 if k % 2 == 0 else -1]
        got = {name: _spawn(src) for name, src in order}
        rounds.append(got)
        print(f"round {k}: {json.dumps(got)}", flush=True)
    s54 = _module("ray-run-cost-s54")
    result = {"load_before": load, "load_after": os.getloadavg(), "cpu": s54._cpu(), "rounds": rounds}
    print(_table(rounds))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


def _table(rounds: list) -> str:
    """Markdown rows: each (code, step) with min / median / max over the rounds."""
    lines = ["| code | step | min s | median s | max s |", "|---|---|---|---|---|"]
    for name in ("old", "new"):
        for step in rounds[0][name]:
            v = [r[name][step] for r in rounds]
            lines.append(f"| {name} | {step} | {min(v):.2f} | {statistics.median(v):.2f} | {max(v):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
