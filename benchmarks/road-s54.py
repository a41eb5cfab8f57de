"""ROAD's linear imputation: main's spsolve path (before session 54) vs the nested-dissection SuperLU path.

Run under the lock, on one core, from the worktree root:

    flock /tmp/bench.lock taskset -c 1 env PYTHONPATH=$PWD/src /work/main/.venv/bin/python benchmarks/road-s54.py

Part 1: ``linear_imputation`` on 8 images 3 x 224 x 224 at each ROAD fraction, the removed pixels the top of
a Gaussian-bump map (contiguous) or of a uniform random map (scattered), old and new in alternating rounds,
min / median / max. Part 2: ``road(...)`` end to end (MoRF and LeRF, 9 fractions, noise 0.01) on a random-weight
resnet18 at 224, 8 images, the model's time included; the old path is main's ``_impute_one`` put in place of
the new one. Part 3 (one round, one image, fraction 0.9): the factor's fill and time of the orderings tried.
Writes benchmarks/road-s54.md (atomically).
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name, fmt_spread, make_model  # noqa: E402

OLD_COMMIT = "377afcd4d8f32b47190f0500de7c54bd206b3a14"  # main's last road.py with spsolve
ROOT = Path(__file__).resolve().parents[1]
new = importlib.import_module("salience.evidence.road")


NOTES = """## What else was tried (exploratory runs, one image 3 x 224 x 224; not kept)

* **Connected components, isolated pixels in closed form.** SuperLU never mixes the blocks of a block-diagonal
  matrix: an isolated removed pixel is a 1 x 1 pivot without fill, so splitting saves only bookkeeping. The time
  goes where one component holds almost everything (the bump map at every fraction, the random map from about
  0.5 on, past the 8-neighbour site-percolation threshold ~0.41); at the random map's 0.1, where 0.9**8 = 43 % of
  the removed pixels are isolated, the whole old solve is ~6 ms per image (table above), mostly the matrix build.
* **Conjugate gradients.** Jacobi-preconditioned CG, 3 right-hand sides, bump map at 0.9: rtol 1e-10 gave only
  1.4e-9 relative error (misses 1e-9); rtol 1e-13 gave 1e-12 in 4.7 s, against 0.37 s for spsolve and 0.14 s for
  the new path. ILU-preconditioned CG (`spilu`, drop_tol 1e-3): the incomplete factorization alone had not finished
  after minutes on the loaded machine; abandoned.
* **Images in a thread pool.** 4 factorizations (0.9) in a 2-thread pool: 0.59 s against 0.55 s one after the other:
  scipy's SuperLU holds the GIL, nothing to gain.
* **One factorization for the nested removed sets.** Fraction k-1's matrix is the leading block of fraction k's
  only if the unknowns are numbered in removal order; that order has no locality (rings of the bump, a random order
  for a random map): the fill at 0.9 grows 13x and the factorization from 0.14 s to 12.5 s (last table), more than
  the 9 separate nested-dissection factorizations together. LeRF removes another nested sequence.
* **SuperLU's MMD_AT_PLUS_A ordering.** Less fill than COLAMD, at times less than nested dissection (random map at
  0.5: 0.26 M against 0.66 M), but its ordering time makes it slower than nested dissection at every fraction of
  both maps (e.g. random 0.5: 73 ms against 49 ms; bump 0.9: 484 ms against 235 ms; COLAMD 83 and 730 ms).
* **Nested dissection of the removed set's bounding box** instead of the whole image: 3 to 11 % less fill for an
  off-centre bump at 0.1 to 0.5, but one ranking per bounding-box size (a new one at each fraction); not kept.
