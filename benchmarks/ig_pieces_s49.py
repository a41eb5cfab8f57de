"""Session 49: what integrated gradients (and SmoothGrad) do beyond the passes, piece by piece, against the bare passes
and Captum at ``internal_batch_size=B`` / ``nt_samples_batch_size=1``.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/ig_pieces_s49.py --model resnet18 --size 64 --images 1 \\
        --steps 32 --rounds 5 --out benchmarks/ig-pieces-s49-resnet18-64.json

Runs with whatever ``salience`` is on ``PYTHONPATH``. One process, 1 thread; per round, in a rotating order: the warm
salience call (its functions wrapped by timers: the passes (``autograd.backward``), the path points, the sums'
``_Adder.add``, ``finish``, the completeness check), the bare passes of the defaults' own chunk sizes (and of B per
pass), Captum at B per pass (its ``gradient_func`` timed). Also the call with ``target=None`` (the end point's pass of
its own) and the count and batch sizes of the model's forward passes of each (a forward pre-hook on a copy). Every
figure: seconds per call, min / median / max over the rounds.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--method", default="integrated_gradients", choices=("integrated_gradients", "smoothgrad"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="", help="unit names (prefixes) not to run, separated by ;")
    ap.add_argument("--micro", type=int, default=50, help="repeats of each piece timed alone (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import captum.attr as ca

    import salience
    from salience._core import engine as _engine
    from salience.methods import integrated as _ig
    from salience.methods import smoothgrad as _sg
    from auto_declines_s44 import build
    from _common import cpu_name

    model = build(args.model, args.size)
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    b, n = args.images, args.steps
    x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    ig = args.method == "integrated_gradients"

    acc: dict[str, float] = {}

    def timer(name, fn):
        @functools.wraps(fn)
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    mod = _ig if ig else _sg
    from salience._core import autograd as _ag
    # inside the passes: the model's forward (autograd._forward) and the walk back (autograd._walk_back,
    # torch.autograd.grad); the rest of autograd.backward is salience's own work per pass
    _ag._forward = timer("model forward (autograd._forward)", _ag._forward)
    _ag._walk_back = timer("walk back (autograd._walk_back: torch.autograd.grad)", _ag._walk_back)
    # the passes: autograd.backward as the engine and the end points call it
    _engine.backward = timer("passes (autograd.backward)", _engine.backward)
    if hasattr(mod, "backward"):
        mod.backward = timer("passes (autograd.backward)", mod.backward)
    _engine._Adder.add = timer("sums (_Adder.add)", _engine._Adder.add)
    if ig:
        _ig.PathPoints.__call__ = timer("path points", _ig.PathPoints.__call__)
        _ig._checked = timer("completeness check (_checked)", _ig._checked)
        _ig.finish = timer("finish (dtype, reduce)", _ig.finish)
        _ig.refuse_fp16_overflow = timer("refuse_fp16_overflow", _ig.refuse_fp16_overflow)

    def sal(t=target):
        if ig:
            return salience.integrated_gradients(model, x, t, steps=n, reduce=None)
        return salience.smoothgrad(model, x, t, samples=n, noise=0.15, reduce=None)

    # the chunk sizes of a warm call: forward pre-hook on a copy
    twin = copy.deepcopy(model)
    seen: list[int] = []
    h = twin.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))

    def on_twin(t):
        if ig:
            return salience.integrated_gradients(twin, x, t, steps=n, reduce=None)
        return salience.smoothgrad(twin, x, t, samples=n, noise=0.15, reduce=None)

    chunks = {}
    skip = [k for k in args.skip.split(";") if k]
    for name, t in (("target given", target), ("target=None", None)):
        if any(f"salience, {name}".startswith(q) for q in skip):
            continue
        on_twin(t)
        seen.clear()
        on_twin(t)
        chunks[name] = list(seen)
    h.remove()

    items = x.repeat(n, 1, 1, 1)
    tgt = target.repeat(n)

    def bare(per_pass):
        for s in range(0, items.shape[0], per_pass):
            xi = items[s:s + per_pass].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = frozen(xi)
                torch.autograd.grad(out.gather(1, tgt[s:s + per_pass].view(-1, 1)).sum(), xi)

    def bare_sizes(sizes):
        s0 = 0
        for s in sizes:
            xi = items[s0:s0 + s].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = frozen(xi)
                torch.autograd.grad(out.gather(1, tgt[s0:s0 + s].view(-1, 1)).sum(), xi)
            s0 += s

    cap_acc = {"t": 0.0}

    def timed_gradients(attr):
        """Captum's ``attr`` with its ``gradient_func`` (the passes) timed into ``cap_acc``."""
        gf = attr.gradient_func

        def timed_gf(*a, **k):
            t0 = time.perf_counter()
            try:
                return gf(*a, **k)
            finally:
                cap_acc["t"] += time.perf_counter() - t0
        attr.gradient_func = timed_gf
        return attr

    if ig:
        igm = timed_gradients(ca.IntegratedGradients(model))

        def captum():
            return igm.attribute(x, target=target, n_steps=n, method="riemann_trapezoid", internal_batch_size=b)
    else:
        tunnel = ca.NoiseTunnel(timed_gradients(ca.Saliency(model)))
        stdevs = 0.15 * float(x.max() - x.min())

        def captum():
            return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=n, stdevs=stdevs, target=target, abs=False,
                                    nt_samples_batch_size=1)

    given = chunks["target given"]
    units = {
        "salience, target given": lambda: sal(target),
        "salience, target=None": lambda: sal(None),
        f"bare, the defaults' chunks {given}": lambda: bare_sizes(given),
        f"bare {b} a pass": lambda: bare(b),
        "captum at B a pass": captum,
    }
    if n * b not in given and n * b <= 64:
        units[f"bare {n * b} a pass"] = lambda: bare(n * b)
    if given == [b] * len(given):
        del units[f"bare {b} a pass"]  # the same passes as the defaults' chunks
    units = {k: f for k, f in units.items() if not any(k.startswith(q) for q in skip)}
    for f in units.values():  # warm
        f()
    rows: dict[str, list] = {k: [] for k in units}
    pieces: dict[str, dict[str, list]] = {k: {} for k in units}
    keys = list(units)
    load0 = os.getloadavg()
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            acc.clear()
            cap_acc["t"] = 0.0
            t0 = time.perf_counter()
            units[k]()
            dt = time.perf_counter() - t0
            rows[k].append(dt)
            got = dict(acc)
            if k.startswith("captum"):
                got = {"passes (gradient_func)": cap_acc["t"]}
            inner = ("model forward (autograd._forward)", "walk back (autograd._walk_back: torch.autograd.grad)")
            if "passes (autograd.backward)" in got:
                got["backward()'s own work per pass"] = got.pop("passes (autograd.backward)") - sum(
                    got.get(q, 0.0) for q in inner)
            got["outside the timed pieces"] = dt - sum(got.values())
            for p, v in got.items():
                pieces[k].setdefault(p, []).append(v)
    micro = _micro(x, n, given, args.micro) if ig and args.micro else {}
    report = {"micro_ms": micro, "cpu": cpu_name(), "affinity": sorted(os.sched_getaffinity(0)), "load_start": load0,
              "load_end": os.getloadavg(), "salience": salience.__file__, "args": vars(args), "chunks": chunks,
              "rounds": rows, "pieces": pieces, "command": " ".join(sys.argv)}

    def sp(v):
        return f"{min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f} / {max(v) * 1e3:.2f}"
    print(f"{report['cpu']} load {load0} -> {report['load_end']}; salience {salience.__file__}; chunks {chunks}")
    for k in keys:
        print(f"{k}: {sp(rows[k])} ms")
        for p, v in pieces[k].items():
            print(f"    {p}: {sp(v)} ms")
    for k, v in micro.items():
        print(f"alone: {k}: {v:.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def _micro(x: torch.Tensor, steps: int, chunks: list, reps: int) -> dict:
    """IG's work outside the passes on this call's shapes, each piece alone (median ms of ``reps``): the path points
    of each chunk, the sums' ``_Adder.add`` of each chunk, the attributions' product, their cast, the gap's sums."""
    from salience._core import engine as _engine
    from salience.methods import integrated as _ig

    b = x.shape[0]
    x0 = torch.zeros_like(x)
    alphas, weights = _ig.quadrature("trapezoid", steps)
    grads = [torch.randn(c, 1, *x.shape[1:]) for c in chunks]

    def med(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def points():
        path = _ig.PathPoints(x, x0, alphas)
        s0 = 0
        for c in chunks:
            path(s0, s0 + c)
            s0 += c

    def adds():
        add = _engine._Adder(b, weights, False)
        s0 = 0
        for c, g in zip(chunks, grads):
            add.add(s0, (g, torch.zeros(c, 1)))
            s0 += c

    total = torch.randn(b, 1, *x.shape[1:], dtype=torch.float64)
    attr = total * (x - x0).unsqueeze(1).to(torch.float64)
    fx, fx0 = torch.randn(b, 1, dtype=torch.float64), torch.randn(b, 1, dtype=torch.float64)
    return {
        "path points, all chunks (PathPoints)": med(points),
        "sums, all chunks (_Adder.add: float64 cast, weights, index_add_)": med(adds),
        "attributions: total * (x - x') in float64": med(lambda: total * (x.detach() - x0.detach()).unsqueeze(1)
                                                       .to(total.dtype)),
        "attributions' cast to x's dtype": med(lambda: attr.to(x.dtype)),
        "completeness check (_checked's sums and floor)": med(
            lambda: _ig._relative(attr.flatten(2).sum(2) - (fx - fx0), fx - fx0,
                                  _ig.gap_floor(fx, fx0, attr.abs().flatten(2).sum(2)))),
    }


if __name__ == "__main__":
    raise SystemExit(main())
