"""Peak bytes of the tensors one attention_rollout call makes (CPU; each op's output storage counted until its last
tensor dies), against the bare forward's: torchvision VisionTransformer, 12 layers, 3 heads, random weights.
Usage: PYTHONPATH=src python benchmarks/rollout_peak.py SIZE BATCH DIM DISCARD, e.g. 384 16 192 0.9."""
import os
import sys

import torch
from torchvision.models.vision_transformer import VisionTransformer

import salience

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_rollout_overhead import _LiveBytes as Live  # noqa: E402  (the test's own counter)


if __name__ == "__main__":
    torch.set_num_threads(1)
    size, batch, dim, discard = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.manual_seed(0)
    m = VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=3, hidden_dim=dim,
                          mlp_dim=4 * dim).eval()
    x = torch.rand(batch, 3, size, size)
    salience.attention_rollout(m, x[:1], discard_ratio=discard)
    with Live() as f, torch.inference_mode():
        m(x)
    with Live() as r:
        salience.attention_rollout(m, x, discard_ratio=discard)
    print(sys.argv[1:], "forward MB", round(f.peak / 2**20), "rollout MB", round(r.peak / 2**20))
