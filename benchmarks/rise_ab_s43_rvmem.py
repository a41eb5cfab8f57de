"""RISE A/B (review of wt-permem-s43): one process, two timed calls; run with PYTHONPATH=<a src> under flock/taskset.
Usage: python benchmarks/rise_ab_s43_rvmem.py TAG. Results: benchmarks/rise-resnet50-4images-bf16-fold-s43-rvmem-ab.md."""
import sys, time, warnings, json, resource
import torch, torchvision, salience
warnings.simplefilter("ignore")
torch.set_num_threads(1)
torch.manual_seed(0)
model = torchvision.models.resnet50().eval()
x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
out = []
for _ in range(2):
    t = time.perf_counter()
    with salience.performance(precision="bf16", memory_format="channels_last", fold_batchnorm=True):
        m = salience.rise(model, x, target=1, masks=64)
    out.append(time.perf_counter() - t)
print(json.dumps({"tag": sys.argv[1], "first": out[0], "second": out[1], "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
