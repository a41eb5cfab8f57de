"""Salience's own CPU work per call, over the bare pass, on small models: main's code against this tree's.

    PYTHONPATH=src python benchmarks/fixed_cost_s59.py --old-src /tmp/old-fixcost59/src --rounds 5 \\
        --out benchmarks/fixed-cost-s59.md

(``git -C /work/main archive HEAD src | tar -x -C /tmp/old-fixcost59`` makes ``--old-src``.) One worker process
per code, both alive throughout; the parent sends one unit (a case) at a time, to the two workers in turn, the order
alternating from unit to unit and round to round (only one measures at a time). A unit: the bare pass and salience's
call in alternating blocks of about 0.1 s (3 blocks each, one thread, ``time.thread_time``: CPU time of the thread,
which another process's load changes less than wall time), the best block of each. A cell: salience's us a
call minus the bare pass's of the same worker, min / median / max over the rounds. Cases: a tiny model
(Conv2d(3, 4, 3), BatchNorm2d, ReLU, AdaptiveAvgPool2d, Flatten, Linear(4, 5); 1x3x16x16) and the demo CNN
(``load_demo("shapes")``, 1x3x64x64); ``vanilla``, ``smoothgrad`` (samples=16), ``integrated_gradients`` (steps=32),
``gradcam`` (the last convolution). The bare passes: the same forward and ``torch.autograd.grad`` by hand (frozen
parameters), SmoothGrad's with its 16 noisy copies drawn, IG's with its 32 path points and the trapezoid sum, Grad-CAM's
with the hook, the channel weights, the ReLU and the upsampling."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [(model, method) for model in ("tiny", "shapes")
         for method in ("vanilla", "smoothgrad", "integrated_gradients", "gradcam")]


def worker(src: str) -> None:
    """Serve units: a case name a line on stdin, its JSON ``{"bare": us, "sal": us}`` a line on stdout."""
    sys.path.insert(0, src)
    import torch
    import torch.nn.functional as F

    import salience
    from salience.demo.zoo import load_demo

    torch.set_num_threads(1)
    torch.manual_seed(0)
    made = {}

    def make(name: str, method: str):
        if name == "tiny":
            m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
            x = torch.rand(1, 3, 16, 16)
        else:
            m = load_demo("shapes").eval()
            x = torch.rand(1, 3, 64, 64)
        for p in m.parameters():
            p.requires_grad_(False)
        layer = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)][-1]
        cls = int(m(x).argmax(1))

        def grad_of(xi):
            out_ = m(xi)
            return torch.autograd.grad(out_[:, cls].sum(), xi)[0]

        if method == "vanilla":
            def bare():
                return grad_of(x.clone().requires_grad_(True)).abs().amax(1)

            def sal():
                return salience.vanilla(m, x, cls)
        elif method == "smoothgrad":
            def bare():
                sigma = 0.15 * float(x.max() - x.min())
                xs = (x.repeat(16, 1, 1, 1) + sigma * torch.randn(16, *x.shape[1:])).requires_grad_(True)
                return grad_of(xs).mean(0, keepdim=True).abs().amax(1)

            def sal():
                return salience.smoothgrad(m, x, cls, samples=16)
        elif method == "integrated_gradients":
            def bare():
                alphas = torch.linspace(0, 1, 33)[1:].view(-1, 1, 1, 1)
                pts = (alphas * x).requires_grad_(True)
                g = grad_of(pts)
                w = torch.ones(32, 1, 1, 1)
                w[-1] = 0.5
                return ((g * w).sum(0, keepdim=True) / 32 * x).sum(1)

            def sal():
                return salience.integrated_gradients(m, x, cls, steps=32)
        else:
            mod = m.get_submodule(layer)

            def bare():
                store = []
                h = mod.register_forward_hook(lambda _m, _i, o: store.append(o))
                try:
                    xi = x.clone().requires_grad_(True)
                    out_ = m(xi)
                finally:
                    h.remove()
                a = store[0]
                g = torch.autograd.grad(out_[:, cls].sum(), a)[0]
                cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
                return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

            def sal():
                return salience.gradcam(m, x, cls, layer=layer)
        for _ in range(10):
            bare()
            sal()
        t = time.thread_time()
        sal()
        one = max(time.thread_time() - t, 1e-4)
        return bare, sal, max(5, int(0.1 / one))

    for line in sys.stdin:
        key = line.strip()
        if not key:
            continue
        if key not in made:
            made[key] = make(*key.split(":"))
        bare, sal, n = made[key]
        best = {"bare": float("inf"), "sal": float("inf")}
        for _ in range(3):
            for which, f in (("bare", bare), ("sal", sal)):
                t = time.thread_time()
                for _ in range(n):
                    f()
                best[which] = min(best[which], (time.thread_time() - t) / n * 1e6)
        print(json.dumps(best), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-src", required=True)
    ap.add_argument("--new-src", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "src"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    procs = {code: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--old-src", args.old_src, "--worker",
                                     src], env=dict(os.environ, PYTHONPATH=src), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
             for code, src in (("old", args.old_src), ("new", args.new_src))}
    runs: dict = {"old": [{} for _ in range(args.rounds)], "new": [{} for _ in range(args.rounds)]}
    loads = []
    try:
        for r in range(args.rounds):
            loads.append(open("/proc/loadavg").read().split()[0])
            for i, (name, method) in enumerate(CASES):
                key = f"{name}:{method}"
                for code in (("old", "new") if (r + i) % 2 == 0 else ("new", "old")):
                    procs[code].stdin.write(key + "\n")
                    procs[code].stdin.flush()
                    runs[code][r][key] = json.loads(procs[code].stdout.readline())
            print(f"round {r + 1} done", file=sys.stderr)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    command = " ".join(["PYTHONPATH=src python benchmarks/fixed_cost_s59.py", *sys.argv[1:]])
    lines = [f"# Salience's own CPU work per call over the bare pass (us), {args.old_src} (\"main\") against this "
             "tree's", "",
             f"`{command}`: {args.rounds} rounds, each case's units sent to the "
             "two codes' worker processes in turn (alternating order); one thread, `time.thread_time`, best of 3 "
             f"blocks a unit; 1-minute load at each round's start: {', '.join(loads)} ({os.cpu_count()} CPUs; any "
             "other work on the machine is not listed here: say it beside the table).", "",
             "| case | bare pass (us, median) | main: over bare, min / median / max | this tree: over bare, min / median / "
             "max | this tree / main (medians) | this tree / main, per round |", "|---|---|---|---|---|---|"]
    for name, method in CASES:
        key = f"{name}:{method}"
        bare = statistics.median([r[key]["bare"] for code in runs for r in runs[code]])
        cells = []
        meds = []
        for code in ("old", "new"):
            over = sorted(r[key]["sal"] - r[key]["bare"] for r in runs[code])
            meds.append(statistics.median(over))
            cells.append(f"{over[0]:.0f} / {statistics.median(over):.0f} / {over[-1]:.0f}")
        paired = [(n[key]["sal"] - n[key]["bare"]) / (o[key]["sal"] - o[key]["bare"]) for o, n in zip(runs["old"], runs["new"])]
        lines.append(f"| {key} | {bare:.0f} | {cells[0]} | {cells[1]} | {meds[1] / meds[0]:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in paired)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"runs": runs, "loads": loads}, f, indent=1)


if __name__ == "__main__":
    main()
