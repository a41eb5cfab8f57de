"""The model guard's cost per call on a model holding a 100 MiB plain tensor attribute (a lookup table the forward
only reads), a 100 MiB buffer beside for reference, and neither: ``salience.vanilla`` per call (ms) and the peak
resident memory of the calls over the process's before them (MiB, VmHWM after clear_refs). One tree per process
(PYTHONPATH); rounds interleaved across trees by the loop in benchmarks/guard-big-attr-s48.txt.

usage: PYTHONPATH=<tree>/src python benchmarks/guard_big_attr_s48.py <tree name> <attr|buffer|none> [calls]
Prints one JSON line."""
import json
import sys
import time

import torch
import torch.nn as nn

import salience


class Table(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        n = 100 * 2 ** 20 // 4
        if kind == "attr":
            self.table = torch.randn(n)
        elif kind == "buffer":
            self.register_buffer("table", torch.randn(n))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _status(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) // 1024


def main() -> None:
    tree, kind = sys.argv[1], sys.argv[2]
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    torch.manual_seed(0)
    model, x = Table(kind).eval(), torch.randn(1, 3, 32, 32)
    for _ in range(3):
        salience.vanilla(model, x, 0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) reset to the resident memory now
    base = _status("VmRSS")
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        salience.vanilla(model, x, 0)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    print(json.dumps({"tree": tree, "kind": kind, "calls": calls, "ms_min": round(times[0], 3),
                      "ms_median": round(times[len(times) // 2], 3), "ms_max": round(times[-1], 3),
                      "peak_mib_over_base": _status("VmHWM") - base}))


if __name__ == "__main__":
    main()
