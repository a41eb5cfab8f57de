"""``hf:ORG/NAME[@REVISION]`` and ``timm:NAME[.TAG][@REVISION]`` (pretrained) load from a real Hugging
Face hub cache, offline, through the library and through the command line: the cache is built here in ``tmp_path`` in huggingface_hub's own layout (blobs, refs,
snapshots of symlinks; tests/hub_cache.py) from models made here with random weights, the
environment points at it (``HF_HUB_CACHE`` or ``HF_HOME``, set after ``huggingface_hub`` was
imported, as a notebook would), ``HF_HUB_OFFLINE=1``, and every socket connection raises."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from salience import METHODS, SalienceError
from salience.cli import main
from salience.loading import load_image, load_model, preprocess
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
def cache(request, tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty hub cache folder that the environment names (``HF_HUB_CACHE=DIR``, or with
    ``indirect`` parametrization ``HF_HOME=PARENT``), offline, with the network refused."""
    var = getattr(request, "param", "HF_HUB_CACHE")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, str(tmp_path / "hub" if var == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = forbid_network(monkeypatch)
    assert hub_cache() == str(tmp_path / "hub")
    yield tmp_path / "hub"
    assert attempts == []  # also those a library caught and swallowed


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


# --------------------------------------------------------------------------------- timm at a revision

TIMM = "timm/test_resnet.r160_in1k"  # the hub repo of timm's test_resnet (its default tag)
T_MAIN, T_FT = commit_hash("timm main"), commit_hash("timm finetune")
FT_NAMES, FT_MEAN = ("ant", "bee", "cow"), (0.1, 0.2, 0.3)


@pytest.fixture
def timm_repo(cache, tmp_path):
    """``TIMM`` in the cache at two commits, written by timm's ``save_for_hf``: T_MAIN (``main``,
    ImageNet's 1000 classes, timm's preprocessing) and T_FT (branch ``finetune``, tag ``v2``: a 3-class
    head with its ``label_names``, another mean and ``crop_pct`` 1 in its ``config.json``)."""
    torch.manual_seed(5)
    a = timm.create_model("test_resnet", pretrained=False).eval()
    b = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    save_for_hf(a, tmp_path / "ta", safe_serialization=True)
    save_for_hf(b, tmp_path / "tb", safe_serialization=True, model_config={"label_names": list(FT_NAMES)},
                data_config={"mean": FT_MEAN, "crop_pct": 1.0})
    add_snapshot(cache, TIMM, tmp_path / "ta", T_MAIN, refs=["main"])
    add_snapshot(cache, TIMM, tmp_path / "tb", T_FT, refs=["finetune", "v2"])
    return a, b


@pytest.mark.parametrize("name", ["test_resnet", "test_resnet.r160_in1k"])
@pytest.mark.parametrize("revision", [T_FT, "finetune", "v2"])
def test_timm_revision_by_commit_branch_or_tag(timm_repo, name, revision):
    """The weights, classes, names and preprocessing of that revision's snapshot, as
    ``timm.create_model('hf-hub:timm/test_resnet.r160_in1k@REV', pretrained=True)`` would take them."""
    a, b = timm_repo
    m = load_model(f"timm:{name}@{revision}")
    assert _same_weights(m, b) and not m.training and m.num_classes == 3
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(x), b(x))
    info = m.salience_info
    assert info.name == f"timm:{name}@{revision}" and info.class_names == FT_NAMES
    assert info.mean == pytest.approx(FT_MEAN) and info.std == pytest.approx((0.5, 0.5, 0.5))
    assert info.input_size == (160, 160) and info.resize == 160  # crop_pct 1.0: the shorter side to 160
    assert m.pretrained_cfg["hf_hub_id"] == f"{TIMM}@{revision}" and m.pretrained_cfg.get("state_dict") is None


@pytest.mark.parametrize("spec", ["timm:test_resnet", "timm:test_resnet@main", f"timm:test_resnet.r160_in1k@{T_MAIN}"])
def test_timm_main_or_no_revision_is_the_main_snapshot(timm_repo, spec):
    a, b = timm_repo
    m = load_model(spec)
    assert _same_weights(m, a) and m.num_classes == 1000
    info = m.salience_info
    assert info.mean == (0.5, 0.5, 0.5) and info.resize == 168 and len(info.class_names) == 1000


