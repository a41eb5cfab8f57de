"""fx_traced (folding) on three models, min of 3 traces, one tree per process (PYTHONPATH); rounds interleaved across a6129eb, eef6d44 and this tree (benchmarks/trace-shadow-s48.txt)."""
import sys, time, warnings, timm, torchvision.models as tvm
warnings.filterwarnings("ignore")
from salience._core import folding
res = {}
for name, make in [("efficientnet_b0", lambda: tvm.efficientnet_b0()), ("deit_tiny", lambda: timm.create_model("deit_tiny_patch16_224")), ("resnet50", lambda: tvm.resnet50())]:
    m = make().eval()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); g = folding.fx_traced(m, None); ts.append(time.perf_counter() - t0)
        assert not isinstance(g, str)
    print(sys.argv[1], name, "min %.3f s" % min(ts), flush=True)
