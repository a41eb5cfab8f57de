"""Session 56: one fresh process timing RISE (64 masks) or Ablation-CAM (layer1.0.conv1) of salience on resnet18, 8 images
at 64 px, one thread: one call (the probe, the caches), then five calls, their seconds sorted.

    PYTHONPATH=<tree>/src flock /tmp/bench.lock taskset -c 1 python benchmarks/perturbation_ab_s56.py LABEL METHOD

run alternately for two trees (the order swapped in the second of three rounds).
"""
import torch, torchvision, salience, warnings, time, sys
warnings.simplefilter("ignore"); torch.set_num_threads(1); torch.manual_seed(0)
m = torchvision.models.resnet18().eval(); x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
f = {"rise": lambda: salience.rise(m, x, masks=64), "ablationcam": lambda: salience.ablationcam(m, x, layer="layer1.0.conv1")}[sys.argv[2]]
f()
ts = []
for _ in range(5):
    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
print(sys.argv[1], sys.argv[2], sorted(ts))
