"""Sum a pytest --junitxml report's test times by file and by test (session 52's CI-time work).

Usage: python benchmarks/test-times-s52.py REPORT.xml [TOP]
Prints the files by total time (with their test count) and the TOP slowest tests. With ``--dist loadfile``
each file runs whole in one worker, so the slowest file bounds the wall time from below.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def times(path: str) -> list[tuple[str, str, float]]:
    """(file, test name, seconds) for each test case in the report."""
    root = ET.parse(path).getroot()
    out = []
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        parts = cls.split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        file = ".".join(parts[:2]) if len(parts) > 1 else cls
        out.append((file, cls + "::" + case.get("name", ""), float(case.get("time", 0.0))))
    return out


def main() -> None:
    rows = times(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    by_file: dict[str, list[float]] = defaultdict(list)
    for file, _, t in rows:
        by_file[file].append(t)
    total = sum(t for _, _, t in rows)
    print(f"{len(rows)} tests, {total:.0f} s summed over workers, {len(by_file)} files")
    print("\n# files by time")
    for file, ts in sorted(by_file.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"{sum(ts):8.1f} s  {len(ts):4d} tests  {file}")
    print("\n# slowest tests")
    for _, name, t in sorted(rows, key=lambda r: -r[2])[:top]:
        print(f"{t:8.1f} s  {name}")


if __name__ == "__main__":
    main()
