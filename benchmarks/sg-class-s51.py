"""Issue 19, session 51: SmoothGrad's warm call with ``target=None`` (each image's predicted class) against the call with
the classes given and the best bare pass of the noisy copies, this branch's code (``new``) and main's archive (``old``)
in the same run, and where ``target=None``'s extra time goes (``--pieces``).

    git -C /work/main archive HEAD src | tar -x -C /tmp/old-sgclass
    flock /tmp/bench.lock taskset -c 1 python benchmarks/sg-class-s51.py --old-src /tmp/old-sgclass/src \\
        --case resnet18:64:1 resnet18:64:4 --rounds 5 --out benchmarks/sg-class-s51
    flock /tmp/bench.lock taskset -c 1 python benchmarks/sg-class-s51.py --old-src /tmp/old-sgclass/src \
        --case resnet50:224:1 --bare 16 --min-round 0 --rounds 5 --out benchmarks/sg-class-s51-resnet50
    flock /tmp/bench.lock taskset -c 1 python benchmarks/sg-class-s51.py --pieces \\
        --case resnet18:64:1 resnet18:64:4 resnet50:224:1 --rounds 5 --out benchmarks/sg-class-s51-pieces

The form of ``auto_declines_s49.py`` / ``auto_declines_s50.py`` (its table, its report; glibc's dynamic mmap threshold
raised in each worker before the model is built, bare passes on noisy copies, sigma 0.15 of each image's range), with
one worker process per tree and case kept for the case's rounds (a resnet50 call is seconds: set up once), each round
timing every unit once (``reps`` calls, at least ``--min-round`` s) in an order that rotates from round to round. Units:
``bare N`` (forward + input gradient of the call's noisy items, N at a time, parameters frozen), ``defaults`` (SmoothGrad
16 with the predicted classes given), ``defaults, target=None``. Figures: wall seconds per call, and the worker's CPU
seconds per call (the machine is shared).

``--pieces`` (one process, this branch): thread CPU time of the clean images' forward (batch B, no gradients), of the
same forward of x twice (batch 2B: past PyTorch's batch-1 choice of its im2col convolution), and of a first chunk of
16 noisy copies with and without the B clean images as extra rows (forward + input gradient; the clean rows' scores
read, not walked back): what reading the class inside the first chunk would cost instead of its own pass.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
TREES = ("new", "old")
SAMPLES = 16


def _setup(req: dict) -> tuple[dict, dict]:
    """The units of one case (``model:size:images``) and what the worker says of them."""
    import torch

    from auto_declines_s44 import build, chunk_sizes
    from engine_speed import bare

    import salience

    model, frozen = build(req["model"], req["size"]), build(req["model"], req["size"])
    for p in frozen.parameters():
        p.requires_grad_(False)
    b, n = req["images"], SAMPLES
    x = torch.rand(b, 3, req["size"], req["size"], generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)

    def call(m, t=target):
        return salience.smoothgrad(m, x, t, samples=n, reduce=None)

    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    items = x.repeat(n, 1, 1, 1) + sigma.repeat(n).view(-1, 1, 1, 1) * torch.randn(
        (n * b,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(1))
    chunks, chunks_none = chunk_sizes(model, call), chunk_sizes(model, lambda m: call(m, None))
    sizes = sorted({s for s in (*req["bare"], *chunks) if s <= n * b} | ({b} if b > 1 else set()))
    units = {f"bare {s}": (lambda s=s: bare(frozen, items, target.repeat(n), s)) for s in sizes}
    units["defaults"] = lambda: call(model)
    units["defaults, target=None"] = lambda: call(model, None)
    once = {k: _warm_seconds(f) for k, f in units.items()}  # for the repeats
    return units, {"salience": salience.__file__, "chunks": chunks, "chunks_target_none": chunks_none,
                   "bare_sizes": sizes, "once": once}


def _warm_seconds(f) -> float:
    """Seconds of a warm call of ``f``: the first (cold) call untimed, the second timed."""
    f()
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def worker() -> None:
    """Raise the heap's threshold, then serve one JSON request a line on stdin, one JSON answer a line on stdout."""
    sys.path.insert(0, str(HERE))
    from salience._core import malloc

    took = malloc.raise_dynamic_threshold()
    sys.stderr.write(f"heap threshold raised: {took}\n")
    import torch

    torch.set_num_threads(1)
    units: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        if req["cmd"] == "setup":
            made, out = _setup(req)
            units.update(made)
        else:
            f, reps = units[req["unit"]], req["reps"]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                f()
            out = {"t": (time.perf_counter() - t0) / reps, "cpu": (time.process_time() - c0) / reps, "faults": 0}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def run_case(case: str, args) -> list[dict]:
    """``args.rounds`` rounds of one case, a worker per tree kept for all of them."""
    from auto_declines_s47 import Worker as Worker47

    class Worker(Worker47):
        def __init__(self, src: str) -> None:
            env = dict(os.environ, PYTHONPATH=src)
            self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env, cwd=str(HERE.parent))

    model, size, images = case.split(":")
    req = {"cmd": "setup", "model": model, "size": int(size), "images": int(images), "bare": args.bare}
    workers = {"new": Worker(str(SRC)), "old": Worker(args.old_src)}
    rounds = []
    try:
        setups = {s: workers[s].ask(req) for s in TREES}
        units = [(s, k) for s in TREES for k in setups[s]["once"]]
        reps = {(s, k): max(1, math.ceil(args.min_round / max(setups["old"]["once"][k], 1e-6))) for s, k in units}
        for r in range(args.rounds):
            load0, s0 = os.getloadavg(), (r * 3) % len(units)
            out: dict = {"times": {}, "cpu": {}, "faults": {}, "reps": {}}
            for s, k in units[s0:] + units[:s0]:
                got = workers[s].ask({"cmd": "time", "unit": k, "reps": reps[(s, k)]})
                out["times"][f"{s} {k}"], out["cpu"][f"{s} {k}"] = got["t"], got["cpu"]
                out["faults"][f"{s} {k}"], out["reps"][f"{s} {k}"] = 0, reps[(s, k)]
            out["load"] = (load0, os.getloadavg())
            out["chunks"] = {s: [setups[s]["chunks"], setups[s]["chunks_target_none"]] for s in TREES}
            out["salience"] = {s: setups[s]["salience"] for s in TREES}
            rounds.append(out)
            print(f"  {case} round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in out["times"].items())
                  + f" (load {load0[0]:.2f})", flush=True)
    finally:
        for w in workers.values():
            w.close()
    return rounds


