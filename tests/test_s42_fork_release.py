"""A dataset run's forked decoding worker gives back the heap's free pages it shares with the run (issue 17, session 42).

Under ``allocator="reuse"`` the process keeps the activations its passes free; a worker forked from it shares that
heap copy-on-write for the run, and each page of it the next passes write is copied at a fault (the bf16 run's
258,638 faults a round against the bare passes' 18,656 in ``dataset-s41-bf16-reuse-1thread.md``: with ``workers=0``
the same run faults as the bare passes). ``salience._core.malloc.release_shared_heap`` (glibc's ``malloc_trim``)
runs in each forked worker as it starts, so the run's writes find those pages its own (no copy); the maps are the
same bits."""
from __future__ import annotations

import json
import multiprocessing
import platform
import subprocess
import sys

import numpy as np
import pytest

import salience
import salience.runs.dataset as run_dataset
from salience._core import malloc as _malloc
from test_s40_run_bf16 import images, net

KW = dict(batch_size=2, shard_size=2, target=1, model_spec="net3", overwrite=True)
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")
forking = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods()
                             or multiprocessing.get_all_start_methods()[0] != "fork", reason="workers that fork")


@forking
def test_a_runs_forked_worker_releases_the_shared_heap_before_decoding_and_the_bits_stay(tmp_path, monkeypatch):
    """workers=1: the release runs once a run, in the worker (another process, before its first batch's decoding),
    then the worker's own start (``sources.worker_init``, which it wraps); workers=0 (nothing forked): none. The
    maps equal those of a run whose worker releases nothing."""
    import os

    log = tmp_path / "calls.txt"

    def recording() -> bool:
        with open(log, "a") as f:
            f.write(f"release {os.getpid()}\n")
        return _malloc.release_shared_heap()

    def init(_: int) -> None:
        with open(log, "a") as f:
            f.write(f"init {os.getpid()}\n")

    monkeypatch.setattr(_malloc, "_fixed", True)  # as after allocator="reuse" (glibc's thresholds not touched)
    monkeypatch.setattr(run_dataset, "release_shared_heap", recording, raising=False)
    monkeypatch.setattr(run_dataset.sources, "worker_init", init)
    files = images(tmp_path / "imgs", n=4)
    model = net()
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "w1", workers=1, **KW)
    lines = log.read_text().split() if log.exists() else []
    assert lines[0::2] == ["release", "init"], lines
    assert lines[1] == lines[3] != str(os.getpid())
    log.unlink()
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "w0", workers=0, **KW)
    assert not log.exists()
    monkeypatch.setattr(run_dataset, "release_shared_heap", lambda: False, raising=False)
    salience.explain_dataset(model, files, ["vanilla"], tmp_path / "none", workers=1, **KW)
    runs = [salience.open_run(tmp_path / k) for k in ("w1", "w0", "none")]
    for i in range(4):
        first = runs[0].map(i, "vanilla")
        for other in runs[1:]:
            assert np.array_equal(first, other.map(i, "vanilla")), i


def test_release_acts_only_where_reuse_fixed_glibcs_thresholds(monkeypatch):
    """Nothing to give back unless ``keep_freed_memory`` fixed the thresholds (or, since session 48's review, the
    default's lever found glibc: ``_own_trim``, tests/test_s48_rvheap.py); elsewhere than glibc nothing, no raise."""
    monkeypatch.setattr(_malloc, "_fixed", False)
    monkeypatch.setattr(_malloc, "_own_trim", None)  # the default's lever found no glibc (or never ran)
    assert _malloc.release_shared_heap() is False
    monkeypatch.setattr(_malloc, "_fixed", True)
    monkeypatch.setattr(_malloc, "_glibc", lambda: (None, "macOS"))
    monkeypatch.setattr(_malloc, "_libc", None)  # keep_freed_memory found no glibc (its C library is kept)
    assert _malloc.release_shared_heap() is False
    monkeypatch.setattr(_malloc, "_libc", object())  # a C library without malloc_trim
    assert _malloc.release_shared_heap() is False


SCRIPT = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("m", sys.argv[1]); malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
malloc.keep_freed_memory()
blocks = [bytearray(8 << 20) for _ in range(16)]  # 128 MiB in heap blocks (under the 32 MiB threshold), touched
for b in blocks:
    b[::4096] = b"\x01" * len(b[::4096])
del b
held = bytearray(1 << 20)  # a block above the freed ones: the heap's top is not free, so only malloc_trim gives back
blocks.clear()
kept = rss()
released = malloc.release_shared_heap()
print(json.dumps({"kept": kept, "after": rss(), "released": released}))
"""


@glibc_only
def test_release_gives_the_kept_heap_pages_back():
    """128 MiB freed under the fixed thresholds stay resident (the heap's top held by a live block); the release
    gives at least 100 MiB of them back."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, _malloc.__file__], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["released"] is True
    assert got["kept"] - got["after"] >= 100 << 20, got
