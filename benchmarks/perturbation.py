"""Score-CAM, Ablation-CAM, RISE and occlusion: salience against pytorch-grad-cam, Captum and a plain loop.

One command, one table:

    PYTHONPATH=src python benchmarks/perturbation.py            # writes benchmarks/perturbation.{md,json}
    python benchmarks/perturbation.py --report benchmarks/perturbation.json   # the .md again from the .json

Every measurement runs in a fresh subprocess (``--one METHOD IMPL``) that reports the wall time of
the call and its peak resident memory above what the process held before the call (``ru_maxrss``
minus the RSS before; tracemalloc does not see torch's allocations). Rounds are interleaved: each
round runs every (method, implementation) once, in an order rotated from round to round, so a
change of the machine's load hits all of them alike. The table gives min / median / max over the
rounds and the load average before and after each round.

Default configuration (smaller than the issue's resnet50 / 8 images / 224 x 224, which is Score-CAM
on layer4 = 2048 masked forward passes of resnet50 per image): torchvision resnet18 with random
weights (seed 0), 2 images of 64 x 64, the CAMs on ``layer2`` (128 channels), RISE with 128 masks,
occlusion with a 16-pixel window and stride 8 (49 windows). Each implementation does the same
number of forward passes. pytorch-grad-cam has no RISE; its batch size and Captum's
perturbations_per_eval are searched over the values listed (each is a row of its own; the best is
the one compared). The issue's model and resolution, one image, one thread on a core of its own:

    taskset -c 1 python benchmarks/perturbation.py --model resnet50 --size 224 --images 1 \
        --layer layer4 --masks 4000 --window 32 --stride 16 --threads 1 --rounds 3 \
        --methods scorecam,ablationcam,rise --out benchmarks/perturbation-resnet50

With ``--bf16 1`` (a CPU with AMX-BF16 / AVX512-BF16): salience under ``precision="bf16"`` + channels-last
(and + ``fold_batchnorm``), and each peer again with the same autocast and layout by hand; ``--layer`` takes a
dotted name (``layer4.0.conv1``: 512 channels, a quarter of ``layer4``'s passes):

    flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation.py --model resnet50 --size 224 \
        --images 1 --layer layer4.0.conv1 --masks 512 --window 32 --stride 16 --peer-batch 8 --threads 1 \
        --captum-ppe 16,64 --rounds 3 --bf16 1 --skip salience --methods scorecam,rise \
        --out benchmarks/perturbation-resnet50-bf16-scorecam-rise

(the committed table's command; ``--skip salience`` leaves out salience's plain fp32 row, for time).

The issue's 8 images (session 41; Score-CAM on ``layer1.0.conv1``, 64 channels, and 64 masks, to fit 3 rounds in a
session; pytorch-grad-cam at batch 8, its best of 8 / 16 / 32 / 64 in a probe; only the rows issue 15 compares):

    flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation.py --model resnet50 --size 224 --images 8 \
        --layer layer1.0.conv1 --masks 64 --peer-batch 8 --threads 1 --rounds 3 --bf16 1 \
        --skip 'salience bf16+channels_last,pytorch-grad-cam bs=8 bf16+channels_last' --methods scorecam,rise \
        --out benchmarks/perturbation-resnet50-8images-s41

Peak memory is the process's ``VmHWM`` (its own high-water mark; ``ru_maxrss`` would carry the
parent's) above the resident memory just before the call.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import peak_rss_bytes  # noqa: E402

# The configuration; main() sets it from the flags and hands it to each measuring child in BENCH_CONFIG.
CONFIG = {"model": "resnet18", "size": 64, "images": 2, "layer": "layer2", "masks": 128, "window": 16, "stride": 8,
          "peer_batch": [32, 128], "captum_ppe": [16, 64], "threads": 2, "fast": 0, "bf16": 0, "skip": ""}
if os.environ.get("BENCH_CONFIG"):
    CONFIG.update(json.loads(os.environ["BENCH_CONFIG"]))
SIZE, IMAGES, LAYER, MASKS = CONFIG["size"], CONFIG["images"], CONFIG["layer"], CONFIG["masks"]
WINDOW, STRIDE = CONFIG["window"], CONFIG["stride"]


def impls() -> dict[str, list[str]]:
    """Each method's implementations, in the order of the table."""
    peers = [f"pytorch-grad-cam bs={b}" for b in CONFIG["peer_batch"]]
    ours = ["salience"] + ([FAST] if CONFIG["fast"] in (1, 3) else []) + ([FROZEN] if CONFIG["fast"] >= 2 else [])
    ours += [BF16, BF16_FOLD] if CONFIG["bf16"] else []
    every = {"scorecam": ["loop"] + peers, "ablationcam": ["loop"] + peers, "rise": ["loop"],
             "occlusion": ["loop"] + [f"captum ppe={p}" for p in CONFIG["captum_ppe"]]}
    skip = {name.strip() for name in CONFIG["skip"].split(",") if name.strip()}
    skip |= {f"ablationcam|{BF16_FOLD}"}  # its hooked passes never run folded (it warns): the row would be BF16's
    out = {}
    for method, theirs in every.items():
        names = ours + theirs + ([t + BY_HAND for t in theirs] if CONFIG["bf16"] else [])
        out[method] = [i for i in names if i not in skip and f"{method}|{i}" not in skip]
    return out


