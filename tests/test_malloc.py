"""``allocator="reuse"`` (salience._core.malloc): after it, glibc keeps the blocks a pass frees for the next pass,
where by default it gives them back and faults them in again (docs/performance.md, session 38).

The property is read in a fresh process (the setting cannot be undone), from the kernel's count of minor page faults
(``getrusage``) and the process's resident memory (``/proc/self/statm``): two blocks of 24 MiB (a resnet50 pass of 8
images at 224 px frees such activations) written and freed, three times, with glibc as it is, then three times
after :func:`keep_freed_memory`. As it is, glibc gives them back every round (about 12,288 faults a round with 4 KiB
pages, measured 12,256 to 12,291; about 24 with transparent huge pages, ``glibc.malloc.hugetlb=1``: so the fault
counts are compared, not fixed); with the option, the memory stays resident and the later rounds fault 0 times
(measured). Deterministic: glibc's thresholds depend only on the blocks the process freed, not on timing or load.
The process imports the module alone, not torch (salience's import took 20-30 s on a loaded CI core, twice); the
wiring from the option to :func:`keep_freed_memory` is the other tests'."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

import salience
from salience import SalienceError
from salience._core import malloc as _malloc
from salience._core import perf as _perf

SCRIPT = r"""
import ctypes, importlib.util, json, os, resource, sys
spec = importlib.util.spec_from_file_location("salience_malloc", sys.argv[1])
malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 24 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def rounds():
    out = []
    for _ in range(3):
        f0, r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, rss()
        blocks = [libc.malloc(N) for _ in range(2)]
        for b in blocks:
            ctypes.memset(b, 1, N)
        for b in reversed(blocks):
            libc.free(b)
        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, rss() - r0))
    return out

default = rounds()
done = malloc.keep_freed_memory()
print(json.dumps({"default": default, "set": done, "again": malloc.keep_freed_memory(), "reuse": rounds()}))
"""

MIB = 1 << 20
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")


def _rounds(tunables: str = "") -> dict:
    # glibc's settings from the environment left out (the user's MALLOC_ARENA_MAX, a CI's tunables): glibc as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", SCRIPT, _malloc.__file__], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# huge pages (as with transparent huge pages "always"): 2 MiB a fault, so a count of 4 KiB pages does not hold
@glibc_only
@pytest.mark.parametrize("tunables", ["", "glibc.malloc.hugetlb=1"])
def test_reuse_keeps_the_freed_blocks_for_the_next_pass(tunables):
    got = _rounds(tunables)
    assert got["set"] is True and got["again"] is False, got  # both thresholds set, once
    default, reuse = got["default"], got["reuse"]
    # as it is: every round's blocks are faulted in and given back
    assert all(f > 0 and r < 8 * MIB for f, r in default), got
    # with the option: kept resident from the first round on, and the later rounds fault (almost) never
    assert reuse[0][1] > 40 * MIB, got
    least = min(f for f, _ in default)
    assert all(f <= least // 8 and abs(r) < 8 * MIB for f, r in reuse[1:]), got


def test_allocator_option_is_checked_and_acts_only_when_asked(monkeypatch):
    with pytest.raises(SalienceError, match="allocator must be one of default, reuse"):
        salience.set_performance(allocator="jemalloc")
    assert _perf.current() == _perf.Performance()
    assert _perf.keep_freed_memory is _malloc.keep_freed_memory  # what the wiring below stands in for
    calls = []
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: calls.append(1))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.rand(1, 3, 6, 6)
    model(x)
    salience.smoothgrad(model, x, 0, samples=2)
    salience.vanilla(model, x, 0)
    salience.gradcam(model, x, 0)
    assert calls == []  # the default: the allocator left as it is
    with salience.performance(allocator="reuse"):
        salience.smoothgrad(model, x, 0, samples=2)
    assert calls  # keep_freed_memory itself acts once (the next test)
    for one_pass in (salience.vanilla, salience.gradcam):  # one-pass methods' passes (and a dataset run's
        calls.clear()  # prediction) are CPU passes as well: they never set it
        with salience.performance(allocator="reuse"):
            one_pass(model, x, 0)
        assert calls, one_pass


def test_keep_freed_memory_is_once_per_process(monkeypatch):
    set_ = []
    monkeypatch.setattr(_malloc, "_done", False)
    monkeypatch.setattr(_malloc, "_glibc", lambda: (type("libc", (), {"mallopt": lambda p, v: set_.append((p, v))
                                                                      or 1}), "glibc"))
    assert _malloc.keep_freed_memory() is True
    assert _malloc.keep_freed_memory() is False
    assert set_ == [(_malloc.M_MMAP_THRESHOLD, 32 << 20), (_malloc.M_TRIM_THRESHOLD, 2 ** 31 - 1)]


class _NoMallopt:
    def __init__(self, name):
        self.name = name


def _raise(*_):
    raise OSError("[Errno 2] No such file or directory: '/gone/python'")


@pytest.mark.parametrize("where", ["Darwin", "Windows", "musl", "no libc", "no mallopt", "libc_ver fails"])
def test_elsewhere_than_glibc_nothing_is_set_a_warning_says_so_and_nothing_raises(monkeypatch, where):
    """macOS, Windows, musl, a C library that cannot be opened or has no ``mallopt``, ``platform.libc_ver`` failing
    (it reads ``sys.executable`` where ``confstr`` does not answer): the call was an AttributeError or an OSError out
    of the user's SmoothGrad; now nothing is set, and a warning says why, once."""
    monkeypatch.setattr(_malloc, "_done", False)
    monkeypatch.setattr(_malloc.platform, "system", lambda: "Linux" if where not in ("Darwin", "Windows") else where)
    monkeypatch.setattr(_malloc.platform, "libc_ver", _raise if where == "libc_ver fails" else
                        (lambda *a, **k: ("", "") if where == "musl" else ("glibc", "2.36")))
    if where == "no libc":
        monkeypatch.setattr(_malloc.ctypes, "CDLL", _raise)
    if where == "no mallopt":
        monkeypatch.setattr(_malloc.ctypes, "CDLL", _NoMallopt)
    with pytest.warns(UserWarning, match="allocator='reuse' does nothing here: it sets glibc's malloc thresholds"):
        assert _malloc.keep_freed_memory() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _malloc.keep_freed_memory() is False  # once


