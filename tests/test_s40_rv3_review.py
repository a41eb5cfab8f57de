"""Review of the bf16-on-CPU merge (session 40): oneDNN's ISA cap read as oneDNN reads it.

oneDNN's "CPU Dispatcher Control" documents the values of ``ONEDNN_MAX_CPU_ISA`` (also read under its older name
``DNNL_MAX_CPU_ISA``, after ``ONEDNN_``); it compares the whole name, case-insensitively, and ignores a value it does
not know. Checked on this AMX machine with ``ONEDNN_VERBOSE=1``: ``DNNL_MAX_CPU_ISA=avx512_core`` caps oneDNN to
"AVX-512 with AVX512BW, AVX512VL, and AVX512DQ" (bf16 emulated, 2.7x fp32's time), ``ONEDNN_MAX_CPU_ISA=bogus``
leaves it on "AVX10.1 and Intel AMX with bfloat16".
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from salience._core import cpu as _cpu

ROOT = Path(__file__).resolve().parent.parent

# oneDNN's documented x86 values -> the bf16 instructions an AMX CPU keeps under the cap (session 41: only AMX counts
# as native, AVX512-BF16 alone did not pay)
_NONE, _AVX, _AMX = "", "AVX512-BF16", "AMX-BF16"
DOCUMENTED = {"SSE41": _NONE, "AVX": _NONE, "AVX2": _NONE, "AVX2_VNNI": _NONE, "AVX512_CORE": _NONE,
              "AVX512_CORE_VNNI": _NONE, "AVX512_CORE_BF16": _AVX, "AVX10_1_512": _AVX, "AVX512_CORE_FP16": _AVX,
              "AVX10_1_512_AMX": _AMX, "AVX512_CORE_AMX": _AMX, "AVX2_VNNI_2": _NONE, "AVX10_1_512_AMX_FP16": _AMX,
              "AVX512_CORE_AMX_FP16": _AMX, "DEFAULT": _AMX, "AVX10_2": _AVX, "AVX10_2_512": _AVX,
              "AVX10_2_AMX_2": _AMX, "AVX10_2_512_AMX_2": _AMX, "ALL": _AMX}


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(_cpu, "_cpu_bf16", lambda: "AMX-BF16")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_documented_cap_in_either_spelling_and_case(bf16_cpu, name):
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        for value in (name, name.lower()):
            bf16_cpu.setenv(var, value)
            assert _cpu.bf16_instructions() == DOCUMENTED[name], (var, value)
            assert _cpu.native_bf16() is (DOCUMENTED[name] == _AMX), (var, value)
        bf16_cpu.delenv(var)


def test_the_older_name_counts_only_where_the_new_one_is_unset(bf16_cpu):
    bf16_cpu.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert _cpu.native_bf16() is False  # the merge's code read ONEDNN_ only: True, no warning
    bf16_cpu.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert _cpu.native_bf16() is True
    bf16_cpu.setenv("ONEDNN_MAX_CPU_ISA", "")  # set but empty: oneDNN reads the next
    assert _cpu.native_bf16() is False


@pytest.mark.parametrize("value", ["bogus", "AVX512", "SVE_256", "ASIMD"])
def test_a_value_onednn_does_not_know_caps_nothing(bf16_cpu, value):
    # "bogus" / "AVX512": not oneDNN's names, ignored by it; SVE_256 / ASIMD: aarch64 names, not x86 caps
    bf16_cpu.setenv("ONEDNN_MAX_CPU_ISA", value)
    assert _cpu.native_bf16() is True


def test_a_warnings_as_errors_test_with_bf16_passes_first_in_a_process_on_a_cpu_without_native_bf16():
    """The bf16 warning is once per process, so whether a test with ``simplefilter("error")`` and bf16 on a CPU saw it
    depended on the CPU and on whether an earlier test had used it up: on a CPU without native bf16 (emulated here
    with ``ONEDNN_MAX_CPU_ISA=AVX2``), ``test_fp16_overflow_is_refused[integrated_gradients]`` failed when first in
    its process (the file alone, or an xdist worker's first). The suite's conftest marks the warning given."""
    test = "tests/test_s40_leftlib_ig_fp16.py::test_fp16_overflow_is_refused[integrated_gradients]"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", test],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
