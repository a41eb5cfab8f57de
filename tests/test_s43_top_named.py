"""``salience explain --top K`` over SmoothGrad's many-pass cap (session 43): the refusal carries the K targets it
counts (:class:`salience._core.engine.TargetsCounted`), and the command line names ``--top K`` from that, not by finding
the words ``"K targets"`` in the message (``check_values`` did ``msg.replace("3 targets", "3 targets of --top 3")``:
a rewording of :func:`~salience._core.engine.calls_said` lost the flag without a word)."""
from __future__ import annotations

import pickle

import pytest
import torch

import salience
from salience._core import engine
from salience._core.errors import SalienceError
from salience.cli.options import check_values
from salience.demo import zoo

# 8,000 noisy copies of SmoothGrad's default 50 inner samples: 1,200,000 passes an image for 3 targets (cap 1,000,000)
GIVEN = {"method": salience.smoothgrad, "samples": 8000}


def _refusal(targets: int, said: str) -> str:
    with pytest.raises(SalienceError) as e:
        check_values(zoo.load_demo("shapes"), torch.rand(1, 3, 64, 64), ["smoothgrad"], GIVEN, targets, said)
    return str(e.value)


def test_a_reworded_count_of_targets_still_names_top(monkeypatch):
    def reworded(calls: int, flag: str = "") -> str:  # another wording of the same count
        return f" once per class, {calls:,} classes{f' ({flag})' if flag else ''}" if calls > 1 else ""

    monkeypatch.setattr(engine, "calls_said", reworded)
    msg = _refusal(3, "--top 3")
    assert msg.startswith("--samples: samples=8000 of smoothgrad with samples=50 once per class, 3 classes (--top 3) "
                          "is 1,200,000 passes of each image,"), msg  # before: no --top (no "3 targets" to find)


def test_the_refusal_carries_the_targets_it_counts():
    with pytest.raises(engine.TargetsCounted) as e:
        salience.smoothgrad(zoo.load_demo("shapes"), torch.rand(1, 3, 64, 64), [[0, 1, 2]],
                            method=salience.smoothgrad, samples=8000)
    refusal = e.value
    assert refusal.targets == 3 and isinstance(refusal, SalienceError)
    assert " for each of 3 targets (a call each) is 1,200,000 passes" in str(refusal)
    assert str(refusal) == refusal.naming()
    assert " for each of 3 targets of --top 3 (a call each) is 1,200,000 passes" in refusal.naming("--top 3")
    again = pickle.loads(pickle.dumps(refusal))  # a refusal crosses a process as it is
    assert type(again) is engine.TargetsCounted and str(again) == str(refusal) and again.targets == 3


def test_one_target_is_a_plain_refusal_and_other_counts_are_left_alone():
    with pytest.raises(SalienceError) as e:
        salience.smoothgrad(zoo.load_demo("shapes"), torch.rand(1, 3, 64, 64), 0, method=salience.smoothgrad,
                            samples=30000)  # 1,500,000 passes for one target
    assert type(e.value) is SalienceError and "targets" not in str(e.value)
    # --top 9 of a five-class model checks its five: a refusal counting 5 targets does not say --top 9's 9
    assert "for each of 5 targets of --top 9 (a call each)" in _refusal(5, "--top 9")
