"""The Python API's errors name its keywords (``masks=``, ``labels=``, ``out=``, ``images=``), the command
line's the flags (``--masks``, ``--labels-csv``, ``--out``, ``--images``): the CLI says the same error
with its flags where it calls the API (:func:`salience.cli.common.with_flags`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import salience
from salience import SalienceError
from salience.cli import main
from salience.cli.common import with_flags
from salience.cli.explain_many import FLAGS


@pytest.fixture()
def imgs(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(
            folder / f"{i}.png")
    return folder


def _python_error(**kw) -> str:
    with pytest.raises(SalienceError) as e:
        salience.explain_dataset("demo:shapes", kw.pop("images"), ["vanilla"], kw.pop("out"), workers=0, **kw)
    assert "--" not in str(e.value), e.value
    return str(e.value)


def _cli_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["explain", *args, "--model", "demo:shapes", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "=" not in err.split("salience: error: ")[1].split(" ")[0], err
    return err.removeprefix("salience: error: ").strip()


def test_masks_labels_out_and_metrics(tmp_path, imgs, capsys):
    missing, csv, a_file = tmp_path / "no-masks", tmp_path / "no.csv", tmp_path / "a-file"
    a_file.write_text("x")
    run = str(tmp_path / "run")
    assert _python_error(images=imgs, out=run, masks=missing) == \
        f"masks={missing}: no such folder; give the folder of the mask images"
    assert _cli_error(capsys, str(imgs), "--out", run, "--masks", str(missing)) == \
        f"--masks {missing}: no such folder; give the folder of the mask images"
    assert _python_error(images=imgs, out=run, labels=csv).startswith(f"labels={csv}: cannot read it")
    assert _cli_error(capsys, str(imgs), "--out", run, "--labels-csv", str(csv)).startswith(
        f"--labels-csv {csv}: cannot read it")
    assert _python_error(images=imgs, out=a_file) == f"{a_file} is a file, not a run folder; choose another out="
    assert _cli_error(capsys, str(imgs), "--out", str(a_file)) == \
        f"{a_file} is a file, not a run folder; choose another --out"
    assert _python_error(images=imgs, out=run, metrics=["pointing"]).startswith("metric pointing needs masks=DIR")
    assert _cli_error(capsys, str(imgs), "--out", run, "--metrics", "pointing").startswith(
        "metric pointing needs --masks DIR")
    assert not (tmp_path / "run").exists()


def test_run_evaluation_images(tmp_path, capsys):
    model = salience.load_model("demo:shapes")
    with pytest.raises(SalienceError, match=r"^images=\S+ is not a folder; give a folder of image files$"):
        salience.evidence.evaluate.run_evaluation(model, tmp_path / "eval", images=tmp_path / "nope", progress=False)
    assert main(["evaluate", "--model", "demo:shapes", "--images", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err == f"salience: error: --images {tmp_path / 'nope'} is not a folder; give a " \
                                      "folder of image files\n"
    assert not (tmp_path / "eval").exists()


def test_with_flags_reads_keywords_only():
    """A keyword with a value becomes the flag and the value, a bare one the flag; a word that ends in a
    keyword (``layout=``, ``x.out=``) is left as it is."""
    assert with_flags("choose another out=, or add overwrite=True to start again", FLAGS) == \
        "choose another --out, or add --overwrite to start again"
    assert with_flags("give the same labels= (x); masks=DIR", FLAGS) == "give the same --labels-csv (x); --masks DIR"
    assert with_flags("layout=3, x.out=4, engine='ray' needs Ray", FLAGS) == "layout=3, x.out=4, --engine ray needs Ray"



def test_with_flags_leaves_the_users_paths_alone(tmp_path, imgs, capsys):
    """A keyword inside a path (a Hive-style folder ``masks=v2``, ``mode=train``), after ``--``, or in a
    quoted value of the user's, is the user's text, not a keyword of the message: it was rewritten
    (``/data/--masks v2``)."""
    assert with_flags("masks=/data/masks=v2: no such folder", FLAGS) == "--masks /data/masks=v2: no such folder"
    assert with_flags("labels=/d/mode=train/l.csv: line 2", FLAGS) == "--labels-csv /d/mode=train/l.csv: line 2"
    assert with_flags(r"masks=C:\\out=1 x; use --out=RUN", FLAGS) == r"--masks C:\\out=1 x; use --out=RUN"
    assert with_flags("labels=/x.csv: line 2: 'target=3' is neither a class index", FLAGS) == \
        "--labels-csv /x.csv: line 2: 'target=3' is neither a class index"  # the CSV's cell, quoted
    missing = tmp_path / "masks=v2"
    assert _cli_error(capsys, str(imgs), "--out", str(tmp_path / "run"), "--masks", str(missing)) == \
        f"--masks {missing}: no such folder; give the folder of the mask images"

def test_the_warning_of_a_labels_csv_that_names_some_images(tmp_path, imgs):
    """Warnings too: ``labels=CSV names 1 of the 2 images`` from Python, ``--labels-csv CSV ...`` printed
    by the command."""
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n0.png,1\n")
    with pytest.warns(UserWarning, match=rf"^labels={csv} names 1 of the 2 images"):
        salience.explain_dataset("demo:shapes", imgs, ["vanilla"], tmp_path / "a", labels=csv, workers=0)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
           "PYTHONPATH": str(Path(salience.__file__).parents[1])}
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(imgs), "--model", "demo:shapes", "--out",
                        str(tmp_path / "b"), "--labels-csv", str(csv), "--workers", "0"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith(f"salience: warning: --labels-csv {csv} names 1 of the 2 images"), p.stderr


def test_a_warning_of_the_users_model_is_printed_as_it_said_it(tmp_path, imgs):
    """Only salience's own warnings name its keywords: a warning of the user's model that says
    ``target=`` or ``masks=`` (its own words) was printed by the command as ``--target`` / ``--masks``."""
    (tmp_path / "net.py").write_text(
        "import warnings\nimport torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                                  nn.Linear(4, 3))\n\n"
        "    def forward(self, x):\n"
        "        warnings.warn('net: trained with target=2 and masks=none')\n"
        "        return self.body(x)\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Net()\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
           "PYTHONPATH": str(Path(salience.__file__).parents[1])}
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(imgs), "--model",
                        f"python:{tmp_path / 'net.py'}:build", "--out", str(tmp_path / "run"), "--workers", "0",
                        "--method", "vanilla", "--size", "16,16"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "net: trained with target=2 and masks=none" in p.stderr, p.stderr
    assert "--target" not in p.stderr and "--masks" not in p.stderr, p.stderr


ANY_SIZE = ("import torch\nfrom torch import nn\n\n"
            "def build():\n    torch.manual_seed(0)\n"
            "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
            "nn.Linear(4, 3))\n")


def test_a_model_of_any_size_on_image_files_size_keyword_and_flag(tmp_path, imgs, capsys):
    """A model that takes any input size on image files: the Python refusal named the command line's
    ``--size H,W``; it names ``size=(H, W)`` and where it goes, and doing what it says runs; the command
    says ``--size H,W``."""
    from salience._core.info import model_info
    from salience.loading import with_preprocessing

    (tmp_path / "net.py").write_text(ANY_SIZE)
    model = salience.load_model(f"python:{tmp_path / 'net.py'}:build")
    with pytest.raises(SalienceError) as e:
        salience.explain_dataset(model, imgs, ["vanilla"], tmp_path / "a", workers=0)
    said = str(e.value)
    assert "--" not in said and "size=(H, W)" in said and "with_preprocessing" in said, said
    model.salience_info = with_preprocessing(model_info(model), size=(16, 16))  # what the message says to do
    assert len(salience.explain_dataset(model, imgs, ["vanilla"], tmp_path / "a", workers=0)) == 2
    capsys.readouterr()
    assert main(["explain", str(imgs), "--model", f"python:{tmp_path / 'net.py'}:build", "--workers", "0",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salience: error: ") and err.strip().endswith("needs one size; give --size H,W"), err
    assert not (tmp_path / "b").exists()


def test_the_float16_storage_warning_names_map_dtype_keyword_and_flag(tmp_path):
    """A run whose float16 maps lost what float32 held: Python's warning named the command line's
    ``--map-dtype float32`` beside the keyword; it names ``map_dtype="float32"`` only, and ``salience explain``
    prints ``--map-dtype float32``. The explorer's page (runs made either way) keeps both."""
    from salience._core.info import ModelInfo, attach_info
    from salience.runs.store import float16_note
    from test_constant_maps import NETS, _two_pictures

    (tmp_path / "pics").mkdir()
    _two_pictures(tmp_path / "pics")
    (tmp_path / "nets.py").write_text(NETS)
    model = attach_info(salience.load_model(f"python:{tmp_path / 'nets.py'}:tiny"),
                        ModelInfo(name="tiny", input_size=(32, 32)))
    with pytest.warns(UserWarning, match="float16") as said:
        salience.explain_dataset(model, tmp_path / "pics", ["vanilla"], tmp_path / "a", workers=0)
    (text,) = [str(w.message) for w in said if "float16" in str(w.message)]
    assert 'Run again with map_dtype="float32" to keep such maps' in text and "--" not in text, text
    assert "--map-dtype float32" in float16_note(0.0, command=True)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
           "PYTHONPATH": str(Path(salience.__file__).parents[1])}
    p = subprocess.run([sys.executable, "-m", "salience", "explain", str(tmp_path / "pics"), "--model",
                        f"python:{tmp_path / 'nets.py'}:tiny", "--size", "32", "--out", str(tmp_path / "b"),
                        "--workers", "0", "--method", "vanilla", "--no-progress"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Run again with --map-dtype float32 to keep such maps" in p.stderr and "map_dtype=" not in p.stderr, \
        p.stderr


def _load_error(capsys, tmp_path, spec: str, *flags: str, **kw) -> tuple[str, str]:
    """``load_model(spec, **kw)``'s message from Python, and what ``salience list --model spec FLAGS`` says."""
    with pytest.raises(SalienceError) as e:
        salience.load_model(spec, **kw)
    capsys.readouterr()
    assert main(["list", "--model", spec, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salience: error: ") and err.count("\n") == 1, err
    return str(e.value), err.removeprefix("salience: error: ").strip()


def test_load_models_errors_name_its_keywords_and_the_commands_its_flags(tmp_path, capsys, monkeypatch):
    """``load_model``'s refusals said ``--weights FILE``, ``--weights random``, ``--trust-pickle`` and
    ``--model ... --weights`` to Python callers; they name ``weights=``, ``weights="random"`` and
    ``trust_pickle=True``, and every command that loads a model says them with its flags
    (:data:`salience.cli.common.MODEL_FLAGS`)."""
    import torch
    from torch import nn

    st = tmp_path / "w.safetensors"
    st.write_bytes(b"")
    py, cli = _load_error(capsys, tmp_path, str(st))
    assert py == f"{st}: a .safetensors file holds weights only; give its architecture too, e.g. model " \
                 f"timm:resnet50 with weights={st} (or torchvision:ARCH, python:MODULE:FUNC)"
    assert cli == py.replace(f"model timm:resnet50 with weights={st}", f"--model timm:resnet50 --weights {st}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    py, cli = _load_error(capsys, tmp_path, str(tmp_path / "sd.pt"))
    assert f"e.g. model torchvision:resnet50 with weights={tmp_path / 'sd.pt'}, or save" in py and "--" not in py
    assert cli == py.replace("model torchvision:resnet50 with weights=", "--model torchvision:resnet50 --weights ")
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    py, cli = _load_error(capsys, tmp_path, str(tmp_path / "whole.pt"))
    assert "If you trust the file, pass trust_pickle=True; better" in py and "--" not in py
    assert cli == py.replace("trust_pickle=True", "--trust-pickle")
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    py, cli = _load_error(capsys, tmp_path, "timm:convnext_atto_rms")  # no pretrained weights at all
    assert py.endswith('; pass weights=FILE (a state dict) or weights="random"') and "--" not in py, py
    assert cli.endswith("; pass --weights FILE (a state dict) or --weights random"), cli
    py, cli = _load_error(capsys, tmp_path, "timm:test_resnet@main", "--weights", "random", weights="random")
    assert py.endswith("give one, timm:test_resnet with weights=FILE or timm:test_resnet@main without weights")
    assert "--" not in py and cli == py.replace("weights=FILE", "--weights FILE")


def test_an_empty_output_folder_names_out_dir_from_python_and_out_on_the_command_line(tmp_path, capsys, monkeypatch):
    """``run_evaluation(model, "")`` said ``give a folder (e.g. --out results/)``, a flag Python has not."""
    monkeypatch.chdir(tmp_path)
    model = salience.load_model("demo:shapes")
    with pytest.raises(SalienceError) as e:
        salience.evidence.evaluate.run_evaluation(model, "", methods=["vanilla"], progress=False)
    assert str(e.value) == "the output folder's name is empty; give a folder (e.g. out_dir=results/)"
    capsys.readouterr()
    assert main(["evaluate", "--model", "demo:shapes", "--method", "vanilla", "--out", ""]) == 2
    assert capsys.readouterr().err == "salience: error: the output folder's name is empty; give a folder (e.g. " \
                                      "--out results/)\n"
    assert main(["explain", "--model", "demo:shapes", "--out", " ", "demo"]) == 2
    assert capsys.readouterr().err.endswith("give a folder (e.g. --out results/)\n")
    assert list(tmp_path.iterdir()) == []


def test_the_commands_leave_the_users_values_alone(tmp_path, imgs, capsys, monkeypatch):
    """What the user typed that holds a keyword (a file ``weights=x.pt``, a folder ``out=run``) stays as typed where
    the message starts with it: the command said ``--weights x.pt: holds a state dict``, ``--out run exists``,
    ``cannot create the output folder --out f/sub``; and the example of a spec with weights is the command line's
    ``--model torchvision:resnet50 --weights PATH`` (it said ``model torchvision:resnet50 with --weights PATH``)."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights=x.pt")
    for spec in ("weights=x.pt", "./weights=x.pt"):
        capsys.readouterr()
        assert main(["list", "--model", spec]) == 2
        assert capsys.readouterr().err == (
            "salience: error: weights=x.pt: holds a state dict (weights only); give its architecture too, e.g. "
            "--model torchvision:resnet50 --weights weights=x.pt, or save the model as TorchScript\n")
    (tmp_path / "out=run").mkdir()
    (tmp_path / "out=run" / "notes.txt").write_text("x")
    capsys.readouterr()
    assert main(["explain", str(imgs), "--model", "demo:shapes", "--workers", "0", "--out", "out=run"]) == 2
    assert capsys.readouterr().err == "salience: error: out=run exists and is not a salience run; choose another " \
                                      "--out (an empty or new folder)\n"
    (tmp_path / "out_dir=f").write_text("a file")
    capsys.readouterr()
    assert main(["evaluate", "--model", "demo:shapes", "--method", "vanilla", "--out", "out_dir=f/sub"]) == 2
    assert capsys.readouterr().err == \
        "salience: error: cannot create the output folder out_dir=f/sub (Not a directory)\n"
    assert with_flags("out=run exists; choose another out=", FLAGS, ["out=run"]) == \
        "out=run exists; choose another --out"


def test_a_dataset_run_refuses_an_empty_out_and_a_folder_behind_a_file(tmp_path, imgs, capsys, monkeypatch):
    """``explain_dataset(..., out="")`` wrote the run into the current folder among the user's files (``Path("")``
    is ``.``): refused as ``run_evaluation``'s empty ``out_dir`` is; an ``out`` under a file was an unexpected
    NotADirectoryError ('please report it'): a SalienceError, ``--out`` on the command line."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in ("", " "):
        with pytest.raises(SalienceError) as e:
            salience.explain_dataset("demo:shapes", imgs, ["vanilla"], out, workers=0)
        assert str(e.value) == "the output folder's name is empty; give a folder (e.g. out=results/)"
    assert list(here.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    behind = tmp_path / "a-file" / "run"
    with pytest.raises(SalienceError) as e:
        salience.explain_dataset("demo:shapes", imgs, ["vanilla"], behind, workers=0)
    assert str(e.value) == f"cannot create the output folder {behind} (Not a directory)"
    assert _cli_error(capsys, str(imgs), "--out", str(behind)) == \
        f"cannot create the output folder {behind} (Not a directory)"
