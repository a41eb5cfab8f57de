"""What ``salience explore FOLDER``'s folder check costs before and after session 56 (real-size JPEG photos).

Session 56 changed the check of each file (``salience.explore.images.unreadable``): the file is opened once (the
quick look, then ``load_image`` for the words, read from the same bytes; it was opened four times), and a format
other than PNG is decoded by Pillow (a JPEG at 1/8 of its size, DCT scaling), where ``verify`` read the header
only: a JPEG whose data is cut passed. Peers, in alternating order each round, each in a fresh process (its import
not timed; each case timed 3 times there, the least kept: the machine is shared), one thread, on core 1 under the
bench lock:

* ``old``: main's ``src`` (``git -C /work/main archive HEAD src | tar -x -C /tmp/old-ends``);
* ``new``: this worktree's ``src``.

Folders (made once, in a temporary folder), from scikit-image's colour photos (``skimage.data``: astronaut,
chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina, cat; 300 x 451 to 1411 x 1411), each
flipped, shifted and saved as JPEG (quality 90) so that no two files are alike:

* ``first call``: ``unreadable`` of one JPEG (chelsea, 300 x 451) in a fresh process: Pillow's plugins and decoder
  set up, paid once per command (not in the figures below);
* ``photos``: 200 sound JPEGs: the check (``_unreadable_folder``) stops at the first one (one file's cost);
* ``photos, each file``: ``unreadable`` of every one of the 200 (what a check of each file would cost: the price of
  the decode per file);
* ``cut``: the 200 JPEGs cut at 2/3 of their bytes (header sound, data not): every file is checked;
* ``text``: 1,000 ``.jpg`` files of text (PIL cannot identify them): every file is checked;
* ``cut png``: 200 PNGs of 512 x 512 noise cut at half: every file is checked.

Run (the table: ``benchmarks/cliends-s56-folder.md``):

    flock /tmp/bench.lock taskset -c 1 python benchmarks/cliends-s56-folder.py --rounds 5 --old /tmp/old-ends/src
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
N_JPEG, N_TEXT, N_PNG = 200, 1000, 200
INNER = 3
"""Each case is timed 3 times in a round's process; the round's figure is the least (the machine is shared)."""


def _make(root: Path) -> dict[str, str]:
    """The folders (name -> path); also ``sizes.json`` there: each photo's sides and the JPEGs' bytes."""
    import skimage.data
    from PIL import Image

    made = {name: root / name for name in ("photos", "cut", "text", "cut_png")}
    for p in made.values():
        p.mkdir()
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    sizes = []
    for i in range(N_JPEG):
        a = photos[i % len(photos)]
        a = np.roll(a[:, ::-1] if (i // len(photos)) % 2 else a, i, axis=1)
        path = made["photos"] / f"{i:04d}.jpg"
        Image.fromarray(a).save(path, "JPEG", quality=90)
        data = path.read_bytes()
        (made["cut"] / path.name).write_bytes(data[:len(data) * 2 // 3])
        sizes.append([a.shape[1], a.shape[0], len(data)])
    for i in range(N_TEXT):
        (made["text"] / f"{i:04d}.jpg").write_text("not an image\n" * 20)
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.png")
    png = (root / "noise.png").read_bytes()
    for i in range(N_PNG):
        (made["cut_png"] / f"{i:04d}.png").write_bytes(png[:len(png) // 2])
    (root / "sizes.json").write_text(json.dumps(sizes))
    (root / "warm.jpg").write_bytes((made["photos"] / "0001.jpg").read_bytes())
    return {**{k: str(v) for k, v in made.items()}, "warm": str(root / "warm.jpg")}


def _worker(folders: dict[str, str]) -> dict[str, list]:
    """In a fresh process importing the ``salience`` on ``sys.path``: seconds and verdict of each case."""
    import torch

    torch.set_num_threads(1)
    from salience.cli.explore_cmd import _unreadable_folder
    from salience.explore.images import folder_images, unreadable

    out: dict[str, list] = {}
    t = time.perf_counter()  # Pillow's plugins and the JPEG decoder set up: paid once by the command, timed apart
    sound = unreadable(Path(folders["warm"]), 50_000_000) is None
    out["first_call"] = [time.perf_counter() - t, sound]
    for name in ("photos", "cut", "text", "cut_png"):
        best = math.inf
        for _ in range(INNER):
            t = time.perf_counter()
            why = _unreadable_folder(Path(folders[name]), 50_000_000)
            best = min(best, time.perf_counter() - t)
        out[name] = [best, why is None]
    files = folder_images(Path(folders["photos"]))
    best = math.inf
    for _ in range(INNER):
        t = time.perf_counter()
        bad = sum(unreadable(f, 50_000_000) is not None for f in files)
        best = min(best, time.perf_counter() - t)
    out["photos_each"] = [best, bad == 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--old", default="/tmp/old-ends/src")
    ap.add_argument("--out", default="benchmarks/cliends-s56-folder.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    srcs = {"old": os.path.abspath(args.old), "new": str(Path(__file__).resolve().parent.parent / "src")}
    load = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {}
    kept: dict[str, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = _make(Path(tmp))
        sizes = json.loads((Path(tmp) / "sizes.json").read_text())
        with os.scandir(folders["photos"]) as entries:  # the check's order: the folder's own
            first = next(e.name for e in entries)
        for r in range(args.rounds):
            for peer in (("old", "new") if r % 2 == 0 else ("new", "old")):
                env = {**os.environ, "PYTHONPATH": srcs[peer], "OMP_NUM_THREADS": "1"}
                got = json.loads(subprocess.run([sys.executable, __file__, "--worker", json.dumps(folders)], env=env,
                                                check=True, capture_output=True, text=True).stdout)
                for case, (sec, ok) in got.items():
                    times.setdefault(case, {}).setdefault(peer, []).append(sec)
                    kept.setdefault(case, {})[peer] = ok
    seconds = {case: {peer: _spread(v) for peer, v in peers.items()} for case, peers in times.items()}
    result = {"load_before": load, "cpu": "AMD EPYC (avx2, no AVX512), core 1, one thread", "rounds": args.rounds,
              "jpeg_bytes": [min(s[2] for s in sizes), max(s[2] for s in sizes)],
              "jpeg_sides": sorted({(s[0], s[1]) for s in sizes}), "photos_first": [first, sizes[int(first[:4])]],
              "kept_or_all_sound": kept, "seconds": seconds}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("load before:", load)
    for case, peers in seconds.items():
        for peer, s in peers.items():
            print(f"{case:12s} {peer}: min {s['min']:.4f}  median {s['median']:.4f}  max {s['max']:.4f} s  "
                  f"(kept or all sound: {kept[case][peer]})")


def _spread(values: list[float]) -> dict:
    """min / median / max of a peer's rounds, and the rounds."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "rounds": values}

if __name__ == "__main__":
    main()