# --fast 1: also salience under the engine's opt-in performance options (issue 19): batch norms
# folded into the convolutions before them and channels-last passes (gradient-free passes only
# need the forward graph, which both make cheaper on a CPU).
FAST = "salience fold+channels_last"
# --fast 2: salience with compile="freeze" (inductor's freezing for the gradient-free passes; the
# compile is part of the measured call: each measurement is a fresh process); --fast 3: both rows.
# --skip "salience,pytorch-grad-cam bs=32" leaves implementations out (names as in the table).
FROZEN = "salience compile=freeze"
# --bf16 1: salience with precision="bf16" and channels-last (and a row with fold_batchnorm too; not for
# Ablation-CAM, whose passes never run folded), and every peer again with the same trick by hand: the
# model and the input channels-last, the call inside torch.autocast("cpu", torch.bfloat16), both in the
# measured call (pytorch-grad-cam also with reshape_transform=lambda a: a.float(): as shipped it turns the
# layer's bf16 activations into numpy, which has no bfloat16, and fails). Fast on a CPU with AMX / AVX512-BF16.
BF16 = "salience bf16+channels_last"
BF16_FOLD = "salience bf16+channels_last+fold"
BY_HAND = " bf16+channels_last"  # the suffix of a peer's row under the same autocast and layout, by hand
OPTIONS = {"salience": {}, FAST: dict(fold_batchnorm=True, memory_format="channels_last"),
           FROZEN: dict(compile="freeze"), BF16: dict(precision="bf16", memory_format="channels_last"),
           BF16_FOLD: dict(precision="bf16", memory_format="channels_last", fold_batchnorm=True)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup():
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, CONFIG["model"])().eval()
    x = torch.rand(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    return torch, model, x, target


def _score_masks(torch, acts, size):
    up = torch.nn.functional.interpolate(acts, size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (up - lo) / (hi - lo).clamp(min=1e-30), torch.zeros_like(up))


def _acts(torch, model, x):
    store = []
    h = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: store.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    return store[0]


def _loop(method, torch, model, x, target):
    """The plain way: one forward pass of the B images per channel / mask / window, under no_grad."""
    rows = torch.arange(x.shape[0])
    with torch.no_grad():
        if method in ("scorecam", "ablationcam"):
            acts = _acts(torch, model, x)
            y = model(x)[rows, target]
            w = torch.zeros(acts.shape[:2])
            for k in range(acts.shape[1]):
                if method == "scorecam":
                    m = _score_masks(torch, acts[:, k:k + 1], x.shape[-2:])
                    w[:, k] = model(x * m).softmax(1)[rows, target]
                else:
                    def zero(mod, i, o, k=k):
                        o = o.clone()
                        o[:, k] = 0
                        return o
                    h = model.get_submodule(LAYER).register_forward_hook(zero)
                    w[:, k] = (y - model(x)[rows, target]) / y
                    h.remove()
            return torch.relu((w[:, :, None, None] * acts).sum(1))
        if method == "rise":
            from salience.methods.perturbation import rise_masks

            sal = torch.zeros(x.shape[0], *x.shape[-2:])
            for i in range(MASKS):
                m = rise_masks(i, i + 1, tuple(x.shape[-2:]))[0]
                sal += model(x * m).softmax(1)[rows, target].view(-1, 1, 1) * m
            return sal / (MASKS * 0.5)
        clean = model(x)[rows, target]
        sal = torch.zeros(x.shape[0], *x.shape[-2:])
        cover = torch.zeros(x.shape[-2:])
        n = -(-(SIZE - WINDOW) // STRIDE) + 1
        for i in range(n):
            for j in range(n):
                xo = x.clone()
                xo[:, :, i * STRIDE:i * STRIDE + WINDOW, j * STRIDE:j * STRIDE + WINDOW] = 0
                d = clean - model(xo)[rows, target]
                sal[:, i * STRIDE:i * STRIDE + WINDOW, j * STRIDE:j * STRIDE + WINDOW] += d.view(-1, 1, 1)
                cover[i * STRIDE:i * STRIDE + WINDOW, j * STRIDE:j * STRIDE + WINDOW] += 1
        return sal / cover


def _peer(method, impl, torch, model, x, target, hand=False):
    if impl.startswith("captum"):
        from captum.attr import Occlusion

        ppe = int(impl.split("=")[1])
        return Occlusion(model).attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                                          target=target, baselines=0.0, perturbations_per_eval=ppe)
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bs = int(impl.split("=")[1])
    layer = [model.get_submodule(LAYER)]
    # under autocast its layer's activations are bf16, which it turns into numpy (no bfloat16): float32 first
    shape = (lambda a: a.float()) if hand else None
    if method == "scorecam":
        cam = ScoreCAM(model, layer, reshape_transform=shape)
        cam.batch_size = bs
    else:
        cam = AblationCAM(model, layer, reshape_transform=shape, batch_size=bs)
    with open(os.devnull, "w") as null:  # its tqdm bars
        err, sys.stderr = sys.stderr, null
        try:
            return cam(x, [ClassifierOutputTarget(int(t)) for t in target])
        finally:
            sys.stderr = err


def one(method: str, impl: str) -> dict:
    """One measurement in this process: seconds and peak RSS above the RSS before the call."""
    warnings.simplefilter("ignore")
    torch, model, x, target = _setup()
    import salience

    torch.set_num_threads(CONFIG["threads"])
    before = _rss()
    t0 = time.perf_counter()
    if impl.startswith("salience"):
        opts = {"scorecam": dict(layer=LAYER), "ablationcam": dict(layer=LAYER), "rise": dict(masks=MASKS),
                "occlusion": dict(window=WINDOW, stride=STRIDE)}[method]
        with salience.performance(**OPTIONS[impl]):
            getattr(salience, method)(model, x, target, **opts)
    else:
        hand = impl.endswith(BY_HAND)
        if hand:  # the user's own bf16 trick: both layouts converted inside the measured call, as salience does
            impl = impl[:-len(BY_HAND)]
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hand):
            if impl == "loop":
                _loop(method, torch, model, x, target)
            else:
                _peer(method, impl, torch, model, x, target, hand)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"seconds": seconds, "peak_mib": max(0, peak - before) / 2 ** 20}


