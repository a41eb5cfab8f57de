"""The benchmark scripts that are surveys rather than timings: run small, their files checked against the
library called directly. (The timing scripts are run by hand; see benchmarks/README.md.)"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

import timm  # noqa: E402 - in the test extra: tested, never skipped
from salience.methods.gradcam import default_layer

logging.getLogger("timm").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parent.parent


def test_default_layers_survey_rows_are_the_default_layer_salience_picks(tmp_path):
    out = tmp_path / "dl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "default_layers.py"), "--threads", "1",
                           "--archs", "resnet18,vit_tiny_patch16_224,no_such_arch_s31", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed
    rows = {r["arch"]: r for r in json.loads((tmp_path / "dl.json").read_text())["rows"]}
    md = (tmp_path / "dl.md").read_text()
    lines = {a: next(line for line in md.splitlines() if f"| `{a}` |" in line) for a in rows}

    # resnet18 takes 128 px: layer4, a (B, 512, 4, 4) map (stride 32); the ViT needs its 224: the last
    # block's norm1, 1 class token + 14x14 patches (docs/methods-transformers.md's table)
    expected = {"resnet18": ("layer4", 128, {"kind": "channels_first", "prefix": 0, "grid": [4, 4], "channels": 512}),
                "vit_tiny_patch16_224": ("blocks.11.norm1", 224,
                                         {"kind": "tokens", "prefix": 1, "grid": [14, 14], "channels": 192})}
    for arch, (layer, size, layout) in expected.items():
        torch.manual_seed(0)
        net = timm.create_model(arch, pretrained=False, num_classes=5).eval()
        x = torch.rand(1, 3, size, size)
        assert default_layer(net, x) == layer  # the library, called directly
        r = rows[arch]
        assert r["status"] == "ok" and r["default_layer"] == layer and r["input_shape"] == [1, 3, size, size]
        assert {k: r["layout_fields"][k] for k in layout} == layout and r["layout_fields"]["varies_over_positions"]
        assert r["gradcam"] == "ok" and r["map_shape"] == [1, size, size] and r["map_max"] > r["map_min"]
        assert f"| `{layer}` |" in lines[arch]
    assert rows["resnet18"]["left_out"] == ["attention_rollout", "transformer_attribution"]
    # the guided methods are left out on a GELU model (their rule is not defined for GELU: they refuse it)
    assert rows["vit_tiny_patch16_224"]["left_out"] == ["guided_backprop", "deconvnet", "guided_gradcam"]
    assert rows["no_such_arch_s31"]["status"] == f"not in timm {timm.__version__}"
    assert f"not in timm {timm.__version__}" in lines["no_such_arch_s31"]
