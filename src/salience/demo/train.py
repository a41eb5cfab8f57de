"""Train the demo models of :mod:`salience.zoo` on :mod:`salience.data` shapes, reproducibly.

``python -m salience.demo.train shapes|shapes-regression|shapes-cue [--out DIR] [--seed 0]``

Seeded (data, initialization, shuffling), two CPU threads, a few minutes per model on two
cores. The model is evaluated on a fresh held-out draw (seed ``10_000 + seed``) *after* its
weights were rounded to float16 as stored; weights (``<name>.pt``) and metadata (``<name>.json``)
are written atomically to ``DIR`` (default: the package's ``_weights`` folder).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from salience.demo import data
from salience._core.errors import SalienceError
from salience._core.files import atomic_path, atomic_write
from salience.demo.zoo import DEMOS, ShapesNet

__all__ = ["CONFIGS", "train", "evaluate", "main"]

HELD_OUT_OFFSET = 10_000
"""The held-out draw uses seed ``HELD_OUT_OFFSET + seed``, never seen in training."""

CONFIGS: dict[str, dict[str, Any]] = {
    "shapes": dict(
        task="classification", cue=None, arch=dict(num_outputs=5, widths=(16, 32, 48, 64), head="avg"),
        n_train=24_000, epochs=12, lr=4e-3, batch=64,
    ),
    "shapes-regression": dict(
        task="regression", cue=None,
        arch=dict(num_outputs=2, widths=(16, 32, 48, 64, 64), head="flatten", hidden=64),
        n_train=24_000, epochs=12, lr=3e-3, batch=64,
    ),
    "shapes-cue": dict(
        task="classification", cue="train", arch=dict(num_outputs=5, widths=(16, 32, 48, 64), head="avg"),
        n_train=8_000, epochs=3, lr=4e-3, batch=64,
    ),
}
"""Training recipe of each demo model."""

N_HELD_OUT = 2_000


def _targets(b: data.ShapesBatch, task: str) -> torch.Tensor:
    if task == "classification":
        return b.labels
    return torch.stack([b.scale, b.center[:, 0]], 1)


def _loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.smooth_l1_loss(out * 10, y * 10, beta=0.5)


@torch.no_grad()
def evaluate(model: nn.Module, b: data.ShapesBatch, task: str, batch: int = 500) -> dict[str, float]:
    """Held-out figures: ``accuracy`` (classification) or ``mae_size`` / ``mae_x_position``."""
    was = model.training
    model.eval()
    try:
        outs = torch.cat([model(b.images[i:i + batch]) for i in range(0, len(b), batch)])
    finally:
        model.train(was)
    if task == "classification":
        return {"accuracy": float((outs.argmax(1) == b.labels).float().mean())}
    err = (outs - _targets(b, task)).abs().mean(0)
    return {"mae_size": float(err[0]), "mae_x_position": float(err[1])}


def train(
    name: str,
    *,
    out: Optional[str | os.PathLike] = None,
    seed: int = 0,
    n_train: Optional[int] = None,
    epochs: Optional[int] = None,
    n_held_out: int = N_HELD_OUT,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train demo model ``name``, write ``<name>.pt`` and ``<name>.json`` to ``out`` (default:
    the package's ``_weights``), and return the metadata. ``n_train`` / ``epochs`` override the
    recipe (for quick tests; the stored command then says so); ``n_held_out``: size of the
    held-out draw."""
    if name not in CONFIGS:
        raise SalienceError(f"Unknown demo model {name!r}; trainable: {', '.join(sorted(CONFIGS))}.")
    cfg = dict(CONFIGS[name])
    if n_train is not None:
        cfg["n_train"] = int(n_train)
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    task, cue = cfg["task"], cfg["cue"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.time()
    try:
        torch.manual_seed(seed)
        model = ShapesNet(**cfg["arch"])
        train_set = data.shapes_batch(cfg["n_train"], seed, cue=cue)
        x, y = train_set.images, _targets(train_set, task)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
        steps = cfg["epochs"] * ((len(x) + cfg["batch"] - 1) // cfg["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps, pct_start=0.2)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(cfg["epochs"]):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), cfg["batch"]):
                idx = order[i:i + cfg["batch"]]
                loss = _loss(model(x[idx]), y[idx], task)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if verbose:
                print(f"[{name}] epoch {epoch + 1}/{cfg['epochs']} loss {total / len(x):.4f} "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr)
        model.eval()
        # Round to float16 as stored, so the figures below are those of the shipped weights.
        state = {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        held = HELD_OUT_OFFSET + seed
        results: dict[str, Any] = {}
        if cue is None:
            results.update(evaluate(model, data.shapes_batch(n_held_out, held), task))
        else:
            for c in (cue, "moved", None):
                r = evaluate(model, data.shapes_batch(n_held_out, held, cue=c), task)
                results.update({f"{k}_cue_{c or 'none'}": v for k, v in r.items()})
            results["accuracy"] = results[f"accuracy_cue_{cue}"]
    finally:
        torch.set_num_threads(threads)
    command = f"python -m salience.demo.train {name} --seed {seed}"
    if n_train is not None:
        command += f" --n-train {cfg['n_train']}"
    if epochs is not None:
        command += f" --epochs {cfg['epochs']}"
    meta: dict[str, Any] = {
        "name": name,
        "description": DEMOS[name],
        "task": task,
        "class_names": list(data.CLASSES) if task == "classification" else ["size", "x_position"],
        "arch": dict(model.config),
        "train_cue": cue,
        "held_out": {"seed": held, "n": n_held_out, **{k: round(v, 5) for k, v in results.items()}},
        "seed": seed,
        "n_train": cfg["n_train"],
        "epochs": cfg["epochs"],
        "batch_size": cfg["batch"],
        "optimizer": f"AdamW(lr={cfg['lr']}, weight_decay=1e-4), OneCycleLR",
        "train_command": command,
        "train_seconds": round(time.time() - t0, 1),
        "threads": 2,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "weights_dtype": "float16",
    }
    out_dir = Path(out) if out is not None else Path(__file__).resolve().parent / "_weights"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{name}.pt") as tmp:
        torch.save(state, tmp)
    atomic_write(out_dir / f"{name}.json", json.dumps(meta, indent=2).encode() + b"\n")
    if verbose:
        print(f"[{name}] held-out: {meta['held_out']}; wrote {out_dir / (name + '.pt')}", file=sys.stderr)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m salience.demo.train NAME [--out DIR] [--seed N]``."""
    p = argparse.ArgumentParser(prog="python -m salience.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(CONFIGS))
    p.add_argument("--out", default=None, help="output folder (default: the package's _weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="override the number of training images")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    a = p.parse_args(argv)
    train(a.name, out=a.out, seed=a.seed, n_train=a.n_train, epochs=a.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