def _measure(method: str, impl: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), BENCH_CONFIG=json.dumps(CONFIG))
    out = subprocess.run([sys.executable, __file__, "--one", method, impl], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict:
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2,
            "max": v[-1]}


def _bf16(impl: str) -> bool:
    """Whether a row runs under bf16 autocast (salience's option, or a peer's by hand)."""
    return "bf16" in impl


def _ratio(impls: dict, mine: str, theirs: str) -> str:
    """Their median over salience's row ``mine`` (worst: their min over our max)."""
    s, t = impls[mine]["seconds"], impls[theirs]["seconds"]
    return f"{t['median'] / s['median']:.2f}x (worst {t['min'] / s['max']:.2f}x)"


def _fastest(impls: dict, names: list[str]) -> str:
    return min(names, key=lambda i: impls[i]["seconds"]["median"])


def _speed(impls: dict, impl: str) -> str:
    """The speed-up cell of a row, saying which comparison it is. A salience row other than plain salience:
    over the fastest peer as shipped (fp32), and for a bf16 row also over the fastest peer given the same
    autocast and layout by hand. A peer's row: its time over plain salience's (fp32 peers) and over the
    fastest salience bf16 row's."""
    peers = [i for i in impls if not i.startswith("salience")]
    shipped, by_hand = [i for i in peers if not _bf16(i)], [i for i in peers if _bf16(i)]
    ours_bf16 = [i for i in impls if i.startswith("salience") and _bf16(i)]
    cells = []
    if impl.startswith("salience") and impl != "salience":
        if shipped:
            best = _fastest(impls, shipped)
            cells.append(f"{_ratio(impls, impl, best)} over {best} as shipped (fp32)")
        if _bf16(impl) and by_hand:
            best = _fastest(impls, by_hand)
            cells.append(f"{_ratio(impls, impl, best)} over {best}: the same bf16 + channels-last by hand")
    elif not impl.startswith("salience"):
        if "salience" in impls and not _bf16(impl):
            cells.append(f"{_ratio(impls, 'salience', impl)} for salience (fp32)")
        if ours_bf16:
            fast = _fastest(impls, ours_bf16)
            cells.append(f"{_ratio(impls, fast, impl)} for {fast}")
    return "; ".join(cells)


