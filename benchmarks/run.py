"""Time salience and its peers in the same run; write benchmarks/results.md and results.json.

Each case runs in a fresh subprocess (so one case's memory cannot flatter or hurt the next),
under a memory cap: on CPU an address-space limit (``RLIMIT_AS``) of what the process had after
its imports plus ``--cap-gib`` (never more than the machine's available memory less 3 GiB: it is
shared); a case that needs more fails its allocation and is recorded as "exceeded N GiB" instead
of taking the machine down. A child times ``--repeats`` runs (at least 3, after a warm-up, when a
run is under 5 s) and reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), the load
average, and the chunk sizes salience chose; on CUDA also ``torch.cuda.max_memory_allocated``.
The multi-pass cases and their floors run in ``--rounds`` interleaved rounds (a fresh process per
case per round), so that load from other work on a shared machine hits them alike; a case's time
is the median (and minimum) over all its runs. Results are rewritten after every case.

Workload (default): torchvision ``resnet50`` with random weights, 8 images of 224x224,
``torch.set_num_threads(2)``. ``--quick``: resnet18, 8 images of 112x112, 2 repeats.

    python benchmarks/run.py --quick                     # try it (a few minutes)
    python benchmarks/run.py                             # the full run (tens of minutes on 2 cores)
    python benchmarks/run.py --cases sal_sg16,captum_nt_batched --repeats 1
    python benchmarks/run.py --device cuda               # on a GPU

"Bare" cases are the floor: one forward plus ``torch.autograd.grad`` w.r.t. the input (params
frozen), for as many images as the method evaluates (8 / 128 for 16 noisy copies / 256 for 32
path points), in batches of the same size as the input batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (group, what it is)
CASES: dict[str, tuple[str, str]] = {
    "bare_1": ("floor", "forward + input grad, B images"),
    "bare_sg16": ("floor", "forward + input grad, 16*B images (batches of B)"),
    "bare_ig32": ("floor", "forward + input grad, 32*B images (batches of B)"),
    "sal_vanilla": ("vanilla", "salience.vanilla"),
    "captum_saliency": ("vanilla", "captum Saliency(abs=False)"),
    "sal_guided": ("guided", "salience.guided_backprop"),
    "captum_guided": ("guided", "captum GuidedBackprop"),
    "sal_gradcam": ("gradcam", "salience.gradcam(layer4)"),
    "captum_layergradcam": ("gradcam", "captum LayerGradCam(layer4) + upsample"),
    "gradcam_lib": ("gradcam", "pytorch-grad-cam GradCAM(layer4)"),
    "sal_guided_gradcam": ("guided_gradcam", "salience.guided_gradcam(layer4)"),
    "captum_guided_gradcam": ("guided_gradcam", "captum GuidedGradCam(layer4)"),
    "sal_ixg": ("input_x_gradient", "salience.input_x_gradient"),
    "captum_ixg": ("input_x_gradient", "captum InputXGradient"),
    "sal_sg16": ("smoothgrad16", "salience.smoothgrad(samples=16), default chunking"),
    "captum_nt": ("smoothgrad16", "captum NoiseTunnel(Saliency) nt_samples=16, defaults"),
    "captum_nt_b1": ("smoothgrad16", "captum NoiseTunnel(Saliency) nt_samples=16, nt_samples_batch_size=1 (B per pass)"),
    "captum_nt_batched": ("smoothgrad16", "captum NoiseTunnel(Saliency) nt_samples=16, nt_samples_batch_size=2 (2B per pass)"),
    "sal_ig32": ("ig32", "salience.integrated_gradients(steps=32), default chunking"),
    "captum_ig": ("ig32", "captum IntegratedGradients n_steps=32, defaults"),
    "captum_ig_b8": ("ig32", "captum IntegratedGradients n_steps=32, internal_batch_size=B (B per pass)"),
    "captum_ig_batched": ("ig32", "captum IntegratedGradients n_steps=32, internal_batch_size=2B (2B per pass)"),
    "sal_sg50": ("memory", "salience.smoothgrad(samples=50), default chunking"),
    "sal_sg100": ("memory", "salience.smoothgrad(samples=100), default chunking"),
    "sal_ig64": ("memory", "salience.integrated_gradients(steps=64), default chunking"),
}
QUICK_SKIP = {"sal_ig64"}
# not run unless named with --cases (long on 2 cores; sal_sg16 and sal_sg50 already show the flat peak)
OPTIONAL = {"sal_sg100"}
# group -> the floor its cases are held to (how many forward+backward passes the method needs)
FLOOR = {"vanilla": "bare_1", "guided": "bare_1", "gradcam": "bare_1", "guided_gradcam": "bare_1",
         "input_x_gradient": "bare_1", "smoothgrad16": "bare_sg16", "ig32": "bare_ig32"}
# the cases that get several rounds (--rounds): the multi-pass comparisons and their floors. Captum's
# defaults are far enough behind (and heavy enough) for one round; single-pass cases time several runs in one
# process; the memory group is about peak memory.
ROUNDED = {c for c, (g, _) in CASES.items() if g in ("floor", "smoothgrad16", "ig32")} - {"captum_nt", "captum_ig"}


def _merge(old, new: dict) -> dict:
    """Fold one more round of a case into its record: all times, the highest peak, every load average."""
    if old is None or "error" in old:
        new = dict(new)
        if "times_s" in new:
            new["loadavg"] = [new["loadavg"]]
            new["median_s"], new["min_s"] = statistics.median(new["times_s"]), min(new["times_s"])
        return new
    if "error" in new:
        old.setdefault("errors", []).append(new["error"])
        return old
    old["times_s"] += new["times_s"]
    old["median_s"], old["min_s"] = statistics.median(old["times_s"]), min(old["times_s"])
    old["peak_rss_mib"] = max(old["peak_rss_mib"], new["peak_rss_mib"])
    old["loadavg"].append(new["loadavg"])
    for k in ("chunks", "per_item_mib", "cuda_peak_mib"):
        if k in new:
            old[k] = new[k]
    return old


# ----------------------------------------------------------------------------- child


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


def _record_chunks() -> list:
    """Wrap salience's engine so the child can report the chunk sizes it chose (last call)."""
    from salience._core import engine as _engine

    seen: list = []
    inner = _engine.accumulate

    def accumulate(*args, **kwargs):
        sums = inner(*args, **kwargs)
        seen[:] = [sums.chunks, sums.per_item_bytes]
        return sums

    _engine.accumulate = accumulate
    return seen


