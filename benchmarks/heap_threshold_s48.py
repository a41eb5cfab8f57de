"""Session 48's review: where glibc's dynamic mmap threshold stands by itself (``raise_dynamic_threshold`` switched
off) after a resnet50 pass at 224 px: the largest malloc-mapped block freed during the pass (``strace`` of anonymous
read-write ``mmap`` / ``munmap`` pairs from the process's start to the pass's end: its import and the model's
build count too; glibc raises the threshold to each freed mapped block up to
32 MiB, the trim threshold to twice that). Needs ``strace``. Memory only:

    taskset -c 0 python benchmarks/heap_threshold_s48.py N METHOD      (N images; METHOD vanilla or smoothgrad)

(A 32 MiB mapping unmapped at the process's exit is OpenBLAS's buffer, numpy's, not malloc's: a ``munmap`` at exit,
after the end mark, and ``gdb`` showed ``blas_shutdown``; the figure is taken before the end mark.)
"""
import os
import re
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, torch, torchvision, salience
from salience._core import malloc
malloc._raise_tried = True  # glibc as it is
torch.set_num_threads(1)
model = torchvision.models.resnet50(weights=None).eval()
x = torch.rand(int(sys.argv[1]), 3, 224, 224)
sys.stderr.write("MARK-START\n"); sys.stderr.flush()
if sys.argv[2] == "vanilla":
    salience.vanilla(model, x, 0)
else:
    salience.smoothgrad(model, x, 0, samples=16, seed=0)
sys.stderr.write("MARK-END\n"); sys.stderr.flush()
"""


def main() -> None:
    n, method = sys.argv[1], sys.argv[2]
    with tempfile.NamedTemporaryFile(suffix=".txt") as log:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=mmap,munmap,write", "-o", log.name, sys.executable, "-c",
                        CHILD, n, method], check=True, stderr=subprocess.DEVNULL)
        lines = open(log.name).read().splitlines()
    on, maps, freed = True, {}, []
    for line in lines:
        if "MARK-END" in line:
            on = False
            continue
        m = re.search(r"mmap\(NULL, (\d+), PROT_READ\|PROT_WRITE, MAP_PRIVATE\|MAP_ANONYMOUS, -1, 0\) = (0x[0-9a-f]+)", line)
        if m and on:
            maps[m.group(2)] = int(m.group(1))
            continue
        m = re.search(r"munmap\((0x[0-9a-f]+), (\d+)\)", line)
        if m and on and maps.get(m.group(1)) == int(m.group(2)):
            freed.append(int(m.group(2)))
    under = [s for s in freed if s <= 32 << 20]
    top = max(under, default=128 << 10)
    print(f"resnet50 224 px, {method} of {n}: {len(freed)} mapped blocks freed by the pass's end, the largest up to 32 MiB "
          f"{top / 2**20:.2f} MiB (threshold ~ that, trim ~ {2 * top / 2**20:.1f} MiB), over 32 MiB "
          f"{sum(s > 32 << 20 for s in freed)}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
