"""ROAD (Rong et al. 2022): the linear imputation against a hand-written dense reference and
closed forms, the curves against a linear model whose answer is known, batching and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience import evidence as M
from salience.evidence.road import linear_imputation

from conftest import unchanged
from nets import LinearScore

pytest.importorskip("scipy")  # ROAD solves its systems with scipy.sparse (the evidence extra)


def _dense_reference(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The imputation by its definition, one equation at a time, solved densely: every removed
    pixel equals the weighted mean of its in-image neighbours (1/6 direct, 1/12 diagonal)."""
    c, h, w = img.shape
    cells = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    num = {cell: k for k, cell in enumerate(cells)}
    a = np.zeros((len(cells), len(cells)))
    b = np.zeros((len(cells), c))
    for (i, j), k in num.items():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di, dj) == (0, 0) or not (0 <= i + di < h and 0 <= j + dj < w):
                    continue
                wt = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                a[k, k] += wt
                if removed[i + di, j + dj]:
                    a[k, num[(i + di, j + dj)]] -= wt
                else:
                    b[k] += wt * img[:, i + di, j + dj]
    out = img.copy()
    sol = np.linalg.solve(a, b)
    for (i, j), k in num.items():
        out[:, i, j] = sol[k]
    return out


def test_imputation_equals_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 6, 7, generator=g, dtype=torch.float64)
    removed = torch.rand(3, 6, 7, generator=g) < torch.tensor([0.2, 0.5, 0.9])[:, None, None]
    removed[2, 0, 0] = False  # one kept pixel at least
    removed[0, :, 0] = True  # a removed column along the border
    ours = linear_imputation(x, removed)
    for i in range(3):
        ref = _dense_reference(x[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=0, atol=1e-12)  # both float64 solves of <= 38 unknowns
    assert torch.equal(ours[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])


def test_imputation_closed_forms_and_noise():
    # A linear ramp is reproduced exactly in a hole away from the border (the stencil is
    # symmetric, so the neighbours' weighted mean of a linear function is its centre value).
    yy, xx = torch.meshgrid(torch.arange(9.0, dtype=torch.float64), torch.arange(10.0, dtype=torch.float64), indexing="ij")
    ramp = (0.3 * yy - 0.2 * xx + 1.0)[None, None]
    removed = torch.zeros(1, 9, 10, dtype=torch.bool)
    removed[0, 2:7, 3:8] = True
    torch.testing.assert_close(linear_imputation(ramp, removed), ramp, rtol=0, atol=1e-12)  # float64 throughout
    # A constant image stays constant whatever is removed; noise only on the removed pixels.
    const = torch.full((1, 3, 8, 8), 0.25)
    rem = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.6
    assert torch.allclose(linear_imputation(const, rem), const, atol=1e-7)  # solved in float64, returned in float32
    noisy = linear_imputation(const, rem, noise=0.5, seed=3)
    assert torch.equal(noisy[:, :, ~rem[0]], const[:, :, ~rem[0]])
    d = (noisy - const)[:, :, rem[0]]
    assert d.abs().min() > 0 and torch.equal(noisy, linear_imputation(const, rem, noise=0.5, seed=3))
    with pytest.raises(SalienceError, match="at least one kept pixel"):
        linear_imputation(const, torch.ones(1, 8, 8, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 about scipy's result inside the reference
def test_imputation_equals_pytorch_grad_cam_road():
    road_ref = pytest.importorskip("pytorch_grad_cam.metrics.road")  # the authors' code, as shipped there
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 12, 11, generator=g)
    removed = torch.rand(1, 12, 11, generator=g) < 0.4
    ref = road_ref.NoisyLinearImputer(noise=0.0)(x[0], (~removed[0]).float())
    # The peer solves in float64 too and returns float32: values in [0, 1], so the two differ by the
    # float32 rounding (6e-8, one ulp at 1, measured); atol 1e-6 allows 16 ulp.
    torch.testing.assert_close(linear_imputation(x, removed)[0], ref, rtol=0, atol=1e-6)


def test_road_curves_known_answer_and_batching():
    # One bright 4x4 patch on a dark image; the model sums the pixels under a weight that is 1
    # on the patch. Removing the patch pixels (MoRF with the patch as the map) fills them from
    # the dark surroundings; removing background first (LeRF) leaves the patch as it is.
    w = torch.zeros(1, 1, 16, 16)
    w[..., 6:10, 6:10] = 0.5
    model = LinearScore(w)
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    patch = (w[0] > 0).expand(2, 16, 16).float()
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    with unchanged(model):
        morf = M.road_curves(model, x, patch, target=0, fractions=(0.0625, 0.5), noise=0.0, batch_size=3,
                             probability=False)
        lerf = M.road_curves(model, x, patch, target=0, order="lerf", fractions=(0.0625, 0.5), noise=0.0,
                             probability=False)
    assert calls[:2] == [3, 1]  # a fixed target: 2 images x 2 fractions in batches of 3, nothing else
    # 16 of 256 pixels = the patch: all gone, filled from a dark ring -> score 0.
    torch.testing.assert_close(morf[:, 0], torch.zeros(2), atol=1e-9, rtol=0)
    torch.testing.assert_close(lerf, torch.full((2, 2), 8.0))  # the patch kept: 16 * 0.5
    rand = M.random_maps((2, 16, 16), seed=0)
    assert (M.road(model, x, patch, 0, noise=0.0, probability=False)
            < M.road(model, x, rand, 0, noise=0.0, probability=False)).all()
    with pytest.raises(SalienceError, match="between 0 and 1"):
        M.road(model, x, patch, fractions=(0.5, 1.0))
    with pytest.raises(SalienceError, match="order"):
        M.road(model, x, patch, order="top")


def test_road_noise_is_seeded_per_item_not_per_batch():
    # With noise on, each (image, fraction) item draws its own noise: batch_size changes nothing.
    g = torch.Generator().manual_seed(4)
    model = LinearScore(torch.rand(1, 1, 8, 8, generator=g))
    x = torch.rand(3, 1, 8, 8, generator=g)
    maps = torch.rand(3, 8, 8, generator=g)
    kw = dict(target=0, fractions=(0.25, 0.5, 0.75), noise=0.1, probability=False, seed=5)
    one = M.road_curves(model, x, maps, batch_size=1, **kw)
    assert torch.equal(one, M.road_curves(model, x, maps, batch_size=4, **kw))
    assert not torch.equal(one, M.road_curves(model, x, maps, batch_size=4, **{**kw, "seed": 6}))
    # The per-image seeds of linear_imputation: image i's result is the one it gets alone.
    removed = maps > 0.5
    both = linear_imputation(x, removed, noise=0.1, seed=[7, 8, 9])
    assert torch.equal(both[1:2], linear_imputation(x[1:2], removed[1:2], noise=0.1, seed=[8]))
    with pytest.raises(SalienceError, match="one seed per image"):
        linear_imputation(x, removed, noise=0.1, seed=[7, 8])


def _content_seed(seed: int, image: torch.Tensor, stream: int) -> int:
    """docs/evaluation.md, "Random draws", written out: the image's key is BLAKE2b-128 of its shape
    (int64 LE) and its float32 LE values; the seed the first 8 bytes (LE) of BLAKE2b-64 of key + seed
    (16 bytes LE signed) + stream (8 bytes LE), mod 2**63."""
    import hashlib
    v = image.detach().float().numpy().astype("<f4")
    key = hashlib.blake2b(np.asarray(v.shape, "<i8").tobytes() + v.tobytes(), digest_size=16).digest()
    data = key + seed.to_bytes(16, "little", signed=True) + stream.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % 2 ** 63


def test_road_noise_of_any_seed_follows_the_documented_rule():
    # Item (image i, fraction j) draws its noise from the seed of (seed, image i's content, j); a large
    # seed overflowed inside torch (raw ValueError), and a float seed was a raw RuntimeError in
    # deletion and silently truncated in faithfulness correlation. On LinearScore the noise adds
    # sum over the removed pixels of w * noise * eps to the noise-free score.
    g = torch.Generator().manual_seed(4)
    w = torch.rand(1, 1, 6, 6, generator=g)
    model = LinearScore(w)
    x = torch.rand(2, 1, 6, 6, generator=g)
    maps = torch.rand(2, 6, 6, generator=g)  # no ties: the removed pixels are the top round(f * 36)
    fr, seed = (0.25, 0.5), 2 ** 62
    kw = dict(target=0, fractions=fr, probability=False)
    clean = M.road_curves(model, x, maps, noise=0.0, **kw)
    noisy = M.road_curves(model, x, maps, noise=0.1, seed=seed, **kw)
    for i in range(2):
        for j, f in enumerate(fr):
            removed = maps[i] >= maps[i].flatten().sort(descending=True).values[round(f * 36) - 1]
            item = _content_seed(seed, x[i], j)
            eps = torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(item), dtype=torch.float64)
            expected = clean[i, j] + (w[0].double() * 0.1 * eps * removed).sum().float()
            torch.testing.assert_close(noisy[i, j], expected, atol=1e-5, rtol=0)
    for fn in (lambda s: M.deletion(model, x, maps, 0, seed=s), lambda s: M.road(model, x, maps, 0, seed=s),
               lambda s: M.faithfulness_correlation(model, x, maps, 0, seed=s, subsets=3)):
        for bad in (1.5, "1", True, 2 ** 64):
            with pytest.raises(SalienceError, match="seed"):
                fn(bad)
