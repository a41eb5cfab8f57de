"""Session 45 (issue 15, memory): where the peak resident memory (VmHWM) of a salience call goes beyond its live
tensors, against the plain loop's, in one fresh process: the call run twice, the peak reset between
(``/proc/self/clear_refs``), so that the first call's one-time costs (modules imported in the call, the folded copy
and other caches, oneDNN's primitives, glibc's heap growth) show as the difference of the two; glibc's heap read by
``mallinfo2`` after each call (in use, free in the arenas, mmapped); the threads of the process.

    CHUNKS=16 PYTHONPATH=src taskset -c 0 python benchmarks/perturbation_rss_s45.py scorecam salience "dict()"
    CHUNKS=16 PYTHONPATH=src taskset -c 0 python benchmarks/perturbation_rss_s45.py scorecam loop "dict()"

argv: method (scorecam, ablationcam (session 46; its loop: a hook setting channel k to 0): layer1.0.conv1; rise: 16
masks), ``salience`` or ``loop``, salience.performance options (``dict(allocator="reuse")`` too; the loop runs
under the same bf16 autocast where they ask bf16, contiguous). CHUNKS: the calls stop after this many chunks
(salience) / passes (the loop); CALLS (default 2; session 46: 1, a fresh process's one call) the calls.
resnet50, 8 images at 224 px, one thread. One JSON line.
"""
import ctypes
import json
import os
import sys
import threading
import warnings

import torch
import torchvision

warnings.simplefilter("ignore")
torch.set_num_threads(1)
method, impl = sys.argv[1], sys.argv[2]
perf = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
CHUNKS = int(os.environ.get("CHUNKS", 16))
torch.manual_seed(0)
model = torchvision.models.resnet50().eval()
x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    target = model(x).argmax(1)
import salience  # noqa: E402
from salience._core import engine  # noqa: E402
from salience.methods.perturbation import rise_masks  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def heap() -> dict:
    m = _libc.mallinfo2()
    return {"arena_mib": round(m.arena / 2 ** 20, 1), "in_use_mib": round(m.uordblks / 2 ** 20, 1),
            "free_mib": round(m.fordblks / 2 ** 20, 1), "mmapped_mib": round(m.hblkhd / 2 ** 20, 1)}


class Stop(Exception):
    pass


orig = engine._run
count = [0]


def run(compute, start, stop, **kw):
    out = orig(compute, start, stop, **kw)
    count[0] += 1
    if count[0] >= CHUNKS:
        raise Stop
    return out


engine._run = run
bf16 = perf.get("precision") == "bf16"
layer = model.get_submodule("layer1.0.conv1")


def call() -> None:
    count[0] = 0
    if impl == "salience":
        opts = {"scorecam": dict(layer="layer1.0.conv1"), "ablationcam": dict(layer="layer1.0.conv1"),
                "rise": dict(masks=CHUNKS)}[method]
        try:
            with salience.performance(**perf):
                getattr(salience, method)(model, x, target, **opts)
        except Stop:
            pass
        return
    rows = torch.arange(8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if method == "rise":
            sal = torch.zeros(8, 224, 224)
            for i in range(CHUNKS):
                m = rise_masks(i, i + 1, (224, 224))[0]
                sal += model(x * m).softmax(1)[rows, target].view(-1, 1, 1) * m
        else:
            store: list = []
            h = layer.register_forward_hook(lambda m, i, o: store.append(o))
            model(x)
            h.remove()
            acts = store[0]
            for k in range(CHUNKS):
                if method == "ablationcam":  # session 46: a hook setting channel k to 0, 8 images a pass
                    def zero(mod, i, o, k=k):
                        o = o.clone()
                        o[:, k] = 0
                        return o
                    h = layer.register_forward_hook(zero)
                    model(x).softmax(1)[rows, target]
                    h.remove()
                    continue
                lo, hi = acts[:, k:k + 1].amin((2, 3), keepdim=True), acts[:, k:k + 1].amax((2, 3), keepdim=True)
                m = torch.nn.functional.interpolate(acts[:, k:k + 1], size=(224, 224), mode="bilinear")
                m = (m - lo) / (hi - lo).clamp(min=1e-30)
                model(x * m).softmax(1)[rows, target]


before = status()
mods = set(sys.modules)
result = {"method": method, "impl": impl, "perf": sys.argv[3] if len(sys.argv) > 3 else "", "chunks": CHUNKS,
          "rss_before_mib": round(before["VmRSS"] / 1024, 1), "threads_before": before["Threads"]}
for i in range(1, int(os.environ.get("CALLS", 2)) + 1):  # session 46: CALLS=1, a fresh process's one call
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = status()["VmRSS"]
    call()
    s = status()
    result[f"call{i}"] = {"hwm_above_start_mib": round((s["VmHWM"] - start) / 1024, 1),
                          "hwm_above_before_mib": round((s["VmHWM"] - before["VmRSS"]) / 1024, 1),
                          "rss_after_mib": round(s["VmRSS"] / 1024, 1), "threads": s["Threads"],
                          "python_threads": threading.active_count(), **heap()}
    if i == 1:
        result["modules_imported_in_call1"] = len(set(sys.modules) - mods)
        result["some_modules"] = sorted(m for m in set(sys.modules) - mods if m.count(".") <= 1)[:25]
print(json.dumps(result))
