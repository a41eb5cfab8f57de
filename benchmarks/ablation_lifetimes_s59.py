# Session 59, issue 15: the lifetimes and heap places of the blocks of 1 MiB or more over a whole bf16 call,
# Ablation-CAM against the plain loop (resnet50, 8 images at 224 px, layer1.0.conv1, 64 channels, bf16 autocast +
# channels-last, one thread; benchmarks/perturbation.py's setup and a malloc_trim(0) first, as
# benchmarks/bf16_heap_trace_s59.py). One torch.profiler window (profile_memory) over the whole call; phases cut at
# the marks of bf16_heap_trace_s59.py (Ablation-CAM: clean passes, each CastCache made / cleared, each engine chunk) or
# at each forward of the loop.
#   PYTHONPATH=src PYTHONHASHSEED=0 setarch -R python benchmarks/ablation_lifetimes_s59.py ablationcam|loop
# Prints, per phase: the blocks >= 1 MiB allocated in it (count, MiB), those of them alive at the phase's end, and
# the highest heap offset any live block reached (MiB above the heap's start: the arena the phase needed); then
# the blocks >= 1 MiB alive across two or more later phases (the long-lived ones): phase made, op, MiB, heap offset.
import ctypes, json, os, sys, time, warnings, importlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("BENCH_CONFIG", json.dumps({"model": "resnet50", "size": 224, "images": 8, "layer": "layer1.0.conv1", "masks": 64, "threads": 1}))
import perturbation as bench
import torch
from torch.profiler import profile, ProfilerActivity
from torch._C._profiler import _EventType
warnings.simplefilter("ignore")
torch.set_num_threads(1)
method = sys.argv[1]
MIB = 2**20
libc = ctypes.CDLL(None); libc.malloc_trim.argtypes = [ctypes.c_size_t]
marks = []
def mark(label): marks.append((time.time_ns(), label))
torch_, model, x, target = bench._setup()
libc.malloc_trim(0)
def heap_start():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            return int(line.split("-")[0], 16)
lo = heap_start()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
    mark("start")
    if method == "ablationcam":
        import salience
        from salience._core import casts, engine
        sc = importlib.import_module("salience.methods.scorecam")
        oc = sc._ablation_clean
        def ac(*a, **k):
            mark("clean"); r = oc(*a, **k); mark("after-clean"); return r
        sc._ablation_clean = ac
        oi = casts.CastCache.__init__
        def init(self, *a, **k):
            mark("cache"); oi(self, *a, **k)
        casts.CastCache.__init__ = init
        ocl = casts.CastCache.clear
        def clear(self):
            mark(f"clear({self.made})"); ocl(self)
        casts.CastCache.clear = clear
        orr = engine._run
        n = [0]
        def rn(compute, start, stop, **k):
            n[0] += 1; mark(f"chunk{n[0]}"); return orr(compute, start, stop, **k)
        engine._run = rn
        with salience.performance(precision="bf16", memory_format="channels_last"):
            salience.ablationcam(model, x, target, layer=bench.LAYER)
    else:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        forward = model.forward
        n = [0]
        def fw(*a, **k):
            n[0] += 1; mark(f"forward{n[0]}"); return forward(*a, **k)
        model.forward = fw
        mark("loop")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bench._loop("ablationcam", torch, model, x, target)
    mark("end")
ev = []
def walk(nd):
    if nd.tag == _EventType.Allocation:
        e = nd.extra_fields; ev.append((nd.start_time_ns, e.ptr, e.alloc_size))
    for c in nd.children: walk(c)
for r in p.profiler.kineto_results.experimental_event_tree(): walk(r)
ev.sort()
import bisect
times = [t for t, _ in marks]
def phase(t): return max(0, bisect.bisect_right(times, t) - 1)
blocks = {}  # aid -> [phase made, size, ptr, phase freed], blocks >= 1 MiB
live = {}  # ptr -> aid, blocks >= 1 MiB
every = {}  # ptr -> (size, phase made, aid), blocks of every size alive now
phase_stats = {}
ends = {}  # phase -> (c10 bytes live of every size, the 4 live blocks highest in the heap: (end offset, size, phase made))
cur, last = 0, 0


def close(ph):
    inheap = [(p - lo + s, s, m) for p, (s, m, _) in every.items() if lo <= p < lo + (1 << 40)]
    ends[ph] = (cur, sorted(inheap, reverse=True)[:4])


for aid, (t, ptr, size) in enumerate(ev):  # a free is matched to its block by address
    ph = phase(t)
    while last < ph:
        close(last); last += 1
    cur += size
    st = phase_stats.setdefault(ph, {"n": 0, "mib": 0.0, "top": 0})
    if size > 0:
        every[ptr] = (size, ph, aid)
    else:
        every.pop(ptr, None)
    if size >= MIB:
        blocks[aid] = [ph, size, ptr, None]; live[ptr] = aid
        st["n"] += 1; st["mib"] += size / MIB
        if lo <= ptr < lo + (1 << 40):
            st["top"] = max(st["top"], ptr + size - lo)
    elif size < 0 and ptr in live:
        blocks[live.pop(ptr)][3] = ph
close(last)
print(f"{method}: {len(ev)} allocation events; phases {len(marks)}")
shown = set(range(0, 12)) | {len(marks) - 2, len(marks) - 1}
for ph, (t, label) in enumerate(marks):
    st = phase_stats.get(ph, {"n": 0, "mib": 0.0, "top": 0})
    alive = [b for b in blocks.values() if b[0] == ph and (b[3] is None or b[3] > ph)]
    heap_alive = [b for b in blocks.values() if b[0] <= ph and (b[3] is None or b[3] > ph) and lo <= b[2] < lo + (1 << 40)]
    if ph in shown or ph % 16 == 0:
        print(f"  phase {ph} {label}: {st['n']} blocks >= 1 MiB, {st['mib']:.1f} MiB; {len(alive)} alive at its end "
              f"({sum(b[1] for b in alive) / MIB:.1f} MiB); live >= 1 MiB in the heap at its end "
              f"{sum(b[1] for b in heap_alive) / MIB:.1f} MiB, highest heap offset a block >= 1 MiB reached in it {st['top'] / MIB:.1f} MiB")
        if ph in ends:
            c, top = ends[ph]
            print(f"    at its end: c10 live (every size, since the window opened) {c / MIB:.1f} MiB; highest live blocks in "
                  "the heap (end offset MiB, KiB, phase made): " + ", ".join(f"({e / MIB:.1f}, {s_ / 1024:.0f}, {m})" for e, s_, m in top))
print("long-lived blocks (alive 2+ phases after the one that made them), in allocation order:")
for aid, (ph, size, ptr, fr) in sorted(blocks.items(), key=lambda kv: kv[0]):
    if fr is None or fr - ph >= 2:
        where = f"heap+{(ptr - lo) / MIB:.1f}" if lo <= ptr < lo + (1 << 40) else "mmap"
        print(f"  made {marks[ph][1]} ({ph}) {size / MIB:.2f} MiB {where} freed {marks[fr][1] + f' ({fr})' if fr is not None else 'after the call'}")
