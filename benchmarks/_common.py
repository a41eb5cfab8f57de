"""The setup every benchmark script shares: the workload, the bare passes, spreads, the machine and its load.

Not part of salience and not run by the tests. Scripts import it as ``from _common import ...``
after putting this folder on ``sys.path`` (they are run as ``python benchmarks/NAME.py``).
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent


def peak_rss_bytes() -> int:
    """This process's peak resident memory, in bytes.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's own memory
    map, which starts afresh at ``exec``. Not ``getrusage(...).ru_maxrss``: Linux carries a parent's
    high-water mark into a child across ``fork`` + ``exec`` (``subprocess`` forks the benchmark's
    parent), so a small case run from a big parent reports the parent's peak (every case of the
    resnet50 table read 3335.3 MiB that way). Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def make_model(name: str, threads: int, *, seed: int = 0) -> torch.nn.Module:
    """A torchvision model with random weights (seeded), in eval mode; sets torch's thread count."""
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()


def make_images(batch: int, size: int, *, seed: int = 1) -> torch.Tensor:
    """``(batch, 3, size, size)`` uniform random images, the same for every script."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def predicted(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The predicted class of each image ``(B,)``: the target every case explains."""
    with torch.no_grad():
        return model(x).argmax(1)


def make_workload(name: str, batch: int, size: int, threads: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, x, target)``: the model, ``batch`` images of ``size`` x ``size``, their predicted classes."""
    model = make_model(name, threads)
    x = make_images(batch, size)
    return model, x, predicted(model, x)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every parameter frozen: what the bare passes run on."""
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def bare(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, n_images: int) -> torch.Tensor:
    """The floor: forward + input gradient of ``n_images`` images in batches of ``len(x)``
    (``model``'s parameters frozen: :func:`frozen_copy`). What any implementation must pay."""
    done, g = 0, x
    while done < n_images:
        n = min(x.shape[0], n_images - done)
        xi = x[:n].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(xi)
            (g,) = torch.autograd.grad(out.gather(1, target[:n].view(-1, 1)).sum(), xi)
        done += n
    return g


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(min, median, max)``."""
    return min(values), statistics.median(values), max(values)


def fmt_spread(values: Sequence[float], digits: int = 3) -> str:
    """``"min / median / max"``."""
    return " / ".join(f"{v:.{digits}f}" for v in spread(values))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_isa() -> str:
    """The vector units the CPU's flags show (``/proc/cpuinfo``), for a table's CPU line: the same model name
    ("AMD EPYC") has come with and without AVX-512 on this project's machines, and bf16 speed depends on it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16, no AMX"
    if "avx512f" in flags:
        return "AVX-512, no BF16"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def machine_info(device: str = "cpu") -> dict:
    """What ran the benchmark: CPU, CPU count, memory, versions, the load average now."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "device": device, "loadavg_start": os.getloadavg()}
    for pkg in ("salience", "torchvision", "captum", "grad-cam"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(load_start: Sequence[float], load_end: Sequence[float]) -> str:
    """One sentence on the machine and its load, for a results file."""
    cpus = os.cpu_count()
    return (f"Machine: {cpu_name()}, {cpus} CPUs; torch {torch.__version__}. Load average (1, 5, 15 min) "
            f"{tuple(round(v, 2) for v in load_start)} at the start, {tuple(round(v, 2) for v in load_end)} at the "
            f"end" + (" (above the CPU count: other work competed for the CPU, timings are noisy)."
                      if max(load_start[0], load_end[0]) > (cpus or 1) else "."))


def pick_device(name: str) -> torch.device:
    """``torch.device(name)`` ("cpu" or "cuda"); a clear exit when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return device


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, Optional[float], object]:
    """Run ``fn()`` once: ``(wall s, process CPU s, peak MiB, what fn returned)``.

    On CUDA the kernels run asynchronously: the device is synchronized before the clock starts and
    before it stops, so the wall time is the work's, not its launch's; the peak is
    ``torch.cuda.max_memory_allocated`` of this call (the statistics reset just before it: the
    model's weights and the inputs already resident are counted in it). ``None`` on a CPU."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    return wall, cpu, peak, value


def cuda_info(device: torch.device) -> dict:
    """The GPU and the settings its float32 timings depend on (TF32), for a results file; ``{}`` on a CPU."""
    if device.type != "cuda":
        return {}
    info: dict = {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
                  "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                  "float32_matmul_precision": torch.get_float32_matmul_precision(),
                  "resident_mib": torch.cuda.memory_allocated(device) / 2 ** 20,
                  "total_mib": torch.cuda.get_device_properties(device).total_memory / 2 ** 20}
    for name, obj in (("fp32_precision_matmul", torch.backends.cuda.matmul),
                      ("fp32_precision_cudnn_conv", getattr(torch.backends.cudnn, "conv", None))):
        value = getattr(obj, "fp32_precision", None)  # the newer setting (torch >= 2.9), where present
        if value is not None:
            info[name] = value
    return info


def compare_maps(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """How far ``other`` is from ``ref`` (maps of the same shape ``(B, ...)``): the largest absolute
    difference over the reference's largest absolute value, the relative L2 ``||other - ref|| / ||ref||``, and
    the Pearson correlation of all values and the lowest of each image's own (float64 on the CPU)."""
    a = ref.detach().to("cpu", torch.float64).reshape(ref.shape[0], -1)
    b = other.detach().to("cpu", torch.float64).reshape(other.shape[0], -1)

    def corr(u: torch.Tensor, v: torch.Tensor) -> float:
        u, v = u - u.mean(), v - v.mean()
        den = float(u.norm() * v.norm())
        return float((u * v).sum()) / den if den > 0 else float("nan")

    return {"rel_max_abs_diff": float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)),
            "rel_l2": float((a - b).norm() / a.norm().clamp_min(1e-300)),
            "corr": corr(a.flatten(), b.flatten()), "corr_min_image": min(corr(u, v) for u, v in zip(a, b))}
