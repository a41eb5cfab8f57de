"""Peak memory of the many-pass methods against the number of masks, windows and channels.

One command, one table:

    PYTHONPATH=src nice -n 19 python benchmarks/perturbation_memory.py   # writes benchmarks/perturbation-memory.{md,json}

Issue 15 asks that the memory of every many-pass method (RISE, occlusion, Score-CAM, Ablation-CAM)
not depend on the number of masks / windows / channels: the engine runs the perturbed copies in
chunks sized from a memory budget and keeps only running sums. This script measures it: each
measurement is a fresh process (``--one CASE``) that loads the model, runs the method once and
reports its peak resident memory (``ru_maxrss``), the resident memory before the call, and the
chunks the engine ran (``salience._core.engine.accumulate`` is wrapped to record them).

Cases (torchvision resnet18, random weights, 2 images of 224 x 224, the predicted classes):
RISE with 250 / 1000 / 4000 masks; occlusion with a 32-pixel window at strides 64 / 26 / 13
(16 / 81 / 256 windows: 16x); Score-CAM and Ablation-CAM on ``layer1`` (64 channels), ``layer2``
(128) and ``layer4`` (512). Memory does not depend on the machine's load, so the figures are
meaningful on a busy machine (the times are not, and are given only to show what ran).

``--quick`` is a smoke test (a tiny input and few masks): it checks that the script runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES, SIZE, WINDOW = 2, 224, 32

CASES = {
    "rise masks=250": ("rise", dict(masks=250)),
    "rise masks=1000": ("rise", dict(masks=1000)),
    "rise masks=4000": ("rise", dict(masks=4000)),
    "occlusion stride=64 (16 windows)": ("occlusion", dict(window=WINDOW, stride=64)),
    "occlusion stride=26 (81 windows)": ("occlusion", dict(window=WINDOW, stride=26)),
    "occlusion stride=13 (256 windows)": ("occlusion", dict(window=WINDOW, stride=13)),
    "scorecam layer1 (64 channels)": ("scorecam", dict(layer="layer1")),
    "scorecam layer2 (128 channels)": ("scorecam", dict(layer="layer2")),
    "scorecam layer4 (512 channels)": ("scorecam", dict(layer="layer4")),
    "ablationcam layer1 (64 channels)": ("ablationcam", dict(layer="layer1")),
    "ablationcam layer2 (128 channels)": ("ablationcam", dict(layer="layer2")),
    "ablationcam layer4 (512 channels)": ("ablationcam", dict(layer="layer4")),
}
# How the cases of one method grow: the quantity the issue says memory must not follow.
GROWTH = {"rise": "masks", "occlusion": "windows", "scorecam": "channels", "ablationcam": "channels"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(case: str, quick: bool) -> dict:
    """One measurement in this process."""
    warnings.simplefilter("ignore")
    import torch
    import torchvision

    import salience
    from salience._core import engine

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    size = 32 if quick else SIZE
    model = torchvision.models.resnet18().eval()
    x = torch.rand(IMAGES, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    method, options = CASES[case]
    options = dict(options)
    if quick and method == "rise":
        options["masks"] = max(2, options["masks"] // 100)
    if quick and method == "occlusion":
        options = dict(window=4, stride=max(1, options["stride"] // 8))
    chunks: list[list[int]] = []
    inner = engine.accumulate

    def recording(*args, **kwargs):
        sums = inner(*args, **kwargs)
        chunks.append(list(sums.chunks))
        return sums

    engine.accumulate = recording
    budget = engine.default_budget(torch.device("cpu"))
    before = _rss()
    t0 = time.perf_counter()
    getattr(salience, method)(model, x, target, **options)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    items = sum(sum(c) for c in chunks)
    return {"case": case, "method": method, "options": options, "seconds": seconds,
            "rss_before_mib": before / 2 ** 20, "peak_rss_mib": peak / 2 ** 20,
            "peak_above_mib": max(0, peak - before) / 2 ** 20, "items": items,
            "chunks": len(chunks[0]) if chunks else 0, "largest_chunk": max(chunks[0]) if chunks else 0,
            "budget_mib": budget / 2 ** 20}


def _measure(case: str, quick: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    cmd = [sys.executable, __file__, "--one", case] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdicts(rows: list[dict]) -> dict[str, str]:
    """Per method: does the peak above the start grow with the masks / windows / channels?

    The peak is bounded by the chunk, which the budget bounds; a case whose items fit in fewer
    items than one full chunk (the largest chunk smaller than another case's) runs smaller passes
    and needs less. So the verdict compares the cases whose largest chunk is the same: growth
    there (more than 10 % + 16 MiB, the spread of the allocator's pages between fresh processes)
    would be memory that follows the number of perturbations."""
    out = {}
    for method in GROWTH:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        full = max(r["largest_chunk"] for r in rs)
        same = [r for r in rs if r["largest_chunk"] == full]
        lo, hi = min(r["peak_above_mib"] for r in rs), max(r["peak_above_mib"] for r in rs)
        first, last = same[0]["peak_above_mib"], same[-1]["peak_above_mib"]
        grows = last > 1.1 * first + 16
        out[method] = (
            f"{'GROWS' if grows else 'independent'} of the {GROWTH[method]}: peak above start {lo:.0f} to "
            f"{hi:.0f} MiB over {rs[0]['items']} to {rs[-1]['items']} items ({len(same)} case(s) with the "
            f"full chunk of {full} items: {first:.0f} -> {last:.0f} MiB)")
    return out


def _table(rows: list[dict]) -> list[str]:
    lines = ["| case | items (perturbed copies) | chunks (largest) | peak RSS MiB | above start MiB | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['items']} | {r['chunks']} ({r['largest_chunk']}) | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_above_mib']:.0f} | {r['seconds']:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", metavar="CASE", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny input, few masks")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--out", default=str(HERE / "perturbation-memory"))
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.quick)))
        return
    names = args.cases.split(",") if args.cases else list(CASES)
    rows, load = [], []
    for case in names:
        before = os.getloadavg()
        r = _measure(case, args.quick)
        load.append({"case": case, "before": before, "after": os.getloadavg()})
        rows.append(r)
        print(f"{case:<36} {r['items']:6d} items {r['chunks']:4d} chunks (largest {r['largest_chunk']:4d}) "
              f"peak {r['peak_rss_mib']:6.0f} MiB, {r['peak_above_mib']:6.0f} above start, {r['seconds']:7.1f} s",
              flush=True)
    v = verdicts(rows)
    config = {"model": "torchvision resnet18, random weights", "images": IMAGES, "size": 32 if args.quick else SIZE,
              "quick": args.quick, "threads": int(os.environ.get("BENCH_THREADS", "2")), "cpus": os.cpu_count()}
    Path(args.out + ".json").write_text(json.dumps({"config": config, "rows": rows, "verdicts": v, "loadavg": load},
                                                   indent=1))
    print("\n".join(_table(rows)))
    for m, text in v.items():
        print(f"{m}: {text}")


if __name__ == "__main__":
    main()
