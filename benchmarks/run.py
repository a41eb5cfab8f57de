"""The headline benchmark: every method of salience and its peers, in one run of one command.

    python benchmarks/run.py --quick        # resnet18, 4 images 64x64, 8 samples / steps, 5 rounds (the README's table)
    python benchmarks/run.py                # resnet50, 8 images 224x224, 5 rounds (about an hour on 2 idle cores)
    python benchmarks/run.py --quick --rounds 7 --cases sal_guided,sal_vanilla,captum_guided
    python benchmarks/run.py --list

One process times every case in ``--rounds`` interleaved rounds (at least 5): each round runs each
case once, the order rotated from round to round, so a burst of load from other work on a shared
machine hits all cases alike and no case always runs first. Every case is warmed up once before
the first round. Captum's defaults for NoiseTunnel and IntegratedGradients put all samples / steps
in one pass (11.5 GiB on resnet50 with 8 images, or more than the machine has), so they run
*isolated*: each round in a fresh process under a memory cap (``--cap-gib`` above its imports,
never more than the machine's available memory less 3 GiB), where a case that needs more fails its
allocation and is recorded as "exceeded" instead of taking the machine down; a run shorter than 5 s
is warmed up there first.

Per case: min / median / max of its times over the rounds. Ratios are taken *within* a round
(the method over its floor, a peer over salience, guided backprop over vanilla) and reported as
min / median / max over the rounds: a ratio of two runs seconds apart is far less exposed to the
load than either time. A goal is "met" only when every round meets it, "not met" when no round
does, and "open" otherwise. The 1-minute load average is recorded before and after every round.

Memory: after the rounds, every multi-pass case (and the one-pass floor) runs once more in a fresh
process for its peak resident memory (``VmHWM``, the process's own high-water mark: it includes
Python, torch and the model; not ``ru_maxrss``, which Linux carries over from the parent process,
see ``_common.peak_rss_bytes``); the isolated cases report theirs from their rounds.
``--memory-again RUN.json`` repeats only the memory pass of a finished run (the same configuration)
and rewrites its tables. Nothing here is a test; CI does not run it.

Floors (``bare_*``): one forward plus ``torch.autograd.grad`` w.r.t. the input, parameters frozen,
in batches of B, for as many images as a method evaluates: B (one-pass methods), ``samples * B``
(SmoothGrad), ``steps * B`` (Integrated Gradients with the trapezoid rule).

Like for like: every case returns the raw map for the same target (the predicted class).
pytorch-grad-cam returns maps min-max scaled per image and resized with OpenCV: its case is timed
as it is (``gradcam_lib``), its scaling and resizing alone on a CAM of the layer's size
(``gradcam_lib_scaling``), and salience's Grad-CAM with the same min-max scaling added
(``sal_gradcam_scaled``), so the comparison can be read either way.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, bare, fmt_spread, frozen_copy, machine_info, make_workload, peak_rss_bytes  # noqa: E402


@dataclass(frozen=True)
class Case:
    group: str
    what: str
    role: str  # "floor", "salience", "peer", "part" (a piece of a peer's time, not compared)
    isolated: bool = False  # a fresh process per round (Captum's defaults: too big to share a process)
    memory: bool = False  # measured for peak memory in a fresh process after the rounds


CASES: dict[str, Case] = {
    "bare_1": Case("floor", "forward + input gradient, B images", "floor", memory=True),
    "sal_vanilla": Case("vanilla", "salience.vanilla", "salience"),
    "captum_saliency": Case("vanilla", "Captum Saliency(abs=False)", "peer"),
    "sal_guided": Case("guided_backprop", "salience.guided_backprop", "salience"),
    "captum_guided": Case("guided_backprop", "Captum GuidedBackprop", "peer"),
    "sal_deconvnet": Case("deconvnet", "salience.deconvnet", "salience"),
    "captum_deconvolution": Case("deconvnet", "Captum Deconvolution", "peer"),
    "sal_ixg": Case("input_x_gradient", "salience.input_x_gradient", "salience"),
    "captum_ixg": Case("input_x_gradient", "Captum InputXGradient", "peer"),
    "sal_gradcam": Case("gradcam", "salience.gradcam(layer4), raw, upsampled", "salience"),
    "captum_layergradcam": Case("gradcam", "Captum LayerGradCam(layer4) + LayerAttribution.interpolate", "peer"),
    "sal_gradcam_scaled": Case("gradcam", "salience.gradcam(layer4) + normalize (per-image min-max, as pytorch-grad-cam returns)", "part"),
    "gradcam_lib": Case("gradcam", "pytorch-grad-cam GradCAM(layer4), its min-max scaling and OpenCV resizing included", "peer"),
    "gradcam_lib_scaling": Case("gradcam", "pytorch-grad-cam's scaling and resizing alone (scale_cam_image + aggregate_multi_layers on a layer-size CAM)", "part"),
    "sal_guided_gradcam": Case("guided_gradcam", "salience.guided_gradcam(layer4)", "salience"),
    "captum_guided_gradcam": Case("guided_gradcam", "Captum GuidedGradCam(layer4)", "peer"),
    "bare_sg": Case("smoothgrad", "forward + input gradient, samples*B images (batches of B)", "floor", memory=True),
    "sal_sg": Case("smoothgrad", "salience.smoothgrad, default chunks", "salience", memory=True),
    "captum_nt_b1": Case("smoothgrad", "Captum NoiseTunnel(Saliency), nt_samples_batch_size=1 (B per pass)", "peer", memory=True),
    "captum_nt_b2": Case("smoothgrad", "Captum NoiseTunnel(Saliency), nt_samples_batch_size=2 (2B per pass)", "peer", memory=True),
    "captum_nt": Case("smoothgrad", "Captum NoiseTunnel(Saliency), defaults (all samples in one pass)", "peer", isolated=True),
    "bare_ig": Case("integrated_gradients", "forward + input gradient, steps*B images (batches of B)", "floor", memory=True),
    "sal_ig": Case("integrated_gradients", "salience.integrated_gradients, default chunks", "salience", memory=True),
    "captum_ig_b1": Case("integrated_gradients", "Captum IntegratedGradients, internal_batch_size=B (B per pass)", "peer", memory=True),
    "captum_ig_b2": Case("integrated_gradients", "Captum IntegratedGradients, internal_batch_size=2B (2B per pass)", "peer", memory=True),
    "captum_ig": Case("integrated_gradients", "Captum IntegratedGradients, defaults (all steps in one pass)", "peer", isolated=True),
}
FLOOR = {"vanilla": "bare_1", "guided_backprop": "bare_1", "deconvnet": "bare_1", "input_x_gradient": "bare_1",
         "gradcam": "bare_1", "guided_gradcam": "bare_1", "smoothgrad": "bare_sg", "integrated_gradients": "bare_ig"}
SALIENCE = {c.group: name for name, c in CASES.items() if c.role == "salience"}
# the "part" rows' ratio: (numerator, denominator, what it says)
PART = {"sal_gradcam_scaled": ("gradcam_lib", "sal_gradcam_scaled", "pytorch-grad-cam / this (both scaled)"),
        "gradcam_lib_scaling": ("gradcam_lib_scaling", "gradcam_lib", "share of pytorch-grad-cam's time")}


def peer_ratio(times: dict, name: str) -> tuple[Optional[list[float]], str]:
    """The peer / salience ratios of a row within rounds, and what they say ("" for plain peer / salience)."""
    c = CASES[name]
    if name in PART:
        a, b, what = PART[name]
        return ratios(times, a, b), what
    if c.role == "peer" and c.group in SALIENCE:
        return ratios(times, name, SALIENCE[c.group]), ""
    return None, ""


class Workload:
    """The model, images and targets of one process; the copies some cases need are made on first use."""

    def __init__(self, cfg: dict) -> None:
        import torch

        self.cfg = cfg
        self.model, x, target = make_workload(cfg["model"], cfg["batch"], cfg["size"], cfg["threads"])
        self.device = torch.device(cfg["device"])
        self.model.to(self.device)
        self.x, self.target = x.to(self.device), target.to(self.device)
        self.b = x.shape[0]

    @cached_property
    def frozen(self):
        return frozen_copy(self.model)

    @cached_property
    def cam_model(self):  # pytorch-grad-cam fills .grad of every parameter: not on the shared model
        return frozen_copy(self.model).requires_grad_(True)

    @cached_property
    def layer_cam(self):  # a CAM of the layer's size (B, h, w), what pytorch-grad-cam scales
        import salience

        return salience.gradcam(self.model, self.x, self.target, layer=self.model.layer4, upsample=False).cpu().numpy()


def case_fn(name: str, w: Workload) -> Callable[[], object]:  # long: one branch per case, a table in code
    import captum.attr as ca

    import salience

    m, x, t, b = w.model, w.x, w.target, w.b
    s, steps = w.cfg["samples"], w.cfg["steps"]
    layer = m.layer4
    size = tuple(x.shape[-2:])
    stdevs = 0.15 * float(x.max() - x.min())  # salience's noise=0.15 is relative to the input's range
    fns: dict[str, Callable[[], Callable[[], object]]] = {
        "bare_1": lambda: lambda: bare(w.frozen, x, t, b),
        "bare_sg": lambda: lambda: bare(w.frozen, x, t, s * b),
        "bare_ig": lambda: lambda: bare(w.frozen, x, t, steps * b),
        "sal_vanilla": lambda: lambda: salience.vanilla(m, x, t, reduce=None),
        "captum_saliency": lambda: lambda: ca.Saliency(m).attribute(x, target=t, abs=False),
        "sal_guided": lambda: lambda: salience.guided_backprop(m, x, t, reduce=None),
        "captum_guided": lambda: lambda: ca.GuidedBackprop(m).attribute(x, target=t),
        "sal_deconvnet": lambda: lambda: salience.deconvnet(m, x, t, reduce=None),
        "captum_deconvolution": lambda: lambda: ca.Deconvolution(m).attribute(x, target=t),
        "sal_ixg": lambda: lambda: salience.input_x_gradient(m, x, t, reduce=None),
        "captum_ixg": lambda: lambda: ca.InputXGradient(m).attribute(x, target=t),
        "sal_gradcam": lambda: lambda: salience.gradcam(m, x, t, layer=layer),
        "captum_layergradcam": lambda: lambda: ca.LayerAttribution.interpolate(
            ca.LayerGradCam(m, layer).attribute(x, target=t, relu_attributions=True), size, "bilinear"),
        "sal_gradcam_scaled": lambda: lambda: salience.normalize(salience.gradcam(m, x, t, layer=layer)),
        "gradcam_lib": lambda: _gradcam_lib(w),
        "gradcam_lib_scaling": lambda: _gradcam_lib_scaling(w),
        "sal_guided_gradcam": lambda: lambda: salience.guided_gradcam(m, x, t, layer=layer, reduce=None),
        "captum_guided_gradcam": lambda: lambda: ca.GuidedGradCam(m, layer).attribute(x, target=t),
        "sal_sg": lambda: lambda: salience.smoothgrad(m, x, t, samples=s, noise=0.15, reduce=None),
        "sal_ig": lambda: lambda: salience.integrated_gradients(m, x, t, steps=steps, reduce=None),
    }
    nt = {"captum_nt_b1": {"nt_samples_batch_size": 1}, "captum_nt_b2": {"nt_samples_batch_size": 2}, "captum_nt": {}}
    ig = {"captum_ig_b1": {"internal_batch_size": b}, "captum_ig_b2": {"internal_batch_size": 2 * b}, "captum_ig": {}}
    if name in nt:
        tunnel = ca.NoiseTunnel(ca.Saliency(m))
        return lambda: tunnel.attribute(x, nt_type="smoothgrad", nt_samples=s, stdevs=stdevs, target=t, abs=False,
                                        **nt[name])
    if name in ig:  # the trapezoid rule: the same points (and passes) as salience's default
        igm = ca.IntegratedGradients(m)
        return lambda: igm.attribute(x, target=t, n_steps=steps, method="riemann_trapezoid", **ig[name])
    return fns[name]()


def _gradcam_lib(w: Workload) -> Callable[[], object]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(int(c)) for c in w.target]

    def run():  # hooks registered and released per call, so they never run under the other cases
        with GradCAM(model=w.cam_model, target_layers=[w.cam_model.layer4]) as cam:
            return cam(input_tensor=w.x, targets=targets)

    return run


def _gradcam_lib_scaling(w: Workload) -> Callable[[], object]:
    import numpy as np
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    size = (w.x.shape[-1], w.x.shape[-2])  # OpenCV's (width, height)
    with GradCAM(model=w.cam_model, target_layers=[w.cam_model.layer4]) as cam:
        aggregate = cam.aggregate_multi_layers  # what BaseCAM.forward runs after the CAM itself
    layer_cam = w.layer_cam
    return lambda: aggregate([scale_cam_image(np.maximum(layer_cam, 0), size)[:, None, :]])


# ----------------------------------------------------------------------------- one case in a fresh process


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return float("inf")


def child(name: str, cfg: dict) -> dict:
    """Run one case in this (fresh) process under the memory cap: its time and peak RSS."""
    import captum.attr  # noqa: F401  (imports before the cap is set)
    import pytorch_grad_cam  # noqa: F401
    import torch

    import salience  # noqa: F401

    cap_gib = None
    if cfg["device"] == "cpu" and cfg["cap_gib"] > 0 and sys.platform.startswith("linux"):
        cap_gib = min(cfg["cap_gib"], max(1.0, _available_gib() - 3.0))  # the machine is shared
        cap = _vm_bytes() + int(cap_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(f"cap_gib={cap_gib:.2f}", file=sys.stderr, flush=True)
    w = Workload(cfg)
    fn = case_fn(name, w)
    sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    dt = once()
    if dt < cfg["warmup_below_s"]:  # short: that was the warm-up
        dt = once()
    res = {"case": name, "time_s": dt, "peak_rss_mib": peak_rss_bytes() / 2 ** 20,
           "cap_gib": cap_gib, "loadavg": os.getloadavg()}
    if w.device.type == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated(w.device) / 2 ** 20
    return res


def run_child(name: str, cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--config", json.dumps(cfg)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": name, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = p.stderr or ""
    tail = err.strip().splitlines()[-1] if err.strip() else f"exit code {p.returncode}"
    if p.returncode in (-9, 137) or any(s in err for s in ("MemoryError", "can't allocate memory", "out of memory",
                                                            "std::bad_alloc", "Cannot allocate memory")):
        caps = [ln for ln in err.splitlines() if ln.startswith("cap_gib=")]
        return {"case": name, "error": f"exceeded {float(caps[-1].split('=')[1]) if caps else cfg['cap_gib']:.1f} GiB"}
    return {"case": name, "error": tail[-300:]}


# ----------------------------------------------------------------------------- the rounds


def timed_rounds(names: list[str], cfg: dict, timeout: float) -> tuple[dict, list]:  # long: warm-up, rounds, sweeps
    """Every case once per round, the order rotated each round. Returns ``{case: [time per round or None]}``,
    errors and the load average before and after each round. With ``cfg["repeats"]`` K > 1 a round
    sweeps the in-process cases K times (each sweep in another rotation) and keeps each case's fastest
    sweep (``timeit``'s rule: the minimum is the run least disturbed by other work); isolated cases
    run once a round."""
    import torch

    w = Workload(cfg)
    sync = torch.cuda.synchronize if w.device.type == "cuda" else (lambda: None)
    isolated = {n for n in names if CASES[n].isolated and cfg["isolate"]}
    fns = {n: case_fn(n, w) for n in names if n not in isolated}
    for n, fn in fns.items():  # warm-up
        fn()
        print(f"warm-up  {n}", flush=True)
    times: dict[str, list] = {n: [] for n in names}
    cpu: dict[str, list] = {n: [] for n in names}  # process CPU time (all threads); isolated cases: None
    extra: dict[str, dict] = {n: {} for n in names}
    rounds = []
    repeats = max(1, int(cfg.get("repeats", 1)))
    for r in range(cfg["rounds"]):
        load0, t_round = os.getloadavg(), time.perf_counter()
        best: dict[str, tuple[float, float]] = {}
        for i in range(repeats):
            k = (r * repeats + i) % len(names)
            for n in names[k:] + names[:k]:
                if n in isolated:
                    if i == 0:
                        _isolated_once(n, cfg, timeout, times, cpu, extra)
                    continue
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fns[n]()
                sync()
                t = (time.perf_counter() - t0, time.process_time() - c0)
                best[n] = min(best.get(n, t), t)
                print(f"round {r + 1}.{i + 1}  {n:22s} {t[0]}", flush=True)
        for n, (t, c) in best.items():
            times[n].append(t)
            cpu[n].append(c)
        rounds.append({"loadavg_before": load0, "loadavg_after": os.getloadavg(),
                       "wall_s": time.perf_counter() - t_round})
        print(f"round {r + 1} done: load {load0[0]:.1f} -> {rounds[-1]['loadavg_after'][0]:.1f}", flush=True)
    return {"times": times, "cpu": cpu, "extra": extra}, rounds


def _isolated_once(n: str, cfg: dict, timeout: float, times: dict, cpu: dict, extra: dict) -> None:
    """One round of an isolated case: a fresh process under the memory cap (a case that failed once,
    e.g. over the cap, is not run again: it would fail again)."""
    if "error" in extra[n]:
        times[n].append(None)
        return
    res = run_child(n, cfg, timeout)
    times[n].append(res.get("time_s"))
    cpu[n].append(None)
    if "error" in res:
        extra[n]["error"] = res["error"]
    else:
        extra[n]["peak_rss_mib"] = max(extra[n].get("peak_rss_mib", 0), res["peak_rss_mib"])
    print(f"round     {n:22s} {times[n][-1] if times[n][-1] is not None else extra[n].get('error')}", flush=True)


def ratios(times: dict, a: str, b: str) -> Optional[list[float]]:
    """``a / b`` within each round where both ran."""
    if a not in times or b not in times:
        return None
    out = [x / y for x, y in zip(times[a], times[b]) if x is not None and y is not None]
    return out or None


def verdict(rs: Optional[list[float]], goal: float, below: bool = True) -> str:
    """"met" when every round meets ``ratio <= goal`` (``>=`` when ``below`` is False), "not met" when
    none does, else "open"."""
    if not rs:
        return "not measured"
    ok = [(r <= goal) if below else (r >= goal) for r in rs]
    return "**met**" if all(ok) else ("**not met**" if not any(ok) else "**open** (the spread straddles it)")


def goals(times: dict, cpu: dict, memory: dict, memory_runs: Optional[dict] = None) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows; the verdict is the wall-time one, CPU-time ratios are shown beside it."""
    rows = []
    for g, goal in (("sal_guided", 1.05), ("sal_deconvnet", 1.05)):
        rs = ratios(times, g, "sal_vanilla")
        rows.append((f"`{g[4:]}` within {goal:.2f}x of `vanilla`", _fr(rs) + _cpu(cpu, g, "sal_vanilla"),
                     verdict(rs, goal)))
    for grp, sal in SALIENCE.items():
        rs = ratios(times, sal, FLOOR[grp])
        rows.append((f"`{grp}` within 1.10x of its bare passes", _fr(rs) + _cpu(cpu, sal, FLOOR[grp]),
                     verdict(rs, 1.10)))
    for grp, peers in (("smoothgrad", ("captum_nt_b1", "captum_nt_b2", "captum_nt")),
                       ("integrated_gradients", ("captum_ig_b1", "captum_ig_b2", "captum_ig"))):
        for p in peers:
            rs = ratios(times, p, SALIENCE[grp])
            rows.append((f"`{grp}` faster than {CASES[p].what}", _fr(rs, "Captum / salience "), verdict(rs, 1.0, below=False)))
        rs = ratios(times, peers[-1], SALIENCE[grp])
        rows.append((f"`{grp}` at least 1.5x faster than Captum's defaults", _fr(rs, "Captum / salience "),
                     verdict(rs, 1.5, below=False)))
        row = _memory_goal(grp, SALIENCE[grp], peers[:2], memory, memory_runs or {})
        if row:
            rows.append(row)
    return rows


def _memory_goal(grp: str, sal: str, peers: tuple, memory: dict, runs: dict) -> Optional[tuple[str, str, str]]:
    """Lower peak memory than each peer: met when every run of salience's peaks below every run of
    each peer, not met when every run peaks above every run of one peer, open otherwise."""
    got = {n: runs.get(n) or ([memory[n]] if memory.get(n) else []) for n in (sal, *peers)}
    if not all(got.values()):
        return None
    s = got[sal]
    verdict = ("**met**" if all(max(s) < min(got[p]) for p in peers)
               else "**not met**" if any(min(s) > max(got[p]) for p in peers) else "**open**")

    def spread(v: list) -> str:
        return f"{_mib(min(v))} / {_mib(statistics.median(v))} / {_mib(max(v))}" if len(v) > 1 else _mib(v[0])

    return (f"`{grp}` lower peak memory than Captum batched (B and 2B per pass)",
            f"{spread(s)} vs " + ", ".join(spread(got[p]) for p in peers)
            + f" (min / median / max over {min(len(v) for v in got.values())} fresh processes each)", verdict)


def _cpu(cpu: dict, a: str, b: str) -> str:
    rs = ratios(cpu, a, b)
    return f"; CPU time {fmt_spread(rs)}" if rs else ""


def _fr(rs: Optional[list[float]], prefix: str = "") -> str:
    return f"{prefix}{fmt_spread(rs)} (min / median / max over {len(rs)} rounds)" if rs else "not measured"


def _mib(v: float) -> str:
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def summary(report: dict) -> str:
    """The compact table (the README's): per method, salience and each peer, medians, ratios within rounds."""
    times, mem = report["times"], report["memory"]
    lines = ["| method | case | median s | vs bare passes | peer / salience (> 1: salience faster) | peak RSS |",
             "|---|---|---:|---|---|---:|"]
    for name, c in CASES.items():
        if name not in times or c.role == "floor":
            continue
        ok = [t for t in times[name] if t is not None]
        med = (f"{statistics.median(ok):.3f}" if statistics.median(ok) >= 0.1 else f"{statistics.median(ok):.5f}"
               ) if ok else report["extra"][name].get("error", "no run")
        fl = ratios(times, name, FLOOR.get(c.group, "")) if c.role in ("salience", "peer") else None
        pr, say = peer_ratio(times, name)
        lines.append(f"| {c.group if c.role == 'salience' else ''} | {c.what} | {med} | "
                     f"{fmt_spread(fl, 2) if fl else ''} | {(say + ': ' if say else '') + fmt_spread(pr, 4 if say.startswith('share') else 2) if pr else ''} | "
                     f"{_mib(mem[name]) if name in mem else ''} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:  # long: the whole results file, one table after the other
    cfg, info, times, extra, mem = (report["config"], report["machine"], report["times"], report["extra"],
                                    report["memory"])
    loads = [rd["loadavg_before"][0] for rd in report["rounds"]] + [report["rounds"][-1]["loadavg_after"][0]]
    lines = [
        "# Benchmarks: salience and its peers, one run",
        "",
        f"Written by `{report['command']}`: torchvision `{cfg['model']}` (random weights), {cfg['batch']} images "
        f"{cfg['size']}x{cfg['size']}, device `{cfg['device']}`, {cfg['threads']} threads; SmoothGrad "
        f"{cfg['samples']} samples, Integrated Gradients {cfg['steps']} steps (trapezoid). {cfg['rounds']} interleaved "
        f"rounds in one process (order rotated each round, every case warmed up first"
        + (f"; each round {cfg['repeats']} sweeps, each case keeping its fastest" if cfg.get("repeats", 1) > 1 else "")
        + "); Captum's defaults "
        + ("isolated, a fresh process per round. " if cfg.get("isolate", True) else "in the same process. ") + f"Times in seconds: min / median / max over the rounds. Ratios are taken within "
        f"each round, then min / median / max. Total {report['wall_s'] / 60:.1f} min.",
        "",
        f"Machine: {info['cpu']}, **{info['cpus']} CPUs**, {info['mem_total_gib']} GiB RAM"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + f"; Python {info['python']}, torch {info['torch']}, torchvision {info.get('torchvision')}, captum "
        f"{info.get('captum')}, grad-cam {info.get('grad-cam')}. **1-minute load average** at the start of each round "
        f"and at the end: {' / '.join(f'{v:.1f}' for v in loads)} (5-min {report['rounds'][0]['loadavg_before'][1]:.1f} "
        f"-> {report['rounds'][-1]['loadavg_after'][1]:.1f}). "
        + ("**The machine was shared with other jobs (load above the CPU count): times are inflated and noisy; the "
           "within-round ratios are the figures to read.**" if max(loads) > (info["cpus"] or 1) else ""),
        *(["", f"Peak memory measured again by `{report['memory_run']['command']}` on {report['memory_run']['date']} "
              f"({report['memory_run']['measure']}), in place of the run's own memory pass"
              + (f": {report['memory_run']['why']}" if report['memory_run'].get("why") else ".")]
            if report.get("memory_run") else []),
        "",
        "## Summary", "", "Medians; ratios within rounds as min / median / max.", "", summary(report), "",
        "## Every case", "",
        "| group | case | what | time, s | vs floor | peer / salience | peak RSS |",
        "|---|---|---|---|---|---|---:|",
    ]
    for name, ts in times.items():
        c = CASES[name]
        ok = [t for t in ts if t is not None]
        if not ok:
            lines.append(f"| {c.group} | `{name}` | {c.what} | {extra[name].get('error', 'no run')} | | | |")
            continue
        fl = ratios(times, name, FLOOR[c.group]) if c.role in ("salience", "peer") and c.group in FLOOR else None
        pr, say = peer_ratio(times, name)
        flag = " **(salience slower)**" if pr and statistics.median(pr) < 1 and c.role == "peer" else ""
        m = mem.get(name)
        lines.append(f"| {c.group} | `{name}` | {c.what} | {fmt_spread(ok, 3 if max(ok) >= 0.1 else 5)}{'' if len(ok) == len(ts) else ' (' + str(len(ok)) + ' runs)'} | "
                     f"{fmt_spread(fl) if fl else ''} | {(say + ': ' if say else '') + fmt_spread(pr, 5 if say.startswith('share') else 3) + flag if pr else ''} | {_mib(m) if m else ''} |")
    lines += [
        "",
        "\"vs floor\": the case's time over the bare passes its method needs, in the same round. \"peer / salience\": "
        "the case's time over salience's for the same map, in the same round (> 1: salience is faster); for the "
        "two Grad-CAM rows that time a part, the ratio they name. Peak RSS: "
        "`VmHWM` of a fresh process that ran the case once, the median over the memory pass's processes (it "
        "includes Python, torch and the model; see `bare_1`); blank: not measured (one-pass cases all sit near the floor's).",
        "",
        "## Goals",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in goals(times, report.get("cpu", {}), mem, report.get("memory_runs"))]
    lines += ["", "A goal is met only when every round meets its wall-time ratio, not met when no round does, open "
              "otherwise. \"CPU time\": the same ratios in the process's CPU time (`time.process_time`, all threads), "
              "which time spent waiting for a core does not inflate.", ""]
    return "\n".join(lines)


def memory_pass(names: list[str], cfg: dict, timeout: float, runs: int = 3) -> dict[str, list[float]]:
    """Each case that has a memory mark ``runs`` times, each in a fresh process, the cases
    interleaved: ``{name: [peak MiB per run]}`` (the tables show the median). One run is not enough:
    the same passes peak 0.1 GiB apart from one process to the next (glibc's arenas)."""
    peaks: dict[str, list[float]] = {}
    todo = [n for n in names if CASES[n].memory]
    for r in range(runs):
        for n in todo:
            res = run_child(n, cfg, timeout)
            if "peak_rss_mib" in res:
                peaks.setdefault(n, []).append(res["peak_rss_mib"])
            print(f"memory {r + 1} {n:22s} {_mib(res['peak_rss_mib']) if 'peak_rss_mib' in res else res.get('error')}",
                  flush=True)
    return peaks


def memory_again(path: Path, timeout: float, runs: int) -> int:
    """Repeat the memory pass of the finished run ``path`` (.json) and rewrite its .json and .md.
    The timed rounds are kept; the memory column says which command measured it and when."""
    report = json.loads(path.read_text())
    names = list(report["times"])
    memory = {n: v for n, v in report["memory"].items() if CASES[n].isolated}  # measured in their rounds
    t0 = time.perf_counter()
    report["memory_runs"] = memory_pass(names, report["config"], timeout, runs)
    report["memory"] = {**memory, **{n: statistics.median(v) for n, v in report["memory_runs"].items()}}
    report["memory_run"] = {"command": f"python benchmarks/run.py --memory-again {path} --memory-runs {runs}",
                            "date": time.strftime("%Y-%m-%d"), "wall_s": time.perf_counter() - t0,
                            "loadavg_end": os.getloadavg(), "measure": f"VmHWM of a fresh process per case, {runs} runs"}
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def main(argv=None) -> int:  # long: options, then the rounds, the memory pass and the files
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet18, 4 images 64x64, 8 samples / steps, Captum's "
                    "defaults in the same process (the README's table: what a loaded 2-core machine allows)")
    ap.add_argument("--cases", help="comma-separated case names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5 for a headline table)")
    ap.add_argument("--repeats", type=int, default=1, help="sweeps of the in-process cases per round; each case "
                    "keeps its fastest (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", help="torchvision ResNet (default resnet50, quick resnet18): Grad-CAM uses layer4")
    ap.add_argument("--size", type=int, help="image side (default 224, quick 64)")
    ap.add_argument("--batch", type=int, help="images per call (default 8, quick 4)")
    ap.add_argument("--samples", type=int, help="SmoothGrad samples (default 16, quick 8)")
    ap.add_argument("--steps", type=int, help="Integrated Gradients steps (default 16, quick 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="run Captum's defaults in a fresh process per round, under the memory cap (default: on; "
                    "off with --quick, whose defaults fit in a few hundred MiB)")
    ap.add_argument("--cap-gib", type=float, default=12.0, help="memory cap of an isolated case above its imports")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per isolated case")
    ap.add_argument("--out", help="output path without extension (default benchmarks/results, quick results-quick)")
    ap.add_argument("--from-json", help="rewrite the markdown of a finished run from its .json, run nothing")
    ap.add_argument("--memory-runs", type=int, default=3, help="fresh processes per case in the memory pass")
    ap.add_argument("--memory-again", metavar="RUN.json",
                    help="repeat only the memory pass of a finished run (its configuration) and rewrite its files")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.config))), flush=True)
        return 0
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        Path(args.from_json).with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
        return 0
    if args.memory_again:
        return memory_again(Path(args.memory_again), args.timeout, args.memory_runs)
    if args.list:
        for name, c in CASES.items():
            print(f"{name:22s} {c.group:22s} {c.what}")
        return 0
    names = list(CASES) if not args.cases else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; see --list")
    cfg = {"model": args.model or ("resnet18" if args.quick else "resnet50"), "batch": args.batch or (4 if args.quick else 8),
           "size": args.size or (64 if args.quick else 224), "isolate": not args.quick if args.isolate is None else args.isolate, "device": args.device, "threads": args.threads,
           "samples": args.samples or (8 if args.quick else 16), "steps": args.steps or (8 if args.quick else 16), "rounds": args.rounds, "repeats": args.repeats, "cap_gib": args.cap_gib,
           "warmup_below_s": 5.0}
    out = Path(args.out or HERE / ("results-quick" if args.quick else "results"))
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    data, rounds = timed_rounds(names, cfg, args.timeout)
    memory = {n: data["extra"][n]["peak_rss_mib"] for n in names if "peak_rss_mib" in data["extra"][n]}

    def write() -> dict:  # after the rounds, and again after the memory pass
        info["loadavg_end"] = os.getloadavg()
        report = {"command": command, "config": cfg, "machine": info, "rounds": rounds, "times": data["times"],
                  "cpu": data["cpu"], "extra": data["extra"], "memory": memory, "memory_runs": data.get("memory_runs", {}),
                  "wall_s": time.perf_counter() - t0}
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(markdown(report))
        return report

    write()
    if not args.no_memory:
        data["memory_runs"] = memory_pass(names, cfg, args.timeout, args.memory_runs)
        memory.update({n: statistics.median(v) for n, v in data["memory_runs"].items()})
    print(markdown(write()))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
