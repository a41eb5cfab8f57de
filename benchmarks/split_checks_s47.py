"""Session 47 "split": the fixed cost of Ablation-CAM's clean-pass checks (scorecam._split_pays, _split_same,
_own_state + _state_moved) on resnet50, microseconds a call, 5 rounds of 200 calls each (min / median / max).

    flock /tmp/bench.lock taskset -c 1 /work/main/.venv/bin/python benchmarks/split_checks_s47.py

Since session 48 the state check is ``guard.state_changes`` (``_state_moved`` removed: the putback merge); the last
row times whichever the tree has, so the script runs on both (session 47's figures in docs/performance.md are of
``_state_moved``; benchmarks/guard_s48.py compares the two).
"""
import importlib
import statistics
import time

import torch
import torchvision

torch.set_num_threads(1)
sc = importlib.import_module("salience.methods.scorecam")
guard = importlib.import_module("salience._core.guard")
moved = getattr(sc, "_state_moved", None) or guard.state_changes  # session 47's name, or session 48's
model = torchvision.models.resnet50().eval()
mod = model.get_submodule("layer1.0.conv1")
checks = {
    "_split_pays": lambda: sc._split_pays(model, mod),
    "_split_same": lambda: sc._split_same(model),
    f"_own_state+{moved.__name__}": lambda: moved(sc._own_state(model)),
}
rounds: dict = {k: [] for k in checks}
for _ in range(5):
    for name, f in checks.items():  # interleaved
        t = time.perf_counter()
        for _ in range(200):
            f()
        rounds[name].append((time.perf_counter() - t) / 200 * 1e6)
for name, r in rounds.items():
    print(f"{name}: min {min(r):.1f} / median {statistics.median(r):.1f} / max {max(r):.1f} us")
