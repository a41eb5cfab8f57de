"""Input gradients through a frozen graph: ``torch.func.grad`` compiled under ``torch.no_grad``.

    taskset -c 1 python benchmarks/frozen_gradient.py --threads 1 --images 4 8 --rounds 5

Inductor's ``freezing`` (parameters taken as constants: BatchNorm folded, convolution weights
prepacked) applies only to inference graphs: a gradient pass through autograd cannot use it. But
with the parameters not requiring gradients, the input gradient is a function of the input alone,
and ``torch.func.grad`` is a function transform that computes it under an outer ``torch.no_grad``.
Compiled there, dynamo hands inductor one graph (forward + backward) with grad mode off, which
inductor may freeze. The quantity: the sum over the batch of each image's target logit, its
gradient w.r.t. the input (what salience's vanilla / SmoothGrad / IG passes compute).

Variants, each timed on the same input in every round (the order rotating by round):

- ``eager``: forward + ``torch.autograd.grad`` (the issue's bare pass, default layout);
- ``compiled``: ``torch.compile(model)`` (inductor), forward + ``torch.autograd.grad``;
- ``fgrad``: ``torch.compile`` of ``torch.func.grad(f)`` called under ``torch.no_grad``, no freezing;
- ``fgrad+freeze``: the same with inductor's ``freezing`` on while dynamo traces (as
  ``salience._core.perf`` does), a backend of its own.

Each variant's gradient is compared with eager's (max |difference| / max |eager|); the first call
(the compile) is timed apart. Writes ``--out``.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
VARIANTS = ("eager", "compiled", "fgrad", "fgrad+freeze")
_freeze_calls: list[tuple[int, int]] = []  # (graph inputs, inputs kept) of each inductor freeze()


def _count_freezing() -> None:
    """Record each call of inductor's ``freeze`` (so the table says whether freezing applied)."""
    import torch._inductor.freezing as fz

    orig = fz.freeze

    def freeze(dynamo_gm, aot_autograd_gm, example_inputs):
        out = orig(dynamo_gm, aot_autograd_gm, example_inputs)
        _freeze_calls.append((len(example_inputs), len(out[1])))
        return out

    fz.freeze = freeze


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def make(variant: str, model: torch.nn.Module):
    """``fn(x, target) -> gradient`` for the variant."""
    if variant == "eager" or variant == "compiled":
        net = model if variant == "eager" else torch.compile(model, backend="inductor", dynamic=False)

        def autograd_pass(x, target):
            xi = x.detach().clone().requires_grad_(True)
            out = net(xi)
            return torch.autograd.grad(out.gather(1, target.view(-1, 1)).sum(), xi)[0]

        return autograd_pass

    def gradient(x, target):
        # Dynamo takes a parameter as a constant of the graph (what freezing needs) only when it first
        # meets it with grad mode off; inside func.grad grad mode is on, and the weights stayed graph
        # inputs (inductor's freeze() kept all 104 of resnet18's). Met here first, under no_grad.
        for _ in model.parameters():
            pass
        for _ in model.buffers():
            pass
        return torch.func.grad(lambda z: model(z).gather(1, target.view(-1, 1)).sum())(x)

    if variant == "fgrad":
        compiled = torch.compile(gradient, backend="inductor", dynamic=False, fullgraph=True)

        def run(x, target):
            with torch.no_grad():
                return compiled(x, target)
        return run

    # fgrad+freeze: a backend of its own (dynamo caches graphs per backend), freezing on while tracing
    def freezing_backend(gm, example_inputs):
        return _inductor(gm, example_inputs)

    compiled = torch.compile(gradient, backend=freezing_backend, dynamic=False, fullgraph=True)
    from torch._inductor import config as ind_config

    def run_frozen(x, target):
        with torch.no_grad(), ind_config.patch(freezing=True):
            return compiled(x, target)
    return run_frozen


def _timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def job(model, b: int, args) -> dict:
    x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b))
    with torch.no_grad():
        target = model(x).argmax(1)
    fns = {v: make(v, model) for v in args.variants}
    first, diffs, freezes = {}, {}, {}
    ref = None
    for v, fn in fns.items():
        n0 = len(_freeze_calls)
        first[v], g = _timed(fn, x, target)
        freezes[v] = _freeze_calls[n0:]
        if ref is None:
            ref = fns["eager"](x, target) if v != "eager" else g
        diffs[v] = float((g - ref).abs().max() / ref.abs().max())
        print(f"  B={b} {v}: first call {first[v]:.1f} s, rel. max diff {diffs[v]:.2e}, freeze() calls "
              f"{freezes[v]}", flush=True)
    times = {v: [] for v in fns}
    names = list(fns)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            times[v].append(sum(_timed(fns[v], x, target)[0] for _ in range(args.passes)))
        print(f"  B={b} round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in names)
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return {"images": b, "first_call_s": first, "rel_max_diff": diffs, "freeze_calls": freezes, "times_s": times}


def table(jobs: list[dict]) -> str:
    lines = ["| images | variant | min s | median s | max s | median / eager | per round / eager | "
             "rel. max diff | first call s | frozen (graph inputs -> kept) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        t = j["times_s"]
        ref = statistics.median(t["eager"])
        for v, s in t.items():
            per = ", ".join(f"{a / e:.3f}" for a, e in zip(s, t["eager"]))
            fz = "; ".join(f"{a} -> {k}" for a, k in j["freeze_calls"][v]) or "no"
            lines.append(f"| {j['images']} | {v} | {min(s):.2f} | {statistics.median(s):.2f} | {max(s):.2f} | "
                         f"{statistics.median(s) / ref:.3f} | {per} | {j['rel_max_diff'][v]:.1e} | "
                         f"{j['first_call_s'][v]:.1f} | {fz} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2, help="gradient passes per timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", default=str(HERE / "frozen-gradient"))
    args = ap.parse_args(argv)
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _count_freezing()
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    report = {"config": vars(args), "argv": sys.argv[1:], "torch": torch.__version__,
              "python": platform.python_version(), "loadavg_start": os.getloadavg(), "jobs": []}
    for b in args.images:
        report["jobs"].append(job(model, b, args))
    report["loadavg_end"] = os.getloadavg()
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    md = [f"# Input gradients through a frozen graph: {args.model} at {args.size}, {args.threads} thread(s), "
          f"{args.rounds} rounds of {args.passes} passes per variant", "",
          f"torch {torch.__version__}, Python {platform.python_version()}; `python benchmarks/frozen_gradient.py "
          f"{' '.join(sys.argv[1:])}`; load {report['loadavg_start'][0]:.1f} at the start, "
          f"{report['loadavg_end'][0]:.1f} at the end.", "", table(report["jobs"]), ""]
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
