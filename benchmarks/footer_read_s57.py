"""Bytes read to tell a folder's ``inputs.parquet`` for a run's table (session 57):
``salience.runs.store.is_store_table`` on a sparse file whose parquet footer claims ``CLAIM`` bytes of metadata (``PAR1`` at both ends), each claim in a fresh
process, its ``rchar`` (``/proc/self/io``: every ``read``, pyarrow's C++ ones too), resident peak and seconds. Bytes
read do not change with the machine's load; the seconds do. Run it against the base and the branch by PYTHONPATH:

    PYTHONPATH=src python benchmarks/footer_read_s57.py            # this checkout
    PYTHONPATH=/path/to/base/src python benchmarks/footer_read_s57.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from salience.runs.store import is_store_table
path = sys.argv[1]
def rchar():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar"))
r0, t0 = rchar(), time.perf_counter()
said = is_store_table(path)
print(json.dumps({"read": rchar() - r0, "s": time.perf_counter() - t0, "said": said,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    print(f"load: {open('/proc/loadavg').read().strip()}")
    print("| footer claims | file size | bytes read | resident peak MiB | s | a store table |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for claim in (64 << 20, 1 << 30):
            path = os.path.join(tmp, "inputs.parquet")
            size = claim + 12
            with open(path, "wb") as f:
                f.write(b"PAR1")
                f.seek(size - 8)
                f.write(claim.to_bytes(4, "little") + b"PAR1")
            out = json.loads(subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                                            check=True).stdout)
            print(f"| {claim:,} | {size:,} | {out['read']:,} | {out['maxrss_mib']:.0f} | {out['s']:.2f} | "
                  f"{out['said']} |")
            os.unlink(path)


if __name__ == "__main__":
    main()
