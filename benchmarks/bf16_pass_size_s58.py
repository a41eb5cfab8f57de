"""Session 58: does the size of a bf16 pass change its cost per image on this CPU? resnet50 (random weights), 224 px,
channels-last, CPU bf16 autocast, inference mode, one thread: 16 images in passes of 4, 8, 16 and 2 (bare passes), and
RISE of 16 masks on 8 images with chunk=4 and chunk=8, alternating rounds. Prints each sample and the median.

    PYTHONPATH=src python benchmarks/bf16_pass_size_s58.py [ROUNDS] > benchmarks/bf16-pass-size-s58.txt
"""
import time, sys, torch, torchvision, statistics
import salience
torch.manual_seed(0); torch.set_num_threads(1)
m = torchvision.models.resnet50().eval()
for p in m.parameters(): p.requires_grad_(False)
x = torch.rand(8, 3, 224, 224)
mc = m.to(memory_format=torch.channels_last)
def bare(b):
    xs = x[:b].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        t = time.perf_counter()
        for _ in range(16 // b):
            mc(xs if b <= 8 else torch.cat([xs, xs])[:b])
        return time.perf_counter() - t
def rise(chunk):
    t = time.perf_counter()
    salience.rise(m, x, 1, masks=16, chunk=chunk, precision="bf16", memory_format="channels_last")
    return time.perf_counter() - t
bare(4); bare(8); rise(8)
res = {}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for k, f in [("bare4x4", lambda: bare(4)), ("bare8x2", lambda: bare(8)), ("bare16x1", lambda: bare(16)), ("bare2x8", lambda: bare(2)),
                 ("rise c4", lambda: rise(4)), ("rise c8", lambda: rise(8))]:
        res.setdefault(k, []).append(f())
for k, v in res.items():
    print(f"{k:10s} " + " ".join(f"{s:.3f}" for s in v), f"median {statistics.median(v):.3f}")