def none_over_given(jobs: dict) -> str:
    """Per case and tree: ``target=None`` over the classes given, per round (wall and CPU)."""
    lines = ["| case | tree | target=None / given, wall, per round | min / median / max | CPU, per round |",
             "|---|---|---|---|---|"]
    for case, rounds in jobs.items():
        for s in TREES:
            w = [rd["times"][f"{s} defaults, target=None"] / rd["times"][f"{s} defaults"] for rd in rounds]
            c = [rd["cpu"][f"{s} defaults, target=None"] / rd["cpu"][f"{s} defaults"] for rd in rounds]
            lines.append(f"| {case} | {s} | {', '.join(f'{v:.3f}' for v in w)} | {min(w):.3f} / "
                         f"{statistics.median(w):.3f} / {max(w):.3f} | {', '.join(f'{v:.3f}' for v in c)} |")
    return "\n".join(lines)


def pieces(case: str, rounds: int) -> dict:
    """Thread CPU seconds of the class pass and its alternatives (the module docstring), min / median / all."""
    import torch

    from auto_declines_s44 import build

    torch.set_num_threads(1)
    name, size, b = case.split(":")[0], int(case.split(":")[1]), int(case.split(":")[2])
    model = build(name, size)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        cls = model(x).argmax(1)
    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    copies = x.repeat(16 // b, 1, 1, 1) + sigma.repeat(16 // b).view(-1, 1, 1, 1) * torch.randn(
        (16,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(1))

    def chunk(extra: bool) -> None:
        xs = (torch.cat([x, copies]) if extra else copies.clone()).requires_grad_(True)
        out = model(xs)
        c = out[:b].detach().argmax(1) if extra else cls
        torch.autograd.grad(out[b if extra else 0:].gather(1, c.repeat(16 // b).view(-1, 1)).sum(), xs)

    def forward(k: int) -> None:
        with torch.no_grad():
            model(x.repeat(k, 1, 1, 1) if k > 1 else x)

    units = {"class pass (B)": lambda: forward(1), "x twice (2B)": lambda: forward(2),
             "chunk of 16": lambda: chunk(False), "chunk of 16 + the B clean rows": lambda: chunk(True)}
    for f in units.values():
        f()
    got: dict = {k: [] for k in units}
    for _ in range(rounds):
        for k, f in units.items():
            t0 = time.thread_time()
            f()
            got[k].append(time.thread_time() - t0)
    out = {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in got.items()}
    out["kernels"] = {f"batch {k * b}": _conv_kernels(lambda k=k: forward(k)) for k in (1, 2)}
    return out


def _conv_kernels(fn) -> dict:
    """How many of one forward's convolutions ran PyTorch's im2col kernel and how many oneDNN's (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {"im2col (aten::_slow_conv2d_forward)": counts.get("aten::_slow_conv2d_forward", 0),
            "oneDNN (aten::mkldnn_convolution)": counts.get("aten::mkldnn_convolution", 0)}


def pieces_table(res: dict) -> str:
    lines = ["| case | class pass (B), ms | x twice (2B), ms | chunk of 16, ms | + the B clean rows, ms | "
             "extra rows' cost - class pass, ms |", "|---|---|---|---|---|---|"]
    for case, r in res.items():
        m = {k: v["min"] * 1e3 for k, v in r.items() if k != "kernels"}
        extra = m["chunk of 16 + the B clean rows"] - m["chunk of 16"]
        lines.append(f"| {case} | {m['class pass (B)']:.1f} | {m['x twice (2B)']:.1f} | {m['chunk of 16']:.1f} | "
                     f"{m['chunk of 16 + the B clean rows']:.1f} (+{extra:.1f}) | {extra - m['class pass (B)']:+.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pieces", action="store_true", help="the class pass and its alternatives, this branch only")
    ap.add_argument("--old-src", default="/tmp/old-sgclass/src", help="main's archive's src (git archive of main)")
    ap.add_argument("--case", nargs="+", default=["resnet18:64:1"], help="model:px:images")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-round", type=float, default=1.0)
    ap.add_argument("--bare", type=int, nargs="+", default=[8, 16, 32],
                    help="bare pass sizes timed (besides the call's own chunk sizes and B)")
    ap.add_argument("--out", default=str(HERE / "sg-class-s51"))
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return 0
    sys.path.insert(0, str(HERE))
    from _common import cpu_name
    from auto_declines_s44 import write_report

    command = "python benchmarks/sg-class-s51.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)),
              "loadavg_start": os.getloadavg(), "rounds": args.rounds, "old_src": args.old_src}
    t0 = time.time()
    if args.pieces:
        sys.path.insert(0, str(SRC))
        report["pieces"] = {c: pieces(c, args.rounds) for c in args.case}
        report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
        write_report(args.out, report, "SmoothGrad's predicted class: its own pass and the alternatives",
                     "1 thread, this branch, fp32", "Thread CPU milliseconds, the minimum of the rounds. ",
                     pieces_table(report["pieces"]), "Convolution kernels of one forward of x (and of x twice): "
                     + "; ".join(f"{c} {r['kernels']}" for c, r in report["pieces"].items()))
        return 0
    report["jobs"] = {}
    for c in args.case:  # the report written after each case: a run cut short keeps the cases it finished
        report["jobs"][c] = run_case(c, args)
        report["loadavg_end"], report["wall_s"] = os.getloadavg(), time.time() - t0
        _write(args, report)
    return 0


def _write(args, report: dict) -> None:
    from auto_declines_s44 import write_report
    from auto_declines_s49 import table

    loads = [rd["load"][0][0] for rnds in report["jobs"].values() for rd in rnds]
    foot = (f"1-minute load per round {min(loads):.2f}-{max(loads):.2f}. Chunks (target given, target=None): "
            + "; ".join(f"{c} new {rnds[0]['chunks']['new']}, old {rnds[0]['chunks']['old']}"
                        for c, rnds in report["jobs"].items()) + ".\n\n" + none_over_given(report["jobs"]))
    write_report(args.out, report,
                 f"SmoothGrad {SAMPLES}'s warm call, target=None and the classes given, against the bare passes of "
                 f"the noisy copies, this branch (new) and main's archive (old), {args.rounds} rounds",
                 "1 thread per worker, one worker per tree and case, fp32", "Milliseconds per call (wall). ",
                 table(report["jobs"]), foot)


if __name__ == "__main__":
    raise SystemExit(main())
