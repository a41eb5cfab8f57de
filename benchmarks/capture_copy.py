"""A layer's capture copied when the layer returns (this tree, session 42) against a second pass on the first call at a
layer changed in place later and a copy handed to the rest of the later passes (main, session 41): time and peak memory.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/capture_copy.py --rounds 3 --calls 3 \\
        --out benchmarks/capture-inplace-s42

Cases (random weights, one thread, each image's predicted class): Grad-CAM on resnet50 at ``layer4`` (the default:
nothing changes its output) and at ``layer4[-1].bn3`` (``out += identity`` and an in-place ReLU after it), later calls
and a process's first call; Score-CAM on resnet18 at ``layer4[-1].bn2``; on timm's ViT-S/16 (``fused_attn=False``: an
explicit softmax) Grad-CAM at ``blocks[-1].norm1``, ``attention_maps(reduce=None)`` (the matrices themselves, which
this tree copies as each softmax forms them) and attention rollout (``reduce=``: nothing copied). Each round runs one
child process per case and tree, alternating; a child times ``--calls`` calls after one untimed call (a first-call
case: one call, in a process of its own), then one more call under a dispatch mode that reads glibc's allocated bytes
(``mallinfo2``: arenas and mmapped blocks) after every operator: the peak above the bytes allocated before the call.
Not part of salience and not run by the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import ctypes, hashlib, json, sys, time, torch, torchvision, salience
from torch.utils._python_dispatch import TorchDispatchMode
libc = ctypes.CDLL("libc.so.6")
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MI2
def used():
    i = libc.mallinfo2()
    return i.uordblks + i.hblkhd
class Peak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = used()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, used())
        return out
torch.set_num_threads(1)
torch.manual_seed(0)
CASE, FIRST, CALLS, BATCH = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(1)
if CASE.startswith("vit"):
    import timm
    from salience.attention import attention_maps
    m = timm.create_model("vit_small_patch16_224", num_classes=1000)
    for b in m.blocks:
        b.attn.fused_attn = False
    torch.nn.init.normal_(m.head.weight, std=0.02)  # timm starts the head at zero: no gradient to the blocks
    m.eval()
    x = torch.rand(BATCH, 3, 224, 224, generator=g)
    call = {"vit gradcam": lambda: salience.gradcam(m, x, None, layer=m.blocks[-1].norm1),
            "vit attention_maps": lambda: torch.stack(attention_maps(m, x)),
            "vit rollout": lambda: salience.attention_rollout(m, x, None)}[CASE]
elif CASE == "scorecam":
    m = torchvision.models.resnet18().eval()
    x = torch.rand(1, 3, 64, 64, generator=g)
    call = lambda: salience.scorecam(m, x, None, layer=m.layer4[-1].bn2)
else:
    m = torchvision.models.resnet50().eval()
    x = torch.rand(BATCH, 3, 224, 224, generator=g)
    layer = m.layer4 if CASE == "layer4" else m.layer4[-1].bn3
    call = lambda: salience.gradcam(m, x, None, layer=layer)
times = []
if not FIRST:
    call()
for _ in range(1 if FIRST else CALLS):
    t = time.perf_counter()
    r = call()
    times.append(time.perf_counter() - t)
base = used()
with Peak() as p:
    call()
r = r.detach().float().contiguous()
print(json.dumps({"times": times, "peak": p.peak - base, "sum": float(r.double().sum()),
                  "sha1": hashlib.sha1(r.numpy().tobytes()).hexdigest()[:12]}))
"""

CASES = [("resnet50 Grad-CAM layer4", "layer4", False), ("resnet50 Grad-CAM layer4[-1].bn3", "bn3", False),
         ("resnet50 Grad-CAM layer4[-1].bn3, first call", "bn3", True),
         ("resnet18 64px Score-CAM layer4[-1].bn2, 1 image", "scorecam", False),
         ("ViT-S/16 Grad-CAM blocks[-1].norm1", "vit gradcam", False),
         ("ViT-S/16 attention_maps(reduce=None)", "vit attention_maps", False),
         ("ViT-S/16 attention rollout", "vit rollout", False)]


def _child(src: str, case: str, first: bool, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    calls = 1 if case == "scorecam" else args.calls
    got = subprocess.run([sys.executable, "-c", CHILD, case, "1" if first else "0", str(calls), str(args.batch)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--main", default="/work/main/src")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    trees = [("salience", str(ROOT / "src")), ("salience main", args.main)]
    cases = [c for c in CASES if args.only is None or args.only in c[0]]
    times: dict[tuple[str, str], list[float]] = {(c[0], t[0]): [] for c in cases for t in trees}
    peaks: dict[tuple[str, str], list[int]] = {k: [] for k in times}
    sums: dict[tuple[str, str], tuple[float, str]] = {}
    for _ in range(args.rounds):
        for name, case, first in cases:
            for tree, src in trees:
                r = _child(src, case, first, args)
                times[(name, tree)].extend(r["times"])
                peaks[(name, tree)].append(r["peak"])
                sums[(name, tree)] = (r["sum"], r["sha1"])
    rows = [{"case": k[0], "implementation": k[1], "min": min(v), "median": statistics.median(v), "max": max(v),
             "calls": len(v), "peak_mib": statistics.median(peaks[k]) / 2 ** 20, "sum": sums[k][0],
             "sha1": sums[k][1]} for k, v in times.items()]
    import torch
    head = ["# A layer's capture: a copy when the layer returns (this tree) against main's second pass", "",
            "```", "flock /tmp/bench.lock taskset -c 1 " + " ".join([sys.executable] + sys.argv), "```", "",
            f"random weights, resnet50 / ViT-S: {args.batch} x 3 x 224 x 224; 1 thread, {args.rounds} alternating "
            f"rounds, torch {torch.__version__}. Peak: MiB allocated above the call's start (median).", ""]
    columns = [("case", "case", "{}"), ("implementation", "implementation", "{}"), ("min s", "min", "{:.3f}"),
               ("median s", "median", "{:.3f}"), ("max s", "max", "{:.3f}"), ("calls", "calls", "{}"),
               ("peak MiB", "peak_mib", "{:.2f}"), ("result's sum", "sum", "{:.6g}"), ("sha1", "sha1", "{}")]
    text = "\n".join(head + _table(rows, columns))
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """A markdown table: one column per ``(title, key, format)``."""
    out = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    return out + ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in columns) + " |" for r in rows]


if __name__ == "__main__":
    main()