@pytest.mark.parametrize("offline", [True, False])
def test_loading_never_opens_a_connection(hf_repo, timm_repo, monkeypatch, offline):
    """Offline or not (``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import: its constant is set
    here), the cache is read from disk only: the fixture records every connection attempt, also one
    that huggingface_hub catches (its agent-registry fetch, forgotten here so that it would run again)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    agent = sys.modules.get("huggingface_hub.utils._detect_agent")
    if agent is not None:
        monkeypatch.setattr(agent, "_registry", None)
    assert _same_weights(load_model("timm:test_resnet@finetune"), timm_repo[1])
    assert _same_weights(load_model(f"hf:{REPO}@v1"), hf_repo[1])
    for spec in ("timm:test_resnet@nope", f"hf:{REPO}@nope"):
        with pytest.raises(SalienceError, match="not in the local Hugging Face cache"):
            load_model(spec)


def test_timm_missing_revision_names_it_and_the_command(timm_repo, cache):
    with pytest.raises(SalienceError) as e:
        load_model("timm:test_resnet.r160_in1k@v9")
    msg = str(e.value)
    assert msg.startswith(f"timm:test_resnet.r160_in1k@v9: revision v9 of {TIMM} is not in the local Hugging Face "
                          f"cache ({cache}); it holds finetune -> {T_FT[:10]}, main -> {T_MAIN[:10]}, v2 -> {T_FT[:10]}")
    assert f"hf download {TIMM} --revision v9 " in msg and "never downloads" in msg and "\n" not in msg
    short = T_FT[:7]  # the hub cache keys snapshots by the full hash
    with pytest.raises(SalienceError, match=rf"revision {short} of {TIMM} is not in .*--revision {short} "):
        load_model(f"timm:test_resnet@{short}")
    with pytest.raises(SalienceError, match=r"revision main of timm/test_vit\.r160_in1k is not in the local Hugging "
                                            r"Face cache \([^)]*\) and salience never downloads.*"
                                            r"hf download timm/test_vit\.r160_in1k --revision main "):
        load_model("timm:test_vit@main")  # a repo the cache does not hold at all


@pytest.mark.parametrize("weights", ["random", "w.safetensors"])
def test_timm_revision_with_weights_is_refused(timm_repo, tmp_path, weights):
    """A revision picks the hub's weights, ``weights`` replaces them: both at once is an error, not a
    silent choice (the file need not exist: the spec is checked first)."""
    with pytest.raises(SalienceError, match=r"timm:test_resnet@finetune: the revision @finetune picks timm's "
                                            r"pretrained weights .* give one, timm:test_resnet with weights=FILE or"):
        load_model("timm:test_resnet@finetune", weights=weights)


NO_WEIGHTS = "convnext_atto_rms"  # a timm architecture with no pretrained weights: no hub repo, no URL
URL_ONLY = "gcvit_xxtiny"  # pretrained weights at a release URL of timm's GitHub, no hub repo


def _timm_cfg(name: str) -> dict:
    return timm.create_model(name, pretrained=False).pretrained_cfg


def test_the_architectures_without_a_hub_repo_are_what_these_tests_assume():
    """If timm moves these weights to the hub one day, the next tests must pick other names."""
    assert not _timm_cfg(NO_WEIGHTS).get("hf_hub_id") and not _timm_cfg(NO_WEIGHTS).get("url")
    assert not _timm_cfg(URL_ONLY).get("hf_hub_id") and _timm_cfg(URL_ONLY).get("url")


@pytest.mark.parametrize("revision", ["", "@main"])
def test_timm_without_pretrained_weights_says_there_are_none(cache, revision):
    """No hub repo and no URL: there is nothing to download either, so the message must not send the
    user online (it did: "Get them once online (... pretrained=True)", which fails there too)."""
    with pytest.raises(SalienceError) as e:
        load_model(f"timm:{NO_WEIGHTS}{revision}")
    msg = str(e.value)
    assert msg.startswith(f"timm:{NO_WEIGHTS}{revision}: timm has no pretrained weights for {NO_WEIGHTS}")
    assert 'weights="random"' in msg and "--" not in msg and "online" not in msg and "\n" not in msg
    assert (f"at {revision}" in msg) == bool(revision)
    m = load_model(f"timm:{NO_WEIGHTS}", weights="random")  # what the message offers works
    assert m.salience_info.name == f"timm:{NO_WEIGHTS}"


def test_timm_url_weights_without_a_hub_repo(cache, tmp_path, monkeypatch):
    """Weights published at a URL (no hub repo): a revision names nothing; without one, the file is
    read from torch hub's ``checkpoints`` folder (where ``pretrained=True`` saves it), never fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SalienceError, match=rf"timm:{URL_ONLY}@main: timm's {URL_ONLY} has no Hugging Face hub "
                                            r"repo .*so a revision names no weights; drop @main"):
        load_model(f"timm:{URL_ONLY}@main")
    with pytest.raises(SalienceError, match=rf"timm:{URL_ONLY}: timm's pretrained weights are not in the local "
                                            r"cache .*never downloads.*weights=\"random\""):
        load_model(f"timm:{URL_ONLY}")
    torch.manual_seed(5)
    src = timm.create_model(URL_ONLY, pretrained=False).eval()
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / Path(urlparse(src.pretrained_cfg["url"]).path).name
    ckpt.parent.mkdir(parents=True)
    torch.save(src.state_dict(), ckpt)
    m = load_model(f"timm:{URL_ONLY}")
    assert _same_weights(m, src)


