"""Session 48 (octrace): occlusion of resnet18 at 64 px, 2 images, cold and warm, and a warm call after a user call,
this worktree's code against another ``src`` (main's: ``git -C /work/main archive HEAD src``), interleaved rounds in
fresh worker processes; also ``fingerprint.structure`` on resnet18 and resnet50 (the weak references it now takes).

    flock /tmp/bench.lock taskset -c 1 python benchmarks/octrace_s48.py --old-src /tmp/old-octrace/src --rounds 5 \\
        --out benchmarks/octrace-s48

Writes ``OUT.json`` (every sample) and ``OUT.md`` (min / median / max per setup)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = str(HERE.parent / "src")


def worker() -> None:
    import warnings

    import torch
    import torchvision

    import salience
    from salience._core import fingerprint

    torch.set_num_threads(1)
    out: dict = {"salience": salience.__file__}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def call() -> float:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            salience.occlusion(model, x, 1, window=8, stride=8)
        return time.perf_counter() - t

    out["cold"] = call()
    out["warm"] = [call() for _ in range(3)]
    after = []
    for _ in range(3):
        with torch.no_grad():
            model(x)  # the user's call between two of salience's
        after.append(call())
    out["after_user_call"] = after
    for name, make in (("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)):
        m = make().eval()
        fingerprint.structure(m)
        t = time.perf_counter()
        for _ in range(300):
            fingerprint.structure(m)
        out[f"structure_{name}_us"] = (time.perf_counter() - t) / 300 * 1e6
        t = time.perf_counter()
        for _ in range(300):
            fingerprint._fold_key(m)
        out[f"fold_key_{name}_us"] = (time.perf_counter() - t) / 300 * 1e6
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    load = os.getloadavg()
    runs: dict = {"new": [], "old": []}
    for r in range(a.rounds):
        order = ("new", "old") if r % 2 == 0 else ("old", "new")
        for setup in order:
            src = NEW_SRC if setup == "new" else a.old_src
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            got = subprocess.run([sys.executable, __file__, "--worker"], env=env, check=True, capture_output=True,
                                 text=True)
            runs[setup].append(json.loads(got.stdout.strip().splitlines()[-1]))
    result = {"command": " ".join(["python"] + sys.argv), "cpu": _cpu(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": load, "loadavg_end": os.getloadavg(), "old_src": a.old_src, "runs": runs}
    Path(a.out + ".json").write_text(json.dumps(result, indent=1))
    rows = ["| setup | what | min | median | max |", "|---|---|---|---|---|"]
    for what, unit, pick in (("cold call", "s", lambda o: [o["cold"]]), ("warm call", "s", lambda o: o["warm"]),
                             ("warm call after a user call", "s", lambda o: o["after_user_call"]),
                             ("structure resnet18", "us", lambda o: [o["structure_resnet18_us"]]),
                             ("structure resnet50", "us", lambda o: [o["structure_resnet50_us"]]),
                             ("_fold_key resnet18", "us", lambda o: [o["fold_key_resnet18_us"]]),
                             ("_fold_key resnet50", "us", lambda o: [o["fold_key_resnet50_us"]])):
        for setup in ("old", "new"):
            per_round = [statistics.median(pick(o)) for o in runs[setup]]
            f = (lambda v: f"{v:.4f}") if unit == "s" else (lambda v: f"{v:.1f}")
            rows.append(f"| {setup} | {what} ({unit}, median of a round) | {f(min(per_round))} | "
                        f"{f(statistics.median(per_round))} | {f(max(per_round))} |")
    text = (f"{result['command']}\n\nCPU {result['cpu']}, core(s) {result['affinity']}, load {load} -> "
            f"{result['loadavg_end']}, {a.rounds} interleaved rounds\n\n" + "\n".join(rows) + "\n")
    Path(a.out + ".md").write_text(text)
    print(text)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    worker() if "--worker" in sys.argv else main()
