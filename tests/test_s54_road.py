"""ROAD's linear imputation, now factored by SuperLU in a nested-dissection order (session 54): the
same solution as the paper's equations solved densely (written here as one matrix formula, apart
from tests/test_road.py's equation-by-equation reference), as the spsolve path it replaced (read
from git), the closed form of an isolated pixel, the noise draws of before, and an empty batch."""
from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from salience import SalienceError
from salience.evidence.road import linear_imputation

pytest.importorskip("scipy")  # ROAD solves its systems with scipy.sparse (the evidence extra)

# The last commit of main whose road.py solved with scipy.sparse.linalg.spsolve (before session 54).
OLD_COMMIT = "377afcd4d8f32b47190f0500de7c54bd206b3a14"
REPO = Path(__file__).resolve().parents[1]


def _formula(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Rong et al.'s imputation as one dense matrix formula: with ``W`` the ``HW x HW`` stencil weights
    (1/6 direct, 1/12 diagonal neighbours inside the image) and ``D`` its row sums, the removed values
    ``v_R`` solve ``(D - W)_RR v_R = W_RK v_K`` (every removed pixel the weighted mean of its
    neighbours), by ``numpy.linalg.solve``."""
    c, h, w = img.shape
    pos = np.arange(h * w).reshape(h, w)
    big = np.zeros((h * w, h * w))
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                src = pos[max(0, -di):h - max(0, di), max(0, -dj):w - max(0, dj)]
                dst = pos[max(0, di):h + min(0, di), max(0, dj):w + min(0, dj)]
                big[src.ravel(), dst.ravel()] = 1 / 6 if di == 0 or dj == 0 else 1 / 12
    lap = np.diag(big.sum(1)) - big
    r, k = removed.ravel(), ~removed.ravel()
    flat = img.reshape(c, -1)
    out = flat.copy()
    out[:, r] = np.linalg.solve(lap[np.ix_(r, r)], big[np.ix_(r, k)] @ flat[:, k].T).T
    return out.reshape(c, h, w)


def _patterns() -> dict[str, np.ndarray]:
    """Removed sets of 12 x 12 images (True = removed) whose solves differ in kind."""
    yy, xx = np.mgrid[:12, :12]
    rng = np.random.default_rng(0)
    pats = {"blob": (yy - 5.5) ** 2 + (xx - 6.0) ** 2 < 14,
            "scattered": (rng.random((12, 12)) < 0.15) & ((yy + xx) % 2 == 0),
            "border strip": xx >= 10,
            "corner": (yy < 4) & (xx < 5),
            "dense random": rng.random((12, 12)) < 0.8}
    diag = np.zeros((12, 12), bool)
    diag[2:6, 2:6] = True
    diag[6:10, 6:10] = True  # touches the first block only at its corner (5, 5) - (6, 6)
    pats["diagonal touch"] = diag
    return pats


def test_imputation_equals_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 12, 12, generator=g, dtype=torch.float64)
    for name, rem in _patterns().items():
        ours = linear_imputation(x, torch.from_numpy(rem)[None])[0].numpy()
        ref = _formula(x[0].numpy(), rem)
        assert np.abs(ours - ref).max() <= 1e-10 * np.abs(ref).max(), name
        assert np.array_equal(ours[:, ~rem], x[0].numpy()[:, ~rem]), name
    for h, w in ((1, 9), (7, 1), (5, 13), (13, 2)):  # strips and odd sizes: the dissection's edge cases
        xs = torch.rand(1, 2, h, w, generator=g, dtype=torch.float64)
        rem = torch.rand(1, h, w, generator=g) < 0.6
        rem[0, 0, 0] = False
        ref = _formula(xs[0].numpy(), rem[0].numpy())
        assert np.abs(linear_imputation(xs, rem)[0].numpy() - ref).max() <= 1e-10 * np.abs(ref).max(), (h, w)


def test_diagonal_neighbours_couple_two_regions():
    # Two removed blocks that meet only at a corner are one system: solving each alone (the other
    # block kept) gives other values, and the imputation agrees with the joint solve.
    x = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    both = _patterns()["diagonal touch"]
    first = both.copy()
    first[6:, 6:] = False
    ours = linear_imputation(x, torch.from_numpy(both)[None])[0, 0].numpy()
    alone = _formula(x[0].numpy(), first)[0]
    assert abs(ours[5, 5] - alone[5, 5]) > 1e-4  # coupled through the diagonal weight 1/12
    np.testing.assert_allclose(ours, _formula(x[0].numpy(), both)[0], rtol=0, atol=1e-10)


def test_isolated_pixel_is_the_weighted_mean_of_its_neighbours():
    # A removed pixel with no removed neighbour: 1/6 for the direct, 1/12 for the diagonal neighbours,
    # divided by the weights present (1 inside, 2/3 on an edge, 5/12 at a corner).
    x = torch.rand(1, 2, 7, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rem = torch.zeros(1, 7, 8, dtype=torch.bool)
    cells = [(3, 4), (0, 0), (6, 7), (0, 4), (3, 7)]
    for i, j in cells:
        rem[0, i, j] = True
    out = linear_imputation(x, rem)
    for i, j in cells:
        num, den = torch.zeros(2, dtype=torch.float64), 0.0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if (di or dj) and 0 <= i + di < 7 and 0 <= j + dj < 8:
                    wt = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                    num, den = num + wt * x[0, :, i + di, j + dj], den + wt
        torch.testing.assert_close(out[0, :, i, j], num / den, rtol=0, atol=1e-14)
    corner = (x[0, :, 0, 1] / 6 + x[0, :, 1, 0] / 6 + x[0, :, 1, 1] / 12) / (5 / 12)
    torch.testing.assert_close(out[0, :, 0, 0], corner, rtol=0, atol=1e-14)


def _git(*args: str) -> subprocess.CompletedProcess:
    """``git args`` in this repository, its messages in English (the skips read them)."""
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LC_ALL": "C"})


def _old_module():  # type: ignore[no-untyped-def]
    """main's road.py before session 54 (spsolve), executed as a module. Skipped only where git is
    missing, the tests are not in a git checkout (an exported tree) or the clone is shallow and lacks
    that commit; any other failure of git (a full clone must hold the commit) fails the test rather
    than hiding the comparison behind a skip."""
    try:
        shallow = _git("rev-parse", "--is-shallow-repository")
    except FileNotFoundError:
        pytest.skip("git is not installed: main's spsolve road.py cannot be read")
    if shallow.returncode != 0 and "not a git repository" in shallow.stderr:
        pytest.skip("not a git checkout: main's spsolve road.py cannot be read")
    if shallow.stdout.strip() == "true" and _git("cat-file", "-e", f"{OLD_COMMIT}^{{commit}}").returncode != 0:
        pytest.skip(f"a shallow clone without commit {OLD_COMMIT[:8]} (main's spsolve road.py)")
    shown = _git("show", f"{OLD_COMMIT}:src/salience/evidence/road.py")
    assert shown.returncode == 0, f"git show {OLD_COMMIT[:8]}:src/salience/evidence/road.py failed: {shown.stderr}"
    src = shown.stdout
    ast.parse(src)
    namespace: dict = {"__name__": "old_road_s54"}
    exec(compile(src, "old_road.py", "exec"), namespace)
    return namespace


def _maps64() -> dict[str, torch.Tensor]:
    """Two 64 x 64 maps: a Gaussian bump (contiguous removed sets) and uniform noise (scattered)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    bump = torch.exp(-((yy - 25) ** 2 + (xx - 38) ** 2) / (2 * 14.0 ** 2))
    return {"bump": bump, "random": torch.rand(64, 64, generator=torch.Generator().manual_seed(3))}


def test_same_solution_and_noise_as_the_spsolve_path():
    old = _old_module()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for name, m in _maps64().items():
        for f in (0.1, 0.5, 0.9):
            k = round(f * 64 * 64)
            rem = torch.zeros(64 * 64, dtype=torch.bool)
            rem[m.flatten().argsort(descending=True)[:k]] = True
            rem = rem.reshape(1, 64, 64).expand(2, 64, 64)
            ref = old["linear_imputation"](x, rem)
            ours = linear_imputation(x, rem)
            assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-9, (name, f)
            # The noise: the same generator draws on the same pixels (int seed and one seed per image).
            for seed in (5, [6, 2 ** 63]):
                d_ours = linear_imputation(x, rem, noise=0.05, seed=seed) - ours
                d_ref = old["linear_imputation"](x, rem, noise=0.05, seed=seed) - ref
                torch.testing.assert_close(d_ours, d_ref, rtol=0, atol=1e-15)
                assert torch.equal(d_ours[~rem[:, None].expand_as(x)], torch.zeros(int((~rem).sum()) * 3,
                                                                                   dtype=torch.float64))


def test_empty_batch_and_no_channel_give_empty_results():
    # Fixed defect: an empty batch (0, C, H, W) or an image without channels raised numpy's raw
    # "ValueError: cannot reshape array of size 0"; nothing is to be filled, so the result is empty.
    for shape in ((0, 3, 5, 5), (2, 0, 5, 5)):
        x = torch.rand(shape)
        rem = torch.zeros(shape[0], 5, 5, dtype=torch.bool)
        rem[:, 1:3, 2] = True
        for kw in ({}, {"noise": 0.1, "seed": 1}, {"noise": 0.1, "seed": [0] * shape[0]}):
            out = linear_imputation(x, rem, **kw)
            assert out.shape == x.shape and out.dtype == x.dtype
    with pytest.raises(SalienceError, match="one seed per image"):
        linear_imputation(torch.rand(0, 3, 5, 5), torch.zeros(0, 5, 5, dtype=torch.bool), noise=0.1, seed=[1])
    with pytest.raises(SalienceError, match="at least one kept pixel"):
        linear_imputation(torch.rand(1, 3, 0, 5), torch.zeros(1, 0, 5, dtype=torch.bool))
