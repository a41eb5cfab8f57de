"""Whether bf16 pays on this machine's CPU (native instructions measured faster than fp32), and the one warning
``precision="bf16"`` gives where not.

Under ``precision="bf16"`` the forward pass runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``; PyTorch hands
its convolutions and matrix products to oneDNN, whose bf16 kernels use AMX-BF16 (Sapphire Rapids and later) or
AVX512-BF16 (Cooper Lake, Zen 4 and later) where the CPU has them, and otherwise emulate bf16 with AVX-512 integer
instructions or fall back to PyTorch's own kernels. Measured on one CPU with each instruction set in turn
(docs/performance.md, "precision"): with AMX, bf16 + channels-last took 0.37x the fp32 time of resnet50's forward +
input gradient; capped to AVX512-BF16 without AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, as on Cooper Lake or
Zen 4) 1.00-1.06x, no gain; capped to AVX-512 without bf16 (``AVX512_CORE``) bf16 took 2.7x, and capped to AVX2 more
still. Hence the warning, on x86 wherever AMX-BF16 is missing (until session 41 AVX512-BF16 counted as native).
"""
from __future__ import annotations

import functools
import os
import platform
import threading
import warnings
from typing import Optional

import torch

from salience._core.errors import user_stacklevel

__all__ = ["bf16_instructions", "native_bf16", "warn_bf16_without_native"]

