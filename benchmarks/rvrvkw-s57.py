"""Per-call cost of the checked public methods (second s57 review): ``keywords-s56.py``'s rows, and a
``functools.wraps`` function with the same check (the replacement of ``Checked`` the review weighed) around the same
no-op. Alternating rounds, one thread.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/rvrvkw-s57.py > benchmarks/rvrvkw-s57.md
"""
from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import timeit

import torch

import salience
from salience._core.errors import ArgumentError, SalienceError
from salience.methods._multi import call_problem, checked

torch.set_num_threads(1)


def noop(model, x, target=None, *, reduce="max_abs", grad_modifier=None, strip_softmax=True):
    """A no-op with vanilla's signature."""
    return x


def wrapped(fn):
    """``fn`` in a ``functools.wraps`` function that makes a call its signature refuses an ArgumentError, as
    ``Checked.__call__`` does."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            if isinstance(e, SalienceError):
                raise
            problem = call_problem(call, args, kwargs)
            if problem is None:
                raise
            raise ArgumentError(problem) from None
    return call


def profiled_calls(fn, args, kwargs) -> int:
    """Python-level and C-level calls (``sys.setprofile`` events) one call of ``fn`` makes: not changed by load."""
    seen = []
    sys.setprofile(lambda frame, event, arg: seen.append(event) if event in ("call", "c_call") else None)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return len(seen) - 1  # the setprofile(None) call itself


def per_call_us(fn, args, kwargs, number: int) -> float:
    return min(timeit.repeat(lambda: fn(*args, **kwargs), number=number, repeat=5)) / number * 1e6


def main() -> None:
    raw_vanilla = importlib.import_module("salience.methods.vanilla").vanilla
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 14 * 14, 4)).eval()
    x = torch.rand(1, 3, 16, 16)
    peers = {"no-op, plain": (noop, 200_000), "no-op, checked": (checked(noop), 200_000),
             "no-op, functools.wraps function": (wrapped(noop), 200_000),
             "vanilla, module's function": (raw_vanilla, 300), "salience.vanilla (checked)": (salience.vanilla, 300)}
    kwargs = {"reduce": "abs"}
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = {name: [] for name in peers}
    for _ in range(5):
        for name, (fn, number) in peers.items():
            rows[name].append(per_call_us(fn, (model, x), kwargs, number))
    print("# Per-call cost of the checked public methods (second s57 review)\n")
    from _common import cpu_isa, cpu_name  # the machine's own words (its model name and flags), never a literal
    print(f"CPU: {cpu_name()} ({cpu_isa()}), one thread, core 1; load before: `{load}`\n")
    print("Each figure: the best of 5 repeats of N calls, per call, in µs; 5 alternating rounds.\n")
    print("| call | " + " | ".join(f"round {i + 1}" for i in range(5)) + " | min / median / max |")
    print("|---|" + "---|" * 6)
    for name, values in rows.items():
        s = sorted(values)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {s[0]:.2f} / {s[2]:.2f} / {s[4]:.2f} |")
    extra = [c - p for c, p in zip(rows["no-op, checked"], rows["no-op, plain"])]
    print("\nThe wrapper's own cost per call (checked no-op minus plain no-op), per round: "
          + ", ".join(f"{v:.2f}" for v in extra) + " µs.")
    print("\nCalls one call makes (``sys.setprofile`` call / c_call events; counted, so the machine's load does not "
          "change them):\n")
    print("| call | calls |\n|---|---|")
    for name, (fn, _) in peers.items():
        if name.startswith("no-op"):
            print(f"| {name} | {profiled_calls(fn, (model, x), kwargs)} |")
    extra = [c - p for c, p in zip(rows["no-op, functools.wraps function"], rows["no-op, plain"])]
    print("\nA functools.wraps function's own cost per call (minus plain no-op), per round: "
          + ", ".join(f"{v:.2f}" for v in extra) + " µs.")


if __name__ == "__main__":
    main()
