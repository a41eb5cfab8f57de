"""Session 48's review: a forked child's memory after the parent's passes, glibc's dynamic threshold raised or not
(``malloc.raise_dynamic_threshold``), the child giving back the free heap it shares or not. Memory only (no lock):

    taskset -c 0 python benchmarks/heap_fork_s48.py MODE [MODEL PX]

MODE: ``off`` (the lever switched off: glibc as it is), ``on`` (salience's default), ``on-trim`` / ``off-trim`` (the
child calls glibc's ``malloc_trim(0)`` itself), ``on-release`` / ``off-release`` (the child calls
``malloc.release_shared_heap``, as a dataset run's forked worker does). Three SmoothGrad 16 calls of one image, one
thread, a fork (the child waits), three more calls in the parent (their minor faults), then the child's
``/proc/PID/smaps_rollup`` in MiB; the parent's ``mallinfo2`` at the fork. One JSON line.
"""
import ctypes, json, os, resource, sys
mode = sys.argv[1]          # off | on | on-trim | off-trim
model_name = sys.argv[2] if len(sys.argv) > 2 else "resnet18"
px = int(sys.argv[3]) if len(sys.argv) > 3 else 64
import torch, torchvision, salience
from salience._core import malloc
torch.set_num_threads(1)
if mode.startswith("off"):
    malloc._raise_tried = True
libc = ctypes.CDLL(None)
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in malloc._FIELDS]
libc.mallinfo2.restype = MI
model = getattr(torchvision.models, model_name)(weights=None).eval()
x = torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(1))
def call():
    return salience.smoothgrad(model, x, 0, samples=16, seed=0)
for _ in range(3):
    call()
mi = libc.mallinfo2()
r, w = os.pipe(); r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r); os.close(w2)
    if mode.endswith("release"):
        print("released", malloc.release_shared_heap(), file=sys.stderr)
    if mode.endswith("trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
    os.write(w, b"1")
    os.read(r2, 1)
    os._exit(0)
os.close(w); os.close(r2)
os.read(r, 1)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    call()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
roll = {}
with open(f"/proc/{pid}/smaps_rollup") as f:
    for line in f:
        k, *v = line.split()
        if k.rstrip(":") in ("Rss", "Private_Dirty", "Shared_Dirty", "Private_Clean"):
            roll[k.rstrip(":")] = int(v[0]) // 1024
os.write(w2, b"1"); os.waitpid(pid, 0)
print(json.dumps({"mode": mode, "raised": malloc._raised, "fordblks_MiB": mi.fordblks >> 20, "keepcost_MiB": mi.keepcost >> 20,
                  "arena_MiB": mi.arena >> 20, "parent_faults_3calls": faults, "child_MiB": roll}))