def child(case: str, cfg: dict) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(cfg["threads"])
    import salience  # noqa: F401  (imports before the cap is set)
    import captum.attr  # noqa: F401
    import pytorch_grad_cam  # noqa: F401

    device = torch.device(cfg["device"])
    cap_gib = None
    if device.type == "cpu" and cfg["cap_gib"] > 0 and sys.platform.startswith("linux"):
        # The machine is shared: never more than what is available now, less 3 GiB for the others.
        cap_gib = min(cfg["cap_gib"], max(1.0, _available_gib() - 3.0))
        cap = _vm_bytes() + int(cap_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(f"cap_gib={cap_gib:.2f}", file=sys.stderr, flush=True)
    chunks = _record_chunks()
    torch.manual_seed(0)
    model = getattr(torchvision.models, cfg["model"])(weights=None).to(device).eval()
    if case.startswith("bare_"):  # the floor: no parameter gradients anywhere (salience freezes them itself)
        for p in model.parameters():
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g).to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    fn = _case_fn(case, model, x, target)
    times = []

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del out
        return dt

    first = once()
    repeats = cfg["repeats"]
    if first < cfg["warmup_below_s"]:  # short: the first run was a warm-up, time at least 3
        times = [once() for _ in range(max(3, repeats))]
    else:
        times = [first] + [once() for _ in range(repeats - 1)]
    res = {
        "case": case,
        "times_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cap_gib": cap_gib,
        "loadavg": os.getloadavg(),
    }
    if chunks:
        res["chunks"] = chunks[0][:3] + (["..."] if len(chunks[0]) > 3 else []) + [f"{len(chunks[0])} chunks"]
        res["per_item_mib"] = None if chunks[1] is None else chunks[1] / 2 ** 20
    if device.type == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return res


