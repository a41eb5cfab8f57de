"""Session 49's review of ``allocator="system"`` and of the environment's malloc settings heeded (tests/test_s49_alloc.py).

Three defects, each with its test here:

- ``GLIBC_TUNABLES`` read otherwise than glibc reads it: ``user_tuned`` stripped spaces around a tunable's name and
  took a name without ``=``, where glibc's ``parse_tunables`` matches the exact name and needs the ``=`` (it skips
  such an item, and the thresholds still adjust); the default's lever then did nothing, and the command's ``"reuse"``
  default was dropped, for a setting glibc never took. Checked against glibc itself in fresh processes.
- A dataset run's forked decoding worker gave the free heap back (``malloc_trim``) under ``allocator="system"``
  wherever an earlier pass of the process had run under the default (its lever found glibc) or under ``"reuse"``:
  the C allocator touched, although the docs say a forked worker gives nothing back under ``"system"`` and the
  warning said salience does nothing more to it.
- ``"system"`` set after ``"reuse"`` fixed glibc's thresholds, with ``"default"`` set between (or a block of it),
  warned that the dynamic threshold "still adjusts" (false: ``mallopt`` fixed it) or said nothing at all.
"""
from __future__ import annotations

import os
import types
import warnings

import pytest

import salience
from salience._core import malloc as _malloc
from salience._core import perf as _perf
from test_s42_fork_release import KW, forking, images, net
from test_s49_alloc import MAPPED, _child, _env, glibc_only

# whether glibc's thresholds still adjust in a fresh process: a freed 8 MiB mapped block raises the mmap threshold to
# its size, so a 1 MiB block then comes from the heap; a threshold the environment fixed (at 128 KiB here) maps it
ADJUSTS = MAPPED + r"""
import json
mapped(8 << 20)
print(json.dumps({"adjusts": mapped(1 << 20) == 0}))
"""

# GLIBC_TUNABLES values glibc does not take (the name not exact, no "="), and their contrasts that it does
NOT_TAKEN = [" glibc.malloc.mmap_threshold=131072", "glibc.malloc.mmap_threshold =131072",
             "glibc.malloc.arena_max=2: glibc.malloc.trim_threshold=131072", "glibc.malloc.mmap_threshold",
             "glibc.malloc.top_pad:glibc.malloc.arena_max=2"]
TAKEN = ["glibc.malloc.mmap_threshold=131072", "glibc.malloc.mmap_max:glibc.malloc.mmap_threshold=131072",
         "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=131072"]


@pytest.mark.parametrize("tunables", NOT_TAKEN + TAKEN)
def test_glibc_tunables_count_as_glibc_parses_them(tunables):
    """``user_tuned`` finds a tunable exactly where glibc takes it (the name exact, then ``=``). On the code before,
    the five of ``NOT_TAKEN`` counted (spaces stripped, a bare name taken)."""
    said = _malloc.user_tuned({"GLIBC_TUNABLES": tunables})
    if tunables in TAKEN:
        assert said is not None and said.startswith("GLIBC_TUNABLES=glibc.malloc."), said
    else:
        assert said is None, (tunables, said)


@glibc_only
@pytest.mark.parametrize("tunables", NOT_TAKEN + TAKEN)
def test_what_user_tuned_says_is_what_glibc_did(tunables):
    """The reference: glibc itself, in a fresh process started with the setting; its thresholds still adjust
    exactly where ``user_tuned`` finds nothing (so the lever acts exactly where glibc left them adjusting)."""
    got = _child(ADJUSTS, env=_env(GLIBC_TUNABLES=tunables))
    assert got["adjusts"] == (tunables in NOT_TAKEN), (tunables, got)
    assert got["adjusts"] == (_malloc.user_tuned({"GLIBC_TUNABLES": tunables}) is None), (tunables, got)


@forking
@pytest.mark.parametrize("before", ["default's lever", "reuse"])
def test_a_forked_worker_gives_nothing_back_under_system(tmp_path, monkeypatch, before):
    """A dataset run (one forked decoding worker) in a process where an earlier pass found glibc (the default's lever:
    ``_own_trim``) or fixed its thresholds (``"reuse"``: ``_fixed``): under ``"system"`` the worker calls no
    ``malloc_trim``; under the default it does (the contrast: the recording works, in the worker's process). On the
    code before the worker trimmed under ``"system"`` too."""
    log = tmp_path / "trims"
    log.mkdir()

    def trim(pad: int) -> int:  # glibc's malloc_trim, recorded: called in the forked worker
        (log / str(os.getpid())).write_text(str(pad))
        return 1

    monkeypatch.setattr(_malloc, "_raise_tried", True)  # the lever ran (its malloc_trim is the recording)
    monkeypatch.setattr(_malloc, "_done", True)  # as has "reuse"'s mallopt, where it did
    if before == "reuse":
        monkeypatch.setattr(_malloc, "_fixed", True)
        monkeypatch.setattr(_malloc, "_libc", types.SimpleNamespace(malloc_trim=trim))  # no mallinfo2: 0 kept free
        monkeypatch.setattr(_malloc, "_own_trim", None)
    else:
        monkeypatch.setattr(_malloc, "_fixed", False)
        monkeypatch.setattr(_malloc, "_own_trim", trim)
    files = images(tmp_path / "imgs", n=4)
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "system" after the lever or "reuse": the warning that it cannot undo them
        for allocator in ("system", "default"):
            with salience.performance(allocator=allocator):
                salience.explain_dataset(model, files, ["vanilla"], tmp_path / allocator, workers=1, **KW)
            trims = sorted(p.name for p in log.iterdir())
            if allocator == "system":
                assert trims == [], trims
            else:
                assert len(trims) == 1 and trims[0] != str(os.getpid()), trims


@pytest.mark.parametrize("raised", [True, False])
def test_system_after_reuse_then_default_warns_of_reuse(monkeypatch, raised):
    """``"reuse"`` fixed glibc's thresholds (``mallopt``), ``"default"`` was set after it (warned), and then
    ``"system"``, by ``set_performance`` or a block: one warning, the reuse one (the thresholds stay fixed). On the
    code before: the default's warning that the threshold "still adjusts" (``raised``: the lever had run before
    ``"reuse"``), false, or no warning at all."""
    monkeypatch.setattr(_malloc, "_fixed", True)
    monkeypatch.setattr(_malloc, "_raised", raised)

    def by_block() -> None:
        with _perf.performance(allocator="system"):
            pass

    for setter in (lambda: _perf.set_performance(allocator="system"), by_block):
        monkeypatch.setattr(_perf, "_process", _perf.Performance(allocator="default"))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            setter()
        texts = [str(w.message) for w in said]
        assert len(texts) == 1, texts
        assert texts[0].startswith("allocator='system' cannot undo allocator='reuse'"), texts
        assert "still adjusts" not in texts[0], texts
    # the contrast: "default" -> "system" where only the lever ran warns that the threshold still adjusts
    monkeypatch.setattr(_malloc, "_fixed", False)
    monkeypatch.setattr(_malloc, "_raised", True)
    monkeypatch.setattr(_perf, "_process", _perf.Performance(allocator="default"))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _perf.set_performance(allocator="system")
    assert [("still adjusts" in str(w.message)) for w in said] == [True]
