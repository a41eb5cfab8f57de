"""Session 49 review: a module's guard record and put-back (guard.ModuleState(m, None).restore(), no pass) with a
1024-item list, dict or set attribute, or none; min / median of 5 rounds of 5000. Run per source tree:
PYTHONPATH=<tree>/src taskset -c 0 python benchmarks/guard_containers_rvrecord_s49.py <label>
(output: benchmarks/guard-containers-rvrecord-s49.txt)."""
import sys, timeit
import torch.nn as nn
from salience._core import guard
class M(nn.Module):
    def __init__(s, kind):
        super().__init__(); s.lin = nn.Linear(3, 3)
        s.hist = {"none": None, "list": list(range(1024)), "dict": {i: i for i in range(1024)}, "set": set(range(1024))}[kind]
for k in ("none", "list", "dict", "set"):
    m = M(k)
    def once():
        st = guard.ModuleState(m, None); st.restore()
    n = 5000
    ts = [timeit.timeit(once, number=n) / n * 1e6 for _ in range(5)]
    print(sys.argv[1], k, "take+restore us: min %.2f median %.2f" % (min(ts), sorted(ts)[2]))
