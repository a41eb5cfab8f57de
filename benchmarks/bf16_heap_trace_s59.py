# Session 59, issue 15 memory: where one bf16 call's resident bytes come from. Runs salience.METHOD (resnet50, 8 images
# at 224 px, layer1.0.conv1, 64 masks / channels, precision="bf16", memory_format="channels_last", one thread) after
# benchmarks/perturbation.py's setup and a malloc_trim(0), and prints at each phase boundary (Ablation-CAM's float32
# clean passes, each CastCache made and cleared, chunks 1-6 and every 16th) a tuple: (event, RSS above the RSS before
# the call, VmHWM above it, glibc's mallinfo2 arena, in use (uordblks), free (fordblks), mapped blocks (hblkhd)), MiB;
# the last line the call's peak. TRIM (2nd argument, comma-separated event prefixes, e.g. "clean>,cache<"): a
# malloc_trim(0) right after each such event, its RSS printed. From the repository root:
#   PYTHONPATH=src PYTHONHASHSEED=0 setarch -R python benchmarks/bf16_heap_trace_s59.py ablationcam [TRIM]

import ctypes, importlib, json, os, sys, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("BENCH_CONFIG", json.dumps({"model": "resnet50", "size": 224, "images": 8, "layer": "layer1.0.conv1", "masks": 64, "threads": 1}))
import perturbation as bench
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
method = sys.argv[1]; trim_at = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else set()
MIB = 2**20
class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None); libc.mallinfo2.restype = _Info
libc.malloc_trim.argtypes = [ctypes.c_size_t]
def st(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) * 1024
torch_, model, x, target = bench._setup()
import salience
from salience._core import casts, engine
sc = importlib.import_module("salience.methods.scorecam")
libc.malloc_trim(0)
before = st("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
ev = []
def mark(label):
    i = libc.mallinfo2()
    ev.append((label, round((st("VmRSS") - before) / MIB, 1), round((st("VmHWM") - before) / MIB, 1), round(i.arena / MIB, 1), round(i.uordblks / MIB, 1), round(i.fordblks / MIB, 1), round(i.hblkhd / MIB, 1)))
    for t in trim_at:
        if label.startswith(t):
            libc.malloc_trim(0); ev.append(("  trimmed", round((st("VmRSS") - before) / MIB, 1)))
oc = sc._ablation_clean
def ac(*a, **k):
    mark("clean<"); r = oc(*a, **k); mark("clean>"); return r
sc._ablation_clean = ac
oi = casts.CastCache.__init__
def init(self, *a, **k):
    mark("cache<"); oi(self, *a, **k)
casts.CastCache.__init__ = init
ocl = casts.CastCache.clear
def clear(self):
    mark(f"clear({self.made})"); ocl(self)
casts.CastCache.clear = clear
orr = engine._run
n = [0]
def rn(compute, start, stop, **k):
    r = orr(compute, start, stop, **k); n[0] += 1
    if n[0] <= 6 or n[0] % 16 == 0: mark(f"chunk{n[0]}:{start}-{stop}")
    return r
engine._run = rn
opts = {"scorecam": dict(layer=bench.LAYER), "ablationcam": dict(layer=bench.LAYER), "rise": dict(masks=bench.MASKS)}[method]
with salience.performance(precision="bf16", memory_format="channels_last"):
    getattr(salience, method)(model, x, target, **opts)
mark("end")
for e in ev: print(e)
print("PEAK", round((st("VmHWM") - before) / MIB, 1))
