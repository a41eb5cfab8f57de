"""Session 60: the tables of benchmarks/perturbation_mem_s60.sh's JSON lines: per tree the resident peak (MiB, VmHWM
above the RSS before the call) and the call's CPU seconds, min / median / max and per seed, each call's CPU seconds
over its round's (seed's) loop's, and the loads seen.

    python benchmarks/perturbation_mem_s60_report.py out.jsonl
"""
from __future__ import annotations

import json
import statistics
import sys


def _mmm(v: list) -> str:
    s = sorted(v)
    return f"{s[0]:.2f} / {statistics.median(s):.2f} / {s[-1]:.2f}"


def table(path: str) -> str:
    rows: dict[str, dict[int, dict]] = {}
    for line in open(path):
        d = json.loads(line)
        rows.setdefault(d["tree"], {})[d["seed"]] = dict(d["result"], load=d["load"].split()[0])
    seeds = sorted(next(iter(rows.values())))
    loop = rows.get("loop")
    out = [f"| tree | peak MiB min / median / max | peak per seed {', '.join(map(str, seeds))} | CPU s min / median / "
           "max | CPU s over the round's loop, min / median / max | per seed | wall s median | 1-min load |",
           "|---|---|---|---|---|---|---|---|"]
    for tree in ("main", "new", "loop"):
        r = rows.get(tree)
        if not r:
            continue
        peak = [r[s]["peak_mib"] for s in seeds]
        cpu = [r[s]["cpu_seconds"] for s in seeds]
        ratio = [r[s]["cpu_seconds"] / loop[s]["cpu_seconds"] for s in seeds] if loop else []
        out.append(f"| {tree} | {_mmm(peak)} | {', '.join(f'{p:.1f}' for p in peak)} | {_mmm(cpu)} | "
                   f"{_mmm(ratio) if ratio else '-'} | {', '.join(f'{q:.3f}' for q in ratio) or '-'} | "
                   f"{statistics.median(r[s]['seconds'] for s in seeds):.1f} | "
                   f"{', '.join(r[s]['load'] for s in seeds)} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
