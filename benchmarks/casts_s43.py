"""Session 43: the weight casts kept for every pass of a CPU bf16 call (salience._core.casts), before / after.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/casts_s43.py --before /tmp/s43_old/src --after src \\
        --images 4 --rounds 3 --out benchmarks/casts-s43
    (the same with --chunk 4 --modes bf16+channels_last --out benchmarks/casts-s43-chunk4: one pass per 4 items)

Two worker processes, one per source tree (``--before``: main's, ``--after``: this branch's), each with resnet50
(random weights, eval), ``--images`` images at ``--size`` px, one thread. Each salience mode (SmoothGrad ``--samples``
and IG ``--steps``, under ``precision="bf16"`` and ``"bf16-mixed"``, both with ``memory_format="channels_last"``) is
called once before the rounds (the probes); then in every round each (method, mode) is timed in both trees, the
order of the trees alternating from round to round, beside the bare bf16 passes (forward under ``torch.autocast``
bf16, channels-last, parameters frozen, ``torch.autograd.grad`` of the target's score w.r.t. the input, in passes of
the images: the same number of passes as the method). Min / median / max per row to ``OUT.md`` and ``OUT.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = {"bf16+channels_last": "bf16", "bf16-mixed+channels_last": "bf16-mixed"}


def worker(images: int, size: int, samples: int, steps: int, chunk: int) -> None:
    import torch
    import torchvision
    import salience

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    kw = {"memory_format": "channels_last", "chunk": chunk or None}
    calls = {"smoothgrad": lambda p: salience.smoothgrad(model, x, 1, samples=samples, seed=0, precision=p, **kw),
             "ig": lambda p: salience.integrated_gradients(model, x, 1, steps=steps, precision=p, **kw)}

    def bare(passes: int) -> None:
        m = model.to(memory_format=torch.channels_last)
        for p in m.parameters():
            p.requires_grad_(False)
        for _ in range(passes):
            xi = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(xi)
            torch.autograd.grad(out[:, 1].float().sum(), xi)
        model.to(memory_format=torch.contiguous_format)
        for p in m.parameters():
            p.requires_grad_(True)

    for line in sys.stdin:
        method, mode = line.split()
        t = time.perf_counter()
        if mode == "bare":
            bare(samples if method == "smoothgrad" else steps)
        else:
            calls[method](MODES[mode])
        print(time.perf_counter() - t, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="")
    ap.add_argument("--after", default="")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/casts-s43")
    ap.add_argument("--chunk", type=int, default=0, help="items per pass (0: salience's memory budget)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a.images, a.size, a.samples, a.steps, a.chunk)
    procs = {}
    for name, src in (("before", a.before), ("after", a.after)):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", "--images", str(a.images), "--size",
                                        str(a.size), "--samples", str(a.samples), "--steps", str(a.steps), "--chunk", str(a.chunk)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def call(tree: str, method: str, mode: str) -> float:
        p = procs[tree]
        p.stdin.write(f"{method} {mode}\n")
        p.stdin.flush()
        return float(p.stdout.readline())

    rows: dict = {}
    first = {}
    for method in ("smoothgrad", "ig"):
        for mode in a.modes:
            for tree in procs:
                first[f"{method} {mode} {tree}"] = call(tree, method, mode)
    for r in range(a.rounds):
        order = list(procs) if r % 2 == 0 else list(reversed(procs))
        for method in ("smoothgrad", "ig"):
            rows.setdefault(f"{method} bare bf16+channels_last", []).append(call("after", method, "bare"))
            for mode in a.modes:
                for tree in order:
                    rows.setdefault(f"{method} {mode} {tree}", []).append(call(tree, method, mode))
        print(f"round {r + 1} done", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    write(a, rows, first)


def write(a: argparse.Namespace, rows: dict, first: dict) -> None:
    lines = [f"# Weight casts once per call (session 43): resnet50, {a.images} images at {a.size} px, one thread",
             "", f"SmoothGrad {a.samples} samples, IG {a.steps} steps, chunk {a.chunk or 'by memory'}; {a.rounds} rounds, trees alternating; seconds "
             "per call. `before`: main's tree, `after`: this branch's. Command: see the script's docstring.", "",
             "| method / mode / tree | min | median | max | median / bare |", "|---|---|---|---|---|"]
    for key, ts in rows.items():
        bare = statistics.median(rows[f"{key.split()[0]} bare bf16+channels_last"])
        lines.append(f"| {key} | {min(ts):.2f} | {statistics.median(ts):.2f} | {max(ts):.2f} | "
                     f"{statistics.median(ts) / bare:.3f} |")
    lines += ["", "After / before (medians):", ""]
    for key in rows:
        if key.endswith(" after"):
            b = statistics.median(rows[key[:-6] + " before"])
            lines.append(f"- {key[:-6]}: {statistics.median(rows[key]) / b:.3f}")
    lines += ["", "First calls (probes): " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()),
              "", f"Load average at the end: {os.getloadavg()}"]
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    json.dump({"rows": rows, "first": first, "args": vars(a)}, open(a.out + ".json", "w"), indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