# The values of ONEDNN_MAX_CPU_ISA (or its older spelling DNNL_MAX_CPU_ISA) that oneDNN documents for x86 (its
# "CPU Dispatcher Control") and that cap it below native bf16 (AVX512_CORE_BF16 and above, AVX10, the AMX ones,
# DEFAULT and ALL keep it). oneDNN compares the whole name, case-insensitively, and ignores a value it does not know
# (no cap), as this does: a typo, or an Arm value (SVE_256), warns of nothing.
# AVX10_2_ACE (opt-in, oneDNN 3.9+) is left as no cap: oneDNN's docs order it above AVX10_2 only, and its bits
# (whether it keeps AMX) were not found in the oneDNN sources at hand. The caps are x86's: an Arm CPU's BF16 stays.
_BELOW_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                              "AVX512_MIC", "AVX512_MIC_4OPS"})
# And those that cap it below AMX (AVX512-BF16 kept, AMX not used: AVX10.1 and AVX10.2 without their AMX names).
_BELOW_AMX_ISAS = _BELOW_BF16_ISAS | {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2", "AVX10_2_512"}
_CPUINFO = "/proc/cpuinfo"
_warned = False
_warn_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> Optional[str]:
    """The CPU's own bf16 instructions, cached: ``"AMX-BF16"`` or ``"AVX512-BF16"`` on x86, from PyTorch's cpuinfo
    (``torch.cpu._is_amx_tile_supported``: every AMX CPU so far has AMX-BF16; ``_is_avx512_bf16_supported``), else
    its ``/proc/cpuinfo`` flags; ``"BF16"`` on Arm (its ``bf16`` feature in ``/proc/cpuinfo``); ``""`` none;
    ``None`` where neither source answers."""
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        if all(callable(p) for p in probes):
            try:
                return "AMX-BF16" if probes[0]() else "AVX512-BF16" if probes[1]() else ""
            except RuntimeError:
                pass
        if not flags:
            return None
        return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else ""
    if machine in ("aarch64", "arm64"):
        return ("BF16" if "bf16" in flags else "") if flags else None
    return None


def bf16_instructions() -> Optional[str]:
    """The bf16 instructions oneDNN may use here: :func:`_cpu_bf16`'s, lowered where ``ONEDNN_MAX_CPU_ISA`` (or
    ``DNNL_MAX_CPU_ISA``) caps oneDNN below them: under AMX (``AVX512_CORE_BF16``, ``AVX10_1_512`` ...) an AMX CPU
    keeps AVX512-BF16, under AVX512-BF16 (``AVX512_CORE``, ``AVX2`` ...) none is left (``""``); ``None``: not
    known."""
    isa, cap = _cpu_bf16(), _onednn_cap()
    if isa == "AMX-BF16" and cap in _BELOW_AMX_ISAS:
        isa = "AVX512-BF16"
    return "" if isa in ("AMX-BF16", "AVX512-BF16") and cap in _BELOW_BF16_ISAS else isa  # x86 caps: x86 only


def native_bf16() -> Optional[bool]:
    """Whether bf16 pays on this CPU: its convolutions and matrix products run on native instructions that oneDNN
    may use and that were measured faster than fp32: AMX-BF16 on x86, the BF16 extension on Arm. ``False`` without
    them, with AVX512-BF16 alone too (Cooper Lake, Zen 4: no gain over fp32 where measured, docs/performance.md,
    "precision"), and where the environment caps oneDNN below them (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``,
    e.g. ``AVX512_CORE_BF16`` or ``AVX2``); ``None``: not known."""
    isa = bf16_instructions()
    return None if isa is None else isa in ("AMX-BF16", "BF16")


def _onednn_cap() -> str:
    """oneDNN's ISA cap from the environment, upper case: ``ONEDNN_MAX_CPU_ISA``, else the older
    ``DNNL_MAX_CPU_ISA`` (oneDNN reads the first of the two that is set and not empty); ``""`` where neither is."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return ""


def warn_bf16_without_native(precision: str, device: torch.device) -> None:
    """Warn, once per process, that ``precision="bf16"`` (or ``"bf16-mixed"``, the warning names the one given) on a
    CPU where bf16 does not pay (:func:`native_bf16` is ``False``) is no faster than fp32 (AVX512-BF16 without AMX)
    or slower (no bf16 instructions), saying what was measured and what to use; nothing where bf16 pays or it is not
    known."""
    global _warned
    if _warned or precision not in ("bf16", "bf16-mixed") or device.type != "cpu" or native_bf16() is not False:
        return
    with _warn_lock:
        if _warned:
            return
        _warned = True
    better = "a CPU with AMX-BF16 (Sapphire Rapids or later: bf16 + channels-last about 0.4x the fp32 time)"
    if bf16_instructions() == "AVX512-BF16":
        has = ("this CPU's AMX-BF16 is out of oneDNN's reach (ONEDNN_MAX_CPU_ISA caps it below AMX), leaving "
               "AVX512-BF16" if _cpu_bf16() == "AMX-BF16" else "this CPU has AVX512-BF16 but no AMX-BF16")
        what = (f"{has}, and bf16 did not pay there where measured (resnet50's forward + input gradient, oneDNN "
                "capped to AVX512-BF16: bf16 + channels-last 1.00-1.06x the fp32 time, bf16 1.08-1.18x)")
    elif platform.machine().lower() in ("aarch64", "arm64"):  # Arm: its BF16 extension, no x86 names
        what = ("this CPU has no BF16 extension (no 'bf16' among /proc/cpuinfo's Features) that PyTorch may use, and "
                "bf16 without it is usually slower than fp32 (measured on x86 without bf16 instructions: 2.7x the fp32 "
                "time; not measured on Arm)")
        better = "an Arm CPU with the BF16 extension (FEAT_BF16: Neoverse V1 as in Graviton3, Armv8.6-A and later)"
    else:
        what = ("this CPU has no bf16 instructions (AMX-BF16 or AVX512-BF16) that PyTorch may use, and bf16 on it is "
                "usually slower than fp32 (resnet50's forward + input gradient: 2.7x the fp32 time with AVX-512 "
                "alone, measured)")
    warnings.warn(f"precision={precision!r}: {what}; use precision='fp32' (the default: no slower here, and its maps carry "
                  f"no bf16 rounding), or {better} (docs/performance.md, 'precision')", stacklevel=user_stacklevel())