@pytest.mark.parametrize("spec", ["timm:test_resnet@", "timm:test_resnet@a@b", "timm:test_resnet@ main"])
def test_timm_malformed_revision(cache, spec):
    with pytest.raises(SalienceError, match=r"expected timm:NAME@REVISION with one revision"):
        load_model(spec)


def test_timm_snapshot_of_another_architecture_is_refused(cache, tmp_path):
    """A ``config.json`` naming another architecture than the spec is an error, not weights forced in."""
    save_for_hf(timm.create_model("test_vit", pretrained=False), tmp_path / "v", safe_serialization=True)
    add_snapshot(cache, TIMM, tmp_path / "v", T_MAIN, refs=["main"])
    with pytest.raises(SalienceError, match=r"timm:test_resnet@main: the cached .*config\.json describes timm's "
                                            r"test_vit, not test_resnet; name that architecture \(timm:test_vit\)"):
        load_model("timm:test_resnet@main")


def test_timm_flat_legacy_config_with_names_by_index(cache, tmp_path):
    """An older timm repo's flat ``config.json`` (no ``pretrained_cfg`` object, ``labels`` as
    ``{index: name}``), read as timm's ``_parse_model_cfg`` reads it."""
    torch.manual_seed(8)
    src = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    (tmp_path / "old").mkdir()
    torch.save(src.state_dict(), tmp_path / "old" / "pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text(json.dumps({
        "architecture": "test_resnet", "num_classes": 2, "num_features": 96, "input_size": [3, 128, 128],
        "crop_pct": 1.0, "mean": [0.3, 0.3, 0.3], "std": [0.2, 0.2, 0.2], "labels": {"1": "yes", "0": "no"}}))
    add_snapshot(cache, TIMM, tmp_path / "old", T_MAIN, refs=["old"])
    m = load_model("timm:test_resnet@old")
    assert _same_weights(m, src) and m.salience_info.class_names == ("no", "yes")
    info = m.salience_info
    assert info.input_size == (128, 128) and info.resize == 128 and info.mean == (0.3, 0.3, 0.3)


# --------------------------------------------------------------------------------- the command line


