"""Model specs of real libraries and your own code: timm:, hf:, python:, .pt2, .safetensors, and the
one rule of model outputs (tensor, ModelOutput, dict, tuple; output= picks another).

Every model is made here (no hub weights, nothing downloaded)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import salience
from salience import SalienceError
from salience.cli import main
from salience.loading import imagenet_class_names, load_model, select_output
from salience.loading.libraries import _hf_geometry

from conftest import SmallCNN, unchanged

import safetensors.torch as safetensors_torch  # noqa: E402 - in the test extra: tested, never skipped
import timm  # noqa: E402


def _x(b: int = 2, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, side, side, generator=g)


# --------------------------------------------------------------------------------- timm


def test_timm_random_weights_carry_timm_preprocessing_and_imagenet_names():
    m = load_model("timm:test_resnet", weights="random")
    info = m.salience_info
    assert info.name == "timm:test_resnet" and not m.training
    assert info.input_size == (160, 160) and info.resize == int(160 / 0.95)  # crop_pct 0.95 -> 168
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.5, 0.5, 0.5) and info.interpolation == "bilinear"
    assert info.class_names == imagenet_class_names() and info.default_layer is None
    x = _x(1, 64)
    with unchanged(m):
        assert salience.vanilla(m, x).shape == (1, 64, 64)
    vit = load_model("timm:test_vit", weights="random").salience_info
    assert vit.interpolation == "bicubic" and vit.input_size == (160, 160)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_file_with_other_classes(tmp_path, suffix):
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    m = load_model("timm:test_resnet", weights=path)
    x = _x(2, 64)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    assert m.salience_info.class_names is None  # 5 classes: no ImageNet names


def test_timm_state_dict_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"nope.weight": torch.zeros(3)}, path)
    with pytest.raises(SalienceError, match=r"does not fit timm's test_resnet \(missing .*unexpected nope.weight"):
        load_model("timm:test_resnet", weights=path)


def test_timm_pretrained_without_a_cache_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SalienceError, match=r"not in the local cache.*never downloads.*"
                                            r"hf download timm/test_resnet.r160_in1k.*weights=\"random\"") as e:
        load_model("timm:test_resnet")
    assert "\n" not in str(e.value)


def test_timm_unknown_name_suggests():
    with pytest.raises(SalienceError, match=r"unknown timm model 'resnet5O'; did you mean 'resnet50'"):
        load_model("timm:resnet5O", weights="random")


# --------------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3,
                                 id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    d = tmp_path_factory.mktemp("hfvit")
    transformers.ViTForImageClassification(cfg).save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3], resample=3).save_pretrained(d)
    return d


def test_hf_folder_loads_with_its_preprocessing_and_names(hf_dir):
    m = load_model(f"hf:{hf_dir}")
    info = m.salience_info
    assert info.input_size == (32, 32) and info.resize is None and info.interpolation == "bicubic"
    assert info.mean == pytest.approx((0.4, 0.5, 0.6)) and info.std == pytest.approx((0.2, 0.25, 0.3))
    assert info.class_names == ("cat", "dog", "fox") and not m.training


def test_hf_vanilla_equals_the_gradient_of_the_logits_by_hand(hf_dir):
    m = load_model(f"hf:{hf_dir}")
    x = _x(2, 32)
    with unchanged(m):
        sal = salience.vanilla(m, x, reduce=None)
    xr = x.clone().requires_grad_(True)
    logits = m(xr).logits
    top = logits.detach().argmax(1)
    (g,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), xr)
    assert torch.allclose(sal, g, atol=1e-6)


def test_hf_errors_are_one_line(tmp_path, hf_dir):
    with pytest.raises(SalienceError, match=r"not in the local Hugging Face cache \(.*\); salience loads offline"):
        load_model("hf:nobody/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SalienceError, match=r"could not load an image classifier from this folder"):
        load_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(SalienceError, match=r"carries its own weights"):
        load_model(f"hf:{hf_dir}", weights="random")


@pytest.mark.parametrize("cfg, geometry", [
    ({"size": {"height": 224, "width": 224}}, ((224, 224), None)),                              # ViT: stretch
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875}, ((224, 224), 256)),                 # ConvNeXt / ResNet
    ({"size": {"height": 256, "width": 256}, "do_center_crop": True,
      "crop_size": {"height": 224, "width": 224}}, ((224, 224), 256)),                        # DeiT
    ({"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 224}, ((224, 224), 224)),  # CLIP
    ({"do_resize": False}, ((32, 32), None)),
])
def test_hf_processor_geometry(cfg, geometry):
    assert _hf_geometry(cfg, 32) == geometry


# --------------------------------------------------------------------------------- python:


NETS = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))

def build():
    torch.manual_seed(1)
    return Net()

def builder():
    return 42

LIMIT = 3
'''


@pytest.fixture
def nets_file(tmp_path) -> Path:
    p = tmp_path / "my_nets_for_salience.py"
    p.write_text(textwrap.dedent(NETS))
    return p


def test_python_file_and_module_specs(nets_file, monkeypatch, tmp_path):
    m = load_model(f"python:{nets_file}:build")
    assert m.salience_info.name.startswith("python:") and not m.training
    x = _x(2, 16)
    with unchanged(m):
        assert salience.vanilla(m, x).shape == (2, 16, 16)
    monkeypatch.syspath_prepend(str(nets_file.parent))
    m2 = load_model("python:my_nets_for_salience:build")
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


SIBLING = """
from torch import nn

