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


def _reference(model, layer, x, cls):
    """Desai & Ramaswamy 2020 one image and one channel at a time: ``w_k = (y - y_k) / y``, ``y_k`` the score with
    channel ``k`` of the layer's output set to 0; the map ``ReLU(sum_k w_k A_k)`` at the layer's size."""
    maps = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            store = []
            h = layer.register_forward_hook(lambda m, inp, o: store.append(o.clone()))
            y = model(xi)[0, cls[i]]
            h.remove()
            a = store[0][0]
            cam = torch.zeros(a.shape[1:])
            for k in range(a.shape[0]):
                def zero(m, inp, o, k=k):
                    o = o.clone()
                    o[:, k] = 0
                    return o
                h = layer.register_forward_hook(zero)
                yk = model(xi)[0, cls[i]]
                h.remove()
                cam += (y - yk) / y * a[k]
            maps.append(cam.clamp(min=0))
    return torch.stack(maps)


def _rows(module):
    """A counter of the rows ``module`` is called on, and its hook's handle."""
    rows = [0]
    return rows, module.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + o.shape[0]))


@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_ablationcam_on_a_resnet_blocks_first_conv_runs_the_stem_once_per_image_of_a_chunk(resnet):
    """``layer1.0.conv1`` of resnet18 (64 channels), two images: the block's shortcut reads the block's input. With
    ``chunk=16`` (image 0's 64 items, then image 1's: 8 chunks of one image each) the stem runs on 2 rows (the capture)
    + 3 (the check: two items shared, 1 row, and one by one, 2) + one row a chunk = 13; before, 2 + 2 (a failed
    shared try) + one row per item (128) = 132. The map is the paper's formula's."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cls = resnet(x).argmax(1)
    layer = resnet.layer1[0].conv1
    ref = _reference(resnet, layer, x, cls)
    rows, h = _rows(resnet.conv1)
    try:
        with unchanged(resnet):
            ours = salience.ablationcam(resnet, x, cls, layer=layer, upsample=False, chunk=16)
    finally:
        h.remove()
    assert rows[0] == 2 + 3 + 8
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_ablationcam_default_chunks_share_the_stem_and_keep_the_formula(resnet):
    """The engine's own chunks (a probe of b items first, then from the memory budget), three images, a layer in
    the second stage (``layer2.0.conv1``, whose block has a strided downsample on its shortcut): far fewer stem rows
    than one per item, and the paper's map."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cls = resnet(x).argmax(1)
    layer = resnet.layer2[0].conv1
    ref = _reference(resnet, layer, x, cls)
    rows, h = _rows(resnet.conv1)
    try:
        ours = salience.ablationcam(resnet, x, cls, layer=layer, upsample=False)
    finally:
        h.remove()
    items = 3 * 128
    assert rows[0] < items // 4, rows[0]
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
