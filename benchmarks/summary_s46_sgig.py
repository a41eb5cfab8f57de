"""Issue 16's SmoothGrad / IG verdicts (session 46) from engine_speed's .json files: per job, salience's call per
round over that round's best bare pass (wall and CPU), its median over the best of the bare peers' medians, which bare size was best, the load; met only where every
round is within the limit.

    python benchmarks/summary_s46_sgig.py benchmarks/engine-speed-s46-sg-1-4-8.json benchmarks/engine-speed-s46-ig-1-4.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(path: Path, limit: float, mode: str) -> list[str]:
    rep = json.loads(path.read_text())
    out = []
    for j in rep["jobs"]:
        t = j["times_s"]
        bares = [k for k in t if k.startswith("bare") and len(k.split()) == 2]
        rounds = len(t[mode])
        best = [min(t[k][r] for k in bares) for r in range(rounds)]
        which = [min(bares, key=lambda k: t[k][r]).split()[1] for r in range(rounds)]
        wall = [t[mode][r] / best[r] for r in range(rounds)]
        use = j["cpu_s_minflt"]
        cpu = {k: [c for c, _ in use[k]] for k in use}  # one timed call per mode per round (--repeats 1)
        best_cpu = [min(cpu[k][r] for k in bares) for r in range(rounds)]
        cpu_r = [cpu[mode][r] / best_cpu[r] for r in range(rounds)]
        faults = statistics.median(f for _, f in use[mode])
        loads = ", ".join(f"{a:.1f}" for a, _ in j["load_1min_before_after"])
        met = "**met**" if max(wall) <= limit else "not met"
        cpu_met = "met" if max(cpu_r) <= limit else "not met"
        med = statistics.median(t[mode]) / min(statistics.median(t[k]) for k in bares)
        out.append(f"| {j['method']} | {j['images']} | {j['items']} | {statistics.median(t[mode]):.2f} | {med:.3f} | "
                   f"{', '.join(f'{v:.3f}' for v in wall)} | {'/'.join(which)} | {met} | "
                   f"{', '.join(f'{v:.3f}' for v in cpu_r)} | {cpu_met} | {faults:,.0f} | {loads} | "
                   f"[{path.stem}]({path.stem}.md) |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--limit", type=float, default=1.05)
    ap.add_argument("--mode", default="contiguous")
    args = ap.parse_args()
    print("| method | images | items | salience median s | over the best bare median | wall per round / round's best bare | best bare size per "
          f"round | wall <= {args.limit} every round | CPU per round / best bare CPU | CPU <= {args.limit} | "
          "salience's minor faults a call (median) | 1-min load per round | table |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in args.files:
        print("\n".join(rows(f, args.limit, args.mode)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