def _bare(model, x, target, n_images: int):
    import torch

    def run():
        done = 0
        while done < n_images:
            n = min(x.shape[0], n_images - done)
            xi = x[:n].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = model(xi)
                score = out.gather(1, target[:n].view(-1, 1)).sum()
                (gx,) = torch.autograd.grad(score, xi)
            done += n
        return gx

    return run


def _case_fn(case: str, model, x, target):
    import captum.attr as ca
    import torch
    import torch.nn.functional as F

    import salience

    layer = model.layer4
    size = tuple(x.shape[-2:])
    b = x.shape[0]
    if case == "bare_1":
        return _bare(model, x, target, b)
    if case == "bare_sg16":
        return _bare(model, x, target, 16 * b)
    if case == "bare_ig32":
        return _bare(model, x, target, 32 * b)
    if case == "sal_vanilla":
        return lambda: salience.vanilla(model, x, target, reduce=None)
    if case == "captum_saliency":
        return lambda: ca.Saliency(model).attribute(x, target=target, abs=False)
    if case == "sal_guided":
        return lambda: salience.guided_backprop(model, x, target, reduce=None)
    if case == "captum_guided":
        return lambda: ca.GuidedBackprop(model).attribute(x, target=target)
    if case == "sal_gradcam":
        return lambda: salience.gradcam(model, x, target, layer=layer)
    if case == "captum_layergradcam":
        return lambda: ca.LayerAttribution.interpolate(
            ca.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True), size, "bilinear")
    if case == "gradcam_lib":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = GradCAM(model=model, target_layers=[layer])
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        return lambda: cam(input_tensor=x, targets=targets)
    if case == "sal_guided_gradcam":
        return lambda: salience.guided_gradcam(model, x, target, layer=layer, reduce=None)
    if case == "captum_guided_gradcam":
        return lambda: ca.GuidedGradCam(model, layer).attribute(x, target=target)
    if case == "sal_ixg":
        return lambda: salience.input_x_gradient(model, x, target, reduce=None)
    if case == "captum_ixg":
        return lambda: ca.InputXGradient(model).attribute(x, target=target)
    if case.startswith("sal_sg"):
        n = int(case[len("sal_sg"):])
        return lambda: salience.smoothgrad(model, x, target, samples=n, noise=0.15, reduce=None)
    if case in ("captum_nt", "captum_nt_b1", "captum_nt_batched"):
        nt = ca.NoiseTunnel(ca.Saliency(model))
        stdevs = 0.15 * float(x.max() - x.min())
        kw = {"captum_nt": {}, "captum_nt_b1": {"nt_samples_batch_size": 1},
              "captum_nt_batched": {"nt_samples_batch_size": 2}}[case]
        return lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=16, stdevs=stdevs, target=target,
                                    abs=False, **kw)
    if case.startswith("sal_ig"):
        n = int(case[len("sal_ig"):])
        return lambda: salience.integrated_gradients(model, x, target, steps=n, reduce=None)
    if case in ("captum_ig", "captum_ig_b8", "captum_ig_batched"):
        ig = ca.IntegratedGradients(model)
        kw = {"captum_ig": {}, "captum_ig_b8": {"internal_batch_size": b},
              "captum_ig_batched": {"internal_batch_size": 2 * b}}[case]
        return lambda: ig.attribute(x, target=target, n_steps=32, method="riemann_trapezoid", **kw)
    raise SystemExit(f"unknown case {case}")


# ----------------------------------------------------------------------------- parent


