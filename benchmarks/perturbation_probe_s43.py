"""Session 43 single-sample probes (one fresh process each, one thread): Ablation-CAM at layer1.0.conv1 (abl, abl8: chunk=8),
salience occlusion (occ) and Captum Occlusion at perturbations_per_eval=N (capN) under bf16 autocast + channels-last,
resnet50, 8 images at 224 px, window 32 stride 16. Run as: flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation_probe_s43.py cap1"""
import time, sys, torch, torchvision, salience, warnings
warnings.simplefilter("ignore")
torch.set_num_threads(1)
torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    t = m(x).argmax(1)
what = sys.argv[1]
t0 = time.perf_counter()
if what.startswith("abl"):
    c = int(what[3:]) if len(what) > 3 else None
    with salience.performance(precision="bf16", memory_format="channels_last"):
        salience.ablationcam(m, x, t, layer="layer1.0.conv1", chunk=c)
elif what == "occ":
    with salience.performance(precision="bf16", memory_format="channels_last"):
        salience.occlusion(m, x, t, window=32, stride=16)
else:
    from captum.attr import Occlusion
    ppe = int(what[3:])
    m = m.to(memory_format=torch.channels_last); xc = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Occlusion(m).attribute(xc, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), target=t, baselines=0.0, perturbations_per_eval=ppe)
print(what, round(time.perf_counter() - t0, 2), flush=True)
