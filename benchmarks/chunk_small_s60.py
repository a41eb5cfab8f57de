"""The CPU gradient chunk on small models: CPU time of passes of 8, 16, 32 (64) items, and of salience's calls.

    PYTHONPATH=src python benchmarks/chunk_small_s60.py sizes --rounds 3 --out benchmarks/chunk-small-s60-sizes.md
    PYTHONPATH=src python benchmarks/chunk_small_s60.py compare --old-src /tmp/old-chunk60/src --rounds 5 \\
        --out benchmarks/chunk-small-s60.md

(``git -C /work/main archive HEAD src | tar -x -C /tmp/old-chunk60`` makes ``--old-src``.) One worker process per
code (``sizes``: this tree's only; ``compare``: main's and this tree's, both alive throughout); the parent sends one
unit at a time, to the workers in turn, the order alternating from unit to unit and round to round (one measures at a
time). A unit: one thread (``torch.set_num_threads(1)``), ``time.thread_time`` (CPU time of the thread: another
process's load changes it less than wall time), the best of 3 runs after one warm-up run. Models, random weights
(``torch.manual_seed(0)``): a tiny CNN (benchmarks/fixed_cost_s59.py's: 1x3x16x16), the demo CNN
(``load_demo("shapes")``, 64 px; ``name@px`` another size), resnet18 at 64 and 112 px, resnet50 at 64 and 224 px (224: ``compare`` only).
Items: integrated gradients' 32 path points, SmoothGrad's 16 noisy copies, of 1 and 2 images (32 / 64 and 16 / 32
items). ``bare P``: the same items' forward and ``torch.autograd.grad`` (frozen parameters) in passes of P items, no
salience; ``ig P`` / ``sg P``: ``salience.integrated_gradients(steps=32, chunk=P)`` /
``salience.smoothgrad(samples=16, chunk=P)``; ``ig`` / ``sg`` (``compare``): the engine's own chunk. A cell: the
call's CPU time over the same round's bare pass of all items in one pass, min / median / max over the rounds (the
bare pass of all items: its ms, median). ``passes``: the pass sizes of a warm call (a forward pre-hook)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ["tiny", "shapes", "resnet18@64", "resnet18@112", "resnet50@64"]


def worker(src: str) -> None:
    """Serve units: a JSON unit a line on stdin, its JSON ``{"s": seconds, "passes": [...]}`` a line on stdout."""
    sys.path.insert(0, src)
    import torch
    import torchvision

    import salience
    from salience.demo.zoo import load_demo

    torch.set_num_threads(1)
    made: dict = {}

    def make(name: str, images: int):
        if (name, images) in made:
            return made[name, images]
        torch.manual_seed(0)
        arch, _, size = name.partition("@")
        if arch == "tiny":
            m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
        elif arch == "shapes":
            m = load_demo("shapes").eval()
        else:
            m = getattr(torchvision.models, arch)(weights=None).eval()
        px = int(size) if size else 16 if arch == "tiny" else 64
        for p in m.parameters():
            p.requires_grad_(False)
        x = torch.rand(images, 3, px, px)
        made[name, images] = m, x
        return m, x

    for line in sys.stdin:
        u = json.loads(line)
        m, x = make(u["model"], u["images"])
        n = 32 if u["method"] == "ig" else 16
        items = (torch.linspace(0, 1, n + 1)[1:].view(-1, 1, 1, 1, 1) * x).reshape(-1, *x.shape[1:]) \
            if u["method"] == "ig" else (x.repeat(n, 1, 1, 1) + 0.15 * torch.randn(n * x.shape[0], *x.shape[1:]))
        chunk = u["chunk"]

        if u["kind"] == "bare":
            def once():
                out = []
                for s in range(0, items.shape[0], chunk):
                    xi = items[s:s + chunk].clone().requires_grad_(True)
                    out.append(torch.autograd.grad(m(xi)[:, 0].sum(), xi)[0])
                return torch.cat(out)
        elif u["method"] == "ig":
            def once():
                return salience.integrated_gradients(m, x, 0, steps=32, chunk=chunk)
        else:
            def once():
                return salience.smoothgrad(m, x, 0, samples=16, chunk=chunk)
        sizes: list = []
        hook = m.register_forward_pre_hook(lambda mod, a: sizes.append(int(a[0].shape[0])))
        once()
        sizes.clear()
        once()
        hook.remove()
        passes = list(sizes)
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            once()
            best = min(best, time.thread_time() - t0)
        print(json.dumps({"s": best, "passes": passes}), flush=True)


def start(src: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", src], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def ask(w: subprocess.Popen, unit: dict) -> dict:
    assert w.stdin is not None and w.stdout is not None
    w.stdin.write(json.dumps(unit) + "\n")
    w.stdin.flush()
    return json.loads(w.stdout.readline())


def fmt(xs: list) -> str:
    return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sizes", "compare", "worker"])
    ap.add_argument("src", nargs="?")
    ap.add_argument("--old-src")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.mode == "worker":
        worker(a.src)
        return
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    codes = {"this": here} if a.mode == "sizes" else {"main": a.old_src, "this": here}
    workers = {k: start(v) for k, v in codes.items()}
    cases = []
    for model in a.models.split(","):
        for images in (1, 2):
            for method in ("ig", "sg"):
                n = (32 if method == "ig" else 16) * images
                if a.mode == "sizes":
                    calls = [(k, c) for c in (8, 16, 32, 64) if c <= n for k in ("bare", "sal")]
                else:
                    calls = [("bare", n), ("sal", None)]
                cases.append((model, images, method, n, calls))
    res: dict = {}
    load = [open("/proc/loadavg").read().strip()]
    flip = 0
    for r in range(a.rounds):
        for model, images, method, n, calls in cases:
            units = [(code, kind, c) for kind, c in calls for code in codes
                     if not (a.mode == "compare" and kind == "bare" and code != "this")]
            units.insert(0, ("this", "bare", n)) if ("this", "bare", n) not in units else None
            if flip % 2:
                units.reverse()
            flip += 1
            got = {}
            for code, kind, c in units:
                got[code, kind, c] = ask(workers[code], {"model": model, "images": images, "method": method,
                                                         "kind": kind, "chunk": c})
            base = got["this", "bare", n]["s"]
            for key, v in got.items():
                cell = res.setdefault((model, images, method) + key, {"ratio": [], "s": [], "passes": v["passes"]})
                cell["ratio"].append(v["s"] / base)
                cell["s"].append(v["s"])
            print(f"round {r} {model} {images} {method}: " + ", ".join(
                f"{k[0]}:{k[1]}{k[2] or ''}={v['s'] / base:.3f}" for k, v in got.items()), flush=True)
        load.append(open("/proc/loadavg").read().strip())
    for w in workers.values():
        assert w.stdin is not None
        w.stdin.close()
        w.wait()
    lines = [f"# The CPU gradient chunk on small models ({a.mode})", "", "Command:", "",
             "    PYTHONPATH=src python " + " ".join(["benchmarks/chunk_small_s60.py"] + sys.argv[1:]), "",
             f"Rounds: {a.rounds}; one thread, `time.thread_time`, best of 3 runs a unit; cell: CPU time over the "
             "same round's bare pass of all items in one pass, min / median / max over the rounds. The machine is "
             "shared with other helpers' jobs (2 cores); `/proc/loadavg` before and after each round: "
             + "; ".join(f"`{x}`" for x in load), "",
             "| model | images | method | items | code | call | passes (warm) | time / bare all-in-one "
             "(min / med / max) | ms (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(res, key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 99,) + tuple(map(str, k[1:]))):
        model, images, method, code, kind, c = key
        v = res[key]
        n = (32 if method == "ig" else 16) * images
        call = f"bare {c}" if kind == "bare" else f"{method} {c}" if c else f"{method} (engine's chunk)"
        lines.append(f"| {model} | {images} | {method} | {n} | {code} | {call} | {v['passes']} | {fmt(v['ratio'])} "
                     f"| {1000 * statistics.median(v['s']):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
