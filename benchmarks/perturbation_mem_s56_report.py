"""The table rows of benchmarks/perturbation_mem_s56.sh's JSON lines (session 56).

    python benchmarks/perturbation_mem_s56_report.py out.jsonl

One row per case and implementation (salience OLD / NEW, the loop): the call's peak (``call_peak_mib``) per layout,
min / median / max, the seconds and the load before each; then per case and tree, salience minus the loop per layout
and whether "no more than the loop" holds in every layout, by the median, or not.
"""
from __future__ import annotations

import json
import statistics
import sys

NAMES = {("o", "salience"): "salience (main)", ("n", "salience"): "salience (this branch)", ("n", "loop"): "plain loop"}


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    print("| case | implementation | call's peak MiB per layout (seed: MiB) | min / median / max | seconds | "
          "load before (1 / 5 / 15 min) |")
    print("|---|---|---|---|---|---|")
    peaks: dict = {}
    for case in cases:
        for key, name in NAMES.items():
            got = sorted((r for r in rows if r["case"] == case and (r["tree"], r["impl"]) == key),
                         key=lambda r: r["seed"])
            if not got:
                continue
            p = {r["seed"]: r["result"]["call_peak_mib"] for r in got}
            peaks[case, key] = p
            v = list(p.values())
            print(f"| {case} | {name} | " + ", ".join(f"{s}: {m:.1f}" for s, m in p.items())
                  + f" | {min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f} | "
                  + ", ".join(f"{r['result']['seconds']:.0f}" for r in got) + " | "
                  + "; ".join(r["load"] for r in got) + " |")
    print()
    for case in cases:
        loop = peaks.get((case, ("n", "loop")), {})
        for key in (("o", "salience"), ("n", "salience")):
            mine = peaks.get((case, key), {})
            seeds = [s for s in mine if s in loop]
            if not seeds:
                continue
            diff = {s: mine[s] - loop[s] for s in seeds}
            every = all(d <= 0 for d in diff.values())
            median = statistics.median(mine[s] for s in seeds) <= statistics.median(loop[s] for s in seeds)
            verdict = "in every layout" if every else ("by the median only" if median else "not met")
            if len(seeds) < 3:  # fewer layouts than a round set: no verdict beyond them
                verdict = f"{'holds' if every else 'does not hold'} in the {len(seeds)} layout(s) measured only"
            print(f"- {case}, {NAMES[key]} minus the loop per layout: "
                  + ", ".join(f"{s}: {d:+.1f}" for s, d in diff.items()) + f" MiB: no more than the loop {verdict}")


if __name__ == "__main__":
    main(sys.argv[1])
