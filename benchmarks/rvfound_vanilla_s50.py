"""Session 50 review (rvfound): the model guard alone and vanilla on torch.jit.script(resnet50), 64 px, one thread,
ms per call (time.thread_time, median of 7 repeats). Run per tree:

    flock /tmp/bench.lock bash -c 'for r in 1 2 3; do for t in old merged; do \
        PYTHONPATH=/tmp/$t-rvfound/src taskset -c 1 python benchmarks/rvfound_vanilla_s50.py; done; done'
"""
import warnings, torch, torchvision, time, statistics
warnings.simplefilter("ignore")
torch.set_num_threads(1)
import salience
from salience._core.guard import model_guard
m = torch.jit.script(torchvision.models.resnet50().eval())
def t(f, n=30):
    f(); r=[]
    for _ in range(7):
        s=time.thread_time()
        for _ in range(n): f()
        r.append((time.thread_time()-s)/n*1e3)
    return statistics.median(r)
def g():
    with model_guard(m): pass
x = torch.randn(1, 3, 64, 64)
print("guard %.3f ms" % t(g), " vanilla %.2f ms" % t(lambda: salience.vanilla(m, x, torch.tensor([1])), 5))
