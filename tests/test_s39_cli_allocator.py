"""The command line owns its process: ``salience explain`` and ``salience evaluate`` run with ``allocator="reuse"``
unless ``--allocator default`` says otherwise (docs/cli.md, docs/performance.md session 39); the library's default and
:func:`salience.cli.main` called with an ``argv`` from a user's process are unchanged.

The property is read in the command's own process, after the command: glibc's thresholds are the process's, so a
fresh process runs ``main()`` as the ``salience`` script does (``sys.argv``, no ``argv``), then writes and frees eight
24 MiB blocks three times and counts the minor page faults (``getrusage``) and the
resident memory (``/proc/self/statm``). Under the option the blocks stay resident and the later rounds fault (almost)
never. With glibc as it is every round faults them in again whatever the command freed before: a block is mapped
afresh unless glibc's dynamic mmap threshold was raised past it, and then the heap's free top (192 MiB) passes its
trim threshold (at most 64 MiB: twice the highest mmap threshold) and is given back (49,152 faults a round with 4
KiB pages; fewer with huge pages: so the counts of the two processes are compared, not fixed)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from salience._core import perf as _perf

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = r"""
import ctypes, json, os, resource, sys
from salience.cli import main
sys.argv = ["salience", *sys.argv[1:]]
rc = main()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N, PAGE = 24 << 20, os.sysconf("SC_PAGE_SIZE")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * PAGE

def probe():  # eight blocks written, then freed: (faults, resident bytes gained)
    f0, r0 = faults(), rss()
    blocks = [libc.malloc(N) for _ in range(8)]
    [ctypes.memset(b, 1, N) for b in blocks]
    [libc.free(b) for b in reversed(blocks)]
    return faults() - f0, rss() - r0

print(json.dumps({"rc": rc, "rounds": [probe() for _ in range(3)]}))
"""

MIB = 1 << 20
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


def _commands(tmp_path, *commands: list[str]) -> list[dict]:
    """Each command line run as the ``salience`` command in a process of its own (at once), then the probe."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    # glibc's settings from the environment left out (a user's MALLOC_ARENA_MAX, a CI's tunables): glibc as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")  # this tree's salience, not the installed
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, *c], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    got = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        got.append(json.loads(stdout.strip().splitlines()[-1]))
    return got


@glibc_only
def test_explain_runs_under_reuse_and_allocator_default_opts_out(tmp_path):
    explain = ["explain", "a.png", "--model", "demo:shapes", "--method", "vanilla", "--out", "out"]
    reuse, plain = _commands(tmp_path, explain, [*explain[:-1], "out2", "--allocator", "default"])
    assert reuse["rc"] == 0 and plain["rc"] == 0, (reuse, plain)
    # --allocator default: every round's blocks faulted in and given back, but for the free top glibc keeps under its
    # trim threshold (at most 64 MiB; since session 48 the default raises the dynamic threshold to just under 32 MiB
    # before the first CPU pass, so 48 MiB of the 192 stay: tests/test_s48_heap.py)
    assert all(f > 0 and r <= 64 * MIB for f, r in plain["rounds"]), plain
    # the command's own default: kept resident from the first round on, the later rounds fault (almost) never
    assert reuse["rounds"][0][1] > 160 * MIB, reuse
    least = min(f for f, _ in plain["rounds"])
    assert all(f <= least // 8 and abs(r) < 32 * MIB for f, r in reuse["rounds"][1:]), (reuse, plain)


def test_only_explain_and_evaluate_of_an_owned_process_default_to_reuse(monkeypatch, tmp_path):
    """In this process (``main`` given an ``argv``, as a user's code calls it) nothing is set unless asked;
    ``owns_process=True`` (what ``main()`` with no ``argv`` means) sets it for explain and evaluate, not for
    visualize; ``--allocator default`` opts out; the settings are back to the library's after each command."""
    from PIL import Image

    from salience.cli import main

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    calls = []
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: calls.append(1))
    explain = ["explain", str(tmp_path / "a.png"), "--model", "demo:shapes", "--method", "vanilla", "--out",
               str(tmp_path / "out")]
    evaluate = ["evaluate", "--model", "demo:shapes", "--n", "2", "--method", "vanilla", "--deletion-steps", "2",
                "--out", str(tmp_path / "ev")]
    visualize = ["visualize", "--model", "demo:shapes", "--target", "0", "--steps", "2", "--out",
                 str(tmp_path / "v.png")]
    for argv, owns, expected in ((explain, None, False), (explain, True, True), (evaluate, True, True),
                                 ([*explain, "--allocator", "default"], True, False), (visualize, True, False)):
        calls.clear()
        assert main(argv, owns_process=owns) == 0, argv
        assert bool(calls) is expected, (argv, owns)
        assert _perf.current() == _perf.Performance()


def test_elsewhere_than_glibc_the_command_does_not_default_to_an_option_that_would_warn(monkeypatch, tmp_path):
    """On macOS, Windows or musl ``allocator="reuse"`` does nothing and says so: as the command's own default it
    made every CPU ``salience explain`` print a warning about an option the user never set. There the command
    keeps the C allocator as it is, silently; ``--allocator reuse`` asked for still warns."""
    import warnings

    from PIL import Image

    from salience._core import malloc
    from salience.cli import common

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    monkeypatch.setattr(malloc, "_glibc", lambda: (None, "Darwin with a C library other than glibc"))
    monkeypatch.setattr(malloc, "_done", False)
    args = common.argparse.Namespace(command="explain", allocator=None)
    with common.performance_from_args(args, owns_process=True):
        assert _perf.current().allocator == "default"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with common.performance_from_args(common.argparse.Namespace(command="explain", allocator="reuse")):
            assert _perf.current().allocator == "reuse"
            malloc.keep_freed_memory()
    assert any("does nothing here" in str(w.message) for w in seen)
