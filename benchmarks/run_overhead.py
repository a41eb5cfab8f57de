"""A dataset run's own overhead: the CPU time of ``salience.explain_dataset`` outside the model's passes, by phase.

    taskset -c 0 python benchmarks/run_overhead.py 1          # ROUNDS measured runs after one warm-up
    NOBARE=1 taskset -c 0 python benchmarks/run_overhead.py 3 # without the bare passes' rounds

resnet18 (random weights) at 224, 64 images already decoded (a Dataset of tensors: no decoding),
batch 16, vanilla maps, ``workers=0`` (everything in this process), one thread. Each phase is a
function of salience wrapped with ``time.thread_time`` (CPU of this thread: a loaded machine slows
the wall clock, much less this) and ``perf_counter``; the model's passes are its ``forward`` and
``torch.autograd.grad``. Nested phases are counted in each (``job.call_method`` holds the passes).
Prints per phase the CPU ms per batch (min / median / max over the rounds) and the wall ms, then
the CPU outside the model's passes per batch and the ratio of the run's CPU to its passes'.
Not a benchmark of record (no file written): a profile for finding the run's overhead.
"""
import collections, functools, os, shutil, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
import salience
from salience._core.info import attach_info
from salience.loading.images import with_preprocessing
from salience.loading.models import model_info
from salience.runs import job, dataset, store, gallery
from salience._core import autograd, files
import salience.methods._multi as multi

torch.set_num_threads(1)
torch.manual_seed(0)
N, B, S = 64, 16, 224
model = salience.load_model("torchvision:resnet18", weights="random", device="cpu")
info = with_preprocessing(model_info(model), size=S, resize=int(S * 256 / 224))
attach_info(model, info)
x = torch.randn(N, 3, S, S)

class DS(torch.utils.data.Dataset):
    def __len__(self): return N
    def __getitem__(self, i): return x[i]

acc = collections.defaultdict(lambda: [0.0, 0.0])
def wrap(mod, name, label=None):
    f = getattr(mod, name)
    @functools.wraps(f)
    def g(*a, **k):
        c, w = time.thread_time(), time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            e = acc[label or f"{mod.__name__.split('.')[-1]}.{name}"]
            e[0] += time.thread_time() - c; e[1] += time.perf_counter() - w
    setattr(mod, name, g)

# the model's passes: the module's forward and autograd.grad
import torch.autograd as ta
for mod, name in [(job, "explain_items"), (job, "compute_items"), (job, "finish_items"), (job, "call_method"), (job, "_tiles"), (job, "_stored_warning"),
                  (job, "constant_values"), (job, "_summaries"), (job, "_prediction_row"), (job, "_metrics"), (job, "_check_shape"), (job, "_scores"),
                  (job, "sprite"), (dataset, "commit"), (store.Store, "write_shard"), (store.Store, "merge_index"),
                  (gallery, "write"), (dataset, "resolve_batch"), (dataset, "pending_shards"), (store.Store, "__init__"),
                  (store.Store, "write_inputs"), (store, "_cast"), (files, "_fsync_file"), (files, "_fsync_dir"),
                  (autograd, "check_input"), (multi, "check_input"), (dataset, "run_local"),
                  (store, "Run"), (dataset, "_info")]:
    wrap(mod, name)
fwd = type(model).forward
def timed_forward(self, *a, **k):
    c, w = time.thread_time(), time.perf_counter()
    try: return fwd(self, *a, **k)
    finally:
        acc["MODEL forward"][0] += time.thread_time() - c; acc["MODEL forward"][1] += time.perf_counter() - w
type(model).forward = timed_forward
wrap(ta, "grad", "MODEL autograd.grad")
npsave = np.save
def save(*a, **k):
    c, w = time.thread_time(), time.perf_counter()
    try: return npsave(*a, **k)
    finally: acc["np.save"][0] += time.thread_time() - c; acc["np.save"][1] += time.perf_counter() - w
np.save = save

tmp = Path(tempfile.mkdtemp(prefix="rs32-"))
def run():
    salience.explain_dataset(model, DS(), ["vanilla"], tmp / "run", batch_size=B, workers=0, overwrite=True,
                             model_spec="bench")
def bare():
    for s in range(0, N, B):
        xi = x[s:s + B].detach().clone().requires_grad_(True)
        out = model(xi)
        pred = out.argmax(1)
        (g,) = torch.autograd.grad(out.gather(1, pred[:, None]).sum(), xi)
        g.abs().amax(1).cpu()
run()
if not os.environ.get('NOBARE'): bare()
rounds = int(sys.argv[1])
bares = []
per = []
for r in range(rounds):
    acc.clear()
    c, w = time.thread_time(), time.perf_counter()
    run()
    acc["TOTAL explain_dataset"] = [time.thread_time() - c, time.perf_counter() - w]
    per.append(dict(acc))
    acc.clear()
    if os.environ.get("NOBARE"): continue
    c, w = time.thread_time(), time.perf_counter()
    bare()
    bares.append((time.thread_time() - c, dict(acc)))
keys = sorted(per[0], key=lambda k: -per[0][k][0])
print(f"{'phase':34s} cpu ms per batch (min/med/max over {rounds} runs of {N//B} batches)   wall ms med")
for k in keys:
    cpu = [1000 * p[k][0] / (N // B) for p in per]; wall = [1000 * p[k][1] / (N // B) for p in per]
    print(f"{k:34s} {min(cpu):8.1f} {statistics.median(cpu):8.1f} {max(cpu):8.1f}   {statistics.median(wall):8.1f}")
model_cpu = [p["MODEL forward"][0] + p["MODEL autograd.grad"][0] for p in per]
outside = [p["TOTAL explain_dataset"][0] - m for p, m in zip(per, model_cpu)]
print("outside the model's passes, cpu ms per batch:", " ".join(f"{1000*o/(N//B):.1f}" for o in outside),
      " ratio total/model cpu:", " ".join(f"{p['TOTAL explain_dataset'][0]/m:.4f}" for p, m in zip(per, model_cpu)))
if bares: print("bare cpu ms per batch:", " ".join(f"{1000*b/(N//B):.1f}" for b, _ in bares),
      " of which model fwd+grad:", " ".join(f"{1000*(a['MODEL forward'][0]+a['MODEL autograd.grad'][0])/(N//B):.1f}" for _, a in bares))
print("run model fwd / grad:", " ".join(f"{1000*p['MODEL forward'][0]/(N//B):.0f}/{1000*p['MODEL autograd.grad'][0]/(N//B):.0f}" for p in per))
if bares: print("bare model fwd / grad:", " ".join(f"{1000*a['MODEL forward'][0]/(N//B):.0f}/{1000*a['MODEL autograd.grad'][0]/(N//B):.0f}" for _, a in bares))
if bares: print("run/bare cpu:", " ".join(f"{p['TOTAL explain_dataset'][0]/b:.4f}" for p, (b, _) in zip(per, bares)))
shutil.rmtree(tmp)
