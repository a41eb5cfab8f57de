"""Session 52: occlusion on timm's ``convnext_tiny`` and on a Hugging Face ``ConvNextForImageClassification`` of
convnext-tiny's size (``ConvNextConfig()``'s defaults: dims 96 / 192 / 384 / 768, depths 3 / 3 / 9 / 3), random
weights (no download), 224 px, window 16, fp32, one thread: salience's region-limited passes (``local=True``, the
default), salience's full passes forced (``local=False``) and, on timm's model, Captum's ``Occlusion`` at
``perturbations_per_eval`` ``--captum`` (16: session 51's best on this model; a Hugging Face model returns a
``ModelOutput``, which Captum does not take, so there the map is compared with the full passes').

The runner is session 51's (benchmarks/occlusion-convnext-s51.py: a fresh process per measurement, interleaved
rounds, each round appended to the JSON so rounds may run in separate lock holds); this file gives it the model
(``--model timm`` / ``hf``, passed to the measuring processes as ``S52_MODEL``), its own JSON and table.

Run as (session 52, see the .md files):
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-convnext-s52.py --model timm --stride 8 --images 1 \
      --captum 16 --rounds 3 --out benchmarks/occlusion-convnext-s52-timm-s8.json
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-convnext-s52.py --model timm --stride 16 --images 8 \
      --captum 16 --rounds 1 --out benchmarks/occlusion-convnext-s52-timm-8img.json
  flock /tmp/bench.lock taskset -c 1 python benchmarks/occlusion-convnext-s52.py --model hf --stride 16 --images 1 \
      --captum "" --rounds 3 --out benchmarks/occlusion-convnext-s52-hf.json
then ``--report --out ...`` writes each .md from its JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # benchmarks/transformers.py: not the package
_spec = importlib.util.spec_from_file_location("occlusion_convnext_s51", os.path.join(HERE, "occlusion-convnext-s51.py"))
assert _spec is not None and _spec.loader is not None
s51 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(s51)
NAMES = {"timm": "timm convnext_tiny", "hf": "Hugging Face ConvNextForImageClassification(ConvNextConfig()), "
         "convnext-tiny-sized"}


def _setup(images: int) -> tuple:
    """The model (``S52_MODEL``), ``images`` random images 224 px and their top classes."""
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if os.environ.get("S52_MODEL", "timm") == "hf":
        from transformers import ConvNextConfig, ConvNextForImageClassification
        m = ConvNextForImageClassification(ConvNextConfig()).eval()
    else:
        import timm
        m = timm.create_model("convnext_tiny", pretrained=False).eval()
    x = torch.rand(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x)
        t = getattr(out, "logits", out).argmax(1)
    return m, x, t


def run_round(args: argparse.Namespace, configs: list, rnd: int) -> list:
    """Session 51's round, the reference map Captum's where timed, else the full passes'."""
    import torch
    configs = [c for c in configs if not c.startswith("cap") or c[3:].isdigit()]  # --captum "": none
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            row = s51._measure(c, os.path.join(tmp, f"{c}.pt"), args, args.stride)
            row.update(round=rnd, stride=args.stride)
            out.append(row)
        maps = {c: torch.load(os.path.join(tmp, f"{c}.pt")) for c in configs}
        caps = [c for c in configs if c.startswith("cap")]
        ref = maps[max(caps, key=lambda c: int(c[3:]))] if caps else maps["full"]
        for row in out:
            row["max_abs_diff_vs_ref"] = float((maps[row["config"]] - ref).abs().max())
            row["reference"] = "Captum" if caps else "full passes"
            row["map_scale"] = float(ref.abs().max())
    return out


def report(path: str) -> None:
    """The .md table of ``path`` (a JSON of rounds): min / median / max seconds per run, per-round figures, loads."""
    data = s51.json.load(open(path))
    rows = data["rows"]
    by: dict = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r["seconds"])
    first = rows[0]
    n = (math.ceil((224 - s51.WINDOW) / first["stride"]) + 1) ** 2
    lines = [f"# Occlusion on {NAMES[data['model']]}, session 52", "",
             f"CPU: {data['cpu']} (AMD EPYC, AVX2, no AVX512), one thread on core 1, under /tmp/bench.lock. torch "
             f"{data['torch']}, captum {data['captum']}.",
             f"Random weights, {first['images']} image(s) 224 px, window {s51.WINDOW} / stride {first['stride']} ({n} "
             "windows an image), fp32, `reduce=None`; each measurement a fresh process (model built, one forward, "
             f"then the call timed); {len(by['local'])} interleaved round(s) (each round the other order).",
             "Commands: " + "; ".join(f"`{c}`" for c in data["commands"]) + ", then `--report`. Data: "
             f"benchmarks/{os.path.basename(path)}.", "",
             f"| run | min s | median s | max s | x region-limited (median) | max abs diff vs {first['reference']} "
             "(map scale) | path (debug log) |", "|---|---|---|---|---|---|---|"]
    med = statistics.median(by["local"])
    names = {"local": "salience region-limited (`local=True`, default)", "full": "salience full passes (`local=False`)"}
    for c in sorted(by, key=lambda c: (c.startswith("cap"), c)):
        v, r = by[c], next(r for r in rows if r["config"] == c)
        diff = max(x["max_abs_diff_vs_ref"] for x in rows if x["config"] == c)
        said = "; ".join(m.replace("|", "/") for m in r["log"]) or "-"
        lines.append(f"| {names.get(c, f'Captum Occlusion, perturbations_per_eval={c[3:]}')} | {min(v):.1f} | "
                     f"{statistics.median(v):.1f} | {max(v):.1f} | {statistics.median(v) / med:.2f} | {diff:.2e} "
                     f"({r['map_scale']:.2e}) | {said} |")
    lines += ["", "Each measurement (in run order; load average 1 / 5 / 15 min at its end):", "",
              "| round | run | s | load |", "|---|---|---|---|"]
    lines += [f"| {r['round']} | {r['config']} | {r['seconds']:.1f} | {' '.join(r['loadavg'])} |" for r in rows]
    lines += ["", "`uptime` before each run of rounds: " + "; ".join(data.get("uptime", [])) + "."]
    lines += ["", data["notes"]] if data.get("notes") else []
    with open(path[:-5] + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path[:-5] + ".md.tmp", path[:-5] + ".md")


def _data(args: argparse.Namespace) -> dict:
    data = _s51_data(args)
    data["model"] = os.environ["S52_MODEL"]
    said = data["commands"][-1].replace("--captum  ", '--captum "" ')  # main() took --model out of sys.argv
    data["commands"][-1] = said.replace(".py ", f".py --model {data['model']} ", 1)
    data.setdefault("uptime", []).append(s51.subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return data


def main() -> None:
    """Session 51's runner on this file's model; ``--model`` read here, the rest by the runner."""
    if "--model" in sys.argv:
        i = sys.argv.index("--model")
        os.environ["S52_MODEL"] = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    os.environ.setdefault("S52_MODEL", "timm")
    s51.__file__ = os.path.abspath(__file__)  # the measuring processes run this file (its model)
    s51.OUT = os.path.join(HERE, f"occlusion-convnext-s52-{os.environ['S52_MODEL']}.json")
    s51._setup, s51.run_round, s51.report, s51._data = _setup, run_round, report, _data
    s51.main()


_s51_data = s51._data

if __name__ == "__main__":
    main()
