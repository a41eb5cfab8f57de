"""Session 52's follow-ups to the zoo sweep of session 51 (``benchmarks/zoo-sweep-s51.py``, whose model list, builders,
inputs and verdicts it reuses): the Grad-CAM default layer of every model alone, and the (model, method) cells that
session 51's sweep left over its call timeout, run again with a longer one.

    python benchmarks/zoo-sweep-s52.py defaults --out benchmarks/zoo-sweep-s52-defaults          # the sweep's inputs
    python benchmarks/zoo-sweep-s52.py defaults --native --out benchmarks/zoo-sweep-s52-native   # timm at native size
    python benchmarks/zoo-sweep-s52.py compare OLD.json NEW.json --out benchmarks/zoo-sweep-s52-moved
    python benchmarks/zoo-sweep-s52.py timeouts --call-timeout 120 --out benchmarks/zoo-sweep-s52-timeouts

``defaults``: per model, the default layer (:func:`salience.methods.gradcam.default_layer`) and its one-line
description (:func:`~salience.methods.gradcam.describe_default_layer`) on the first of the sweep's two images (the
size it picks: 64, 96, 128 or native), or with ``--native`` on one image of the timm model's native size (built
without ``img_size``; Hugging Face rows are left out there: their tiny configs have no other size). ``compare``:
the models whose default differs between two such runs (e.g. the old code's and the new one's, by ``PYTHONPATH``).
``timeouts``: the cells marked ``timeout`` in ``--from`` (session 51's JSON), each run again on the same model,
images and options (``run_method`` of session 51: ok, refused, BUG, NaN, zero, changed, timeout). Each writes
``OUT.json`` and ``OUT.md`` (atomically); ``timeouts`` and ``defaults`` also ``OUT.jsonl`` as the rows come
(``--resume`` skips the rows already there).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

HERE = Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("zoo_sweep_s51", HERE / "zoo-sweep-s51.py")
s51 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(s51)  # its list, builders, inputs, verdicts; it puts tests/ and this folder on the path

import timm  # noqa: E402
import transformers  # noqa: E402
from _common import machine_line  # noqa: E402

from salience import SalienceError  # noqa: E402
from salience.methods.gradcam import default_layer, describe_default_layer  # noqa: E402


def build(key: str, native: bool) -> tuple[torch.nn.Module, list[int]]:
    """Session 51's model for ``key`` and its sizes to try; ``native``: the timm arch as timm builds it, at its
    native size only."""
    kind, name = key.split(":", 1)
    if not native:
        return s51.build_timm(name) if kind == "timm" else s51.build_hf(name)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    return model, [int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])]


def prepared(key: str, images: int, native: bool = False) -> tuple[Optional[torch.nn.Module], Any, dict]:
    """``(model, x, row)`` as session 51's sweep prepares them (eval mode, its seeded images, a zero head re-drawn);
    ``model`` None where it is not built or takes no size (``row["status"]`` says why)."""
    row: dict[str, Any] = {"model": key, "family": s51.family_of(key)}
    try:
        model, sizes = build(key, native)
    except Exception as e:  # noqa: BLE001 - an arch this timm / transformers cannot build
        row["status"] = f"not built: {type(e).__name__}: {s51._first_line(e)}"
        return None, None, row
    model.eval()
    x, logits = s51.pick_input(model, sizes, images)
    if x is None:
        row["status"] = f"no forward pass at sizes {sizes}"
        return None, None, row
    row["input"] = list(x.shape)
    row["notes"] = s51.redraw_zero_head(model, x, logits)
    row["status"] = "ok"
    return model, x, row


def default_row(key: str, native: bool) -> dict:
    """One model's default layer and its description on the first image (sweep: of two, as session 51's)."""
    t0 = time.perf_counter()
    model, x, row = prepared(key, 1 if native else 2, native)
    if model is not None:
        try:
            row["default_layer"] = default_layer(model, x[:1])
            row["described"] = describe_default_layer(model, x[:1])
        except SalienceError as e:
            row["default_layer"], row["refused"] = None, s51._first_line(e)
        except Exception as e:  # noqa: BLE001 - a bug of the search, recorded
            row["default_layer"], row["error"] = None, f"{type(e).__name__}: {s51._first_line(e)}"
    row["s"] = round(time.perf_counter() - t0, 2)
    return row


def timeout_rows(source: Path, timeout: int) -> Iterable[tuple[str, Callable[[], dict]]]:
    """``(model, run)`` for each model with cells marked ``timeout`` in ``source``: ``run()`` builds it as session
    51 did and runs those methods again under ``timeout`` seconds each."""
    for r in json.loads(source.read_text()):
        methods = [n for n, c in r.get("methods", {}).items() if c["status"] == "timeout"]
        if methods:
            yield r["model"], (lambda key=r["model"], methods=methods: _rerun(key, methods, timeout))


def _rerun(key: str, methods: list[str], timeout: int) -> dict:
    model, x, row = prepared(key, 2)
    if model is not None:
        row["default_layer"] = default_layer(model, x[:1])
        row["methods"] = {m: s51.run_method(model, x, m, timeout) for m in methods}
    return row


def run_rows(jobs: Iterable[tuple[str, Callable[[], dict]]], out: Path, resume: bool) -> list[dict]:
    """Each job's row, appended to ``OUT.jsonl`` as it comes (``resume``: the rows already there are kept)."""
    jsonl = out.with_suffix(".jsonl")
    done: dict[str, dict] = {}
    if resume and jsonl.exists():
        done = {r["model"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    keys = []
    with jsonl.open("a" if resume else "w") as f:
        for key, job in jobs:
            keys.append(key)
            if key in done:
                continue
            done[key] = job()
            f.write(json.dumps(done[key]) + "\n")
            f.flush()
            print(key, {k: v for k, v in done[key].items() if k in ("default_layer", "refused", "error", "status")},
                  {m: c["status"] for m, c in done[key].get("methods", {}).items()}, flush=True)
            gc.collect()
    return [done[k] for k in keys]


def defaults_md(rows: list[dict], head: str) -> str:
    lines = [head, "", "| model | input | default layer | description |", "|---|---|---|---|"]
    for r in rows:
        said = r.get("described") or r.get("refused") or r.get("error") or r.get("status", "")
        layer = f"`{r['default_layer']}`" if r.get("default_layer") else ("refused" if "refused" in r else "-")
        lines.append(f"| `{r['model']}` | {r.get('input', ['-'])[-1]} | {layer} | {said} |")
    return "\n".join(lines) + "\n"


def moved_md(old: list[dict], new: list[dict], head: str) -> str:
    """The models whose default layer (or refusal) differs between two ``defaults`` runs."""
    before = {r["model"]: r for r in old}
    lines = [head, "", "| model | input | before | after |", "|---|---|---|---|"]
    same = 0
    for r in new:
        b = before.get(r["model"])
        if b is None:
            continue
        was, now = (b.get("described") or b.get("refused")), (r.get("described") or r.get("refused"))
        if b.get("default_layer") == r.get("default_layer"):
            same += 1
            continue
        lines.append(f"| `{r['model']}` | {r.get('input', ['-'])[-1]} | {was} | {now} |")
    return "\n".join(lines + ["", f"{same} of {len(new)} models: the same default layer."]) + "\n"


def timeouts_md(rows: list[dict], head: str) -> str:
    counts: dict[str, int] = {}
    lines = ["| model | input | default layer | method | status | s | detail |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for m, c in r.get("methods", {}).items():
            status = c["status"] + (" **changed**" if "changed" in c else "")
            counts[status] = counts.get(status, 0) + 1
            lines.append(f"| `{r['model']}` | {r.get('input', ['-'])[-1]} | `{r.get('default_layer')}` | {m} | "
                         f"{status} | {c['s']} | {c['detail'][:160]} |")
    total = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return "\n".join([head, "", f"{sum(counts.values())} cells: {total}.", ""] + lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("defaults", "compare", "timeouts"))
    ap.add_argument("runs", nargs="*", help="compare: the OLD.json and NEW.json of two defaults runs")
    ap.add_argument("--models", default=None, help="comma-separated timm:ARCH / hf:FAMILY (default: the whole list)")
    ap.add_argument("--native", action="store_true", help="defaults: timm models at their native size")
    ap.add_argument("--from", dest="source", default=str(HERE / "zoo-sweep-s51.json"))
    ap.add_argument("--call-timeout", type=int, default=120)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("timm").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    out, load0, t0 = Path(args.out), os.getloadavg(), time.perf_counter()
    keys = args.models.split(",") if args.models else s51.all_keys()
    if args.native:
        keys = [k for k in keys if k.startswith("timm:")]
    if args.step == "compare":
        old, new = (json.loads(Path(p).read_text()) for p in args.runs)
        head = f"# Default layers moved: {args.runs[0]} -> {args.runs[1]}"
        s51._write(out.with_suffix(".md"), moved_md(old, new, head))
        return 0
    if args.step == "defaults":
        rows = run_rows(((k, lambda k=k: default_row(k, args.native)) for k in keys), out, args.resume)
        render: Callable[[list[dict], str], str] = defaults_md
    else:
        rows = run_rows(((k, job) for k, job in timeout_rows(Path(args.source), args.call_timeout)
                         if args.models is None or k in keys), out, args.resume)
        render = timeouts_md
    head = (f"# Zoo sweep, session 52: {args.step}\n\n`python benchmarks/zoo-sweep-s52.py {' '.join(argv)}`: "
            f"{machine_line(load0, os.getloadavg())}; {time.perf_counter() - t0:.0f} s this run, one thread.")
    s51._write(out.with_suffix(".json"), json.dumps(rows, indent=1))
    s51._write(out.with_suffix(".md"), render(rows, head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
