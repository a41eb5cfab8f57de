"""Session 50 (found): ``guard.Found``'s cost per pass and per call (and the model guard's per call), before and after
its record is compared as whole lists in C, against the pass itself.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/found_s50.py --old /tmp/old-found50/src --new src \
        --rounds 5 --repeats 7 --out benchmarks/found-s50.json

The harness is benchmarks/guard_s48.py's (each round one process per salience tree, the order turned every round, one
thread; each process times its units interleaved in a rotating order, per call, ``time.thread_time``, the median of
its repeats). Models, random weights, eval mode: ``hfvit`` (transformers' ``ViTForImageClassification`` from a
``ViTConfig`` of ViT-S's sizes: 384 wide, 12 layers, 6 heads, MLP 1536, 224 px, patch 16), ``timm`` (timm's
``vit_small_patch16_224``), ``r50`` (torchvision's resnet50), ``many`` (2000 modules of the user's, each a Linear
beside it), ``many_c`` (the same, each with a list of 3 and a dict of 2). The units, for each model ``M``:

- ``pass_M``: ``Found.before_pass()`` where nothing changed (the model in eval mode, as the guard leaves it);
- ``found_M``: ``Found(model)`` (the record, once per call) and its exit (``before_pass`` once more);
- ``guard_M`` (hfvit, timm, r50): ``with model_guard(model): pass``, the guard alone per call;
- ``fwd_M`` (hfvit, timm, r50): the forward of one image at 224 px under ``torch.no_grad()`` (the pass itself);
- ``guard_list1024``: the guard on resnet18 (64 px) wrapped in a module holding a list of 1024 numbers (session 50
  looks at a container's items for containers inside it: its cost per call);
- ``pass_script_r50`` / ``found_script_r50``: the same on ``torch.jit.script(resnet50)`` (the old tree skips it: near
  nothing, and its state was not put back).
Prints a table (min / median / max over the rounds, per tree) and writes it as JSON.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import guard_s48  # noqa: E402 - the harness


def child(repeats: int) -> dict:
    # benchmarks/transformers.py (a benchmark of its own) shadows the library: this folder off the path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import timm
    import torch
    import torchvision
    import transformers
    from torch import nn

    import salience
    from salience._core.guard import Found, model_guard

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)

    class Leaf(nn.Module):
        def __init__(self, c: bool) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            if c:
                self.hist, self.cfg = [1, 2, 3], {"a": 1, "b": 2}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    class Holder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.hist = inner, list(range(1024))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"hfvit": transformers.ViTForImageClassification(cfg),
                  "timm": timm.create_model("vit_small_patch16_224", pretrained=False),
                  "r50": torchvision.models.resnet50(),
                  "many": nn.Sequential(*(Leaf(False) for _ in range(2000))),
                  "many_c": nn.Sequential(*(Leaf(True) for _ in range(2000))),
                  "script_r50": torch.jit.script(torchvision.models.resnet50().eval())}
    for m in models.values():
        m.eval()
    held = Holder(torchvision.models.resnet18()).eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def guard_only(m: nn.Module) -> None:
        with model_guard(m):
            pass

    def found_call(m: nn.Module) -> None:
        with Found(m):
            pass

    def forward(m: nn.Module) -> None:
        with torch.no_grad():
            m(x)

    units: dict = {}
    for name, m in models.items():  # in eval mode, as the guard leaves them (not held: the guard's own units time it)
        units[f"pass_{name}"] = (Found(m).before_pass, 200)
        units[f"found_{name}"] = (lambda m=m: found_call(m), 5 if name.startswith("many") else 50)
    for name in ("hfvit", "timm", "r50"):
        units[f"guard_{name}"] = (lambda m=models[name]: guard_only(m), 20)
        units[f"fwd_{name}"] = (lambda m=models[name]: forward(m), 1)
    units["guard_list1024"] = (lambda: guard_only(held), 50)
    return guard_s48.timed(units, repeats, salience.__file__)


UNITS = tuple(f"{u}_{m}" for m in ("hfvit", "timm", "r50") for u in ("pass", "found", "guard", "fwd")) + \
    ("pass_many", "found_many", "pass_many_c", "found_many_c", "guard_list1024", "pass_script_r50",
     "found_script_r50")

def _check_flags() -> None:
    """This script's flags, checked before the rounds start (the harness's, benchmarks/guard_s48.py's ``main``, which
    parses them itself)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="the old tree's src folder")
    ap.add_argument("--new", help="the new tree's src folder")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", help="the JSON written")
    ap.add_argument("--child", action="store_true", help="one process's units (the harness's)")
    ap.parse_args()


if __name__ == "__main__":
    _check_flags()
    sys.exit(guard_s48.main(__file__, child, UNITS, __doc__))
