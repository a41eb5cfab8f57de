"""vit_b_16 at 144 px, random weights, 64 items (integrated gradients of 2 images): bare forward + input gradient in
passes of [16]*4 (main's plan), [24, 24, 16] (this tree's plan under a 1 GiB budget: the weighty cap 32 bounded by
the budget's 26 items), [32, 32]. One thread, time.thread_time, rounds interleaved (the order rotates), a warm-up pass
of each first.

    python benchmarks/chunk_vit144_s60.py 3   # rounds; prints the table of benchmarks/chunk-vit144-s60.md
"""
import time, sys, statistics, torch, torchvision
torch.set_num_threads(1); torch.manual_seed(0)
m = torchvision.models.vit_b_16(weights=None, image_size=144).eval()
for p in m.parameters(): p.requires_grad_(False)
x = torch.rand(64, 3, 144, 144)
plans = {"4x16": [16]*4, "24,24,16": [24, 24, 16], "2x32": [32, 32]}
def run(sizes):
    t0 = time.thread_time(); s = 0
    for n in sizes:
        xi = x[s:s+n].clone().requires_grad_(True); s += n
        out = m(xi)[:, 1].sum()
        torch.autograd.grad(out, xi)
    return time.thread_time() - t0
for k in plans: run(plans[k][:1])
res = {k: [] for k in plans}
rounds = int(sys.argv[1])
keys = list(plans)
for r in range(rounds):
    order = keys[r % 3:] + keys[:r % 3]
    for k in order:
        res[k].append(run(plans[k]))
    print(r, open("/proc/loadavg").read().strip(), {k: round(v[-1], 2) for k, v in res.items()}, flush=True)
for k, v in res.items():
    print(f"{k:10s} min {min(v):.2f} med {statistics.median(v):.2f} max {max(v):.2f} s  ratio-med-to-4x16 {statistics.median(v)/statistics.median(res['4x16']):.3f}", flush=True)
