"""precision="bf16" on a CPU (session 40): the ``"auto"`` layout probe decides under the call's precision, the
CPU's native bf16 is detected (:func:`salience._core.cpu.native_bf16`), and bf16 on a CPU without it warns once.

The probe test makes the probe's clock exact (``Run.clock`` reads a virtual clock that the model's own forward
advances by a cost that depends on the autocast and the layout the pass really ran under), so what it decides is
what the passes it timed ran under, not the machine's load: channels-last is made faster under bf16 only (as on
an AMX CPU: resnet50's forward + input gradient, bf16 + channels-last 0.38x fp32's time, fp32 channels-last 0.93x, medians of
benchmarks/cpu-bf16-s40.md's rounds).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salience
from salience._core import cpu as _cpu
from salience._core import perf as _perf
from test_s49_record import ForwardLog


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    _perf.clear_cache()
    monkeypatch.setattr(_cpu, "_warned", False)
    yield
    _perf.clear_cache()


class _Clock:
    now = 0.0


class _TimedNet(nn.Module):
    """Three convolutions whose forward advances the virtual clock by ``COST[(bf16, channels_last)]`` per item,
    read from the autocast in force and the layout of the input the pass got, and records both."""

    COST = {(False, False): 2.0, (False, True): 2.0, (True, False): 2.0, (True, True): 1.0}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool]] = ForwardLog()  # the guard puts back a plain list

    def forward(self, x):
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.seen.append((bf16, cl))
        _Clock.now += self.COST[(bf16, cl)] * x.shape[0]
        return self.head(self.body(x).mean((2, 3)))


def _auto_layout(model, x, precision):
    """Whether the ``"auto"`` probe of SmoothGrad on ``model`` under ``precision`` chose channels-last: the layout
    of the call's last pass (2 images, 24 items: a contiguous memory-probe chunk of 2, four layout-probe chunks of
    2, then the 14 others in the layout chosen)."""
    model.seen.clear()
    salience.smoothgrad(model, x, 0, samples=12, memory_format="auto", precision=precision)
    return model.seen[-1][1]


def test_the_auto_layout_probe_times_the_calls_precision(monkeypatch):
    monkeypatch.setattr(_perf.Run, "clock", lambda self: _Clock.now)
    monkeypatch.setattr(_perf, "SMALL_ITEM_BYTES", 0)  # the tiny net counts as big here
    monkeypatch.setattr(_cpu, "native_bf16", lambda: True)
    model, x = _TimedNet(), torch.rand(2, 3, 8, 8)
    # bf16 first: its probe timed bf16 passes in both layouts, where channels-last is twice as fast
    assert _auto_layout(model, x, "bf16") is True
    assert {bf16 for bf16, _ in model.seen} == {True} and {cl for _, cl in model.seen} == {False, True}
    # the same model, input shape and method in fp32: its own probe (the cache is per precision), no gain there
    assert _auto_layout(model, x, "fp32") is False
    assert {bf16 for bf16, _ in model.seen} == {False} and {cl for _, cl in model.seen} == {False, True}
    # and the bf16 decision is still bf16's: a warm call runs channels-last under bf16, timing nothing
    model.seen.clear()
    salience.smoothgrad(model, x, 0, samples=12, memory_format="auto", precision="bf16")
    # (no chunk contiguous: the memory probe's pass ran in the cold call only, session 45)
    assert set(model.seen) == {(True, True)}


# ------------------------------------------------------------------------------------------- native bf16


def _cpu_answer(monkeypatch, tmp_path, machine, flags_line, torch_probes):
    """:func:`_cpu._cpu_bf16` on a made-up machine: ``platform.machine()``, /proc/cpuinfo's flags line and
    torch's own probes (``None``: torch has none)."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\n{flags_line}\n")
    monkeypatch.setattr(_cpu, "_CPUINFO", str(info))
    monkeypatch.setattr(_cpu.platform, "machine", lambda: machine)
    for name, value in zip(("_is_avx512_bf16_supported", "_is_amx_tile_supported"), torch_probes or (None, None)):
        monkeypatch.setattr(torch.cpu, name, (lambda v=value: v) if torch_probes else None, raising=False)
    _cpu._cpu_flags.cache_clear()
    _cpu._cpu_bf16.cache_clear()
    try:
        return _cpu._cpu_bf16()
    finally:
        _cpu._cpu_flags.cache_clear()
        _cpu._cpu_bf16.cache_clear()


