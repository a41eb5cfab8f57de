"""Session 50 review of ``guard.Found`` (rvfound): its cost per call and per pass, the merged tree (7dbdbc4) against
the review's fixes, and the model guard's per call on nested containers.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/rvfound_s50.py --old /tmp/merged-rvfound/src --new src \
        --rounds 5 --repeats 7 --out benchmarks/rvfound-s50.json

The harness is benchmarks/guard_s48.py's (each round one process per tree, the order turned every round, one thread;
units interleaved in a rotating order, ``time.thread_time``, the median of the repeats). Models, random weights, eval:
``script_r50`` ``torch.jit.script(resnet50)``; ``r50`` torchvision's resnet50; ``many`` 2000 modules of the user's each
beside a Linear; ``deque1000`` a Linear in a module holding a deque of 1000 one-item dicts; ``list1024`` the same with a
list of 1024 numbers. Units:

- ``found_M``: ``Found(model)`` and its exit inside the model guard (as every method calls it: the guard's copies
  held);
- ``pass_M``: ``Found.before_pass()`` where nothing changed;
- ``guard_M``: ``with model_guard(model): pass``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guard_s48  # noqa: E402 - the harness


def child(repeats: int) -> dict:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    from collections import deque

    import torch
    import torchvision
    from torch import nn

    import salience
    from salience._core.guard import Found, model_guard

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Leaf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    class Holder(nn.Module):
        def __init__(self, win: object) -> None:
            super().__init__()
            self.lin, self.win = nn.Linear(2, 2), win

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"script_r50": torch.jit.script(torchvision.models.resnet50().eval()),
                  "r50": torchvision.models.resnet50(),
                  "many": nn.Sequential(*(Leaf() for _ in range(2000))),
                  "deque1000": Holder(deque(({"a": i} for i in range(1000)), maxlen=1000)),
                  "list1024": Holder(list(range(1024)))}
    units: dict = {}
    for name, m in models.items():
        m.eval()

        def found_call(m: nn.Module = m) -> None:
            with model_guard(m), Found(m):
                pass

        def guard_only(m: nn.Module = m) -> None:
            with model_guard(m):
                pass

        with model_guard(m):  # the pass unit's record taken inside the guard, the model in eval mode after
            units[f"pass_{name}"] = (Found(m).before_pass, 200)
        units[f"found_{name}"] = (found_call, 5 if name == "many" else 30)
        units[f"guard_{name}"] = (guard_only, 5 if name == "many" else 30)
    return guard_s48.timed(units, repeats, salience.__file__)


UNITS = tuple(f"{u}_{m}" for m in ("script_r50", "r50", "many", "deque1000", "list1024")
              for u in ("found", "pass", "guard"))

if __name__ == "__main__":
    sys.exit(guard_s48.main(__file__, child, UNITS, __doc__))
