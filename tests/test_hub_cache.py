"""``hf:ORG/NAME[@REVISION]`` and ``timm:NAME`` (pretrained) load from a real Hugging Face hub cache,
offline: the cache is built here in ``tmp_path`` in huggingface_hub's own layout (blobs, refs,
snapshots of symlinks; tests/hub_cache.py) from models made here with random weights, the
environment points at it (``HF_HUB_CACHE`` or ``HF_HOME``, set after ``huggingface_hub`` was
imported, as a notebook would), ``HF_HUB_OFFLINE=1``, and every socket connection raises."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from salience import SalienceError
from salience.loading import load_model
from salience.loading.libraries import hub_cache

from hub_cache import add_snapshot, commit_hash, forbid_network

import huggingface_hub  # noqa: E402 - in the test extra (with transformers and timm): never skipped
import timm  # noqa: E402
import transformers  # noqa: E402
from timm.data import resolve_data_config  # noqa: E402
from timm.models._hub import save_for_hf  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("timm").setLevel(logging.ERROR)

REPO = "salience-tests/tiny-vit"
MAIN, V1 = commit_hash("main"), commit_hash("v1")


@pytest.fixture
def cache(request, tmp_path, monkeypatch) -> Path:
    """An empty hub cache folder that the environment names (``HF_HUB_CACHE=DIR``, or with
    ``indirect`` parametrization ``HF_HOME=PARENT``), offline, with the network refused."""
    var = getattr(request, "param", "HF_HUB_CACHE")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, str(tmp_path / "hub" if var == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    forbid_network(monkeypatch)
    assert hub_cache() == str(tmp_path / "hub")
    return tmp_path / "hub"


def _hf_model(folder: Path, seed: int, names: list[str], mean: list[float]) -> torch.nn.Module:
    """A tiny ViT classifier and its image processor, saved with ``save_pretrained`` in ``folder``."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                 num_attention_heads=2, intermediate_size=64, num_labels=len(names),
                                 id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=mean, image_std=[0.2, 0.25, 0.3],
                                   resample=3).save_pretrained(folder)
    return model


@pytest.fixture
def hf_repo(cache, tmp_path):
    """``REPO`` in the cache: ``main`` at commit MAIN (model A), tag ``v1`` at commit V1 (model B);
    the files both commits share (none of the weights) are stored once."""
    a = _hf_model(tmp_path / "a", 0, ["cat", "dog", "fox"], [0.4, 0.5, 0.6])
    b = _hf_model(tmp_path / "b", 1, ["ant", "bee", "cow"], [0.1, 0.2, 0.3])
    add_snapshot(cache, REPO, tmp_path / "a", MAIN, refs=["main"])
    add_snapshot(cache, REPO, tmp_path / "b", V1, refs=["v1"])
    return a, b


def _same_weights(m: torch.nn.Module, ref: torch.nn.Module) -> bool:
    got, want = m.state_dict(), ref.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_cache_is_the_layout_huggingface_hub_reads(hf_repo, cache):
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings  # a corrupted layout (a bad ref, a broken symlink) is reported here
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.refs.keys() == {"main", "v1"}
    assert {r.commit_hash for r in repo.revisions} == {MAIN, V1}
    snapshot = huggingface_hub.snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    assert Path(snapshot).name == MAIN and (Path(snapshot) / "preprocessor_config.json").is_symlink()


@pytest.mark.parametrize("cache", ["HF_HUB_CACHE", "HF_HOME"], indirect=True)
def test_hf_model_id_loads_from_the_cache_offline(hf_repo):
    a, b = hf_repo
    m = load_model(f"hf:{REPO}")
    assert _same_weights(m, a) and not _same_weights(m, b) and not m.training
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m(x).logits, a(x).logits, rtol=0, atol=1e-6)
    info = m.salience_info
    assert info.name == f"hf:{REPO}" and info.class_names == ("cat", "dog", "fox")
    assert info.input_size == (32, 32) and info.resize is None and info.interpolation == "bicubic"
    assert info.mean == pytest.approx((0.4, 0.5, 0.6)) and info.std == pytest.approx((0.2, 0.25, 0.3))


@pytest.mark.parametrize("revision", ["v1", V1])
def test_hf_revision_by_tag_or_commit(hf_repo, revision):
    a, b = hf_repo
    m = load_model(f"hf:{REPO}@{revision}")
    assert _same_weights(m, b) and not _same_weights(m, a)
    info = m.salience_info  # the processor is read at the same revision
    assert info.class_names == ("ant", "bee", "cow") and info.mean == pytest.approx((0.1, 0.2, 0.3))
    assert _same_weights(load_model(f"hf:{REPO}@{MAIN}"), a)


def test_hf_missing_id_or_revision_says_how_to_get_it(hf_repo, cache):
    with pytest.raises(SalienceError, match=rf"not in the local Hugging Face cache \({cache}\) at revision v2; "
                                            rf"salience loads offline only.*hf download {REPO} --revision v2") as e:
        load_model(f"hf:{REPO}@v2")
    assert "\n" not in str(e.value)
    with pytest.raises(SalienceError, match=r"not in the local Hugging Face cache .*hf download nobody/none;"):
        load_model("hf:nobody/none")


# --------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("name, safetensors, cache", [("test_resnet", "both", "HF_HUB_CACHE"),
                                                      ("test_vit.r160_in1k", False, "HF_HOME")], indirect=["cache"])
def test_timm_pretrained_loads_exactly_the_cached_weights(cache, tmp_path, name, safetensors):
    """timm's own ``save_for_hf`` writes the repo (``model.safetensors`` and / or ``pytorch_model.bin``,
    ``config.json``) as ``push_to_hf_hub`` uploads it; it goes in the cache under the model's
    ``pretrained_cfg['hf_hub_id']`` (``timm/test_resnet.r160_in1k``)."""
    torch.manual_seed(3)
    src = timm.create_model(name, pretrained=False).eval()
    fresh = timm.create_model(name, pretrained=False)  # another random draw: what loading must replace
    save_for_hf(src, tmp_path / "repo", safe_serialization=safetensors)
    files = {p.name for p in (tmp_path / "repo").iterdir()}
    assert files == ({"model.safetensors", "pytorch_model.bin", "config.json"} if safetensors
                     else {"pytorch_model.bin", "config.json"})
    add_snapshot(cache, src.pretrained_cfg["hf_hub_id"], tmp_path / "repo", commit_hash(name))

    m = load_model(f"timm:{name}")
    assert _same_weights(m, src) and not _same_weights(fresh, src) and not m.training
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    cfg = resolve_data_config(model=src)  # timm's own reading of the pretrained cfg
    info = m.salience_info
    assert (3, *info.input_size) == tuple(cfg["input_size"]) and info.interpolation == cfg["interpolation"]
    assert info.resize == int(160 / cfg["crop_pct"]) == 168
    assert info.mean == tuple(cfg["mean"]) and info.std == tuple(cfg["std"]) and len(info.class_names) == 1000


def test_timm_config_json_of_the_repo_is_timms(tmp_path):
    """The config.json the cache holds is the one timm reads for ``hf-hub:`` models (a sanity check
    that ``save_for_hf`` wrote the repo's real format, not a guess of ours)."""
    save_for_hf(timm.create_model("test_resnet"), tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["pretrained_cfg"]["crop_pct"] == 0.95