@pytest.mark.parametrize("machine, flags, probes, expected", [
    ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", None, "AMX-BF16"),  # Sapphire R.
    ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16", None, "AVX512-BF16"),  # Cooper Lake, Zen 4
    ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni", None, ""),     # Cascade Lake
    ("x86_64", "flags\t\t: fpu sse2 avx2", None, ""),                                  # an AVX2 CPU
    ("x86_64", "flags\t\t: fpu sse2 avx2", (False, True), "AMX-BF16"),                 # torch's answer first
    ("x86_64", "flags\t\t: fpu sse2 avx2", (True, False), "AVX512-BF16"),
    ("x86_64", "flags\t\t: fpu avx512_bf16", (False, False), ""),
    ("aarch64", "Features\t: fp asimd sve bf16", None, "BF16"),                        # Graviton 3
    ("aarch64", "Features\t: fp asimd", None, ""),                                     # Graviton 2
    ("x86_64", "", None, None),                                                        # nothing to read: unknown
    ("riscv64", "isa\t: rv64", None, None),
])
def test_native_bf16_from_torch_or_cpuinfo(monkeypatch, tmp_path, machine, flags, probes, expected):
    assert _cpu_answer(monkeypatch, tmp_path, machine, flags, probes) == expected


def test_native_bf16_heeds_onednn_isa_cap(monkeypatch):
    monkeypatch.setattr(_cpu, "_cpu_bf16", lambda: "AMX-BF16")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)  # read where ONEDNN_MAX_CPU_ISA is empty ("" below)
    for cap, native in (("", True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
                        ("AVX512_CORE_BF16", False), ("AVX512_CORE_AMX", True), ("ALL", True)):  # session 41: AMX
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert _cpu.native_bf16() is native, cap
    monkeypatch.setattr(_cpu, "_cpu_bf16", lambda: "")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert _cpu.native_bf16() is False


def test_this_machines_answer_is_its_cpuinfo_flags():
    """Where Linux on x86 says, torch's cpuinfo answer and /proc/cpuinfo's flags agree."""
    flags = _cpu._cpu_flags()
    if _cpu.platform.machine() != "x86_64" or not flags:
        pytest.skip("x86 Linux only")
    assert _cpu._cpu_bf16() == ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "")


# ------------------------------------------------------------------------------------------- the warning


def _bf16_warnings(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn()
    return [w for w in got if "precision='bf16': this CPU" in str(w.message)]


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch):
    monkeypatch.setattr(_cpu, "native_bf16", lambda: False)
    # a CPU with no bf16 instructions at all, whatever this machine has (session 44's AMD EPYC has AVX512-BF16, whose
    # message is the other one: tests/test_s41_misc.py)
    monkeypatch.setattr(_cpu, "bf16_instructions", lambda: "")
    model, x = _TimedNet(), torch.rand(1, 3, 8, 8)
    assert _bf16_warnings(lambda: salience.smoothgrad(model, x, 0, samples=2)) == []  # fp32: nothing
    got = _bf16_warnings(lambda: salience.smoothgrad(model, x, 0, samples=2, precision="bf16"))
    assert len(got) == 1 and got[0].filename == __file__  # at the caller's line
    assert "slower than fp32" in str(got[0].message) and "precision='fp32'" in str(got[0].message)
    # once per process: a one-pass method and another many-pass call say nothing more
    with salience.performance(precision="bf16"):
        assert _bf16_warnings(lambda: salience.vanilla(model, x, 0)) == []
    assert _bf16_warnings(lambda: salience.integrated_gradients(model, x, 0, steps=4, precision="bf16")) == []


@pytest.mark.parametrize("native", [True, None])
def test_bf16_with_native_bf16_or_unknown_does_not_warn(monkeypatch, native):
    monkeypatch.setattr(_cpu, "native_bf16", lambda: native)
    model, x = _TimedNet(), torch.rand(1, 3, 8, 8)
    assert _bf16_warnings(lambda: salience.smoothgrad(model, x, 0, samples=2, precision="bf16")) == []
    with salience.performance(precision="bf16"):
        assert _bf16_warnings(lambda: salience.vanilla(model, x, 0)) == []


def test_a_one_pass_method_warns_too(monkeypatch):
    monkeypatch.setattr(_cpu, "native_bf16", lambda: False)
    model, x = _TimedNet(), torch.rand(1, 3, 8, 8)
    with salience.performance(precision="bf16"):
        got = _bf16_warnings(lambda: salience.vanilla(model, x, 0))
    assert len(got) == 1 and got[0].filename == __file__
