"""A/B of ``precision="bf16-mixed"``'s mode (``salience._core.islands``) before and after session 45's
``SPELLS_A_METHOD`` (F.hardtanh / F.relu6 run as ``x.clamp`` does): torchvision's MobileNetV2 (random weights, ReLU6
throughout), vanilla on 4 images of 160 px, one thread. Run once per source tree, interleaved by the caller:

    flock /tmp/bench.lock taskset -c 1 python benchmarks/islands_spellings_s45.py SRC_DIR LABEL

prints ``LABEL min median max`` seconds of ``REPS`` calls after a warm-up."""
from __future__ import annotations

import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import torchvision  # noqa: E402
import warnings  # noqa: E402

import salience  # noqa: E402

REPS = 21
torch.set_num_threads(1)
warnings.simplefilter("ignore")
torch.manual_seed(0)
model = torchvision.models.mobilenet_v2().eval()
x = torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(0))
assert salience.__file__.startswith(sys.argv[1]), salience.__file__
with salience.performance(precision="bf16-mixed"):
    salience.vanilla(model, x, 1)
    times = []
    for _ in range(REPS):
        t = time.perf_counter()
        salience.vanilla(model, x, 1)
        times.append(time.perf_counter() - t)
times.sort()
print(f"{sys.argv[2]} {times[0]:.4f} {times[len(times) // 2]:.4f} {times[-1]:.4f}")
