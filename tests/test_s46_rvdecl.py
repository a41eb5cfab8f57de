"""Review of session 46's chunk rule (wt-declines-s46: ``engine.gradient_chunk_cap`` / ``engine.weight_bytes``).

The rule picks a CPU gradient pass's size from the memory probe's bytes per item and the model's parameter bytes:
numbers that must be the same in every process, so that a seeded call gives the same bits in two fresh processes
(not only cold and warm in one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from salience._core import engine as _engine

_SCRIPT = textwrap.dedent("""
    import hashlib, json, torch, torchvision, salience
    from salience._core import engine as E
    seen = []
    real = E.accumulate
    def kept(*a, **k):
        seen.append(real(*a, **k)); return seen[-1]
    E.accumulate = kept
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    maps = [salience.integrated_gradients(model, x, 7, steps=32, reduce=None) for _ in range(2)]
    print(json.dumps({"chunks": [s.chunks for s in seen],
                      "bits": [hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in maps]}))
""")


def _fresh() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_fresh_processes_plan_the_same_chunks_and_give_the_same_bits():
    """resnet18 at 64 px, integrated gradients' 32 steps of one image, cold then warm, in two fresh processes: one chunk
    of 32 (the rule's) in all four calls, and the same bits in all four."""
    a, b = _fresh(), _fresh()
    assert a["chunks"] == b["chunks"] == [[32], [32]], (a, b)
    assert len(set(a["bits"] + b["bits"])) == 1, (a, b)


def test_a_model_without_parameters_keeps_16():
    """No parameters: 0 bytes, never 8 items' worth (the probe's bytes per item are at least 1): 16 where the items are
    not small (4 MiB), no division; items of 1 byte: the small-pass rule's 64 (session 60)."""
    assert _engine.weight_bytes(torch.nn.ReLU()) == 0
    assert _engine.gradient_chunk_cap(4 << 20, 0) == _engine.CPU_GRADIENT_CHUNK
    assert _engine.gradient_chunk_cap(1, 0) == _engine.CPU_GRADIENT_CHUNK_SMALL


# ---- benchmarks/engine_speed.py --bare-items (wt-sgig-s46): a scaled peer must time what its name says


def test_a_reduced_precision_peer_is_scaled_from_the_items_it_ran(monkeypatch):
    """--modes bf16 adds the peer "bare B bf16"; with --bare-items K every peer's time is multiplied by items / K, so
    that peer must run the first K items too (old code: it ran all 32 items and its time was still multiplied by 4)."""
    import test_s46_sgig as _sgig

    job, calls = _sgig._run_job(monkeypatch, "integrated_gradients", 4, modes=["contiguous", "bf16"],
                                bare=[4, 8], bare_items=8)
    t = job["times_s"]
    assert "bare 4 bf16" in t
    # every bare call ran 8 items (what the 4x scaling assumes), so every scaled peer reads 4 s
    assert {n for n, _ in calls} == {8}, calls
    assert t["bare 4 bf16"] == t["bare 4"] == [4.0, 4.0]


def test_a_peer_larger_than_k_times_passes_of_its_own_size(monkeypatch):
    """--bare 16 32 --bare-items 8 on 32 items: "bare 32" must time one pass of 32 items (scaled by 1), "bare 16" two
    of 16 (scaled by 2); old code ran both on the first 8 items, one pass of 8 each, and labelled it 16 and 32."""
    import test_s46_sgig as _sgig

    job, calls = _sgig._run_job(monkeypatch, "integrated_gradients", 4, bare=[16, 32], bare_items=8)
    t = job["times_s"]
    ran = {p: n for n, p in calls}
    assert ran[32] == 32 and ran[16] == 16 and ran[4] == 8, calls
    assert t["bare 32"] == [1.0, 1.0] and t["bare 16"] == [2.0, 2.0] and t["bare 4"] == [4.0, 4.0]


def test_a_sparse_parameter_counts_the_bytes_it_holds():
    """A sparse parameter's bytes are its values' and indices' (what a pass reads), not its dense shape's: a COO
    identity of 2,000 x 2,000 holds 2,000 float32 values and 2 x 2,000 int64 indices, 40,000 bytes (old code: 4 x 4 M,
    16 MB); a CSR one 2,000 values, 2,001 row pointers and 2,000 column indices, 40,008 bytes."""
    eye = torch.eye(2000)
    coo = torch.nn.Module()
    coo.w = torch.nn.Parameter(eye.to_sparse())
    assert _engine.weight_bytes(coo) == 2000 * 4 + 2 * 2000 * 8
    csr = torch.nn.Module()
    csr.w = torch.nn.Parameter(eye.to_sparse_csr())
    assert _engine.weight_bytes(csr) == 2000 * 4 + 2001 * 8 + 2000 * 8
    # beside a dense layer: both counted
    both = torch.nn.Sequential(torch.nn.Linear(10, 10))
    both.w = torch.nn.Parameter(eye.to_sparse())
    assert _engine.weight_bytes(both) == 4 * 110 + 40_000