def machine_info(device: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
        "device": device,
    }
    try:
        import captum
        import pytorch_grad_cam  # noqa: F401
        from importlib.metadata import version

        info["captum"] = captum.__version__
        info["grad-cam"] = version("grad-cam")
        info["torchvision"] = version("torchvision")
        info["salience"] = version("salience")
    except Exception:
        pass
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_case(case: str, cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--config", json.dumps(cfg)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            res["wall_s"] = time.perf_counter() - t0
            return res
    err = (p.stderr or "").strip().splitlines()
    tail = err[-1] if err else f"exit code {p.returncode}"
    memory = any(s in (p.stderr or "") for s in ("MemoryError", "can't allocate memory", "out of memory",
                                                  "std::bad_alloc", "Cannot allocate memory"))
    if memory or p.returncode in (-9, 137):
        cap = [ln for ln in (p.stderr or "").splitlines() if ln.startswith("cap_gib=")]
        cap_gib = float(cap[-1].split("=")[1]) if cap else cfg["cap_gib"]
        return {"case": case, "error": f"exceeded {cap_gib:.1f} GiB", "detail": tail[-300:]}
    return {"case": case, "error": tail[-300:]}


def _fmt_mib(v) -> str:
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def write_results(results: list[dict], info: dict, cfg: dict, out_md: Path, out_json: Path) -> None:
    out_json.write_text(json.dumps({"machine": info, "config": cfg, "results": results}, indent=2))
    by = {r["case"]: r for r in results}
    lines = [
        "# Benchmarks: salience and its peers",
        "",
        f"Written by `python benchmarks/run.py {cfg['argv']}`. Model `{cfg['model']}` (random weights), "
        f"{cfg['batch']} images {cfg['size']}x{cfg['size']}, device `{cfg['device']}`, "
        f"{cfg['threads']} threads. Each case runs in a fresh process capped at {cfg['cap_gib']:g} GiB above its "
        f"imports; the multi-pass comparisons and their floors run in {cfg['rounds']} interleaved rounds (one "
        f"process per round); a process times {cfg['repeats']} run(s), or at least 3 after a warm-up when a run "
        f"is under {cfg['warmup_below_s']:g} s. Times are medians (and minima) over all runs of a case.",
        "",
        f"Machine: {info.get('cpu')} ({info.get('cpus')} CPUs), {info.get('mem_total_gib')} GiB RAM"
        + (f", GPU {info['gpu']}" if info.get("gpu") else "")
        + f"; Python {info['python']}, torch {info['torch']}, captum {info.get('captum')}, "
        f"grad-cam {info.get('grad-cam')}. Load average at start {tuple(round(v, 2) for v in info['loadavg_start'])}, "
        f"at end {tuple(round(v, 2) for v in info.get('loadavg_end', (0, 0, 0)))} (the CPU was shared; timings are noisy).",
        "",
        "| group | case | what | median s | min s | runs | vs floor | vs salience | peak RSS | load |" + (" CUDA peak |" if cfg["device"] == "cuda" else ""),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cfg["device"] == "cuda" else ""),
    ]
    sal_of_group = {CASES[c][0]: c for c in CASES if c.startswith("sal_") and CASES[c][0] != "memory"}
    for r in results:
        case = r["case"]
        group, what = CASES[case]
        if "error" in r:
            lines.append(f"| {group} | {case} | {what} | {r['error']} | | | | | | |" + (" |" if cfg["device"] == "cuda" else ""))
            continue
        med = r["median_s"]
        floor = by.get(FLOOR.get(group, ""))
        vs_floor = f"{med / floor['median_s']:.2f}x" if floor and "median_s" in floor else ""
        sal = by.get(sal_of_group.get(group, ""))
        vs_sal = (f"{med / sal['median_s']:.2f}x" if sal and "median_s" in sal and not case.startswith(("sal_", "bare_"))
                  else "")
        load = "/".join(f"{la[0]:.1f}" for la in r.get("loadavg", []))
        row = (f"| {group} | {case} | {what} | {med:.3f} | {r['min_s']:.3f} | {len(r['times_s'])} | {vs_floor} | "
               f"{vs_sal} | {_fmt_mib(r['peak_rss_mib'])} | {load} |")
        if cfg["device"] == "cuda":
            row += f" {_fmt_mib(r.get('cuda_peak_mib', 0))} |"
        lines.append(row)
    lines += [
        "",
        "\"vs floor\": the case's median time over the bare passes its method needs (forward + input gradient of as many "
        "images, in batches of B). \"vs salience\": a peer's time over salience's for the same group (> 1: salience "
        "is faster). \"load\": the 1-minute load average when each round of the case ended (2 cores; above 2 means other "
        "work competed for the CPU). Peak RSS is the child process's `ru_maxrss`: it includes Python, torch and the model "
        "(see `bare_1`). \"exceeded\": the case could not allocate within its cap (the cap is the smaller of "
        "`--cap-gib` and what the shared machine had available less 3 GiB) and was stopped.",
        "",
    ]
    chunked = [r for r in results if r.get("chunks")]
    if chunked:
        lines += ["Chunks salience chose (items per pass; the first is the memory probe, one item per image):", ""]
        lines += [f"- `{r['case']}`: {', '.join(map(str, r['chunks']))}"
                  + (f"; probe {r['per_item_mib']:.0f} MiB per item" if r.get("per_item_mib") else "")
                  for r in chunked]
        lines.append("")
    out_md.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet18 at 112x112, one round")
    ap.add_argument("--cases", help="comma-separated case names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--repeats", type=int, help="timed runs per process (default 1; at least 3 after a warm-up "
                    "for runs shorter than 5 s)")
    ap.add_argument("--rounds", type=int, help="rounds over the multi-pass cases, each case in a fresh process "
                    "per round, interleaved so that the shared CPU's load hits all cases alike (default 2, quick 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", help="torchvision model (default resnet50, quick resnet18)")
    ap.add_argument("--size", type=int, help="image side (default 224, quick 112)")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=12.0, help="memory cap per case above its imports (CPU)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--out", default=str(HERE / "results"), help="output path without extension")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.config))), flush=True)
        return 0
    if args.list:
        for name, (group, what) in CASES.items():
            print(f"{name:24s} {group:18s} {what}")
        return 0
    cases = [c for c in CASES if c not in OPTIONAL] if not args.cases else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; see --list")
    if args.quick and not args.cases:
        cases = [c for c in cases if c not in QUICK_SKIP]
    cfg = {
        "model": args.model or ("resnet18" if args.quick else "resnet50"),
        "batch": args.batch,
        "size": args.size or (112 if args.quick else 224),
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats or 1,
        "rounds": args.rounds or (1 if args.quick else 2),
        "cap_gib": args.cap_gib,
        "warmup_below_s": 5.0,
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
    }
    info = machine_info(args.device)
    out = Path(args.out)
    by: dict[str, dict] = {}
    for rnd in range(cfg["rounds"]):
        for case in cases:
            if rnd and (case not in ROUNDED or case in by and "error" in by[case]):
                continue
            r = run_case(case, cfg, args.timeout)
            by[case] = _merge(by.get(case), r)
            msg = r.get("error") or (f"{statistics.median(r['times_s']):.3f} s ({len(r['times_s'])} runs), "
                                     f"peak RSS {_fmt_mib(r['peak_rss_mib'])}, load {r['loadavg'][0]:.1f}")
            print(f"round {rnd + 1}  {case:24s} {msg}", flush=True)
            # written after every case, so that an interrupted run keeps what it measured
            info["loadavg_end"] = os.getloadavg()
            info["rounds_done"] = rnd + (1 if case == cases[-1] else 0)
            write_results([by[c] for c in dict.fromkeys(cases) if c in by], info, cfg, out.with_suffix(".md"), out.with_suffix(".json"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
