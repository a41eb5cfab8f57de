"""Session 45 (issue 15, memory): WHICH tensors are alive at the peak of one salience call, against a plain loop's.

Like session 44's perturbation_tensor_peak_s44.py (salience._core.engine.MemoryProbe: every storage an operator makes
is counted until it is freed; deterministic), but at each new peak the live storages are listed with the operator that
made them, their shape and the phase the call was in (``clean``: before the engine's first chunk; ``chunk N``), so
that each MiB between salience and the loop can be named. The call is stopped after CHUNKS chunks (every later
chunk has the first's shape: the peak is reached by then; the whole of Score-CAM at ``layer1.0.conv1`` is 64 chunks).

    M=resnet50 S=224 B=8 CHUNKS=3 PYTHONPATH=src taskset -c 0 python benchmarks/perturbation_tensor_peak_s45.py \
        scorecam "dict(layer='layer1.0.conv1')" "dict()"

argv: method, its options, salience.performance options (``dict()``: fp32 defaults). LOOP=1: the plain loop's peak
too (B images a pass under the same autocast, contiguous; Score-CAM's: its capture and 4 channels; RISE's 3 masks;
Ablation-CAM's: a hook zeroing channel k, 4 channels; occlusion's: 4 windows). Prints one JSON line per run.
"""
import collections
import json
import os
import sys
import warnings

import torch
import torchvision

warnings.simplefilter("ignore")
torch.set_num_threads(1)
method = sys.argv[1]
opts = eval(sys.argv[2]) if len(sys.argv) > 2 else {}
perf = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
B = int(os.environ.get("B", 8))
S = int(os.environ.get("S", 224))
CHUNKS = int(os.environ.get("CHUNKS", 3))
MIN_KIB = int(os.environ.get("MIN_KIB", 256))  # the listing's smallest group (session 46: 64 or 8)
BYTES = bool(os.environ.get("BYTES"))  # session 47: sizes in bytes (every group with MIN_KIB=0), the peak too
torch.manual_seed(0)
model = getattr(torchvision.models, os.environ.get("M", "resnet50"))().eval()
x = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    target = model(x).argmax(1)

import salience  # noqa: E402
from salience._core import engine  # noqa: E402


class Listing(engine.MemoryProbe):
    """MemoryProbe that remembers, per live storage, the operator and shape that made it, and lists them at the
    peak."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict = {}
        self.phase = "clean"
        self.at_peak: list = []
        self.peak_phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = set(self._live)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                k = engine._storage_key(t)
                if k in self._live and k not in before:
                    self.made[k] = (str(func.overloadpacket.__name__), tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                    self.phase)
        if self.current >= self.peak and self.current > 0:
            self.at_peak = [(n, *self.made.get(k, ("?", (), "?", "?"))) for k, (_, n) in self._live.items()]
            self.peak_phase = self.phase
        return out


class Stop(Exception):
    pass


def summary(listing: list) -> list:
    groups: dict = collections.defaultdict(lambda: [0, 0])
    for n, op, shape, dtype, phase in listing:
        key = f"{op} {dtype} {shape} [{phase}]"
        groups[key][0] += n
        groups[key][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return [(v[0] if BYTES else round(v[0] / 2 ** 20, 2), v[1], k) for k, v in rows if v[0] >= MIN_KIB << 10]


P = Listing()
orig = engine._run
chunks: list = []


def run(compute, start, stop, **kw):
    P.phase = f"chunk {len(chunks)}"
    out = orig(compute, start, stop, **kw)
    chunks.append(stop - start)
    P.phase = "between chunks"
    if len(chunks) >= CHUNKS:
        raise Stop
    return out


engine._run = run
try:
    with P, salience.performance(**perf):
        getattr(salience, method)(model, x, target, **opts)
except Stop:
    pass
engine._run = orig
result = {"method": method, "opts": sys.argv[2] if len(sys.argv) > 2 else "", "perf": sys.argv[3] if len(sys.argv) > 3 else "",
          "peak_mib": round(P.peak / 2 ** 20, 2), "peak_bytes": P.peak, "peak_phase": P.peak_phase, "chunks": chunks,
          "at_peak": summary(P.at_peak)}
print(json.dumps(result))

if os.environ.get("LOOP"):
    from salience.methods.perturbation import rise_masks

    L = Listing()
    rows = torch.arange(B)
    bf16 = perf.get("precision") == "bf16"
    layer = model.get_submodule(opts.get("layer", "layer1.0.conv1"))
    with L, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if method == "rise":
            sal = torch.zeros(B, S, S)
            for i in range(3):
                L.phase = f"pass {i}"
                m = rise_masks(i, i + 1, (S, S))[0]
                sal += model(x * m).softmax(1)[rows, target].view(-1, 1, 1) * m
        elif method == "occlusion":
            y = model(x)[rows, target]
            for i in range(4):
                L.phase = f"pass {i}"
                xo = x.clone()
                xo[:, :, :28, i * 28:(i + 1) * 28] = 0
                d = y - model(xo)[rows, target]
        else:
            store: list = []
            h = layer.register_forward_hook(lambda m, i, o: store.append(o))
            y = model(x)[rows, target]
            h.remove()
            acts = store[0]
            for k in range(4):
                L.phase = f"pass {k}"
                if method == "scorecam":
                    m = torch.nn.functional.interpolate(acts[:, k:k + 1], size=(S, S), mode="bilinear")
                    model(x * m).softmax(1)
                else:
                    def zero(mod, i, o, k=k):
                        o = o.clone()
                        o[:, k] = 0
                        return o
                    h = layer.register_forward_hook(zero)
                    model(x)
                    h.remove()
    print(json.dumps({"method": method, "loop": True, "perf": sys.argv[3] if len(sys.argv) > 3 else "",
                      "peak_mib": round(L.peak / 2 ** 20, 2), "peak_bytes": L.peak, "peak_phase": L.peak_phase, "at_peak": summary(L.at_peak)}))
