"""Minor page faults and time of the second call in a process (the first a warm-up), resnet50, 8 images at 224 px,
bf16 + channels-last, one thread: ``PYTHONPATH=src flock /tmp/bench.lock taskset -c 1 python
benchmarks/perturbation_faults_s42.py METHOD ALLOCATOR`` (METHOD scorecam / rise / ablationcam, ALLOCATOR default /
reuse; one process each: "reuse" is not undone in a process). Figures in docs/performance.md (issue 15, session 42)."""
import resource, sys, time, warnings, torch, torchvision
import salience
torch.set_num_threads(1)
method, alloc = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
def call():
    with salience.performance(allocator=alloc, memory_format="channels_last", precision="bf16"):
        if method == "scorecam": return salience.scorecam(m, x, 1, layer="layer1.0.conv1")
        if method == "rise": return salience.rise(m, x, 1, masks=64)
        if method == "ablationcam": return salience.ablationcam(m, x, 1, layer="layer1.0.conv1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    call()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    call()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(f"{method} allocator={alloc}: {t1-t0:.2f} s, minflt {r1.ru_minflt-r0.ru_minflt}, sys {r1.ru_stime-r0.ru_stime:.2f} s")
