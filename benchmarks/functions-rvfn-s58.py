"""Review of ``functions-s58.py`` (session 58): is the per-call comparison like with like, and what does load not
change? The base's ``Checked`` (its class as 02bd6ba2 had it, copied in ``functions-s58.py``) and this tree's
``_multi.checked`` function around the same no-op with vanilla's signature: the Python frames and the bytecode
instructions one call runs (``sys.settrace`` with ``f_trace_opcodes``: counted, load does not change them), then wall
time per call in alternating rounds (min / median / max, the machine's load recorded). One thread.

    PYTHONPATH=src flock /tmp/bench.lock taskset -c 1 python benchmarks/functions-rvfn-s58.py \
        > benchmarks/functions-rvfn-s58.md
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys
import timeit

from salience.methods._multi import checked

_here = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("functions_s58", _here / "functions-s58.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)  # its Checked (the base's class) and its no-op: the very peers it timed
Checked, noop = _bench.Checked, _bench.noop


def traced(fn, args, kwargs) -> tuple[int, int]:
    """(Python frames entered, bytecode instructions run) by one call of ``fn``, the caller's own not counted."""
    frames, ops = [0], [0]

    def tracer(frame, event, arg):
        if event == "call":
            frames[0] += 1
            frame.f_trace_opcodes = True
        elif event == "opcode":
            ops[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn(*args, **kwargs)
    finally:
        sys.settrace(None)
    return frames[0], ops[0]


def main() -> None:
    old = Checked(noop)
    functools.update_wrapper(old, noop)
    peers = {"no-op, plain": noop, "no-op, base's Checked": old, "no-op, checked function (this tree)": checked(noop)}
    args, kwargs = (None, None), {"reduce": "abs"}
    print("# Per-call cost of a public method: the base's Checked against this tree's function (review)\n")
    print("Counted (load does not change them): one call `fn(None, None, reduce='abs')`.\n")
    print("| call | Python frames | bytecode instructions |\n|---|---|---|")
    for name, fn in peers.items():
        frames, ops = traced(fn, args, kwargs)
        print(f"| {name} | {frames} | {ops} |")
    load = open("/proc/loadavg").read().strip()
    rows = {name: [] for name in peers}
    for _ in range(7):
        for name, fn in peers.items():
            rows[name].append(min(timeit.repeat(lambda: fn(*args, **kwargs), number=200_000, repeat=5)) / 200_000 * 1e6)
    after = open("/proc/loadavg").read().strip()
    print(f"\nWall time per call, µs (best of 5 repeats of 200,000 calls), 7 alternating rounds; `/proc/loadavg` "
          f"before: `{load}`, after: `{after}` (other helpers share the machine's 2 cores):\n")
    print("| call | min / median / max | minus plain, per round: min / median / max |\n|---|---|---|")
    for name, values in rows.items():
        s = sorted(values)
        extra = sorted(v - p for v, p in zip(values, rows["no-op, plain"]))
        print(f"| {name} | {s[0]:.3f} / {s[3]:.3f} / {s[6]:.3f} | {extra[0]:.3f} / {extra[3]:.3f} / {extra[6]:.3f} |")
    print("\nCommand: `PYTHONPATH=src flock /tmp/bench.lock taskset -c 1 python benchmarks/functions-rvfn-s58.py`.")


if __name__ == "__main__":
    main()
