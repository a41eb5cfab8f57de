"""Session 48's review of ``malloc.raise_dynamic_threshold`` (``allocator="default"``, on by default).

Two defects, each test failing on the merged code (b2db0e7) and passing after the fix:

- a fork while another thread was inside the lever (a process's first CPU pass: ``ctypes.CDLL(None)``, a 32 MiB
  ``malloc`` and ``free`` under ``malloc._lock``) gave the child a copy of the lock held by a thread it does not have:
  the child's first CPU pass (``perf.before_pass`` -> the lever) waited on it forever. The lock is now made anew in a
  forked child (``os.register_at_fork``).
- a dataset run's forked decoding worker gave back the free heap it shares with the run's process only under
  ``allocator="reuse"``; under the default the process holds much free heap too (free chunks below live ones, and
  the lever's 64 MiB trim threshold keeps up to that much free top): resnet50 at 224 px, SmoothGrad 16, a forked
  child's private dirty memory after the parent's next 3 calls 734-814 MiB (lever off) / 828-892 (on) / 94 (on,
  released; benchmarks/heap-fork-s48.txt).
  ``release_shared_heap`` now trims through the process's own glibc the lever found.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from salience._core import malloc as _malloc

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")
forks = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")

# the module alone (no torch), loaded from its file as in tests/test_s48_heap.py
LOAD = r"""
import importlib.util, json, os, signal, sys, threading
spec = importlib.util.spec_from_file_location("salience_malloc", sys.argv[1])
malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
"""

# a thread inside the lever (held at its mallinfo look-up, so inside the lock) while the main thread forks; the child
# (its own alarm: 10 s) then runs the lever as its first CPU pass would, and keep_freed_memory
FORK_INSIDE = LOAD + r"""
inside, go = threading.Event(), threading.Event()
real = malloc._info_function

def held(libc):
    inside.set()
    go.wait(30)
    return real(libc)

malloc._info_function = held
t = threading.Thread(target=malloc.raise_dynamic_threshold)
t.start()
assert inside.wait(30)
pid = os.fork()
if pid == 0:
    signal.alarm(10)
    malloc._info_function = real
    again = malloc.raise_dynamic_threshold()  # once per process: the parent's try counts, nothing more is done
    malloc.keep_freed_memory()
    os._exit(0 if again is False else 3)
go.set()
t.join()
_, status = os.waitpid(pid, 0)
print(json.dumps({"child": os.waitstatus_to_exitcode(status), "parent_raised": malloc._raised}))
"""


@forks
def test_a_fork_while_another_thread_is_inside_the_lever_leaves_the_child_a_lock_it_can_take():
    """The child returns at once (exit 0) from the lever and from ``keep_freed_memory``; on the merged code it waited
    on the lock its parent's thread held at the fork until its alarm killed it (exit -14, SIGALRM)."""
    out = subprocess.run([sys.executable, "-c", FORK_INSIDE, _malloc.__file__], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["child"] == 0, got


# under the default: the lever, then 128 MiB of heap blocks written and freed below a live block (the heap's top is
# not free, so no trim threshold gives them back), then the release a forked worker runs as it starts
KEPT = LOAD + r"""
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

raised = malloc.raise_dynamic_threshold()
blocks = [bytearray(8 << 20) for _ in range(16)]  # under the raised 32 MiB threshold: heap blocks, touched
for b in blocks:
    b[::4096] = b"\x01" * len(b[::4096])
del b
held = bytearray(1 << 20)
blocks.clear()
kept = rss()
released = malloc.release_shared_heap()
print(json.dumps({"raised": raised, "kept": kept, "after": rss(), "released": released}))
"""


@glibc_only
def test_under_the_default_a_forked_workers_release_gives_the_free_heap_back():
    """128 MiB freed under the default's raised threshold stay resident (a live block above them); the release gives
    at least 100 MiB back (on the merged code it did nothing unless ``allocator="reuse"`` had fixed the
    thresholds: ``False``, 0 given back)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", KEPT, _malloc.__file__], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["raised"] is True, got
    assert got["released"] is True and got["kept"] - got["after"] >= 100 << 20, got


def test_the_release_under_the_default_needs_the_glibc_the_lever_found(monkeypatch):
    """Where the lever found no glibc (macOS, musl, a sandbox without ``dlopen``, a glibc without ``malloc_trim``:
    ``_own_trim`` stays ``None``) and no thresholds were fixed, the release does nothing and says so."""
    monkeypatch.setattr(_malloc, "_fixed", False)
    monkeypatch.setattr(_malloc, "_own_trim", None)
    assert _malloc.release_shared_heap() is False
