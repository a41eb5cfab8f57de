"""Images per second of a dataset run against the bare passes and a plain Captum loop.

    python benchmarks/dataset.py                       # the issue's: 2,000 JPEGs, resnet50 at 224, 5 rounds of 400
    python benchmarks/dataset.py --compile             # also a salience row with compile=True (issue 19)
    python benchmarks/dataset.py --fold-batchnorm      # also a salience row with fold_batchnorm=True
    python benchmarks/dataset.py --bf16                # also bf16 + channels-last rows: salience's and the bare passes'
    python benchmarks/dataset.py --allocator reuse     # the whole process (bare passes too) under allocator="reuse"
    python benchmarks/dataset.py --n 40 --size 64 --model resnet18 --rounds 1 --out /tmp/ds   # a smoke test
    python benchmarks/dataset.py --lock /tmp/bench.lock  # each round (all its peers) inside an exclusive flock

Peers over the same JPEG files (photographs from scikit-image, cropped and flipped so that no two
files are alike, saved at 1.25x the input size so that every peer decodes and resizes):

- ``salience``: ``salience.explain_dataset(model, folder, ["vanilla"], out, batch_size=B)``, the
  code of ``salience explain DIR --method vanilla --batch B`` after its argument parsing: DataLoader
  workers decode while the model runs; predictions, maps, summaries, float16 shards, thumbnails,
  the Parquet index and the gallery are written.
- ``salience+compile`` (with ``--compile``): the same with ``compile=True``, when dataset runs take
  that option; otherwise the row says "not supported" and nothing is timed. The vanilla input
  gradients run one compiled graph (compiled for the batch size at the run's second batch, reused
  batch after batch; the first batch and a shorter last one eager).
- ``salience+fold`` (with ``--fold-batchnorm``): the same with ``fold_batchnorm=True``: the vanilla
  input gradients run the BatchNorm-folded copy (made once for the process; the first pass runs the
  model, to check for a final softmax). Tables made before this (e.g.
  ``dataset-compile-quiet2.md``) timed these rows on the model as it is: the options did not reach
  a dataset run's vanilla maps then.
- ``salience+bf16cl`` and ``bare+bf16cl`` (with ``--bf16``): the run with ``precision="bf16",
  memory_format="channels_last"`` (``salience explain DIR --precision bf16 --memory-format channels_last``), and
  its floor: the bare passes below on a channels-last copy of the model, the input channels-last, the forward
  under ``torch.autocast("cpu", torch.bfloat16)`` (what the engine's options do to a pass). On a CPU with AMX-BF16
  (``lscpu | grep amx``) resnet50's forward + input gradient runs about 2.7x faster so (2.3-3.0x per round in
  ``dataset-s40-bf16-1thread.md``; 0.38x fp32's time, 2.6x faster, in ``cpu-bf16-s40.md``'s rounds).
- ``bare``: the floor, no decoding, nothing written: the images already decoded into tensors (not
  timed), then per batch of B one forward and ``torch.autograd.grad`` of the predicted class's score
  w.r.t. the input (what a vanilla map needs). Since session 40 (60191c2) its fp32 path no longer clones the
  batch (the detached slice is the gradient's leaf without a copy; the clone copied about 9.6 MB a batch of 16 at 224 px), so
  ``bare`` is marginally faster than in the earlier tables.
- ``captum``: what people write by hand: a ``DataLoader`` over the files (PIL + torchvision
  transforms, the same workers), per batch a forward for the predicted class, Captum
  ``Saliency.attribute`` (its own forward + backward), maps saved as float16 ``.npy`` per batch.

The files are split into ``--rounds`` blocks (2,000 files, 5 rounds: 400 a round). Round ``r``
times every peer on block ``r``, the order of the peers rotated each round, so that a change of
the shared machine's load hits every peer alike and every peer covers all the files once.
With ``--model-cpus`` / ``--decode-cpus`` (Linux) the benchmark process (the model's passes) runs on
the first set of cores and the DataLoader workers of salience and of the Captum loop on the second:
how a run decodes "behind the model" when a core is spare (on this 2-core machine: the model on one
core with one thread, decoding on the other); without them the workers share the model's cores.

Reported: images/s min / median / max over the rounds and overall (all files / total time) per
peer, the time ratios of salience to the bare passes and to Captum (of the medians and per
round), and the 1-minute load average before and after each peer's round. Next to the wall times, per
peer and round, ``getrusage``: the CPU seconds and minor page faults of the benchmark's own process (the
model's passes, and salience's writing; not the DataLoader workers, which are other processes) and of the
workers it reaped in that round (``RUSAGE_CHILDREN``: the decoding), and salience's CPU seconds over the
bare passes' per round: the figure another core's load moves least.

``--allocator reuse`` runs the whole process under ``salience.set_performance(allocator="reuse")`` (glibc's
mmap and trim thresholds fixed before any pass, bare or not, as ``engine_speed.py --allocator reuse``); the
DataLoader workers are forked after it (they inherit the thresholds; they run no passes).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import salience
import salience.runs.sources

HERE = Path(__file__).resolve().parent


def make_jpegs(folder: Path, n: int, size: int, rounds: int = 1) -> list[list[Path]]:
    """``n`` distinct JPEG files of ``1.25 * size`` pixels, from scikit-image's photographs, in
    ``rounds`` blocks (``folder/block<r>/``), the files of each block."""
    from PIL import Image
    from skimage import data as skdata

    photos = [getattr(skdata, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera")]
    photos = [np.stack([p] * 3, -1) if p.ndim == 2 else p[..., :3] for p in photos]
    rng = np.random.default_rng(0)
    side = int(size * 1.25)
    bounds = [round(r * n / rounds) for r in range(rounds + 1)]
    blocks: list[list[Path]] = [[] for _ in range(rounds)]
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        c = int(rng.integers(min(h, w) // 2, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        crop = p[y:y + c, x:x + c][:, ::-1] if i % 2 else p[y:y + c, x:x + c]
        r = next(b for b in range(rounds) if bounds[b] <= i < bounds[b + 1])
        path = folder / f"block{r}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).resize((side, side), Image.BILINEAR).save(path, quality=90)
        blocks[r].append(path)
    return blocks


def decoded(paths: list[Path], info) -> torch.Tensor:
    x, _, errors = salience.loading.load_images(paths, info)
    assert not errors
    return x


def run_bare(model: torch.nn.Module, x: torch.Tensor, batch: int, bf16: bool = False) -> None:
    """The floor: per batch a forward and the input gradient of the predicted class's score; ``bf16``: the input
    channels-last and the forward under bf16 autocast (``model`` a channels-last copy: :func:`bf16_copy`)."""
    device = next(model.parameters()).device
    layout = torch.channels_last if bf16 else torch.contiguous_format
    for s in range(0, x.shape[0], batch):
        xi = x[s:s + batch].to(device).contiguous(memory_format=layout).detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(xi)
        pred = out.argmax(1)
        (g,) = torch.autograd.grad(out.gather(1, pred[:, None]).sum(), xi)
        g.abs().amax(1).cpu()


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A channels-last copy of ``model`` for the bf16 bare passes (salience converts the model itself in place for
    its passes and puts it back)."""
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


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


