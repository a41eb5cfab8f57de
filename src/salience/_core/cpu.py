"""Whether this machine's CPU computes in bf16 natively, and the one warning ``precision="bf16"`` gives where not.

Under ``precision="bf16"`` the forward pass runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``; PyTorch hands
its convolutions and matrix products to oneDNN, whose bf16 kernels use AMX-BF16 (Sapphire Rapids and later) or
AVX512-BF16 (Cooper Lake, Zen 4 and later) where the CPU has them, and otherwise emulate bf16 with AVX-512 integer
instructions or fall back to PyTorch's own kernels. Measured on one CPU with each instruction set in turn
(docs/performance.md, "precision"): with AMX, bf16 + channels-last took 0.37x the fp32 time of resnet50's forward +
input gradient; capped to AVX-512 without bf16 (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) bf16 took 2.7x, and capped to
AVX2 more still. Hence the warning.
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

__all__ = ["native_bf16", "warn_bf16_without_native"]

# The values of ONEDNN_MAX_CPU_ISA (or its older spelling DNNL_MAX_CPU_ISA) that oneDNN documents for x86 (its
# "CPU Dispatcher Control") and that cap it below native bf16 (AVX512_CORE_BF16 and above, AVX10, the AMX ones,
# DEFAULT and ALL keep it). oneDNN compares the whole name, case-insensitively, and ignores a value it does not know
# (no cap), as this does: a typo, or an Arm value (SVE_256), warns of nothing.
_BELOW_BF16_ISAS = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                              "AVX512_MIC", "AVX512_MIC_4OPS"})
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
def _cpu_has_bf16() -> Optional[bool]:
    """The CPU's own answer, cached: x86 from PyTorch's cpuinfo (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``: every AMX CPU so far has AMX-BF16), else its ``/proc/cpuinfo`` flags; Arm from the
    ``bf16`` feature in ``/proc/cpuinfo``; ``None`` where neither answers."""
    machine = platform.machine().lower()
    flags = _cpu_flags()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(callable(p) for p in probes):
            try:
                return any(bool(p()) for p in probes)
            except RuntimeError:
                pass
        return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None
    if machine in ("aarch64", "arm64"):
        return ("bf16" in flags) if flags else None
    return None


def native_bf16() -> Optional[bool]:
    """Whether the CPU runs bf16 convolutions and matrix products with native instructions (AMX-BF16 or
    AVX512-BF16 on x86, the BF16 extension on Arm) that oneDNN may use: ``False`` also where the environment caps
    oneDNN below them (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``, e.g. ``AVX2`` or ``AVX512_CORE``);
    ``None``: not known."""
    has = _cpu_has_bf16()
    if has and _onednn_cap() in _BELOW_BF16_ISAS:
        return False
    return has


def _onednn_cap() -> str:
    """oneDNN's ISA cap from the environment, upper case: ``ONEDNN_MAX_CPU_ISA``, else the older
    ``DNNL_MAX_CPU_ISA`` (oneDNN reads the first of the two that is set and not empty); ``""`` where neither is."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return ""


def warn_bf16_without_native(precision: str, device: torch.device) -> None:
    """Warn, once per process, that ``precision="bf16"`` on a CPU without native bf16 (:func:`native_bf16` is
    ``False``) is usually slower than fp32; nothing where the CPU has it or it is not known."""
    global _warned
    if _warned or precision not in ("bf16", "bf16-mixed") or device.type != "cpu" or native_bf16() is not False:
        return
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn("precision='bf16': this CPU has no native bf16 instructions (AMX-BF16 or AVX512-BF16) that "
                  "PyTorch may use, and bf16 on it is usually slower than fp32 (resnet50's forward + input gradient: "
                  "2.7x the fp32 time with AVX-512 alone, measured); precision='fp32' (the default) is the faster "
                  "choice here, and its maps carry no bf16 rounding (docs/performance.md, 'precision')",
                  stacklevel=user_stacklevel())