def _png(path: Path, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _by_hand(path: Path, mean, std) -> torch.Tensor:
    """The input ``(1, 3, H, W)`` a model of this image's size gets: pixels / 255, normalized with
    the statistics written into the cache (no resize: the image has the model's size)."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).unsqueeze(0)


def _cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _saved(out_dir: Path, stem: str, method: str) -> tuple[int, np.ndarray]:
    """The one map ``explain`` wrote for ``stem`` and ``method``, and its class (from the file name)."""
    (npy,) = out_dir.glob(f"{stem}_{method}_*.npy")
    return int(npy.stem.rsplit("-class", 1)[1]), np.load(npy)


def test_cli_explain_hf_revision_equals_the_library(hf_repo, tmp_path, capsys):
    """``salience explain --model hf:ORG/NAME@v1``: the class name given (``bee``) exists only in
    revision v1's config, the input is normalized with v1's processor statistics, and the map is the
    library's on the same model and input."""
    img = _png(tmp_path / "img.png", 32, 0)
    rc, out, err = _cli(["explain", img, "--model", f"hf:{REPO}@v1", "--method", "vanilla", "--target", "bee",
                         "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    model = load_model(f"hf:{REPO}@v1")
    x = _by_hand(img, (0.1, 0.2, 0.3), (0.2, 0.25, 0.3))
    assert torch.allclose(preprocess(load_image(img), model.salience_info).unsqueeze(0), x, atol=1e-6)
    c, saved = _saved(tmp_path / "o", "img", "vanilla")
    assert c == 1 and f"{img}: " in out and "bee" in out.split(f"{img}: ")[1].splitlines()[0]
    assert saved.shape == (32, 32) and np.allclose(saved, METHODS["vanilla"](model, x, 1)[0].numpy(), atol=1e-6)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model"] == f"hf:{REPO}@v1" and summary["images"][0]["explained_names"] == ["bee"]
    pre = summary["preprocessing"]
    assert pre["input_size"] == [32, 32] and pre["mean"] == pytest.approx([0.1, 0.2, 0.3])
    assert pre["std"] == pytest.approx([0.2, 0.25, 0.3])


@pytest.mark.parametrize("spec", ["timm:test_resnet.r160_in1k@finetune", f"timm:test_resnet@{T_FT}",
                                  "timm:test_resnet.r160_in1k"])
def test_cli_explain_timm_equals_the_library(timm_repo, tmp_path, capsys, spec):
    """``--model timm:NAME.TAG[@REV]``: vanilla and Grad-CAM maps equal the library's on the model it
    loads; at the ``finetune`` revision the names, mean and crop come from that snapshot's config.json."""
    img = _png(tmp_path / "img.png", 160, 1)
    rc, out, err = _cli(["explain", img, "--model", spec, "--method", "vanilla,gradcam", "--out", tmp_path / "o"],
                        capsys)
    assert rc == 0, err
    model = load_model(spec)
    x = preprocess(load_image(img), model.salience_info).unsqueeze(0)
    if "@" in spec:  # crop_pct 1.0 and the written mean: the 160-pixel image is only normalized
        assert torch.allclose(x, _by_hand(img, FT_MEAN, (0.5, 0.5, 0.5)), atol=1e-6)
    with torch.no_grad():
        c = int(model(x).argmax())
    for method in ("vanilla", "gradcam"):
        got_c, saved = _saved(tmp_path / "o", "img", method)
        assert got_c == c and np.allclose(saved, METHODS[method](model, x, c)[0].numpy(), atol=1e-6)
    names = FT_NAMES if "@" in spec else model.salience_info.class_names
    assert out.split(f"{img}: ")[1].startswith(names[c])
    pre = json.loads((tmp_path / "o" / "summary.json").read_text())["preprocessing"]
    assert (pre["resize"], pre["mean"]) == ((160, list(FT_MEAN)) if "@" in spec else (168, [0.5, 0.5, 0.5]))


@pytest.mark.parametrize("spec, size", [(f"hf:{REPO}@v1", 32), ("timm:test_resnet@finetune", 160)])
def test_cli_list_model_at_a_revision(hf_repo, timm_repo, capsys, spec, size):
    rc, out, err = _cli(["list", "--model", spec], capsys)
    assert rc == 0, err
    assert out.startswith(f"model {spec} (3 x {size} x {size} input):\n  Grad-CAM layer (default; --layer to change): ")


def test_cli_missing_revision_is_one_line_exit_2(timm_repo, tmp_path, capsys):
    img = _png(tmp_path / "img.png", 160, 2)
    rc, out, err = _cli(["explain", img, "-m", "timm:test_resnet@v9", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert err.startswith(f"salience: error: timm:test_resnet@v9: revision v9 of {TIMM} is not in the local")
    assert f"hf download {TIMM} --revision v9 " in err
    rc, _, err = _cli(["explain", img, "-m", "timm:test_resnet@finetune", "--weights", "random"], capsys)
    assert rc == 2 and "the revision @finetune picks timm's pretrained weights" in err


_NO_NETWORK = """import pathlib, socket
pathlib.Path(__file__).with_name("loaded").touch()
def refuse(*args, **kwargs):
    with open(pathlib.Path(__file__).with_name("attempts"), "a") as f:
        f.write(repr(args) + "\\n")
    raise OSError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
"""


def test_real_process_explains_from_the_cache_with_no_connection(hf_repo, cache, tmp_path):
    """``python -m salience explain`` in its own process, ``HF_HOME`` naming the cache's parent and
    ``HF_HUB_OFFLINE`` unset: a ``sitecustomize`` there logs (and refuses) every connection attempt,
    and none is made; the map is the library's."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(cache.parent), PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(guard), str(Path(__file__).parents[1] / "src"),
                                           env.get("PYTHONPATH", "")]))
    img = _png(tmp_path / "img.png", 32, 3)
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(img), "-m", f"hf:{REPO}@{V1}",
                        "--target", "2", "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert (guard / "loaded").exists() and not (guard / "attempts").exists()
    assert f"{img}: " in p.stdout and "[explained: cow (2)]" in p.stdout  # v1's names
    model = load_model(f"hf:{REPO}@{V1}")
    c, saved = _saved(tmp_path / "o", "img", "vanilla")
    x = _by_hand(img, (0.1, 0.2, 0.3), (0.2, 0.25, 0.3))
    assert c == 2 and np.allclose(saved, METHODS["vanilla"](model, x, 2)[0].numpy(), atol=1e-6)
