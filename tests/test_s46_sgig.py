"""Session 46, issue 16's SmoothGrad / IG table: engine_speed's bare peers of any size (``--bare``), timed on the
first K items and scaled to the call's items (``--bare-items``)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _engine_speed():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("engine_speed_s46_test", BENCH / "engine_speed.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _args(**kw) -> argparse.Namespace:
    base = dict(samples=4, steps=8, modes=["contiguous"], check=False, warmup=0, rounds=2, repeats=1,
                bare=None, bare_items=0)
    base.update(kw)
    return argparse.Namespace(**base)


def _run_job(monkeypatch, method: str, images: int, **kw):
    """``_job`` on a small CNN with every timed call taking 1 s (``_timed`` replaced): returns the job and the
    ``(items, per_pass)`` of every bare call."""
    es = _engine_speed()
    calls = []

    def fake_bare(model, items, target, per_pass, dtype=None):
        assert items.shape[0] == target.shape[0]
        calls.append((items.shape[0], per_pass))

    monkeypatch.setattr(es, "bare", fake_bare)
    monkeypatch.setattr(es, "_timed", lambda fn, device: (1.0, None, fn()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(images, 3, 8, 8)
    return es._job(model, model, x, method, _args(**kw)), calls


def test_default_peers_are_b_and_8(monkeypatch):
    """Without --bare the peers are what they were: B and 8 items a pass, over all the items, unscaled."""
    job, calls = _run_job(monkeypatch, "smoothgrad", 2)  # 8 items
    assert sorted(k for k in job["times_s"] if k.startswith("bare")) == ["bare 2", "bare 8"]
    assert job["bare_items"] == 8 and all(n == 8 for n, _ in calls)
    assert job["times_s"]["bare 2"] == [1.0, 1.0]


def test_bare_sizes_scaled_from_k_items(monkeypatch):
    """--bare 1 4 8 16 32 --bare-items 8 on IG with 8 steps at 4 images (32 items): every peer of at most 8 items a
    pass runs the first 8 items only, B (4) among them, and its time is 32 / 8 times what it took; 16 and 32 (no
    larger than the items) run whole passes of their size, 16 and 32 items, scaled by 2 and 1 (review of session 46:
    they ran one pass of 8); salience's call is not scaled."""
    job, calls = _run_job(monkeypatch, "integrated_gradients", 4, bare=[1, 8, 16, 32], bare_items=8)
    t = job["times_s"]
    assert sorted((int(k.split()[1]) for k in t if k.startswith("bare"))) == [1, 4, 8, 16, 32]
    assert job["items"] == 32 and job["bare_items"] == 8
    assert {p: n for n, p in calls} == {1: 8, 4: 8, 8: 8, 16: 16, 32: 32}
    for k in ("bare 1", "bare 4", "bare 8"):
        assert t[k] == [4.0, 4.0]
    assert t["bare 16"] == [2.0, 2.0] and t["bare 32"] == [1.0, 1.0]
    assert t["contiguous"] == [1.0, 1.0]


def test_sizes_above_the_items_left_out(monkeypatch):
    """SmoothGrad 4 at one image is 4 items: a pass of 8, 16 or 32 cannot be made; B (1) always stays."""
    job, calls = _run_job(monkeypatch, "smoothgrad", 1, bare=[4, 8, 16, 32], bare_items=32)
    assert sorted(k for k in job["times_s"] if k.startswith("bare")) == ["bare 1", "bare 4"]
    assert job["bare_items"] == 4 and job["times_s"]["bare 4"] == [1.0, 1.0]
