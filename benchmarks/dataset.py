"""Images per second of a dataset run against the bare passes and a plain Captum loop.

    python benchmarks/dataset.py                                 # resnet50, 160 JPEGs at 112x112, 3 rounds
    python benchmarks/dataset.py --n 2000 --size 224 --rounds 3  # the full configuration (a GPU, or hours)

Three cases over the same JPEG files (photographs from scikit-image, cropped and flipped so that
no two files are alike, saved at 1.25x the input size so that every case decodes and resizes):

- ``salience``: ``salience.explain_dataset(model, folder, ["vanilla"], out, batch_size=B)``, the
  code of ``salience explain DIR --method vanilla --batch B`` after its argument parsing: DataLoader
  workers decode while the model runs; predictions, maps, summaries, float16 shards, thumbnails,
  the Parquet index and the gallery are written.
- ``bare``: the floor, no decoding, nothing written: the images already decoded into tensors, then
  per batch of B one forward and ``torch.autograd.grad`` of the predicted class's score w.r.t. the
  input (what a vanilla map needs).
- ``captum``: what people write by hand: a ``DataLoader`` over the files (PIL + torchvision
  transforms, the same workers), per batch a forward for the predicted class, Captum
  ``Saliency.attribute`` (its own forward + backward), maps saved as float16 ``.npy`` per batch.

Rounds are interleaved (the order rotates each round) so that a change of the shared machine's
load hits every case alike; reported: images/s min / median / max per case, the ratios of the
medians and of each round, and the 1-minute load average before and after each case.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import salience

HERE = Path(__file__).resolve().parent


def make_jpegs(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` distinct JPEG files of ``1.25 * size`` pixels, from scikit-image's photographs."""
    from PIL import Image
    from skimage import data as skdata

    photos = [getattr(skdata, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera")]
    photos = [np.stack([p] * 3, -1) if p.ndim == 2 else p[..., :3] for p in photos]
    rng = np.random.default_rng(0)
    side = int(size * 1.25)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        c = int(rng.integers(min(h, w) // 2, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        crop = p[y:y + c, x:x + c][:, ::-1] if i % 2 else p[y:y + c, x:x + c]
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).resize((side, side), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def decoded(paths: list[Path], info) -> torch.Tensor:
    x, _, errors = salience.loading.load_images(paths, info)
    assert not errors
    return x


def run_bare(model: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    for s in range(0, x.shape[0], batch):
        xi = x[s:s + batch].detach().clone().requires_grad_(True)
        out = model(xi)
        pred = out.argmax(1)
        (g,) = torch.autograd.grad(out.gather(1, pred[:, None]).sum(), xi)
        g.abs().amax(1).cpu()


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        import torchvision.transforms as T

        self.paths = paths
        self.tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.open(self.paths[i]).convert("RGB"))


def run_captum(model: torch.nn.Module, paths: list[Path], size: int, batch: int, workers: int, out: Path) -> None:
    from captum.attr import Saliency

    out.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(Files(paths, size), batch_size=batch, num_workers=workers)
    sal = Saliency(model)
    for b, x in enumerate(loader):
        with torch.no_grad():
            pred = model(x).argmax(1)
        maps = sal.attribute(x, target=pred, abs=True).amax(1)
        np.save(out / f"{b:05d}.npy", maps.numpy().astype(np.float16))


def run_salience(model: torch.nn.Module, folder: Path, batch: int, workers: int, out: Path) -> None:
    salience.explain_dataset(model, folder, ["vanilla"], out, batch_size=batch, workers=workers, overwrite=True,
                             model_spec="benchmark")


def main(argv=None) -> int:  # long: the options, the rounds and the report in one readable place
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--n", type=int, default=160, help="JPEG files")
    ap.add_argument("--size", type=int, default=112, help="input size (the files are 1.25x larger)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (salience and captum)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "dataset"), help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = salience.load_model(f"torchvision:{args.model}", weights="random")
    info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model),
                                                      size=args.size, resize=int(args.size * 256 / 224))
    salience._core.info.attach_info(model, info)
    tmp = Path(tempfile.mkdtemp(prefix="salience-bench-"))
    try:
        paths = make_jpegs(tmp / "jpegs", args.n, args.size)
        x = decoded(paths, info)
        cases = {
            "bare": lambda: run_bare(model, x, args.batch),
            "salience": lambda: run_salience(model, tmp / "jpegs", args.batch, args.workers, tmp / "run"),
            "captum": lambda: run_captum(model, paths, args.size, args.batch, args.workers, tmp / "captum"),
        }
        run_bare(model, x[:args.batch], args.batch)  # warm-up
        times: dict[str, list[float]] = {c: [] for c in cases}
        loads: dict[str, list[list[float]]] = {c: [] for c in cases}
        order = list(cases)
        for r in range(args.rounds):
            for c in order[r % len(order):] + order[:r % len(order)]:
                before = os.getloadavg()[0]
                t = time.perf_counter()
                cases[c]()
                times[c].append(time.perf_counter() - t)
                loads[c].append([round(before, 2), round(os.getloadavg()[0], 2)])
                print(f"round {r + 1} {c:9s} {args.n / times[c][-1]:7.2f} img/s  (load {before:.1f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = _report(args, times, loads)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _report(args, times, loads) -> dict:
    rate = {c: [args.n / t for t in ts] for c, ts in times.items()}
    med = {c: statistics.median(v) for c, v in rate.items()}
    per_round_bare = [times["salience"][r] / times["bare"][r] for r in range(args.rounds)]
    per_round_captum = [times["salience"][r] / times["captum"][r] for r in range(args.rounds)]
    return {
        "config": {k: getattr(args, k) for k in ("model", "n", "size", "batch", "workers", "rounds", "threads")},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "salience": salience.__version__},
        "images_per_s": {c: {"min": min(v), "median": med[c], "max": max(v), "all": v} for c, v in rate.items()},
        "time_ratio_salience_over_bare": {"of_medians": med["bare"] / med["salience"], "per_round": per_round_bare},
        "time_ratio_salience_over_captum": {"of_medians": med["captum"] / med["salience"],
                                            "per_round": per_round_captum},
        "load_before_after": loads,
    }


def _markdown(rep: dict) -> str:
    cfg = rep["config"]
    lines = [f"# Dataset run: {cfg['model']}, {cfg['n']} JPEGs at {cfg['size']}x{cfg['size']}, batch {cfg['batch']}, "
             f"{cfg['workers']} worker(s), {cfg['threads']} threads, {cfg['rounds']} interleaved rounds", "",
             "| case | images/s min | median | max |", "|---|---|---|---|"]
    for c, v in rep["images_per_s"].items():
        lines.append(f"| {c} | {v['min']:.2f} | {v['median']:.2f} | {v['max']:.2f} |")
    b, c = rep["time_ratio_salience_over_bare"], rep["time_ratio_salience_over_captum"]
    lines += ["", f"time salience / bare: {b['of_medians']:.3f} (medians); per round "
              + ", ".join(f"{r:.3f}" for r in b["per_round"]),
              f"time salience / captum: {c['of_medians']:.3f} (medians); per round "
              + ", ".join(f"{r:.3f}" for r in c["per_round"]), "",
              "load average (1 min) before / after each case: "
              + "; ".join(f"{k}: " + ", ".join(f"{a}/{z}" for a, z in v) for k, v in rep["load_before_after"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
