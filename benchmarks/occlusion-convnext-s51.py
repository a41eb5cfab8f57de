"""Session 51: occlusion on torchvision's ``convnext_tiny``, random weights (no download), 1 image 224 px, window 16 /
stride 8 (27 x 27 = 729 windows), fp32, one thread: salience's region-limited passes (this branch, ``local=True``, the
default), salience's full passes forced (this branch, ``local=False``) and Captum's ``Occlusion`` at its best
``perturbations_per_eval`` (``--probe``: 1, 4 and 16 timed once on stride 16, 196 windows, to pick it; or all three
in the rounds, ``--captum 1,4,16``).
Each measurement a fresh process (model built, one forward, then the call timed); interleaved rounds (each round the
other order); each round appends to the JSON, so rounds may run in separate lock holds. ``--main-src``: main's path
on this model (its plan only, untimed: where it cuts or why full passes).

Run as (as many rounds a lock hold as fit in --hold seconds; session 51: stride 16, see the .md):
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-convnext-s51.py --probe
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-convnext-s51.py --rounds 3 --captum 16 --stride 16
then ``--report`` writes the .md from the JSON. The maps are compared with Captum's (max |a - b|), and salience's path
(region-limited or full passes, the cut) is read from the debug log of ``salience.occlusion``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
OUT = os.path.join(HERE, "occlusion-convnext-s51.json")
WINDOW, STRIDE = 16, 8


def _setup(images: int) -> tuple:
    import torch
    from torchvision.models import convnext_tiny
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = convnext_tiny().eval()
    x = torch.rand(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = m(x).argmax(1)
    return m, x, t


def _logged() -> Any:
    """A buffer of the records of the ``salience.occlusion`` logger at debug level (its ``buffer``)."""
    import logging
    from logging.handlers import BufferingHandler
    keep = BufferingHandler(10_000)
    lg = logging.getLogger("salience.occlusion")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(keep)
    return keep


def one(config: str, save: str, images: int, stride: int) -> dict:
    """One measurement in this process: the call's seconds, what the log said, the map saved to ``save``."""
    import warnings

    import torch
    warnings.simplefilter("ignore")
    m, x, t = _setup(images)
    log = _logged()
    if config == "mainplan":  # main's plan only (untimed): its cut, or why full passes
        from salience.methods import _occlusion_local as L
        n = math.ceil((224 - WINDOW) / stride) + 1
        corners = torch.tensor([(i * stride, j * stride) for i in range(n) for j in range(n)])
        with torch.no_grad():
            out = m(x)
        p = L.plan(m, x, (WINDOW, WINDOW), (stride, stride), corners, False, out, lambda o: o)
        return {"config": config, "seconds": 0.0, "log": [p.why or f"cut at {p.cut}, saved {p.saved:.3f}"]}
    if config in ("local", "full"):
        import salience
        t0 = time.perf_counter()
        a = salience.occlusion(m, x, t, reduce=None, window=WINDOW, stride=stride, local=config == "local")
        sec = time.perf_counter() - t0
    else:
        from captum.attr import Occlusion
        t0 = time.perf_counter()
        with torch.no_grad():
            a = Occlusion(m).attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, stride, stride),
                                       target=t, baselines=0.0, perturbations_per_eval=int(config[3:]))
        sec = time.perf_counter() - t0
    torch.save(a, save)
    return {"config": config, "seconds": sec, "log": [r.getMessage() for r in log.buffer]}


def _measure(config: str, save: str, args: argparse.Namespace, stride: int, src: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=src or args.src, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--one", config, "--save", save, "--images", str(args.images),
                           "--stride", str(stride)], capture_output=True, text=True, env=env, timeout=1500)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["loadavg"] = open("/proc/loadavg").read().split()[:3]
    row["images"] = args.images
    print(config, f"{row['seconds']:.1f} s", row["log"], flush=True)
    return row


def run_round(args: argparse.Namespace, configs: list, rnd: int) -> list:
    import torch
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            row = _measure(c, os.path.join(tmp, f"{c}.pt"), args, args.stride)
            row["round"] = rnd
            row["stride"] = args.stride
            out.append(row)
        maps = {c: torch.load(os.path.join(tmp, f"{c}.pt")) for c in configs}
        ref = maps[max((c for c in configs if c.startswith("cap")), key=lambda c: int(c[3:]))]
        scale = float(ref.abs().max())
        for row in out:
            row["max_abs_diff_vs_captum"] = float((maps[row["config"]] - ref).abs().max())
            row["map_scale"] = scale
    return out


