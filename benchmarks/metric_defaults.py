"""Which substrate should deletion and insertion use by default? Measured on demo:shapes.

    python benchmarks/metric_defaults.py --out benchmarks/metric-defaults.md

Held-out shapes images (seed 10000) with exact masks; the target is the predicted class. Maps:
the oracle (the ground-truth mask itself), a random map, and some methods. For each substrate
(``zero`` = black, ``blur`` = Gaussian of 5 px, ``mean`` = the image's channel means) the
deletion AUC (lower is better) and the insertion AUC (higher is better), and ROAD (most / least
relevant first). A default is acceptable only if the oracle beats the random map clearly.
Writes a markdown table and the numbers as JSON beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import salience
from salience import evidence as M
from salience.demo import data, zoo

SUBSTRATES = ("zero", "blur", "mean")
METHODS = ("vanilla", "guided_backprop", "gradcam", "integrated_gradients")


def measure(n: int, steps: int, seed: int = 10_000, demo: str = "shapes", methods=METHODS) -> dict:
    model = zoo.load_demo(demo)
    x, _, masks = data.shapes(n, seed)
    with torch.no_grad():
        target = model(x).argmax(1)
    maps = {"oracle (mask)": masks.float(), "random": M.random_maps(masks.shape, seed=0)}
    for name in methods:
        maps[name] = salience.METHODS[name](model, x, target)
    rows: dict[str, dict[str, float]] = {}
    for name, m in maps.items():
        row = {}
        for sub in SUBSTRATES:
            row[f"deletion {sub}"] = float(M.deletion(model, x, m, target, steps=steps, substrate=sub).mean())
            row[f"insertion {sub}"] = float(M.insertion(model, x, m, target, steps=steps, substrate=sub).mean())
        row["ROAD morf"] = float(M.road(model, x, m, target).mean())
        row["ROAD lerf"] = float(M.road(model, x, m, target, order="lerf").mean())
        row["faithfulness corr."] = float(M.faithfulness_correlation(model, x, m, target).nanmean())
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    return {"model": f"demo:{demo}", "n": n, "steps": steps, "seed": seed, "rows": rows}


def table(res: dict) -> str:
    cols = list(next(iter(res["rows"].values())))
    arrows = {c: ("↓" if c.startswith("deletion") or c == "ROAD morf" else "↑") for c in cols}
    lines = ["| map | " + " | ".join(f"{c} {arrows[c]}" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in res["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--model", default="shapes", help="demo model name (shapes, shapes-vit)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated; '' for the oracle and random only")
    ap.add_argument("--out", default="benchmarks/metric-defaults.md")
    args = ap.parse_args()
    t = time.perf_counter()
    res = measure(args.n, args.steps, demo=args.model, methods=[m for m in args.methods.split(",") if m])
    res["seconds"] = round(time.perf_counter() - t, 1)
    out = Path(args.out)
    cmd = " ".join(["python benchmarks/metric_defaults.py"] + [a if a else "''" for a in sys.argv[1:]])
    head = (f"# Deletion / insertion substrates on demo:{args.model}\n\n{args.n} held-out images (seed 10000), "
            f"{args.steps} steps, target = predicted class; ROAD with its 9 fractions and noise 0.01; faithfulness "
            f"correlation with its defaults. Made by `{cmd}` in {res['seconds']} s "
            f"(load average {os.getloadavg()[0]:.1f} at the end).\n\n")
    out.write_text(head + table(res), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(table(res))


if __name__ == "__main__":
    main()