class Stem(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""

USES_SIBLING = """
import torch
from torch import nn

from stem_for_salience_test import Stem

def build():
    torch.manual_seed(2)
    return nn.Sequential(Stem(), nn.Linear(4, 3))
"""


def test_a_python_file_imports_its_siblings_and_its_model_pickles_by_value(tmp_path):
    """``python:FILE.py:build`` whose file imports a file beside it (``from stem... import Stem``),
    its folder not on ``sys.path`` (the ``salience`` command's case): it imports as a script does
    ("running it raised ModuleNotFoundError" before) and leaves ``sys.path`` as it was. Its module
    and the sibling are :func:`~salience.loading.custom.user_modules`; registered with cloudpickle
    (as the Ray engine does with Ray's), the model unpickles in a fresh process that has neither, and
    gives the same scores."""
    import subprocess
    import sys

    cloudpickle = pytest.importorskip("cloudpickle")
    from salience.loading.custom import user_modules

    code = tmp_path / "code"
    code.mkdir()
    (code / "stem_for_salience_test.py").write_text(SIBLING)
    (code / "nets_with_sibling.py").write_text(USES_SIBLING)
    path = list(sys.path)
    m = load_model(f"python:{code / 'nets_with_sibling.py'}:build")
    assert sys.path == path
    names = [u.__name__ for u in user_modules()]
    assert "stem_for_salience_test" in names and type(m[0]).__module__ == "stem_for_salience_test"
    assert any(n.startswith("salience_user_nets_with_sibling_") for n in names)
    assert not any(n.startswith(("salience.", "torch")) or n in ("salience", "torch") for n in names)
    for u in user_modules():
        cloudpickle.register_pickle_by_value(u)
    try:
        blob = cloudpickle.dumps(m)
    finally:
        for u in user_modules():
            cloudpickle.unregister_pickle_by_value(u)
    x = _x(2, 16)
    (tmp_path / "m.pkl").write_bytes(blob)
    torch.save(x, tmp_path / "x.pt")
    script = ("import pickle, sys, torch; m = pickle.load(open(sys.argv[1], 'rb')); "
              "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pkl"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), m(x))


