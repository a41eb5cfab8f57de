# Session 59, issue 15: every block of 1 MiB or more that one pass allocates, Ablation-CAM's chunk against the plain
# loop's pass, under bf16 autocast + channels-last (resnet50, 8 images at 224 px, layer1.0.conv1, one thread; the
# setup of benchmarks/perturbation.py, then a malloc_trim(0), as benchmarks/bf16_heap_trace_s59.py).
#   PYTHONPATH=src PYTHONHASHSEED=0 setarch -R python benchmarks/ablation_allocs_s59.py ablationcam|loop [N ...]
# ablationcam: salience.ablationcam's engine chunks N (default 5 6: image 0's channels 32-47, after the probe and the
#   layout change), each one torch.profiler window (profile_memory: every allocation and free through c10's CPU
#   allocator, with the op it came in); loop: benchmarks/perturbation.py's _loop("ablationcam") given bf16 +
#   channels-last by hand as benchmarks/heap_trim_s59.py does, its model forward number N + 2 (channel N: forwards 1
#   and 2 are its clean passes) one window each.
# A TorchDispatchMode beside the profiler gives each op output's shape and dtype (joined by address and time).
# Per window: the blocks >= 1 MiB in allocation order (#, op, MiB, dtype, shape, "heap" where the address is inside
# glibc's brk heap, else "mmap", freed at event # or "KEPT" = alive when the window ends), then a summary line:
# allocations and bytes of all sizes, the largest bytes live at once through c10, the blocks kept, glibc's mallinfo2
# (arena, in use, free, mapped) before and after, MiB. Deterministic: the counts and sizes, not the addresses.
import ctypes, json, os, sys, time, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("BENCH_CONFIG", json.dumps({"model": "resnet50", "size": 224, "images": 8, "layer": "layer1.0.conv1", "masks": 64, "threads": 1}))
import perturbation as bench
import torch
from torch.profiler import profile, ProfilerActivity
from torch.utils._python_dispatch import TorchDispatchMode
from torch._C._profiler import _EventType
warnings.simplefilter("ignore")
torch.set_num_threads(1)
method = sys.argv[1]
windows = [int(a) for a in sys.argv[2:]] or [5, 6]
MIB = 2**20
BIG = MIB


class _Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None); libc.mallinfo2.restype = _Info
libc.malloc_trim.argtypes = [ctypes.c_size_t]


def heap():
    i = libc.mallinfo2()
    return tuple(round(v / MIB, 1) for v in (i.arena, i.uordblks, i.fordblks, i.hblkhd))


def heap_start():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return int(line.split("-")[0], 16)
    return 0


class Outputs(TorchDispatchMode):
    """Each op output of 1 MiB or more: (time ns, op, data address, dtype, shape, channels-last or not)."""
    def __init__(self):
        super().__init__(); self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= BIG:
                cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                self.rows.append((time.time_ns(), str(func.overloadpacket.__name__), t.untyped_storage().data_ptr(),
                                  str(t.dtype).replace("torch.", ""), tuple(t.shape), "cl" if cl else ""))
        return out


def report(label, fn):
    before = heap()
    outs = Outputs()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p, outs:
        r = fn()
    after = heap()
    lo = heap_start()
    ev = []

    def walk(n, parents):
        if n.tag == _EventType.Allocation:
            e = n.extra_fields
            op = next((q.name for q in reversed(parents) if q.tag == _EventType.TorchOp), "-")
            ev.append((n.start_time_ns, e.ptr, e.alloc_size, op))
        for c in n.children:
            walk(c, parents + [n])
    for root in p.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    ev.sort()
    live = peak = total = count = 0
    opened, lines = {}, []
    for k, (t, ptr, size, op) in enumerate(ev):  # a free is matched to its block by address
        live += size; peak = max(peak, live)
        if size > 0:
            total += size; count += 1
            if size >= BIG:
                opened[ptr] = len(lines)
                match = next(((o, dt, sh, cl) for (tt, o, dp, dt, sh, cl) in outs.rows if dp == ptr and tt >= t), ("?", "?", (), ""))
                lines.append([k, op.replace("aten::", ""), round(size / MIB, 2), match[1], match[2], match[3],
                              "heap" if lo <= ptr < lo + (1 << 40) else "mmap", "KEPT"])
        elif ptr in opened:
            lines[opened.pop(ptr)][7] = k
    print(f"== {label}")
    for row in lines:
        print("  ", *row)
    kept = [r for r in lines if r[7] == "KEPT"]
    print(f"   SUMMARY {label}: {count} allocations, {round(total / MIB, 1)} MiB allocated; >=1 MiB: {len(lines)} "
          f"blocks, {round(sum(r[2] for r in lines), 1)} MiB; c10 live peak in the window {round(peak / MIB, 1)} MiB; "
          f"kept {len(kept)} ({round(sum(r[2] for r in kept), 1)} MiB); mallinfo (arena, in use, free, mapped) "
          f"{before} -> {after}")
    return r


torch_, model, x, target = bench._setup()
libc.malloc_trim(0)
if method == "ablationcam":
    import salience
    from salience._core import engine
    orr = engine._run
    n = [0]

    def rn(compute, start, stop, **k):
        n[0] += 1
        if n[0] in windows:
            return report(f"ablationcam chunk {n[0]} items {start}-{stop}", lambda: orr(compute, start, stop, **k))
        return orr(compute, start, stop, **k)
    engine._run = rn
    with salience.performance(precision="bf16", memory_format="channels_last"):
        salience.ablationcam(model, x, target, layer=bench.LAYER)
else:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    forward = model.forward
    n = [0]

    def fw(*a, **k):
        n[0] += 1
        if n[0] - 2 in windows:
            return report(f"loop forward {n[0]} (channel {n[0] - 2})", lambda: forward(*a, **k))
        return forward(*a, **k)
    model.forward = fw
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bench._loop("ablationcam", torch, model, x, target)
