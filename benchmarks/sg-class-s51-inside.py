"""Session 51: where SmoothGrad 16's ``target=None`` time goes, one process, thread CPU time (the machine was shared):
the bare ``model(x)`` under ``no_grad`` / ``inference_mode``, ``autograd.forward_scores`` alone, the calls with the
class given and with ``target=None``, and inside the latter ``targets.resolve`` (the class pass), ``forward_scores``
and the model's forward (``autograd._tapped_pass``) timed by wrappers. Prints minima and medians of 7 rounds.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/sg-class-s51-inside.py 64 resnet18
"""
import sys, time, torch, statistics, functools
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
torch.set_num_threads(1)
import salience
from auto_declines_s44 import build
from salience._core import autograd as ag
sgm = sys.modules["salience.methods.smoothgrad"]
clock = time.thread_time
size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
name = sys.argv[2] if len(sys.argv) > 2 else "resnet18"
model = build(name, size)
x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
with torch.no_grad(): t = model(x).argmax(1)
acc = {}
def timer(nm, fn):
    @functools.wraps(fn)
    def w(*a, **k):
        t0 = clock()
        try: return fn(*a, **k)
        finally: acc[nm] = acc.get(nm, 0) + clock() - t0
    return w
sgm.resolve = timer("resolve", sgm.resolve)
import salience.targets as T
T.forward_scores = timer("forward_scores", T.forward_scores)
ag._tapped_pass = timer("tapped", ag._tapped_pass)
def bare_inf():
    with torch.inference_mode(): model(x)
def bare_ng():
    with torch.no_grad(): model(x)
units = {"inf": bare_inf, "nograd": bare_ng, "fs": lambda: ag.forward_scores(model, x),
         "given": lambda: salience.smoothgrad(model, x, t, samples=16, reduce=None),
         "none": lambda: salience.smoothgrad(model, x, None, samples=16, reduce=None)}
for f in units.values(): f(); f()
res = {k: [] for k in units}; pieces = []
for r in range(7):
    for k, f in units.items():
        ts = []
        for _ in range(3 if k in ("given", "none") else 10):
            acc.clear()
            t0 = clock(); f(); ts.append(clock() - t0)
            if k == "none": pieces.append(dict(acc))
        res[k].append(min(ts))
for k, v in res.items():
    print(k, "cpu min %.2f med %.2f ms" % (min(v) * 1e3, statistics.median(v) * 1e3))
print("none-given per round", [round((a - b) * 1e3, 1) for a, b in zip(res["none"], res["given"])])
for nm in pieces[0]:
    v = [p[nm] for p in pieces]
    print(nm, "min %.2f med %.2f" % (min(v) * 1e3, statistics.median(v) * 1e3))
