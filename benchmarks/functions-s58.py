"""Per-call cost of the public methods as real functions (session 58): ``rvrvkw-s57.py``'s rows, with the base's
``Checked`` partial (its class copied here, as 02bd6ba2 had it) beside this tree's ``_multi.checked`` function around
the same no-op, in alternating rounds in one process (so load moves both alike); and the calls one call makes, counted
(``sys.setprofile`` events: load does not change them). One thread.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/functions-s58.py > benchmarks/functions-s58.md
"""
from __future__ import annotations

import functools
import importlib
import sys
import timeit
import types
from typing import Any

import torch

import salience
from salience._core.errors import ArgumentError, SalienceError
from salience.methods._multi import call_problem, checked

torch.set_num_threads(1)


class Checked(functools.partial):
    """The base's public-method wrapper (02bd6ba2, ``salience.methods._multi.Checked``), its call path as it was."""

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.func(*args, **kwargs)
        except TypeError as e:
            if isinstance(e, SalienceError):
                raise
            problem = call_problem(self, args, kwargs)
            if problem is None:
                raise
            raise ArgumentError(problem) from None

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)


def noop(model, x, target=None, *, reduce="max_abs", grad_modifier=None, strip_softmax=True):
    """A no-op with vanilla's signature."""
    return x


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
    impl = importlib.import_module("salience.methods.vanilla").vanilla.__wrapped__
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 14 * 14, 4)).eval()
    x = torch.rand(1, 3, 16, 16)
    old = Checked(noop)
    functools.update_wrapper(old, noop)
    peers = {"no-op, plain": (noop, 200_000), "no-op, base's Checked": (old, 200_000),
             "no-op, checked function (this tree)": (checked(noop), 200_000),
             "vanilla, implementation": (impl, 300), "vanilla, base's Checked": (Checked(impl), 300),
             "salience.vanilla (checked function)": (salience.vanilla, 300)}
    kwargs = {"reduce": "abs"}
    load = open("/proc/loadavg").read().strip()
    rows = {name: [] for name in peers}
    for _ in range(5):
        for name, (fn, number) in peers.items():
            rows[name].append(per_call_us(fn, (model, x), kwargs, number))
    after = open("/proc/loadavg").read().strip()
    print("# Per-call cost of the public methods as real functions (session 58)\n")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from _common import cpu_isa, cpu_name  # the machine's own words (its model name and flags), never a literal
    print(f"CPU: {cpu_name()} ({cpu_isa()}), one thread, core 1; `/proc/loadavg` before: `{load}`, after: "
          f"`{after}` (other helpers' work shares the machine's 2 cores)\n")
    print("Each figure: the best of 5 repeats of N calls, per call, in µs; 5 alternating rounds.\n")
    print("| call | " + " | ".join(f"round {i + 1}" for i in range(5)) + " | min / median / max |")
    print("|---|" + "---|" * 6)
    for name, values in rows.items():
        s = sorted(values)
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {s[0]:.2f} / {s[2]:.2f} / {s[4]:.2f} |")
    for label, key in (("The base's Checked", "no-op, base's Checked"),
                       ("This tree's checked function", "no-op, checked function (this tree)")):
        extra = sorted(c - p for c, p in zip(rows[key], rows["no-op, plain"]))
        print(f"\n{label}: its own cost per call (minus plain no-op, per round), min / median / max: "
              f"{extra[0]:.2f} / {extra[2]:.2f} / {extra[4]:.2f} µs.")
    print("\nCalls one call makes (``sys.setprofile`` call / c_call events; counted, so the machine's load does not "
          "change them):\n")
    print("| call | calls |\n|---|---|")
    for name, (fn, _) in peers.items():
        if name.startswith("no-op"):
            print(f"| {name} | {profiled_calls(fn, (model, x), kwargs)} |")


if __name__ == "__main__":
    main()
