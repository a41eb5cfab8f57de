"""What ``salience explore FOLDER`` costs to check a folder of 1,000 images before it serves (session 55).

The check (``salience.cli.explore_cmd._unreadable_folder``) reads the folder's image files in the page's order up to
the first readable one, each by its header and ``PIL.Image.verify`` (a PNG's chunks and checksums, nothing inflated),
and by ``load_image`` (a decode) only where that fails. Peers, alternating rounds, one thread, on core 1 under the
bench lock:

* ``listing``: the code before, which listed the folder (no image read);
* ``check``: the new check;
* ``decode_all``: what the brief warned against, ``load_image`` of every file (the page decodes each again).

Folders (made once in a temporary folder): ``sound`` (1,000 PNGs of 512 x 512 noise), ``text`` (1,000 ``.jpg`` files of
text), ``truncated`` (1,000 PNGs cut at half their bytes: the header sound, the data not), ``late`` (999 truncated and a
sound one last). Run:

    flock /tmp/bench.lock taskset -c 1 python benchmarks/cliends-s55-folder.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from salience.cli.explore_cmd import _unreadable_folder
from salience.explore.images import folder_images
from salience import SalienceError
from salience.loading import load_image

N = 1000
SIDE = 512


def _folders(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    sound = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    made = {name: root / name for name in ("sound", "text", "truncated", "late")}
    for p in made.values():
        p.mkdir()
    first = made["sound"] / "0000.png"
    Image.fromarray(sound).save(first)
    data = first.read_bytes()
    for i in range(N):
        if i:
            (made["sound"] / f"{i:04d}.png").write_bytes(data)
        (made["text"] / f"{i:04d}.jpg").write_text("not an image\n" * 20)
        (made["truncated"] / f"{i:04d}.png").write_bytes(data[:len(data) // 2])
        (made["late"] / f"{i:04d}.png").write_bytes(data if i == N - 1 else data[:len(data) // 2])
    return made


def _listing(folder: Path) -> bool:
    """The code before: a folder with an image file (by suffix) is kept, none read."""
    return bool(folder_images(folder))


def _decode_all(folder: Path) -> bool:
    ok = False
    for f in folder_images(folder):
        try:
            load_image(f)
            ok = True
        except SalienceError:
            pass
    return ok


PEERS = {"listing": _listing, "check": lambda f: _unreadable_folder(f, 50_000_000) is None,
         "decode_all": _decode_all}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/cliends-s55-folder.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {}
    kept: dict[str, dict[str, bool]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = _folders(Path(tmp))
        for r in range(args.rounds):
            order = list(PEERS) if r % 2 == 0 else list(reversed(PEERS))
            for name, folder in folders.items():
                for peer in order:
                    t = time.perf_counter()
                    ok = PEERS[peer](folder)
                    times.setdefault(name, {}).setdefault(peer, []).append(time.perf_counter() - t)
                    kept.setdefault(name, {})[peer] = ok
    result = {"load_before": load, "cpu": "AMD EPYC (avx2, no AVX512), core 1, one thread", "files": N,
              "side": SIDE, "rounds": args.rounds, "kept": kept,
              "seconds": {n: {p: {"min": min(v), "median": statistics.median(v), "max": max(v), "rounds": v}
                              for p, v in peers.items()} for n, peers in times.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"load before: {load}")
    for n, peers in result["seconds"].items():
        print(n, "  ".join(f"{p}: {s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f} s (kept {kept[n][p]})"
                           for p, s in peers.items()))


if __name__ == "__main__":
    main()
