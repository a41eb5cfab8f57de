"""Session 48's review: minor page faults of one block a pass, at the boundary of glibc's mmap threshold, each size
in a fresh child process, with salience.malloc.raise_dynamic_threshold (the default's lever) and without.

A "pass" allocates one torch tensor of the size, touches every page (fill_), frees it; the faults of 6 passes, and
glibc's count of mapped blocks (mallinfo2 hblks) while the block is alive. Memory only (no timing):
``taskset -c 0 python benchmarks/mmap_boundary_s48.py > benchmarks/mmap-boundary-s48.txt``."""
from __future__ import annotations

import subprocess
import sys

CHILD = r'''
import ctypes, resource, sys, torch
from salience._core import malloc
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = malloc._Mallinfo2
size, lever = int(sys.argv[1]), sys.argv[2] == "1"
if lever:
    malloc.raise_dynamic_threshold()
other = torch.ones(1 << 20)  # a live heap neighbour
faults, mapped = [], []
for _ in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(size, dtype=torch.uint8); t.fill_(1); mapped.append(libc.mallinfo2().hblks); del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(f"{size:>10} {size - (32 << 20):>8} {'lever' if lever else 'none':>5}  faults {faults}  hblks {mapped}")
'''

if __name__ == "__main__":
    M = 32 << 20
    print("size      vs 32MiB  lever  minor faults per pass (6 passes)  glibc mapped blocks while alive")
    for size in (M - 65536 - 4096, M - 65536, M - 32768, M - 4096 - 96, M + 4096):
        for lever in ("1", "0"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(size), lever], capture_output=True, text=True,
                                 check=True)
            print(out.stdout.strip(), flush=True)
