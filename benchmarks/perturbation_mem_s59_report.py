"""Session 59: the tables of benchmarks/perturbation_mem_s59.sh's and heap_trim_s59.sh's JSON lines: per case and
tree (or trim variant) the resident peak (MiB, VmHWM above the RSS before the call) min / median / max, each round's
(seed's) value, the seconds min / median / max and the loads seen.

    python benchmarks/perturbation_mem_s59_report.py out.jsonl [LABEL]
"""
from __future__ import annotations

import json
import statistics
import sys


def table(path: str, label: str = "") -> str:
    rows: dict[tuple, list] = {}
    for line in open(path):
        d = json.loads(line)
        what = d.get("variant") or {"o": "main", "n": "block (4efb3b1d)"}.get(d.get("tree"), d.get("tree"))
        what = f"{label}{what}"
        rows.setdefault((d["case"], what), []).append((d["seed"], d["result"]["peak_mib"], d["result"]["seconds"],
                                                       d["load"].split()[0]))
    out = ["| case | tree / trims | peak MiB min / median / max | per seed 0, 1, 2 | seconds min / median / max "
           "| 1-min load |", "|---|---|---|---|---|---|"]
    for (case, what), v in rows.items():
        v.sort()
        p, s = sorted(x[1] for x in v), sorted(x[2] for x in v)
        out.append(f"| {case} | {what} | {p[0]:.1f} / {statistics.median(p):.1f} / {p[-1]:.1f} | "
                   f"{', '.join(f'{x[1]:.1f}' for x in v)} | {s[0]:.1f} / {statistics.median(s):.1f} / {s[-1]:.1f} | "
                   f"{', '.join(x[3] for x in v)} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