DECODE_CPUS: set[int] = set()  # --decode-cpus: the cores of the DataLoader workers (empty: the model's)


def pin_worker(_: int = 0, cores: frozenset = frozenset()) -> None:
    """A DataLoader worker's start (salience's and the Captum loop's alike): one thread, and the
    ``--decode-cpus`` cores when given (``cores``, bound by ``functools.partial``: a worker started from a
    forkserver imports this module afresh, where ``DECODE_CPUS`` is empty)."""
    torch.set_num_threads(1)
    if cores or DECODE_CPUS:
        os.sched_setaffinity(0, cores or DECODE_CPUS)


def run_captum(model: torch.nn.Module, paths: list[Path], size: int, batch: int, workers: int, out: Path) -> None:
    from captum.attr import Saliency

    out.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(Files(paths, size), batch_size=batch, num_workers=workers,
                                         worker_init_fn=pin_worker if workers else None)
    sal = Saliency(model)
    device = next(model.parameters()).device
    for b, x in enumerate(loader):
        x = x.to(device)
        with torch.no_grad():
            pred = model(x).argmax(1)
        maps = sal.attribute(x, target=pred, abs=True).amax(1)
        np.save(out / f"{b:05d}.npy", maps.cpu().numpy().astype(np.float16))


def run_salience(model: torch.nn.Module, folder: Path, batch: int, workers: int, out: Path, **options) -> None:
    salience.explain_dataset(model, folder, ["vanilla"], out, batch_size=batch, workers=workers, overwrite=True,
                             model_spec="benchmark", **options)


