"""Session 44 (issue 15, memory): the peak bytes of live tensors of one salience call against a plain loop's, counted
by salience._core.engine.MemoryProbe (every storage an operator makes, until it is freed: deterministic, unlike the
process's VmHWM, which glibc's heap moves by tens of MiB from run to run), and each chunk's own peak.

    M=resnet50 S=224 B=8 LOOP=1 PYTHONPATH=src taskset -c 0 python benchmarks/perturbation_tensor_peak_s44.py \
        rise "dict(masks=3)" "dict(precision='bf16', memory_format='channels_last', fold_batchnorm=True)"

(the loop: B images a pass under the same autocast, contiguous; Score-CAM's loop: its capture and 4 channels.)
"""
import os, sys, torch, torchvision, warnings
warnings.simplefilter("ignore")
torch.set_num_threads(1)
method = sys.argv[1]; opts = eval(sys.argv[2]) if len(sys.argv) > 2 else {}
perf = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
B = int(os.environ.get("B", 8)); S = int(os.environ.get("S", 224))
torch.manual_seed(0)
model = getattr(torchvision.models, os.environ.get("M", "resnet50"))().eval()
x = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(1))
with torch.no_grad(): target = model(x).argmax(1)
import salience
from salience._core import engine
P = engine.MemoryProbe()
orig = engine._run
log = []
def run(compute, start, stop, **kw):
    if not log: P.pre = P.peak >> 20
    P.peak_before = P.peak; P.peak = P.current
    out = orig(compute, start, stop, **kw)
    log.append((stop - start, P.peak >> 20)); P.peak = max(P.peak, P.peak_before)
    return out
engine._run = run
with P, salience.performance(**perf):
    r = getattr(salience, method)(model, x, target, **opts)
print("peak MiB", P.peak / 2**20, "chunks", log[:5], "...", log[-2:], "first-chunk-start-peak", getattr(P, "pre", None))
if os.environ.get("LOOP"):
    from salience.methods.perturbation import rise_masks
    P2 = engine.MemoryProbe()
    rows = torch.arange(B)
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if perf.get("precision") == "bf16" else torch.autocast("cpu", enabled=False)
    with P2, torch.no_grad(), ac:
        if method == "rise":
            sal = torch.zeros(B, S, S)
            for i in range(opts.get("masks", 4)):
                m = rise_masks(i, i + 1, (S, S))[0]
                sal += model(x * m).softmax(1)[rows, target].view(-1, 1, 1) * m
        else:
            store = []
            h = model.get_submodule("layer1.0.conv1").register_forward_hook(lambda m, i, o: store.append(o))
            model(x); h.remove()
            acts = store[0]
            for k in range(4):
                m = torch.nn.functional.interpolate(acts[:, k:k+1], size=(S, S), mode="bilinear")
                model(x * m).softmax(1)
    print("loop peak MiB", P2.peak / 2**20)
