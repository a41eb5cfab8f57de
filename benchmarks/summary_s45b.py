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


def main() -> None:
    for name in AUTO:
        path = HERE / f"auto-declines-s45b-{name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        print(f"\n### auto-declines {name} (issue 19, limit 1.00)\n\n`{d['command']}`; load {_load(d['loadavg_start'])}"
              f" -> {_load(d['loadavg_end'])}, {d['wall_s']:.0f} s\n\n{HEAD}")
        for job in d["jobs"]:
            loads = [f"{a[0]:.2f}/{b[0]:.2f}" for a, b in job["loadavg_before_after"]]
            print(_rows(job, "defaults warm", loads, 1.00))
    for name in ENGINE:
        path = HERE / f"engine-speed-s45b-{name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        print(f"\n### engine-speed {name} (issue 16, limit 1.05)\n\n`{_engine_cmd(d)}`; load"
              f" {_load(d['loadavg_start'])} -> {_load(d['loadavg_end'])},"
              f" {d['wall_s']:.0f} s\n\n{HEAD}")
        for job in d["jobs"]:
            loads = [f"{a:.2f}/{b:.2f}" for a, b in job["load_1min_before_after"]]
            print(_rows(job, "contiguous", loads, 1.05))


if __name__ == "__main__":
    main()
