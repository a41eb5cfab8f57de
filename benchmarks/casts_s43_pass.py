"""Session 43: what one bf16 pass of resnet50 pays for autocast's per-pass weight casts, one process, under the lock.

    flock /tmp/bench.lock taskset -c 1 env PYTHONPATH=src python benchmarks/casts_s43_pass.py

Prints the time of the 55 bf16 casts of resnet50's weights (its convolutions' and the classifier's weight and bias)
and of a forward + input gradient (bf16 autocast, channels-last, parameters frozen) of 1 image at 32 and 224 px,
with autocast's per-pass casts (main) against the same pass served the call's cached casts
(salience._core.casts.WeightCasts), 6 alternating rounds of 10 passes, median and min per pass.
(benchmarks/casts-s43-pass.md also has a first run of 4 images at 224 px, made with an earlier version of this script.)
"""
import time, statistics, torch, torchvision
from contextlib import nullcontext
from salience._core.casts import CastCache, WeightCasts
torch.set_num_threads(1)
m = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
for p in m.parameters(): p.requires_grad_(False)
ws = [p for p in m.parameters() if p.dim() > 1 or p.numel() == 1000]
def casts():
    t = time.perf_counter()
    for _ in range(10): [p.to(torch.bfloat16) for p in ws]
    return (time.perf_counter() - t) / 10
print("55 casts (ms):", [round(casts() * 1e3, 1) for _ in range(5)])
for size, n in ((32, 1), (224, 1)):  # (images at 4: about 300 ms a pass, the saving within the noise)
    x = torch.rand(n, 3, size, size).contiguous(memory_format=torch.channels_last)
    cache = CastCache()
    def run(cached, k=10):
        t = time.perf_counter()
        for _ in range(k):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16), (WeightCasts(cache) if cached else nullcontext()):
                out = m(xi)
            torch.autograd.grad(out[:, 1].float().sum(), xi)
        return (time.perf_counter() - t) / k * 1e3
    run(False, 2); run(True, 2)
    a, b = [], []
    for r in range(6):
        if r % 2: b.append(run(True)); a.append(run(False))
        else: a.append(run(False)); b.append(run(True))
    print(f"{n} image {size}px fwd+bwd ms: per-pass casts {statistics.median(a):.1f} (min {min(a):.1f}), cached {statistics.median(b):.1f} (min {min(b):.1f})")
