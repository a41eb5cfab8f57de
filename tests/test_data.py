"""The shapes generator: contract, determinism, exact masks, cues."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience.demo import data


@pytest.fixture(scope="module")
def batch() -> data.ShapesBatch:
    return data.shapes_batch(300, seed=7)


def test_contract(batch):
    images, labels, masks = data.shapes(12, seed=1)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (12,) and labels.dtype == torch.int64
    assert masks.shape == (12, 64, 64) and masks.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 1
    assert batch.scale.shape == (300,) and batch.center.shape == (300, 2)
    assert ((batch.scale > 0) & (batch.scale <= 1)).all()
    assert ((batch.center > 0) & (batch.center < 1)).all()
    assert batch.cue_masks.shape == (300, 64, 64) and not batch.cue_masks.any()
    assert (batch.cue_labels == -1).all()
    # Every class appears, roughly uniformly.
    counts = torch.bincount(batch.labels, minlength=len(data.CLASSES))
    assert len(counts) == len(data.CLASSES) and counts.min() >= 35
    # Other sizes scale the whole picture.
    im, lab, m = data.shapes(3, seed=1, size=96)
    assert im.shape == (3, 3, 96, 96) and m.shape == (3, 96, 96)
    assert torch.equal(lab, labels[:3])


def test_deterministic_prefix_stable_and_independent_of_global_rng():
    torch.manual_seed(123)
    np.random.seed(123)
    a = data.shapes(10, seed=5)
    torch.manual_seed(999)
    np.random.seed(999)
    b = data.shapes(10, seed=5)
    c = data.shapes(5, seed=5)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert torch.equal(x[:5], z)
    d = data.shapes(10, seed=6)
    assert not torch.equal(a[0], d[0])


def test_masks_are_exactly_the_shape_pixels(batch):
    for i in range(40):
        m = batch.masks[i]
        pixels = batch.images[i][:, m]  # (3, k)
        # Flat colour: every mask pixel carries the same colour ...
        assert (pixels - pixels[:, :1]).abs().max() == 0
        # ... and that colour stands out from the background right around the shape.
        ring = _dilate(m, 2) & ~m
        diff = (batch.images[i][:, ring] - pixels[:, :1]).norm(dim=0)
        assert diff.median() > 0.3, f"image {i}: shape hardly visible"


def test_mask_area_matches_geometry(batch):
    R = batch.scale * 32  # circumradius in pixels
    area = batch.masks.flatten(1).sum(1).float()
    arm = 0.32
    reach = math.sqrt(1 - arm * arm)
    r_in = 0.45
    star = 5 * r_in * math.sin(2 * math.pi / 10)  # five kites tip-centre-inner: 10 triangles
    expected = {
        0: math.pi,  # circle of radius R
        1: 2.0,  # square inscribed in the circle: side R*sqrt(2)
        2: 3 * math.sqrt(3) / 4,  # equilateral triangle with circumradius R
        3: 2 * (2 * arm) * (2 * reach) - (2 * arm) ** 2,  # two bars minus their overlap
        4: star,
    }
    for c, k in expected.items():
        sel = batch.labels == c
        ratio = area[sel] / (k * R[sel] ** 2)
        assert sel.sum() > 20
        assert (ratio - 1).abs().mean() < 0.02, (data.CLASSES[c], ratio)
        assert (ratio - 1).abs().max() < 0.12, (data.CLASSES[c], ratio)
    # The centre is the mask's centroid for the point-symmetric shapes (circle, square, cross).
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    for i in range(60):
        if batch.labels[i] in (0, 1, 3):
            m = batch.masks[i].float()
            cx, cy = (m * xs).sum() / m.sum() / 64, (m * ys).sum() / m.sum() / 64
            assert abs(cx - batch.center[i, 0]) < 0.01 and abs(cy - batch.center[i, 1]) < 0.01


def test_cues():
    none = data.shapes_batch(200, seed=3)
    train = data.shapes_batch(200, seed=3, cue="train")
    moved = data.shapes_batch(200, seed=3, cue="moved")
    for b in (train, moved):
        # Same images apart from the cue's pixels; the cue never overlaps the shape.
        assert torch.equal(b.labels, none.labels) and torch.equal(b.masks, none.masks)
        outside = ~b.cue_masks[:, None].expand_as(b.images)
        assert torch.equal(b.images[outside], none.images[outside])
        assert not (b.masks & b.cue_masks).any()
        assert (b.cue_masks.flatten(1).sum(1) == 36).all()
    assert torch.equal(train.cue_labels, train.labels)
    assert (moved.cue_labels != moved.labels).all()
    assert set(moved.cue_labels.tolist()) == set(range(5))
    # The cue lies in its class's slot, and the slots are disjoint.
    for b in (train, moved):
        for i in range(20):
            top, left, h, w = data.cue_box(int(b.cue_labels[i]))
            box = torch.zeros(64, 64, dtype=torch.bool)
            box[top:top + h, left:left + w] = True
            assert torch.equal(b.cue_masks[i], box)
    boxes = [data.cue_box(c) for c in range(5)]
    assert all(boxes[c][1] + boxes[c][3] < boxes[c + 1][1] for c in range(4))


def test_bad_arguments():
    with pytest.raises(SalienceError, match="cue"):
        data.shapes(2, cue="yes")
    with pytest.raises(SalienceError, match="n must"):
        data.shapes(-1)
    with pytest.raises(SalienceError, match="size"):
        data.shapes(2, size=8)
    assert data.shapes(0)[0].shape == (0, 3, 64, 64)


def _dilate(m: torch.Tensor, r: int) -> torch.Tensor:
    k = 2 * r + 1
    return torch.nn.functional.max_pool2d(m[None, None].float(), k, 1, r)[0, 0] > 0
