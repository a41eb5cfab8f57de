"""Minor page faults, CPU seconds and wall seconds of warm salience calls on resnet50 (224 px, one thread, random
weights) in a fresh process: SmoothGrad 16 (``sg``) or integrated gradients 32 (``ig``) on B images, one line
per call (the first one the cold call), with the chunks the engine ran (docs/performance.md, session 38).

    taskset -c 1 python benchmarks/malloc_calls.py sg 4                 # the defaults
    taskset -c 1 python benchmarks/malloc_calls.py sg 4 chunk=4         # chunk= fixed
    taskset -c 1 python benchmarks/malloc_calls.py sg 4 trim=2147483647 mmap=33554432   # mallopt, as allocator="reuse"
    taskset -c 1 python benchmarks/malloc_calls.py ig 8 calls=1 warm=33000000          # one 31.5 MiB block freed first

``calls=N`` warm calls after the first (default 2); ``pre=C``: three bare passes of C images first. Each line ends with
the resident memory after the call and the process's peak so far (what ``allocator="reuse"`` keeps).
"""
import ctypes, resource, sys, time
import torch, torchvision
torch.set_num_threads(1)
import salience
from salience._core import engine
libc = ctypes.CDLL("libc.so.6")
method, b = sys.argv[1], int(sys.argv[2])
kw = dict(a.split("=") for a in sys.argv[3:])
for k, code in (("trim", -1), ("mmap", -3), ("mmapmax", -4)):
    if k in kw: libc.mallopt(code, int(kw[k]))
if "warm" in kw:
    libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(ctypes.c_size_t(int(kw["warm"]))))
chunk = int(kw["chunk"]) if "chunk" in kw else None
calls = int(kw.get("calls", 2))
torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
x = torch.randn(b, 3, 224, 224)
t = torch.arange(b)
if "pre" in kw:  # bare passes first (the benchmark's process)
    c = int(kw["pre"]); xi = torch.randn(c, 3, 224, 224, requires_grad=True)
    for p in m.parameters(): p.requires_grad_(False)
    for _ in range(3): torch.autograd.grad(m(xi)[:, 0].sum(), xi)
    for p in m.parameters(): p.requires_grad_(True)
seen = []
orig = engine._accumulate
def spy(*a, **k):
    s = orig(*a, **k); seen.append(list(s.chunks)); return s
engine._accumulate = spy
def call():
    if method == "sg":
        return salience.smoothgrad(m, x, t, samples=16, reduce=None, chunk=chunk, seed=0)
    return salience.integrated_gradients(m, x, t, steps=32, reduce=None, chunk=chunk)
def ru():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_minflt, r.ru_utime + r.ru_stime
def rss():  # resident MiB now, and the process's peak (ru_maxrss, KiB on Linux)
    with open("/proc/self/statm") as f: now = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    return f"rss={now:.0f}MiB peak={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MiB"
print("before the first call:", rss(), flush=True)
for i in range(calls + 1):
    seen.clear(); f0, c0 = ru(); w0 = time.perf_counter()
    out = call()
    f1, c1 = ru()
    print(f"{method} B={b} {' '.join(sys.argv[3:]) or 'default'} call{i}: faults={f1-f0} cpu={c1-c0:.2f} wall={time.perf_counter()-w0:.2f} chunks={seen[-1] if seen else '?'} {rss()}", flush=True)
    if "save" in kw and i == calls: torch.save(out, kw["save"])
