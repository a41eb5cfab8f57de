"""Score-CAM / Ablation-CAM, one warm call on resnet50, 8 images at 224 px, layer1.0.conv1, fp32, one thread: main's code against an older one (PYTHONPATH); run as in benchmarks/cam-ab-s46.md."""
import sys, time, torch, torchvision, salience
torch.set_num_threads(1)
method = sys.argv[1]
m = torchvision.models.resnet50().eval()
x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
f = getattr(salience, method)
f(m, x[:1], layer="layer1.0.conv1")  # warm
t = time.perf_counter(); f(m, x, layer="layer1.0.conv1"); print(f"{time.perf_counter() - t:.3f}")