"""


def old_module() -> dict:
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/salience/evidence/road.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    namespace: dict = {"__name__": "old_road_s54"}
    exec(compile(src, "old_road.py", "exec"), namespace)
    return namespace


def maps(size: int) -> dict[str, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    bump = torch.exp(-((yy - 0.4 * size) ** 2 + (xx - 0.58 * size) ** 2) / (2 * (0.22 * size) ** 2))
    return {"bump": bump, "random": torch.rand(size, size, generator=torch.Generator().manual_seed(7))}


def removed_at(m: torch.Tensor, f: float, batch: int) -> torch.Tensor:
    n = m.numel()
    rem = torch.zeros(n, dtype=torch.bool)
    rem[m.flatten().argsort(descending=True)[:min(round(f * n), n - 1)]] = True
    return rem.reshape(1, *m.shape).expand(batch, *m.shape)


def part1(old: dict, x: torch.Tensor, rounds: int) -> list[str]:
    lines = ["| map | fraction | old spsolve s (min / med / max) | new s (min / med / max) | speed-up (median) "
             "| every round faster | max rel. diff |", "|---|---|---|---|---|---|---|"]
    totals = {}
    for name, m in maps(x.shape[-1]).items():
        for f in new.ROAD_FRACTIONS:
            rem = removed_at(m, f, x.shape[0])
            t_old, t_new, diff = [], [], 0.0
            for r in range(rounds):
                for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    fn = old["linear_imputation"] if which == "old" else new.linear_imputation
                    t0 = time.perf_counter()
                    out = fn(x, rem)
                    (t_old if which == "old" else t_new).append(time.perf_counter() - t0)
                    if which == "old":
                        ref = out
                    else:
                        mine = out
                diff = max(diff, float((mine - ref).abs().max() / ref.abs().max()))
            faster = all(a < b for a, b in zip(t_new, t_old))
            totals.setdefault(name, [[0.0] * rounds, [0.0] * rounds])
            for r in range(rounds):
                totals[name][0][r] += t_old[r]
                totals[name][1][r] += t_new[r]
            lines.append(f"| {name} | {f:g} | {fmt_spread(t_old)} | {fmt_spread(t_new)} | "
                         f"{np.median(t_old) / np.median(t_new):.2f}x | {'yes' if faster else 'NO'} | {diff:.1e} |")
            print(lines[-1], flush=True)
    for name, (o, n) in totals.items():
        lines.append(f"| {name} | all 9 | {fmt_spread(o)} | {fmt_spread(n)} | {np.median(o) / np.median(n):.2f}x | "
                     f"{'yes' if all(a < b for a, b in zip(n, o)) else 'NO'} | |")
    return lines


def part2(old: dict, x: torch.Tensor, rounds: int) -> list[str]:
    model = make_model("resnet18", 1)
    m = maps(x.shape[-1])["random"].expand(x.shape[0], -1, -1) + 0.5 * maps(x.shape[-1])["bump"]
    new_impute = new._impute_one
    times: dict[str, list[float]] = {"old": [], "new": []}
    cpu: dict[str, list[float]] = {"old": [], "new": []}  # this process's CPU time: less sensitive to other work
    results = {}
    for r in range(rounds):
        for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
            new._impute_one = old["_impute_one"] if which == "old" else new_impute
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                results[which] = torch.stack([new.road(model, x, m, order=o, batch_size=32) for o in ("morf", "lerf")])
                times[which].append(time.perf_counter() - t0)
                cpu[which].append(time.process_time() - c0)
            finally:
                new._impute_one = new_impute
            print(which, times[which][-1], cpu[which][-1], flush=True)
    diff = float((results["old"] - results["new"]).abs().max())
    rows = [f"| {k} {label} | {fmt_spread(v[k], 2)} | {', '.join(f'{t:.2f}' for t in v[k])} |"
            for label, v in (("wall", times), ("CPU", cpu)) for k in ("old", "new")]
    verdict = [f"{label}: median speed-up {np.median(v['old']) / np.median(v['new']):.2f}x, every round faster: "
               f"{'yes' if all(a < b for a, b in zip(v['new'], v['old'])) else 'NO'}"
               for label, v in (("wall", times), ("CPU", cpu))]
    return [f"| path | road MoRF + LeRF, {x.shape[0]} images, s (min / med / max) | per round |", "|---|---|---|",
            *rows, "", f"{'; '.join(verdict)}; largest difference of the scores old vs new {diff:.1e} (float32 model)."]


def part3(x: torch.Tensor) -> list[str]:
    import scipy.sparse.linalg as la

    img = x[0].double().numpy()
    lines = ["| map (f = 0.9) | ordering | nnz(L + U) | factor + solve s |", "|---|---|---|---|"]
    for name, m in maps(x.shape[-1]).items():
        rem = removed_at(m, 0.9, 1)[0].numpy()
        h, w = rem.shape
        flat = np.flatnonzero(rem.reshape(-1))
        orders = {"COLAMD (spsolve's default)": (flat, "COLAMD"), "MMD_AT_PLUS_A": (flat, "MMD_AT_PLUS_A"),
                  "nested dissection (new)": (flat[np.argsort(new._dissection_rank(h, w)[flat])], "NATURAL")}
        if name == "bump":  # the random map's removal order has no locality at all: not run (near-dense fill)
            orders["removal order (needed to reuse across fractions)"] = (
                flat[np.argsort(-m.flatten().numpy()[flat], kind="stable")], "NATURAL")
        for label, (idx, spec) in orders.items():
            a, rhs = new._system(img, rem, idx)
            t0 = time.perf_counter()
            lu = la.splu(a, permc_spec=spec, diag_pivot_thresh=0.0, options={"SymmetricMode": True})
            lu.solve(rhs)
            lines.append(f"| {name} | {label} | {lu.L.nnz + lu.U.nnz:,} | {time.perf_counter() - t0:.3f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "road-s54.md"))
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 2 for road() end to end only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_module()
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    for fn in (old["linear_imputation"], new.linear_imputation):  # the first call imports scipy, fills the cache
        fn(x[:1].double(), removed_at(maps(args.size)["bump"], 0.1, 1))
    load0 = os.getloadavg()
    skipped = ["(not run)"]
    # float64 in and out: the difference of the solutions shows
    p1 = part1(old, x.double(), args.rounds) if "1" in args.parts else skipped
    write(args, load0, p1, skipped, skipped)
    p2 = part2(old, x, args.rounds) if "2" in args.parts else skipped
    write(args, load0, p1, p2, skipped)
    p3 = part3(x) if "3" in args.parts else skipped
    print(write(args, load0, p1, p2, p3))


def write(args: argparse.Namespace, load0: tuple, p1: list[str], p2: list[str], p3: list[str]) -> str:
    """The results file (atomically), after each part; its text."""
    load1 = os.getloadavg()
    out_flag = "" if Path(args.out).name == "road-s54.md" else f" --out benchmarks/{Path(args.out).name}"
    text = "\n".join([
        "# ROAD's linear imputation: spsolve (main before session 54) vs nested-dissection SuperLU", "",
        f"Command: `flock /tmp/bench.lock taskset -c 1 env PYTHONPATH=$PWD/src /work/main/.venv/bin/python "
        f"benchmarks/road-s54.py --rounds {args.rounds} --parts {args.parts}{out_flag}`; {args.images} images "
        f"3 x {args.size} x {args.size}, "
        f"one thread, old and new alternating. CPU: {cpu_name()} (no AVX512), {os.cpu_count()} cores shared with "
        f"other work; load average (1, 5, 15 min) {tuple(round(v, 2) for v in load0)} before the rounds, "
        f"{tuple(round(v, 2) for v in load1)} when written.", "",
        f"## linear_imputation, {args.images} images per call (float64)", "", *p1, "",
        f"## road(...) end to end, resnet18 (random weights) at {args.size}, MoRF + LeRF, model time included", "",
        *p2, "",
        "## Orderings tried, one image at fraction 0.9 (one run)", "", *p3, "", NOTES])
    tmp = Path(args.out + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    return text


if __name__ == "__main__":
    main()
