"""Bytes of a pickled public method (session 58: the public methods as real functions, against the base's ``Checked``
partials): what a Ray task or a forkserver worker receives per method. ``rvkeywords-s57.py``'s count; counted, not
timed: machine load does not change it. Each source tree is imported in a subprocess of its own; ``BASE`` is the tree
before the change (``git archive 02bd6ba2 src | tar -x -C BASE``).

    PYTHONPATH=src python benchmarks/functions-pickle-s58.py BASE/src > benchmarks/functions-pickle-s58.md
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, pickle, salience
fns = {**salience.METHODS, "eigencam (function)": salience.eigencam, "class_model": salience.class_model}
out = {}
for name, fn in fns.items():
    try:
        data = pickle.dumps(fn)
        out[name] = [len(data), pickle.loads(data) is fn]
    except Exception as e:
        out[name] = [None, type(e).__name__]
print(json.dumps(out))
"""


def measure(src: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    base_src = sys.argv[1]
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    before, after = measure(base_src), measure(here)

    def shown(v: list) -> str:
        return f"{v[0]} ({'itself' if v[1] is True else 'another object' if v[1] is False else v[1]})" \
            if v[0] is not None else f"does not pickle ({v[1]})"

    print("# Bytes of a pickled public method (session 58)\n")
    print("`pickle.dumps(fn)` with the default protocol; in brackets what `pickle.loads` gives back. Counted, not "
          "timed (the machine's load does not change it).\n")
    print("| method | base (02bd6ba2, Checked) | this tree (functions) |")
    print("|---|---|---|")
    for name in before:
        print(f"| {name} | {shown(before[name])} | {shown(after[name])} |")
    sizes = [(before[n][0], after[n][0]) for n in before if before[n][0] is not None and after[n][0] is not None]
    print(f"\nTotal over the {len(sizes)} methods that pickled before: {sum(b for b, _ in sizes):,} bytes before, "
          f"{sum(a for _, a in sizes):,} after.")


if __name__ == "__main__":
    main()
