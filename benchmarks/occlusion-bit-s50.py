"""Session 50: occlusion on timm's BiT (``resnetv2_50x1_bit``; ``--model``: another timm model, nf_resnet50), random
weights (``pretrained=False``: no download), one 224 px image, the default window / stride (28 / 14: 225 windows), fp32,
one thread: this branch (region-limited passes where the model allows them), main (``--main-src``: a snapshot of main's
``src``) and Captum's ``Occlusion`` at ``perturbations_per_eval`` 1, 4, 16 and 64 (BiT's round 1: 16 and 64 only).
Each measurement a fresh process (model built, one forward, then the call timed); interleaved rounds; each round appends to the JSON, so rounds may run in separate lock holds.

Run as (one round a lock hold):
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-bit-s50.py --main-src /tmp/old-stdconv50/src --rounds 1
then ``--report`` writes the .md from the JSON. The maps of the branch, main and Captum are compared (max |a - b|),
and the branch's path (region-limited or full passes, with the reason) is read from the debug log of
``salience.occlusion``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
CONFIGS = ("branch", "main", "cap1", "cap4", "cap16", "cap64")


def one(config: str, save: str, model: str = "resnetv2_50x1_bit") -> dict:
    """One measurement in this process: the call's seconds, what the log said, the map saved to ``save``."""
    import logging
    import warnings

    import timm
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = timm.create_model(model, pretrained=False).eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = int(m(x).argmax(1))
    log: list = []
    if config in ("branch", "main"):
        import salience

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log.append(record.getMessage())

        lg = logging.getLogger("salience.occlusion")
        lg.setLevel(logging.DEBUG)
        lg.addHandler(Keep())
        t0 = time.perf_counter()
        a = salience.occlusion(m, x, t, reduce=None)  # the default window and stride: 28 / 14
        sec = time.perf_counter() - t0
        where = salience.__file__
    else:
        from captum.attr import Occlusion
        t0 = time.perf_counter()
        with torch.no_grad():
            a = Occlusion(m).attribute(x, sliding_window_shapes=(3, 28, 28), strides=(3, 14, 14), target=t,
                                       baselines=0.0, perturbations_per_eval=int(config[3:]))
        sec = time.perf_counter() - t0
        where = ""
    torch.save(a, save)
    return {"config": config, "seconds": sec, "log": log, "salience": where, "target": t}


def run_round(args: argparse.Namespace, configs: list, rnd: int) -> list:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            src = args.main_src if c == "main" else SRC
            env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
            save = os.path.join(tmp, f"{c}.pt")
            done = subprocess.run([sys.executable, __file__, "--one", c, "--save", save, "--model", args.model],
                                  capture_output=True,
                                  text=True, env=env, timeout=1200)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["round"] = rnd
            row["loadavg"] = open("/proc/loadavg").read().split()[:3]
            out.append(row)
            print(c, f"{row['seconds']:.1f} s", row["log"], flush=True)
        import torch
        maps = {c: torch.load(os.path.join(tmp, f"{c}.pt")) for c in configs}
        ref = maps["cap16"] if "cap16" in maps else maps[configs[-1]]
        scale = float(ref.abs().max())
        for row in out:
            row["max_abs_diff_vs_captum"] = float((maps[row["config"]] - ref).abs().max())
            row["map_scale"] = scale
    return out


def report(path: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    by: dict = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r["seconds"])
    best_cap = min((c for c in by if c.startswith("cap")), key=lambda c: statistics.median(by[c]))
    lines = [
        f"# Occlusion on timm {data.get('model', 'resnetv2_50x1_bit')}, session 50",
        "",
        f"CPU: {data['cpu']} (the session-50 machine: AMD EPYC, AVX512-BF16, no AMX), one thread on core 1, under "
        "/tmp/bench.lock. torch " + data["torch"] + ", timm " + data["timm"] + ", captum " + data["captum"] + ".",
        "Random weights (`pretrained=False`), 1 image 224 px, the default window 28 / stride 14 (225 windows), fp32, "
        "`reduce=None`; each measurement a fresh process (model built, one forward, then the call timed); "
        f"{len(by['branch'])} interleaved rounds. main: `{data['main']}`.",
        f"Command: `{data['command']}` (one round a lock hold), then `--report`. Data: "
        "benchmarks/occlusion-bit-s50.json.",
        "",
        "| run | min s | median s | max s | x branch (median) | max abs diff vs Captum (map scale) | path (debug log) |",
        "|---|---|---|---|---|---|---|",
    ]
    med_b = statistics.median(by["branch"])
    for c in CONFIGS:
        if c not in by:
            continue
        v = by[c]
        r = next(r for r in rows if r["config"] == c)
        name = {"branch": "salience, this branch", "main": "salience, main (full passes)"}.get(
            c, f"Captum Occlusion, perturbations_per_eval={c[3:]}" + (" (best)" if c == best_cap else ""))
        diff = max(x["max_abs_diff_vs_captum"] for x in rows if x["config"] == c)
        said = "; ".join(m.replace("|", "/") for m in r["log"]) or "-"
        lines.append(f"| {name} | {min(v):.1f} | {statistics.median(v):.1f} | {max(v):.1f} | "
                     f"{statistics.median(v) / med_b:.2f} | {diff:.2e} ({r['map_scale']:.2e}) | {said} |")
    lines += ["", "Load average (1, 5, 15 min) at each measurement: "
              + ", ".join(f"{r['config']} r{r['round']}: {' '.join(r['loadavg'])}" for r in rows) + "."]
    with open(path[:-5] + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path[:-5] + ".md.tmp", path[:-5] + ".md")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default=None)
    ap.add_argument("--save", default=None)
    ap.add_argument("--main-src", default=None)
    ap.add_argument("--main-label", default="", help="which commit of main the snapshot is (git rev-parse)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--model", default="resnetv2_50x1_bit", help="a timm model (random weights)")
    ap.add_argument("--out", default=os.path.join(HERE, "occlusion-bit-s50.json"))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.save, args.model)))
        return
    if args.report:
        report(args.out)
        return
    configs = args.configs.split(",")
    if "main" in configs and not args.main_src:
        raise SystemExit("--main-src: a snapshot of main's src (git -C /work/main archive HEAD src | tar -x -C DIR)")
    import captum
    import timm
    import torch
    data = json.load(open(args.out)) if os.path.exists(args.out) else {
        "rows": [], "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "timm": timm.__version__, "captum": captum.__version__, "model": args.model,
        "command": " ".join(["python"] + sys.argv),
        "main": ""}
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        data["cpu"] = cpu
    except (OSError, StopIteration):
        pass
    if args.main_src:
        data["main"] = f"{args.main_src} (main at {args.main_label})"
    start = max((r["round"] for r in data["rows"]), default=0) + 1
    for k in range(args.rounds):
        rnd = start + k
        order = configs if rnd % 2 else configs[::-1]  # interleaved: each round the other order
        data["rows"] += run_round(args, order, rnd)
        with open(args.out + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
