"""What a dataset run on the Ray engine costs, old code against new (session 54, helper raycost54), and where a
run's time goes. Each round runs, for each code (alternating which goes first), fresh processes (``PYTHONPATH`` the
code's ``src``) that make tests/test_runs_ray.py's run (demo:shapes, 20 PNG images, vanilla and Grad-CAM, top 2,
shards of 8, batches of 4) twice:

- ``caller``: on a cluster the process started itself (``ray.init(num_cpus=2)``, kept between runs, as a notebook
  that calls ``ray.init()`` once, and tests/test_runs_ray.py's fixture): the import, ``ray.init``, run 1, run 2,
  the same run on the local engine, ``ray.shutdown``;
- ``salience``: on the cluster salience starts for each run (no ``ray.init`` of the caller's: each run starts one
  and its end shuts it down): run 1, run 2.

``--phases`` adds, once, the parts of a run measured apart on a kept cluster of the new code's process: Ray Data's
pipeline of 20 rows through a trivial function in tasks (first and second time) and through a trivial class in a
pool of one actor (which imports torch and salience in its ``__init__``: each time a new process), and a fresh
Python's ``import torch, salience``.

Run under the lock, on one core::

    flock /tmp/bench.lock taskset -c 1 python benchmarks/ray-run-cost-s54.py --old OLD/src --new src --rounds 3 \
        --phases --json benchmarks/ray-run-cost-s54.json

Seconds of wall clock; min / median / max over the rounds."""
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


def _s53() -> Any:
    """benchmarks/ray-run-cost-s53.py as a module: its ``_images`` (the 20 PNG files) and ``_run`` (the run, timed)."""
    spec = importlib.util.spec_from_file_location("ray_run_cost_s53", HERE.with_name("ray-run-cost-s53.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(mode: str) -> dict:
    """One process's figures (``mode``: ``caller`` or ``salience``, see the module's docstring)."""
    t0 = time.perf_counter()
    import ray
    import torch

    import salience

    torch.set_num_threads(1)
    assert salience.explain_dataset
    out = {"import": time.perf_counter() - t0}
    root = Path(tempfile.mkdtemp())
    s53 = _s53()
    _run, folder = s53._run, s53._images(root)
    if mode == "caller":
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        out["ray.init"] = time.perf_counter() - start
    out["run 1"] = _run(folder, root / "r1", "ray")
    out["run 2"] = _run(folder, root / "r2", "ray")
    if mode == "caller":
        out["local engine"] = _run(folder, root / "local", "local")
        start = time.perf_counter()
        ray.shutdown()
        out["ray.shutdown"] = time.perf_counter() - start
    return out


def phases() -> dict:
    """The parts of a run measured apart (see the module's docstring)."""
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    out = {}
    for name, actor in (("ray data, tasks, 1st", False), ("ray data, tasks, 2nd", False),
                        ("ray data, actor pool, 1st", True), ("ray data, actor pool, 2nd", True)):
        start = time.perf_counter()
        ds = ray.data.from_items([{"i": i} for i in range(20)])
        if actor:
            ds = ds.map_batches(_Imports, batch_size=4, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
        else:
            ds = ds.map_batches(_imports, batch_size=4, num_cpus=1)
        assert sum(len(b["i"]) for b in ds.iter_batches(batch_size=None)) == 20
        out[name] = time.perf_counter() - start
    ray.shutdown()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, salience"], check=True)
    out["fresh python: import torch, salience"] = time.perf_counter() - start
    return out


def _imports(batch: dict) -> dict:
    """A task's work: torch and salience imported (once per worker process)."""
    import importlib

    for name in ("torch", "salience"):
        importlib.import_module(name)
    return batch


class _Imports:
    """An actor's work: torch and salience imported in its ``__init__`` (a new process each pool)."""

    def __init__(self):
        _imports({})

    def __call__(self, batch: dict) -> dict:
        return batch


def _spawn(src: str, what: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE), "--child", what], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode:
        raise SystemExit(f"{what} on {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(phases() if a.child == "phases" else child(a.child)))
        return
    load = os.getloadavg()
    rounds = []
    for k in range(a.rounds):
        order = [("old", a.old), ("new", a.new)][:: 1 if k % 2 == 0 else -1]
        got = {f"{name} {mode}": _spawn(src, mode) for mode in ("caller", "salience") for name, src in order}
        rounds.append(got)
        print(f"round {k}: {json.dumps(got)}", flush=True)
    result = {"load_before": load, "cpu": _cpu(), "rounds": rounds}
    if a.phases:
        result["phases"] = _spawn(a.new, "phases")
        print(f"phases: {json.dumps(result['phases'])}", flush=True)
    print(_table(rounds))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def _table(rounds: list) -> str:
    """Markdown rows: each (code, cluster, step) with min / median / max over the rounds."""
    lines = ["| code | cluster | step | min s | median s | max s |", "|---|---|---|---|---|---|"]
    for key in rounds[0]:
        for step in rounds[0][key]:
            v = [r[key][step] for r in rounds]
            name, mode = key.split()
            lines.append(f"| {name} | {mode} | {step} | {min(v):.2f} | {statistics.median(v):.2f} | {max(v):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
