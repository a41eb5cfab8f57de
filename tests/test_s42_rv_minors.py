"""Review of session 42's wt-minors (``--top K`` checked up front) and wt-vitlin (``strided.ContiguousAttention``)."""
from __future__ import annotations

import torch
from torch import nn

from salience.cli import explain_cmd, main
from salience.demo import zoo
import test_cli_options

pic = test_cli_options.pic  # the fixture: a held-out demo image as a PNG file

OVER_FOR_THREE = ["--method", "smoothgrad", "--smooth-method", "smoothgrad", "--samples", "8000"]


class _OneOutput(nn.Module):
    """A model with one output and no class names: ``--top 1`` explains it as its one target (a score)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_one_output_model_with_top_k_is_refused_and_top_1_is_checked_as_the_one_target(tmp_path, pic, capsys,
                                                                                       monkeypatch):
    """A decision (the lead's, session 54), not a finding: ``--top 3`` on a one-output model was explained as its one
    target, silently (while a dataset run refused it); now it is refused, exit 2, naming the one output and what to
    do, after the prediction pass (which tells the outputs' count) and before any map. The up-front check still
    counts the one target (8,000 x 50 = 400,000 passes is legal; three would be 1,200,000), so the refusal is of
    ``--top``, not of ``--samples``. ``--top 1`` is the one target: accepted, and reaches the maps with it."""
    torch.jit.trace(_OneOutput().eval(), torch.rand(1, 3, 64, 64)).save(str(tmp_path / "m.pt"))
    seen = []

    def stub(args, model, batch, chosen, request, places):  # the real, long work replaced: only its targets seen
        seen.append(tuple(chosen.classes.shape))
        return {}, []

    monkeypatch.setattr(explain_cmd, "_compute_maps", stub)
    command = [str(a) for a in ["explain", pic, "-m", tmp_path / "m.pt", "--size", "64", "-o", tmp_path / "o",
                                *OVER_FOR_THREE]]
    rc = main(command + ["--top", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and seen == [], (rc, seen, err)
    assert err.startswith("salience: error: --top 3 ranks classes, but ") and "has one output" in err, err
    assert err.endswith("has one output (output 0): it is the one target there is; leave --top out (or give "
                        "--target 0)\n") and err.count("\n") == 1, err
    rc = main(command + ["--top", "1"])
    err = capsys.readouterr().err
    assert "--samples" not in err and "--top" not in err, err
    assert seen == [(1, 1)], (seen, err)  # reached the maps, with the one target
    assert rc == 2  # the stub computed no map


def test_unnamed_classifier_with_top_k_over_the_cap_is_still_refused_before_any_map(tmp_path, pic, capsys,
                                                                                    monkeypatch):
    """Names unknown, 5 outputs, ``--top 3``: three targets, 1,200,000 passes an image: refused naming --samples and
    --top, before the maps (after the prediction pass, which tells the outputs' count)."""
    torch.jit.trace(zoo.load_demo("shapes").eval(), torch.rand(1, 3, 64, 64)).save(str(tmp_path / "m.pt"))
    monkeypatch.setattr(explain_cmd, "_compute_maps", lambda *a: (_ for _ in ()).throw(AssertionError("no maps")))
    rc = main([str(a) for a in ["explain", pic, "-m", tmp_path / "m.pt", "--size", "64", "-o", tmp_path / "o",
                                *OVER_FOR_THREE, "--top", "3"]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("salience: error: --samples: ") and "for each of 3 targets of --top 3" in err, err
    assert not (tmp_path / "o").exists()


def test_top_targets_counts_unnamed_outputs_as_told():
    info = zoo.load_demo("shapes").salience_info
    unnamed = type(info)()
    assert explain_cmd._options.top_targets(4, unnamed) == (4, "--top 4")  # a dataset run: K
    assert explain_cmd._options.top_targets(4, unnamed, unnamed=1) == (1, "--top 4")  # a file run: checked again
    assert explain_cmd._options.top_targets(4, info, unnamed=1) == (4, "--top 4")  # names known: as before