def test_cli_allocator_flag_reaches_the_engine(monkeypatch, tmp_path):
    """``salience explain --allocator reuse`` (as ``--memory-format``, ``--fold-batchnorm``): the option in force
    for the command, the allocator set before its CPU passes (single images, and a dataset run of a one-pass
    method: its prediction pass), nothing left after it; a bad value is a usage error."""
    from salience.cli import build_parser, main
    from salience.cli.common import performance_from_args

    args = build_parser().parse_args(["explain", "--model", "demo:shapes", "--allocator", "reuse", "a.png"])
    with performance_from_args(args) as p:
        assert p.allocator == "reuse"
    assert _perf.current() == _perf.Performance()
    calls = []
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: calls.append(1))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "a.png"), "--model", "demo:shapes", "--method",
                 "smoothgrad", "--out", str(out), "--allocator", "reuse"]) == 0
    assert calls
    calls.clear()  # a dataset run (a folder): the option reaches its passes (explain_dataset reads the settings)
    assert main(["explain", str(tmp_path), "--model", "demo:shapes", "--method", "gradcam", "--out",
                 str(tmp_path / "run"), "--workers", "0", "--allocator", "reuse"]) == 0
    assert calls
    assert _perf.current() == _perf.Performance()
    assert main(["explain", str(tmp_path / "a.png"), "--model", "demo:shapes", "--allocator", "jemalloc"]) == 2


def test_smoothgrad_keyword_says_allocator_is_a_setting():
    """``smoothgrad(allocator=...)``, as ``chunks=`` and ``fold_batchnorm=``: a setting, and the message says how to
    set it (it said "vanilla has no option 'allocator' (nor has smoothgrad)" and nothing more)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    with pytest.raises(SalienceError, match=r"allocator is a setting of how the passes run: "
                                            r"salience.set_performance\(allocator=...\)"):
        salience.smoothgrad(model, torch.rand(1, 3, 6, 6), 0, samples=2, allocator="reuse")
