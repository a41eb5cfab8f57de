"""Passes of a multiple of 8 against the even splits that a small-pass cap of 40 / 48 gives (engine.gradient_chunk_cap
on items of 394-786 KB): bare forward + input gradient of the same 256 items (integrated gradients' 32 steps of 8
images).

    python benchmarks/chunk_split_s60.py 5   # rounds; prints the table of benchmarks/chunk-split-s60.md

The tiny CNN of benchmarks/fixed_cost_s59.py at 80 px (539 KB an item by the probe: cap 40, 37 x 6 + 34; a cap of 32
gives 8 x 32) and torchvision's resnet18 at 32 px (451 KB: cap 48, 43 x 5 + 41; main 8 x 32). Random weights, one
thread, ``time.thread_time``, each unit the best of 3 runs after a warm-up, rounds interleaved (the order
alternates)."""
import statistics
import sys
import time

import torch
import torchvision

torch.set_num_threads(1)


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


CASES = [("tiny CNN, 80 px", _tiny, 80, {"8 x 32": [32] * 8, "6 x 37 + 34": [37] * 6 + [34]}),
         ("resnet18, 32 px", _resnet18, 32, {"8 x 32": [32] * 8, "5 x 43 + 41": [43] * 5 + [41]})]


def _run(model, x, sizes):
    best = float("inf")
    for _ in range(3):
        t0, s = time.thread_time(), 0
        for n in sizes:
            xi = x[s:s + n].clone().requires_grad_(True)
            s += n
            torch.autograd.grad(model(xi)[:, 1].sum(), xi)
        best = min(best, time.thread_time() - t0)
    return best


def main(rounds: int) -> None:
    print("| model | passes | CPU s min / median / max | median over 8 x 32's |\n|---|---|---|---|")
    loads = []
    for name, make, px, plans in CASES:
        model = make()
        for p in model.parameters():
            p.requires_grad_(False)
        x = torch.rand(256, 3, px, px, generator=torch.Generator().manual_seed(0))
        for sizes in plans.values():
            _run(model, x, sizes[:2])
        res = {k: [] for k in plans}
        keys = list(plans)
        for r in range(rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                res[k].append(_run(model, x, plans[k]))
            loads.append(open("/proc/loadavg").read().strip())
        base = statistics.median(res["8 x 32"])
        for k, v in res.items():
            print(f"| {name} | {k} | {min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f} | "
                  f"{statistics.median(v) / base:.3f} |", flush=True)
    print("\n`/proc/loadavg` after each round: " + "; ".join(f"`{s}`" for s in loads))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