def usage() -> tuple[float, ...]:
    """CPU s and minor faults of this process, then of its reaped children (the DataLoader workers), then
    the main thread's seconds on a CPU and runnable but waiting for one (``/proc/thread-self/schedstat``:
    another process on the core; NaN where there is none)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        run_ns, wait_ns = Path("/proc/thread-self/schedstat").read_text().split()[:2]
        sched = int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        sched = float("nan"), float("nan")
    return (me.ru_utime + me.ru_stime, me.ru_minflt, kids.ru_utime + kids.ru_stime, kids.ru_minflt, *sched)


@contextlib.contextmanager
def held(lock: str):
    """An exclusive ``flock`` on the file ``lock`` for the ``with`` body (nothing when ``lock`` is empty); yields
    the seconds waited for it. Released explicitly (``LOCK_UN``): a DataLoader worker forked inside the body holds
    a copy of the descriptor, and a lock held by a copy would outlive the round."""
    if not lock:
        yield 0.0
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        t = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - t
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def proc_loadavg() -> str:
    """``/proc/loadavg`` as it reads (1, 5, 15-minute load, running / all tasks, last pid); '' off Linux."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), with ``amx_bf16`` / ``avx512_bf16`` when it has them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return " ".join([name, *[f for f in ("avx512_bf16", "amx_bf16") if f in flags]])


def compile_supported() -> bool:
    """Whether dataset runs take ``compile=`` (issue 19 adds it)."""
    import inspect

    return "compile" in inspect.signature(salience.explain_dataset).parameters


