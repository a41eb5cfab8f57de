"""Session 45b: the defaults' warm call per round over the round's best bare pass and over the bare pass of B images.

Reads the auto-declines-s45b-* and engine-speed-s45b-* JSON files next to this script and prints the markdown
tables of benchmarks/s45b-summary.md (issue 19: every round <= 1.00 of best bare; issue 16: every round <= 1.05).
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUTO = ["vit_b_16-112", "resnet18-64", "shapes-64", "vit_b_16-112-sg4img", "resnet18-64-4img", "shapes-64-4img"]
ENGINE = ["ig4-1thread", "sg4-1thread", "sg4-1thread-r2"]


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def _load(xs: list[float]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in xs) + ")"


def _rows(job: dict, warm: str, loads: list[str], limit: float) -> str:
    """One table row: per round the warm call over the round's best bare and over bare B, met or not at ``limit``."""
    t = job["times_s"]
    bare = [k for k in t if k.startswith("bare ")]
    rounds = range(len(t[warm]))
    best = [t[warm][r] / min(t[k][r] for k in bare) for r in rounds]
    own = [t[warm][r] / t[f"bare {job['images']}"][r] for r in rounds]
    met = ["met" if max(v) <= limit else "not met" for v in (best, own)]
    return (f"| {job['method']} | {job['images']} | {', '.join(loads)} | {_fmt(best)} | {met[0]} | "
            f"{_fmt(own)} | {met[1]} |")


def _engine_cmd(d: dict) -> str:
    c = d["config"]
    extra = f"--samples {c['samples']}" if c["methods"] == ["smoothgrad"] else f"--steps {c['steps']}"
    return (f"python benchmarks/engine_speed.py --threads {c['threads']} --images {c['images'][0]} --methods"
            f" {c['methods'][0]} {extra} --modes contiguous --rounds {c['rounds']} --out {c['out']}")


HEAD = ("| method | B | 1-min load per round (start/end) | warm / round's best bare | met | warm / bare B | met |\n"
        "|---|---|---|---|---|---|---|")


def _run(kind: str, name: str, issue: str, limit: float, warm: str) -> None:
    """Print one run's heading, exact command, load and per-job rows (auto-declines or engine-speed JSON)."""
    path = HERE / f"{kind}-s45b-{name}.json"
    if not path.exists():
        return
    d = json.loads(path.read_text())
    cmd = d["command"] if "command" in d else _engine_cmd(d)
    print(f"\n### {kind} {name} (issue {issue}, limit {limit:.2f})\n\n`{cmd}`; load {_load(d['loadavg_start'])}"
          f" -> {_load(d['loadavg_end'])}, {d['wall_s']:.0f} s\n\n{HEAD}")
    for job in d["jobs"]:
        pairs = job.get("loadavg_before_after") or job["load_1min_before_after"]
        loads = [f"{a[0] if isinstance(a, list) else a:.2f}/{b[0] if isinstance(b, list) else b:.2f}"
                 for a, b in pairs]
        print(_rows(job, warm, loads, limit))


def main() -> None:
    for name in AUTO:
        _run("auto-declines", name, "19", 1.00, "defaults warm")
    for name in ENGINE:
        _run("engine-speed", name, "16", 1.05, "contiguous")


if __name__ == "__main__":
    main()
