"""Session 49 (record): the model guard's cost per call before and after it copies containers' contents (and
inference-tensor attributes) of modules not from torch.nn; and its per-module records (``guard.ModuleState``) against
the shared record (``guard.record_state``) on the same modules, for whether they can be one class.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/guard_s49.py --old /tmp/old-record49/src --new src \
        --rounds 6 --repeats 15 --out benchmarks/guard-s49.json

The harness is benchmarks/guard_s48.py's (each round one process per salience tree, the order turned every round, one
thread; each process times its units interleaved in a rotating order, per call, ``time.thread_time``, the median of
its repeats); the units:

- ``guard``: ``with model_guard(model): pass`` on torchvision's resnet18 (random weights, seed 0), the guard alone;
- ``guard_containers``: the same on resnet18 wrapped in a module holding a list of 64 items, a dict of 16 and a set of
  8, and an empty list on each of its 8 BasicBlocks (11 containers, which the new guard copies and compares);
- ``vanilla16``: ``salience.vanilla(model, xs, targets, reduce=None)`` on 16 images at 64 px (the profile_s47_sg1 unit);
- ``bare16``: the bare pass of the same 16 (``engine_speed.bare``): ``vanilla16 - bare16`` is salience's cost around it;
- ``take_states``: ``guard.ModuleState(m, None)`` for each of resnet18's 62 modules (the guard's records, made and
  thrown away: the work of ``_Entry.entry`` and ``take``);
- ``record_state``: ``guard.record_state(modules)`` on the same modules (the shared record: every module's attributes
  and buffers with copies, no plain-layer path).
Prints a table (min / median / max over the rounds, per tree) and writes it as JSON.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guard_s48  # noqa: E402 - the harness


def child(repeats: int) -> dict:
    import torch
    from torch import nn

    from auto_declines_s44 import build
    from engine_speed import bare

    import salience
    from salience._core import guard
    from salience._core.guard import model_guard

    torch.set_num_threads(1)
    model, frozen = build("resnet18", 64), build("resnet18", 64)
    for p in frozen.parameters():
        p.requires_grad_(False)

    class Holder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.hist = list(range(64))
            self.cfg = {f"k{i}": i for i in range(16)}
            self.tags = set(range(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    held = Holder(build("resnet18", 64)).eval()
    for m in held.modules():
        if type(m).__name__ == "BasicBlock":
            m.trace = []
    modules = list(model.modules())
    x = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tgt = model(x).argmax(1)

    def guard_only(m: nn.Module) -> None:
        with model_guard(m):
            pass

    units = {
        "guard": (lambda: guard_only(model), 50),
        "guard_containers": (lambda: guard_only(held), 50),
        "vanilla16": (lambda: salience.vanilla(model, x, tgt, reduce=None), 1),
        "bare16": (lambda: bare(frozen, x, tgt, 16), 1),
        "take_states": (lambda: [guard.ModuleState(m, None) for m in modules], 50),
        "record_state": (lambda: guard.record_state(modules), 50),
    }
    return guard_s48.timed(units, repeats, salience.__file__)


UNITS = ("guard", "guard_containers", "vanilla16", "bare16", "take_states", "record_state")

if __name__ == "__main__":
    sys.exit(guard_s48.main(__file__, child, UNITS, __doc__))
