# Issue 15: one Ablation-CAM bf16 call (resnet50, N images at 224 px, layer1.0.conv1, channels-last) under a MemoryProbe
# that counts every storage made in the call, the bf16 weight copies included; prints the CastCaches made, their copies
# and (event, ..., live MiB, peak MiB) at each phase. PYTHONPATH=<tree>/src python benchmarks/bf16_copies_probe_s58.py N out.pt
import sys, warnings, torch, torchvision
import salience
from salience._core import casts, engine
import importlib; sc = importlib.import_module("salience.methods.scorecam")
torch.set_num_threads(1)
warnings.simplefilter("ignore")
caches = []
orig_init = casts.CastCache.__init__
def init(self, *a, **k):
    orig_init(self, *a, **k); caches.append(self)
    if probe: probe.events.append(("cache", len(caches), probe.current >> 20, probe.peak >> 20))
casts.CastCache.__init__ = init
orig_clear = casts.CastCache.clear
def clear(self):
    if probe: probe.events.append(("clear", self.made, probe.current >> 20, probe.peak >> 20))
    orig_clear(self)
casts.CastCache.clear = clear
torch.manual_seed(0)
model = torchvision.models.resnet50().eval()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
x = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
probe = None
oc = sc._Ablated.check
def check(self, *a, **k):
    if probe: probe.events.append(("check<", probe.current >> 20, probe.peak >> 20))
    r = oc(self, *a, **k)
    if probe: probe.events.append(("check>", probe.current >> 20, probe.peak >> 20))
    return r
sc._Ablated.check = check
oa = engine._accumulate
def acc(*a, **k):
    if probe: probe.events.append(("acc<", probe.current >> 20, probe.peak >> 20))
    return oa(*a, **k)
engine._accumulate = acc
from salience._core import perf as P
osl = P.Run.set_layout
def sl(self, cl):
    if probe: probe.events.append(("layout<", cl, probe.current >> 20, probe.peak >> 20))
    r = osl(self, cl)
    if probe: probe.events.append(("layout>", cl, probe.current >> 20, probe.peak >> 20))
    return r
P.Run.set_layout = sl
ora = engine._run
def rn(compute, start, stop, **k):
    r = ora(compute, start, stop, **k)
    if probe: probe.events.append(("chunk", start, stop, probe.current >> 20, probe.peak >> 20))
    return r
engine._run = rn
salience.ablationcam(model, x[:1], 1, layer="layer1.0.conv1", precision="bf16", memory_format="channels_last")  # warm
caches.clear()
class Outer(engine.MemoryProbe):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        engine._making_cast = lambda: False
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            engine._making_cast = casts.making
probe = Outer(); probe.events = []
with probe:
    m = salience.ablationcam(model, x, 1, layer="layer1.0.conv1", precision="bf16", memory_format="channels_last")
print("caches", len(caches), "made", [c.made for c in caches], "peak MiB", probe.peak / 2**20)
for e in probe.events: print(e)
torch.save(m, sys.argv[2] if len(sys.argv) > 2 else "/tmp/bfm58/map.pt")
