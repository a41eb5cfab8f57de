"""The folded copy (``fold_batchnorm``) is made by a torch.fx trace, and fx patches ``nn.Module.__call__`` and
``__getattr__`` for the whole process while it traces: another thread's model call in that time raised ``NameError``
or got proxies back (found by the review of occlusion's region-limited passes, session 44, which fixed its own
trace; the fold's trace had the same fault). Both traces now use :class:`salience._core.folding.ThisThreadTracer`.
:func:`beside_other_threads` is the harness both tests use."""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Sequence

import torch
from torch import nn

from salience._core.folding import _fold


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def beside_other_threads(models: Sequence[nn.Module], x: torch.Tensor, work: Callable[[], Any]) -> tuple[Any, list]:
    """``work()``'s result, run while one thread per model calls it on ``x`` over and over (threads switched every
    microsecond, so that they run while a trace is on), and what went wrong in those calls: an exception, or an
    output that is not the tensor the model gave before."""
    with torch.no_grad():
        refs = {id(m): m(x) for m in models}
    errors: list = []
    stop = threading.Event()

    def worker(model: nn.Module) -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    y = model(x)
                if not isinstance(y, torch.Tensor) or not torch.equal(y, refs[id(model)]):
                    errors.append(("wrong output", type(y).__name__))
            except Exception as e:  # noqa: BLE001 - recorded, asserted by the caller
                errors.append((type(e).__name__, str(e)[:80]))

    threads = [threading.Thread(target=worker, args=(m,)) for m in models]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        result = work()
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    return result, errors


def test_folding_leaves_other_threads_models_alone():
    torch.manual_seed(0)
    other, mine = small(), small()
    x = torch.randn(1, 3, 16, 16)
    folds, errors = beside_other_threads((other, mine), x, lambda: [_fold(mine) for _ in range(20)])
    assert not errors, (len(errors), errors[:3])
    with torch.no_grad():
        ref = mine(x)
    for folded in folds:
        assert not isinstance(folded, str), folded
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert torch.allclose(folded(x), ref, rtol=1e-5, atol=1e-6)