def _table(results: dict) -> list[str]:
    lines = ["| method | implementation | seconds min / median / max | peak MiB (median) | salience speed-up: "
             "their median / salience's (worst: their min / salience's max), which rows |", "|---|---|---|---|---|"]
    for method, impls in results.items():
        for impl, r in impls.items():
            s = r["seconds"]
            lines.append(f"| {method} | {impl} | {s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f} | "
                         f"{r['peak_mib']['median']:.0f} | {_speed(impls, impl)} |")
    return lines


def _command(config: dict, methods: list[str], out: str) -> str:
    """The command line that gives this configuration (each flag, also the defaults)."""
    flags = " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else shlex.quote(str(v))}"
                     for k, v in config.items() if k in CONFIG and k != "model" and v != "")  # no empty --skip
    return (f"python benchmarks/perturbation.py --model {config['model'].split()[1].rstrip(',')} {flags} "
            f"--rounds {config['rounds']} --methods {','.join(methods)} --out {out}")


def markdown(data: dict, out: str) -> str:
    """The report of one run (its ``.json``): the command, the table, salience's time over each
    other implementation's in every round (rounds are interleaved), the load."""
    cfg, results = data["config"], data["results"]
    lines = [f"# {', '.join(results)}: {cfg['model']}, {cfg['size']} x {cfg['size']}, {cfg['images']} image(s), "
             f"{cfg['rounds']} interleaved rounds", "", f"`{_command(cfg, list(results), out)}`", "",
             f"CPUs {cfg['cpus']}, affinity {cfg['affinity']}, {cfg['threads']} thread(s); each measurement a fresh "
             "process; peak MiB = the process's VmHWM above its RSS before the call.", ""]
    lines += _table(results) + ["", "salience's time / theirs, per round:", ""]
    for method, impls in results.items():
        for mine in (i for i in impls if i.startswith("salience")):
            ours = impls[mine]["raw"]["seconds"]
            for impl, r in impls.items():
                if not impl.startswith("salience") and (_bf16(mine) or not _bf16(impl)):
                    per = ", ".join(f"{a / b:.3f}" for a, b in zip(ours, r["raw"]["seconds"]))
                    lines.append(f"- {method}, {mine + ' / ' if mine != 'salience' else ''}{impl}: {per}")
    lines += ["", "load average (1 / 5 / 15 min) before -> after each round: " + "; ".join(
        f"{'/'.join(f'{v:.2f}' for v in ld['before'])} -> {'/'.join(f'{v:.2f}' for v in ld['after'])}"
        for ld in data["loadavg"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("METHOD", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="JSON", help="write the .md of an earlier run's .json (beside it) and stop")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="scorecam,ablationcam,rise,occlusion")
    p.add_argument("--out", default=str(HERE / "perturbation"))
    for key, value in CONFIG.items():
        kind = (lambda t: [int(v) for v in t.split(",")]) if isinstance(value, list) else type(value)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=value,
                       help=f"default {','.join(map(str, value)) if isinstance(value, list) else value}")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if args.report:
        stem = args.report[:-len(".json")] if args.report.endswith(".json") else args.report
        Path(stem + ".md").write_text(markdown(json.loads(Path(stem + ".json").read_text()), stem))
        return
    CONFIG.update({key: getattr(args, key) for key in CONFIG})
    pairs = [(m, i) for m in args.methods.split(",") for i in impls()[m]]
    raw: dict = {f"{m}|{i}": {"seconds": [], "peak_mib": []} for m, i in pairs}
    loads = []
    for r in range(args.rounds):
        order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]
        load_before = os.getloadavg()
        for m, i in order:
            res = _measure(m, i)
            raw[f"{m}|{i}"]["seconds"].append(res["seconds"])
            raw[f"{m}|{i}"]["peak_mib"].append(res["peak_mib"])
            print(f"round {r + 1}: {m:<12} {i:<24} {res['seconds']:7.2f} s {res['peak_mib']:7.0f} MiB", flush=True)
        loads.append({"before": load_before, "after": os.getloadavg()})
    results: dict = {}
    for key, v in raw.items():
        m, i = key.split("|")
        results.setdefault(m, {})[i] = {"seconds": _stats(v["seconds"]), "peak_mib": _stats(v["peak_mib"]),
                                        "raw": v}
    config = dict(CONFIG, model=f"torchvision {CONFIG['model']}, random weights", rounds=args.rounds,
                  cpus=os.cpu_count(), affinity=sorted(os.sched_getaffinity(0)))
    data = {"config": config, "loadavg": loads, "results": results}
    Path(args.out + ".json").write_text(json.dumps(data, indent=1))
    Path(args.out + ".md").write_text(markdown(data, os.path.relpath(args.out)))
    print(markdown(data, os.path.relpath(args.out)))


if __name__ == "__main__":
    main()