def probe(args: argparse.Namespace, data: dict) -> None:
    """Captum at perturbations_per_eval 1, 4, 16, once each on stride 16 (196 windows): the best one for the rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        for c in ("cap1", "cap4", "cap16"):
            row = _measure(c, os.path.join(tmp, f"{c}.pt"), args, 16)
            row["stride"] = 16
            data.setdefault("probe", []).append(row)
        if args.main_src:
            data["main_plan"] = _measure("mainplan", os.path.join(tmp, "m.pt"), args, STRIDE, args.main_src)


def report(path: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    by: dict = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r["seconds"])
    lines = [
        "# Occlusion on torchvision convnext_tiny, session 51",
        "",
        f"CPU: {data['cpu']} (the session-51 machine: AMD EPYC, AVX2, no AVX512), one thread on core 1, under "
        "/tmp/bench.lock. torch " + data["torch"] + ", torchvision " + data["torchvision"] + ", captum "
        + data["captum"] + ".",
        f"Random weights, {rows[0]['images']} image(s) 224 px, window {WINDOW} / stride {rows[0]['stride']} "
        f"({(math.ceil((224 - WINDOW) / rows[0]['stride']) + 1) ** 2} windows), fp32, "
        "`reduce=None`; each measurement a fresh process (model built, one forward, then the call timed); "
        f"{len(by['local'])} interleaved rounds (each round the other order).",
        "Commands: " + "; ".join(f"`{c}`" for c in data["commands"]) + ", then `--report`. Data: "
        f"benchmarks/{os.path.basename(path)}.",
        "",
        "| run | min s | median s | max s | x region-limited (median) | max abs diff vs Captum (map scale) | "
        "path (debug log) |",
        "|---|---|---|---|---|---|---|",
    ]
    med = statistics.median(by["local"])
    names = {"local": "salience region-limited (`local=True`, default)", "full": "salience full passes (`local=False`)"}
    caps = [c for c in by if c.startswith("cap")]
    best = min(caps, key=lambda c: statistics.median(by[c]))
    for c in sorted(by, key=lambda c: (c.startswith("cap"), int(c[3:]) if c.startswith("cap") else 0)):
        v = by[c]
        r = next(r for r in rows if r["config"] == c)
        name = names.get(c, f"Captum Occlusion, perturbations_per_eval={c[3:]}" + (" (best)" if c == best else ""))
        diff = max(x["max_abs_diff_vs_captum"] for x in rows if x["config"] == c)
        said = "; ".join(m.replace("|", "/") for m in r["log"]) or "-"
        lines.append(f"| {name} | {min(v):.1f} | {statistics.median(v):.1f} | {max(v):.1f} | "
                     f"{statistics.median(v) / med:.2f} | {diff:.2e} ({r['map_scale']:.2e}) | {said} |")
    lines += ["", "Per round (s): " + "; ".join(
        f"r{k}: " + ", ".join(f"{r['config']} {r['seconds']:.1f}" for r in rows if r["round"] == k)
        for k in sorted({r["round"] for r in rows})) + "."]
    if data.get("probe"):
        lines += ["", "Captum probe (stride 16, 196 windows, once each, under the load shown): " + ", ".join(
            f"perturbations_per_eval={r['config'][3:]} {r['seconds']:.1f} s (load {' '.join(r['loadavg'])})"
            for r in data["probe"]) + "."]
    if data.get("main_plan"):
        lines += ["", f"main ({data.get('main', '')}) on this model and windows, its plan (untimed): "
                  + "; ".join(data["main_plan"]["log"]) + "."]
    lines += ["", data["notes"]] if data.get("notes") else []
    lines += ["", "Load average (1, 5, 15 min) at each measurement: "
              + ", ".join(f"{r['config']} r{r['round']}: {' '.join(r['loadavg'])}" for r in rows) + "."]
    with open(path[:-5] + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path[:-5] + ".md.tmp", path[:-5] + ".md")


def _data(args: argparse.Namespace) -> dict:
    import captum
    import torch
    import torchvision
    data = json.load(open(args.out)) if os.path.exists(args.out) else {
        "rows": [], "torch": torch.__version__, "torchvision": torchvision.__version__,
        "captum": captum.__version__, "commands": [], "main": ""}
    data["commands"].append(" ".join(["python"] + sys.argv))
    data["cpu"] = platform.processor() or platform.machine()
    try:
        data["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.main_src:
        data["main"] = f"{args.main_src} (main at {args.main_label})"
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--stride", type=int, default=STRIDE, help="the windows' stride (8: 729 windows; 16: 196)")
    ap.add_argument("--probe", action="store_true", help="Captum at perturbations_per_eval 1, 4, 16 once (stride 16)")
    ap.add_argument("--main-src", default=None, help="a snapshot of main's src: its plan on this model (untimed)")
    ap.add_argument("--main-label", default="", help="which commit of main the snapshot is (git rev-parse)")
    ap.add_argument("--captum", default="1,4,16", help="Captum's perturbations_per_eval in the rounds (a list)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds in this run, as many as fit in --hold seconds")
    ap.add_argument("--upto", type=int, default=3, help="the last round number of the table")
    ap.add_argument("--hold", type=float, default=840.0, help="seconds a lock hold may take (rules: 15 min)")
    ap.add_argument("--src", default=SRC, help="salience's src to time (default this checkout's; a snapshot of it)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.save, args.images, args.stride)))
        return
    if args.report:
        report(args.out)
        return
    data = _data(args)
    if args.probe:
        probe(args, data)
    configs = ["local", "full"] + [f"cap{p}" for p in str(args.captum).split(",")]
    start = max((r["round"] for r in data["rows"]), default=0) + 1
    began = time.perf_counter()
    for k in range(args.rounds if not args.probe else 0):
        rnd = start + k
        if rnd > args.upto:
            break
        t0 = time.perf_counter()
        order = configs if rnd % 2 else configs[::-1]  # interleaved: each round the other order
        data["rows"] += run_round(args, order, rnd)
        _write(args.out, data)
        took = time.perf_counter() - t0
        if time.perf_counter() - began + 1.15 * took > args.hold:
            break  # another round would pass the lock hold's limit: the next hold runs it
    _write(args.out, data)


def _write(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
