"""Minor page faults and CPU seconds of bare resnet50 passes (forward + input gradient, 224 px, one thread) in a
fresh process, one line per pass, for a sequence of pass sizes: how glibc's malloc keeps or gives back the
activations a pass frees (docs/performance.md, session 38).

    taskset -c 1 python benchmarks/malloc_passes.py 4 4 4 8 8 8 4 4 16 16 8 8
    taskset -c 1 python benchmarks/malloc_passes.py trim=2147483647 mmap=33554432 4 4 4 8 8 8 16 16 8 8

``trim=N`` / ``mmap=N`` / ``mmapmax=N``: ``mallopt(M_TRIM_THRESHOLD / M_MMAP_THRESHOLD / M_MMAP_MAX, N)`` before
the model is built (N an int: mallopt takes a C int); ``warm=N``: ``malloc(N)`` and ``free`` once (a freed mmapped
block under 32 MiB raises glibc's dynamic threshold to its size).
"""
import ctypes, resource, sys, time
import torch, torchvision
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
args = sys.argv[1:]
opts = [a for a in args if "=" in a]; seq = [int(a) for a in args if "=" not in a]
for o in opts:
    k, v = o.split("="); v = int(v)
    if k == "warm":
        libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
        p = libc.malloc(ctypes.c_size_t(v)); libc.free(ctypes.c_void_p(p)); continue
    libc.mallopt({"trim": M_TRIM_THRESHOLD, "mmap": M_MMAP_THRESHOLD, "mmapmax": M_MMAP_MAX}[k], v)
m = torchvision.models.resnet50().eval()
for p in m.parameters(): p.requires_grad_(False)
x = torch.randn(16, 3, 224, 224)
def ru():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_minflt, r.ru_utime + r.ru_stime
for c in seq:
    xi = x[:c].clone().requires_grad_(True)
    f0, t0 = ru(); w0 = time.perf_counter()
    out = m(xi); g, = torch.autograd.grad(out[:, 0].sum(), xi)
    del out, g, xi
    f1, t1 = ru()
    print(f"c={c:2d} faults={f1-f0:7d} cpu/img={(t1-t0)/c:.3f} wall/img={(time.perf_counter()-w0)/c:.3f}", flush=True)
