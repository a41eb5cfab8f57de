"""``salience explain --top K``: the up-front check of the options counts the K targets the methods explain
at once, so SmoothGrad over the many-pass cap only for K targets is refused before any pass, with the flags."""
from __future__ import annotations

import pytest
import torch

import salience
from salience._core.errors import SalienceError
from salience.cli import main
from salience.cli.options import check_values, top_targets
from salience.demo import zoo
import test_cli_options

pic = test_cli_options.pic  # the fixture: a held-out demo image as a PNG file

# 8,000 noisy copies of SmoothGrad's default 50 inner samples: 400,000 passes an image for one target,
# 1,200,000 (over the 1,000,000 cap) for --top 3's three, each a call of the inner SmoothGrad
OVER_FOR_THREE = ["--method", "smoothgrad", "--smooth-method", "smoothgrad", "--samples", "8000"]


@pytest.fixture
def counted(monkeypatch):
    """The model's forward passes, counted (the demo model's own forward, wherever it is called from)."""
    calls = []
    model = zoo.load_demo("shapes")
    forward = type(model).forward

    def spy(self, x):
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(type(model), "forward", spy)
    return calls


@pytest.mark.parametrize("dataset", [[], ["--dataset", "--workers", "0"]], ids=["files", "dataset-run"])
def test_smoothgrad_over_the_cap_for_k_targets_is_refused_up_front_with_the_flags(tmp_path, pic, capsys, counted,
                                                                                   dataset):
    rc = main([str(a) for a in ["explain", pic, "-m", "demo:shapes", "-o", tmp_path / "o", *OVER_FOR_THREE,
                                "--top", "3", *dataset]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("salience: error: --samples: ") and err.count("\n") == 1, err
    assert "for each of 3 targets of --top 3" in err and "1,200,000 passes" in err, err
    assert counted == [] and not (tmp_path / "o").exists()  # no pass, nothing written


def test_the_check_counts_the_targets_asked_for_no_more():
    """check_values with 2 targets (800,000 passes an image) passes; with 3 it names --samples and --top; with one
    (no --top) it passes: the count is the real call's."""
    model = zoo.load_demo("shapes")
    x = torch.rand(1, 3, 64, 64)
    given = {"method": salience.smoothgrad, "samples": 8000}
    check_values(model, x, ["smoothgrad"], given)
    check_values(model, x, ["smoothgrad"], given, 2, "--top 2")
    with pytest.raises(SalienceError, match=r"^--samples: .*for each of 3 targets of --top 3 \(a call each\)"):
        check_values(model, x, ["smoothgrad"], given, 3, "--top 3")


def test_top_targets_counts_the_classes_there_are():
    info = zoo.load_demo("shapes").salience_info  # five classes
    assert top_targets(None, info) == (1, "")
    assert top_targets(3, info) == (3, "--top 3")
    assert top_targets(9, info) == (5, "--top 9")  # refused later as more than the classes; checked for all five
    assert top_targets(3, info, labels=("a", "b")) == (2, "--top 3")
    assert top_targets(3, info, labels=("score",)) == (1, "--top 3")  # one output: one target
    assert top_targets(4, type(info)()) == (4, "--top 4")  # names unknown: K