def test_python_weights_from_safetensors(nets_file, tmp_path):
    torch.manual_seed(5)
    src = load_model(f"python:{nets_file}:build")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    m = load_model(f"python:{nets_file}:build", weights=path)
    x = _x(2, 16)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_python_spec_errors_are_one_line(nets_file, tmp_path):
    cases = [
        ("python:no_such_module_for_salience:build", r"no module named 'no_such_module_for_salience'"),
        (f"python:{nets_file}:biuld", r"has no 'biuld'; did you mean 'build'"),
        (f"python:{nets_file}:LIMIT", r"LIMIT is a int, not a function"),
        (f"python:{nets_file}:builder", r"builder\(\) returned an object of type int, expected a torch.nn.Module"),
        (f"python:{tmp_path / 'missing.py'}:build", r"no such file"),
        ("python:justone", r"expected python:MODULE:FUNC"),
    ]
    for spec, pattern in cases:
        with pytest.raises(SalienceError, match=pattern) as e:
            load_model(spec)
        assert "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 5, 5)}, bad)
    with pytest.raises(SalienceError, match=r"does not fit python:.*missing conv.bias.*shape conv.weight"):
        load_model(f"python:{nets_file}:build", weights=bad)


# --------------------------------------------------------------------------------- .pt2


@pytest.fixture
def exported(tmp_path, small_cnn):
    model = small_cnn.eval()
    ep = torch.export.export(model, (_x(2, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = tmp_path / "cnn.pt2"
    torch.export.save(ep, path)
    return model, path


def test_pt2_every_method_equals_the_eager_model(exported):
    eager, path = exported
    m = load_model(path)
    assert m.salience_info.input_size == (16, 16)
    x = _x(3, 16)
    calls = {
        "vanilla": lambda mod: salience.vanilla(mod, x),
        "input_x_gradient": lambda mod: salience.input_x_gradient(mod, x),
        "guided_backprop": lambda mod: salience.guided_backprop(mod, x),
        "deconvnet": lambda mod: salience.deconvnet(mod, x),
        "smoothgrad": lambda mod: salience.smoothgrad(mod, x, samples=4),
        "integrated_gradients": lambda mod: salience.integrated_gradients(mod, x, steps=4),
        "gradcam": lambda mod: salience.gradcam(mod, x, layer="features"),
        "gradcam_inner": lambda mod: salience.gradcam(mod, x, layer="features.3"),
        "guided_gradcam": lambda mod: salience.guided_gradcam(mod, x, layer="features"),
    }
    for name, call in calls.items():
        with unchanged(m):
            got = call(m)
        assert torch.allclose(got, call(eager), atol=1e-5), name


def test_onnx_model_every_method_equals_the_pytorch_model(tmp_path, small_cnn):
    """ONNX for real: exported by torch.onnx (BatchNorm folded into the convs), loaded through
    onnx2torch by load_model; the maps equal the PyTorch model's (guided ones included: onnx2torch's
    ReLU modules call the ReLU operation the rules intercept)."""
    import warnings

    import onnx2torch  # noqa: F401 - in the test extra: tested, never skipped
    eager = small_cnn.eval()
    path = tmp_path / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(eager, _x(2, 16), str(path), dynamo=False, opset_version=13, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    m = load_model(path)
    relu = [n for n, mod in m.named_modules() if n.endswith("Relu")][-1]  # onnx2torch's name for features.5
    x = _x(3, 16, seed=4)
    calls = {
        "vanilla": (lambda mod: salience.vanilla(mod, x),) * 2,
        "input_x_gradient": (lambda mod: salience.input_x_gradient(mod, x),) * 2,
        "guided_backprop": (lambda mod: salience.guided_backprop(mod, x),) * 2,
        "deconvnet": (lambda mod: salience.deconvnet(mod, x),) * 2,
        "integrated_gradients": (lambda mod: salience.integrated_gradients(mod, x, steps=4),) * 2,
        "gradcam": (lambda mod: salience.gradcam(mod, x, layer=relu), lambda mod: salience.gradcam(mod, x, layer="features")),
        "guided_gradcam": (lambda mod: salience.guided_gradcam(mod, x, layer=relu),
                           lambda mod: salience.guided_gradcam(mod, x, layer="features")),
    }
    for name, (on_onnx, on_eager) in calls.items():
        with unchanged(m):
            got = on_onnx(m)
        ref = on_eager(eager)
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("opset", [13, None])  # None: the exporter's default (19 here)
def test_onnx_with_shared_weights_of_the_legacy_exporter(tmp_path, opset):
    """torch.onnx's TorchScript-based exporter stores equal tensors once and names the others through
    Identity nodes (a fresh resnet18's folded convolutions share their zero-ish biases); onnx2torch
    failed on them ("KeyError: 'onnx::Conv_...'", or no converter for Identity at opset 19). The file
    loads and computes what the PyTorch model computes; so do its maps."""
    import warnings

    import onnx
    import onnx2torch  # noqa: F401 - in the test extra: tested, never skipped
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    eager = tvm.resnet18().eval()
    path = tmp_path / "r18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(eager, _x(1, 64), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, **({"opset_version": opset} if opset else {}))
    graph = onnx.load(str(path)).graph
    inits = {t.name for t in graph.initializer}
    assert any(n.op_type == "Identity" and n.input[0] in inits for n in graph.node)  # the case under test
    m = load_model(path)
    x = _x(2, 64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), eager(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(salience.vanilla(m, x), salience.vanilla(eager, x), rtol=1e-4, atol=1e-6)


def test_onnx_that_onnx2torch_cannot_convert_is_one_line_with_what_to_do(tmp_path):
    import onnx
    from onnx import helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), str(tmp_path / "odd.onnx"))
    with pytest.raises(SalienceError, match=r"odd\.onnx: onnx2torch could not convert this ONNX model \(\w+: .*\); it "
                                            r"converts a subset of ONNX: give the PyTorch model if you have it"):
        load_model(tmp_path / "odd.onnx")


def test_pt2_exported_in_train_mode_or_with_a_fixed_batch_is_refused(tmp_path, small_cnn):
    torch.export.save(torch.export.export(small_cnn.eval(), (_x(2, 16),)), tmp_path / "fixed.pt2")
    with pytest.raises(SalienceError, match=r"fixed batch size of 2.*Dim\('batch'\)"):
        load_model(tmp_path / "fixed.pt2")
    train = SmallCNN().train()
    ep = torch.export.export(train, (_x(2, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, tmp_path / "train.pt2")
    with pytest.raises(SalienceError, match=r"exported in train mode.*model.eval\(\)"):
        load_model(tmp_path / "train.pt2")


class _Masked(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, mask):
        return self.net(x * mask)


def test_pt2_exported_with_a_second_input_is_refused(tmp_path, small_cnn):
    """A program exported with two inputs loaded, then every method stopped with torch's raw ValueError
    "Trying to flatten user inputs with exported input tree spec" (salience calls it with x alone)."""
    x = _x(2, 16)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(_Masked(small_cnn.eval()), (x, torch.ones_like(x)),
                             dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    torch.export.save(ep, tmp_path / "two.pt2")
    with pytest.raises(SalienceError, match=r"exported with 2 inputs \(x, mask\).*export a module whose "
                                            r"forward\(x\) takes the image batch alone"):
        load_model(tmp_path / "two.pt2")


# --------------------------------------------------------------------------------- safetensors


def test_torchvision_weights_from_safetensors(tmp_path):
    import torchvision.models as tvm
    torch.manual_seed(0)
    src = tvm.resnet18(num_classes=7).eval()
    path = tmp_path / "r18.safetensors"
    safetensors_torch.save_file(src.state_dict(), str(path))
    m = load_model("torchvision:resnet18", weights=path)
    x = _x(1, 64)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    with pytest.raises(SalienceError, match=r"holds weights only; give its architecture too"):
        load_model(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SalienceError, match=r"not a safetensors file"):
        load_model("torchvision:resnet18", weights=tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------------- the output rule


class Returns(nn.Module):
    """A small CNN whose forward returns its logits inside ``kind`` (next to an ``aux`` head)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        logits, aux = self.head(h), self.aux(h)
        return {
            "tensor": logits, "tuple": (logits, aux), "list": [logits, aux], "logits_dict": {"logits": logits, "aux": aux},
            "one": {"x": logits, "n": 3}, "several": {"x": logits, "aux": aux}, "aux_first": (aux, logits),
        }[self.kind]


def _model(kind: str) -> Returns:
    torch.manual_seed(0)
    return Returns(kind).eval()


def _expected(x: torch.Tensor, use_aux: bool = False) -> torch.Tensor:
    ref = _model("tensor")
    fn = (lambda t: ref.aux(torch.relu(ref.conv(t)).mean((2, 3)))) if use_aux else ref
    return salience.vanilla(fn if isinstance(fn, nn.Module) else _Wrap(fn), x)


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("kind", ["tuple", "list", "logits_dict", "one"])
def test_default_rule(kind):
    x = _x(2, 8)
    m = _model(kind)
    with unchanged(m):
        got = salience.vanilla(m, x)
    assert torch.allclose(got, _expected(x))


def test_dict_of_several_tensors_names_its_keys():
    with pytest.raises(SalienceError, match=r"returned a dict with keys \['x', 'aux'\].*pass output="):
        salience.vanilla(_model("several"), _x(2, 8))


@pytest.mark.parametrize("kind, output, aux", [
    ("several", "aux", True), ("several", "x", False), ("aux_first", 1, False), ("tuple", 1, True),
    ("several", lambda o: o["x"], False), ("logits_dict", "aux", True),
])
def test_output_picks_another(kind, output, aux):
    x = _x(2, 8)
    m = select_output(_model(kind), output)
    assert m.salience_info.output is output
    with unchanged(m):
        got = salience.vanilla(m, x)
        ig = salience.integrated_gradients(m, x, steps=3)
    assert torch.allclose(got, _expected(x, aux))
    assert ig.shape == (2, 8, 8)


@pytest.mark.parametrize("kind, output, pattern", [
    ("several", "nope", r"output='nope' does not fit: the model returned a dict with keys \['x', 'aux'\]"),
    ("tuple", 5, r"output=5 does not fit: the model returned a tuple of length 2 \(tensor, tensor\)"),
    ("one", "n", r"output='n' picked a int, not a tensor"),
    ("tensor", 0, r"output=0 does not fit: the model returned a tensor of shape \(2, 3\)"),
])
def test_a_wrong_pick_names_what_the_model_returned(kind, output, pattern):
    m = select_output(_model(kind), output)
    with unchanged(m):
        with pytest.raises(SalienceError, match=pattern):
            salience.vanilla(m, _x(2, 8))


def test_load_model_output_and_command_line(nets_file, tmp_path, capsys):
    src = nets_file.read_text() + textwrap.dedent('''
    class Two(Net):
        def forward(self, x):
            out = super().forward(x)
            return {"aux": out * 0, "main": out}

    def build_two():
        torch.manual_seed(1)
        return Two()
    ''')
    nets_file.write_text(src)
    m = load_model(f"python:{nets_file}:build_two", output="main")
    assert m.salience_info.output == "main"
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(img)
    rc = main(["explain", str(img), "--model", f"python:{nets_file}:build_two", "--out", str(tmp_path / "out")])
    assert rc == 2 and "pass output=" in capsys.readouterr().err
    rc = main(["explain", str(img), "--model", f"python:{nets_file}:build_two", "--output", "main",
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    with pytest.raises(SalienceError, match=r"output must be a key"):
        select_output(m, 1.5)
