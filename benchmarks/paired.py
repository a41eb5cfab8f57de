"""salience's overhead over the bare passes, measured in pairs so that a shared CPU's load cancels.

    python benchmarks/paired.py                    # resnet50, 8 images 224x224, 2 threads, 8 samples / 8 steps, 7 pairs
    python benchmarks/paired.py --model resnet18 --size 112 --pairs 5

On a machine whose load changes from one minute to the next, two cases timed minutes apart
(what ``run.py`` does, one process per case) can differ by several times for the same work. Here
one process alternates, ``--pairs`` times, the bare passes (one forward plus
``torch.autograd.grad`` w.r.t. the input, in batches of B, parameters frozen: what any method
must pay) and the salience call that needs exactly those passes, in alternating order (ABBA...),
and reports the median of the per-pair ratios ``salience / bare``, with the quartiles. The ratio
of two runs seconds apart is far less exposed to the load than either time.

Cases: ``smoothgrad`` (``samples`` noisy copies: ``samples * B`` images), ``integrated_gradients``
(``steps`` points: ``steps * B`` images; its default trapezoid rule needs no other pass) and
``vanilla`` (B images).

``--captum`` pairs salience instead with Captum's NoiseTunnel(Saliency) and IntegratedGradients at
their batched settings (``nt_samples_batch_size=2``, ``internal_batch_size=2B``, the faster ones in
``run.py``) for the same samples / steps; the ratio is then ``salience / captum`` (< 1: salience is
faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, bare, frozen_copy, make_workload  # noqa: E402

import salience  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=8, help="SmoothGrad copies and IG steps")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--captum", action="store_true", help="pair salience with Captum's batched NoiseTunnel / "
                    "IntegratedGradients (nt_samples_batch_size=2, internal_batch_size=2B) instead of the bare passes")
    ap.add_argument("--out", default=None, help="default benchmarks/paired.json (--captum: paired-captum.json)")
    args = ap.parse_args(argv)

    model, x, target = make_workload(args.model, args.batch, args.size, args.threads)
    frozen = frozen_copy(model)
    b, s = args.batch, args.samples
    cases = {
        "vanilla": (lambda: salience.vanilla(model, x, target, reduce=None), b),
        "smoothgrad": (lambda: salience.smoothgrad(model, x, target, samples=s, reduce=None), s * b),
        "integrated_gradients": (lambda: salience.integrated_gradients(model, x, target, steps=s, reduce=None), s * b),
    }
    if args.captum:
        import captum.attr as ca

        nt, ig = ca.NoiseTunnel(ca.Saliency(model)), ca.IntegratedGradients(model)
        stdevs = 0.15 * float(x.max() - x.min())
        peers = {
            "smoothgrad": lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=s, stdevs=stdevs, target=target,
                                               abs=False, nt_samples_batch_size=2),
            "integrated_gradients": lambda: ig.attribute(x, target=target, n_steps=s, method="riemann_trapezoid",
                                                         internal_batch_size=2 * b),
        }
        cases = {k: (v[0], v[1], peers[k]) for k, v in cases.items() if k in peers}
    else:
        cases = {k: (v[0], v[1], lambda n=v[1]: bare(frozen, x, target, n)) for k, v in cases.items()}
    out_path = args.out or str(HERE / ("paired-captum.json" if args.captum else "paired.json"))
    other = "captum" if args.captum else "bare"
    report = {"config": vars(args), "torch": torch.__version__, "loadavg_start": os.getloadavg(), "cases": {}}
    for name, (fn, n_images, ref) in cases.items():
        fn()  # warm-up (and the first-call costs of both)
        ref()
        ratios, t_sal, t_bare = [], [], []
        for i in range(args.pairs):
            order = ("sal", "bare") if i % 2 == 0 else ("bare", "sal")
            t = {}
            for which in order:
                t0 = time.perf_counter()
                fn() if which == "sal" else ref()
                t[which] = time.perf_counter() - t0
            ratios.append(t["sal"] / t["bare"])
            t_sal.append(t["sal"])
            t_bare.append(t["bare"])
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        report["cases"][name] = {
            "images": n_images, "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
            "ratios": ratios, "salience_s": t_sal, f"{other}_s": t_bare,
        }
        print(f"{name:22s} {n_images:4d} images  salience/{other}: median {statistics.median(ratios):.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}); salience median {statistics.median(t_sal):.2f} s, "
              f"{other} median {statistics.median(t_bare):.2f} s", flush=True)
    report["loadavg_end"] = os.getloadavg()
    Path(out_path).write_text(json.dumps(report, indent=2))
    print(f"load average {report['loadavg_start']} -> {report['loadavg_end']}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
