"""Session 49: timm's StdConv2d (weight standardised in its forward) under channels-last, the forward alone.

StdConv2d makes its weight each forward (``F.batch_norm`` over ``self.weight.reshape(1, out, -1)``, then
``reshape_as``): under salience's ``memory_format="channels_last"`` the parameter is channels-last (``Run.set_layout``),
so the reshape copies it to a contiguous tensor every forward and the convolution gets a contiguous weight beside a
channels-last input. Timed here: one forward of 8 images at 224 px, one thread, fp32 and under bf16 autocast, in
three layouts: contiguous; channels-last as salience runs it (input and 4-D parameters); the input alone channels-last;
for timm's ``resnetv2_50x1_bit`` (BiT: StdConv2d throughout, random weights) and torchvision's resnet50 (plain Conv2d)
beside it. Interleaved rounds (every case once a round, the order rotated), min / median / max seconds.

    flock /tmp/bench.lock taskset -c 1 python benchmarks/stdconv_cl_s49.py [ROUNDS] > benchmarks/stdconv-cl-s49.txt
"""
import statistics
import sys
import time

import timm
import torch
import torchvision

torch.set_num_threads(1)
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)
x = torch.rand(8, 3, 224, 224)
models = {"resnetv2_50x1_bit (StdConv2d)": timm.create_model("resnetv2_50x1_bit", pretrained=False).eval(),
          "resnet50 (Conv2d)": torchvision.models.resnet50().eval()}


def layout(model, params_cl):
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last if params_cl else torch.contiguous_format)


cases = [(name, prec, lay) for name in models for prec in ("fp32", "bf16") for lay in ("contiguous", "channels_last",
                                                                                        "input_cl_only")]
times = {c: [] for c in cases}
print(f"CPU: {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}; "
      f"load before: {open('/proc/loadavg').read().strip()}; torch {torch.__version__}, timm {timm.__version__}")
with torch.no_grad():
    for name, prec, lay in cases:  # a warm pass of each
        m = models[name]
        layout(m, lay == "channels_last")
        xi = x.contiguous(memory_format=torch.channels_last) if lay != "contiguous" else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            m(xi)
    for r in range(ROUNDS):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for name, prec, lay in order:
            m = models[name]
            layout(m, lay == "channels_last")
            xi = x.contiguous(memory_format=torch.channels_last) if lay != "contiguous" else x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                t0 = time.perf_counter()
                m(xi)
                times[(name, prec, lay)].append(time.perf_counter() - t0)
print(f"load after: {open('/proc/loadavg').read().strip()}; {ROUNDS} rounds")
print("| model | precision | layout | s min / median / max | median over contiguous |")
print("|---|---|---|---|---|")
for name, prec, lay in cases:
    v = times[(name, prec, lay)]
    base = statistics.median(times[(name, prec, "contiguous")])
    print(f"| {name} | {prec} | {lay} | {min(v):.3f} / {statistics.median(v):.3f} / {max(v):.3f} | "
          f"{statistics.median(v) / base:.3f} |")
