"""Session 49: the allocator's off switch (``allocator="system"``) and the user's own malloc settings heeded.

Since session 48 the default (``allocator="default"``) maps and frees one block just under 32 MiB before a process's
first CPU pass, so glibc's dynamic mmap threshold rises to that size (``salience._core.malloc.raise_dynamic_threshold``).
``"system"`` leaves the C allocator exactly as the process has it; and the default does nothing, and says so
(``False``), where the process started with one of glibc's settings that fix the thresholds (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or their ``GLIBC_TUNABLES`` names): setting any
of them turns glibc's dynamic adjustment off (glibc's manual, "Malloc Tunable Parameters"; malloc.c's ``do_set_*``
set ``no_dyn_threshold``), so the block's free raised nothing and the old ``True`` claimed what glibc did not do.

The properties are read in fresh processes (glibc's thresholds are the process's, and the lever acts once per process)
from glibc's own count of mapped blocks (``mallinfo2().hblks``): a block at or over the mmap threshold is mapped (the
count rises while it lives), a smaller one comes from the heap. Deterministic: the thresholds depend only on the blocks
the process freed and on its environment, not on timing or load."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import salience
from salience import SalienceError
from salience._core import malloc as _malloc
from salience._core import perf as _perf

SRC = Path(__file__).resolve().parents[1] / "src"
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc")

# whether glibc maps a block of n bytes now: mallinfo2's count of mapped blocks while it lives
MAPPED = r"""
import ctypes
_libc = ctypes.CDLL(None)
class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
_libc.mallinfo2.restype = _Info
_libc.malloc.restype, _libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
_libc.free.restype, _libc.free.argtypes = None, [ctypes.c_void_p]

def mapped(n):
    before = _libc.mallinfo2().hblks
    block = _libc.malloc(n)
    got = _libc.mallinfo2().hblks - before
    _libc.free(block)
    return got
"""

# through the public path: a fresh process sets the allocator, runs one salience pass on a CPU, then asks whether a
# block of 24 MiB is mapped (under the raised threshold, just under 32 MiB, it comes from the heap; in a process that
# freed no mapped block that large, as after importing torch and one small pass, it is mapped)
THROUGH_SALIENCE = MAPPED + r"""
import json, sys
import torch, salience
from salience._core import malloc
salience.set_performance(allocator=sys.argv[1])
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(4, 2)).eval()
salience.vanilla(model, torch.rand(1, 3, 8, 8), 0)
print(json.dumps({"tried": malloc._raise_tried, "raised": malloc._raised, "fixed": malloc.thresholds_fixed(),
                  "mapped_24mib": mapped(24 << 20)}))
"""

# the module alone (no torch): the lever, then whether a block of 2 MiB is mapped (over glibc's initial threshold of
# 128 KiB and a user's 1 MiB; under the raised one)
MODULE_ALONE = MAPPED + r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("salience_malloc", sys.argv[1])
malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloc)
said = malloc.raise_dynamic_threshold()
print(json.dumps({"said": said, "tuned": malloc.user_tuned() if hasattr(malloc, "user_tuned") else None,
                  "trim_found": malloc._own_trim is not None, "mapped_2mib": mapped(2 << 20)}))
"""


def _env(**extra: str) -> dict:
    # glibc's settings from the environment left out (a user's MALLOC_*, a CI's tunables), then the case's own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")  # this tree's salience
    return {**env, **extra}


