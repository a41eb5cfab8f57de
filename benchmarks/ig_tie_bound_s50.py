"""Session 50, issue 19: how far the logits of ``x``'s rows in integrated gradients' path chunks are from a plain
eager fp32 ``model(x)`` (the bound :data:`salience.methods.integrated.TIE_BOUND` must stay far above).

For each model and input, the plain pass is ``model(x)`` of the B images alone, contiguous, float32, eager (what
``target=None`` runs today). Against it, x's rows in: batches of the path's points (x first, then the trapezoid's
other points) of 8, 16, 32 and 32*B items; the same channels-last; the BatchNorm-folded copy (fold_batchnorm); each
with gradients on (as the path's passes run). Per row: ``max |logit - plain logit| / max |plain logit|``; the table
gives the largest over rows, inputs and configurations, per model and configuration.

    taskset -c 0 python benchmarks/ig_tie_bound_s50.py --out benchmarks/ig-tie-bound-s50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ["resnet18:64", "resnet18:224", "resnet50:64", "resnet50:224", "vit_b_16:64", "vit_b_16:224",
         "shapes:64", "shapes-cue:64", "shapes-vit:64"]


def configs(model, folded):
    cl = torch.channels_last
    out = [("contiguous", model, False)]
    try:
        twin = __import__("copy").deepcopy(model).to(memory_format=cl)
        out.append(("channels_last", twin, True))
    except Exception:  # pragma: no cover
        pass
    if folded is not None:
        out.append(("folded", folded, False))
    return out


def write_md(out: str, runs: list) -> None:
    """``out.md``: the largest difference per model and configuration, the runs' CPU, load and command."""
    lines = ["# x's logits in the path's chunks against a plain eager fp32 model(x), session 50", ""]
    for r in runs:
        lines.append(f"- {r['cpu']}, torch {r['torch']}, 1 thread, load {[round(v, 2) for v in r['load']]}, "
                     f"{r['wall_s']:.0f} s: `{r.get('command', 'taskset -c 0 python benchmarks/ig_tie_bound_s50.py')}`")
    lines += ["", "Largest `max|logit - plain| / max|plain|` over x's rows (inputs of 1, 2 or 8 images at 64 px, 1 image "
              "at 224 px), per configuration; the last column: the smallest `(top1 - top2) / max|logit|` of the plain "
              "passes:", "",
              "| model | largest | where | contiguous | channels-last | folded copy | smallest top-2 margin |",
              "|---|---|---|---|---|---|---|"]
    for r in (row for run in runs for row in run["rows"]):
        part = {k: max((v for key, v in r["worst"].items() if key.startswith(k)), default=float("nan"))
                for k in ("contiguous", "channels_last", "folded")}
        lines.append(f"| {r['case']} | {r['max']:.3g} | {max(r['worst'], key=r['worst'].get)} | "
                     f"{part['contiguous']:.3g} | {part['channels_last']:.3g} | "
                     f"{part['folded']:.3g}{'' if r['fold'] == 'folded' else ' (no fold: ' + r['fold'][:40] + ')'} | "
                     f"{r['margins_min']:.3g} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs="+", default=CASES)
    ap.add_argument("--inputs", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 0], help="chunk sizes (0: the whole path)")
    ap.add_argument("--out", default=str(HERE / "ig-tie-bound-s50"))
    ap.add_argument("--merge", nargs="+", help="write OUT.md and OUT.json from these runs' .json (no run)")
    args = ap.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        Path(args.out + ".json").write_text(json.dumps({"runs": runs}, indent=1))
        write_md(args.out, runs)
        return 0
    from auto_declines_s44 import build
    from _common import cpu_name
    from salience._core.folding import folded_model

    torch.set_num_threads(1)
    rows, t0 = [], time.time()
    for case in args.case:
        name, size = case.split(":")
        model = build(name, int(size))
        if name.startswith("vit_"):  # torchvision's ViT starts with a zero head: every logit 0, a tie everywhere
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        for p in model.parameters():
            p.requires_grad_(False)
        folded, why = folded_model(model)
        worst: dict = {}
        margins = []
        for seed in range(args.inputs):
            b = (1, 2, 8)[seed % 3] if int(size) <= 64 else 1
            x = torch.rand(b, 3, int(size), int(size), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                plain = model(x).float()
            top = plain.topk(2, dim=1).values
            margins += ((top[:, 0] - top[:, 1]) / plain.abs().amax(1)).tolist()
            path = [a * x for a in torch.linspace(0, 1, 32)[:-1].tolist()]
            for label, m, cl in configs(model, folded):
                for n in [k or 32 * b for k in args.sizes]:
                    items = torch.cat([x] + path)[:max(n, b)]
                    if cl:
                        items = items.contiguous(memory_format=torch.channels_last)
                    for grad in (False, True):
                        xi = items.clone().requires_grad_(grad)
                        with torch.set_grad_enabled(grad):
                            got = m(xi)[:b].detach().float()
                        rel = ((got - plain).abs().amax(1) / plain.abs().amax(1)).max().item()
                        key = f"{label} batch {max(n, b)}{' grad' if grad else ''}"
                        worst[key] = max(worst.get(key, 0.0), rel)
        best = max(worst.values())
        rows.append({"case": case, "worst": worst, "max": best, "fold": why if folded is None else "folded",
                     "margins_min": min(margins)})
        print(f"{case}: largest {best:.3g} ({max(worst, key=worst.get)}); smallest relative top-2 margin "
              f"{min(margins):.3g}", flush=True)
    report = {"cpu": cpu_name(), "load": os.getloadavg(), "torch": torch.__version__, "rows": rows,
              "wall_s": time.time() - t0, "command": "taskset -c 0 python benchmarks/ig_tie_bound_s50.py "
              + " ".join(sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    write_md(args.out, [report])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
