"""Session 48: a process's heap state (``salience._core.malloc.raise_dynamic_threshold``, ``allocator="default"``).

glibc serves a block of at least its dynamic mmap threshold (128 KiB in a fresh process) by ``mmap`` and raises the
threshold to the size of each mapped block it frees (up to 32 MiB), the trim threshold (the free top of the heap it
keeps) to twice that. So in a process that has freed no block larger than 4 MiB, a pass that frees 24 MiB of 4 MiB
activations has them trimmed off the heap's top at every free and faults every page in again at the next pass (6,144
faults of 4 KiB a round, measured 6,044-6,150); once a block just under 32 MiB was mapped and freed (what
``raise_dynamic_threshold`` does before salience's first CPU pass under the default allocator), the heap keeps up to
64 MiB of free top and the later rounds fault (almost) never (0 measured). The thresholds are not fixed (no
``mallopt``): a block over 32 MiB is still mapped and given back at its free, and a free top over 64 MiB is trimmed.

The children are fresh processes: glibc's thresholds depend only on the blocks a process has freed, not on timing,
so the counts are deterministic; the fault counts are compared (with huge pages a fault maps 2 MiB), not fixed.
"""
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
from salience._core import malloc as _malloc
from salience._core import perf as _perf

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")

# rounds of n blocks written and freed (six of 4 MiB: a pass's activations), the minor faults of each round
ROUNDS = r"""
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rounds(n=6, size=4 << 20, times=4):
    out = []
    for _ in range(times):
        f0 = faults()
        blocks = [libc.malloc(size) for _ in range(n)]
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in reversed(blocks):
            libc.free(b)
        out.append(faults() - f0)
    return out

"""

# a salience pass on a CPU (the default allocator) in a fresh process, then the rounds
THROUGH_SALIENCE = ROUNDS + r"""
import json, sys
import torch, salience
from salience._core import malloc
if sys.argv[1] == "off":
    malloc._raise_tried = True  # as if the lever were not there
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(4, 2)).eval()
salience.vanilla(model, torch.rand(1, 3, 8, 8), 0)
print(json.dumps({"raised": getattr(malloc, "_raised", None), "rounds": rounds()}))
"""

# the module alone (no torch): the lever (or allocator="reuse"'s fixed thresholds), then what glibc still gives back
MODULE_ALONE = ROUNDS + r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("salience_malloc", sys.argv[1])
malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
if sys.argv[2] == "raise":
    first, again = malloc.raise_dynamic_threshold(), malloc.raise_dynamic_threshold()
else:
    first, again = malloc.keep_freed_memory(), malloc.keep_freed_memory()
print(json.dumps({"first": first, "again": again, "rounds": rounds(), "big_block": rounds(1, 48 << 20, 3),
                  "big_top": rounds(24, 4 << 20, 3)}))