def _child(script: str, *argv: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_under_system_no_block_is_mapped_and_freed_and_the_threshold_stays_where_the_process_had_it():
    """``allocator="system"``: after a CPU pass the lever was never tried and a 24 MiB block is still mapped by glibc
    (the process's own threshold, 1-2 MiB after importing torch here); under the default the lever raised the
    threshold and the same block comes from the heap. (Fails on the code before: ``"system"`` was a SalienceError.)"""
    system, default = _child(THROUGH_SALIENCE, "system", env=_env()), _child(THROUGH_SALIENCE, "default", env=_env())
    assert system == {"tried": False, "raised": False, "fixed": False, "mapped_24mib": 1}, system
    assert default == {"tried": True, "raised": True, "fixed": False, "mapped_24mib": 0}, default


FIXING = [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"MALLOC_TRIM_THRESHOLD_": "268435456"}, {"MALLOC_TOP_PAD_": "131072"},
          {"MALLOC_MMAP_MAX_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
          {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.trim_threshold=268435456"}]
NOT_FIXING = [{}, {"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}]


@glibc_only
@pytest.mark.parametrize("setting", FIXING, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_the_environments_thresholds_are_heeded_and_the_lever_claims_nothing(setting):
    """A process started with one of glibc's threshold settings: the lever returns ``False`` and looks nothing up
    (before: ``True``), and what it says is what glibc did: a 2 MiB block is still mapped after it (the user's 1 MiB
    mmap threshold, or glibc's 128 KiB held fixed by the other settings), so nothing was raised."""
    got = _child(MODULE_ALONE, _malloc.__file__, env=_env(**setting))
    assert got["said"] is False and got["trim_found"] is False, (setting, got)
    assert got["mapped_2mib"] == 1, (setting, got)  # glibc's thresholds as the user fixed them
    name, value = next(iter(setting.items()))
    assert got["tuned"] is not None and got["tuned"].startswith(name) and got["tuned"].endswith(value.split(":")[-1]), got


@glibc_only
@pytest.mark.parametrize("setting", NOT_FIXING, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "none")
def test_settings_that_fix_no_threshold_leave_the_lever_acting(setting):
    """The contrast, which makes the test above mean something: with no such setting (or one that fixes no
    threshold: the arenas, huge pages) the lever raises the threshold, says so, and the 2 MiB block comes from the
    heap."""
    got = _child(MODULE_ALONE, _malloc.__file__, env=_env(**setting))
    assert got == {"said": True, "tuned": None, "trim_found": True, "mapped_2mib": 0}, (setting, got)


def test_user_tuned_names_the_setting_and_reads_the_start_environment_and_pythons(monkeypatch):
    for name in _malloc.TUNING_VARIABLES:
        assert _malloc.user_tuned({name: "0", "PATH": "/bin"}) == f"{name}=0"
        assert _malloc.user_tuned({name: ""}) == f"{name}="  # glibc reads an empty value too
    for name in _malloc.TUNING_TUNABLES:
        assert _malloc.user_tuned({"GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{name}=4096"}) == \
            f"GLIBC_TUNABLES={name}=4096"
    for other in ({}, {"MALLOC_ARENA_MAX": "2", "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "1"},
                  {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"}, {"GLIBC_TUNABLES": ""}):
        assert _malloc.user_tuned(other) is None, other
    # the default: the environment the process started with (glibc's) and os.environ (Python's copy), either
    monkeypatch.setattr(_malloc, "_start_environment", lambda: {"MALLOC_TOP_PAD_": "0"})
    assert _malloc.user_tuned() == "MALLOC_TOP_PAD_=0"
    monkeypatch.setattr(_malloc, "_start_environment", lambda: {})
    for key in [k for k in os.environ if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))]:
        monkeypatch.delenv(key)
    assert _malloc.user_tuned() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=0")
    assert _malloc.user_tuned() == "GLIBC_TUNABLES=glibc.malloc.top_pad=0"


@glibc_only
def test_the_start_environment_is_read_from_proc():
    out = subprocess.run([sys.executable, "-c", "from salience._core import malloc; print(malloc._start_environment()"
                          ".get('MALLOC_MMAP_MAX_'))"], capture_output=True, text=True, timeout=120,
                         env=_env(MALLOC_MMAP_MAX_="77"))
    assert out.returncode == 0 and out.stdout.strip() == "77", out


def test_bad_values_raise_a_salience_error_naming_the_three():
    for setter in (lambda: salience.set_performance(allocator="off"),
                   lambda: salience.performance(allocator="glibc").__enter__()):
        with pytest.raises(SalienceError, match=r"allocator must be one of default, reuse, system; got '(off|glibc)'"):
            setter()
    assert _perf.current() == _perf.Performance()


def test_system_runs_nothing_for_the_allocator_in_any_pass(monkeypatch):
    """The wiring: a CPU pass of a one-pass method and of a many-pass one under ``"system"`` asks for neither the
    lever nor ``"reuse"``'s thresholds; under the default the same passes ask for the lever."""
    asked = []
    monkeypatch.setattr(_perf, "raise_dynamic_threshold", lambda: asked.append("raise"))
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: asked.append("reuse"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(32, 3)).eval()
    x = torch.rand(1, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lever may have raised in this test process: said once, not here
        with salience.performance(allocator="system"):
            salience.vanilla(model, x, 0)
            salience.smoothgrad(model, x, 0, samples=2)
            salience.gradcam(model, x, 0)
    assert asked == []
    salience.smoothgrad(model, x, 0, samples=2)
    assert set(asked) == {"raise"}, asked


def test_the_passes_of_plain_keep_system():
    """:func:`salience._core.perf.plain` runs a probe's passes (a dataset run's batch-size probe) with the default
    options: it gave the default allocator too, and the probe ran the lever in a process that had said ``"system"``
    (found by the dataset run of the CLI test below). ``"system"`` now holds there; the other options, and
    ``"reuse"``, are the defaults' as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for outer, inner in ((dict(allocator="system", fold_batchnorm=True), "system"),
                             (dict(allocator="reuse", fold_batchnorm=True), "default"), ({}, "default")):
            with salience.performance(**outer), _perf.plain():
                assert _perf.current() == _perf.Performance(allocator=inner), outer
                assert _perf.resolve(memory_format="channels_last") == _perf.Performance(allocator=inner), outer
        prev = salience.set_performance(allocator="system")
        try:
            with _perf.plain():
                assert _perf.current().allocator == "system"
        finally:
            salience.set_performance(**vars(prev))
    assert _perf.current() == _perf.Performance()


def test_system_after_the_default_acted_says_it_cannot_undo_it(monkeypatch):
    """The lever acts once and cannot be undone: ``"system"`` set after it raised the threshold warns (as
    ``"default"`` after ``"reuse"`` does); before any pass, and back to the default, nothing is said."""
    monkeypatch.setattr(_malloc, "_raised", False)
    monkeypatch.setattr(_malloc, "_fixed", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prev = salience.set_performance(allocator="system")
        salience.set_performance(**vars(prev))
    monkeypatch.setattr(_malloc, "_raised", True)
    with pytest.warns(UserWarning, match=r"allocator='system' cannot undo what allocator='default' did before this "
                                         r"process's first CPU pass"):
        prev = salience.set_performance(allocator="system")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        salience.set_performance(**vars(prev))  # system -> default: nothing to undo
    assert _perf.current() == _perf.Performance()
    monkeypatch.setattr(_malloc, "_fixed", True)  # "reuse" fixed the thresholds: "system" cannot undo that either
    salience.set_performance(allocator="reuse")
    try:
        with pytest.warns(UserWarning, match=r"allocator='system' cannot undo allocator='reuse' in this process"):
            salience.set_performance(allocator="system")
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            salience.set_performance(allocator="default")
    assert _perf.current() == _perf.Performance()


def test_the_cli_flag_reaches_the_option(monkeypatch, tmp_path):
    """``--allocator system`` (explain of a file, a dataset run of a folder, evaluate): the option in force for the
    command, neither the lever nor ``"reuse"`` asked for, also where the command owns its process (whose default
    is ``"reuse"``); ``--allocator default`` asks for the lever (the contrast); a bad value is a usage error naming
    the three. (Fails on the code before: ``system`` was not a choice.)"""
    from PIL import Image

    from salience.cli import build_parser, main
    from salience.cli.common import performance_from_args

    args = build_parser().parse_args(["explain", "--model", "demo:shapes", "--allocator", "system", "a.png"])
    with performance_from_args(args, owns_process=True) as p:
        assert p.allocator == "system"
    assert _perf.current() == _perf.Performance()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    asked = []
    monkeypatch.setattr(_perf, "raise_dynamic_threshold", lambda: asked.append("raise"))
    monkeypatch.setattr(_perf, "keep_freed_memory", lambda: asked.append("reuse"))
    explain = ["explain", str(tmp_path / "a.png"), "--model", "demo:shapes", "--method", "smoothgrad", "--out",
               str(tmp_path / "out")]
    folder = ["explain", str(tmp_path), "--model", "demo:shapes", "--method", "gradcam", "--out", str(tmp_path / "run"),
              "--workers", "0"]
    evaluate = ["evaluate", "--model", "demo:shapes", "--n", "2", "--method", "vanilla", "--deletion-steps", "2",
                "--out", str(tmp_path / "ev")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lever may have raised in this test process before
        for argv in (explain, folder, evaluate):
            asked.clear()
            assert main([*argv, "--allocator", "system"], owns_process=True) == 0, argv
            assert asked == [], argv
            assert _perf.current() == _perf.Performance()
    assert main([*explain, "--allocator", "default"]) == 0 and set(asked) == {"raise"}, asked
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([*explain, "--allocator", "off"]) == 2
    said = err.getvalue().split("choose from", 1)[-1]
    assert all(name in said for name in ("default", "reuse", "system")), err.getvalue()


def test_the_owned_commands_default_heeds_the_environments_thresholds(monkeypatch):
    """``salience explain`` / ``evaluate`` run as the command default to ``"reuse"`` (``mallopt`` over whatever the
    user set); where the environment sets glibc's thresholds they run under the library's default instead, which
    then does nothing either; ``--allocator reuse`` asked for is still ``"reuse"``."""
    from salience.cli import common

    monkeypatch.setattr(common, "malloc_available", lambda: True)
    args = common.argparse.Namespace(command="explain", allocator=None)
    for tuned, expected in ((None, "reuse"), ("MALLOC_MMAP_THRESHOLD_=1048576", "default")):
        monkeypatch.setattr(common, "malloc_user_tuned", lambda t=tuned: t)
        with common.performance_from_args(args, owns_process=True) as p:
            assert p.allocator == expected, tuned
    with common.performance_from_args(common.argparse.Namespace(command="explain", allocator="reuse"),
                                      owns_process=True) as p:
        assert p.allocator == "reuse"
    assert _perf.current() == _perf.Performance()


# the command as the salience script runs it, in its own process: what it set in glibc
COMMAND = r"""
import json, sys
from salience.cli import main
from salience._core import malloc
sys.argv = ["salience", *sys.argv[1:]]
rc = main()
print(json.dumps({"rc": rc, "fixed": malloc.thresholds_fixed(), "tried": malloc._raise_tried, "raised": malloc._raised}))
"""


@glibc_only
def test_the_command_in_its_own_process_sets_nothing_under_the_users_thresholds(tmp_path):
    """End to end: ``salience explain`` owning its process, started with ``MALLOC_TRIM_THRESHOLD_`` set: no
    ``mallopt`` (the command's ``"reuse"`` default not taken) and the lever tried but not raised; without the setting
    the command fixes the thresholds (the contrast)."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    explain = ["explain", "a.png", "--model", "demo:shapes", "--method", "vanilla", "--out"]
    procs = [subprocess.Popen([sys.executable, "-c", COMMAND, *explain, out], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for out, env in (("tuned", _env(MALLOC_TRIM_THRESHOLD_="268435456")), ("plain", _env()))]
    got = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        got.append(json.loads(stdout.strip().splitlines()[-1]))
    tuned, plain = got
    assert tuned == {"rc": 0, "fixed": False, "tried": True, "raised": False}, tuned
    assert plain["rc"] == 0 and plain["fixed"] is True, plain
