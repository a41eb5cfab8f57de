"""Ablation-CAM's passes with the layers before the layer run once per image of a chunk (session 43).

Before: a chunk's items ran the layers before the layer on the chunk's b images and the ablated copies after it;
a skip around the layer (a resnet block's shortcut, which reads the block's input) met b rows against the items'
n, an error, and every pass ran the whole model once per item (the issue's resnet50 at ``layer1.0.conv1``). Now the
items come image by image and each run of an image's items runs the layers before on that image's one row (a skip's
row broadcasts against the items'), checked once a call against the pass per item.
The maps: the paper's formula written out here, one image and one channel at a time."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience

from conftest import unchanged
from test_scorecam import _ablation_reference


def _reference(model, layer, x, cls):
    """The paper's map per image (test_scorecam's reference, one image and one channel at a time), each image's
    class its own."""
    return torch.cat([_ablation_reference(model, layer, x[i:i + 1], int(cls[i])) for i in range(x.shape[0])])


def _rows(module):
    """A counter of the rows ``module`` is called on, and its hook's handle."""
    rows = [0]
    return rows, module.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + o.shape[0]))


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _stem_rows_and_maps(model, layer, b, seed, **kw):
    """Rows the stem (``conv1``) ran on during the call, the call's map and the paper's, for ``b`` images."""
    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cls = model(x).argmax(1)
    ref = _reference(model, layer, x, cls)
    rows, h = _rows(model.conv1)
    try:
        with unchanged(model):
            ours = salience.ablationcam(model, x, cls, layer=layer, upsample=False, **kw)
    finally:
        h.remove()
    return rows[0], ours, ref


def test_ablationcam_on_a_resnet_blocks_first_conv_runs_the_stem_once_per_image_of_a_chunk(resnet):
    """``layer1.0.conv1`` of resnet18 (64 channels), two images: the block's shortcut reads the block's input. With
    ``chunk=16`` (image 0's 64 items, then image 1's: 8 chunks of one image each) the stem runs on 2 rows (the capture)
    + 3 (the check: two items shared, 1 row, and one by one, 2) + one row a chunk = 13; before, 2 + 2 (a failed
    shared try) + one row per item (128) = 132. The map is the paper's formula's."""
    rows, ours, ref = _stem_rows_and_maps(resnet, resnet.layer1[0].conv1, 2, 3, chunk=16)
    # the rows are counted by a user hook on the stem: the clean pass is one pass, not session 47's two (a pass stopped
    # at the layer after S's, tests/test_s47_permem.py), which run only where no user hook is (tests/test_s47_split.py)
    assert rows == 2 + 3 + 8
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_ablationcam_default_chunks_share_the_stem_and_keep_the_formula(resnet):
    """The engine's own chunks (a probe of b items first, then from the memory budget), three images, a layer in
    the second stage (``layer2.0.conv1``, whose block has a strided downsample on its shortcut): far fewer stem rows
    than one per item (3 x 128), and the paper's map."""
    rows, ours, ref = _stem_rows_and_maps(resnet, resnet.layer2[0].conv1, 3, 4)
    assert rows < 3 * 128 // 4, rows
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


class Concat(nn.Module):
    """The rest concatenates an earlier tensor along the batch-sized axis 0's neighbour (channels): one row of the
    skip cannot meet the items' n (an error), so the passes fall back to one row per item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.cat([self.conv(s).relu(), s], 1).mean((2, 3)))


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 8])
def test_ablationcam_falls_back_where_the_skip_cannot_broadcast(chunk):
    model = Concat().eval()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(5)) + 0.2
    cls = torch.tensor([0, 1, 2])
    ref = _reference(model, model.conv, x, cls)
    with unchanged(model):
        ours = salience.ablationcam(model, x, cls, layer=model.conv, upsample=False, chunk=chunk)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