def main(argv=None) -> int:  # long: the options, the rounds and the report in one readable place
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50", help="a torchvision model (random weights)")
    ap.add_argument("--n", type=int, default=2000, help="JPEG files, split into --rounds blocks")
    ap.add_argument("--size", type=int, default=224, help="input size (the files are 1.25x larger)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (salience and captum)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each on its own block of n / rounds files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="add a salience row with compile=True")
    ap.add_argument("--fold-batchnorm", action="store_true", help="add a salience row with fold_batchnorm=True")
    ap.add_argument("--bf16", action="store_true", help="add salience and bare rows with bf16 autocast + channels-last")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU: e.g. --model vit_b_16 --batch 64)")
    ap.add_argument("--model-cpus", default="", help="cores of the model's passes, e.g. 1 (Linux; default: all)")
    ap.add_argument("--decode-cpus", default="", help="cores of the DataLoader workers, e.g. 0 (default: the model's)")
    ap.add_argument("--allocator", choices=["default", "reuse"], default="default",
                    help="reuse: salience.set_performance(allocator='reuse') with glibc's thresholds set before "
                         "any pass, so the bare passes run under the same allocator as salience's")
    ap.add_argument("--lock", default="", help="a file to hold an exclusive flock on around each round (all peers of "
                    "a round in one hold, released between rounds): a machine shared with other timings")
    ap.add_argument("--out", default=str(HERE / "dataset"), help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.allocator != "default":
        salience.set_performance(allocator=args.allocator)
        from salience._core.malloc import keep_freed_memory
        keep_freed_memory()  # before the first pass, bare or not: one allocator state for every peer
    cpus = lambda text: {int(c) for c in text.split(",") if c.strip()}  # noqa: E731
    if args.model_cpus:
        os.sched_setaffinity(0, cpus(args.model_cpus))
    if args.decode_cpus:
        DECODE_CPUS.update(cpus(args.decode_cpus))
        # what explain_dataset's DataLoader starts its workers with (the cores bound: pickled to a forkserver's worker)
        salience.runs.sources.worker_init = functools.partial(pin_worker, cores=frozenset(DECODE_CPUS))
    if args.n < args.rounds:
        ap.error("--n must be at least --rounds (a block of files per round)")
    torch.set_num_threads(args.threads)
    model = salience.load_model(f"torchvision:{args.model}", weights="random", device=args.device)
    info = salience.loading.images.with_preprocessing(salience.loading.models.model_info(model),
                                                      size=args.size, resize=int(args.size * 256 / 224))
    salience._core.info.attach_info(model, info)
    tmp = Path(tempfile.mkdtemp(prefix="salience-bench-"))
    skipped: dict[str, str] = {}
    try:
        blocks = make_jpegs(tmp / "jpegs", args.n, args.size, args.rounds)
        cases = {
            "bare": lambda r, x: run_bare(model, x, args.batch),
            "salience": lambda r, x: run_salience(model, tmp / "jpegs" / f"block{r}", args.batch, args.workers,
                                                  tmp / "run"),
            "captum": lambda r, x: run_captum(model, blocks[r], args.size, args.batch, args.workers, tmp / "captum"),
        }
        if args.compile and compile_supported():
            cases["salience+compile"] = lambda r, x: run_salience(model, tmp / "jpegs" / f"block{r}", args.batch,
                                                                  args.workers, tmp / "run-compiled", compile=True)
        elif args.compile:
            skipped["salience+compile"] = "not supported: explain_dataset takes no compile= yet (issue 19)"
            print("salience+compile: not supported (explain_dataset takes no compile= yet); row left out", flush=True)
        if args.fold_batchnorm:
            cases["salience+fold"] = lambda r, x: run_salience(model, tmp / "jpegs" / f"block{r}", args.batch,
                                                               args.workers, tmp / "run-folded", fold_batchnorm=True)
        if args.bf16:
            cl_model = bf16_copy(model)
            cases["bare+bf16cl"] = lambda r, x: run_bare(cl_model, x, args.batch, bf16=True)
            cases["salience+bf16cl"] = lambda r, x: run_salience(model, tmp / "jpegs" / f"block{r}", args.batch,
                                                                 args.workers, tmp / "run-bf16", precision="bf16",
                                                                 memory_format="channels_last")
        warm = decoded(blocks[0][:args.batch], info)
        run_bare(model, warm, args.batch)  # warm-up (and, with --compile, the compiled run's first trace below)
        if "salience+compile" in cases:
            run_salience(model, tmp / "jpegs" / "block0", args.batch, args.workers, tmp / "warm-compiled",
                         compile=True)
        if args.bf16:  # oneDNN's bf16 kernels chosen once, outside the timing
            run_bare(cl_model, warm, args.batch, bf16=True)
            run_salience(model, tmp / "jpegs" / "block0", args.batch, args.workers, tmp / "warm-bf16",
                         precision="bf16", memory_format="channels_last")
        if "salience+fold" in cases:  # the folded copy is made once (cached for the process)
            run_salience(model, tmp / "jpegs" / "block0", args.batch, args.workers, tmp / "warm-folded",
                         fold_batchnorm=True)
        times: dict[str, list[float]] = {c: [] for c in cases}
        loads: dict[str, list[list[float]]] = {c: [] for c in cases}
        use: dict[str, list[list[float]]] = {c: [] for c in cases}  # per round: CPU s, faults, workers' CPU s, faults
        counts = [len(b) for b in blocks]
        order = list(cases)
        machine_load: list[dict] = []  # per round: /proc/loadavg when the lock was taken and at the round's end
        for r in range(args.rounds):
            x = decoded(blocks[r], info)  # the bare passes' input, decoded before any timing (outside the lock)
            with held(args.lock) as waited:
                machine_load.append({"lock_wait_s": round(waited, 1), "start": proc_loadavg()})
                for c in order[r % len(order):] + order[:r % len(order)]:
                    before = os.getloadavg()[0]
                    u0, t = usage(), time.perf_counter()
                    cases[c](r, x)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[c].append(time.perf_counter() - t)
                    use[c].append([round(b - a, 3) for a, b in zip(u0, usage())])
                    # blocked: off the runqueue
                    use[c][-1].append(round(times[c][-1] - use[c][-1][4] - use[c][-1][5], 3))
                    loads[c].append([round(before, 2), round(os.getloadavg()[0], 2)])
                    print(f"round {r + 1} {c:16s} {counts[r] / times[c][-1]:7.2f} img/s  (load {before:.1f}; CPU "
                          f"{use[c][-1][0]:.1f} s, {use[c][-1][1]:.0f} faults; workers {use[c][-1][2]:.1f} s)",
                          flush=True)
                machine_load[-1]["end"] = proc_loadavg()
            print(f"round {r + 1}: /proc/loadavg {machine_load[-1]['start']} -> {machine_load[-1]['end']} "
                  f"(lock waited {machine_load[-1]['lock_wait_s']} s)", flush=True)
            del x
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = _report(args, counts, times, loads, skipped)
    report["machine_load_per_round"] = machine_load
    report["cpu"] = cpu_name()
    report["usage_per_round"] = {"fields": ["cpu_s", "minor_faults", "workers_cpu_s", "workers_minor_faults",
                                            "main_thread_on_cpu_s", "main_thread_runnable_waiting_s",
                                            "main_thread_blocked_s"], **use}
    report["cpu_ratio_salience_over_bare_per_round"] = [s[0] / b[0] for s, b in zip(use["salience"], use["bare"])]
    if args.bf16:
        report["bf16"] = _bf16_ratios(times, use)
    Path(args.out + ".json").write_text(json.dumps(report, indent=2))
    Path(args.out + ".md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _report(args, counts, times, loads, skipped) -> dict:
    rate = {c: [n / t for n, t in zip(counts, ts)] for c, ts in times.items()}
    med = {c: statistics.median(v) for c, v in rate.items()}
    rounds = range(args.rounds)
    return {
        "config": {k: getattr(args, k) for k in ("model", "n", "size", "batch", "workers", "rounds", "threads",
                                                 "compile", "fold_batchnorm", "bf16", "device", "model_cpus", "decode_cpus",
                                                 "allocator")},
        "command": "python benchmarks/dataset.py " + " ".join(sys.argv[1:]),
        "files_per_round": counts,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "salience": salience.__version__},
        "images_per_s": {c: {"min": min(v), "median": med[c], "max": max(v), "overall": sum(counts) / sum(times[c]),
                             "all": v} for c, v in rate.items()},
        "not_run": skipped,
        "time_ratio_salience_over_bare": {"of_medians": med["bare"] / med["salience"],
                                          "per_round": [times["salience"][r] / times["bare"][r] for r in rounds]},
        "time_ratio_salience_over_captum": {"of_medians": med["captum"] / med["salience"],
                                            "per_round": [times["salience"][r] / times["captum"][r] for r in rounds]},
        "load_before_after": loads,
    }


def _bf16_ratios(times: dict, use: dict) -> dict:
    """Per round, the bf16 + channels-last rows' time and CPU ratios: the run over its own floor (the bf16 bare
    passes) and over the fp32 bare passes, and the bare passes' speed-up."""
    rounds = range(len(times["bare"]))
    ratio = lambda a, b, t: [t[a][r] / t[b][r] for r in rounds]  # noqa: E731
    cpu = {k: [u[0] for u in v] for k, v in use.items()}
    return {"time_salience_bf16cl_over_bare_bf16cl": ratio("salience+bf16cl", "bare+bf16cl", times),
            "cpu_salience_bf16cl_over_bare_bf16cl": ratio("salience+bf16cl", "bare+bf16cl", cpu),
            "time_salience_bf16cl_over_bare": ratio("salience+bf16cl", "bare", times),
            "time_salience_bf16cl_over_salience": ratio("salience+bf16cl", "salience", times),
            "time_bare_bf16cl_over_bare": ratio("bare+bf16cl", "bare", times)}


def _markdown(rep: dict) -> str:
    cfg = rep["config"]
    lines = [f"# Dataset run: {cfg['model']}, {cfg['n']} JPEGs at {cfg['size']}x{cfg['size']}, batch {cfg['batch']}, "
             f"{cfg['workers']} worker(s), {cfg['threads']} threads, {cfg.get('device', 'cpu')}, "
             f"{cfg['rounds']} interleaved rounds of "
             f"{'/'.join(str(c) for c in sorted(set(rep['files_per_round'])))} files", "",
             f"`{rep.get('command', '')}`" + (f"; model on cores {cfg['model_cpus']}, decoding workers on cores "
                                              f"{cfg['decode_cpus']}" if cfg.get("decode_cpus") else ""), "",
             "| peer | images/s min | median | max | overall |", "|---|---|---|---|---|"]
    for c, v in rep["images_per_s"].items():
        lines.append(f"| {c} | {v['min']:.2f} | {v['median']:.2f} | {v['max']:.2f} | {v['overall']:.2f} |")
    for c, why in rep.get("not_run", {}).items():
        lines.append(f"| {c} | {why} | | | |")
    b, c = rep["time_ratio_salience_over_bare"], rep["time_ratio_salience_over_captum"]
    lines += ["", f"time salience / bare: {b['of_medians']:.3f} (medians); per round "
              + ", ".join(f"{r:.3f}" for r in b["per_round"]),
              f"time salience / captum: {c['of_medians']:.3f} (medians); per round "
              + ", ".join(f"{r:.3f}" for r in c["per_round"]), "",
              *_usage_lines(rep),
              *[f"{k.replace('_', ' ')} per round: " + ", ".join(f"{r:.3f}" for r in v)
                for k, v in rep.get("bf16", {}).items()], *([""] if rep.get("bf16") else []),
              "load average (1 min) before / after each peer's round: "
              + "; ".join(f"{k}: " + ", ".join(f"{a}/{z}" for a, z in v) for k, v in rep["load_before_after"].items()),
              *_machine_lines(rep)]
    return "\n".join(lines) + "\n"


def _machine_lines(rep: dict) -> list[str]:
    """The CPU and, per round, ``/proc/loadavg`` at the start and the end of the round (with ``--lock``: the start
    is when the lock was taken)."""
    lines = [""] + ([f"CPU: {rep['cpu']}."] if rep.get("cpu") else [])
    for r, m in enumerate(rep.get("machine_load_per_round", [])):
        lines.append(f"round {r + 1}: /proc/loadavg {m['start']} -> {m['end']}, lock waited {m['lock_wait_s']} s")
    return lines


def _usage_lines(rep: dict) -> list[str]:
    """The ``getrusage`` figures of each peer (medians over the rounds) and salience's CPU over the bare passes'."""
    use = {k: v for k, v in rep.get("usage_per_round", {}).items() if k != "fields"}
    if not use:
        return []
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    lines = [f"allocator: {rep['config'].get('allocator', 'default')}. Per round (medians), this process's CPU s "
             "and minor page faults, then the reaped DataLoader workers': "
             + "; ".join(f"{k} {med(v, 0):.1f} s, {med(v, 1):,.0f} faults (workers {med(v, 2):.1f} s, "
                         f"{med(v, 3):,.0f})" for k, v in use.items())]
    ratios = rep.get("cpu_ratio_salience_over_bare_per_round", [])
    lines += ["CPU s salience / bare per round: " + ", ".join(f"{r:.3f}" for r in ratios)]
    if all(len(r) >= 7 for v in use.values() for r in v):
        lines += ["The main thread's wall s per round: on a CPU / runnable, waiting for the core (another process "
                  "there) / blocked (waiting for a batch, a write, a lock): "
                  + "; ".join(f"{k} " + ", ".join(f"{r[4]:.1f} / {r[5]:.1f} / {r[6]:.1f}" for r in v)
                              for k, v in use.items())]
    lines += [""]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
