"""``salience explain DIR`` as a command, with its default allocator (``reuse``) and with ``--allocator default``.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/cli_allocator.py [--n 64] [--pairs 2]

The command in a fresh process each time (``python -m salience explain DIR --model torchvision:resnet50 --weights
random --method vanilla --batch 16 --workers 1 --out RUN``, one thread: ``OMP_NUM_THREADS=1``), alternating the two
allocators ``--pairs`` times over the same ``--n`` JPEGs (``dataset.py``'s files): per command its wall s, and
the CPU s and minor page faults of the process and its DataLoader worker (``getrusage(RUSAGE_CHILDREN)`` around the
wait), so the process's start (imports, the model) counts in every row alike. Prints, writes nothing.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset as bench  # noqa: E402  (benchmarks/dataset.py: the files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="salience-cli-alloc-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        bench.make_jpegs(tmp / "jpegs", args.n, 224)
        for p in range(args.pairs):
            for extra in ([], ["--allocator", "default"]) if p % 2 == 0 else (["--allocator", "default"], []):
                shutil.rmtree(tmp / "run", ignore_errors=True)
                cmd = [sys.executable, "-m", "salience", "explain", str(tmp / "jpegs" / "block0"), "--model",
                       "torchvision:resnet50", "--weights", "random", "--method", "vanilla", "--batch", "16",
                       "--workers", "1", "--out", str(tmp / "run"), *extra]
                r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                r1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
                cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                print(f"{' '.join(extra) or '(the default: reuse)':22s} rc {out.returncode}  wall {wall:6.1f} s  CPU "
                      f"{cpu:6.1f} s (sys {r1.ru_stime - r0.ru_stime:4.1f})  {r1.ru_minflt - r0.ru_minflt:10,d} minor "
                      f"faults  (load {os.getloadavg()[0]:.1f})", flush=True)
                if out.returncode:
                    print(out.stderr[-2000:])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
