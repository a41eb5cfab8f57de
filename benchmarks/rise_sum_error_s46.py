"""Session 46 (issue 15, memory): the rounding of RISE's running sums in float32 (mask by mask, in mask order, as
``salience.rise`` now sums) against the engine's float64 sums (before), for N masks at 224 px.

The sums do not depend on the model, only on the scores and the masks: the real masks (``rise_masks``, seed 0) and
scores drawn as a model's would come (``probabilities``: a random resnet50's class probability is about 1e-3;
``uniform``: scores in [0, 1]). Printed: max |float32 map - float64 map| / max |float64 map|, the mean of the same,
and the Monte Carlo spread of the estimate itself (the map of the first N/2 masks against the last N/2's).

    PYTHONPATH=src taskset -c 0 python benchmarks/rise_sum_error_s46.py 8000
"""
import sys

import torch

from salience.methods.perturbation import rise_masks

N = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
S, P, BLOCK = 224, 0.5, 250
torch.manual_seed(0)
for kind in ("probabilities", "uniform"):
    scores = torch.rand(N) if kind == "uniform" else torch.rand(N) * 2e-3
    t32 = torch.zeros(S, S)
    t64 = torch.zeros(S, S, dtype=torch.float64)
    halves = [torch.zeros(S, S, dtype=torch.float64) for _ in range(2)]
    for start in range(0, N, BLOCK):
        m = rise_masks(start, min(N, start + BLOCK), (S, S), p=P)
        for i in range(m.shape[0]):
            s = scores[start + i]
            t32.addcmul_(s.view(1, 1), m[i])  # as salience.rise now: float32, mask by mask
            prod = (s * m[i]).to(torch.float64)  # as the engine did: the float32 product summed in float64
            t64 += prod
            halves[(start + i) * 2 // N] += prod
    new = t32 / (N * P)
    old = (t64 / (N * P)).to(torch.float32)
    ref = (t64 / (N * P))
    scale = ref.abs().max()
    mc = ((halves[0] - halves[1]).abs() / (N / 2 * P)).max() / scale
    print(f"{kind}: N={N} max|f32-f64|/max {float((new.double() - ref).abs().max() / scale):.3g} "
          f"mean {float((new.double() - ref).abs().mean() / scale):.3g}; old (f64 rounded to f32) max "
          f"{float((old.double() - ref).abs().max() / scale):.3g}; Monte Carlo spread (two halves) {float(mc):.3g}")
