"""Session 49 "stdc": a module's guard record and put-back (guard.ModuleState(m, None).restore(), no pass) with a
1024-item attribute of each container kind, or none; "+append": the forward's ``append`` / ``d[k] = v`` done between
record and put-back (the put-back's cost). min / median of 5 rounds of 5000. Run per source tree:
PYTHONPATH=<tree>/src taskset -c 0 python benchmarks/guard_containers_stdc_s49.py <label>
(output: benchmarks/guard-containers-stdc-s49.txt)."""
import sys
import timeit
from collections import Counter, OrderedDict, defaultdict, deque

import torch.nn as nn

from salience._core import guard

MAKE = {"none": lambda: None, "list": lambda: list(range(1024)), "deque": lambda: deque(range(1024), maxlen=2048),
        "dict": lambda: {i: i for i in range(1024)}, "OrderedDict": lambda: OrderedDict((i, i) for i in range(1024)),
        "defaultdict": lambda: defaultdict(int, {i: i for i in range(1024)}),
        "Counter": lambda: Counter({i: i for i in range(1024)})}


class M(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.hist = MAKE[kind]()


def change(v):
    if isinstance(v, (list, deque)):
        v.append(-1)
    else:
        v[-1] = -1


for k in MAKE:
    for changed in (False, True):
        if changed and k == "none":
            continue
        m = M(k)

        def once():
            st = guard.ModuleState(m, None)
            if changed:
                change(m.hist)
            st.restore()
        once()
        n = 5000
        ts = [timeit.timeit(once, number=n) / n * 1e6 for _ in range(5)]
        print(sys.argv[1], k + ("+append" if changed else ""), "take+restore us: min %.2f median %.2f"
              % (min(ts), sorted(ts)[2]), "len after", None if m.hist is None else len(m.hist))