"""


def _child(script: str, *argv: str) -> dict:
    # glibc's settings from the environment left out (a user's MALLOC_*, a CI's tunables): glibc as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_after_a_salience_pass_the_next_passes_blocks_stay_resident():
    """The property, through the public path: a fresh process's first salience pass on a CPU (default options) raises
    glibc's dynamic threshold, and the rounds of 4 MiB blocks after it fault only in the first round; with the lever
    switched off (and on the code before it) every round faults them all again (fails on main's code)."""
    off, on = _child(THROUGH_SALIENCE, "off"), _child(THROUGH_SALIENCE, "on")
    assert on["raised"] is True and off["raised"] is False, (on, off)
    least = min(off["rounds"])
    assert least > 1000, off  # as it is: every round's pages faulted in again (6,144 of 4 KiB)
    assert on["rounds"][0] > 1000, on  # the first round grows the heap (fresh pages)...
    assert all(f <= least // 8 for f in on["rounds"][1:]), (on, off)  # ... the later ones reuse them


@glibc_only
def test_thresholds_are_not_fixed_large_blocks_and_a_large_free_top_still_go_back():
    """No ``mallopt``: a 48 MiB block (over glibc's 32 MiB cap) is still mapped and given back at its free, and a free
    heap top of 96 MiB (24 blocks of 4 MiB, over the raised trim threshold of 64 MiB) is still trimmed: every round
    faults them in again (measured 12,289 and 16,352 a round). Under ``allocator="reuse"`` (trim threshold fixed at
    2 GiB) the same 96 MiB stay and the later rounds fault 0 times: what the lever must not do."""
    got, fixed = _child(MODULE_ALONE, _malloc.__file__, "raise"), _child(MODULE_ALONE, _malloc.__file__, "reuse")
    assert got["first"] is True and got["again"] is False, got  # once per process
    assert got["rounds"][0] > 1000 and all(f <= got["rounds"][0] // 8 for f in got["rounds"][1:]), got
    for what in ("big_block", "big_top"):
        first, *later = got[what]
        assert first > 1000 and all(f >= first // 4 for f in later), (what, got)  # given back, faulted again
    first, *later = fixed["big_top"]
    assert first > 1000 and all(f <= first // 8 for f in later), fixed  # the contrast: fixed thresholds keep them


def test_nothing_is_done_elsewhere_than_glibc_nor_after_reuse(monkeypatch):
    """Elsewhere than glibc (macOS, musl, ``platform.libc_ver`` failing) the default asks for nothing: no C library
    opened, no block, no warning, ``False``; nor once ``allocator="reuse"`` fixed the thresholds (they no longer move),
    nor a second time in a process."""
    opened = []
    monkeypatch.setattr(_malloc.ctypes, "CDLL", lambda *a, **k: opened.append(a))

    def fails(*_):
        raise OSError("[Errno 2] No such file or directory: '/gone/python'")

    for system, libc_ver, fixed in (("Darwin", None, False), ("Linux", lambda *a, **k: ("", ""), False),
                                    ("Linux", fails, False), ("Linux", lambda *a, **k: ("glibc", "2.36"), True)):
        monkeypatch.setattr(_malloc, "_raise_tried", False)
        monkeypatch.setattr(_malloc, "_raised", False)
        monkeypatch.setattr(_malloc, "_fixed", fixed)
        monkeypatch.setattr(_malloc.platform, "system", lambda s=system: s)
        if libc_ver is not None:
            monkeypatch.setattr(_malloc.platform, "libc_ver", libc_ver)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _malloc.raise_dynamic_threshold() is False
            assert _malloc.raise_dynamic_threshold() is False
        assert opened == [] and _malloc._raised is False, (system, fixed)
    # the engine's wiring: a CPU pass under the default asks for the lever, under "reuse" for the fixed thresholds
    asked = []
    monkeypatch.setattr(_perf, "raise_dynamic_threshold", lambda: asked.append("raise"))
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: asked.append("reuse"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(32, 3)).eval()
    salience.vanilla(model, torch.rand(1, 3, 6, 6), 0)
    with salience.performance(allocator="reuse"):
        salience.vanilla(model, torch.rand(1, 3, 6, 6), 0)
    assert asked[0] == "raise" and asked[-1] == "reuse" and set(asked) == {"raise", "reuse"}, asked


SAME_MAPS = r"""
import io, sys, torch, torchvision, salience
from salience._core import malloc
malloc._raise_tried = True  # the lever off for the first maps
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

def maps():
    return [salience.smoothgrad(model, x, [1, 2], samples=4, seed=3), salience.integrated_gradients(model, x, [1, 2], steps=4),
            salience.vanilla(model, x, [1, 2])]

off = maps()
malloc._raise_tried = False
assert malloc.raise_dynamic_threshold() is True
on = maps()
buf = io.BytesIO()
torch.save({"off": off, "on": on}, buf)
sys.stdout.buffer.write(buf.getvalue())
"""


@glibc_only
def test_maps_are_the_same_bits_with_and_without_the_lever():
    """The heap's state changes where the memory comes from, never a value: resnet18's SmoothGrad, integrated
    gradients and vanilla maps in one fresh process before and after the lever, bit for bit."""
    import io

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", SAME_MAPS], capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    got = torch.load(io.BytesIO(out.stdout))
    for a, b in zip(got["off"], got["on"]):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
