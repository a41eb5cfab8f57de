"""Defects the session-51 zoo sweep found (``benchmarks/zoo-sweep-s51.py``, every method on one small model per
timm / Hugging Face family, random weights), each on a tiny instance of the family, with the fix's property."""
from __future__ import annotations

import logging

import torch

import salience
from salience.methods.gradcam import default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand, row_major

import transformers  # noqa: E402 - in the test extra: tested, never skipped
from transformers import PvtConfig, PvtForImageClassification  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("timm").setLevel(logging.ERROR)


def _hf_pvt() -> PvtForImageClassification:
    """Hugging Face PVT v1 (four stages, spatial-reduction attention; the class token joins in the last stage),
    tiny: 64 px -> grids 16x16, 8x8, 4x4, 2x2."""
    torch.manual_seed(0)
    return PvtForImageClassification(PvtConfig(image_size=64, depths=[1, 1, 1, 2], hidden_sizes=[8, 16, 24, 32],
                                               num_attention_heads=[1, 1, 2, 2], num_labels=3)).eval()


def test_hf_pvt_default_is_the_input_of_the_last_stages_last_attention():
    """PVT's last stage attends over 1 class token + 2x2 patches: fewer tokens than the first embedding's 16x16 grid,
    so the ViT rule took the first stage's attention (256 tokens) as the last global one and the default was
    ``pvt.encoder.block.0.0.layer_norm_1``, a map of the first stage's 16x16 tokens, three stages before the head.
    Now it is the input of the last attention of the last stage, read as 1 prefix token + 2x2, and Grad-CAM there is
    the hand computation."""
    net = _hf_pvt()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layer = "pvt.encoder.block.3.1.layer_norm_1"
    assert default_layer(net, x) == layer
    target = torch.tensor([0, 2])
    with unchanged(net):
        cam = salience.gradcam(net, x, target, relu=False)
    ref = gradcam_by_hand(net, x, layer, target, row_major(2, 2, prefix=1))
    assert_each_varies(cam)
    torch.testing.assert_close(cam.clamp(min=0), ref, rtol=1e-4, atol=1e-7)
