"""folding.settings on resnet50 (151 modules): the fastest of 7 repeats of 200 calls, ms a call, this tree's code
against another tree's (``--other SRC``, e.g. an archive of main's src), interleaved. Session 47."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import timeit


def load(src: str):
    spec = importlib.util.spec_from_file_location("other_folding", f"{src}/salience/_core/folding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="another src folder (its salience/_core/folding.py)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch
    import torchvision
    from salience._core import folding

    torch.set_num_threads(1)
    other = load(args.other)
    model = torchvision.models.resnet50().eval()
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    for r in range(args.rounds):
        row = []
        for name, fn in (("this", folding.settings), ("other", other.settings)):
            best = min(timeit.repeat(lambda: fn(model), number=200, repeat=7)) / 200 * 1e3
            row.append(f"{name} {best:.3f} ms")
        print(f"round {r + 1}: " + ", ".join(row))


if __name__ == "__main__":
    main()
