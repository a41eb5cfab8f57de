"""``seed=None`` (RISE's masks, SmoothGrad's noise) in a dataset run: the run's seed, drawn once when the
run begins and kept in ``run.json`` (``seed``), stands for it, so a run stopped and continued equals an
uninterrupted one, and both equal the run given that seed; explicit seeds are unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import salience
from salience.runs import job
from test_runs_bad_image import Marked

pytest.importorskip("pyarrow")

METHODS = ["rise", "smoothgrad"]


def _options(seed):
    return {"rise": {"masks": 16, "cell": 2, "seed": seed}, "smoothgrad": {"samples": 3, "seed": seed}}


class Items(torch.utils.data.Dataset):
    """Eight images; reading image ``stop`` raises ``KeyboardInterrupt`` once (Ctrl-C mid-run)."""

    def __init__(self, stop=None) -> None:
        torch.manual_seed(3)
        self.x = torch.rand(8, 3, 8, 8)
        self.stop = stop

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if i == self.stop:
            self.stop = None
            raise KeyboardInterrupt
        return self.x[i]


def _run(folder, data, seed=None):
    return salience.explain_dataset(Marked().eval(), data, METHODS, folder, method_options=_options(seed), workers=0,
                                    map_dtype="float32", batch_size=2, shard_size=2)


def _maps(run):
    return {m: np.stack([run.map(i, m) for i in range(8)]) for m in METHODS}


def test_a_stopped_and_continued_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """seed=None: a run stopped (Ctrl-C reading image 5, its first 4 images committed) and continued gives
    the maps of an uninterrupted run with seed=None that drew the same run seed, and of a run given that seed;
    RISE's masks are one set for the whole run (each batch drew its own, again on the resume)."""
    data = Items(stop=5)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", data)
    seed = json.loads((tmp_path / "cut" / "run.json").read_text())["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 63
    cut = _run(tmp_path / "cut", data)
    assert cut.complete and json.loads((tmp_path / "cut" / "run.json").read_text())["seed"] == seed
    monkeypatch.setattr(job, "draw_seed", lambda: seed)
    whole = _run(tmp_path / "whole", Items())
    given = _run(tmp_path / "given", Items(), seed=seed)
    a, b, c = _maps(cut), _maps(whole), _maps(given)
    for m in METHODS:
        np.testing.assert_array_equal(a[m], b[m])
        np.testing.assert_allclose(a[m], c[m], rtol=1e-6, atol=1e-7)
    x = Items().x
    for i in (0, 7):  # RISE: the run seed's masks on every image; SmoothGrad: image i's own seed from it
        alone = salience.rise(Marked().eval(), x[i:i + 1], masks=16, cell=2, seed=seed)[0].numpy()
        np.testing.assert_allclose(a["rise"][i], alone, rtol=1e-5, atol=1e-6)
        alone = salience.smoothgrad(Marked().eval(), x[i:i + 1], samples=3, seed=(seed * 1_000_003 + i) % 2 ** 63)[0].numpy()
        np.testing.assert_allclose(a["smoothgrad"][i], alone, rtol=1e-5, atol=1e-6)


def test_two_runs_with_seed_none_draw_their_own_seeds_and_explicit_seeds_are_kept(tmp_path):
    """Each new run draws a seed of its own (seed=None stays fresh from one run to the next); an explicit
    seed gives what it gave (image i's SmoothGrad seed ``image_seed(S, i)``, RISE's masks of S)."""
    one, two = _run(tmp_path / "one", Items()), _run(tmp_path / "two", Items())
    seeds = [json.loads((tmp_path / n / "run.json").read_text())["seed"] for n in ("one", "two")]
    assert seeds[0] != seeds[1]
    assert not np.array_equal(_maps(one)["rise"], _maps(two)["rise"])
    given = _maps(_run(tmp_path / "five", Items(), seed=5))
    x = Items().x
    alone = salience.smoothgrad(Marked().eval(), x[3:4], samples=3, seed=(5 * 1_000_003 + 3) % 2 ** 63)[0].numpy()
    np.testing.assert_allclose(given["smoothgrad"][3], alone, rtol=1e-5, atol=1e-6)
    alone = salience.rise(Marked().eval(), x[3:4], masks=16, cell=2, seed=5)[0].numpy()
    np.testing.assert_allclose(given["rise"][3], alone, rtol=1e-5, atol=1e-6)
