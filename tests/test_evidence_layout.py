"""salience.evidence after the split: the same public names, the layers kept, no error swallowed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError, evidence
from salience.evidence import evaluate as E

SRC = Path(salience.__file__).resolve().parent

PUBLIC = ["pointing_game", "energy_in_mask", "mask_box", "saliency_box", "box_iou", "weak_localization",
          "deletion", "insertion", "deletion_curves", "insertion_curves", "auc", "spearman", "ssim",
          "hog_similarity", "similarity", "SIMILARITIES", "RandomizationResult", "randomization",
          "randomization_layers", "data_randomization", "spectral_residual", "random_maps"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


ADDED = {"road", "road_curves", "linear_imputation", "ROAD_FRACTIONS", "faithfulness_correlation", "max_sensitivity",
         "sparseness", "complexity", "random_logit", "sobel_edges", "center_maps",
         "image_seeds", "PROBABILITY"}  # issue 16's metrics


def test_public_names_are_those_of_the_old_metrics_module():
    """Every name of the old module, in its order, plus issue 16's metrics and nothing else."""
    assert [n for n in evidence.__all__ if n in PUBLIC] == PUBLIC
    assert set(evidence.__all__) - set(PUBLIC) == ADDED
    assert salience.metrics is evidence
    for name in PUBLIC:
        assert getattr(salience.metrics, name) is getattr(evidence, name)
    assert not (SRC / "evidence" / "metrics.py").exists()


def test_metric_families_import_nothing_above_methods():
    for path in (SRC / "evidence").glob("*.py"):
        if path.name == "evaluate.py":
            continue
        bad = {m for m in _imports(path) if m.startswith(("salience.demo", "salience.render", "salience.loading",
                                                          "salience.cli"))}
        assert not bad, f"{path.name} imports {bad}"
    # evaluate may use demo.data (core only) but never the top of demo (train, clever_hans).
    assert not {m for m in _imports(SRC / "evidence" / "evaluate.py")
                if m.startswith(("salience.demo.train", "salience.demo.clever_hans", "salience.cli"))}


def test_plots_are_pure_pictures():
    # no torch, no model, no metric: the standard library's numbers, numpy and PIL, and salience's error class
    # (bad input is a SalienceError, the render audit)
    allowed = ("__future__", "math", "numbers", "typing", "numpy", "PIL", "salience._core.errors")
    assert all(m.startswith(allowed) for m in _imports(SRC / "render" / "plots.py"))


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 64 * 64, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _train(images, labels):
    torch.manual_seed(0)
    return _Linear()


def test_data_randomization_records_a_method_that_does_not_apply():
    def not_here(model, x, target=None):
        raise SalienceError("this method needs a conv layer")

    x = torch.rand(2, 3, 64, 64)
    out = E._data_randomization_rows(_train, E.bound_methods(_train(None, None), x, ["vanilla", not_here]), 8, x)
    assert set(out["values"]) == {"vanilla"}
    assert out["errors"] == {"not_here": "SalienceError: this method needs a conv layer"}
    assert ["not_here", "failed: SalienceError: this method needs a conv layer", "", "", ""] in E._data_rand_table(out)


def test_data_randomization_does_not_swallow_other_errors():
    def broken(model, x, target=None):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        E._data_randomization_rows(_train, [("broken", broken)], 8, torch.rand(2, 3, 64, 64))
