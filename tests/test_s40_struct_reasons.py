"""The tables of why a method's passes skip a performance option (``_WHY_..._SKIP``: option -> reason), one per kind of
pass, each read by the one warning per process of an option not applied (``methods._multi.warn_unapplied`` /
``hooked_pass``, whose ``why=`` keyword names the table): each method's warning gives its own table's reason for
the option, word for word, and each table answers for every option its methods leave out (a missing one was a
``KeyError`` at the user's call, only where that option was set)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import salience
from salience.methods import _multi
from tiny_vit import TinyViT

PASS_OPTIONS = ("compile", "fold_batchnorm", "precision", "memory_format")  # how a pass runs: what a table may say
SET = {"compile": True, "fold_batchnorm": True, "precision": "bf16", "memory_format": "channels_last"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT(size=(16, 16), patch=4, dim=16, heads=2, depth=2).eval()


# the modules (the package's names of the same spelling are the methods)
transformer, scorecam, class_model = (importlib.import_module(f"salience.methods.{m}")
                                      for m in ("transformer", "scorecam", "class_model"))
X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

# method name, its call, the table its warning reads, the options it leaves out
CASES = [
    ("guided_backprop", lambda: salience.guided_backprop(_net(), X, 1), _multi._WHY_HOOKED_PASSES_SKIP,
     ("compile", "fold_batchnorm")),
    ("gradcam", lambda: salience.gradcam(_net(), X, 1), _multi._WHY_HOOKED_PASSES_SKIP, ("compile", "fold_batchnorm")),
    ("eigencam", lambda: salience.eigencam(_net(), X), _multi._WHY_HOOKED_PASSES_SKIP, PASS_OPTIONS),
    ("attention_rollout", lambda: salience.attention_rollout(_vit(), X), transformer._WHY_ATTENTION_PASSES_SKIP,
     ("compile", "fold_batchnorm")),
    ("transformer_attribution", lambda: salience.transformer_attribution(_vit(), X, 1),
     transformer._WHY_ATTENTION_PASSES_SKIP, ("compile", "fold_batchnorm")),
    ("ablationcam", lambda: salience.ablationcam(_net(), X, 1), scorecam._WHY_ABLATION_PASSES_SKIP,
     ("compile", "fold_batchnorm")),
    ("class_model", lambda: salience.class_model(_net(), salience.targets.activation("features.3", 2),
                                                 shape=(3, 16, 16), steps=2),
     class_model._WHY_INNER_LAYER_PASSES_SKIP, ("compile", "fold_batchnorm")),
]


pytestmark = pytest.mark.usefixtures("fresh_perf_state")


def test_each_table_holds_reasons_for_pass_options_only():
    tables = {id(t): t for _, _, t, _ in CASES}.values()
    assert len(tables) == 4
    for table in tables:
        assert set(table) <= set(PASS_OPTIONS) and all(isinstance(r, str) and r for r in table.values()), table


@pytest.mark.parametrize("name, call, table, skipped", CASES, ids=[c[0] for c in CASES])
def test_each_method_says_its_own_tables_reason(name, call, table, skipped):
    for option in skipped:
        _multi._UNAPPLIED.clear()
        with salience.performance(**{option: SET[option]}), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            call()
        ours = [str(w.message) for w in said if str(w.message).startswith(f"{name}: {option}=")]
        assert ours == [f"{name}: {option}={SET[option]!r} is not applied to its passes: {table[option]} "
                        "(said once per process)"], (option, [str(w.message) for w in said])
