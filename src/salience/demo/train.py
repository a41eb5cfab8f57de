"""Train the demo models of :mod:`salience.zoo` on :mod:`salience.data` shapes, reproducibly.

``python -m salience.demo.train shapes|shapes-regression|shapes-cue|shapes-vit [--out DIR] [--seed 0]``

Seeded (data, initialization, shuffling), two CPU threads, a few minutes per model on two
cores. The model is evaluated on a fresh held-out draw (seed ``10_000 + seed``) *after* its
weights were rounded to float16 as stored; weights (``<name>.pt``) and metadata (``<name>.json``)
are written atomically to ``DIR`` (default: the package's ``_weights`` folder).

:func:`demo_train_fn` gives the same training loop as a ``train_fn(images, labels) -> model`` for
the data randomization test of ``salience evaluate``.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from salience.demo import data
from salience._core.args import FullFlags
from salience._core.errors import SalienceError
from salience._core.files import atomic_path, atomic_write
from salience.demo.zoo import DEMOS, ShapesNet, build

__all__ = ["CONFIGS", "train", "evaluate", "demo_train_fn", "main"]

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
    "shapes-vit": dict(
        task="classification", cue=None, architecture="ShapesViT",
        arch=dict(num_outputs=5, patch=8, dim=48, depth=4, heads=4, mlp=96, stem=True),
        n_train=24_000, epochs=8, lr=1e-3, batch=64, flush_denormal=True,
    ),
}
"""Training recipe of each demo model (``architecture``: a key of :data:`salience.demo.zoo.ARCHITECTURES`,
``ShapesNet`` when absent; ``flush_denormal``: train with ``torch.set_flush_denormal(True)``. Without
it the ViT's CPU epochs went from 35 s to over 6 minutes late in training, as its attention sharpened;
denormal floats (softmax weights underflowing) would do that on x86, but the cause was not proven)."""

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


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int, batch: int, lr: float,
         order: Callable[[], torch.Tensor], one_cycle: bool = False,
         on_epoch: Optional[Callable[[int, float], None]] = None) -> None:
    """The training loop of every demo recipe: AdamW (weight decay 1e-4, with a OneCycle schedule
    when ``one_cycle``) over mini-batches of ``batch`` in the order ``order()`` draws each epoch;
    ``on_epoch(epoch, mean loss)`` after each epoch. Leaves the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = None
    if one_cycle:
        steps = epochs * ((len(x) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    for epoch in range(epochs):
        perm = order()
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(x))
    model.eval()


def _held_out(model: nn.Module, task: str, cue: Optional[str], held: int, n_held_out: int) -> dict[str, Any]:
    """The held-out figures of a trained model; for a cue model, with the cue as in training, moved, absent."""
    results: dict[str, Any] = {}
    if cue is None:
        results.update(evaluate(model, data.shapes_batch(n_held_out, held), task))
    else:
        for c in (cue, "moved", None):
            r = evaluate(model, data.shapes_batch(n_held_out, held, cue=c), task)
            results.update({f"{k}_cue_{c or 'none'}": v for k, v in r.items()})
        results["accuracy"] = results[f"accuracy_cue_{cue}"]
    return results


def _metadata(name: str, cfg: dict[str, Any], model: nn.Module, *, seed: int, held: int, n_held_out: int,
              results: dict[str, Any], command: str, seconds: float) -> dict[str, Any]:
    """What ``<name>.json`` says about a trained demo model."""
    return {
        "name": name,
        "description": DEMOS[name],
        "task": cfg["task"],
        "class_names": list(data.CLASSES) if cfg["task"] == "classification" else ["size", "x_position"],
        "architecture": cfg.get("architecture", "ShapesNet"),
        "arch": dict(getattr(model, "config")),
        "train_cue": cfg["cue"],
        "held_out": {"seed": held, "n": n_held_out, **{k: round(v, 5) for k, v in results.items()}},
        "seed": seed,
        "n_train": cfg["n_train"],
        "epochs": cfg["epochs"],
        "batch_size": cfg["batch"],
        "optimizer": f"AdamW(lr={cfg['lr']}, weight_decay=1e-4), OneCycleLR",
        "train_command": command,
        "train_seconds": round(seconds, 1),
        "threads": 2,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "weights_dtype": "float16",
        "flush_denormal": bool(cfg.get("flush_denormal", False)),
    }


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
    flush = cfg.get("flush_denormal", False) and torch.set_flush_denormal(True)
    t0 = time.time()
    try:
        torch.manual_seed(seed)
        model = build(cfg["arch"], cfg.get("architecture", "ShapesNet"))
        train_set = data.shapes_batch(cfg["n_train"], seed, cue=cue)
        x, y = train_set.images, _targets(train_set, task)
        gen = torch.Generator().manual_seed(seed)

        def report(epoch: int, loss: float) -> None:
            if verbose:
                print(f"[{name}] epoch {epoch + 1}/{cfg['epochs']} loss {loss:.4f} "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr)

        _fit(model, x, y, lambda out, t: _loss(out, t, task), epochs=cfg["epochs"], batch=cfg["batch"],
             lr=cfg["lr"], order=lambda: torch.randperm(len(x), generator=gen), one_cycle=True, on_epoch=report)
        # Round to float16 as stored, so the figures below are those of the shipped weights.
        state = {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        held = HELD_OUT_OFFSET + seed
        results = _held_out(model, task, cue, held, n_held_out)
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)
    command = f"python -m salience.demo.train {name} --seed {seed}"
    if n_train is not None:
        command += f" --n-train {cfg['n_train']}"
    if epochs is not None:
        command += f" --epochs {cfg['epochs']}"
    meta = _metadata(name, cfg, model, seed=seed, held=held, n_held_out=n_held_out, results=results,
                     command=command, seconds=time.time() - t0)
    out_dir = Path(out) if out is not None else Path(__file__).resolve().parent / "_weights"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{name}.pt") as tmp:
        torch.save(state, tmp)
    atomic_write(out_dir / f"{name}.json", json.dumps(meta, indent=2).encode() + b"\n")
    if verbose:
        print(f"[{name}] held-out: {meta['held_out']}; wrote {out_dir / (name + '.pt')}", file=sys.stderr)
    return meta


def demo_train_fn(epochs: int = 4, seed: int = 0, lr: float = 4e-3, batch: int = 64
                  ) -> Callable[[torch.Tensor, torch.Tensor], nn.Module]:
    """A ``train_fn(images, labels) -> model`` for the data randomization test
    (:func:`salience.evidence.data_randomization`, ``salience evaluate --data-randomization``): a
    fresh :class:`salience.demo.zoo.ShapesNet` trained for ``epochs`` with AdamW (seeded, scoped
    RNG: the global RNG is left as it was)."""

    def train_fn(images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ShapesNet(num_outputs=int(labels.max()) + 1, widths=(16, 32, 48, 64)).to(images.device)
            n = images.shape[0]
            _fit(model, images, labels, lambda out, t: _loss(out, t, "classification"), epochs=epochs, batch=batch,
                 lr=lr, order=lambda: torch.randperm(n, device=images.device))
        return model

    return train_fn


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m salience.demo.train NAME [--out DIR] [--seed N]``."""
    p = FullFlags(prog="python -m salience.demo.train", description=__doc__.split("\n\n")[0])
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
